"""The faults `chunbot sim serve` injects, on every vendor's routes alike: latency and
jitter, random 500/503s, RPM/TPM limits (token buckets), a 429 storm at the start,
requests left hanging, poisoned prompts that always fail, prompts the safety filter
blocks; and the server's options, which name them. Malformed replies are the request
path's (they are the reply, broken).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from aiohttp import web

from . import model as sim_model
from .wire import BLOCKED_PROMPT, BLOCKED_REPLY, Call, Refused, as_string

HTML_BODY = b"<html><body>upstream error</body></html>"  # --malformed not-json

# --hang-rate: a hung request is held this long at most (or until its client gives up),
# checking every HANG_POLL_S whether the client is still there, then its connection is dropped
HANG_S = 3600.0
HANG_POLL_S = 1.0

POISONED = Refused(500, "server", "The server had an error while processing your request "
                   "(a poisoned prompt, injected by chunbot sim).")
SERVER_ERROR = Refused(500, "server", "The server had an error while processing your "
                       "request (injected by chunbot sim).")
OVERLOADED = Refused(503, "overloaded", "The server is overloaded (injected by chunbot sim).")


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    wrong_rate: float = 0.0  # of --wrong-model's first answers: wrong (right when re-asked)
    wrong_model: str = "sim-small"
    flaky_rate: float = 0.0  # of every model's answers: wrong at random, a fresh draw each
    rpm: int | None = None
    tpm: int | None = None
    api_key: str | None = None
    malformed: str | None = None  # "not-json" | "no-choices"
    seed: int | None = None
    batch_delay_s: float = 2.0  # from creation to the end of a batch
    batch_error_rate: float = 0.0  # share of batch items that come back errored
    batch_expire_rate: float = 0.0  # share of batch items that expire
    hang_rate: float = 0.0  # share of requests accepted and never answered
    fail_prompt: str | None = None  # requests whose messages contain it always get 500
    storm_s: float = 0.0  # from the first model request, this long every one gets 429
    storm_retry_after: int = 1  # the retry-after (seconds) of the storm's 429s
    block_prompt: str | None = None  # requests whose messages contain it: blocked, as unsafe
    # what URL credentials are for: the exact Authorization header every model and batch
    # request must carry (`Basic <base64 of user:password>`), else 401
    authorization: str | None = None
    # a misconfigured proxy's habit: the error bodies quote the Authorization header the
    # request carried, for tests that check a client never shows it
    echo_authorization: bool = False


@dataclass
class Bucket:
    """A per-minute limit as vendors enforce it: a token bucket refilled continuously at
    limit/60 per second that holds one second's worth, so a minute's quota cannot be
    spent in one burst."""

    limit: int
    rate: float = 0.0
    capacity: float = 0.0
    level: float = 0.0
    stamp: float = 0.0

    def __post_init__(self) -> None:
        self.rate = self.limit / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until `cost` is admitted. A cost above the capacity is admitted on a
        full bucket and leaves it in debt, so big requests slow down rather than starve."""
        return max(0.0, min(cost, self.capacity) - self.level) / self.rate

    def remaining(self) -> int:
        return max(0, min(self.limit, math.floor(self.level * 60)))

    def until_full(self) -> float:
        return max(0.0, self.capacity - self.level) / self.rate


def request_cost(call: Call) -> int:
    """Tokens a request counts against a TPM limit: its prompt plus what it may generate."""
    limit = call.params.get("max_tokens") or call.params.get("max_completion_tokens") or 0
    return sim_model.prompt_tokens(call.messages) + (limit if isinstance(limit, int) else 0)


class Faults:
    """The fault RNG, the rate-limit buckets and the storm's clock, shared by every route."""

    def __init__(self, options: Options):
        self.options = options
        self.rng = random.Random(options.seed)
        self.requests = Bucket(options.rpm) if options.rpm else None
        self.tokens = Bucket(options.tpm) if options.tpm else None
        self.limited = self.requests is not None or self.tokens is not None
        self.storm_end: float | None = None  # --storm-s: set by the first model request

    def storm(self) -> None:
        """--storm-s: a 429 for every model request during the storm, which starts with the
        first one."""
        now = time.monotonic()
        if self.storm_end is None:
            self.storm_end = now + self.options.storm_s
        if now < self.storm_end:
            after = self.options.storm_retry_after
            raise Refused(429, "rate_limit_requests", "Rate limit reached for requests (a storm "
                          f"injected by chunbot sim). Please try again in {after}s.",
                          retry_after=after, wait=after)

    def admit(self, call: Call) -> None:
        """Take the request from the RPM and TPM buckets, or say when to come back (429)."""
        now = time.monotonic()
        cost = request_cost(call)
        waits = []
        for bucket, amount in ((self.requests, 1), (self.tokens, cost)):
            if bucket is not None:
                bucket.refill(now)
                waits.append((bucket.wait(amount), bucket))
        wait, bucket = max(waits, key=lambda pair: pair[0])
        if wait <= 0:
            if self.requests is not None:
                self.requests.level -= 1
            if self.tokens is not None:
                self.tokens.level -= cost
            return
        name = "requests" if bucket is self.requests else "tokens"
        raise Refused(429, f"rate_limit_{name}", f"Rate limit reached for {name} per min: "
                      f"limit {bucket.limit}. Please try again in {wait:.3f}s.",
                      retry_after=max(1, math.ceil(wait)), wait=wait, limit=bucket.limit,
                      model=call.model)

    def refill(self) -> None:
        """Bring the buckets up to now, for the limit headers of a reply."""
        now = time.monotonic()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)

    def poisoned(self, call: Call) -> bool:
        """--fail-prompt: whether any message of the request contains the text."""
        text = self.options.fail_prompt
        return any(text in as_string(m.get("content")) for m in call.messages)

    def blocked(self, call: Call) -> str | None:
        """--block-prompt: BLOCKED_PROMPT when the system prompt contains the text,
        BLOCKED_REPLY when only the conversation does, else None."""
        text = self.options.block_prompt
        found = None
        for m in call.messages:
            if text in as_string(m.get("content")):
                if m.get("role") == "system":
                    return BLOCKED_PROMPT
                found = BLOCKED_REPLY
        return found

    def hangs(self) -> bool:
        """--hang-rate: whether this request is to be left hanging (drawn with --seed)."""
        return self.rng.random() < self.options.hang_rate

    async def hang(self, request: web.Request) -> None:
        """Hold the request without an answer until its client goes away, or for HANG_S at
        most, then drop the connection."""
        deadline = time.monotonic() + HANG_S
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                transport.abort()  # dropped: no status line, the client sees the reset
                return
            await asyncio.sleep(min(HANG_POLL_S, left))

    async def delay(self) -> None:
        options = self.options
        delay = options.latency_ms + self.rng.uniform(-options.jitter_ms, options.jitter_ms)
        await asyncio.sleep(max(0.0, delay) / 1000)

    def injected(self) -> Refused | None:
        """--error-rate: a 500 or a 503 for this request, or None."""
        if self.rng.random() < self.options.error_rate:
            return SERVER_ERROR if self.rng.random() < 0.5 else OVERLOADED
        return None
