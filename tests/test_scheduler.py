"""llm/scheduler.py: the adaptive concurrency limit and the per-minute budgets, on a fake clock."""

from __future__ import annotations

import math
import random
from typing import Callable

import pytest

from chunbot_cli.llm.scheduler import (BUDGET_SHARE, INITIAL_LIMIT, MAX_LIMIT, MIN_LIMIT, Budget,
                                       Limiter)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(limiter: Limiter, latency: float = 0.3, full: bool = True) -> None:
    """One round trip's worth of replies, the endpoint kept full (or not)."""
    for _ in range(math.ceil(limiter.limit)):
        limiter.started(int(limiter.limit) if full else 1)
        limiter.finished(latency)


def test_slow_start_doubles_the_limit_each_full_window_up_to_the_maximum():
    limiter = Limiter()
    seen = [limiter.limit]
    for _ in range(10):
        window(limiter)
        seen.append(limiter.limit)
    assert seen[:5] == [INITIAL_LIMIT, 32, 64, 128, 256]
    assert seen[-1] == MAX_LIMIT


def test_a_limiter_joining_others_starts_at_its_share_then_grows_additively():
    joined = Limiter()
    joined.join(100.0)  # what the other workers at this endpoint found, over their number
    assert joined.limit == 100 and not joined.slow_start
    window(joined)
    assert joined.limit == 110  # + sqrt(limit) a full window, not doubling
    joined.join(500.0)  # after a reply, its limit is its own
    assert joined.limit == 110
    pinned = Limiter(pinned=8)
    pinned.join(100.0)
    assert pinned.limit == 8


def test_a_window_that_never_fills_the_limit_leaves_it_alone():
    limiter = Limiter()
    window(limiter, full=False)
    assert limiter.limit == INITIAL_LIMIT


def test_429s_cut_once_per_window_and_end_slow_start():
    limiter = Limiter()
    window(limiter)
    window(limiter)  # 64
    for _ in range(3):
        limiter.finished(0.3, throttled=True)
    assert limiter.limit == 64  # 3 of a 64-reply window: the odd 429, not overload
    for _ in range(10):
        limiter.finished(0.3, throttled=True)  # the 4th cuts; the same window: no second cut
    assert limiter.limit == pytest.approx(64 * 0.7) and not limiter.slow_start
    window(limiter)  # a window at the new limit, still marked congested: no growth in it
    assert limiter.limit == pytest.approx(64 * 0.7)
    before = limiter.limit
    window(limiter)  # a clean full window: additive growth by √limit
    assert limiter.limit == pytest.approx(before + before ** 0.5)


def load(limiter: Limiter, windows: int, share_at: "Callable[[int], float]",
         throttled: bool = False, seed: int = 1) -> list[int]:
    """Full windows in which each reply is a congestion sign with the share `share_at`
    gives for the limit; returns the limit after each window."""
    rng, seen = random.Random(seed), []
    for _ in range(windows):
        n = int(limiter.limit)
        for _ in range(n):
            limiter.started(n)
            sign = rng.random() < share_at(n)
            limiter.finished(0.05, congested=sign and not throttled,
                             throttled=sign and throttled)
        seen.append(int(limiter.limit))
    return seen


@pytest.mark.parametrize("share", [0.05, 0.15, 0.3])
def test_random_overload_answers_are_learned_as_noise_and_do_not_hold_the_limit(share):
    limiter = Limiter()
    seen = load(limiter, 30, lambda n: share)
    assert seen[-1] == MAX_LIMIT  # as with no errors at all, a few windows later
    assert limiter.noise == pytest.approx(share, abs=0.05)


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_overload_answers_that_grow_with_load_keep_the_limit_near_capacity(noise):
    limiter = Limiter()
    seen = load(limiter, 80, lambda n: min(1.0, noise + max(0, n - 200) / n))
    assert max(seen[40:]) < 400 and min(seen[40:]) >= 100


def test_a_429_storm_drops_to_the_floor_then_slow_start_returns_to_the_last_limit():
    limiter = Limiter()
    load(limiter, 10, lambda n: 0.0)
    assert limiter.limit == MAX_LIMIT
    load(limiter, 20, lambda n: 1.0, throttled=True)
    assert limiter.limit == MIN_LIMIT
    back = load(limiter, 14, lambda n: 0.0)
    assert back[-1] >= MAX_LIMIT * 0.7  # doubling per window back up, then on from there
    assert back[:4] == sorted(back[:4]) and back[0] < 16


def test_latency_inflation_backs_off_and_the_floor_holds():
    limiter = Limiter()
    window(limiter, latency=0.3)
    window(limiter, latency=0.3)
    window(limiter, latency=0.9)  # three times the baseline: requests are queueing
    assert limiter.limit == pytest.approx(128 * 0.9) and not limiter.slow_start
    for _ in range(100):
        for _ in range(10):
            limiter.finished(1.0, congested=True)
        window(limiter)
    assert limiter.limit >= MIN_LIMIT


def test_a_slowly_rising_latency_is_not_mistaken_for_queueing():
    limiter = Limiter()
    limiter.slow_start = False
    latency = 0.3
    for _ in range(60):
        before = limiter.limit
        window(limiter, latency=latency)
        assert limiter.limit >= before
        latency *= 1.03  # longer replies as the work changes, not a queue


def test_a_pinned_limit_never_moves():
    limiter = Limiter(pinned=40)
    window(limiter)
    for _ in range(10):
        limiter.finished(0.3, congested=True)
    assert limiter.limit == 40 and limiter.ceiling == 40


def test_a_budget_is_unlimited_until_a_rate_is_known():
    budget = Budget(clock=Clock())
    assert all(budget.reserve(1) == 0 for _ in range(10_000))


def test_an_announced_limit_paces_requests_evenly_at_98_percent():
    clock = Clock()
    budget = Budget(clock=clock)
    budget.announce(60_000)  # 1,000 a second
    rate = 1000 * BUDGET_SHARE
    waits = [budget.reserve(1) for _ in range(2000)]
    burst = int(rate * 0.5)  # half a second's worth may go at once
    assert waits[:burst] == [0.0] * burst
    assert waits[-1] == pytest.approx((2000 - burst) / rate, rel=1e-3)
    assert all(b >= a for a, b in zip(waits, waits[1:]))
    clock.now = 10.0  # a quiet spell refills only up to the burst
    assert budget.reserve(burst) == 0 and budget.reserve(1) > 0


def test_the_lower_of_configured_and_announced_limits_applies():
    budget = Budget(clock=Clock(), configured=600)
    assert budget.rate == pytest.approx(10)  # the YAML's own figure, in full
    budget.announce(60_000)
    assert budget.rate == pytest.approx(10)
    budget.announce(300)
    assert budget.rate == pytest.approx(5 * BUDGET_SHARE)


def test_a_refund_settles_an_estimate_that_was_too_high():
    clock = Clock()
    budget = Budget(clock=clock, configured=60)  # 1 a second, burst 0.5
    assert budget.reserve(3) == pytest.approx(2.5)
    budget.refund(2)
    assert budget.reserve(0) == pytest.approx(0.5)
