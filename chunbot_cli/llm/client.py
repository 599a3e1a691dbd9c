"""One model alias at run time: its provider, how many requests may be in flight, retries.

A request holds a concurrency slot only while it is on the wire; the back-off before a
retry happens outside the slot, so records waiting to retry never block fresh ones.
Every attempt is recorded for the trace.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ..config import ModelSpec
from .types import ProviderError, Reply, Request

DEFAULT_CONCURRENCY = 256
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0


class Provider(Protocol):
    async def complete(self, request: Request) -> Reply: ...

    async def close(self) -> None: ...


@dataclass
class Completion:
    """The outcome of one request after retries: a reply, or the last error."""

    reply: Reply | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    latency_ms: float = 0.0


def make_provider(spec: ModelSpec) -> Provider:
    if spec.provider == "sim":
        from .sim import SimProvider
        return SimProvider(spec)
    raise ValueError(f"unknown provider {spec.provider!r}")


def _retryable(error: BaseException) -> bool:
    return isinstance(error, ProviderError) and error.retryable


def _wait(state: RetryCallState) -> float:
    """Exponential back-off with full jitter, unless the server said when to come back."""
    error = state.outcome.exception() if state.outcome else None
    if isinstance(error, ProviderError) and error.retry_after is not None:
        return error.retry_after
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (state.attempt_number - 1)))


class ModelClient:
    def __init__(self, spec: ModelSpec, provider: Provider | None = None):
        self.spec = spec
        self.provider = provider or make_provider(spec)
        self.limit = spec.max_concurrency or DEFAULT_CONCURRENCY
        self.in_flight = 0
        self.requests = 0
        self._slots = asyncio.Semaphore(self.limit)

    async def complete(self, request: Request, retries: int) -> Completion:
        attempts: list[dict[str, Any]] = []
        started = time.perf_counter()
        retrying = AsyncRetrying(stop=stop_after_attempt(retries + 1), wait=_wait,
                                 retry=retry_if_exception(_retryable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    reply = await self._send(request, attempts)
        except ProviderError as e:
            return Completion(None, attempts, str(e), _ms_since(started))
        return Completion(reply, attempts, None, _ms_since(started))

    async def _send(self, request: Request, attempts: list[dict[str, Any]]) -> Reply:
        async with self._slots:
            self.in_flight += 1
            self.requests += 1
            sent = time.perf_counter()
            try:
                reply = await self.provider.complete(request)
            except ProviderError as e:
                attempts.append({"error": str(e), "status": e.status,
                                 "latency_ms": _ms_since(sent)})
                raise
            finally:
                self.in_flight -= 1
        attempts.append({"error": None, "latency_ms": _ms_since(sent)})
        return reply

    async def close(self) -> None:
        await self.provider.close()


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
