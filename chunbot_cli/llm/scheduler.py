"""When requests may start: an adaptive concurrency limit per endpoint, and request and
token budgets per model.

`Limiter` finds how many requests an endpoint sustains, so users never tune a semaphore.
It is TCP congestion control applied to requests: slow start, then additive increase and
multiplicative decrease, with a Vegas-like latency check. Samples are judged a window
at a time, a window being about one round trip (as many replies as the limit):
  - congestion — 429, 503, 529, 504 or timeouts, at least 2 of them and 5% of a window's
    replies — cuts the limit to 70% at once, at most once a window, and ends slow start
    (a server that throws the odd random 503 is not overloaded; an overloaded one answers
    with many);
  - latency inflation — the window's mean latency over twice the long-run baseline —
    means requests queue at the server without more getting done: the limit drops to 90%;
  - otherwise, while the limit is full, it grows: in slow start by one with every reply
    (doubling per round trip, but smoothly, so requests don't go out in bursts), after it
    by √limit per window (about 10% at 100 in flight, 3% at 1,000); a limit that is never
    reached is left alone, since more room would not be used.
The baseline follows the latency down at once and up slowly, so longer replies that
arrive with more load are not mistaken for queueing. `max_concurrency: N` pins the limit.

`Budget` is a requests- or tokens-per-minute limit as a token bucket with reservations:
taking more than is there reserves future refill, and the taker sleeps until then, which
paces requests evenly at 98% of the limit instead of bursting into 429s. Its rate comes
from `rpm` / `tpm` in the YAML and from the limits a server announces in its
`x-ratelimit-*` / `anthropic-ratelimit-*` headers, whichever is lower.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

INITIAL_LIMIT = 16
MIN_LIMIT = 4
MAX_LIMIT = 2048
DECREASE = 0.7
CONGESTION_SHARE = 0.05  # of a window's replies, and at least 2, before a cut
INFLATION = 2.0
INFLATION_DECREASE = 0.9
BUDGET_SHARE = 0.98  # of an announced limit: clocks and counting differ a little
BURST_S = 0.5  # a budget holds this many seconds of its rate


@dataclass
class Limiter:
    pinned: int | None = None
    clock: Callable[[], float] = time.monotonic
    limit: float = INITIAL_LIMIT
    slow_start: bool = True
    baseline: float | None = None  # long-run latency, seconds
    _window: float = INITIAL_LIMIT  # replies that make a window: the limit when it began
    _count: int = 0
    _latency_sum: float = 0.0
    _full: bool = False
    _congested: bool = False
    _signs: int = 0  # congestion answers in this window

    def __post_init__(self) -> None:
        if self.pinned is not None:
            self.limit = self.pinned

    @property
    def ceiling(self) -> int:
        """The most requests this endpoint may ever have in flight."""
        return self.pinned or MAX_LIMIT

    def started(self, in_flight: int) -> None:
        """A request was sent with `in_flight` requests now on the wire."""
        if in_flight >= int(self.limit):
            self._full = True

    def finished(self, latency: float, congested: bool = False) -> None:
        """A request ended after `latency` seconds; `congested` when the endpoint said it
        was overloaded or rate limited, or did not answer in time."""
        if self.pinned is not None:
            return
        if congested:
            self._signs += 1
            if not self._congested and self._signs >= max(2, CONGESTION_SHARE * self._window):
                self.slow_start = False  # cut, and judge the new limit over a new window
                self.limit = max(MIN_LIMIT, self.limit * DECREASE)
                self._count, self._latency_sum, self._window = 0, 0.0, self.limit
                self._full, self._congested, self._signs = False, True, 0
            return
        self._count += 1
        self._latency_sum += latency
        if self.slow_start and self._full:
            self.limit = min(MAX_LIMIT, self.limit + 1)
        if self._count >= self._window:
            self._close_window()

    def _close_window(self) -> None:
        mean = self._latency_sum / self._count
        if self._congested:
            pass  # already cut in this window
        elif self.baseline is not None and mean > INFLATION * self.baseline:
            self.slow_start = False
            self.limit = max(MIN_LIMIT, self.limit * INFLATION_DECREASE)
        elif self._full and not self.slow_start:
            self.limit = min(MAX_LIMIT, self.limit + math.sqrt(self.limit))
        if self.baseline is None or mean < self.baseline:
            self.baseline = mean
        else:
            self.baseline += 0.05 * (mean - self.baseline)
        self._count, self._latency_sum, self._window = 0, 0.0, self.limit
        self._full = self._congested = False
        self._signs = 0


@dataclass
class Budget:
    """Units (requests or tokens) per minute; unlimited until a rate is known."""

    clock: Callable[[], float] = time.monotonic
    configured: float | None = None  # per minute, from the YAML
    announced: float | None = None  # per minute, from the server's headers
    rate: float | None = None  # per second, what is enforced
    level: float = 0.0
    stamp: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._update()

    def announce(self, per_minute: float) -> None:
        if per_minute > 0 and per_minute != self.announced:
            self.announced = per_minute
            self._update()

    def _update(self) -> None:
        limits = [v for v in (self.configured, self.announced and self.announced * BUDGET_SHARE)
                  if v]
        if not limits:
            return
        rate = min(limits) / 60
        first = self.rate is None
        self._refill()
        self.rate = rate
        if first:
            self.level = rate * BURST_S

    def _refill(self) -> None:
        now = self.clock()
        if self.rate is not None:
            self.level = min(self.rate * BURST_S, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def reserve(self, amount: float) -> float:
        """Take `amount`; returns the seconds to wait before using it (0 when it is there)."""
        if self.rate is None:
            return 0.0
        self._refill()
        self.level -= amount
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def refund(self, amount: float) -> None:
        """Give back what an estimate took too much (or take what it took too little)."""
        if self.rate is not None:
            self.level += amount

    def hold(self, seconds: float) -> None:
        """The server says nothing is left for `seconds`: nobody starts before then."""
        if self.rate is not None:
            self._refill()
            self.level = min(self.level, -seconds * self.rate)
