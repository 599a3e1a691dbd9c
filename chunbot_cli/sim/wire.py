"""What the protocols of `chunbot sim serve` share: a request parsed whatever its vendor
(`Call`), the refusal a request can get instead of the model (`Refused`), the shape each
vendor's protocol takes (`Dialect`: what the one request path asks of a vendor), and the
few helpers their encoders have in common.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .cache import CacheUse, PrefixCache
    from .faults import Bucket
    from .model import SimReply

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
MODELS = ("sim-small", "sim-large")

# What --block-prompt makes of a reply's finish reason, besides the model's "stop" and
# "length"; each vendor spells it its own way, and Gemini tells the two apart
BLOCKED_PROMPT = "blocked_prompt"  # the text is in the system prompt
BLOCKED_REPLY = "blocked_reply"  # the text is only in the conversation
BLOCKED = frozenset({BLOCKED_PROMPT, BLOCKED_REPLY})


class Refused(Exception):
    """A request answered with an error instead of the model: its status, the kind of
    error (each vendor names kinds its own way) and the message. A 429 also says when to
    come back, `retry_after` whole seconds as a header says it and `wait` exactly, and
    which limit of which model it hit, for the vendors that put those in the body."""

    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None,
                 wait: float = 0.0, limit: int | None = None, model: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.retry_after, self.wait, self.limit, self.model = retry_after, wait, limit, model


@dataclass
class Call:
    """One parsed request, whatever its protocol."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    body: dict[str, Any] | None = None  # Anthropic: the request as sent, for its cache_control


@dataclass(frozen=True, eq=False)
class Dialect:
    """One vendor's protocol, as the request path (realtime and batch items alike) uses it;
    everything else of a vendor is its routes."""

    route: str  # its name in /stats' by_route
    id_prefix: str  # of its reply ids
    # the request body and the route's URL variables as a Call, or Refused (400, 404)
    parse: Callable[[dict[str, Any], Mapping[str, str]], Call]
    authorize: Callable[[web.Request, str | None], None]  # (request, --api-key): or Refused
    error: Callable[[Refused], bytes]  # the error body
    retry_headers: Callable[[Refused], dict[str, str]]  # of a refusal, beside its body
    limit_headers: Callable[["Bucket | None", "Bucket | None"], dict[str, str]]
    json_reply: Callable[..., bytes]  # (id, call, answer, cache, malformed)
    sse_reply: Callable[..., bytes]  # (id, call, answer, cache, seed)
    cache_use: Callable[["PrefixCache", Call, "SimReply"], "CacheUse"]  # its prompt cache
    structured: Callable[[Call], bool]  # whether the request asks for a schema


def as_string(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "" if content is None else str(content)


def text_of(content: Any) -> Any:
    """A list of text parts, as OpenAI and Anthropic accept, becomes the string the model
    sees."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return content


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Refused(400, "invalid_request", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "invalid_request", "the request body must be a JSON object")
    return body


def chat_checked(body: dict[str, Any]) -> dict[str, Any]:
    """The checks of OpenAI's and Anthropic's bodies, sent alone or as batch items: both
    name the model and hold the messages."""
    for key in ("model", "messages"):
        if key not in body:
            raise Refused(400, "invalid_request", f"{key}: field required")
    if not isinstance(body["model"], str):
        raise Refused(400, "invalid_request", "model: must be a string")
    return body


def chat_messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise Refused(400, "invalid_request", "messages: must be a list of objects")
    return [{**m, "content": text_of(m["content"])} if isinstance(m.get("content"), list)
            else m for m in raw]


# What OpenAI's and Anthropic's own fields are: everything else in a body is a model parameter
CHAT_FIELDS = frozenset({"model", "messages", "system", "stream", "stream_options"})


def chat_params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in CHAT_FIELDS}


def retry_headers(refused: Refused) -> dict[str, str]:
    """OpenAI's and Anthropic's retry-after headers of a 429."""
    if refused.retry_after is None:
        return {}
    return {"retry-after": str(refused.retry_after),
            "retry-after-ms": str(math.ceil(refused.wait * 1000))}


def no_headers(*_: Any) -> dict[str, str]:
    return {}


def split_words(text: str, seed: int) -> list[str]:
    """The text in 3–8 pieces cut between words (fewer for short texts); they join back to it."""
    words = text.split(" ")
    size = math.ceil(len(words) / (3 + seed % 6))
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [pieces[0], *(" " + p for p in pieces[1:])]


def answer_object(answer: "SimReply") -> dict[str, Any]:
    """The answer as the JSON object a request for structured output gets: the model's
    JSON when its text is an object, else the text in one."""
    try:
        value = orjson.loads(answer.text)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"text": answer.text}


def respond(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)
