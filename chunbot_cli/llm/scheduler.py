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
`x-ratelimit-*` / `anthropic-ratelimit-*` headers, whichever is lower; a process that
is one of N Ray workers at the same model takes 1/N of it (`share`).
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
TRIAL_DECREASE = 0.5  # a cut for overload answers halves the limit, to see if they go
SAMPLE = 100  # overload answers are judged over at least this many replies
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
    _throttled: int = 0  # 429s in this window
    _replies: int = 0  # in this sample of replies, and of them overload answers:
    _overloads: int = 0  # judged once a sample has SAMPLE replies, at a window's end
    _trial: tuple[float, bool, float, float] | None = None  # what a cut for overload
    # answers changed, and their share it was made for; judged by the sample after next
    _trial_samples: int = 0
    answered: bool = False  # a reply has come: the limit is this limiter's own finding

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
        self.answered = True
        self._replies += 1
        if throttled:
            self._throttled += 1
            if not self._congested and self._throttled >= max(2, CONGESTION_SHARE * self._window):
                self._cut(DECREASE)
                return
        elif congested:
            self._overloads += 1
        else:
            self._count += 1
            self._latency_sum += latency
            if self.slow_start and self._full and self.limit < self.threshold:
                self.limit = min(MAX_LIMIT, self.limit + 1)
        if self._count + self._throttled + self._overloads >= self._window:
            self._close_window()

    def join(self, limit: float) -> None:
        """Start at `limit` — the share of the endpoint that others sending to it found
        (a Ray worker joining a run) — instead of slow start from INITIAL_LIMIT; from
        there, additive increase. Only before the first reply: after it, the limit is
        this limiter's own."""
        if self.pinned is None and not self.answered:
            self.limit = self._window = self.threshold = min(MAX_LIMIT, max(MIN_LIMIT, limit))
            self.slow_start = False

    def _cut(self, decrease: float) -> None:
        if not self._cut_before:
            self.threshold = max(MIN_LIMIT, self.limit * DECREASE)
        self.slow_start = False  # cut, and judge the new limit over a new window
        self.limit = max(MIN_LIMIT, self.limit * decrease)
        self._count, self._latency_sum, self._window = 0, 0.0, self.limit
        self._full, self._congested, self._throttled = False, True, 0

    def _judge_overloads(self) -> None:
        """Once a sample of SAMPLE replies or more is in: were its overload answers more
        than chance at the known noise? A cut for them is a trial: the limit is halved,
        and the sample after next (all of it sent at the new limit) says whether they
        went with it (overload: the cut stays) or not (noise: it is undone)."""
        replies, overloads = self._replies, self._overloads
        if replies < SAMPLE:
            return
        self._replies = self._overloads = 0
        share = overloads / replies
        if self._trial is not None:
            self._trial_samples -= 1
            if self._trial_samples:
                return  # the first sample after the cut answers requests sent before it
            limit, slow_start, threshold, before = self._trial
            self._trial = None
            if overloads >= max(1, replies * before - 2 * math.sqrt(replies * before
                                                                 * (1 - before))):
                # as many as before at half the load: they do not come with load
                self.noise = min(NOISE_MAX, max(self.noise, share))
                self.limit, self.slow_start, self.threshold = limit, slow_start, threshold
            return
        noise = self.noise
        expected = replies * noise + 3 * math.sqrt(replies * noise * (1 - noise)) + 1
        if overloads >= max(2, CONGESTION_SHARE * replies, expected if noise else 0):
            self._trial = (self.limit, self.slow_start, self.threshold, share)
            self._trial_samples = 2
            self._cut(TRIAL_DECREASE)
        elif noise:
            self.noise = min(NOISE_MAX, noise + 0.2 * (share - noise))
            if self.noise < 0.001:  # the errors have faded
                self.noise = 0.0

    def _close_window(self) -> None:
        mean = self._latency_sum / self._count if self._count else None
        congested = self._congested
        self._judge_overloads()
        if mean is None:  # not one answer in a whole window: a storm, or an outage
            self.slow_start = False
            self.limit = MIN_LIMIT  # start again from little, up to `threshold`
        elif congested or self._congested:
            pass  # cut in this window
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
        self._cut_before = congested or self._congested or mean is None
        self._count, self._latency_sum, self._window = 0, 0.0, self.limit
        self._full = self._congested = False
        self._throttled = 0


@dataclass
class Budget:
    """Units (requests or tokens) per minute; unlimited until a rate is known."""

    clock: Callable[[], float] = time.monotonic
    configured: float | None = None  # per minute, from the YAML
    announced: float | None = None  # per minute, from the server's headers
    rate: float | None = None  # per second, what is enforced
    share: float = 1.0  # of the rate that is this process's: 1/N with N Ray workers at it
    level: float = 0.0
    stamp: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._update()

    @property
    def behind(self) -> float:
        """Seconds of refill already promised to requests that sleep for it (0: nobody
        waits): whether, and how hard, this budget holds requests back now. Only reads."""
        if self.rate is None:
            return 0.0
        level = min(self.rate * BURST_S, self.level + (self.clock() - self.stamp) * self.rate)
        return max(0.0, -level / self.rate)

    @property
    def per_minute(self) -> tuple[float, str] | None:
        """The limit in force, as the YAML or the server gave it (before BUDGET_SHARE and
        `share`), and which one it is: "announced" or "configured"; None: unlimited."""
        if self.announced and (not self.configured
                               or self.announced * BUDGET_SHARE < self.configured):
            return self.announced, "announced"
        return (self.configured, "configured") if self.configured else None

    def announce(self, per_minute: float) -> None:
        if per_minute > 0 and per_minute != self.announced:
            self.announced = per_minute
            self._update()

    def _update(self) -> None:
        limits = [v for v in (self.configured, self.announced and self.announced * BUDGET_SHARE)
                  if v]
        if not limits:
            return
        rate = min(limits) * self.share / 60
        first = self.rate is None
        self._refill()
        self.rate = rate
        if first:
            self.level = rate * BURST_S

    def set_share(self, share: float) -> None:
        if share != self.share:
            self.share = share
            self._update()

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
