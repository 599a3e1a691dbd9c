"""When requests may start: an adaptive concurrency limit per endpoint, and request and
token budgets per model.

`Limiter` finds how many requests an endpoint sustains, so users never tune a semaphore.
It is TCP congestion control applied to requests: slow start, then additive increase and
multiplicative decrease, with a Vegas-like latency check. Samples are judged a window
at a time, a window being about one round trip (as many replies as the limit):
  - congestion cuts the limit to 70% at once, at most once a window, and ends slow start.
    A 429 always says so (at least 2 of them and 5% of a window's replies). Overload
    answers — 503, 529, 504, timeouts — say so only when they grow with load: a server
    that fails a steady share of requests at random is not overloaded, and cutting would
    only slow the run. So such a cut is on probation: when the window after it shows as
    large a share of them at the lower limit, they were noise; the cut is undone, and
    their share (`noise`) is expected from then on — only a share beyond what chance
    gives over that (three standard deviations) counts. It fades when the errors do;
  - latency inflation — the window's mean latency over twice the long-run baseline —
    means requests queue at the server without more getting done: the limit drops to 90%;
  - otherwise, while the limit is full, it grows: in slow start by one with every reply
    (doubling per round trip, but smoothly, so requests don't go out in bursts), after it
    by √limit per window (about 10% at 100 in flight, 3% at 1,000); a limit that is never
    reached is left alone, since more room would not be used. After a run of congested
    windows (a 429 storm) slow start resumes up to the limit the first cut left
    (`threshold`, TCP's ssthresh), so the rate comes back in a few round trips, gently.
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
NOISE_CLEARED = 0.6  # a cut that leaves this much of the share it was made for: noise
NOISE_MAX = 0.5  # the largest share of errors believed to be chance
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
    threshold: float = MAX_LIMIT  # slow start stops here
    baseline: float | None = None  # long-run latency, seconds
    noise: float = 0.0  # share of overload answers that comes whatever the load
    _window: float = INITIAL_LIMIT  # replies that make a window: the limit when it began
    _count: int = 0  # replies in this window that were no congestion sign
    _latency_sum: float = 0.0
    _full: bool = False
    _congested: bool = False  # cut in this window
    _cut_before: bool = False  # cut in the window before
    _signs: int = 0  # congestion answers in this window
    _overloads: int = 0  # of them, overload answers (not 429s)
    _probation: tuple[float, bool, float] | None = None  # limit, slow start, share before a cut

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

    def finished(self, latency: float, congested: bool = False,
                 throttled: bool = False) -> None:
        """A request ended after `latency` seconds; `congested` when the endpoint said it
        was overloaded or did not answer in time, `throttled` when it rate limited (429)."""
        if self.pinned is not None:
            return
        if congested or throttled:
            self._signs += 1
            self._overloads += not throttled
            if not self._congested and self._signs >= self._cut_at():
                self._cut()
                return
        else:
            self._count += 1
            self._latency_sum += latency
            if self.slow_start and self._full and self.limit < self.threshold:
                self.limit = min(MAX_LIMIT, self.limit + 1)
        if self._count + self._signs >= self._window:
            self._close_window()

    def _cut_at(self) -> float:
        """Congestion answers in this window that mean overload: more than chance gives
        at the share of noise known, counting 429s always."""
        window, noise = self._window, self.noise
        throttled = self._signs - self._overloads
        expected = window * noise + 3 * math.sqrt(window * noise * (1 - noise)) + 1 \
            if noise else 0.0
        if throttled and self._overloads <= expected:
            return max(2, CONGESTION_SHARE * window)  # the 429s decide
        return max(2, CONGESTION_SHARE * window, expected + throttled)

    def _cut(self) -> None:
        replies = self._count + self._signs
        if self._overloads == self._signs and self._probation is None:
            self._probation = (self.limit, self.slow_start, self._signs / max(1, replies))
        if not self._cut_before:
            self.threshold = max(MIN_LIMIT, self.limit * DECREASE)
        self.slow_start = False  # cut, and judge the new limit over a new window
        self.limit = max(MIN_LIMIT, self.limit * DECREASE)
        self._count, self._latency_sum, self._window = 0, 0.0, self.limit
        self._full, self._congested, self._signs, self._overloads = False, True, 0, 0

    def _close_window(self) -> None:
        share = self._overloads / (self._count + self._signs)
        if self._probation is not None and not self._congested:
            limit, slow_start, before = self._probation
            self._probation = None
            if self._count and share >= NOISE_CLEARED * before:  # the cut did not clear them
                self.noise = min(NOISE_MAX, max(self.noise, share))
                self.limit, self.slow_start = limit, slow_start
        elif share < self.noise:
            self.noise += 0.2 * (share - self.noise)  # the errors fade: expect fewer
            if self.noise < 0.001:
                self.noise = 0.0
        mean = self._latency_sum / self._count if self._count else None
        if mean is None:  # not one answer in a whole window: a storm, or an outage
            self.slow_start = False
            self.limit = MIN_LIMIT  # start again from little, up to `threshold`
        elif self._congested:
            pass  # already cut in this window
        elif self.baseline is not None and mean > INFLATION * self.baseline:
            self.slow_start = False
            self.limit = max(MIN_LIMIT, self.limit * INFLATION_DECREASE)
        elif self._full and not self.slow_start:
            if self.limit < self.threshold:
                self.slow_start = True  # back from a storm: quickly up to where it was
            else:
                self.limit = min(MAX_LIMIT, self.limit + math.sqrt(self.limit))
        if self.slow_start and self.limit >= self.threshold:
            self.slow_start = False
        if mean is None:
            pass
        elif self.baseline is None or mean < self.baseline:
            self.baseline = mean
        else:
            self.baseline += 0.05 * (mean - self.baseline)
        self._cut_before = self._congested
        self._count, self._latency_sum, self._window = 0, 0.0, self.limit
        self._full = self._congested = False
        self._signs = self._overloads = 0


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
