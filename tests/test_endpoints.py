"""llm/endpoints.py: spreading requests, taking failing endpoints out, probing them back."""

from __future__ import annotations

import asyncio

import pytest

from chunbot_cli.llm.endpoints import COOLDOWN_MIN_S, FAILURE_STREAK, EndpointPool, Tries
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


# --- outage messages: one when it starts, one when it ends, reminders, not a flood -------

HTTP_500 = ProviderError("HTTP 500", retryable=True, status=500)
TIMED_OUT = ProviderError("no complete reply within 2s", retryable=True, timed_out=True)


def test_an_endpoint_that_flaps_for_20_seconds_is_one_outage_in_the_messages():
    endpoints, clock, notes = pool("http://a")
    start = clock.now
    for _ in range(10):  # down, probed back one cool-down later: every 2 s for 20 s
        assert endpoints.release(endpoints.pick(), REFUSED) is True
        clock.now += COOLDOWN_MIN_S
        probe = endpoints.pick()
        assert probe is not None and probe.probing
        endpoints.release(probe)
        assert not probe.down
        clock.now += COOLDOWN_MIN_S
    assert clock.now - start == 20
    assert [n for n in notes if "down" in n] == [
        "model 'big': every endpoint is down (http://a: cannot connect: connection refused); "
        "records wait for one to come back"]
    assert [n for n in notes if "answers again" in n] == ["model 'big': http://a answers again"]
    assert len(notes) == 2


def test_one_of_two_endpoints_flapping_is_told_once_too():
    endpoints, clock, notes = pool("http://a", "http://b")
    a = endpoints.endpoints[0]
    for _ in range(10):
        while (picked := endpoints.pick()) is not a:
            endpoints.release(picked)
        assert endpoints.release(a, REFUSED) is True
        clock.now += COOLDOWN_MIN_S
        for e in endpoints.endpoints:
            e.in_flight = 0  # nothing else in flight: the next pick in turn may probe
        while not (picked := endpoints.pick()).probing:
            endpoints.release(picked)
        endpoints.release(picked)
        clock.now += COOLDOWN_MIN_S
    assert notes == ["model 'big': http://a is down (cannot connect: connection refused); "
                     "sending to the others, probing it again in a while",
                     "model 'big': http://a answers again"]


def test_a_long_outage_is_recalled_every_30_seconds():
    async def scenario():
        endpoints, clock, notes = pool("http://a")
        endpoints.release(endpoints.pick(), REFUSED)  # at 100: down, every endpoint
        clock.now += COOLDOWN_MIN_S
        probe = endpoints.pick()  # the probe is on its way: requests wait for it

        async def wait_at(now: float) -> list[str]:
            clock.now = now
            told = len(notes)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(endpoints.acquire(outage_timeout=3600), 0.02)
            return notes[told:]

        assert len(notes) == 1 and "every endpoint is down" in notes[0]
        assert await wait_at(110) == []
        assert await wait_at(129.9) == []
        reminder = await wait_at(130)
        assert reminder == ["model 'big': every endpoint is still down after 30s; records "
                            "wait up to 60m (outage_timeout)"]
        assert await wait_at(140) == [] and await wait_at(159) == []
        assert await wait_at(160) == ["model 'big': every endpoint is still down after 1m; "
                                      "records wait up to 60m (outage_timeout)"]
        endpoints.release(probe)  # it answers: the end of the outage is told, once
        assert notes[-1] == "model 'big': http://a answers again"

    asyncio.run(scenario())


def test_one_request_failing_again_and_again_never_takes_its_endpoint_out():
    endpoints, _, notes = pool("http://a")
    poisoned = Tries()  # every attempt of one request passes the same
    for _ in range(10 * FAILURE_STREAK):
        assert endpoints.release(endpoints.pick(), HTTP_500, request=poisoned) is False
    assert not endpoints.endpoints[0].down and endpoints.all_down_since is None
    assert notes == []


def test_different_requests_failing_in_a_row_take_their_endpoint_out():
    endpoints, _, notes = pool("http://a")
    requests = [Tries() for _ in range(FAILURE_STREAK)]  # no success between them
    results = [endpoints.release(endpoints.pick(), HTTP_500, request=r) for r in requests]
    assert results == [False] * (FAILURE_STREAK - 1) + [True]
    assert endpoints.endpoints[0].down
    assert notes == ["model 'big': every endpoint is down (http://a: HTTP 500); records wait "
                     "for one to come back"]


def test_a_poisoned_request_failing_among_answered_ones_never_takes_its_endpoint_out():
    endpoints, _, _ = pool("http://a")
    poisoned = Tries()
    for _ in range(10 * FAILURE_STREAK):
        assert endpoints.release(endpoints.pick(), HTTP_500, request=poisoned) is False
        endpoints.release(endpoints.pick(), request=Tries())  # the others are answered
    assert not endpoints.endpoints[0].down


def test_a_success_between_failures_of_different_requests_starts_the_streak_again():
    endpoints, _, _ = pool("http://a")
    for _ in range(5):
        for _ in range(FAILURE_STREAK - 1):
            assert endpoints.release(endpoints.pick(), HTTP_500, request=Tries()) is False
        endpoints.release(endpoints.pick(), request=Tries())
    assert not endpoints.endpoints[0].down


def test_requests_that_hung_while_later_ones_were_answered_are_no_streak_when_they_time_out():
    endpoints, clock, notes = pool("http://a")
    hung = []
    for _ in range(2 * FAILURE_STREAK):  # a request that will hang, then one that is answered
        request = endpoints.pick()
        endpoints.sending(request)
        hung.append((request, clock.now))
        answered = endpoints.pick()
        endpoints.sending(answered)
        clock.now += 0.01
        endpoints.release(answered, latency=0.01, request=Tries())
    results = []
    for request, sent in hung:  # each gives up the alias's timeout after it was sent
        clock.now = sent + 2.0
        results.append(endpoints.release(request, TIMED_OUT, latency=2.0, request=Tries()))
    assert results == [False] * len(hung)
    assert not endpoints.endpoints[0].down and notes == []


def poisoned_at(endpoints: EndpointPool) -> Tries:
    """A request that failed, then failed again after its endpoint answered another."""
    poisoned = Tries()
    for _ in range(2):
        assert endpoints.release(endpoints.pick(), HTTP_500, request=poisoned) is False
        endpoints.release(endpoints.pick(), request=Tries())
    assert poisoned.alone
    return poisoned


def test_poisoned_requests_left_alone_at_the_end_of_a_run_never_take_their_endpoint_out():
    endpoints, _, notes = pool("http://a")
    poisoned = [poisoned_at(endpoints) for _ in range(4 * FAILURE_STREAK)]
    for _ in range(5):  # the end of the run: they are all that is sent, nothing is answered
        for request in poisoned:
            assert endpoints.release(endpoints.pick(), HTTP_500, request=request) is False
    assert not endpoints.endpoints[0].down and notes == []
    for _ in range(500):  # then the others are answered again, and then they fail too:
        endpoints.release(endpoints.pick(), request=Tries())
    for fresh in range(FAILURE_STREAK):  # the poisoned ones are no part of their streak
        endpoints.release(endpoints.pick(), HTTP_500, request=poisoned[fresh])
        assert endpoints.release(endpoints.pick(), HTTP_500, request=Tries()) is (
            fresh == FAILURE_STREAK - 1)
    assert endpoints.endpoints[0].down


def test_the_share_of_faults_is_that_of_fresh_requests_not_of_a_failing_ones_retries():
    endpoints, _, _ = pool("http://a")
    poisoned = [poisoned_at(endpoints) for _ in range(8)]
    for i in range(300):  # 4% of fresh requests fail
        endpoints.release(endpoints.pick(), HTTP_500 if i % 25 == 0 else None, request=Tries())
    share = endpoints.fault_share
    assert 0.01 < share < 0.1
    for _ in range(10):  # their retries fail again and again
        for request in poisoned:
            endpoints.release(endpoints.pick(), HTTP_500, request=request)
    assert endpoints.fault_share == share == endpoints.endpoints[0].fault_share


def test_a_probe_that_fails_alone_tells_nothing_and_the_next_one_goes_at_once():
    endpoints, clock, _ = pool("http://a")
    a = endpoints.endpoints[0]
    poisoned = poisoned_at(endpoints)
    assert endpoints.release(endpoints.pick(), REFUSED, request=Tries()) is True
    clock.now += COOLDOWN_MIN_S
    probe = endpoints.pick()
    assert probe is a and a.probing
    assert endpoints.release(a, HTTP_500, request=poisoned) is False  # the record's own
    assert a.down and a.cooldown == COOLDOWN_MIN_S
    assert endpoints.pick() is a and a.probing  # another request probes, right away
    assert endpoints.release(a, HTTP_500, request=Tries()) is True
    assert a.cooldown == 2 * COOLDOWN_MIN_S


def test_a_request_that_fails_alone_and_then_cannot_connect_takes_its_endpoint_out():
    endpoints, _, _ = pool("http://a")
    poisoned = poisoned_at(endpoints)
    assert endpoints.release(endpoints.pick(), REFUSED, request=poisoned) is True
    assert endpoints.endpoints[0].down
