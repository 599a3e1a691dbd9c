"""What goes to a provider and what comes back, independent of the wire protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True)
class Request:
    messages: list[dict[str, Any]]  # system first when the stage has one
    params: dict[str, Any] = field(default_factory=dict)
    prompt_cache: bool = False  # ask the provider to cache the static prefix (Anthropic)
    static_prefix: int = 0  # characters at the start of the last message that never change
    schema: dict[str, Any] | None = None  # `structured: true`: the provider enforces it


@dataclass(frozen=True)
class RateLimits:
    """The limits a server announced in its rate-limit headers, per minute."""

    requests: float | None = None
    tokens: float | None = None


@dataclass(frozen=True)
class Reply:
    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    limits: RateLimits | None = None
    cached_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it (Anthropic)


class ProviderError(Exception):
    """A failed request. `retryable` errors are tried again after a back-off.

    `unreachable` means no connection could be made at all: the endpoint's fault, not the
    record's, so the endpoint is taken out and the record waits for another one.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None,
                 retry_after: float | None = None, unreachable: bool = False,
                 timed_out: bool = False, limits: RateLimits | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.unreachable = unreachable
        self.timed_out = timed_out
        self.limits = limits
        self.endpoint_down = False  # set when this failure took its endpoint out

    @property
    def overload(self) -> bool:
        """The endpoint says it has too much to do, or did not answer in time; whether it
        is really overloaded or fails at random is the limiter's to find out."""
        return self.timed_out or self.status in (503, 504, 529)

    @property
    def server_fault(self) -> bool:
        """A failure that says the endpoint is unwell (5xx, timeout, dropped connection),
        as opposed to one about this request (4xx) or a rate limit (429)."""
        return self.unreachable or (self.retryable and (self.status is None
                                                        or self.status >= 500))


def excerpt(value: Any, limit: int = 500) -> str:
    """The start of a reply or body, for error messages."""
    if isinstance(value, bytes):
        return value[:limit].decode("utf-8", "replace")
    if not isinstance(value, str):
        value = orjson.dumps(value, default=str).decode()
    return value[:limit]
