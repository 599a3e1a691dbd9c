"""The three stage kinds: LLM (`prompt`), `filter` and `python`.

Each turns the records of one shard into that stage's output for the shard: the output
records in input order, the failures (for errors.jsonl) and, for LLM stages, one trace
entry per record. A failing record never stops the others. Filter and python stages are
plain loops over the shard; an LLM stage runs its requests concurrently and reports each
finished record to a callback (the journal) as soon as it is done.
"""

from __future__ import annotations

import asyncio
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson

from .config import StageSpec, import_callable
from .llm.types import Reply, Request
from .state import Counters
from .store import Entry

if TYPE_CHECKING:
    from .llm.cache import Cache
    from .llm.client import ModelClient


@dataclass
class StageOutput:
    records: list[dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    trace: list[dict[str, Any]] | None = None
    counts: Counters = field(default_factory=Counters)


def failure(stage: str, record: dict[str, Any], error: str) -> dict[str, Any]:
    return {"_id": record.get("_id"), "stage": stage, "error": error, "record": record}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class FilterStage:
    concurrency = 0  # requests it may have in flight: none

    def __init__(self, spec: StageSpec):
        from . import templates

        self.spec = spec
        self.predicate = templates.compile_expression(spec.filter or "")

    def run(self, records: list[dict[str, Any]]) -> StageOutput:
        out = StageOutput(records=[])
        keep, predicate = out.records.append, self.predicate
        for record in records:
            try:
                kept = predicate(record)
            except Exception as e:  # any error in a user expression is this record's failure
                out.errors.append(failure(self.spec.name, record, f"filter: {_describe(e)}"))
                continue
            if kept:
                keep(record)
        out.counts = Counters(records_in=len(records), records_out=len(out.records),
                              failed=len(out.errors),
                              filtered=len(records) - len(out.records) - len(out.errors))
        return out


class PythonStage:
    concurrency = 0

    def __init__(self, spec: StageSpec, import_paths: list[str]):
        self.spec = spec
        self.function: Callable[[dict[str, Any]], Any] = import_callable(spec.python or "",
                                                                         import_paths)

    def run(self, records: list[dict[str, Any]]) -> StageOutput:
        out = StageOutput(records=[])
        keep, function, dropped = out.records.append, self.function, 0
        for record in records:
            parent = record.get("_id")
            try:
                result = function(record)
            except Exception as e:  # any error in user code is this record's failure
                where = traceback.extract_tb(e.__traceback__)[-1]
                reason = f"{_describe(e)} (at {where.filename}:{where.lineno})"
                out.errors.append(failure(self.spec.name, record, reason))
                continue
            if result is record:
                keep(result)
            elif isinstance(result, dict):
                result.setdefault("_id", parent)
                keep(result)
            elif result is None:
                dropped += 1
            elif isinstance(result, list) and all(isinstance(r, dict) for r in result):
                for j, child in enumerate(result):
                    if child.get("_id", parent) == parent:
                        child["_id"] = f"{parent}-{j}"
                    keep(child)
            else:
                out.errors.append(failure(
                    self.spec.name, record,
                    f"returned {type(result).__name__}; expected a dict, a list of dicts or None"))
        out.counts = Counters(records_in=len(records), records_out=len(out.records),
                              failed=len(out.errors), filtered=dropped)
        return out


class LLMStage:
    """Renders the prompt, asks the stage's model (the next one of a cascade on failure),
    parses the reply into the `output` field. With a cache, a shard's requests are looked
    up together first, and only the misses are sent."""

    def __init__(self, spec: StageSpec, clients: dict[str, "ModelClient"],
                 cache: "Cache | None" = None, cache_read: bool = True):
        from . import templates

        self.spec = spec
        self.clients = [clients[alias] for alias in spec.models]
        self.cache = cache if spec.cache else None
        self.cache_read = cache_read  # False when rerunning: ask the models again
        if self.cache is not None:
            from .llm.cache import KeyMaker

            self.key_makers = {c.spec.alias: KeyMaker(c.spec, spec.params, spec.cache_namespace)
                               for c in self.clients}
        self.system = templates.compile_template(spec.system) if spec.system else None
        self.prompt = templates.compile_template(spec.prompt or "")
        self.static_prefix = (len(templates.static_prefix(spec.prompt or ""))
                              if spec.prompt_cache else 0)

    @property
    def concurrency(self) -> int:
        """The most requests this stage may ever have in flight (its models' limits adapt
        below that)."""
        return max(client.ceiling for client in self.clients)

    async def run(self, records: list[dict[str, Any]], done: dict[int, Entry],
                  on_done: Callable[[Entry], None]) -> StageOutput:
        """`done` holds entries finished by an earlier attempt (from the journal); `on_done`
        gets each new entry as soon as its record is finished."""
        entries, finish, requests = await self.prepare(records, done, on_done)
        await self.send(records, requests, finish)
        return self.assemble(records, entries)

    async def prepare(self, records: list[dict[str, Any]], done: dict[int, Entry],
                      on_done: Callable[[Entry], None]) -> tuple[
            list[Entry | None], Callable[[Entry], None], dict[int, Request]]:
        """The shard's entries so far, how to finish one, and the requests still to send
        (rendered; those the cache answers are finished here)."""
        entries: list[Entry | None] = [done.get(i) for i in range(len(records))]

        def finish(entry: Entry) -> None:
            entries[entry.i] = entry
            on_done(entry)

        requests: dict[int, Request] = {}
        for i, entry in enumerate(entries):
            if entry is None:
                try:
                    requests[i] = self.request(records[i])
                except Exception as e:  # a template error is this record's failure
                    error = f"template: {_describe(e)}"
                    finish(Entry(i, {"_id": records[i].get("_id"), "stage": self.spec.name,
                                     "error": error}, error=error))
        if self.cache is not None and self.cache_read and requests:
            first = self.clients[0]
            keys = {i: self.cache_key(first, request) for i, request in requests.items()}
            found = await self.cache.get_many(list(keys.values()))
            for i, key in keys.items():
                entry = found.get(key) and self.answered(i, records[i], requests[i], first,
                                                         found[key], "cache")
                if entry:
                    del requests[i]
                    finish(entry)
        return entries, finish, requests

    async def send(self, records: list[dict[str, Any]], requests: dict[int, Request],
                   finish: Callable[[Entry], None]) -> None:
        """Send the requests, as many at once as the stage's models allow."""
        queue = iter(list(requests.items()))

        async def worker() -> None:
            for i, request in queue:
                finish(await self.process(i, records[i], request))

        await asyncio.gather(*(worker() for _ in range(min(len(requests), self.concurrency))))

    def request(self, record: dict[str, Any]) -> Request:
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(record)})
        messages.append({"role": "user", "content": self.prompt.render(record)})
        return Request(messages=messages, params=self.spec.params,
                       prompt_cache=self.spec.prompt_cache, static_prefix=self.static_prefix)

    def cache_key(self, client: "ModelClient", request: Request) -> bytes:
        return self.key_makers[client.spec.alias](request)

    def trace_of(self, record: dict[str, Any], request: Request) -> dict[str, Any]:
        return {"_id": record.get("_id"), "stage": self.spec.name,
                "request": {"messages": request.messages, "params": request.params},
                "attempts": [], "cache_hit": False}

    def answered(self, index: int, record: dict[str, Any], request: Request,
                 client: "ModelClient", reply: Reply, source: str) -> Entry | None:
        """A journal entry for a reply that came from the local cache (`source` "cache":
        no cost) or from a provider batch ("batch": at the batch discount, and cached);
        None when it does not parse, so the request is sent again."""
        try:
            value = self.parse(reply.text)
        except ValueError:
            return None
        prices = client.spec.price
        cost = 0.0 if source == "cache" else (price(client.spec.provider, prices, reply)
                                              * (1 - prices.get("batch_discount", 0.5)))
        trace = self.trace_of(record, request)
        trace.update(model=client.spec.alias, model_name=reply.model, response=reply.text,
                     output=value, error=None, tokens=_tokens(reply), cost=round(cost, 8),
                     cost_full=round(full_price(prices, reply), 8))
        trace["cache_hit" if source == "cache" else "batch"] = True
        if source == "batch" and self.cache is not None:
            self.cache.put(self.cache_key(client, request), reply)
        return Entry(index, trace, out=value)

    async def process(self, index: int, record: dict[str, Any],
                      request: Request) -> Entry:
        """One record → its entry: output or error, and trace."""
        trace = self.trace_of(record, request)
        tokens = dict.fromkeys(("in", "out", "cached", "cache_write"), 0)
        cost = cost_full = 0.0
        error = "no model answered"
        for n, client in enumerate(self.clients):
            key = None
            if self.cache is not None:
                key = self.cache_key(client, request)
                if n and self.cache_read:  # the first model's were looked up with the shard
                    found = await self.cache.get_many([key])
                    entry = key in found and self.answered(index, record, request, client,
                                                           found[key], "cache")
                    if entry:
                        entry.trace["attempts"] = trace["attempts"]
                        return entry
            result = await client.complete(request, self.spec.retries, self.spec.outage_timeout)
            for attempt in result.attempts:
                attempt["model"] = client.spec.alias
            trace["attempts"] += result.attempts
            if result.reply is None:
                error = f"model {client.spec.alias!r}: {result.error}"
                continue
            reply = result.reply
            for name, count in _tokens(reply).items():
                tokens[name] += count
            cost += price(client.spec.provider, client.spec.price, reply)
            cost_full += full_price(client.spec.price, reply)
            trace.update(model=client.spec.alias, model_name=reply.model,
                         endpoint=result.endpoint, response=reply.text,
                         latency_ms=result.latency_ms, tokens=tokens, cost=round(cost, 8),
                         cost_full=round(cost_full, 8))
            try:
                value = self.parse(reply.text)
            except ValueError as e:
                error = f"model {client.spec.alias!r}: {e}"
                continue
            if key is not None:
                self.cache.put(key, reply)
            trace["output"] = value
            trace["error"] = None
            return Entry(index, trace, out=value)
        trace.update(error=error, tokens=tokens, cost=round(cost, 8), cost_full=round(cost_full, 8))
        return Entry(index, trace, error=error)

    def parse(self, text: str) -> Any:
        if self.spec.parse == "text":
            return text.strip()
        body = text.strip()
        if body.startswith("```"):
            body = body.split("\n", 1)[-1].rsplit("```", 1)[0]
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"reply is not valid JSON ({e}): {text[:200]!r}") from None

    def assemble(self, records: list[dict[str, Any]],
                 entries: list[Entry | None]) -> StageOutput:
        out = StageOutput(records=[], trace=[])
        field_name = self.spec.output or self.spec.name
        for record, entry in zip(records, entries):
            assert entry is not None
            out.trace.append(entry.trace)
            out.counts.count(entry)
            if entry.error is not None:
                out.errors.append(failure(self.spec.name, record, entry.error))
            else:
                record[field_name] = entry.out
                out.records.append(record)
        return out


def _tokens(reply: Reply) -> dict[str, int]:
    return {"in": reply.input_tokens, "out": reply.output_tokens,
            "cached": reply.cached_tokens, "cache_write": reply.cache_write_tokens}


def price(provider: str, prices: dict[str, float], reply: Reply) -> float:
    """What a reply cost in USD, provider cache reads and writes at their own rates."""
    if not prices:
        return 0.0
    per_input = prices.get("input", 0.0)
    cached = prices.get("cached_input", per_input * CACHED_SHARE.get(provider, 1.0))
    written = prices.get("cache_write", per_input * 1.25)
    plain = reply.input_tokens - reply.cached_tokens - reply.cache_write_tokens
    return (plain * per_input + reply.cached_tokens * cached + reply.cache_write_tokens * written
            + reply.output_tokens * prices.get("output", 0.0)) / 1e6


def full_price(prices: dict[str, float], reply: Reply) -> float:
    """What the reply would have cost with no cache at all, local or at the provider."""
    return (reply.input_tokens * prices.get("input", 0.0)
            + reply.output_tokens * prices.get("output", 0.0)) / 1e6


# The price of a cached input token against a plain one, unless `price.cached_input` says:
# Anthropic charges a tenth for cache reads; OpenAI half on most models.
CACHED_SHARE = {"anthropic": 0.1, "openai": 0.5}
