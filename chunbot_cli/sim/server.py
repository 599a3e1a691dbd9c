"""`chunbot sim serve`: the deterministic sim model over HTTP, speaking OpenAI and Anthropic.

This module owns the wire side of the simulator: the two protocols (JSON and SSE replies,
the vendors' error bodies and rate-limit headers), the faults a test can inject (latency,
server errors, RPM/TPM limits, a required key, malformed replies) and the /stats counters
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

# The error kinds this server answers with, as each vendor spells them:
# kind -> (OpenAI error type, OpenAI error code, Anthropic error type)
ERROR_TYPES = {
    "invalid_request": ("invalid_request_error", None, "invalid_request_error"),
    "auth": ("invalid_request_error", "invalid_api_key", "authentication_error"),
    "rate_limit_requests": ("requests", "rate_limit_exceeded", "rate_limit_error"),
    "rate_limit_tokens": ("tokens", "rate_limit_exceeded", "rate_limit_error"),
    "server": ("server_error", None, "api_error"),
    "overloaded": ("server_error", None, "overloaded_error"),
}


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    api_key: str | None = None
    malformed: str | None = None  # "not-json" | "no-choices"
    seed: int | None = None


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
    cached_tokens: int = 0  # OpenAI cached_tokens + Anthropic cache reads
    cache_creation_tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        unique = len(self.keys)
        return {"requests": self.requests,
                "by_route": {"chat": self.by_route["chat"], "messages": self.by_route["messages"]},
                "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
                "answered": self.answered, "unique": unique, "repeated": self.answered - unique,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "streamed": self.streamed, "cached_tokens": self.cached_tokens,
                "cache_creation_tokens": self.cache_creation_tokens}


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


def anthropic_json(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
                   malformed: bool) -> bytes:
    body: dict[str, Any] = {"id": reply_id, "type": "message", "role": "assistant",
                            "model": call.model}
    if not malformed:
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
    parts = [event("message_start", {"type": "message_start", "message": message}),
             event("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
             event("ping", {"type": "ping"})]
    parts += [event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": piece}})
              for piece in split_words(answer.text, seed)]
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

    def app(self) -> web.Application:
        app = web.Application()
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
        self.stats.by_status[response.status] += 1
        return response

    async def answer(self, request: web.Request, dialect: Dialect) -> web.Response:
        try:
            self.authorize(request, dialect)
            call = dialect.parse(_body(await request.read()))
        except BadRequest as e:
            return self.error(dialect, e.status, e.kind, e.message)
        limited = self.requests is not None or self.tokens is not None
        if limited:
            refused = self.admit(call, dialect)
            if refused is not None:
                return refused
        options = self.options
        if options.latency_ms or options.jitter_ms:
            delay = options.latency_ms + self.rng.uniform(-options.jitter_ms, options.jitter_ms)
            await asyncio.sleep(max(0.0, delay) / 1000)
        if options.error_rate and self.rng.random() < options.error_rate:
            if self.rng.random() < 0.5:
                return self.error(dialect, 500, "server", "The server had an error while "
                                  "processing your request (injected by chunbot sim).")
            return self.error(dialect, 503, "overloaded", "The server is overloaded "
                              "(injected by chunbot sim).")

        seed = sim_model.request_seed(call.model, call.messages, call.params)
        answer = sim_model.reply(call.model, call.messages, call.params)
        stats = self.stats
        stats.answered += 1
        stats.keys.add(seed)
        stats.tokens_in += answer.input_tokens
        stats.tokens_out += answer.output_tokens
        cache = self.cache_use(dialect, call, answer)
        stats.cached_tokens += cache.read
        stats.cache_creation_tokens += cache.created
        reply_id = f"{dialect.id_prefix}{self.boot}{next(self.ids):016x}"
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
    await runner.cleanup()


def serve(options: Options) -> None:
    """Serve until SIGINT or SIGTERM; then exit cleanly."""
    try:
        asyncio.run(_serve(options))
    except OSError as e:
        print(f"chunbot sim: cannot listen on {options.host}:{options.port}: {e.strerror}",
              file=sys.stderr)
        raise SystemExit(2) from None
