"""What tokens cost: a model's `price` (USD per million tokens) applied to a reply's usage,
or to token counts an estimate or a spending cap predicts, with provider cache reads and
writes and the batch discount at their own rates."""

from __future__ import annotations

from .types import Reply

# The price of a cached input token against a plain one, unless `price.cached_input` says:
# Anthropic charges a tenth for cache reads; OpenAI half on most models; Gemini 2.5 a
# quarter for its implicit caching.
CACHED_SHARE = {"anthropic": 0.1, "openai": 0.5, "gemini": 0.25}
BATCH_DISCOUNT = 0.5  # every vendor's batch API, unless `price.batch_discount` says


def cost(provider: str, prices: dict[str, float], tokens_in: float, tokens_out: float,
         cached: float = 0.0, cache_write: float = 0.0) -> float:
    """USD for these tokens; `cached` and `cache_write` are part of `tokens_in`."""
    if not prices:
        return 0.0
    per_input = prices.get("input", 0.0)
    read = prices.get("cached_input", per_input * CACHED_SHARE.get(provider, 1.0))
    written = prices.get("cache_write", per_input * 1.25)
    plain = tokens_in - cached - cache_write
    return (plain * per_input + cached * read + cache_write * written
            + tokens_out * prices.get("output", 0.0)) / 1e6


def price(provider: str, prices: dict[str, float], reply: Reply) -> float:
    """What a reply cost in USD."""
    return cost(provider, prices, reply.input_tokens, reply.output_tokens, reply.cached_tokens,
                reply.cache_write_tokens)


def full_price(prices: dict[str, float], reply: Reply) -> float:
    """What the reply would have cost with no cache at all, local or at the provider."""
    return (reply.input_tokens * prices.get("input", 0.0)
            + reply.output_tokens * prices.get("output", 0.0)) / 1e6


def batch_share(prices: dict[str, float]) -> float:
    """What a batch request costs against a realtime one."""
    return 1 - prices.get("batch_discount", BATCH_DISCOUNT)


class CostCap(Exception):
    """A request was not sent: it would take the run's spending past `--max-cost`."""


class Spending:
    """The run's spending against its cap (`--max-cost`, `defaults.max_cost`): what the
    output has cost so far (`before` this run, and the replies since) and what the
    requests on the wire may cost. A request is sent only while all of it stays within
    the cap; once one is refused, none is sent any more, so the run winds down and keeps
    what finished. A reply may cost more than its reservation guessed (the prompt's
    tokens are estimated), so the most a run can pass the cap by is that error on the
    requests in flight."""

    def __init__(self, cap: float, before: float = 0.0):
        self.cap, self.before = cap, before
        self.spent = 0.0  # by this run's replies
        self.in_flight = 0.0  # what the requests on the wire have reserved
        self.reached = False

    @property
    def total(self) -> float:
        return self.before + self.spent

    async def ready(self, estimate: float) -> None:
        """Before reserve(estimate): here there is nothing to wait for; an account kept
        elsewhere (a Ray worker's part of the run's, rayexec.py) first asks for room."""

    def reserve(self, estimate: float) -> float:
        """Room for one request that may cost `estimate`; raises CostCap when there is none."""
        if self.reached or self.total + self.in_flight + estimate > self.cap:
            self.reached = True
            raise CostCap(f"--max-cost ${self.cap:g}")
        self.in_flight += estimate
        return estimate

    def settle(self, reserved: float, cost: float) -> None:
        """A request is back: what it cost replaces what it reserved."""
        self.in_flight -= reserved
        self.spent += cost
