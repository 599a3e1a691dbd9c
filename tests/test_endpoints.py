"""llm/endpoints.py: spreading requests, taking failing endpoints out, probing them back."""

from __future__ import annotations

import asyncio

import pytest

from chunbot_cli.llm.endpoints import COOLDOWN_MIN_S, FAILURE_STREAK, EndpointPool
from chunbot_cli.llm.types import ProviderError


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


REFUSED = ProviderError("cannot connect: connection refused", retryable=True, unreachable=True)
HTTP_503 = ProviderError("HTTP 503", retryable=True, status=503)
HTTP_429 = ProviderError("HTTP 429", retryable=True, status=429)


def pool(*urls: str) -> tuple[EndpointPool, Clock, list[str]]:
    clock, notes = Clock(), []
    return EndpointPool("big", urls, note=notes.append, clock=clock), clock, notes


def test_requests_go_to_the_endpoint_with_fewest_in_flight():
    endpoints, _, _ = pool("http://a", "http://b")
    first, second = endpoints.pick(), endpoints.pick()
    assert {first.url, second.url} == {"http://a", "http://b"}
    endpoints.release(first)
    assert endpoints.pick() is first


def test_an_unreachable_endpoint_is_taken_out_then_probed_once_its_cooldown_ends():
    endpoints, clock, notes = pool("http://a", "http://b")
    a = next(e for e in endpoints.endpoints if e.url == "http://a")
    while (picked := endpoints.pick()) is not a:
        endpoints.release(picked)
    assert endpoints.release(a, REFUSED) is True  # the endpoint's fault, not the record's
    assert "http://a is down" in notes[-1]
    assert all(endpoints.pick().url == "http://b" for _ in range(5))
    clock.now += COOLDOWN_MIN_S
    for e in endpoints.endpoints:
        e.in_flight = 0
    b = endpoints.endpoints[1]
    b.down, b.down_until = True, clock.now + 10  # b down too: a's probe is the only way out
    probe = endpoints.pick()
    assert probe is a and a.probing
    assert endpoints.pick() is None  # one probe at a time
    endpoints.release(a)
    assert not a.down and "answers again" in notes[-1]


def test_server_faults_take_an_endpoint_out_after_a_streak_and_429s_never_do():
    endpoints, _, _ = pool("http://a")
    for _ in range(20):
        assert endpoints.release(endpoints.pick(), HTTP_429) is False
    results = [endpoints.release(endpoints.pick(), HTTP_503) for _ in range(FAILURE_STREAK)]
    assert results == [False] * (FAILURE_STREAK - 1) + [True]
    assert endpoints.all_down_since is not None


def test_a_failed_probe_doubles_the_cooldown():
    endpoints, clock, _ = pool("http://a")
    endpoints.release(endpoints.pick(), REFUSED)
    a = endpoints.endpoints[0]
    for expected in (2.0, 4.0, 8.0):
        clock.now = a.down_until
        endpoints.release(endpoints.pick(), REFUSED)
        assert a.cooldown == expected


def test_requests_wait_while_every_endpoint_is_down_and_go_when_one_answers():
    async def scenario():
        endpoints = EndpointPool("big", ("http://a",))
        earlier, failed = endpoints.pick(), endpoints.pick()
        endpoints.release(failed, REFUSED)
        waiter = asyncio.ensure_future(endpoints.acquire(outage_timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        endpoints.release(earlier)  # a request sent before the outage came back: a is up
        assert await asyncio.wait_for(waiter, 1) is earlier

    asyncio.run(scenario())


def test_requests_fail_once_everything_has_been_down_for_the_outage_timeout():
    async def scenario():
        endpoints = EndpointPool("big", ("http://a",))
        endpoints.release(endpoints.pick(), REFUSED)
        with pytest.raises(ProviderError) as caught:
            await endpoints.acquire(outage_timeout=0.05)
        assert "every endpoint has been down" in str(caught.value)
        assert "connection refused" in str(caught.value)
        assert not caught.value.retryable

    asyncio.run(scenario())


def test_requests_wait_in_line_while_every_endpoint_is_full():
    async def scenario():
        endpoints = EndpointPool("big", ("http://a", "http://b"), max_concurrency=2)
        first, second = endpoints.pick(), endpoints.pick()
        assert {first.url, second.url} == {"http://a", "http://b"}  # spread, then full
        assert endpoints.pick() is None
        waiters = [asyncio.ensure_future(endpoints.acquire(outage_timeout=5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert not any(w.done() for w in waiters)
        endpoints.release(first)
        await asyncio.sleep(0.01)
        assert waiters[0].done() and not waiters[1].done()  # first come, first served
        endpoints.release(second)
        assert await asyncio.wait_for(waiters[1], 1) is second

    asyncio.run(scenario())


def test_the_limit_shown_is_the_sum_over_endpoints_that_are_up():
    endpoints, _, _ = pool("http://a", "http://b")
    assert endpoints.limit == 2 * endpoints.endpoints[0].limiter.limit
    endpoints.release(endpoints.pick(), REFUSED)
    assert endpoints.limit == endpoints.endpoints[1].limiter.limit
