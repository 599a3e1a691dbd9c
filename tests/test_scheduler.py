"""llm/scheduler.py: the adaptive concurrency limit and the per-minute budgets, on a fake clock."""

from __future__ import annotations

import math

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


def test_a_window_that_never_fills_the_limit_leaves_it_alone():
    limiter = Limiter()
    window(limiter, full=False)
    assert limiter.limit == INITIAL_LIMIT


def test_congestion_cuts_once_per_window_and_ends_slow_start():
    limiter = Limiter()
    window(limiter)
    window(limiter)  # 64
    for _ in range(3):
        limiter.finished(0.3, congested=True)
    assert limiter.limit == 64  # 3 of a 64-reply window: the odd error, not overload
    for _ in range(10):
        limiter.finished(0.3, congested=True)  # the 4th cuts; the same window: no second cut
    assert limiter.limit == pytest.approx(64 * 0.7) and not limiter.slow_start
    window(limiter)  # a window at the new limit, still marked congested: no growth in it
    assert limiter.limit == pytest.approx(64 * 0.7)
    before = limiter.limit
    window(limiter)  # a clean full window: additive growth by √limit
    assert limiter.limit == pytest.approx(before + before ** 0.5)


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
