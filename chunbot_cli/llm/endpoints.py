"""The endpoints of one model alias: which one a request goes to, when, and which are down.

Each endpoint has its own adaptive concurrency limit (scheduler.Limiter); a request goes
to the endpoint with the fewest requests in flight among those below their limit (ties
in turn), and waits in line when all are full.

A server fault (5xx, timeout, dropped connection) is either the request's or the
endpoint's. It is the request's when the request fails alone: it hung while requests sent
after it were answered, or it had failed at this endpoint before and the endpoint has
answered others since (a poisoned prompt; from then on, its faults at any endpoint are its
own, but for failing to connect: `Tries`). Such faults use the record's retries and say
nothing of the endpoint: they are no streak, no share of faults, no failed probe, even
when the poisoned requests are all that is left to send. (Poisoned requests that never
failed while others were answered, say the last ones of the input all at once, do look
like an outage: different prompts failing, nothing answered.) An
endpoint is taken out when it cannot be reached at all, or after a streak of server
faults of different requests that do not fail alone, each sent after the last request
that was answered: FAILURE_STREAK, or more when the endpoint fails a share of fresh
requests (those with no fault yet) at random anyway (as many as make such a streak a
one-in-a-million chance). It stays out for a cool-down that doubles with each failed probe
(1 s … 30 s), then a single request is let through as a probe, and its success puts the
endpoint back.

While every endpoint is down, requests wait instead of failing, so a restarted server or
a short outage costs a pause, not records. The wait is bounded: once everything has been
down for longer than a stage's `outage_timeout`, its requests fail (they land in
errors.jsonl and `rerun --failed` sends them later).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..config import redact_url
from .scheduler import Limiter
from .types import ProviderError

FAILURE_STREAK = 5
STREAK_MAX = 30
UNLIKELY = 1e-6  # a run of random failures this improbable is no longer chance
FAULT_SHARE_WEIGHT = 0.02  # of each reply in the running share of server faults
COOLDOWN_MIN_S = 1.0
COOLDOWN_MAX_S = 30.0
NOTE_EVERY_S = 30.0  # outage messages: one when it starts, one when it ends, reminders


def runs_of_chance(share: float) -> int:
    """How many failures in a row it takes before a run of them, at this share of random
    failures, is a one-in-a-million chance."""
    if share <= 0:
        return 0
    if share >= 1:
        return STREAK_MAX
    return math.ceil(math.log(UNLIKELY) / math.log(share))


@dataclass
class Endpoint:
    url: str
    limiter: Limiter = field(default_factory=Limiter)
    name: str = ""  # the URL as traces and messages show it: without credentials
    in_flight: int = 0  # requests holding room here: on the wire or pacing to go
    on_wire: int = 0
    streak: set[object] = field(default_factory=set)  # requests failing since the last success
    streak_limit: int = FAILURE_STREAK  # as many as take the endpoint out
    fault_share: float = 0.0  # of recent replies to fresh requests, server faults
    answers: int = 0  # replies that were no server fault, ever
    answered_sent: float = float("-inf")  # when the latest answered request was sent
    down: bool = False
    down_until: float = 0.0  # when the next probe may go
    cooldown: float = 0.0
    probing: bool = False
    last_error: str = ""

    def answered(self, sent: float) -> None:
        self.streak.clear()
        self.answers += 1
        self.answered_sent = max(self.answered_sent, sent)

    def streak_full(self, request: object) -> bool:
        """Count a fault of `request` in the streak; whether that takes the endpoint out."""
        if not self.streak:  # what chance explains is judged from before the streak
            self.streak_limit = max(FAILURE_STREAK,
                                    min(STREAK_MAX, runs_of_chance(self.fault_share)))
        self.streak.add(request)
        return len(self.streak) >= self.streak_limit


@dataclass(eq=False)
class Tries:
    """One request over all its attempts (its client keeps one and passes it to every
    release): whether its faults are its own."""

    faults: int = 0  # server faults so far
    fault_at: Endpoint | None = None  # where the latest one was
    answers_then: int = 0  # what that endpoint had answered by then
    alone: bool = False  # it failed again after others were answered: for good

    def failed_alone(self, endpoint: Endpoint) -> bool:
        """Count a server fault at `endpoint`; whether the request fails alone."""
        if self.fault_at is endpoint and endpoint.answers > self.answers_then:
            # sticky: at the end of a run a poisoned prompt may be all that is still sent,
            # so that nothing is answered between its last faults
            self.alone = True
        self.faults += 1
        self.fault_at, self.answers_then = endpoint, endpoint.answers
        return self.alone


class EndpointPool:
    def __init__(self, alias: str, urls: tuple[str, ...], max_concurrency: int | None = None,
                 note: Callable[[str], None] = lambda text: None,
                 clock: Callable[[], float] = time.monotonic):
        self.alias = alias
        self.endpoints = [Endpoint(url, Limiter(max_concurrency, clock), redact_url(url))
                          for url in urls]
        self.cap = max_concurrency  # pinned: for the whole alias, not each endpoint
        self.note = note
        self.clock = clock
        self.in_flight = 0
        self.on_wire = 0
        self.all_down_since: float | None = None
        self.fault_share = 0.0  # of recent replies over all endpoints, server faults
        self._noted: dict[str, float] = {}  # when each outage message was last given
        self._told: set[str] = set()  # outages told whose end is not told yet
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

    @property
    def waiting(self) -> int:
        """Requests in line for room: the limit is what holds them back (for the display;
        counts the line, so it is not for a request's path)."""
        return sum(1 for waiter in self._waiters if not waiter.done())

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
        since = self.all_down_since or now
        deadline = since + outage_timeout
        self._tell("down", f"model {self.alias!r}: every endpoint is still down after "
                           f"{_seconds(now - since)}; records wait up to {_seconds(outage_timeout)}"
                           " (outage_timeout)", remind=True)
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
                latency: float | None = None, request: Tries | None = None) -> bool:
        """Record how a request ended (`latency` None: it was never sent; `request`, the
        same for every attempt of one request); True when the endpoint is down after it,
        i.e. the failure was the endpoint's and should not count against the record's
        retries."""
        endpoint.in_flight -= 1
        self.in_flight -= 1
        if latency is not None:
            endpoint.on_wire -= 1
            self.on_wire -= 1
            endpoint.limiter.finished(latency, error is not None and error.overload,
                                      error is not None and error.status == 429)
        try:
            sent = self.clock() - (latency or 0.0)
            return self._judge(endpoint, error, request or Tries(), sent)
        finally:
            self._hand_over()

    def _judge(self, endpoint: Endpoint, error: ProviderError | None, request: Tries,
               sent: float) -> bool:
        was_probe, endpoint.probing = endpoint.probing, False
        fault = error is not None and error.server_fault
        # 4xx and 429 say nothing of the endpoint's health; the retries of a failing request
        # would make its own faults look like the endpoint's share of chance
        if (error is None or fault) and not request.faults:
            endpoint.fault_share += FAULT_SHARE_WEIGHT * (fault - endpoint.fault_share)
            self.fault_share += FAULT_SHARE_WEIGHT * (fault - self.fault_share)
        if not fault:
            endpoint.answered(sent)
            if endpoint.down:
                self._up(endpoint)
            return False
        assert error is not None
        if request.failed_alone(endpoint) and not error.unreachable:
            return False  # its own fault; as a probe it told nothing: the next one may go
        endpoint.last_error = str(error)
        if sent < endpoint.answered_sent and not endpoint.down:
            return False  # a request sent after it was answered: it failed alone (it hung)
        if endpoint.down:
            if was_probe:
                endpoint.cooldown = min(COOLDOWN_MAX_S, endpoint.cooldown * 2)
                endpoint.down_until = self.clock() + endpoint.cooldown
            return True
        if error.unreachable or endpoint.streak_full(request):
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
            self._tell("down", f"model {self.alias!r}: every endpoint is down "
                               f"({endpoint.name}: {endpoint.last_error}); records wait for "
                               "one to come back")
        else:
            self._tell(endpoint.url, f"model {self.alias!r}: {endpoint.name} is down "
                                     f"({endpoint.last_error}); sending to the others, probing "
                                     "it again in a while")

    def _up(self, endpoint: Endpoint) -> None:
        endpoint.down = False
        endpoint.cooldown = 0.0
        self.all_down_since = None
        for topic in ("down", endpoint.url):  # the end of an outage that was told
            if topic in self._told:
                self._told.discard(topic)
                self.note(f"model {self.alias!r}: {endpoint.name} answers again")
                break

    def _tell(self, topic: str, text: str, remind: bool = False) -> None:
        """Say that something is down, unless it was said in the last NOTE_EVERY_S (an
        endpoint that flaps is one outage, not a message a second); `remind`: only as a
        reminder, that long after the last message."""
        now = self.clock()
        last = self._noted.get(topic)
        if (last is None and not remind) or (last is not None and now - last >= NOTE_EVERY_S):
            self._noted[topic] = now
            self._told.add(topic)
            self.note(text)

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
        return "; ".join(f"{e.name}: {e.last_error}" for e in self.endpoints if e.last_error)


def _seconds(value: float) -> str:
    return f"{value / 60:g}m" if value >= 60 else f"{value:g}s"
