"""The endpoints of one model alias: which one a request goes to, when, and which are down.

Each endpoint has its own adaptive concurrency limit (scheduler.Limiter); a request goes
to the endpoint with the fewest requests in flight among those below their limit (ties
in turn), and waits in line when all are full. An
endpoint is taken out when it cannot be reached at all, or after FAILURE_STREAK server
faults in a row (5xx, timeouts, dropped connections); it stays out for a cool-down that
doubles with each failed probe (1 s … 30 s), then a single request is let through as a
probe, and its success puts the endpoint back.

While every endpoint is down, requests wait instead of failing, so a restarted server or
a short outage costs a pause, not records. The wait is bounded: once everything has been
down for longer than a stage's `outage_timeout`, its requests fail (they land in
errors.jsonl and `rerun --failed` sends them later).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .scheduler import Limiter
from .types import ProviderError

FAILURE_STREAK = 5
COOLDOWN_MIN_S = 1.0
COOLDOWN_MAX_S = 30.0


@dataclass
class Endpoint:
    url: str
    limiter: Limiter = field(default_factory=Limiter)
    in_flight: int = 0  # requests holding room here: on the wire or pacing to go
    on_wire: int = 0
    streak: int = 0  # server faults in a row
    down: bool = False
    down_until: float = 0.0  # when the next probe may go
    cooldown: float = 0.0
    probing: bool = False
    last_error: str = ""


class EndpointPool:
    def __init__(self, alias: str, urls: tuple[str, ...], max_concurrency: int | None = None,
                 note: Callable[[str], None] = lambda text: None,
                 clock: Callable[[], float] = time.monotonic):
        self.alias = alias
        self.endpoints = [Endpoint(url, Limiter(max_concurrency, clock)) for url in urls]
        self.cap = max_concurrency  # pinned: for the whole alias, not each endpoint
        self.note = note
        self.clock = clock
        self.in_flight = 0
        self.on_wire = 0
        self.all_down_since: float | None = None
        self._turn = 0
        self._waiters: deque[asyncio.Future[Endpoint | None]] = deque()

    @property
    def limit(self) -> int:
        """Requests that may be in flight now, over the endpoints that are up."""
        total = sum(int(e.limiter.limit) for e in self.endpoints if not e.down)
        return min(total, self.cap) if self.cap else total

    @property
    def ceiling(self) -> int:
        """The most requests that may ever be in flight."""
        return self.cap or sum(e.limiter.ceiling for e in self.endpoints)

    def pick(self) -> Endpoint | None:
        """The endpoint for the next request, or None when all are full, or down with no
        probe due. Counts the request as in flight there."""
        if self.cap is not None and self.in_flight >= self.cap:
            return None
        endpoints, count = self.endpoints, len(self.endpoints)
        best = None
        for offset in range(count):
            endpoint = endpoints[(self._turn + offset) % count]
            if endpoint.down:
                if not endpoint.probing and self.clock() >= endpoint.down_until:
                    endpoint.probing = True  # its cool-down is over: this request probes it
                    best = endpoint
                    break
            elif (endpoint.in_flight < endpoint.limiter.limit
                  and (best is None or endpoint.in_flight < best.in_flight)):
                best = endpoint
        self._turn += 1
        if best is not None:
            best.in_flight += 1
            self.in_flight += 1
        return best

    def sending(self, endpoint: Endpoint) -> None:
        """The request that holds room at `endpoint` goes on the wire now."""
        endpoint.on_wire += 1
        self.on_wire += 1
        endpoint.limiter.started(endpoint.on_wire)

    async def acquire(self, outage_timeout: float) -> Endpoint:
        """Wait for an endpoint with room; raises a non-retryable ProviderError once every
        endpoint has been down for `outage_timeout` seconds.

        Waiting requests form a line: a release hands its room straight to the first one,
        and newcomers don't pass them, so nobody is woken only to find the room gone."""
        if not self._waiters:
            endpoint = self.pick()
            if endpoint is not None:
                return endpoint
        while True:
            waiter: asyncio.Future[Endpoint | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                if not self._all_down():
                    endpoint = await waiter
                else:
                    endpoint = await self._wait_out_outage(waiter, outage_timeout)
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result())  # handed over just as we were cancelled
                raise
            if endpoint is None:  # roused to look again: everything went down, or a probe is due
                endpoint = self.pick()
            if endpoint is not None:
                return endpoint

    async def _wait_out_outage(self, waiter: asyncio.Future[Endpoint | None],
                               outage_timeout: float) -> Endpoint | None:
        now = self.clock()
        deadline = (self.all_down_since or now) + outage_timeout
        if now >= deadline:
            waiter.cancel()
            raise ProviderError(
                f"every endpoint has been down for over {_seconds(outage_timeout)} "
                f"(outage_timeout); last error: {self._last_errors()}", retryable=False)
        next_probe = min((e.down_until for e in self.endpoints if not e.probing),
                         default=deadline)
        try:
            return await asyncio.wait_for(waiter, max(0.001, min(deadline, next_probe) - now))
        except asyncio.TimeoutError:
            return None

    def _all_down(self) -> bool:
        return all(e.down for e in self.endpoints)

    def release(self, endpoint: Endpoint, error: ProviderError | None = None,
                latency: float | None = None) -> bool:
        """Record how a request ended (`latency` None: it was never sent); True when the
        endpoint is down after it, i.e. the failure was the endpoint's and should not
        count against the record's retries."""
        endpoint.in_flight -= 1
        self.in_flight -= 1
        if latency is not None:
            endpoint.on_wire -= 1
            self.on_wire -= 1
            endpoint.limiter.finished(latency, error is not None and error.congestion)
        try:
            return self._judge(endpoint, error)
        finally:
            self._hand_over()

    def _judge(self, endpoint: Endpoint, error: ProviderError | None) -> bool:
        was_probe, endpoint.probing = endpoint.probing, False
        if error is None or not error.server_fault:
            endpoint.streak = 0
            if endpoint.down:
                self._up(endpoint)
            return False
        endpoint.streak += 1
        endpoint.last_error = str(error)
        if endpoint.down:
            if was_probe:
                endpoint.cooldown = min(COOLDOWN_MAX_S, endpoint.cooldown * 2)
                endpoint.down_until = self.clock() + endpoint.cooldown
            return True
        if error.unreachable or endpoint.streak >= FAILURE_STREAK:
            self._down(endpoint)
            return True
        return False

    def _down(self, endpoint: Endpoint) -> None:
        endpoint.down = True
        endpoint.cooldown = COOLDOWN_MIN_S
        endpoint.down_until = self.clock() + endpoint.cooldown
        if self._all_down():
            self.all_down_since = self.clock()
            self._rouse_all()  # from waiting for room to waiting out an outage
            self.note(f"model {self.alias!r}: every endpoint is down ({endpoint.url}: "
                      f"{endpoint.last_error}); records wait for one to come back")
        else:
            self.note(f"model {self.alias!r}: {endpoint.url} is down ({endpoint.last_error}); "
                      "sending to the others, probing it again in a while")

    def _up(self, endpoint: Endpoint) -> None:
        endpoint.down = False
        endpoint.cooldown = 0.0
        self.all_down_since = None
        self.note(f"model {self.alias!r}: {endpoint.url} answers again")

    def _hand_over(self) -> None:
        """Give free room to the requests waiting in line, first come first served."""
        waiters = self._waiters
        while waiters:
            if waiters[0].done():  # its request gave up waiting
                waiters.popleft()
                continue
            endpoint = self.pick()
            if endpoint is None:
                return
            waiters.popleft().set_result(endpoint)

    def _rouse_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _last_errors(self) -> str:
        return "; ".join(f"{e.url}: {e.last_error}" for e in self.endpoints if e.last_error)


def _seconds(value: float) -> str:
    return f"{value / 60:g}m" if value >= 60 else f"{value:g}s"
