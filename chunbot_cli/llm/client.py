"""One model alias at run time: its provider, its endpoints, when requests may start, and
retries.

A request first waits for the alias's request and token budgets (scheduler.Budget), then
for room at an endpoint (endpoints.py, whose limits adapt: scheduler.Limiter). It holds
that room only while it is on the wire; the back-off before a retry happens outside it, so
records waiting to retry never block fresh ones.
Retries (tenacity) use exponential back-off with full jitter unless the server said when
to come back. What a failure costs depends on what it says:
  - a 429 is waiting, not failing: the whole model pauses for the announced time (its
    budgets held too), the limiter eases in after it, and the record's retries are not
    used — unless the model has answered nothing for `outage_timeout`;
  - a failure that took its endpoint down is the endpoint's, not the record's: it does
    not use up the record's retries, and the record waits for an endpoint instead
    (endpoints.py);
  - a server fault while the endpoint answers most requests is chance: the record tries
    again soon (a short jittered pause), and gets as many tries as make a run of random
    failures a one-in-a-million event (up to three times `retries`), so a flaky server
    loses nothing. That share of faults is measured on fresh requests (no fault yet):
    the retries of a request that keeps failing while others pass (a poisoned prompt)
    neither raise it nor take the endpoint out (endpoints.Tries), so such a record fails
    after its retries, in seconds, even when it is all that is left to send.
Every attempt is recorded for the trace.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ..config import ModelSpec
from .endpoints import EndpointPool, Tries, runs_of_chance
from .price import Spending, cost, price
from .scheduler import Budget
from .types import ProviderError, RateLimits, Reply, Request

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
CHANCE_BACKOFF_BASE_S = 0.05  # after a server fault of an endpoint that mostly answers
CHANCE_BACKOFF_CAP_S = 0.5
RETRY_EXTENSION = 3  # random failures may use up to this many times a record's retries
UNKNOWN_OUTPUT_TOKENS = 256  # what a reply may cost, for a cost cap, before any says


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


class ModelClient:
    def __init__(self, spec: ModelSpec, provider: Provider | None = None,
                 note: Callable[[str], None] = lambda text: None,
                 spending: Spending | None = None):
        self.spec = spec
        self.spending = spending  # the run's cost cap, if it has one
        self.provider = provider or make_provider(spec)
        self.pool = EndpointPool(spec.alias, spec.urls or (spec.provider,), spec.max_concurrency,
                                 note)
        self.request_budget = Budget(configured=spec.rpm)
        self.token_budget = Budget(configured=spec.tpm)
        self.tokens_per_char = 0.25  # learned from the usage replies report
        self.output_tokens = 0.0  # a reply's, on average: learned, for a cost cap
        self.requests = 0
        self.throttled = 0  # 429 answers
        self.faults = 0  # server faults: 5xx, timeouts, lost connections
        self.paused_until = 0.0  # after a 429, nobody sends before this (monotonic)
        self._pauses = 0  # pauses in a row with no answer between them
        self.last_answer = time.monotonic()  # of a reply that was no 429
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
        tries = Tries()  # what its endpoints learn of this request over its attempts
        started = time.perf_counter()
        try:
            reply, url = await self._send(request, attempts, tries, outage_timeout)
            return Completion(reply, attempts, None, _ms_since(started), url)
        except ProviderError as e:
            # the common case above stays out of tenacity, which costs ~50 µs an attempt
            if not e.retryable or self._spent(attempts, retries, outage_timeout):
                return Completion(None, attempts, self._why(e, attempts, outage_timeout),
                                  _ms_since(started))
            await asyncio.sleep(self._backoff(e, 1))

        def out_of_retries(state: RetryCallState) -> bool:
            return self._spent(attempts, retries, outage_timeout)

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return self._backoff(error, state.attempt_number + 1)

        retrying = AsyncRetrying(stop=out_of_retries, wait=wait,
                                 retry=retry_if_exception(_retryable), reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    reply, url = await self._send(request, attempts, tries, outage_timeout)
        except ProviderError as e:
            return Completion(None, attempts, self._why(e, attempts, outage_timeout),
                              _ms_since(started))
        return Completion(reply, attempts, None, _ms_since(started), url)

    def _spent(self, attempts: list[dict[str, Any]], retries: int,
               outage_timeout: float) -> bool:
        """Whether a record has used up its tries (see the module's docstring)."""
        last = attempts[-1] if attempts else {}
        if last.get("status") == 429:
            return time.monotonic() - self.last_answer > outage_timeout
        counted = sum(1 for a in attempts
                      if not a.get("endpoint_down") and a.get("status") != 429)
        chance = runs_of_chance(self.pool.fault_share) - 1
        return counted > max(retries, min(RETRY_EXTENSION * retries, chance))

    def _why(self, error: ProviderError, attempts: list[dict[str, Any]],
             outage_timeout: float) -> str:
        if error.status == 429 and error.retryable:
            return (f"rate limited (HTTP 429) with no answer from the model for over "
                    f"{outage_timeout:g}s (outage_timeout): {error}")
        tries = len(attempts)
        return f"{error} (after {tries} attempts)" if tries > 1 else str(error)

    def _backoff(self, error: BaseException | None, attempt_number: int) -> float:
        """Exponential back-off with full jitter, unless the server said when to come
        back; short when the endpoint answers most requests. After a 429 or an endpoint
        failure there is none: the model's pause or the endpoint pool is the wait."""
        base, cap = BACKOFF_BASE_S, BACKOFF_CAP_S
        if isinstance(error, ProviderError):
            if error.status == 429 or error.endpoint_down:
                return 0.0
            if error.retry_after is not None:
                return error.retry_after
            if error.server_fault and self.pool.fault_share < 0.5:
                base, cap = CHANCE_BACKOFF_BASE_S, CHANCE_BACKOFF_CAP_S
        return random.uniform(0, min(cap, base * 2 ** (attempt_number - 1)))

    def _pause(self, seconds: float | None) -> None:
        """A 429: no request of this model starts for `seconds` (or, when the server did
        not say, an exponential back-off over the pauses in a row)."""
        now = time.monotonic()
        if now >= self.paused_until:
            self._pauses += 1
        if seconds is None:
            seconds = random.uniform(0.5, 1) * min(BACKOFF_CAP_S,
                                                   BACKOFF_BASE_S * 2 ** self._pauses)
        self.paused_until = max(self.paused_until, now + seconds)
        self.request_budget.hold(seconds)
        self.token_budget.hold(seconds)

    async def _send(self, request: Request, attempts: list[dict[str, Any]], tries: Tries,
                    outage_timeout: float) -> tuple[Reply, str]:
        endpoint = await self.pool.acquire(outage_timeout)
        try:
            # paced after taking room, so requests queued for room never burst out unpaced
            estimate = await self._pace(request)
            reserved = await self._reserve(request)
        except BaseException:
            self.pool.release(endpoint)
            raise
        if self.auth_error:
            # one 401 says the key is wrong for every request: don't send thousands more
            self.pool.release(endpoint)
            self._settle_cost(reserved, None)
            raise ProviderError(self.auth_error, retryable=False, status=401)
        self.requests += 1
        self.pool.sending(endpoint)
        sent = time.perf_counter()
        try:
            reply = await self.provider.complete(request, endpoint.url)
        except ProviderError as e:
            latency = time.perf_counter() - sent
            self._settle_cost(reserved, None)
            self._learn(e.limits)
            attempt = {"endpoint": endpoint.name, "status": e.status, "error": str(e),
                       "latency_ms": round(latency * 1000, 2)}
            if self.pool.release(endpoint, e, latency, tries):
                e.endpoint_down = True
                attempt["endpoint_down"] = True
            attempts.append(attempt)
            if e.status == 429:
                self.throttled += 1
                self._pause(e.retry_after)
            else:
                self.last_answer = time.monotonic()
                if e.server_fault:
                    self.faults += 1
                elif e.status == 401:
                    self.auth_error = str(e)
            raise
        except BaseException:
            self.pool.release(endpoint, None, time.perf_counter() - sent)
            self._settle_cost(reserved, None)
            raise
        latency = time.perf_counter() - sent
        self._settle_cost(reserved, reply)
        self.pool.release(endpoint, None, latency, tries)
        self.last_answer = time.monotonic()
        self._pauses = 0
        self._learn(reply.limits)
        if estimate:
            self._settle(request, estimate, reply)
        attempts.append({"endpoint": endpoint.name, "status": 200, "error": None,
                         "latency_ms": round(latency * 1000, 2)})
        return reply, endpoint.name

    async def _pace(self, request: Request) -> int:
        """Wait until the budgets allow this request, and any pause a 429 asked for is
        over (holding room meanwhile, so that no more than the limit go out when it ends);
        returns its token estimate (0 when no token budget is known)."""
        while (pause := self.paused_until - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        wait = self.request_budget.reserve(1)
        estimate = 0
        if self.token_budget.rate is not None:
            estimate = self._prompt_tokens(request) + _most_tokens(request)
            wait = max(wait, self.token_budget.reserve(estimate))
        if wait > 0:
            await asyncio.sleep(wait)
        return estimate

    async def _reserve(self, request: Request) -> float:
        """Room under the run's cost cap for this request (raises CostCap when there is
        none)."""
        if self.spending is None:
            return 0.0
        most = self.most_cost(request)  # once: the replies that come meanwhile change it
        await self.spending.ready(most)
        return self.spending.reserve(most)

    def most_cost(self, request: Request) -> float:
        """What a request may cost, as far as can be told before it is sent: its prompt as
        estimated, and all the output it may generate."""
        output = _most_tokens(request) or self.output_tokens or UNKNOWN_OUTPUT_TOKENS
        return cost(self.spec.provider, self.spec.price, self._prompt_tokens(request), output)

    def _settle_cost(self, reserved: float, reply: Reply | None) -> None:
        if self.spending is None:
            return
        self.spending.settle(reserved, 0.0 if reply is None
                             else price(self.spec.provider, self.spec.price, reply))
        if reply is not None:  # a running mean, the first reply taken as it is
            self.output_tokens += (reply.output_tokens - self.output_tokens) * (
                0.1 if self.output_tokens else 1.0)

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


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _chars(request: Request) -> int:
    return sum(len(m["content"]) for m in request.messages if isinstance(m.get("content"), str))


def _most_tokens(request: Request) -> int:
    """What a request may generate: vendors count it against a token limit up front."""
    return request.params.get("max_tokens") or request.params.get("max_completion_tokens") or 0
