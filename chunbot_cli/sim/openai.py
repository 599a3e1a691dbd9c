"""OpenAI's protocol in `chunbot sim serve`: `POST /v1/chat/completions` (JSON and SSE), its
error bodies, `x-ratelimit-*` headers and Bearer key, automatic prefix caching reported in
its usage (with DeepSeek's fields), and its Files and Batch APIs (`/v1/files`, `/v1/batches`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import model as sim_model
from .batches import ERRORED, EXPIRED, EXPIRED_MESSAGE, SUCCEEDED, BATCH_WINDOW, Batch, \
    BatchRoutes, Handler, ID, Item, jsonl_lines, limit_of
from .cache import CacheUse, automatic_use
from .faults import Bucket
from .wire import BLOCKED, Call, Dialect, Refused, chat_checked, chat_messages, chat_params, \
    json_object, respond, retry_headers, split_words

# The error kinds as OpenAI spells them: kind -> (error type, error code)
ERRORS = {
    "invalid_request": ("invalid_request_error", None),
    "auth": ("invalid_request_error", "invalid_api_key"),
    "rate_limit_requests": ("requests", "rate_limit_exceeded"),
    "rate_limit_tokens": ("tokens", "rate_limit_exceeded"),
    "server": ("server_error", None),
    "overloaded": ("server_error", None),
    "not_found": ("invalid_request_error", None),
}
BATCH_ENDPOINT = "/v1/chat/completions"
FILE_PURPOSES = frozenset({"batch", "assistants", "fine-tune", "vision", "user_data", "evals"})


def parse(body: dict[str, Any], where: Mapping[str, str]) -> Call:
    chat_checked(body)
    options = body.get("stream_options")
    return Call(body["model"], chat_messages(body["messages"]), chat_params(body),
                body.get("stream") is True,
                isinstance(options, dict) and options.get("include_usage") is True)


def authorize(request: web.Request, key: str | None) -> None:
    if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
        # never echo the key that was sent: it may be a real one sent by mistake
        raise Refused(401, "auth", "Incorrect API key provided.")


def error(refused: Refused) -> bytes:
    error_type, code = ERRORS[refused.kind]
    return orjson.dumps({"error": {"message": refused.message, "type": error_type,
                                   "param": None, "code": code}})


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's time.Duration): 0s, 120ms, 1.5s, 6m0s, 1h2m3s."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def limit_headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
    headers = {}
    for name, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
            headers[f"x-ratelimit-reset-{name}"] = go_duration(bucket.until_full())
    return headers


def usage(answer: sim_model.SimReply, cache: CacheUse) -> dict[str, Any]:
    """OpenAI's usage, with both OpenAI's and DeepSeek's cached-prompt fields; prompt_tokens
    is the whole prompt, cached or not, as both vendors count it."""
    return {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
            "total_tokens": answer.input_tokens + answer.output_tokens,
            "prompt_tokens_details": {"cached_tokens": cache.read},
            "prompt_cache_hit_tokens": cache.read,
            "prompt_cache_miss_tokens": answer.input_tokens - cache.read}


def json_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
               malformed: bool) -> bytes:
    body: dict[str, Any] = {"id": reply_id, "object": "chat.completion",
                            "created": int(time.time()), "model": call.model}
    if not malformed:
        content, finish = answer.text, answer.finish_reason
        if finish in BLOCKED:
            content, finish = None, "content_filter"
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": content},
                            "logprobs": None, "finish_reason": finish}]
    body["usage"] = usage(answer, cache)
    return orjson.dumps(body)


def sse_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
              seed: int) -> bytes:
    head = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": call.model, "system_fingerprint": None}
    if call.include_usage:
        head["usage"] = None  # as OpenAI does: null on every chunk but the last

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    finish = answer.finish_reason
    if finish in BLOCKED:
        finish = "content_filter"
    else:
        parts += [chunk({"content": piece}) for piece in split_words(answer.text, seed)]
    parts.append(chunk({}, finish))
    if call.include_usage:
        parts.append(b"data: " + orjson.dumps({**head, "choices": [],
                                               "usage": usage(answer, cache)}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def structured(call: Call) -> bool:
    return (call.params.get("response_format") or {}).get("type") == "json_schema"


OPENAI = Dialect("chat", "chatcmpl-", parse, authorize, error, retry_headers, limit_headers,
                 json_reply, sse_reply, automatic_use, structured)


@dataclass(eq=False)
class File:
    id: str
    filename: str
    purpose: str
    created_at: int
    data: bytes

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed"}


@dataclass(eq=False)
class OpenAIBatch(Batch):
    endpoint: str = BATCH_ENDPOINT
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None  # why the input file was refused
    output_file_id: str | None = None
    error_file_id: str | None = None


def metadata_of(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if (not isinstance(raw, dict) or len(raw) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in raw.items())):
        raise Refused(400, "invalid_request", "metadata: at most 16 pairs of strings, keys "
                      "of up to 64 characters and values of up to 512")
    return raw


class Results:
    """A batch's output file (the answered items) and error file (the others)."""

    def __init__(self, routes: Routes, batch: OpenAIBatch):
        self.routes, self.batch = routes, batch
        self.lines: list[bytes] = []
        self.error_lines: list[bytes] = []

    def add(self, i: int, fate: int, reply: bytes) -> None:
        tag = self.routes.server.new_id("").encode()
        head = b'{"id":"batch_req_' + tag + b'","custom_id":' + orjson.dumps(
            self.batch.custom_ids[i])
        if fate == SUCCEEDED:
            self.lines.append(head + b',"response":{"status_code":200,"request_id":'
                              b'"req_' + tag + b'","body":' + reply + b'},"error":null}\n')
        elif fate == EXPIRED:
            self.error_lines.append(head + b',"response":null,"error":'
                                    + orjson.dumps({"code": "batch_expired",
                                                    "message": EXPIRED_MESSAGE}) + b'}\n')
        else:
            status = b"500" if fate == ERRORED else b"400"
            self.error_lines.append(head + b',"response":{"status_code":' + status
                                    + b',"request_id":"req_' + tag + b'","body":' + reply
                                    + b'},"error":null}\n')

    def close(self) -> None:
        batch, routes = self.batch, self.routes
        if self.lines:
            batch.output_file_id = routes.add_file(b"".join(self.lines),
                                                   f"{batch.id}_output.jsonl", "batch_output").id
        if self.error_lines:
            batch.error_file_id = routes.add_file(b"".join(self.error_lines),
                                                  f"{batch.id}_error.jsonl", "batch_output").id


class Routes(BatchRoutes):
    """OpenAI's model route, Files and Batches, in memory."""

    dialect = OPENAI

    def __init__(self, server: Any):
        super().__init__(server)
        self.files: dict[str, File] = {}

    def routes(self) -> list[tuple[str, str, Handler]]:
        guarded = self.guarded
        return [("POST", "/v1/files", guarded(self.upload_file)),
                ("GET", "/v1/files", guarded(self.list_files)),
                ("GET", f"/v1/files/{ID}", guarded(self.get_file)),
                ("DELETE", f"/v1/files/{ID}", guarded(self.delete_file)),
                ("GET", f"/v1/files/{ID}/content", guarded(self.file_content)),
                ("POST", "/v1/batches", guarded(self.create_batch)),
                ("GET", "/v1/batches", guarded(self.list_batches)),
                ("GET", f"/v1/batches/{ID}", guarded(self.get_batch)),
                ("POST", f"/v1/batches/{ID}/cancel", guarded(self.cancel_batch)),
                ("POST", "/v1/chat/completions", self.chat)]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.server.handle(request, OPENAI)

    # -- files --

    def add_file(self, data: bytes, filename: str, purpose: str) -> File:
        file = File(self.server.new_id("file-"), filename, purpose, int(time.time()), data)
        self.files[file.id] = file
        return file

    def file(self, request: web.Request) -> File:
        file = self.files.get(request.match_info["id"])
        if file is None:
            raise Refused(404, "not_found", f"No such File object: {request.match_info['id']}")
        return file

    async def upload_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise Refused(400, "invalid_request", "the request must be multipart/form-data "
                          "with the fields 'purpose' and 'file'")
        purpose = data = None
        filename = "upload.jsonl"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            name = getattr(part, "name", None)
            if name == "purpose":
                purpose = (await part.text()).strip()
            elif name == "file":
                filename = part.filename or filename
                data = bytes(await part.read())
            else:
                await part.release()
        if data is None:
            raise Refused(400, "invalid_request", "file: field required")
        if purpose not in FILE_PURPOSES:
            raise Refused(400, "invalid_request", f"purpose: must be one of "
                          f"{', '.join(sorted(FILE_PURPOSES))}")
        file = self.add_file(data, filename, purpose)
        self.server.stats.files_uploaded += 1
        return respond(file.as_json())

    async def list_files(self, request: web.Request) -> web.Response:
        data = [file.as_json() for file in reversed(self.files.values())]
        return respond({"object": "list", "data": data, "has_more": False,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[-1]["id"] if data else None})

    async def get_file(self, request: web.Request) -> web.Response:
        return respond(self.file(request).as_json())

    async def delete_file(self, request: web.Request) -> web.Response:
        file = self.file(request)
        del self.files[file.id]
        return respond({"id": file.id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(body=self.file(request).data,
                            content_type="application/octet-stream")

    # -- batches --

    def results(self, batch: OpenAIBatch) -> Results:
        return Results(self, batch)

    def read_input(self, data: bytes, endpoint: str) -> tuple[
            list[str], list[Item], list[dict[str, Any]]]:
        """The input file's custom_ids and prepared items, and the errors that make the
        batch fail, as OpenAI reports them."""
        errors: list[dict[str, Any]] = []

        def refuse(code: str, message: str, line: int | None, param: str | None = None) -> None:
            if len(errors) < 100:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        custom_ids: list[str] = []
        items: list[Item] = []
        seen: set[str] = set()
        model = None
        for number, line in jsonl_lines(data):
            if not isinstance(line, dict):
                refuse("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                refuse("missing_required_parameter", "custom_id: a non-empty string is "
                       "required.", number, "custom_id")
                continue
            if custom_id in seen:
                refuse("duplicate_custom_id", f"The custom_id '{custom_id}' is not unique "
                       "within the batch.", number, "custom_id")
                continue
            seen.add(custom_id)
            if line.get("method") != "POST":
                refuse("invalid_method", "method: only 'POST' is supported.", number, "method")
            if line.get("url") != endpoint:
                refuse("url_mismatch", f"The url {line.get('url')!r} does not match the "
                       f"batch's endpoint '{endpoint}'.", number, "url")
            body = line.get("body")
            if not isinstance(body, dict):
                refuse("missing_required_parameter", "body: a JSON object is required.",
                       number, "body")
                continue
            if model is None:
                model = body.get("model")
            elif body.get("model") != model:
                refuse("model_mismatch", f"The model {body.get('model')!r} differs from the "
                       f"batch's model {model!r}: a batch uses one model.", number, "body.model")
            custom_ids.append(custom_id)
            if not errors:  # else the batch fails: no need to keep its items
                items.append(self.prepare(custom_id, body))
        if not custom_ids and not errors:
            refuse("empty_file", "The input file has no requests.", None)
        return custom_ids, items, errors

    def status(self, batch: OpenAIBatch, now: float) -> str:
        elapsed = now - batch.started
        if batch.cancel_at is not None:
            return "cancelled" if batch.ended(now) else "cancelling"
        if batch.errors is not None:
            return "validating" if elapsed < 0.1 * batch.delay else "failed"
        if batch.ended(now):
            return "completed"
        if elapsed < 0.1 * batch.delay:
            return "validating"
        return "in_progress" if elapsed < 0.9 * batch.delay else "finalizing"

    def show(self, batch: OpenAIBatch, now: float, request: web.Request) -> dict[str, Any]:
        status = self.status(batch, now)
        valid = batch.errors is None
        ended = status in ("completed", "cancelled", "failed")

        def stamp(fraction: float) -> int:
            return int(batch.created + fraction * batch.delay)

        if not valid or status == "validating":
            counts = {"total": 0, "completed": 0, "failed": 0}
        elif ended:
            counts = {"total": len(batch.custom_ids), "completed": batch.tally[SUCCEEDED],
                      "failed": batch.failed() + batch.tally[EXPIRED]}
        else:
            succeeded, failed = batch.running_counts(now)
            counts = {"total": len(batch.custom_ids), "completed": succeeded, "failed": failed}
        return {
            "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "errors": None if valid else {"object": "list", "data": batch.errors},
            "input_file_id": batch.input_file_id, "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id if ended else None,
            "error_file_id": batch.error_file_id if ended else None,
            "created_at": int(batch.created),
            "in_progress_at": stamp(0.1) if valid and batch.reached(now, 0.1) else None,
            "expires_at": int(batch.created) + BATCH_WINDOW,
            "finalizing_at": stamp(0.9) if valid and batch.reached(now, 0.9) else None,
            "completed_at": int(batch.ended_wall()) if status == "completed" else None,
            "failed_at": stamp(0.1) if status == "failed" else None,
            "expired_at": None,
            "cancelling_at": int(batch.cancel_wall) if batch.cancel_wall else None,
            "cancelled_at": int(batch.ended_wall()) if status == "cancelled" else None,
            "request_counts": counts, "metadata": batch.metadata}

    def check_cancel(self, batch: OpenAIBatch, now: float) -> None:
        status = self.status(batch, now)
        if status in ("completed", "failed", "cancelled", "expired"):
            raise Refused(400, "invalid_request", f"Cannot cancel a batch with status "
                          f"'{status}'.")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = json_object(await request.read())
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise Refused(400, "invalid_request", "input_file_id: field required")
        if body.get("endpoint") != BATCH_ENDPOINT:
            raise Refused(400, "invalid_request", f"endpoint: chunbot sim serves batches "
                          f"for '{BATCH_ENDPOINT}' only")
        if body.get("completion_window") != "24h":
            raise Refused(400, "invalid_request", "completion_window: only '24h' is "
                          "supported")
        metadata = metadata_of(body.get("metadata"))
        file = self.files.get(file_id)
        if file is None:
            raise Refused(400, "invalid_request", f"input_file_id: no such file: {file_id}")
        if file.purpose != "batch":
            raise Refused(400, "invalid_request", f"input_file_id: file {file_id} has "
                          f"purpose '{file.purpose}', not 'batch'")
        custom_ids, items, errors = self.read_input(file.data, BATCH_ENDPOINT)
        if errors:
            custom_ids, items = [], []
        batch = self.new_batch(OpenAIBatch, "batch_", custom_ids, items, input_file_id=file_id,
                               metadata=metadata, errors=errors or None)
        if errors:
            batch.ready_wall = batch.created
        return self.shown(request, batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        limit = limit_of(request, 20, 100)
        page, has_more = self.after(self.newest_first(), request.query.get("after"), limit)
        now = time.monotonic()
        return respond({"object": "list", "data": [self.show(b, now, request) for b in page],
                        "first_id": page[0].id if page else None,
                        "last_id": page[-1].id if page else None, "has_more": has_more})
