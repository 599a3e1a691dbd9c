"""The three stage kinds — LLM (`prompt`), `filter` and `python` — behind one protocol.

A stage `open`s a shard and is then fed the shard's records in batches, as they arrive
from upstream (all at once from the input or a part file; one by one from an LLM stage
upstream). Every record that leaves the stage is passed on at once, encoded as the JSON
line the part file and stdout get, so the next stage may change it. `finish` comes after
the last batch and gives the shard's output for its commit: the records in input order
(by key), the failures and, for LLM stages, one trace entry per record. A failing record
never stops the others.

Records are keyed by their place in the shard: i for the i-th record the shard job started
from; a `python` stage's outputs are keyed i × FANOUT + j, its j-th for record i, so that
keys still sort in output order (and fit any number of children). Keys order the output
and name a record in the journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import traceback
from collections import deque
from dataclasses import dataclass, field
from operator import lt
from typing import TYPE_CHECKING, Any, Callable, Coroutine, NamedTuple, Protocol

import orjson

from .config import StageSpec, import_callable
from .llm.price import CostCap, batch_share, full_price, price
from .llm.types import Reply, Request
from .state import Counters
from .store import Entry, Key, reason_of

if TYPE_CHECKING:
    from .batchmode import BatchMode
    from .llm.cache import Cache
    from .llm.client import ModelClient

class Batch(NamedTuple):
    """Records with their keys (two lists, so a shard's records cost no pair each)."""

    keys: list[Key]
    records: list[dict[str, Any]]

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.records)

    def __add__(self, other: "Batch") -> "Batch":  # type: ignore[override]
        return Batch(self.keys + other.keys, self.records + other.records)


@dataclass
class StageOutput:
    """One stage's shard, whole: what its commit writes."""

    data: bytes  # the output records as JSON lines, in key order
    keys: list[Key]  # each output record's key
    errors: list[dict[str, Any]] = field(default_factory=list)
    trace: list[dict[str, Any]] | None = None
    counts: Counters = field(default_factory=Counters)
    ids: list[Any] | None = None  # the ids of the records read from the input (first stage)


@dataclass
class Outlet:
    """Where a stage's shard reports to (the shard job's flow)."""

    emit: Callable[[Batch, bytes, Counters | None], None]  # records out, as JSON lines,
    # and changes to the live counts beyond what `entry` tells
    entry: Callable[[Entry, bool], None] = lambda entry, new: None  # an LLM record finished
    # (new: not restored from the journal)
    spawn: Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"] = asyncio.ensure_future


# Why a stage's shard is not whole at the end of a run (its finished records stay in the
# journal for the next): "batches", provider batches are pending; "max_cost", the run's
# cost cap stopped its requests; "failing", the stage's Tripwire stopped it.
Waiting = str

SYSTEMATIC_FAILURES = 50  # a stage whose first this many records of a run all fail the
# same way stops (a template field no record has, a wrong key, a refused request)


@dataclass
class Tripwire:
    """Watches the first records a stage finishes in a run: when `limit` of them in a
    row fail for one reason, that reason is not a record's but the stage's, and every
    record would fail the same way at a cost: `tripped` says why, and the stage sends
    nothing more. One reply that works (or another reason) disarms it for the run."""

    limit: int = SYSTEMATIC_FAILURES
    seen: int = 0
    reason: str | None = None
    armed: bool = True
    tripped: str | None = None

    def watch(self, entry: Entry) -> None:
        if not self.armed:
            return
        reason = reason_of({"error": entry.error}) if entry.failed else None
        if reason is None or self.seen and reason != self.reason:
            self.armed = False
            return
        self.seen, self.reason = self.seen + 1, reason
        if self.seen >= self.limit:
            self.tripped, self.armed = reason, False


class StageShard(Protocol):
    async def feed(self, batch: Batch) -> None: ...

    async def finish(self) -> StageOutput | Waiting: ...

    async def abandon(self) -> None: ...  # it will not be whole in this run (upstream
    # waits): send nothing more, and wait for the requests in flight to be journaled


class Stage(Protocol):
    spec: StageSpec
    concurrency: int  # requests it may have in flight
    tripwire: Tripwire  # tripped: it stopped, its records all failing the same way

    def open(self, shard: int, source: str, outlet: Outlet,
             done: dict[Key, Entry] | None = None, mode: str | None = None) -> StageShard: ...


FANOUT = 1 << 32  # the most children a python stage may return for one record


def failure(stage: str, record: dict[str, Any], error: str) -> dict[str, Any]:
    return {"_id": record.get("_id"), "stage": stage, "error": error, "record": record}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _first(pair: tuple[Key, Any]) -> Key:
    return pair[0]


class _Collected:
    """A shard's output as it builds up, in whatever order records come."""

    def __init__(self, stage: str):
        self.stage = stage
        self.keys: list[Key] = []
        self.chunks: list[bytes] = []  # JSON lines of each batch, in the order they came
        self.errors: list[tuple[Key, dict[str, Any]]] = []
        self.counts = Counters()
        self.in_order = True

    def encode(self, passed: Batch) -> tuple[Batch, bytes, Counters | None]:
        """The records' JSON lines; a record JSON cannot hold (a set, a key that is not a
        string, too deep) is that record's failure, before the next stage sees it.

        They are kept joined: orjson gives every bytes object it makes 4 KB whatever its
        length, so a shard's worth of separate lines would hold ten times its size."""
        dumps = orjson.dumps
        try:
            lines = [dumps(record) for record in passed.records]
        except TypeError:
            kept, lines = Batch([], []), []
            for key, record in zip(*passed):
                try:
                    lines.append(dumps(record))
                    kept.keys.append(key)
                    kept.records.append(record)
                except TypeError as e:
                    self.errors.append((key, _unwritable(self.stage, record, e)))
            moved = len(passed) - len(kept)
            self.counts.records_out -= moved
            self.counts.failed += moved
            passed, change = kept, Counters(records_out=-moved, failed=moved)
        else:
            change = None
        keys = passed.keys
        data = b"\n".join(lines) + b"\n" if lines else b""
        if keys:
            if self.in_order and (self.keys and keys[0] < self.keys[-1] or len(keys) > 1
                                  and not all(map(lt, keys, keys[1:]))):
                self.in_order = False
            self.keys += keys
            self.chunks.append(data)
        return passed, data, change

    def output(self, trace: list[tuple[Key, dict[str, Any]]] | None = None) -> StageOutput:
        keys = self.keys
        if self.in_order:
            data = b"".join(self.chunks)
        else:
            data, order = in_key_order(b"".join(self.chunks), keys)
            keys = [keys[i] for i in order]
        self.chunks = []
        self.errors.sort(key=_first)
        out = StageOutput(data, keys, [error for _, error in self.errors], counts=self.counts)
        if trace is not None:
            trace.sort(key=_first)
            out.trace = [t for _, t in trace]
        return out


def in_key_order(data: bytes, keys: list[Key]) -> tuple[bytes, list[int]]:
    """JSON lines (one per key, in the keys' order) sorted by key, and the order: the
    places the sorted lines had."""
    lines = data.split(b"\n")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return b"".join([lines[i] + b"\n" for i in order]), order


def _unwritable(stage: str, record: dict[str, Any], error: Exception) -> dict[str, Any]:
    from .store import printable

    return {"_id": printable(record.get("_id")), "stage": stage,
            "error": f"the record cannot be written as JSON: {error}",
            "record": printable(record)}


class _MappedShard:
    """A shard of a stage that maps each record on its own, at once (filter, python)."""

    def __init__(self, stage: _PerRecord, outlet: Outlet):
        self.map, self.outlet = stage.map, outlet
        self.out = _Collected(stage.spec.name)

    async def feed(self, batch: Batch) -> None:
        passed, errors, filtered = self.map(batch)
        counts = Counters(records_in=len(batch), records_out=len(passed), failed=len(errors),
                          filtered=filtered)
        self.out.counts.add(counts)
        self.out.errors += errors
        passed, data, change = self.out.encode(passed)
        if change is not None:
            counts.add(change)
        self.outlet.emit(passed, data, counts)

    async def finish(self) -> StageOutput:
        return self.out.output()

    async def abandon(self) -> None:
        pass


class _PerRecord:
    """A stage that maps each record on its own, with no requests: `map` a batch."""

    spec: StageSpec
    concurrency = 0  # requests it may have in flight: none
    tripwire = Tripwire(armed=False)  # it costs nothing, so it never stops early

    def open(self, shard: int, source: str, outlet: Outlet,
             done: dict[Key, Entry] | None = None, mode: str | None = None) -> StageShard:
        return _MappedShard(self, outlet)

    def map(self, batch: Batch) -> tuple[Batch, list[tuple[Key, dict[str, Any]]], int]:
        """The records passed on, the failures, how many were dropped."""
        raise NotImplementedError


class FilterStage(_PerRecord):
    def __init__(self, spec: StageSpec):
        from . import templates

        self.spec = spec
        self.predicate = templates.compile_expression(spec.filter or "")

    def map(self, batch: Batch) -> tuple[Batch, list[tuple[Key, dict[str, Any]]], int]:
        kept = Batch([], [])
        errors = []
        keys, records, predicate = kept.keys, kept.records, self.predicate
        for key, record in zip(*batch):
            try:
                if predicate(record):
                    keys.append(key)
                    records.append(record)
            except Exception as e:  # any error in a user expression is this record's failure
                errors.append((key, failure(self.spec.name, record, f"filter: {_describe(e)}")))
        return kept, errors, len(batch) - len(kept) - len(errors)


class PythonStage(_PerRecord):
    def __init__(self, spec: StageSpec, import_paths: list[str]):
        self.spec = spec
        self.function: Callable[[dict[str, Any]], Any] = import_callable(spec.python or "",
                                                                         import_paths)

    def map(self, batch: Batch) -> tuple[Batch, list[tuple[Key, dict[str, Any]]], int]:
        kept = Batch([], [])
        errors = []
        keep_key, keep, function, dropped = kept.keys.append, kept.records.append, \
            self.function, 0
        for key, record in zip(*batch):
            base = key * FANOUT  # every output of the stage at the same level
            parent = record.get("_id")
            try:
                result = function(record)
            except Exception as e:  # any error in user code is this record's failure
                where = traceback.extract_tb(e.__traceback__)[-1]
                reason = f"{_describe(e)} (at {where.filename}:{where.lineno})"
                errors.append((key, failure(self.spec.name, record, reason)))
                continue
            if result is record:
                keep_key(base)
                keep(result)
            elif isinstance(result, dict):
                result.setdefault("_id", parent)
                keep_key(base)
                keep(result)
            elif result is None:
                dropped += 1
            elif isinstance(result, list) and all(isinstance(r, dict) for r in result):
                for j, child in enumerate(result):
                    if child.get("_id", parent) == parent:
                        child["_id"] = f"{parent}-{j}"
                    keep_key(base + j)
                    keep(child)
            else:
                errors.append((key, failure(
                    self.spec.name, record,
                    f"returned {type(result).__name__}; expected a dict, a list of dicts or None")))
        return kept, errors, dropped


class LLMStage:
    """Renders the prompt, asks the stage's model (the next one of a cascade on failure),
    parses the reply into the `output` field. With a cache, each batch's requests are
    looked up together first, and only the misses are sent."""

    def __init__(self, spec: StageSpec, clients: dict[str, "ModelClient"],
                 cache: "Cache | None" = None, cache_read: bool = True,
                 batches: "BatchMode | None" = None):
        from . import templates

        self.spec = spec
        self.clients = [clients[alias] for alias in spec.models]
        self.cache = cache if spec.cache else None
        self.cache_read = cache_read  # False when rerunning: ask the models again
        self.batches = batches  # provider batches, for shards opened in mode "batch"
        if self.cache is not None:
            from .llm.cache import KeyMaker

            self.key_makers = {c.spec.alias: KeyMaker(c.spec, spec.params, spec.cache_namespace)
                               for c in self.clients}
        self.routes = [(templates.compile_expression(r.when) if r.when else None,
                        r.when or "default", [clients[a] for a in r.models])
                       for r in spec.routes]
        self.field = spec.output or spec.name
        self.accept = templates.compile_expression(spec.accept) if spec.accept else None
        self.validate: Callable[[Any], Any] | None = None
        if spec.schema is not None:
            import fastjsonschema  # ~35 ms: only for stages with a schema

            self.validate = fastjsonschema.compile(spec.schema)
        self.checks = bool(spec.accept or spec.schema or spec.reask)  # replies may be refused
        self.system = templates.compile_template(spec.system) if spec.system else None
        self.prompt = templates.compile_template(spec.prompt or "")
        self.tripwire = Tripwire()
        self.static_prefix = (len(templates.static_prefix(spec.prompt or ""))
                              if spec.prompt_cache else 0)

    @property
    def concurrency(self) -> int:
        """The most requests this stage may ever have in flight (its models' limits adapt
        below that)."""
        return max(client.ceiling for client in self.clients)

    def cascade(self, record: dict[str, Any]) -> tuple[str | None, list["ModelClient"]]:
        """The route a record takes (its `when`, "default", or None without `route:`) and
        the models to ask, in order."""
        for predicate, label, models in self.routes:
            if predicate is None or predicate(record):
                return label, models
        return None, self.clients

    def open(self, shard: int, source: str, outlet: Outlet,
             done: dict[Key, Entry] | None = None, mode: str | None = None) -> StageShard:
        """`done`: records finished by an earlier attempt (the journal); `mode` "batch"
        sends the shard through the provider's batch API once it is whole, "collect"
        collects batches an earlier run left and sends the rest in realtime."""
        return LLMShard(self, shard, source, outlet, done or {}, mode)

    async def requests(self, records: dict[Key, dict[str, Any]], done: dict[Key, Entry],
                       finish: Callable[[Entry, bool], None]) -> dict[Key, Request]:
        """The requests still to send for `records`, rendered; records finished before
        (`done`, when it is the same record), those whose template fails and those the
        cache answers are finished here."""
        requests: dict[Key, Request] = {}
        firsts: dict[Key, "ModelClient"] = {}  # the first model each record's route asks
        for key, record in records.items():
            entry = done.get(key)
            if entry is not None and entry.trace.get("_id") == record.get("_id"):
                finish(entry, False)
                continue
            try:
                cascade = self.cascade(record)[1]
                firsts[key] = cascade[0]
            except Exception as e:  # an error in a `when` is this record's failure
                error = f"route: {_describe(e)}"
                finish(Entry(key, {"_id": record.get("_id"), "stage": self.spec.name,
                                   "error": error}, error=error), True)
                continue
            try:
                requests[key] = self.request(record)
                error = self.too_long(cascade, requests[key])
            except Exception as e:  # a template error is this record's failure
                error = f"template: {_describe(e)}"
            if error is not None:
                requests.pop(key, None)
                finish(Entry(key, {"_id": record.get("_id"), "stage": self.spec.name,
                                   "error": error}, error=error), True)
        if self.cache is not None and self.cache_read and requests:
            keys = {k: self.cache_key(firsts[k], request) for k, request in requests.items()}
            found = await self.cache.get_many(list(keys.values()))
            for k, cache_key in keys.items():
                entry = found.get(cache_key) and self.answered(k, records[k], requests[k],
                                                               firsts[k], found[cache_key],
                                                               "cache")
                if entry:
                    del requests[k]
                    finish(entry, True)
        return requests

    def request(self, record: dict[str, Any]) -> Request:
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(record)})
        messages.append({"role": "user", "content": self.prompt.render(record)})
        return Request(messages=messages, params=self.spec.params,
                       prompt_cache=self.spec.prompt_cache, static_prefix=self.static_prefix,
                       schema=self.spec.schema if self.spec.structured else None)

    @staticmethod
    def too_long(clients: list["ModelClient"], request: Request) -> str | None:
        """Why `request` is sent to none of `clients`: its prompt is over each one's
        `max_input_tokens` (a record that is, fails before any request is paid for)."""
        from .llm.tokens import over

        tokens = None
        for client in clients:
            tokens = over(request.messages, client.spec.max_input_tokens)
            if tokens is None:
                return None
        limits = ", ".join(f"{c.spec.alias!r} ({c.spec.max_input_tokens:,})" for c in clients)
        return (f"the prompt is about {tokens:,} tokens, over max_input_tokens of {limits}: "
                "not sent")

    def cache_key(self, client: "ModelClient", request: Request) -> bytes:
        return self.key_makers[client.spec.alias](request)

    def trace_of(self, record: dict[str, Any], request: Request) -> dict[str, Any]:
        trace = {"_id": record.get("_id"), "stage": self.spec.name,
                 "request": {"messages": request.messages, "params": request.params},
                 "attempts": [], "cache_hit": False}
        if self.routes:
            trace["route"] = self.cascade(record)[0]
        return trace

    def answered(self, key: Key, record: dict[str, Any], request: Request,
                 client: "ModelClient", reply: Reply, source: str) -> Entry | None:
        """A journal entry for a reply that came from the local cache (`source` "cache":
        no cost) or from a provider batch ("batch": at the batch discount, and cached);
        None when it does not parse, so the request is sent again."""
        if source == "batch" and self.cache is not None:  # refused ones too: `process` finds
            self.cache.put(self.cache_key(client, request), reply)  # them and goes on
        try:
            value = self.parse(reply.text)
        except ValueError:
            return None
        if self.problem(record, value) is not None:
            return None  # refused: `process` goes on from it (a re-ask, the next model)
        prices = client.spec.price
        cost = 0.0 if source == "cache" else (price(client.spec.provider, prices, reply)
                                              * batch_share(prices))
        trace = self.trace_of(record, request)
        trace.update(model=client.spec.alias, model_name=reply.model, response=reply.text,
                     output=value, error=None, tokens=_tokens(reply), cost=round(cost, 8),
                     cost_full=round(full_price(prices, reply), 8))
        trace["cache_hit" if source == "cache" else "batch"] = True
        return Entry(key, trace, out=value)

    async def process(self, key: Key, record: dict[str, Any],
                      request: Request) -> Entry:
        """One record → its entry: output or error, and trace. Each model of the record's
        cascade is asked, and asked again up to `reask` times with what was wrong with its
        reply, until a reply parses, satisfies the schema and makes `accept` true."""
        trace = self.trace_of(record, request)
        tokens = dict.fromkeys(("in", "out", "cached", "cache_write"), 0)
        cost = cost_full = 0.0
        error = "no model answered"
        refused: list[dict[str, Any]] = []
        sent = False  # whether this record cost a request (else the cache answered it all)
        cascade = self.cascade(record)[1]
        usage: dict[str, dict[str, Any]] = {}  # per model, for the accounting

        def used(client: "ModelClient") -> dict[str, Any]:
            return usage.setdefault(client.spec.alias, {"requests": 0, "replies": 0,
                                                        "reasks": 0, "tokens_in": 0,
                                                        "tokens_out": 0, "cost": 0.0})

        def finished(entry: Entry) -> Entry:
            if self.routes or len(cascade) > 1 or self.spec.reask:
                entry.trace["models"] = {alias: {**u, "cost": round(u["cost"], 8)}
                                         for alias, u in usage.items()}
            return entry

        for n, client in enumerate(cascade):
            if n:
                trace.setdefault("escalations", []).append(
                    f"{cascade[n - 1].spec.alias} → {client.spec.alias}")
            ask = request
            for asked in range(self.spec.reask + 1):
                if asked:
                    ask = follow_up(ask, reply.text, why)
                    trace["reasks"] = trace.get("reasks", 0) + 1
                    used(client)["reasks"] += 1
                reply = None
                cache_key = self.cache_key(client, ask) if self.cache is not None else None
                # the first model's first reply was looked up with the shard; when it was
                # refused, it is found again here rather than asked again
                if cache_key is not None and self.cache_read and (n or asked or self.checks):
                    reply = (await self.cache.get_many([cache_key])).get(cache_key)
                why_not = self.too_long([client], ask) if reply is None else None
                if why_not is not None:  # the next model may take it
                    error = f"model {client.spec.alias!r}: {why_not}"
                    break
                if reply is None:
                    result = await client.complete(ask, self.spec.retries,
                                                   self.spec.outage_timeout)
                    for attempt in result.attempts:
                        attempt["model"] = client.spec.alias
                    trace["attempts"] += result.attempts
                    used(client)["requests"] += len(result.attempts) or 1
                    if result.reply is None:
                        error = f"model {client.spec.alias!r}: {result.error}"
                        break  # the next model
                    reply, sent = result.reply, True
                    for name, count in _tokens(reply).items():
                        tokens[name] += count
                    spent = price(client.spec.provider, client.spec.price, reply)
                    cost += spent
                    cost_full += full_price(client.spec.price, reply)
                    share = used(client)
                    share["replies"] += 1
                    share["tokens_in"] += reply.input_tokens
                    share["tokens_out"] += reply.output_tokens
                    share["cost"] += spent
                    trace.update(endpoint=result.endpoint, latency_ms=result.latency_ms)
                    if cache_key is not None:  # refused ones too: a rerun refuses them again
                        self.cache.put(cache_key, reply)
                trace.update(model=client.spec.alias, model_name=reply.model,
                             response=reply.text, tokens=tokens, cost=round(cost, 8),
                             cost_full=round(cost_full, 8))
                try:
                    value = self.parse(reply.text)
                    why = self.problem(record, value)
                except ValueError as e:
                    why = str(e)
                if why is None:
                    trace["output"] = value
                    trace["error"] = None
                    trace["cache_hit"] = not sent
                    if refused:
                        trace["refused"] = refused
                    return finished(Entry(key, trace, out=value))
                refused.append({"model": client.spec.alias, "reply": reply.text[:2000],
                                "why": why})
                error = f"model {client.spec.alias!r}: {why}"
        trace.update(error=error, tokens=tokens, cost=round(cost, 8), cost_full=round(cost_full, 8))
        if refused:
            trace["refused"] = refused
        return finished(Entry(key, trace, error=error))

    def problem(self, record: dict[str, Any], value: Any) -> str | None:
        """Why a parsed reply is refused: what the schema says of it, or the `accept`
        expression it leaves false; None when it is accepted."""
        if self.validate is not None:
            from fastjsonschema import JsonSchemaValueException

            try:
                self.validate(value)
            except JsonSchemaValueException as e:
                return f"it does not match the schema: {e.message}"
        if self.accept is not None:
            view = {**record, **value} if self.spec.spread else {**record, self.field: value}
            try:
                if not self.accept(view):
                    return f"`{self.spec.accept}` is false"
            except Exception as e:  # an error in the user's expression refuses the reply
                return f"`{self.spec.accept}` failed: {_describe(e)}"
        return None

    def parse(self, text: str) -> Any:
        if self.spec.parse == "text":
            return text.strip()
        body = text.strip()
        if body.startswith("```"):
            body = body.split("\n", 1)[-1].rsplit("```", 1)[0]
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"reply is not valid JSON ({e}): {text[:200]!r}") from None
        if self.spec.spread and not isinstance(value, dict):
            raise ValueError(f"reply is not a JSON object, as `fields: spread` needs: "
                             f"{text[:200]!r}")
        return value


class LLMShard:
    """A shard of an LLM stage: requests go out as records arrive, as many at once as
    the stage's models allow; each finished record is reported, then passed on."""

    def __init__(self, stage: LLMStage, shard: int, source: str, outlet: Outlet,
                 done: dict[Key, Entry], mode: str | None):
        self.stage, self.shard, self.source, self.outlet = stage, shard, source, outlet
        self.done, self.mode = done, mode
        self.records: dict[Key, dict[str, Any]] = {}
        self.finished: dict[Key, Entry] = {}
        self.trace: list[tuple[Key, dict[str, Any]]] = []
        self.out = _Collected(stage.spec.name)
        self.queue: deque[tuple[Key, Request]] = deque()
        self.workers: set[asyncio.Task[None]] = set()
        self.held = 0  # records the cost cap or the tripwire kept from being sent
        self.failure: BaseException | None = None  # what a worker raised (the shard fails)

    async def feed(self, batch: Batch) -> None:
        records = dict(zip(*batch))
        self.records.update(records)
        if self.stage.tripwire.tripped:
            self.held += len(records)
        elif self.mode is None:  # batch modes wait for the whole shard
            self.send_later(await self.stage.requests(records, self.done, self.complete))

    def complete(self, entry: Entry, new: bool = True) -> None:
        """One record is done: report it, keep its trace, pass it on (or keep its failure)."""
        self.finished[entry.key] = entry
        if new:
            self.stage.tripwire.watch(entry)
        self.outlet.entry(entry, new)
        self.out.counts.count(entry)
        self.trace.append((entry.key, entry.trace))
        record = self.records[entry.key]
        if entry.error is not None:
            line = failure(self.stage.spec.name, record, entry.error)
            if entry.trace.get("refused"):
                line["replies"] = entry.trace["refused"]  # every reply, and why it was refused
            self.out.errors.append((entry.key, line))
            return
        if self.stage.spec.spread:  # the reply's keys, but the record keeps its id
            record.update({k: v for k, v in entry.out.items() if k != "_id"})
        else:
            record[self.stage.field] = entry.out
        passed, data, change = self.out.encode(Batch([entry.key], [record]))
        self.outlet.emit(passed, data, change)

    def send_later(self, requests: dict[Key, Request]) -> None:
        self.queue.extend(requests.items())
        room = min(len(self.queue), self.stage.concurrency - len(self.workers))
        for _ in range(room):
            worker = self.outlet.spawn(self._work())
            self.workers.add(worker)
            worker.add_done_callback(self._ended)

    def _ended(self, worker: "asyncio.Task[None]") -> None:
        """A worker is done: its error, if any, is the shard's (kept, and so retrieved, even
        when no one is waiting on the workers then: a full disk fails them all)."""
        self.workers.discard(worker)
        if not worker.cancelled() and worker.exception() is not None and self.failure is None:
            self.failure = worker.exception()

    async def _work(self) -> None:
        process, queue = self.stage.process, self.queue
        while queue:
            if self.stage.tripwire.tripped:
                self.held += len(queue)
                queue.clear()
                return
            key, request = queue.popleft()
            try:
                entry = await process(key, self.records[key], request)
            except CostCap:  # no request goes out any more: the rest wait for the next run
                self.held += 1 + len(queue)
                queue.clear()
                return
            self.complete(entry)

    async def send(self, requests: dict[Key, Request]) -> None:
        """Send these and wait until every request of the shard is answered."""
        self.send_later(requests)
        await self._join()

    async def _join(self) -> None:
        """Wait for every worker; then raise the first one's error, if one failed."""
        while self.workers:
            await asyncio.gather(*self.workers, return_exceptions=True)
        if self.failure is not None:
            raise self.failure

    async def finish(self) -> StageOutput | Waiting:
        if self.mode is None:
            await self.send({})
        else:
            assert self.stage.batches is not None, "a shard in batch mode needs BatchMode"
            self.records = dict(sorted(self.records.items(), key=_first))
            if not await self.stage.batches.run(self, realtime_rest=self.mode == "collect"):
                return self._held() if self.held else "batches"
        if self.held:
            return self._held()
        return self.out.output(self.trace)

    def _held(self) -> Waiting:
        return "failing" if self.stage.tripwire.tripped else "max_cost"

    async def abandon(self) -> None:
        """Its replies in flight are paid for: they are journaled before the run ends (so
        the next run does not ask again), the queued requests are left for it."""
        self.queue.clear()
        await self._join()


def follow_up(request: Request, reply: str, why: str) -> Request:
    """The conversation asked again: the model's own reply, then what was wrong with it."""
    return dataclasses.replace(request, messages=[
        *request.messages, {"role": "assistant", "content": reply},
        {"role": "user", "content": f"That reply was not accepted: {why}. Answer again, "
                                    "correcting it; give only the answer."}])


def _tokens(reply: Reply) -> dict[str, int]:
    return {"in": reply.input_tokens, "out": reply.output_tokens,
            "cached": reply.cached_tokens, "cache_write": reply.cache_write_tokens}
