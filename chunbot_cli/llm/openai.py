"""The OpenAI chat-completions wire format, spoken by OpenAI, DeepSeek, vLLM, llama.cpp,
Ollama and most other servers: request body, reply, SSE stream, error body.

Pure functions over bytes and dicts; `http.py` does the sending.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelSpec
from .types import ProviderError, RateLimits, Reply, Request, excerpt

PATH = "/chat/completions"

# The rate limits a server announces, per minute: requests, tokens
LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-limit-tokens")


def path(spec: ModelSpec, streaming: bool) -> str:
    return PATH


def error_hints(data: bytes) -> tuple[float | None, RateLimits | None]:
    return None, None  # OpenAI says it in headers


def headers(spec: ModelSpec, api_key: str | None) -> dict[str, str]:
    sent = {"content-type": "application/json", "user-agent": "chunbot"}
    if api_key:
        sent["authorization"] = f"Bearer {api_key}"
    return {**sent, **spec.headers}


def body(spec: ModelSpec, request: Request) -> dict[str, Any]:
    sent = {"model": spec.model, "messages": request.messages, **request.params}
    if request.schema is not None:  # structured outputs: the server holds the reply to it
        sent["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "reply", "schema": request.schema, "strict": True}}
    return sent


def reply(data: dict[str, Any], model: str) -> Reply:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ProviderError(f"reply has no choices[0].message.content: {excerpt(data)}",
                            retryable=False) from None
    _check_finish(choice.get("finish_reason"))
    usage = data.get("usage") or {}
    return Reply(text=text or "", model=data.get("model") or model,
                 input_tokens=usage.get("prompt_tokens") or 0,
                 output_tokens=usage.get("completion_tokens") or 0,
                 finish_reason=choice.get("finish_reason"), cached_tokens=cached_tokens(usage))


def _check_finish(finish: str | None) -> None:
    if finish == "content_filter":  # what came is cut or empty: not a reply to keep
        raise ProviderError("the provider's content filter stopped the reply (finish_reason "
                            "content_filter)", retryable=False)


def cached_tokens(usage: dict[str, Any]) -> int:
    """Prompt tokens served from the provider's prefix cache: OpenAI's
    `prompt_tokens_details.cached_tokens`, or DeepSeek's `prompt_cache_hit_tokens`."""
    details = usage.get("prompt_tokens_details") or {}
    return details.get("cached_tokens") or usage.get("prompt_cache_hit_tokens") or 0


class Stream:
    """Assembles a reply from the `data:` events of a streamed completion."""

    def __init__(self, model: str):
        self.parts: list[str] = []
        self.model = model
        self.usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.seen_choice = False

    def feed(self, event: dict[str, Any]) -> None:
        if "error" in event:
            raise ProviderError(f"error in the stream: {excerpt(event['error'])}", retryable=True)
        self.model = event.get("model") or self.model
        for choice in event.get("choices") or ():
            self.seen_choice = True
            content = (choice.get("delta") or {}).get("content")
            if content:
                self.parts.append(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.usage = event.get("usage") or self.usage

    def reply(self) -> Reply:
        if not self.seen_choice:
            raise ProviderError("the stream ended without any choice", retryable=False)
        _check_finish(self.finish_reason)
        return Reply(text="".join(self.parts), model=self.model,
                     input_tokens=self.usage.get("prompt_tokens") or 0,
                     output_tokens=self.usage.get("completion_tokens") or 0,
                     finish_reason=self.finish_reason, cached_tokens=cached_tokens(self.usage))

