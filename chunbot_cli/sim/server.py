"""`chunbot sim serve`: the deterministic sim model over HTTP, speaking OpenAI and Anthropic.

This module owns the wire side of the simulator: the two protocols (JSON and SSE replies,
the vendors' error bodies and rate-limit headers) and their batch APIs (OpenAI's Files and
Batches, Anthropic's Message Batches), the faults a test can inject (latency,
server errors, RPM/TPM limits, a required key, malformed replies, requests left hanging,
poisoned prompts that always fail, a storm of 429s at the start) and the /stats counters
that tests read to check what a client sent, and a model of the vendors' prompt caching
(automatic prefix caching on the OpenAI route, `cache_control` blocks on the Anthropic
route) reported in the usage as each vendor does. The replies themselves come from `sim.model`,
called exactly as the in-process `sim` provider calls it, so one request gets one text
whether it is asked in-process, over OpenAI or over Anthropic, streamed or not.

It is also the server of chunbot's throughput benchmarks, so the request path is kept lean:
orjson, whole replies (SSE too) built in one buffer and sent in one response, no access log,
no per-request logging; see bench/sim_server.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import re
import signal
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson
from aiohttp import web

from . import model as sim_model

# What a protocol's own fields are: everything else in a body is a model parameter.
PROTOCOL_FIELDS = frozenset({"model", "messages", "system", "stream", "stream_options"})
MODELS = ("sim-small", "sim-large")

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
HTML_BODY = b"<html><body>upstream error</body></html>"

# Prompt caching: the OpenAI route caches whole blocks of this many characters of the prompt
# (role and content of each message, concatenated); each remembered prefix is one entry,
# and the least recently used ones are forgotten beyond CACHE_ENTRIES per route, so a long
# benchmark keeps a bounded memory.
CACHE_BLOCK = 64
CACHE_ENTRIES = 200_000

# --hang-rate: a hung request is held this long at most (or until its client gives up),
# checking every HANG_POLL_S whether the client is still there, then its connection is dropped
HANG_S = 3600.0
HANG_POLL_S = 1.0

# The error kinds this server answers with, as each vendor spells them:
# kind -> (OpenAI error type, OpenAI error code, Anthropic error type)
ERROR_TYPES = {
    "invalid_request": ("invalid_request_error", None, "invalid_request_error"),
    "auth": ("invalid_request_error", "invalid_api_key", "authentication_error"),
    "rate_limit_requests": ("requests", "rate_limit_exceeded", "rate_limit_error"),
    "rate_limit_tokens": ("tokens", "rate_limit_exceeded", "rate_limit_error"),
    "server": ("server_error", None, "api_error"),
    "overloaded": ("server_error", None, "overloaded_error"),
    "not_found": ("invalid_request_error", None, "not_found_error"),
}


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    wrong_rate: float = 0.0  # of --wrong-model's first answers: wrong (right when re-asked)
    wrong_model: str = "sim-small"
    flaky_rate: float = 0.0  # of every model's answers: wrong at random, a fresh draw each
    rpm: int | None = None
    tpm: int | None = None
    api_key: str | None = None
    malformed: str | None = None  # "not-json" | "no-choices"
    seed: int | None = None
    batch_delay_s: float = 2.0  # from creation to the end of a batch
    batch_error_rate: float = 0.0  # share of batch items that come back errored
    batch_expire_rate: float = 0.0  # share of batch items that expire
    hang_rate: float = 0.0  # share of requests accepted and never answered
    fail_prompt: str | None = None  # requests whose messages contain it always get 500
    storm_s: float = 0.0  # from the first chat/messages request, this long every one gets 429
    storm_retry_after: int = 1  # the retry-after (seconds) of the storm's 429s


class BadRequest(Exception):
    """A request the server refuses before any work: its status, error kind and message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class Bucket:
    """A per-minute limit as vendors enforce it: a token bucket refilled continuously at
    limit/60 per second that holds one second's worth, so a minute's quota cannot be
    spent in one burst."""

    limit: int
    rate: float = 0.0
    capacity: float = 0.0
    level: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.rate = self.limit / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until `cost` is admitted. A cost above the capacity is admitted on a
        full bucket and leaves it in debt, so big requests slow down rather than starve."""
        return max(0.0, min(cost, self.capacity) - self.level) / self.rate

    def remaining(self) -> int:
        return max(0, min(self.limit, math.floor(self.level * 60)))

    def until_full(self) -> float:
        return max(0.0, self.capacity - self.level) / self.rate


@dataclass
class Stats:
    requests: int = 0
    by_route: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    answered: int = 0
    keys: set = field(default_factory=set)
    tokens_in: int = 0
    tokens_out: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    streamed: int = 0
    structured: int = 0  # requests asking for a schema: OpenAI json_schema, a forced tool
    cached_tokens: int = 0  # OpenAI cached_tokens + Anthropic cache reads
    cache_creation_tokens: int = 0
    hung: int = 0  # --hang-rate: requests held without an answer
    poisoned: int = 0  # --fail-prompt: requests answered 500 for containing the text
    # the batch APIs; their items count here, not in answered / unique / tokens_*
    batches_created: int = 0  # both vendors
    batch_items: int = 0  # items submitted
    files_uploaded: int = 0
    batch_answered: int = 0
    batch_errored: int = 0
    batch_expired: int = 0
    batch_tokens_in: int = 0
    batch_tokens_out: int = 0

    def as_json(self) -> dict[str, Any]:
        unique = len(self.keys)
        return {"requests": self.requests,
                "by_route": {"chat": self.by_route["chat"], "messages": self.by_route["messages"]},
                "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
                "answered": self.answered, "unique": unique, "repeated": self.answered - unique,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "streamed": self.streamed, "structured": self.structured,
                "cached_tokens": self.cached_tokens,
                "cache_creation_tokens": self.cache_creation_tokens,
                "hung": self.hung, "poisoned": self.poisoned,
                "batches_created": self.batches_created, "batch_items": self.batch_items,
                "files_uploaded": self.files_uploaded, "batch_answered": self.batch_answered,
                "batch_errored": self.batch_errored, "batch_expired": self.batch_expired,
                "batch_tokens_in": self.batch_tokens_in,
                "batch_tokens_out": self.batch_tokens_out}


@dataclass
class Call:
    """One parsed request, whatever its protocol."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    body: dict[str, Any] | None = None  # Anthropic: the request as sent, for its cache_control


@dataclass(frozen=True)
class CacheUse:
    """The prompt tokens a request read from the provider's cache and wrote to it."""

    read: int = 0
    created: int = 0


NO_CACHE = CacheUse()


class PrefixCache:
    """Hashes of prompt prefixes seen before, least recently used forgotten first."""

    def __init__(self, limit: int = CACHE_ENTRIES):
        self.limit = limit
        self.seen: OrderedDict[bytes, None] = OrderedDict()

    def leading_hits(self, keys: list[bytes]) -> int:
        """How many of `keys` (a request's cumulative prefixes, shortest first) were seen
        before, counting from the first up to the first miss; then all are remembered."""
        seen = self.seen
        hits, run = 0, True
        for key in keys:
            if key in seen:
                seen.move_to_end(key)
                if run:
                    hits += 1
            else:
                run = False
                seen[key] = None
        while len(seen) > self.limit:
            seen.popitem(last=False)
        return hits

    def check_and_add(self, key: bytes) -> bool:
        """Whether `key` was seen before; it is remembered either way."""
        return self.leading_hits([key]) == 1

    def clear(self) -> None:
        self.seen.clear()


def _as_string(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "" if content is None else str(content)


def openai_prefix_keys(messages: list[dict[str, Any]]) -> list[bytes]:
    """The hashes of the prompt's cumulative prefixes that end at each whole block of
    CACHE_BLOCK characters (a partial last block does not count). The prompt is every
    message's role and content, in order; the hash is carried from block to block, so each
    character is hashed once."""
    prompt = "".join([_as_string(m.get("role")) + _as_string(m.get("content"))
                      for m in messages])
    end = len(prompt) - len(prompt) % CACHE_BLOCK
    if not end:
        return []
    digest = hashlib.blake2b(digest_size=16)
    keys = []
    if prompt.isascii():  # one character, one byte
        data = memoryview(prompt.encode())
        for start in range(0, end, CACHE_BLOCK):
            digest.update(data[start:start + CACHE_BLOCK])
            keys.append(digest.digest())
    else:
        for start in range(0, end, CACHE_BLOCK):
            digest.update(prompt[start:start + CACHE_BLOCK].encode("utf-8", "surrogatepass"))
            keys.append(digest.digest())
    return keys


def _cache_marked(block: Any) -> bool:
    control = block.get("cache_control") if isinstance(block, dict) else None
    return isinstance(control, dict) and control.get("type") == "ephemeral"


def anthropic_cache_prefix(body: dict[str, Any]) -> tuple[bytes, int] | None:
    """The hash and the tokens of the cacheable prefix of an Anthropic request: the system
    blocks, then the messages' blocks, up to and including the last block marked with
    `cache_control`; None when no block is. Tokens are counted per message (the system
    prompt being one) over the texts of its blocks in the prefix, as the model counts them."""
    units: list[tuple[str, list[Any]]] = []
    system = body.get("system")
    if system is not None:
        units.append(("system", system if isinstance(system, list) else [system]))
    for message in body["messages"]:
        content = message.get("content")
        units.append((_as_string(message.get("role")),
                      content if isinstance(content, list) else [content]))
    last = None
    for u, (_, blocks) in enumerate(units):
        for b, block in enumerate(blocks):
            if _cache_marked(block):
                last = (u, b)
    if last is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    tokens = 0
    for u in range(last[0] + 1):
        role, blocks = units[u]
        if u == last[0]:
            blocks = blocks[:last[1] + 1]
        digest.update(b"\x00" + role.encode("utf-8", "surrogatepass") + b"\x00")
        texts = []
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "text":
                text = _as_string(block.get("text"))
                texts.append(text)
                piece = b"t" + text.encode("utf-8", "surrogatepass")
            elif isinstance(block, str):
                texts.append(block)
                piece = b"t" + block.encode("utf-8", "surrogatepass")
            else:  # an image, a tool use…: its content, whatever its cache marks
                if isinstance(block, dict):
                    block = {k: v for k, v in block.items() if k != "cache_control"}
                piece = b"j" + orjson.dumps(block, option=orjson.OPT_SORT_KEYS
                                            | orjson.OPT_NON_STR_KEYS, default=str)
            digest.update(len(piece).to_bytes(8, "big"))
            digest.update(piece)
        tokens += sim_model.count_tokens("".join(texts))
    return digest.digest(), tokens


def _text(content: Any) -> Any:
    """A list of text parts, as both vendors accept, becomes the string the model sees."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return content


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise BadRequest(400, "invalid_request", "messages: must be a list of objects")
    return [{**m, "content": _text(m["content"])} if isinstance(m.get("content"), list) else m
            for m in raw]


def _body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest(400, "invalid_request", "the request body is not valid JSON") from None
    return _checked(body)


def _checked(body: Any) -> dict[str, Any]:
    """The checks every model request gets, whether sent alone or as a batch item."""
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_request", "the request body must be a JSON object")
    for key in ("model", "messages"):
        if key not in body:
            raise BadRequest(400, "invalid_request", f"{key}: field required")
    if not isinstance(body["model"], str):
        raise BadRequest(400, "invalid_request", "model: must be a string")
    return body


def _params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in PROTOCOL_FIELDS}


def parse_openai(body: dict[str, Any]) -> Call:
    options = body.get("stream_options")
    return Call(body["model"], _messages(body["messages"]), _params(body),
                body.get("stream") is True,
                isinstance(options, dict) and options.get("include_usage") is True)


def parse_anthropic(body: dict[str, Any]) -> Call:
    if "max_tokens" not in body:
        raise BadRequest(400, "invalid_request", "max_tokens: field required")
    messages = _messages(body["messages"])
    system = body.get("system")
    if system is not None:
        # the in-process provider sends the system prompt as a first message
        messages = [{"role": "system", "content": _text(system)}, *messages]
    return Call(body["model"], messages, _params(body), body.get("stream") is True, False, body)


def request_cost(call: Call) -> int:
    """Tokens a request counts against a TPM limit: its prompt plus what it may generate."""
    prompt = sum(sim_model.count_tokens(str(m.get("content", ""))) + 4 for m in call.messages)
    limit = call.params.get("max_tokens") or call.params.get("max_completion_tokens") or 0
    return prompt + (limit if isinstance(limit, int) else 0)


def split_words(text: str, seed: int) -> list[str]:
    """The text in 3–8 pieces cut between words (fewer for short texts); they join back to it."""
    words = text.split(" ")
    size = math.ceil(len(words) / (3 + seed % 6))
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [pieces[0], *(" " + p for p in pieces[1:])]


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


def rfc3339_after(seconds: float) -> str:
    # rounded up to the second, so a client waiting until then never comes back early
    moment = math.ceil(time.time() + seconds)
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _openai_error(kind: str, message: str) -> bytes:
    error_type, code, _ = ERROR_TYPES[kind]
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": None,
                                   "code": code}})


def _anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": ERROR_TYPES[kind][2],
                                                    "message": message}})


def _openai_limit_headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
    headers = {}
    for name, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining())
            headers[f"x-ratelimit-reset-{name}"] = go_duration(bucket.until_full())
    return headers


def _anthropic_limit_headers(requests: Bucket | None, tokens: Bucket | None) -> dict[str, str]:
    headers = {}
    for name, bucket in (("requests", requests), ("tokens", tokens)):
        if bucket is not None:
            headers[f"anthropic-ratelimit-{name}-limit"] = str(bucket.limit)
            headers[f"anthropic-ratelimit-{name}-remaining"] = str(bucket.remaining())
            headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_after(bucket.until_full())
    return headers


def openai_usage(answer: sim_model.SimReply, cache: CacheUse) -> dict[str, Any]:
    """OpenAI's usage, with both OpenAI's and DeepSeek's cached-prompt fields; prompt_tokens
    is the whole prompt, cached or not, as both vendors count it."""
    return {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
            "total_tokens": answer.input_tokens + answer.output_tokens,
            "prompt_tokens_details": {"cached_tokens": cache.read},
            "prompt_cache_hit_tokens": cache.read,
            "prompt_cache_miss_tokens": answer.input_tokens - cache.read}


def openai_json(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
                malformed: bool) -> bytes:
    usage = openai_usage(answer, cache)
    body: dict[str, Any] = {"id": reply_id, "object": "chat.completion",
                            "created": int(time.time()), "model": call.model}
    if not malformed:
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                            "logprobs": None, "finish_reason": answer.finish_reason}]
    body["usage"] = usage
    return orjson.dumps(body)


def openai_sse(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
               seed: int) -> bytes:
    head = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": call.model, "system_fingerprint": None}
    if call.include_usage:
        head["usage"] = None  # as OpenAI does: null on every chunk but the last

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": piece}) for piece in split_words(answer.text, seed)]
    parts.append(chunk({}, answer.finish_reason))
    if call.include_usage:
        usage = openai_usage(answer, cache)
        parts.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _stop_reason(answer: sim_model.SimReply) -> str:
    return "max_tokens" if answer.finish_reason == "length" else "end_turn"


def anthropic_usage(answer: sim_model.SimReply, cache: CacheUse,
                    output_tokens: int) -> dict[str, Any]:
    """Anthropic's usage: input_tokens are the prompt tokens neither read from the cache
    nor written to it."""
    return {"input_tokens": max(0, answer.input_tokens - cache.created - cache.read),
            "cache_creation_input_tokens": cache.created,
            "cache_read_input_tokens": cache.read, "output_tokens": output_tokens}


def forced_tool(call: Call) -> str | None:
    """The tool an Anthropic request forces (`tool_choice: {type: tool, name}`), if any."""
    choice = call.params.get("tool_choice")
    return choice.get("name") if isinstance(choice, dict) and choice.get("type") == "tool" \
        else None


def _tool_input(answer: sim_model.SimReply) -> dict[str, Any]:
    try:
        value = orjson.loads(answer.text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"text": answer.text}


def anthropic_json(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
                   malformed: bool) -> bytes:
    body: dict[str, Any] = {"id": reply_id, "type": "message", "role": "assistant",
                            "model": call.model}
    tool = forced_tool(call)
    if not malformed and tool is not None:  # the forced tool's input is the answer
        body["content"] = [{"type": "tool_use", "id": "toolu_" + reply_id[4:], "name": tool,
                            "input": _tool_input(answer)}]
    elif not malformed:
        body["content"] = [{"type": "text", "text": answer.text}]
    body.update(stop_reason=_stop_reason(answer), stop_sequence=None,
                usage=anthropic_usage(answer, cache, answer.output_tokens))
    return orjson.dumps(body)


def anthropic_sse(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
                  seed: int) -> bytes:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    message = {"id": reply_id, "type": "message", "role": "assistant", "model": call.model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": anthropic_usage(answer, cache, 1)}
    tool = forced_tool(call)
    block: dict[str, Any] = ({"type": "tool_use", "id": "toolu_" + reply_id[4:], "name": tool,
                              "input": {}} if tool else {"type": "text", "text": ""})
    parts = [event("message_start", {"type": "message_start", "message": message}),
             event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": block}),
             event("ping", {"type": "ping"})]
    if tool:
        text = orjson.dumps(_tool_input(answer)).decode()
        deltas = [{"type": "input_json_delta", "partial_json": piece}
                  for piece in split_words(text, seed)]
    else:
        deltas = [{"type": "text_delta", "text": piece}
                  for piece in split_words(answer.text, seed)]
    parts += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": delta}) for delta in deltas]
    parts += [event("content_block_stop", {"type": "content_block_stop", "index": 0}),
              event("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": _stop_reason(answer),
                                                "stop_sequence": None},
                                      "usage": {"output_tokens": answer.output_tokens}}),
              event("message_stop", {"type": "message_stop"})]
    return b"".join(parts)


@dataclass(frozen=True)
class Dialect:
    """What differs between the two protocols; the request path is shared."""

    route: str
    id_prefix: str
    parse: Callable[[dict[str, Any]], Call]
    error: Callable[[str, str], bytes]  # (kind, message)
    limit_headers: Callable[[Bucket | None, Bucket | None], dict[str, str]]
    json_reply: Callable[..., bytes]  # (id, call, answer, cache, malformed)
    sse_reply: Callable[..., bytes]  # (id, call, answer, cache, seed)


OPENAI = Dialect("chat", "chatcmpl-", parse_openai, _openai_error, _openai_limit_headers,
                 openai_json, openai_sse)
ANTHROPIC = Dialect("messages", "msg_", parse_anthropic, _anthropic_error,
                    _anthropic_limit_headers, anthropic_json, anthropic_sse)


# Provider batch APIs: OpenAI's Files and Batches, Anthropic's Message Batches.
#
# A batch lives in memory and moves on a clock of --batch-delay-s seconds from its creation:
# its items are processed evenly from 10% to 90% of the delay (which the request counts
# show while it runs), then it finalizes: the replies of every item are computed then, in
# chunks that let realtime requests through, by the same code as realtime requests, and it
# ends at the delay (or when they are computed, if later). A cancel keeps the items done by
# then and ends the batch a tenth of the delay later. What becomes of each item (succeeded,
# errored, expired) is decided by a hash of --seed and its custom_id.

BATCH_CHUNK = 512  # items computed between two yields to the event loop
MAX_BODY = 256 * 1024 * 1024  # OpenAI takes batch input files of up to 200 MB
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_WINDOW = 86_400  # 24h: both vendors' expires_at
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
FILE_PURPOSES = frozenset({"batch", "assistants", "fine-tune", "vision", "user_data", "evals"})
ANTHROPIC_RESULTS = "application/binary"  # what Anthropic's SDKs ask the results route for
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
ERRORED_MESSAGE = "The server had an error while processing your request (injected by chunbot sim)."

# An item's fate, decided when it is submitted; INVALID: its body is a bad request (400)
SUCCEEDED, ERRORED, EXPIRED, INVALID = 0, 1, 2, 3
FATES = ("succeeded", "errored", "expired", "invalid")


def _fate(seed: int | None, custom_id: str, error_rate: float, expire_rate: float) -> int:
    if not error_rate and not expire_rate:
        return SUCCEEDED
    digest = hashlib.blake2b(f"{seed or 0}\x00{custom_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2 ** 64
    if draw < error_rate:
        return ERRORED
    return EXPIRED if draw < error_rate + expire_rate else SUCCEEDED


def item_fate(seed: int | None, custom_id: str, error_rate: float, expire_rate: float) -> str:
    """"succeeded", "errored" or "expired": what becomes of a (valid) batch item with this
    custom_id under `--seed`, `--batch-error-rate` and `--batch-expire-rate`."""
    return FATES[_fate(seed, custom_id, error_rate, expire_rate)]


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
class Batch:
    """One batch of either vendor; its status follows from the clock and these fields."""

    id: str
    dialect: Dialect
    created: float  # time.time()
    started: float  # time.monotonic() at the same moment
    delay: float
    custom_ids: list[str]
    bodies: list[bytes]  # each item's request, as JSON
    fates: bytes
    problems: dict[int, str]  # why each INVALID item is a bad request
    endpoint: str = BATCH_ENDPOINT  # the OpenAI fields
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None  # why the input file was refused
    cancel_at: float | None = None  # monotonic
    cancel_wall: float | None = None
    todo: int = 0  # items answered: all of them, or those done before the cancel
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = None
    ready_wall: float | None = None  # when its results were computed
    counts: dict[str, int] = field(default_factory=dict)  # the final request counts
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes = b""  # Anthropic's results JSONL

    def done_by(self, now: float) -> int:
        """Items processed by `now` (or by the cancel): evenly from 10% to 90% of the delay."""
        if self.cancel_at is not None:
            now = min(now, self.cancel_at)
        n = len(self.custom_ids)
        if self.delay <= 0:
            return n
        share = (now - self.started - 0.1 * self.delay) / (0.8 * self.delay)
        return n if share >= 1 else max(0, int(n * share))

    def running_counts(self, now: float) -> tuple[int, int]:
        """(succeeded, failed) among the items processed so far; expiry shows at the end."""
        done = self.fates[:self.done_by(now)]
        return done.count(SUCCEEDED), done.count(ERRORED) + done.count(INVALID)

    def end(self) -> float:
        if self.cancel_at is not None:
            return self.cancel_at + 0.1 * self.delay
        return self.started + self.delay

    def ended(self, now: float) -> bool:
        return self.ready_wall is not None and now >= self.end()

    def ended_wall(self) -> float:
        return max(self.created + self.end() - self.started, self.ready_wall or 0.0)

    def reached(self, now: float, fraction: float) -> bool:
        """Whether the batch got to this share of its delay before now (and any cancel)."""
        stop = now if self.cancel_at is None else min(now, self.cancel_at)
        return stop - self.started >= fraction * self.delay


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest(400, "invalid_request", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "invalid_request", "the request body must be a JSON object")
    return body


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise BadRequest(400, "invalid_request", f"limit: must be an integer from 1 to {most}")
    return limit


def _metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if (not isinstance(raw, dict) or len(raw) > 16
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                       and len(v) <= 512 for k, v in raw.items())):
        raise BadRequest(400, "invalid_request", "metadata: at most 16 pairs of strings, keys "
                         "of up to 64 characters and values of up to 512")
    return raw


def _guarded(dialect: Dialect) -> Callable[..., Any]:
    """A batch route: the key (and Anthropic's version header) checked like the model
    routes', and refusals answered with the vendor's error body."""
    def wrap(handler: Callable[..., Any]) -> Callable[..., Any]:
        async def run(self: "BatchAPI", request: web.Request) -> web.StreamResponse:
            try:
                self.server.authorize(request, dialect)
                return await handler(self, request)
            except BadRequest as e:
                return self.server.error(dialect, e.status, e.kind, e.message)
        run.__name__ = handler.__name__
        return run
    return wrap


class BatchAPI:
    """Files, OpenAI batches and Anthropic message batches, in memory."""

    def __init__(self, server: "SimServer"):
        self.server = server
        self.files: dict[str, File] = {}
        self.batches: dict[str, Batch] = {}  # OpenAI, oldest first
        self.message_batches: dict[str, Batch] = {}  # Anthropic, oldest first

    def add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_post("/v1/files", self.upload_file)
        router.add_get("/v1/files", self.list_files)
        router.add_get("/v1/files/{id}", self.get_file)
        router.add_delete("/v1/files/{id}", self.delete_file)
        router.add_get("/v1/files/{id}/content", self.file_content)
        router.add_post("/v1/batches", self.create_batch)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{id}", self.get_batch)
        router.add_post("/v1/batches/{id}/cancel", self.cancel_batch)
        router.add_post("/v1/messages/batches", self.create_message_batch)
        router.add_get("/v1/messages/batches", self.list_message_batches)
        router.add_get("/v1/messages/batches/{id}", self.get_message_batch)
        router.add_get("/v1/messages/batches/{id}/results", self.message_batch_results)
        router.add_post("/v1/messages/batches/{id}/cancel", self.cancel_message_batch)
        router.add_delete("/v1/messages/batches/{id}", self.delete_message_batch)

    def close(self) -> None:
        for batch in [*self.batches.values(), *self.message_batches.values()]:
            if batch.timer is not None:
                batch.timer.cancel()
            if batch.task is not None:
                batch.task.cancel()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self.server.boot}{next(self.server.ids):016x}"

    # -- files --

    def add_file(self, data: bytes, filename: str, purpose: str) -> File:
        file = File(self.new_id("file-"), filename, purpose, int(time.time()), data)
        self.files[file.id] = file
        return file

    def file(self, request: web.Request) -> File:
        file = self.files.get(request.match_info["id"])
        if file is None:
            raise BadRequest(404, "not_found",
                             f"No such File object: {request.match_info['id']}")
        return file

    @_guarded(OPENAI)
    async def upload_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            raise BadRequest(400, "invalid_request", "the request must be multipart/form-data "
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
            raise BadRequest(400, "invalid_request", "file: field required")
        if purpose not in FILE_PURPOSES:
            raise BadRequest(400, "invalid_request", f"purpose: must be one of "
                             f"{', '.join(sorted(FILE_PURPOSES))}")
        file = self.add_file(data, filename, purpose)
        self.server.stats.files_uploaded += 1
        return _json(file.as_json())

    @_guarded(OPENAI)
    async def list_files(self, request: web.Request) -> web.Response:
        data = [file.as_json() for file in reversed(self.files.values())]
        return _json({"object": "list", "data": data, "has_more": False,
                      "first_id": data[0]["id"] if data else None,
                      "last_id": data[-1]["id"] if data else None})

    @_guarded(OPENAI)
    async def get_file(self, request: web.Request) -> web.Response:
        return _json(self.file(request).as_json())

    @_guarded(OPENAI)
    async def delete_file(self, request: web.Request) -> web.Response:
        file = self.file(request)
        del self.files[file.id]
        return _json({"id": file.id, "object": "file", "deleted": True})

    @_guarded(OPENAI)
    async def file_content(self, request: web.Request) -> web.Response:
        return web.Response(body=self.file(request).data,
                            content_type="application/octet-stream")

    # -- both vendors' batches --

    def prepare(self, dialect: Dialect, custom_id: str,
                body: dict[str, Any]) -> tuple[bytes, int, str | None]:
        """A submitted item as the batch keeps it: its body as JSON, its fate, and why it is
        a bad request if it is one."""
        options = self.server.options
        # a copy: orjson's bytes keep their spare buffer, five times the JSON for small bodies
        packed = bytes(memoryview(orjson.dumps(body)))
        try:
            dialect.parse(_checked(body))
        except BadRequest as e:
            return packed, INVALID, e.message
        return packed, _fate(options.seed, custom_id, options.batch_error_rate,
                             options.batch_expire_rate), None

    def new_batch(self, prefix: str, dialect: Dialect, custom_ids: list[str],
                  items: list[tuple[bytes, int, str | None]], **fields: Any) -> Batch:
        """A batch of prepared items; the computation of their replies is scheduled for when
        it finalizes."""
        problems = {i: problem for i, (_, _, problem) in enumerate(items) if problem}
        delay = self.server.options.batch_delay_s
        batch = Batch(self.new_id(prefix), dialect, time.time(), time.monotonic(), delay,
                      custom_ids, [packed for packed, _, _ in items],
                      bytes(fate for _, fate, _ in items), problems, **fields)
        stats = self.server.stats
        stats.batches_created += 1
        stats.batch_items += len(custom_ids)
        batch.timer = asyncio.get_running_loop().call_later(0.9 * delay, self.finalize, batch)
        return batch

    def finalize(self, batch: Batch) -> None:
        batch.timer = None
        if batch.task is None and batch.cancel_at is None and batch.errors is None:
            batch.todo = len(batch.custom_ids)
            batch.task = asyncio.get_running_loop().create_task(self.compute(batch))

    def cancel(self, batch: Batch) -> None:
        now = time.monotonic()
        batch.cancel_at, batch.cancel_wall = now, time.time()
        if batch.task is None and batch.ready_wall is None:
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            batch.todo = batch.done_by(now)
            batch.task = asyncio.get_running_loop().create_task(self.compute(batch))

    async def compute(self, batch: Batch) -> None:
        """Answer the batch's items as realtime requests are answered, then keep the results
        as the vendor serves them."""
        server, dialect = self.server, batch.dialect
        openai = dialect is OPENAI
        cancelled = batch.cancel_at is not None
        tally = [0, 0, 0, 0]
        lines: list[bytes] = []  # OpenAI's output file, or Anthropic's results
        error_lines: list[bytes] = []
        ids, bodies, fates = batch.custom_ids, batch.bodies, batch.fates
        for start in range(0, batch.todo, BATCH_CHUNK):
            stats = server.stats  # a /stats/reset may replace it meanwhile
            for i in range(start, min(start + BATCH_CHUNK, batch.todo)):
                fate = fates[i]
                if fate == EXPIRED and cancelled:
                    continue  # the cancel came before it would have expired
                tally[fate] += 1
                custom_id = orjson.dumps(ids[i])
                if fate == SUCCEEDED:
                    call = dialect.parse(orjson.loads(bodies[i]))  # checked when submitted
                    answer, cache, reply_id = server.model_reply(dialect, call)
                    stats.batch_answered += 1
                    stats.batch_tokens_in += answer.input_tokens
                    stats.batch_tokens_out += answer.output_tokens
                    reply = dialect.json_reply(reply_id, call, answer, cache, False)
                elif fate == EXPIRED:
                    stats.batch_expired += 1
                else:
                    stats.batch_errored += 1
                    kind, message = (("server", ERRORED_MESSAGE) if fate == ERRORED
                                     else ("invalid_request", batch.problems[i]))
                    reply = dialect.error(kind, message)
                if openai:
                    tag = f"{self.server.boot}{next(self.server.ids):016x}".encode()
                    head = b'{"id":"batch_req_' + tag + b'","custom_id":' + custom_id
                    if fate == SUCCEEDED:
                        lines.append(head + b',"response":{"status_code":200,"request_id":'
                                     b'"req_' + tag + b'","body":' + reply + b'},"error":null}\n')
                    elif fate == EXPIRED:
                        error_lines.append(head + b',"response":null,"error":'
                                           + orjson.dumps({"code": "batch_expired",
                                                           "message": EXPIRED_MESSAGE})
                                           + b'}\n')
                    else:
                        status = b"500" if fate == ERRORED else b"400"
                        error_lines.append(head + b',"response":{"status_code":' + status
                                           + b',"request_id":"req_' + tag + b'","body":'
                                           + reply + b'},"error":null}\n')
                else:
                    head = b'{"custom_id":' + custom_id + b',"result":'
                    if fate == SUCCEEDED:
                        lines.append(head + b'{"type":"succeeded","message":' + reply + b'}}\n')
                    elif fate == EXPIRED:
                        lines.append(head + b'{"type":"expired"}}\n')
                    else:
                        lines.append(head + b'{"type":"errored","error":' + reply + b'}}\n')
            await asyncio.sleep(0)
        succeeded, failed = tally[SUCCEEDED], tally[ERRORED] + tally[INVALID]
        if openai:
            if lines:
                batch.output_file_id = self.add_file(b"".join(lines), f"{batch.id}_output.jsonl",
                                                     "batch_output").id
            if error_lines:
                batch.error_file_id = self.add_file(b"".join(error_lines),
                                                    f"{batch.id}_error.jsonl",
                                                    "batch_output").id
            batch.counts = {"total": len(ids), "completed": succeeded,
                            "failed": failed + tally[EXPIRED]}
        else:
            canceled = len(ids) - succeeded - failed - tally[EXPIRED]
            lines += [b'{"custom_id":' + orjson.dumps(ids[i]) + b',"result":{"type":"canceled"}}\n'
                      for i in range(len(ids))
                      if i >= batch.todo or (cancelled and fates[i] == EXPIRED)]
            batch.results = b"".join(lines)
            batch.counts = {"processing": 0, "succeeded": succeeded, "errored": failed,
                            "canceled": canceled, "expired": tally[EXPIRED]}
        batch.bodies = []  # answered: only the results are needed now
        batch.ready_wall = time.time()

    # -- OpenAI --

    def read_input(self, data: bytes, endpoint: str) -> tuple[
            list[str], list[tuple[bytes, int, str | None]], list[dict[str, Any]]]:
        """The input file's custom_ids and prepared items, and the errors that make the
        batch fail, as OpenAI reports them."""
        errors: list[dict[str, Any]] = []

        def refuse(code: str, message: str, line: int | None, param: str | None = None) -> None:
            if len(errors) < 100:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        custom_ids: list[str] = []
        items: list[tuple[bytes, int, str | None]] = []
        seen: set[str] = set()
        model = None
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                line = None
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
                items.append(self.prepare(OPENAI, custom_id, body))
        if not custom_ids and not errors:
            refuse("empty_file", "The input file has no requests.", None)
        return custom_ids, items, errors

    def openai_batch(self, request: web.Request) -> Batch:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise BadRequest(404, "not_found", f"No batch found with id "
                             f"'{request.match_info['id']}'.")
        return batch

    def openai_status(self, batch: Batch, now: float) -> str:
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

    def openai_json(self, batch: Batch, now: float) -> dict[str, Any]:
        status = self.openai_status(batch, now)
        valid = batch.errors is None
        ended = status in ("completed", "cancelled", "failed")

        def stamp(fraction: float) -> int:
            return int(batch.created + fraction * batch.delay)

        if not valid or status == "validating":
            counts = {"total": 0, "completed": 0, "failed": 0}
        elif ended:
            counts = batch.counts
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

    @_guarded(OPENAI)
    async def create_batch(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise BadRequest(400, "invalid_request", "input_file_id: field required")
        if body.get("endpoint") != BATCH_ENDPOINT:
            raise BadRequest(400, "invalid_request", f"endpoint: chunbot sim serves batches "
                             f"for '{BATCH_ENDPOINT}' only")
        if body.get("completion_window") != "24h":
            raise BadRequest(400, "invalid_request", "completion_window: only '24h' is "
                             "supported")
        metadata = _metadata(body.get("metadata"))
        file = self.files.get(file_id)
        if file is None:
            raise BadRequest(400, "invalid_request", f"input_file_id: no such file: {file_id}")
        if file.purpose != "batch":
            raise BadRequest(400, "invalid_request", f"input_file_id: file {file_id} has "
                             f"purpose '{file.purpose}', not 'batch'")
        custom_ids, items, errors = self.read_input(file.data, BATCH_ENDPOINT)
        if errors:
            custom_ids, items = [], []
        batch = self.new_batch("batch_", OPENAI, custom_ids, items, input_file_id=file_id,
                               metadata=metadata, errors=errors or None)
        if errors:
            batch.ready_wall = batch.created
        self.batches[batch.id] = batch
        return _json(self.openai_json(batch, time.monotonic()))

    @_guarded(OPENAI)
    async def get_batch(self, request: web.Request) -> web.Response:
        return _json(self.openai_json(self.openai_batch(request), time.monotonic()))

    @_guarded(OPENAI)
    async def list_batches(self, request: web.Request) -> web.Response:
        limit = _limit(request, 20, 100)
        batches = list(reversed(self.batches.values()))  # newest first
        after = request.query.get("after")
        if after is not None:
            at = next((i for i, b in enumerate(batches) if b.id == after), len(batches))
            batches = batches[at + 1:]
        page, now = batches[:limit], time.monotonic()
        return _json({"object": "list", "data": [self.openai_json(b, now) for b in page],
                      "first_id": page[0].id if page else None,
                      "last_id": page[-1].id if page else None,
                      "has_more": len(batches) > limit})

    @_guarded(OPENAI)
    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self.openai_batch(request)
        now = time.monotonic()
        status = self.openai_status(batch, now)
        if status in ("completed", "failed", "cancelled", "expired"):
            raise BadRequest(400, "invalid_request", f"Cannot cancel a batch with status "
                             f"'{status}'.")
        if status != "cancelling":
            self.cancel(batch)
        return _json(self.openai_json(batch, now))

    # -- Anthropic --

    def anthropic_batch(self, request: web.Request) -> Batch:
        batch = self.message_batches.get(request.match_info["id"])
        if batch is None:
            raise BadRequest(404, "not_found", f"No message batch found with id "
                             f"'{request.match_info['id']}'.")
        return batch

    def anthropic_json(self, batch: Batch, now: float, origin: str) -> dict[str, Any]:
        ended = batch.ended(now)
        if ended:
            status, counts = "ended", batch.counts
        else:
            status = "in_progress" if batch.cancel_at is None else "canceling"
            succeeded, errored = batch.running_counts(now)
            counts = {"processing": len(batch.custom_ids) - succeeded - errored,
                      "succeeded": succeeded, "errored": errored, "canceled": 0, "expired": 0}
        return {"id": batch.id, "type": "message_batch", "processing_status": status,
                "request_counts": counts,
                "ended_at": _iso(batch.ended_wall()) if ended else None,
                "created_at": _iso(batch.created),
                "expires_at": _iso(batch.created + BATCH_WINDOW), "archived_at": None,
                "cancel_initiated_at": _iso(batch.cancel_wall) if batch.cancel_wall else None,
                "results_url": (f"{origin}/v1/messages/batches/{batch.id}/results"
                                if ended else None)}

    def anthropic_reply(self, request: web.Request, batch: Batch) -> web.Response:
        return _json(self.anthropic_json(batch, time.monotonic(), str(request.url.origin())))

    @_guarded(ANTHROPIC)
    async def create_message_batch(self, request: web.Request) -> web.Response:
        requests = (await _json_object(request)).get("requests")
        if not isinstance(requests, list) or not requests:
            raise BadRequest(400, "invalid_request", "requests: must be a non-empty list")
        custom_ids: list[str] = []
        items: list[tuple[bytes, int, str | None]] = []
        seen: set[str] = set()
        for i, item in enumerate(requests):
            if not isinstance(item, dict):
                raise BadRequest(400, "invalid_request", f"requests.{i}: must be an object")
            custom_id, params = item.get("custom_id"), item.get("params")
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                raise BadRequest(400, "invalid_request", f"requests.{i}.custom_id: String "
                                 "should match pattern '^[a-zA-Z0-9_-]{1,64}$'")
            if custom_id in seen:
                raise BadRequest(400, "invalid_request", f"requests.{i}.custom_id: "
                                 f"'{custom_id}' is used by another request of the batch; "
                                 "custom_id must be unique")
            if not isinstance(params, dict):
                raise BadRequest(400, "invalid_request", f"requests.{i}.params: field required")
            seen.add(custom_id)
            custom_ids.append(custom_id)
            items.append(self.prepare(ANTHROPIC, custom_id, params))
        del requests  # the parsed request: the items keep what they need
        batch = self.new_batch("msgbatch_", ANTHROPIC, custom_ids, items)
        self.message_batches[batch.id] = batch
        return self.anthropic_reply(request, batch)

    @_guarded(ANTHROPIC)
    async def get_message_batch(self, request: web.Request) -> web.Response:
        return self.anthropic_reply(request, self.anthropic_batch(request))

    @_guarded(ANTHROPIC)
    async def list_message_batches(self, request: web.Request) -> web.Response:
        limit = _limit(request, 20, 1000)
        batches = list(reversed(self.message_batches.values()))  # newest first
        after, before = request.query.get("after_id"), request.query.get("before_id")
        cursor = after if after is not None else before
        at = next((i for i, b in enumerate(batches) if b.id == cursor), None)
        if cursor is not None and at is None:
            page, has_more = [], False
        elif after is not None:  # older than the cursor
            page, has_more = batches[at + 1:at + 1 + limit], len(batches) > at + 1 + limit
        elif before is not None:  # newer than the cursor
            page, has_more = batches[max(0, at - limit):at], at > limit
        else:
            page, has_more = batches[:limit], len(batches) > limit
        now, origin = time.monotonic(), str(request.url.origin())
        return _json({"data": [self.anthropic_json(b, now, origin) for b in page],
                      "has_more": has_more, "first_id": page[0].id if page else None,
                      "last_id": page[-1].id if page else None})

    @_guarded(ANTHROPIC)
    async def message_batch_results(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batch(request)
        if not batch.ended(time.monotonic()):
            raise BadRequest(400, "invalid_request", f"Message batch {batch.id} has not ended "
                             "yet: its results are available once processing_status is 'ended'")
        return web.Response(body=batch.results, content_type=ANTHROPIC_RESULTS)

    @_guarded(ANTHROPIC)
    async def cancel_message_batch(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batch(request)
        if batch.ended(time.monotonic()):
            raise BadRequest(400, "invalid_request", f"Message batch {batch.id} has ended: "
                             "it cannot be canceled")
        if batch.cancel_at is None:
            self.cancel(batch)
        return self.anthropic_reply(request, batch)

    @_guarded(ANTHROPIC)
    async def delete_message_batch(self, request: web.Request) -> web.Response:
        batch = self.anthropic_batch(request)
        if not batch.ended(time.monotonic()):
            raise BadRequest(400, "invalid_request", f"Message batch {batch.id} is still "
                             "processing: cancel it and wait until it has ended")
        del self.message_batches[batch.id]
        return _json({"id": batch.id, "type": "message_batch_deleted"})


class SimServer:
    """The state behind the routes: options, the fault RNG, rate-limit buckets and stats."""

    def __init__(self, options: Options):
        self.options = options
        self.rng = random.Random(options.seed)
        self.requests = Bucket(options.rpm) if options.rpm else None
        self.tokens = Bucket(options.tpm) if options.tpm else None
        self.stats = Stats()
        self.ids = itertools.count(1)
        self.openai_cache = PrefixCache()
        self.anthropic_cache = PrefixCache()
        # ids are unique across restarts too: a client may compare them
        self.boot = f"{random.getrandbits(32):08x}"
        self.batch_api = BatchAPI(self)
        self.storm_end: float | None = None  # --storm-s: set by the first model request

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        self.batch_api.add_routes(app)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, OPENAI)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, ANTHROPIC)

    async def handle(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.by_route[dialect.route] += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            response = await self.answer(request, dialect)
        finally:
            # self.stats again: /stats/reset may have replaced it meanwhile
            self.stats.in_flight -= 1
        if response is None:  # hung: its connection is closed, there is no answer to count
            return web.Response(status=504)  # what aiohttp wants; it cannot be sent
        self.stats.by_status[response.status] += 1
        return response

    async def answer(self, request: web.Request, dialect: Dialect) -> web.Response | None:
        """The response to a model request; None when it hung and its connection is gone."""
        try:
            self.authorize(request, dialect)
            call = dialect.parse(_body(await request.read()))
        except BadRequest as e:
            return self.error(dialect, e.status, e.kind, e.message)
        options = self.options
        if options.storm_s:
            stormed = self.storm(dialect)
            if stormed is not None:
                return stormed
        limited = self.requests is not None or self.tokens is not None
        if limited:
            refused = self.admit(call, dialect)
            if refused is not None:
                return refused
        poisoned = options.fail_prompt is not None and self.poisoned(call)
        if options.hang_rate and not poisoned and self.rng.random() < options.hang_rate:
            await self.hang(request)
            return None
        if options.latency_ms or options.jitter_ms:
            delay = options.latency_ms + self.rng.uniform(-options.jitter_ms, options.jitter_ms)
            await asyncio.sleep(max(0.0, delay) / 1000)
        if poisoned:
            self.stats.poisoned += 1
            return self.error(dialect, 500, "server", "The server had an error while "
                              "processing your request (a poisoned prompt, injected by "
                              "chunbot sim).")
        if options.error_rate and self.rng.random() < options.error_rate:
            if self.rng.random() < 0.5:
                return self.error(dialect, 500, "server", "The server had an error while "
                                  "processing your request (injected by chunbot sim).")
            return self.error(dialect, 503, "overloaded", "The server is overloaded "
                              "(injected by chunbot sim).")

        seed = sim_model.request_seed(call.model, call.messages, call.params)
        answer, cache, reply_id = self.model_reply(dialect, call)
        stats = self.stats
        stats.answered += 1
        stats.structured += forced_tool(call) is not None or (
            (call.params.get("response_format") or {}).get("type") == "json_schema")
        stats.keys.add(seed)
        stats.tokens_in += answer.input_tokens
        stats.tokens_out += answer.output_tokens
        stats.cached_tokens += cache.read
        stats.cache_creation_tokens += cache.created
        if options.malformed == "not-json":
            body, content_type = HTML_BODY, "text/html"
        elif call.stream and options.malformed is None:  # a broken server ignores `stream`
            stats.streamed += 1
            body, content_type = dialect.sse_reply(reply_id, call, answer, cache, seed), SSE
        else:
            body = dialect.json_reply(reply_id, call, answer, cache,
                                      options.malformed == "no-choices")
            content_type = JSON
        headers = {"Content-Type": content_type}
        if limited:
            headers.update(self.limit_headers(dialect))
        return web.Response(body=body, headers=headers)

    def storm(self, dialect: Dialect) -> web.Response | None:
        """--storm-s: a 429 for every model request during the storm, which starts with the
        first one; None once it is over."""
        now = time.monotonic()
        if self.storm_end is None:
            self.storm_end = now + self.options.storm_s
        if now >= self.storm_end:
            return None
        after = self.options.storm_retry_after
        return self.error(dialect, 429, "rate_limit_requests", "Rate limit reached for "
                          f"requests (a storm injected by chunbot sim). Please try again in "
                          f"{after}s.", {"retry-after": str(after),
                                         "retry-after-ms": str(after * 1000)})

    def poisoned(self, call: Call) -> bool:
        """--fail-prompt: whether any message of the request contains the text."""
        text = self.options.fail_prompt
        return any(text in _as_string(m.get("content")) for m in call.messages)

    async def hang(self, request: web.Request) -> None:
        """--hang-rate: hold the request without an answer until its client goes away, or
        for HANG_S at most, then drop the connection."""
        self.stats.hung += 1
        deadline = time.monotonic() + HANG_S
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                transport.abort()  # dropped: no status line, the client sees the reset
                return
            await asyncio.sleep(min(HANG_POLL_S, left))

    def model_reply(self, dialect: Dialect,
                    call: Call) -> tuple[sim_model.SimReply, CacheUse, str]:
        """The model's answer to a request, its provider-cache use and its reply id: the one
        path of realtime requests and batch items, so both get the same text and usage."""
        wrong = self.options.wrong_rate if call.model == self.options.wrong_model else 0.0
        answer = sim_model.reply(call.model, call.messages, call.params, wrong,
                                 self.options.flaky_rate)
        cache = self.cache_use(dialect, call, answer)
        return answer, cache, f"{dialect.id_prefix}{self.boot}{next(self.ids):016x}"

    def cache_use(self, dialect: Dialect, call: Call, answer: sim_model.SimReply) -> CacheUse:
        """Look the answered request's prompt up in the route's cache, then remember it."""
        if dialect is OPENAI:
            keys = openai_prefix_keys(call.messages)
            if not keys:
                return NO_CACHE
            hits = self.openai_cache.leading_hits(keys)
            if not hits:
                return NO_CACHE
            return CacheUse(read=min(hits * CACHE_BLOCK // 4, answer.input_tokens))
        prefix = anthropic_cache_prefix(call.body) if call.body is not None else None
        if prefix is None:
            return NO_CACHE
        key, tokens = prefix
        if self.anthropic_cache.check_and_add(key):
            return CacheUse(read=tokens)
        return CacheUse(created=tokens)

    def authorize(self, request: web.Request, dialect: Dialect) -> None:
        key = self.options.api_key
        if dialect is OPENAI:
            if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
                # never echo the key that was sent: it may be a real one sent by mistake
                raise BadRequest(401, "auth", "Incorrect API key provided.")
        else:
            if key is not None and request.headers.get("x-api-key") != key:
                raise BadRequest(401, "auth", "invalid x-api-key")
            if "anthropic-version" not in request.headers:
                raise BadRequest(400, "invalid_request", "anthropic-version: header is required")

    def admit(self, call: Call, dialect: Dialect) -> web.Response | None:
        """Take the request from the RPM and TPM buckets, or say when to come back (429)."""
        now = time.monotonic()
        cost = request_cost(call)
        waits = []
        for bucket, amount in ((self.requests, 1), (self.tokens, cost)):
            if bucket is not None:
                bucket.refill(now)
                waits.append((bucket.wait(amount), bucket))
        wait, bucket = max(waits, key=lambda pair: pair[0])
        if wait <= 0:
            if self.requests is not None:
                self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= cost
            return None
        name = "requests" if bucket is self.requests else "tokens"
        message = (f"Rate limit reached for {name} per min: limit {bucket.limit}. "
                   f"Please try again in {wait:.3f}s.")
        return self.error(dialect, 429, f"rate_limit_{name}", message,
                          {"retry-after": str(max(1, math.ceil(wait))),
                           "retry-after-ms": str(math.ceil(wait * 1000))})

    def error(self, dialect: Dialect, status: int, kind: str, message: str,
              extra: dict[str, str] | None = None) -> web.Response:
        headers = {"Content-Type": JSON, **(extra or {})}
        if self.requests is not None or self.tokens is not None:
            headers.update(self.limit_headers(dialect))
        return web.Response(status=status, body=dialect.error(kind, message), headers=headers)

    def limit_headers(self, dialect: Dialect) -> dict[str, str]:
        now = time.monotonic()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        return dialect.limit_headers(self.requests, self.tokens)

    async def models(self, request: web.Request) -> web.Response:
        # the fields of both vendors' model lists, so either SDK can read it
        data = [{"id": name, "object": "model", "type": "model", "created": 0,
                 "created_at": "2026-01-01T00:00:00Z", "owned_by": "chunbot",
                 "display_name": name} for name in MODELS]
        body = {"object": "list", "data": data, "has_more": False,
                "first_id": MODELS[0], "last_id": MODELS[-1]}
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=JSON)

    async def reset_stats(self, request: web.Request) -> web.Response:
        in_flight = self.stats.in_flight  # requests still running will decrement it
        self.stats = Stats(in_flight=in_flight, max_in_flight=in_flight)
        self.openai_cache.clear()
        self.anthropic_cache.clear()
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=JSON)


async def _serve(options: Options) -> None:
    server = SimServer(options)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    # a large backlog so that benchmarks opening 1,000+ connections at once are not refused
    site = web.TCPSite(runner, options.host, options.port, backlog=4096, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"chunbot sim: listening on http://{host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.batch_api.close()
    await runner.cleanup()


def serve(options: Options) -> None:
    """Serve until SIGINT or SIGTERM; then exit cleanly."""
    try:
        asyncio.run(_serve(options))
    except OSError as e:
        print(f"chunbot sim: cannot listen on {options.host}:{options.port}: {e.strerror}",
              file=sys.stderr)
        raise SystemExit(2) from None
