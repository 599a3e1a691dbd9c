"""The Anthropic Messages wire format: request body, reply, SSE stream.

`system` is a top-level field rather than a message, and `max_tokens` is required (the
alias's `max_tokens` when the stage's params do not set it). Pure functions; `http.py`
does the sending.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..config import ModelSpec
from .types import ProviderError, RateLimits, Reply, Request, excerpt

PATH = "/v1/messages"
VERSION = "2023-06-01"

# The rate limits a server announces, per minute: requests, tokens
LIMIT_HEADERS = ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-tokens-limit")


def path(spec: ModelSpec, streaming: bool) -> str:
    return PATH


def error_hints(data: bytes) -> tuple[float | None, RateLimits | None]:
    return None, None  # Anthropic says it in headers


def headers(spec: ModelSpec, api_key: str | None) -> dict[str, str]:
    sent = {"content-type": "application/json", "user-agent": "chunbot",
            "anthropic-version": VERSION}
    if api_key:
        sent["x-api-key"] = api_key
    return {**sent, **spec.headers}


def body(spec: ModelSpec, request: Request) -> dict[str, Any]:
    system = [m["content"] for m in request.messages if m.get("role") == "system"]
    messages = [m for m in request.messages if m.get("role") != "system"]
    sent: dict[str, Any] = {"model": spec.model, "messages": messages,
                            "max_tokens": spec.max_tokens}
    if system:
        sent["system"] = "\n\n".join(system)
    if request.prompt_cache:
        _mark_cacheable(sent, request.static_prefix)
    if request.schema is not None:  # structured: a forced tool whose input is the reply
        sent["tools"] = [{"name": TOOL, "description": "Give the reply.",
                          "input_schema": request.schema}]
        sent["tool_choice"] = {"type": "tool", "name": TOOL}
    sent.update(request.params)
    return sent


TOOL = "reply"


def _mark_cacheable(sent: dict[str, Any], static_prefix: int) -> None:
    """Put `cache_control` on the system prompt and on the static start of the last
    message, so repeated prefixes are read from Anthropic's cache at a tenth of the price."""
    if "system" in sent:
        sent["system"] = [{"type": "text", "text": sent["system"], "cache_control": EPHEMERAL}]
    last = sent["messages"][-1] if sent["messages"] else None
    if last and isinstance(last.get("content"), str) and 0 < static_prefix < len(last["content"]):
        text = last["content"]
        sent["messages"] = sent["messages"][:-1] + [{**last, "content": [
            {"type": "text", "text": text[:static_prefix], "cache_control": EPHEMERAL},
            {"type": "text", "text": text[static_prefix:]}]}]


EPHEMERAL = {"type": "ephemeral"}


def _text(block: dict[str, Any]) -> str:
    """A content block's part of the reply: its text, or a tool use's input as JSON."""
    if block.get("type") == "text":
        return block.get("text", "")
    if block.get("type") == "tool_use":
        return orjson.dumps(block.get("input")).decode()
    return ""


def reply(data: dict[str, Any], model: str) -> Reply:
    content = data.get("content") if isinstance(data, dict) else None
    if not isinstance(content, list):
        raise ProviderError(f"reply has no content: {excerpt(data)}", retryable=False)
    _check_stop(data.get("stop_reason"))
    usage = data.get("usage") or {}
    read, written = _cache_usage(usage)
    return Reply(text="".join(_text(b) for b in content if isinstance(b, dict)),
                 model=data.get("model") or model,
                 input_tokens=(usage.get("input_tokens") or 0) + read + written,
                 output_tokens=usage.get("output_tokens") or 0,
                 finish_reason=data.get("stop_reason"), cached_tokens=read,
                 cache_write_tokens=written)


def _check_stop(stop: str | None) -> None:
    if stop == "refusal":  # the safety classifiers stopped it: not a reply to keep
        raise ProviderError("Anthropic refused the reply (stop_reason refusal)",
                            retryable=False)


def _cache_usage(usage: dict[str, Any]) -> tuple[int, int]:
    """Anthropic counts cache reads and writes apart from `input_tokens`."""
    return (usage.get("cache_read_input_tokens") or 0,
            usage.get("cache_creation_input_tokens") or 0)


class Stream:
    """Assembles a reply from the events of a streamed message."""

    def __init__(self, model: str):
        self.parts: list[str] = []
        self.model = model
        self.input_tokens = self.output_tokens = 0
        self.cached_tokens = self.cache_write_tokens = 0
        self.finish_reason: str | None = None
        self.started = False

    def feed(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            self.started = True
            message = event.get("message") or {}
            self.model = message.get("model") or self.model
            usage = message.get("usage") or {}
            self.cached_tokens, self.cache_write_tokens = _cache_usage(usage)
            self.input_tokens = ((usage.get("input_tokens") or 0) + self.cached_tokens
                                 + self.cache_write_tokens)
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                self.parts.append(delta.get("text", ""))
            elif delta.get("type") == "input_json_delta":  # a forced tool's input
                self.parts.append(delta.get("partial_json", ""))
        elif kind == "message_delta":
            self.finish_reason = (event.get("delta") or {}).get("stop_reason")
            self.output_tokens = (event.get("usage") or {}).get("output_tokens") or 0
        elif kind == "error":
            raise ProviderError(f"error in the stream: {excerpt(event.get('error'))}",
                                retryable=True)

    def reply(self) -> Reply:
        if not self.started:
            raise ProviderError("the stream ended without message_start", retryable=False)
        _check_stop(self.finish_reason)
        return Reply(text="".join(self.parts), model=self.model, input_tokens=self.input_tokens,
                     output_tokens=self.output_tokens, finish_reason=self.finish_reason,
                     cached_tokens=self.cached_tokens,
                     cache_write_tokens=self.cache_write_tokens)

