"""Anthropic's protocol in `chunbot sim serve`: `POST /v1/messages` (JSON and SSE, a forced
tool's input as the answer), its error bodies, `anthropic-ratelimit-*` headers, x-api-key
and anthropic-version, `cache_control` prompt caching reported in its usage, and its
Message Batches (`/v1/messages/batches`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from . import model as sim_model
from .batches import BATCH_WINDOW, EXPIRED, ID, SUCCEEDED, Batch, BatchRoutes, Handler, Item, \
    iso, limit_of
from .cache import CacheUse, marked_use
from .faults import Bucket
from .wire import BLOCKED, Call, Dialect, Refused, answer_object, chat_checked, chat_messages, \
    chat_params, json_object, respond, retry_headers, split_words, text_of

# The error kinds as Anthropic spells them
ERRORS = {
    "invalid_request": "invalid_request_error",
    "auth": "authentication_error",
    "rate_limit_requests": "rate_limit_error",
    "rate_limit_tokens": "rate_limit_error",
    "server": "api_error",
    "overloaded": "overloaded_error",
    "not_found": "not_found_error",
}
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
RESULTS = "application/binary"  # what Anthropic's SDKs ask the results route for


def parse(body: dict[str, Any], where: Mapping[str, str]) -> Call:
    chat_checked(body)
    if "max_tokens" not in body:
        raise Refused(400, "invalid_request", "max_tokens: field required")
    messages = chat_messages(body["messages"])
    system = body.get("system")
    if system is not None:
        # the in-process provider sends the system prompt as a first message
        messages = [{"role": "system", "content": text_of(system)}, *messages]
    return Call(body["model"], messages, chat_params(body), body.get("stream") is True, False,
                body)


def authorize(request: web.Request, key: str | None) -> None:
    if key is not None and request.headers.get("x-api-key") != key:
        raise Refused(401, "auth", "invalid x-api-key")
    if "anthropic-version" not in request.headers:
        raise Refused(400, "invalid_request", "anthropic-version: header is required")


def error(refused: Refused) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": ERRORS[refused.kind],
                                                    "message": refused.message}})


def rfc3339_after(seconds: float) -> str:
    # rounded up to the second, so a client waiting until then never comes back early
    moment = math.ceil(time.time() + seconds)
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def limit_headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
    headers = {}
    for name, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"anthropic-ratelimit-{name}-limit"] = str(bucket.limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(bucket.remaining())
            headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_after(bucket.until_full())
    return headers


def stop_reason(answer: sim_model.SimReply) -> str:
    if answer.finish_reason in BLOCKED:
        return "refusal"
    return "max_tokens" if answer.finish_reason == "length" else "end_turn"


def usage(answer: sim_model.SimReply, cache: CacheUse, output_tokens: int) -> dict[str, Any]:
    """Anthropic's usage: input_tokens are the prompt tokens neither read from the cache
    nor written to it."""
    return {"input_tokens": max(0, answer.input_tokens - cache.created - cache.read),
            "cache_creation_input_tokens": cache.created,
            "cache_read_input_tokens": cache.read, "output_tokens": output_tokens}


def forced_tool(call: Call) -> str | None:
    """The tool the request forces (`tool_choice: {type: tool, name}`), if any."""
    choice = call.params.get("tool_choice")
    return choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" \
        else None


def json_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
               malformed: bool) -> bytes:
    body: dict[str, Any] = {"id": reply_id, "type": "message", "role": "assistant",
                            "model": call.model}
    tool = forced_tool(call)
    if not malformed and answer.finish_reason in BLOCKED:
        body["content"] = []
    elif not malformed and tool is not None:  # the forced tool's input is the answer
        body["content"] = [{"type": "tool_use", "id": "toolu_" + reply_id[4:], "name": tool,
                            "input": answer_object(answer)}]
    elif not malformed:
        body["content"] = [{"type": "text", "text": answer.text}]
    body.update(stop_reason=stop_reason(answer), stop_sequence=None,
                usage=usage(answer, cache, answer.output_tokens))
    return orjson.dumps(body)


def sse_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
              seed: int) -> bytes:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    message = {"id": reply_id, "type": "message", "role": "assistant", "model": call.model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": usage(answer, cache, 1)}
    start = event("message_start", {"type": "message_start", "message": message})
    end = [event("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": stop_reason(answer),
                                             "stop_sequence": None},
                                   "usage": {"output_tokens": answer.output_tokens}}),
           event("message_stop", {"type": "message_stop"})]
    if answer.finish_reason in BLOCKED:  # refused: no content block at all
        return b"".join([start, *end])
    tool = forced_tool(call)
    block: dict[str, Any] = ({"type": "tool_use", "id": "toolu_" + reply_id[4:], "name": tool,
                              "input": {}} if tool else {"type": "text", "text": ""})
    parts = [start,
             event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": block}),
             event("ping", {"type": "ping"})]
    if tool:
        text = orjson.dumps(answer_object(answer)).decode()
        deltas = [{"type": "input_json_delta", "partial_json": piece}
                  for piece in split_words(text, seed)]
    else:
        deltas = [{"type": "text_delta", "text": piece}
                  for piece in split_words(answer.text, seed)]
    parts += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": delta}) for delta in deltas]
    parts += [event("content_block_stop", {"type": "content_block_stop", "index": 0}), *end]
    return b"".join(parts)


def structured(call: Call) -> bool:
    return forced_tool(call) is not None


ANTHROPIC = Dialect("messages", "msg_", parse, authorize, error, retry_headers, limit_headers,
                    json_reply, sse_reply, marked_use, structured)


@dataclass(eq=False)
class MessageBatch(Batch):
    results: bytes = b""  # the results JSONL


class Results:
    """A message batch's results, one line an item, the canceled ones last."""

    def __init__(self, batch: MessageBatch):
        self.batch = batch
        self.lines: list[bytes] = []

    def add(self, i: int, fate: int, reply: bytes) -> None:
        head = b'{"custom_id":' + orjson.dumps(self.batch.custom_ids[i]) + b',"result":'
        if fate == SUCCEEDED:
            self.lines.append(head + b'{"type":"succeeded","message":' + reply + b'}}\n')
        elif fate == EXPIRED:
            self.lines.append(head + b'{"type":"expired"}}\n')
        else:
            self.lines.append(head + b'{"type":"errored","error":' + reply + b'}}\n')

    def close(self) -> None:
        batch = self.batch
        cancelled = batch.cancel_at is not None
        self.lines += [b'{"custom_id":' + orjson.dumps(custom_id)
                       + b',"result":{"type":"canceled"}}\n'
                       for i, custom_id in enumerate(batch.custom_ids)
                       if i >= batch.todo or (cancelled and batch.fates[i] == EXPIRED)]
        batch.results = b"".join(self.lines)


class Routes(BatchRoutes):
    """Anthropic's model route and Message Batches, in memory."""

    dialect = ANTHROPIC
    missing = "No message batch found with id '{}'."

    def routes(self) -> list[tuple[str, str, Handler]]:
        guarded = self.guarded
        return [("POST", "/v1/messages/batches", guarded(self.create_batch)),
                ("GET", "/v1/messages/batches", guarded(self.list_batches)),
                ("GET", f"/v1/messages/batches/{ID}", guarded(self.get_batch)),
                ("GET", f"/v1/messages/batches/{ID}/results", guarded(self.batch_results)),
                ("POST", f"/v1/messages/batches/{ID}/cancel", guarded(self.cancel_batch)),
                ("DELETE", f"/v1/messages/batches/{ID}", guarded(self.delete_batch)),
                ("POST", "/v1/messages", self.messages)]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.server.handle(request, ANTHROPIC)

    def results(self, batch: MessageBatch) -> Results:
        return Results(batch)

    def show(self, batch: MessageBatch, now: float, request: web.Request) -> dict[str, Any]:
        ended = batch.ended(now)
        if ended:
            succeeded, failed, expired = batch.tally[SUCCEEDED], batch.failed(), \
                batch.tally[EXPIRED]
            status = "ended"
            counts = {"processing": 0, "succeeded": succeeded, "errored": failed,
                      "canceled": len(batch.custom_ids) - succeeded - failed - expired,
                      "expired": expired}
        else:
            status = "in_progress" if batch.cancel_at is None else "canceling"
            succeeded, errored = batch.running_counts(now)
            counts = {"processing": len(batch.custom_ids) - succeeded - errored,
                      "succeeded": succeeded, "errored": errored, "canceled": 0, "expired": 0}
        return {"id": batch.id, "type": "message_batch", "processing_status": status,
                "request_counts": counts,
                "ended_at": iso(batch.ended_wall()) if ended else None,
                "created_at": iso(batch.created),
                "expires_at": iso(batch.created + BATCH_WINDOW), "archived_at": None,
                "cancel_initiated_at": iso(batch.cancel_wall) if batch.cancel_wall else None,
                "results_url": (f"{request.url.origin()}/v1/messages/batches/{batch.id}/results"
                                if ended else None)}

    def check_cancel(self, batch: MessageBatch, now: float) -> None:
        if batch.ended(now):
            raise Refused(400, "invalid_request", f"Message batch {batch.id} has ended: "
                          "it cannot be canceled")

    async def create_batch(self, request: web.Request) -> web.Response:
        requests = json_object(await request.read()).get("requests")
        if not isinstance(requests, list) or not requests:
            raise Refused(400, "invalid_request", "requests: must be a non-empty list")
        custom_ids: list[str] = []
        items: list[Item] = []
        seen: set[str] = set()
        for i, item in enumerate(requests):
            if not isinstance(item, dict):
                raise Refused(400, "invalid_request", f"requests.{i}: must be an object")
            custom_id, params = item.get("custom_id"), item.get("params")
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                raise Refused(400, "invalid_request", f"requests.{i}.custom_id: String "
                              "should match pattern '^[a-zA-Z0-9_-]{1,64}$'")
            if custom_id in seen:
                raise Refused(400, "invalid_request", f"requests.{i}.custom_id: "
                              f"'{custom_id}' is used by another request of the batch; "
                              "custom_id must be unique")
            if not isinstance(params, dict):
                raise Refused(400, "invalid_request", f"requests.{i}.params: field required")
            seen.add(custom_id)
            custom_ids.append(custom_id)
            items.append(self.prepare(custom_id, params))
        del requests  # the parsed request: the items keep what they need
        return self.shown(request, self.new_batch(MessageBatch, "msgbatch_", custom_ids, items))

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = limit_of(request, 20, 1000)
        batches = self.newest_first()
        before = request.query.get("before_id")
        if before is not None and "after_id" not in request.query:  # newer than the cursor
            at = next((i for i, b in enumerate(batches) if b.id == before), None)
            page, has_more = ([], False) if at is None else \
                (batches[max(0, at - limit):at], at > limit)
        else:  # older than the cursor, if any
            page, has_more = self.after(batches, request.query.get("after_id"), limit)
        now = time.monotonic()
        return respond({"data": [self.show(b, now, request) for b in page],
                        "has_more": has_more, "first_id": page[0].id if page else None,
                        "last_id": page[-1].id if page else None})

    async def batch_results(self, request: web.Request) -> web.Response:
        batch = self.find(request)
        if not batch.ended(time.monotonic()):
            raise Refused(400, "invalid_request", f"Message batch {batch.id} has not ended "
                          "yet: its results are available once processing_status is 'ended'")
        return web.Response(body=batch.results, content_type=RESULTS)

    async def delete_batch(self, request: web.Request) -> web.Response:
        batch = self.find(request)
        if not batch.ended(time.monotonic()):
            raise Refused(400, "invalid_request", f"Message batch {batch.id} is still "
                          "processing: cancel it and wait until it has ended")
        del self.batches[batch.id]
        return respond({"id": batch.id, "type": "message_batch_deleted"})
