"""One model alias at run time: its provider, its endpoints, how many requests may be in
flight, and retries.

A request holds a concurrency slot only while it is on the wire; the back-off before a
retry happens outside the slot, so records waiting to retry never block fresh ones.
Retries (tenacity) use exponential back-off with full jitter unless the server said when
to come back. A failure that took its endpoint down is the endpoint's, not the record's:
it does not use up the record's retries, and the record waits for an endpoint instead
(endpoints.py). Every attempt is recorded for the trace.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ..config import ModelSpec
from .endpoints import EndpointPool
from .types import ProviderError, Reply, Request

DEFAULT_CONCURRENCY = 256
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0


class Provider(Protocol):
    async def complete(self, request: Request, url: str) -> Reply: ...

    async def close(self) -> None: ...


@dataclass
class Completion:
    """The outcome of one request after retries: a reply, or the last error."""

    reply: Reply | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    latency_ms: float = 0.0
    endpoint: str | None = None


def make_provider(spec: ModelSpec, session: Any = None) -> Provider:
    if spec.provider == "sim":
        from .sim import SimProvider
        return SimProvider(spec)
    from .http import HTTPProvider
    return HTTPProvider(spec, session)


def _retryable(error: BaseException) -> bool:
    return isinstance(error, ProviderError) and error.retryable


def _backoff(error: BaseException | None, attempt_number: int) -> float:
    """Exponential back-off with full jitter, unless the server said when to come back.

    After an endpoint failure there is no back-off: the endpoint pool holds the request
    until an endpoint is up again."""
    if isinstance(error, ProviderError):
        if error.retry_after is not None:
            return error.retry_after
        if error.endpoint_down:
            return 0.0
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt_number - 1)))


class ModelClient:
    def __init__(self, spec: ModelSpec, provider: Provider | None = None,
                 note: Callable[[str], None] = lambda text: None):
        self.spec = spec
        self.provider = provider or make_provider(spec)
        self.limit = spec.max_concurrency or DEFAULT_CONCURRENCY
        self.in_flight = 0
        self.requests = 0
        self.pool = EndpointPool(spec.alias, spec.urls or (spec.provider,), note)
        self.auth_error: str | None = None
        self._slots = asyncio.Semaphore(self.limit)

    async def complete(self, request: Request, retries: int,
                       outage_timeout: float = 600.0) -> Completion:
        attempts: list[dict[str, Any]] = []
        started = time.perf_counter()
        try:
            reply, url = await self._send(request, attempts, outage_timeout)
            return Completion(reply, attempts, None, _ms_since(started), url)
        except ProviderError as e:
            # the common case above stays out of tenacity, which costs ~50 µs an attempt
            if not e.retryable or _counted(attempts) > retries:
                return Completion(None, attempts, str(e), _ms_since(started))
            await asyncio.sleep(_backoff(e, 1))

        def out_of_retries(state: RetryCallState) -> bool:
            return _counted(attempts) > retries

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return _backoff(error, state.attempt_number + 1)

        retrying = AsyncRetrying(stop=out_of_retries, wait=wait,
                                 retry=retry_if_exception(_retryable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    reply, url = await self._send(request, attempts, outage_timeout)
        except ProviderError as e:
            return Completion(None, attempts, str(e), _ms_since(started))
        return Completion(reply, attempts, None, _ms_since(started), url)

    async def _send(self, request: Request, attempts: list[dict[str, Any]],
                    outage_timeout: float) -> tuple[Reply, str]:
        async with self._slots:
            if self.auth_error:
                # one 401 says the key is wrong for every request: don't send thousands more
                raise ProviderError(self.auth_error, retryable=False, status=401)
            endpoint = await self.pool.acquire(outage_timeout)
            self.in_flight += 1
            self.requests += 1
            sent = time.perf_counter()
            try:
                reply = await self.provider.complete(request, endpoint.url)
            except ProviderError as e:
                attempt = {"endpoint": endpoint.url, "status": e.status, "error": str(e),
                           "latency_ms": _ms_since(sent)}
                if self.pool.release(endpoint, e):
                    e.endpoint_down = True
                    attempt["endpoint_down"] = True
                attempts.append(attempt)
                if e.status == 401:
                    self.auth_error = str(e)
                raise
            except BaseException:
                self.pool.release(endpoint)
                raise
            finally:
                self.in_flight -= 1
        self.pool.release(endpoint)
        attempts.append({"endpoint": endpoint.url, "status": 200, "error": None,
                         "latency_ms": _ms_since(sent)})
        return reply, endpoint.url

    async def close(self) -> None:
        await self.provider.close()


def _counted(attempts: list[dict[str, Any]]) -> int:
    """Attempts that use up retries: not those whose failure took their endpoint down."""
    return sum(1 for a in attempts if not a.get("endpoint_down"))


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)
