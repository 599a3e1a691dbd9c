"""One model alias at run time: its provider, its endpoints, when requests may start, and
retries.

A request first waits for the alias's request and token budgets (scheduler.Budget), then
for room at an endpoint (endpoints.py, whose limits adapt: scheduler.Limiter). It holds
that room only while it is on the wire; the back-off before a retry happens outside it, so
records waiting to retry never block fresh ones.
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
from .scheduler import Budget
from .types import ProviderError, RateLimits, Reply, Request

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
        self.pool = EndpointPool(spec.alias, spec.urls or (spec.provider,), spec.max_concurrency,
                                 note)
        self.request_budget = Budget(configured=spec.rpm)
        self.token_budget = Budget(configured=spec.tpm)
        self.tokens_per_char = 0.25  # learned from the usage replies report
        self.requests = 0
        self.throttled = 0  # 429 answers
        self.auth_error: str | None = None
        self._rate_mark = (time.monotonic(), 0, 0.0)  # when, requests then, rate then

    @property
    def limit(self) -> int:
        return self.pool.limit

    @property
    def in_flight(self) -> int:
        return self.pool.on_wire

    @property
    def ceiling(self) -> int:
        return self.pool.ceiling

    def request_rate(self) -> float:
        """Requests sent per second lately (over at least the last second)."""
        then, count, rate = self._rate_mark
        now = time.monotonic()
        if now - then >= 1.0:
            rate = (self.requests - count) / (now - then)
            self._rate_mark = (now, self.requests, rate)
        elif not rate and now > then:  # the first second: the rate so far
            return (self.requests - count) / (now - then)
        return rate

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
        endpoint = await self.pool.acquire(outage_timeout)
        try:
            # paced after taking room, so requests queued for room never burst out unpaced
            estimate = await self._pace(request)
        except BaseException:
            self.pool.release(endpoint)
            raise
        if self.auth_error:
            # one 401 says the key is wrong for every request: don't send thousands more
            self.pool.release(endpoint)
            raise ProviderError(self.auth_error, retryable=False, status=401)
        self.requests += 1
        self.pool.sending(endpoint)
        sent = time.perf_counter()
        try:
            reply = await self.provider.complete(request, endpoint.url)
        except ProviderError as e:
            latency = time.perf_counter() - sent
            self._learn(e.limits)
            attempt = {"endpoint": endpoint.url, "status": e.status, "error": str(e),
                       "latency_ms": round(latency * 1000, 2)}
            if self.pool.release(endpoint, e, latency):
                e.endpoint_down = True
                attempt["endpoint_down"] = True
            attempts.append(attempt)
            if e.status == 429:
                self.throttled += 1
            elif e.status == 401:
                self.auth_error = str(e)
            raise
        except BaseException:
            self.pool.release(endpoint, None, time.perf_counter() - sent)
            raise
        latency = time.perf_counter() - sent
        self.pool.release(endpoint, None, latency)
        self._learn(reply.limits)
        if estimate:
            self._settle(request, estimate, reply)
        attempts.append({"endpoint": endpoint.url, "status": 200, "error": None,
                         "latency_ms": round(latency * 1000, 2)})
        return reply, endpoint.url

    async def _pace(self, request: Request) -> int:
        """Wait until the budgets allow this request; returns its token estimate (0 when no
        token budget is known)."""
        wait = self.request_budget.reserve(1)
        estimate = 0
        if self.token_budget.rate is not None:
            estimate = self._prompt_tokens(request) + _most_tokens(request)
            wait = max(wait, self.token_budget.reserve(estimate))
        if wait > 0:
            await asyncio.sleep(wait)
        return estimate

    def _prompt_tokens(self, request: Request) -> int:
        """What the prompt will count, from its length, before the server says."""
        return int(_chars(request) * self.tokens_per_char) + 4 * len(request.messages)

    def _settle(self, request: Request, estimate: int, reply: Reply) -> None:
        """The reply's usage says what the prompt really cost: settle the difference with
        the token budget and learn the ratio of tokens to characters."""
        if not reply.input_tokens:
            return
        chars = _chars(request)
        if chars:
            ratio = max(0, reply.input_tokens - 4 * len(request.messages)) / chars
            self.tokens_per_char += 0.05 * (ratio - self.tokens_per_char)
        self.token_budget.refund(estimate - _most_tokens(request) - reply.input_tokens)

    def _learn(self, limits: RateLimits | None) -> None:
        if limits is None:
            return
        if limits.requests:
            self.request_budget.announce(limits.requests)
        if limits.tokens:
            self.token_budget.announce(limits.tokens)

    async def close(self) -> None:
        await self.provider.close()


def _counted(attempts: list[dict[str, Any]]) -> int:
    """Attempts that use up retries: not those whose failure took their endpoint down."""
    return sum(1 for a in attempts if not a.get("endpoint_down"))


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _chars(request: Request) -> int:
    return sum(len(m["content"]) for m in request.messages if isinstance(m.get("content"), str))


def _most_tokens(request: Request) -> int:
    """What a request may generate: vendors count it against a token limit up front."""
    return request.params.get("max_tokens") or request.params.get("max_completion_tokens") or 0
