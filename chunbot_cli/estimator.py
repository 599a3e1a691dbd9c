"""`chunbot estimate`: the tokens and cost a run would spend, per stage and model, before
it sends a single request.

The estimate reads the input as `run` does and plans each shard by the same freshness
rules (plan.py), so only the stale part counts: the records each shard's first stale
stage would compute. Up to `sample` of those, chosen uniformly, go through the stages for
real: prompts are rendered and their tokens counted (llm/tokens.py, scaled by how the
model's own usage counted the prompts of earlier runs, from their traces, so that the count
is the vendor tokenizer's once a run has been made), routes are taken, filter and python
stages applied. A record the shard's journal (an interrupted run) or the
response cache already answers costs nothing and goes on with that answer. For the rest,
each model of the record's cascade is asked as often as earlier runs of the stage asked
it (state.json: re-asks, escalations), else only the first; a reply's output tokens are
the mean earlier runs or the cache measured, else `max_tokens`. What such a record carries
on is a stand-in of that length, so a filter that reads it keeps the share it kept in
earlier runs (or everything). Batch stages cost the batch share. The sample's totals are
scaled to every stale record.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

from . import templates
from .batchmode import batched
from .config import ModelSpec, Pipeline, StageSpec, import_callable
from .flow import Lines, parse
from .llm import tokens
from .llm.cache import KeyMaker, decode, open_store
from .llm.price import batch_share, cost
from .llm.types import Reply
from .plan import plan_shard
from .source import read_shards, resolve
from .stages import FANOUT, LLMStage, follow_up
from .state import Counters, ModelCounts, StageState
from .store import Entry, Journal, Key, Workdir

SAMPLE = 2000  # records rendered for real; a larger stale part is sampled and scaled
DEFAULT_OUTPUT_TOKENS = 256  # a reply's tokens when neither earlier replies nor max_tokens say
FOLLOW_UP_TOKENS = 30  # what a re-ask adds besides the reply it quotes
CALIBRATE = 500  # earlier prompts at most whose usage teaches a model's tokenizer


@dataclass
class ModelEstimate:
    requests: float = 0.0
    replies: float = 0.0
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": round(self.requests), "tokens_in": round(self.tokens_in),
                "tokens_out": round(self.tokens_out), "cost": round(self.cost, 6)}


@dataclass
class StageEstimate:
    stage: str
    kind: str
    records: float = 0.0  # records the stage would compute
    answered: float = 0.0  # of them, answered already (journal, cache): no cost
    mode: str = "realtime"
    output_from: str = ""  # where the output tokens come from: "earlier replies", …
    models: dict[str, ModelEstimate] = field(default_factory=dict)

    @property
    def tokens_in(self) -> float:
        return sum(m.tokens_in for m in self.models.values())

    @property
    def tokens_out(self) -> float:
        return sum(m.tokens_out for m in self.models.values())

    @property
    def cost(self) -> float:
        return sum(m.cost for m in self.models.values())

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.stage, "kind": self.kind,
                                "records": round(self.records)}
        if self.kind == "llm":
            data.update(answered=round(self.answered), tokens_in=round(self.tokens_in),
                        tokens_out=round(self.tokens_out), cost=round(self.cost, 6),
                        mode=self.mode, output_tokens_from=self.output_from,
                        models={alias: m.to_json() for alias, m in self.models.items()})
        return data


@dataclass
class Estimate:
    pipeline: str
    records: int  # input records read
    stale: int  # records that enter a stale stage (their shard's first)
    sampled: int  # of them, rendered for real
    stages: list[StageEstimate]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cost(self) -> float:
        return sum(stage.cost for stage in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "records": self.records, "stale": self.stale,
                "sampled": self.sampled, "extrapolated": self.sampled < self.stale,
                "cost": round(self.cost, 6), "stages": [s.to_json() for s in self.stages],
                "notes": self.notes, "seconds": round(self.seconds, 3)}


def estimate(pipeline: Pipeline, limit: int | None = None, sample: int = SAMPLE,
             seed: int = 0) -> Estimate:
    """What `run` (with `--limit`) would spend now; sends nothing and writes nothing."""
    started = time.monotonic()
    work = _Estimator(pipeline, sample, seed)
    try:
        result = work.walk(limit)
    finally:
        work.close()
    result.seconds = time.monotonic() - started
    return result


@dataclass
class _Item:
    """A sampled record: where it enters the pipeline, and from what."""

    shard: int
    start: int  # the position of its shard's first stale stage
    source: str  # what that stage reads (plan.py's source token)
    place: int  # its place in the input shard, or in the upstream part file
    line: bytes | None  # the input line; None: it is in the upstream part file
    first_id: int  # the input shard's first line: ids of records without `id_field`


class _Reservoir:
    """A uniform sample of `size` items from a stream of unknown length, drawing a random
    number only per item taken (Li's algorithm L), so a million lines cost no more than a
    thousand."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.items, self.seen = size, rng, [], 0
        self.w = math.exp(math.log(rng.random()) / size) if size else 0.0
        self.next = size + self._skip()

    def _skip(self) -> int:
        return int(math.log(self.rng.random()) / math.log(1 - self.w)) + 1 if self.w else 0

    def offer(self, count: int, make: Callable[[int], Any]) -> None:
        """`count` more items; `make(j)` builds the j-th of them if it is taken."""
        first = self.seen
        self.seen += count
        for j in range(min(count, self.size - len(self.items))):  # filling up
            self.items.append(make(j))
        while self.size and self.next <= self.seen:  # `next`: 1-based, over every item
            self.items[self.rng.randrange(self.size)] = make(self.next - 1 - first)
            self.w *= math.exp(math.log(self.rng.random()) / self.size)
            self.next += self._skip()


class _StandIn(str):
    """What an LLM stage would answer, as far as the estimate can tell: text of the
    expected length that any field or key of it also stands for (`{{ facts.product }}`)."""

    def __getattr__(self, name: str) -> "_StandIn":
        if name.startswith("_"):
            raise AttributeError(name)
        return self

    def __getitem__(self, key: Any) -> Any:
        return self if isinstance(key, str) else str.__getitem__(self, key)


@dataclass
class _Unasked:
    """A model as LLMStage sees it, for an estimate: its spec, never asked."""

    spec: ModelSpec


class _Estimator:
    def __init__(self, pipeline: Pipeline, sample: int, seed: int):
        self.pipeline = pipeline
        self.stages = pipeline.stages
        self.workdir = Workdir(pipeline.workdir, pipeline.compress)
        self.saved = (self.workdir.load_state().stages if pipeline.workdir.exists()
                      else {})
        self.reservoir = _Reservoir(sample, random.Random(seed))
        self.rows = {s.name: StageEstimate(s.name, s.kind) for s in self.stages}
        self.notes: list[str] = []
        self.store = self._open_cache()
        models = {alias: _Unasked(spec) for alias, spec in pipeline.models.items()}
        self.llm = {s.name: LLMStage(s, models) for s in self.stages if s.kind == "llm"}
        self.keys = {(s.name, alias): KeyMaker(pipeline.models[alias], s.params,
                                               s.cache_namespace)
                     for s in self.stages if s.kind == "llm" and s.cache for alias in s.models}
        self.filters = {s.name: (templates.compile_expression(s.filter or ""),
                                 templates.fields_used(s.filter or "", expression=True))
                        for s in self.stages if s.kind == "filter"}
        self.functions = {s.name: import_callable(s.python or "", pipeline.import_paths)
                          for s in self.stages if s.kind == "python"}
        self.history = _History(self.workdir, self.saved, self.stages)
        self.journals: dict[tuple[int, int], tuple[dict[Key, Entry], str]] = {}
        self.part_records: dict[tuple[int, int], tuple[list[dict[str, Any]], list[Key]]] = {}
        self.kept: dict[str, float] = {}  # filters kept at a share instead of applied
        self.failing: dict[str, list[Any]] = {}  # per stage: records its templates fail, why

    def _open_cache(self) -> Any:
        spec = self.pipeline.cache
        if not spec.enabled or not any(s.kind == "llm" and s.cache for s in self.stages):
            return None
        if spec.backend == "sqlite":
            from .llm.cache import default_path

            path = spec.path or str(default_path())
            if not os.path.exists(path):
                return None  # no cache yet: nothing to ask, and none to create
        try:
            return open_store(spec)
        except Exception as e:  # an unreachable Redis: the estimate goes on without it
            self.notes.append(f"the response cache could not be read ({type(e).__name__}: "
                              f"{e}): records it may answer are counted as sent")
            return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # the walk
    def walk(self, limit: int | None) -> Estimate:
        lines = 0
        for shard in read_shards(resolve(self.pipeline.input), self.pipeline.shard_size,
                                 limit, self.pipeline.max_line_bytes):
            lines += len(shard.lines)
            planned = plan_shard(self.stages, self.stages, self.saved, shard.index,
                                 shard.digest, self._has_part, lambda *_: False)
            if planned.start is None:
                continue
            start, index, first = planned.start, shard.index, shard.start
            if start == 0:
                held = shard.lines
                self.reservoir.offer(len(held), lambda j: _Item(
                    index, 0, planned.source, j, held[j], first))
            else:
                upstream = self.saved[self.stages[start - 1].name].shards[index]
                self.reservoir.offer(upstream.counts.records_out, lambda j: _Item(
                    index, start, planned.source, j, None, first))
        items = self.reservoir.items
        for item in items:
            self._simulate(item)
        stale = self.reservoir.seen
        scale = stale / len(items) if items else 0.0
        self._settle(scale)
        if items and len(items) < stale:
            self.notes.insert(0, f"a uniform sample of {len(items):,} of the {stale:,} records "
                                 f"to compute was rendered; the figures are scaled ×{scale:,.1f}")
        return Estimate(self.pipeline.name, lines, stale, len(items),
                        list(self.rows.values()), self.notes)

    def _has_part(self, stage: StageSpec, shard: int) -> bool:
        return self.workdir.part_path(stage.name, shard).exists()

    # one record through the stages
    def _simulate(self, item: _Item) -> None:
        found = self._entering(item)
        if found is None:
            return
        record, key = found
        weight, unknown = 1.0, set()  # fields only stand-ins hold
        source = item.source
        for position in range(item.start, len(self.stages)):
            spec = self.stages[position]
            row = self.rows[spec.name]
            row.records += weight
            if spec.kind == "filter":
                predicate, reads = self.filters[spec.name]
                if reads & unknown or "*" in unknown:
                    weight *= self._kept_share(spec)
                else:
                    try:
                        if not predicate(record):
                            return
                    except Exception:  # the run fails this record: it costs nothing more
                        return
            elif spec.kind == "python":
                try:
                    result = self.functions[spec.name](dict(record))
                except Exception:
                    if not unknown:
                        return  # it fails in the run as well
                    result = record  # it may fail only on the stand-ins: assume it passes
                if result is None or result == []:
                    return
                if isinstance(result, list):
                    weight *= len(result)
                    result, key = result[0], key * FANOUT
                record = dict(result) if isinstance(result, dict) else record
            else:
                done, source_after = self._journal(item.shard, position, source)
                record = self._ask(spec, record, key, done, weight, unknown)
                if record is None:
                    return
                source = source_after
                continue
            source = self._token(spec, source)

    def _entering(self, item: _Item) -> tuple[dict[str, Any], Key] | None:
        """The record as its first stale stage gets it, and its key there."""
        if item.line is not None:  # read as the run reads it; a line that is no record
            lines = Lines([item.line], item.first_id + item.place, [("", 0, 1)],  # (where
                          self.pipeline.id_field)  # it is matters only for the run's errors)
            records = parse(lines, self.stages[0].name)[0].records  # fails and costs nothing
            return (records[0], item.place) if records else None
        records, keys = self._part(item.shard, item.start, item.source)
        if item.place >= len(records):
            return None
        return records[item.place], keys[item.place]

    def _part(self, shard: int, start: int, source: str) -> tuple[list[dict[str, Any]],
                                                                   list[Key]]:
        if (shard, start) not in self.part_records:
            upstream = self.stages[start - 1]
            from .store import read_lines

            records = read_lines(self.workdir.part_path(upstream.name, shard),
                                 self.pipeline.compress)
            keys = self.workdir.read_keys(self.stages[start].name, shard, source)
            if keys is None or len(keys) != len(records):
                keys = list(range(len(records)))
            self.part_records[(shard, start)] = (records, keys)
        return self.part_records[(shard, start)]

    def _journal(self, shard: int, position: int, source: str) -> tuple[dict[Key, Entry], str]:
        """What an interrupted run finished of this stage's shard, and the token the shard
        will commit with (what the next stage's journal was made from)."""
        if (shard, position) not in self.journals:
            spec = self.stages[position]
            journal = Journal(self.workdir.journal_path(spec.name, shard),
                              {"stage": spec.name, "fingerprint": spec.fingerprint,
                               "src": source})
            self.journals[(shard, position)] = (journal.load(), journal.token)
        return self.journals[(shard, position)]

    def _token(self, spec: StageSpec, source: str) -> str:
        """A filter or python stage's commit token, as the run will make it."""
        saved = self.saved.get(spec.name)
        if saved is None or saved.fingerprint != spec.fingerprint:
            return "new"  # the stage starts afresh: nothing downstream was made from it
        return saved.token(source)

    def _ask(self, spec: StageSpec, record: dict[str, Any], key: Key,
             done: dict[Key, Entry], weight: float, unknown: set[str]) -> dict[str, Any] | None:
        """One record of an LLM stage: what it costs, and the record it passes on."""
        stage, row = self.llm[spec.name], self.rows[spec.name]
        entry = done.get(key)
        if entry is not None and entry.trace.get("_id") == record.get("_id"):
            row.answered += weight
            return None if entry.failed else self._with(spec, record, entry.out, unknown, False)
        try:
            request = stage.request(record)
            cascade = [client.spec for client in stage.cascade(record)[1]]
        except Exception as e:  # a template that fails on this record: it fails in the run
            failing = self.failing.setdefault(spec.name, [0.0, f"{type(e).__name__}: {e}"])
            failing[0] += weight
            return None
        first, value = self._replay(spec, stage, record, request, cascade)
        if first is None:
            row.answered += weight
            return self._with(spec, record, value, unknown, False)
        counted = tokens.prompt_tokens(request.messages)
        visits = 1.0
        for n, model in enumerate(cascade[first:], first):
            if n > first:
                visits *= self.history.escalated(spec, cascade[n - 1].alias, model.alias)
                if not visits:
                    break
            asks = self.history.asks(spec, model.alias)
            out = self.history.output_tokens(spec, model.alias)
            prompt = counted * self.history.tokenizer(spec, model.alias)
            counts = row.models.setdefault(model.alias, ModelEstimate())
            counts.requests += weight * visits * asks
            counts.replies += weight * visits * asks
            counts.tokens_in += weight * visits * (prompt * asks + (asks - 1) * (
                out + FOLLOW_UP_TOKENS))
        if len(cascade) > first + 1 and not self.history.escalated(spec, cascade[first].alias,
                                                            cascade[first + 1].alias):
            self._note_once(f"{spec.name}: no earlier run says how often "
                            f"{cascade[first].alias!r} is refused, so the models after it "
                            "are not counted: the cost of escalations is left out")
        length = int(self.history.output_tokens(spec, cascade[first].alias)) * 4
        return self._with(spec, record, _StandIn(("word " * (length // 5 + 1))[:length]),
                          unknown, True)

    def _replay(self, spec: StageSpec, stage: LLMStage, record: dict[str, Any], request: Any,
                cascade: list[ModelSpec]) -> tuple[int | None, Any]:
        """What the response cache gives this record, asked as the run asks it: each model
        of its cascade, each re-ask with what was wrong. (None, the accepted value) when
        the cache answers it all; else the place in the cascade where a request goes out."""
        for n, model in enumerate(cascade):
            ask = request
            for asked in range(spec.reask + 1):
                if asked:
                    ask = follow_up(ask, reply.text, why)
                reply = self._cached(spec, model, ask)
                if reply is None:
                    return n, None
                try:
                    value = stage.parse(reply.text)
                    why = stage.problem(record, value)
                except ValueError as e:
                    why = str(e)
                if why is None:
                    return None, value
        return 0, None  # every cached reply refused: the run fails it; count it as sent

    def _note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _with(self, spec: StageSpec, record: dict[str, Any], value: Any, unknown: set[str],
              stand_in: bool) -> dict[str, Any]:
        field = spec.output or spec.name
        record = dict(record)
        if spec.spread:
            if stand_in:
                unknown.add("*")  # which fields a reply spreads is not known
            elif isinstance(value, dict):
                record.update({k: v for k, v in value.items() if k != "_id"})
            return record
        record[field] = value
        if stand_in:
            unknown.add(field)
        else:
            unknown.discard(field)
        return record

    def _cached(self, spec: StageSpec, model: ModelSpec, request: Any) -> Reply | None:
        if self.store is None or not spec.cache:
            return None
        cache_key = self.keys[(spec.name, model.alias)](request)
        found = self.store.get_many([cache_key]).get(cache_key)
        if found is None:
            return None
        reply = decode(found)
        self.history.cached_out.setdefault((spec.name, model.alias), []).append(
            reply.output_tokens)
        return reply

    def _kept_share(self, spec: StageSpec) -> float:
        """The share of records a filter on a reply kept in earlier runs (else all)."""
        if spec.name not in self.kept:
            saved = self.saved.get(spec.name)
            totals = saved.totals() if saved is not None else None
            if totals is None or not totals.records_in:
                self.notes.append(f"{spec.name}: the filter reads replies no run has given "
                                  "yet: every record is assumed to pass (an upper bound)")
                self.kept[spec.name] = 1.0
            else:
                self.kept[spec.name] = totals.records_out / totals.records_in
        return self.kept[spec.name]

    # the totals
    def _settle(self, scale: float) -> None:
        for spec in self.stages:
            row = self.rows[spec.name]
            row.records *= scale
            row.answered *= scale
            if spec.kind != "llm":
                continue
            discount = 1.0
            if batched(self.pipeline, spec):
                row.mode = "batch"
                discount = batch_share(self.pipeline.models[spec.models[0]].price)
            cached = self.history.cached_share(spec)
            sources = []
            for alias, counts in row.models.items():
                model = self.pipeline.models[alias]
                counts.requests *= scale
                counts.replies *= scale
                counts.tokens_in *= scale
                counts.tokens_out = counts.replies * self.history.output_tokens(spec, alias)
                counts.cost = cost(model.provider, model.price, counts.tokens_in,
                                   counts.tokens_out, counts.tokens_in * cached) * discount
                sources.append(self.history.output_from(spec, alias))
                if not model.price and counts.requests:
                    self.notes.append(f"{spec.name}: model {alias!r} has no price: its "
                                      "tokens are counted, not their cost")
            row.output_from = ", ".join(dict.fromkeys(sources))
            if spec.name in self.failing:
                count, why = self.failing[spec.name]
                self.notes.append(f"{spec.name}: {count * scale:,.0f} record(s) fail its "
                                  f"templates and would cost nothing ({why})")
            if row.output_from.startswith(("max_tokens", "a guess")) and row.models:
                self.notes.append(f"{spec.name}: no replies of this stage yet, so each is "
                                  f"counted at {row.output_from}; a run with --limit 100 "
                                  "first makes it closer")


class _History:
    """What earlier runs of the stages measured, for an estimate: per stage and model the
    requests, replies, re-asks, escalations and tokens of committed shards (state.json) and
    of what interrupted runs finished (journals); how each model's tokenizer counted the
    stage's prompts against llm/tokens.py (traces); output tokens of cached replies."""

    def __init__(self, workdir: Workdir, saved: dict[str, StageState], stages: list[StageSpec]):
        self.workdir, self.saved = workdir, saved
        self.cached_out: dict[tuple[str, str], list[int]] = {}  # output tokens of cache hits
        self.ratios: dict[tuple[str, str], list[float]] = {}  # (stage, model): tokens the
        # model's usage counted, llm/tokens.py's count of the same prompts, how many
        self.counts = {s.name: self.measured(s) for s in stages if s.kind == "llm"}

    def measured(self, spec: StageSpec) -> Counters:
        """What the stage's earlier runs did: its committed shards (state.json) and the
        records interrupted runs finished (its journals)."""
        saved = self.saved.get(spec.name)
        counts = saved.totals() if saved is not None else Counters()
        folder = self.workdir.stage_dir(spec.name)
        for path in sorted(folder.glob("part-*.journal")) if folder.is_dir() else ():
            try:
                lines = path.read_bytes().split(b"\n")[1:]
            except OSError:
                continue
            for line in lines:
                try:
                    entry = Entry.from_json(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
                if entry is not None:
                    counts.count(entry)
                    self.calibrate(spec, entry.trace)
        if saved is not None and saved.shards:
            for trace in self.workdir.read_trace(spec.name, min(saved.shards))[:CALIBRATE]:
                self.calibrate(spec, trace)
        return counts

    def calibrate(self, spec: StageSpec, trace: dict[str, Any]) -> None:
        """Learn how the model's tokenizer counts against llm/tokens.py's, from a prompt
        asked once whose usage the trace keeps."""
        messages = (trace.get("request") or {}).get("messages")
        if not messages or trace.get("cache_hit"):
            return
        by_model = trace.get("models")
        if isinstance(by_model, dict):  # a cascade's: each model asked once is a measure
            asked = [(alias, used.get("tokens_in", 0)) for alias, used in by_model.items()
                     if isinstance(used, dict) and used.get("replies") == 1
                     and not used.get("reasks")]
        else:
            asked = [(str(trace.get("model")), (trace.get("tokens") or {}).get("in", 0))]
        for alias, used in asked:
            seen = self.ratios.setdefault((spec.name, alias), [0.0, 0.0, 0])
            if seen[2] >= CALIBRATE or not used:
                continue
            try:
                seen[1] += tokens.prompt_tokens(messages)
            except (TypeError, AttributeError):  # a trace chunbot did not write
                return
            seen[0] += used
            seen[2] += 1

    def tokenizer(self, spec: StageSpec, alias: str) -> float:
        used, counted, _ = self.ratios.get((spec.name, alias), (0.0, 0.0, 0))
        return used / counted if counted else 1.0

    def model(self, spec: StageSpec, alias: str) -> ModelCounts | None:
        counts = self.counts[spec.name].models.get(alias)
        return counts if counts is not None and counts.requests else None

    def replies(self, counts: ModelCounts) -> int:
        return counts.replies or counts.requests  # state.json from before replies were kept

    def asks(self, spec: StageSpec, alias: str) -> float:
        """Requests per record that comes to this model: re-asks included."""
        counts = self.model(spec, alias)
        if counts is None or not spec.reask:
            return 1.0
        replies = self.replies(counts)
        return replies / max(1, replies - counts.reasks)

    def escalated(self, spec: StageSpec, before: str, after: str) -> float:
        """The share of the records that came to `before` that went on to `after`."""
        counts = self.model(spec, before)
        if counts is None:
            return 0.0
        escalations = self.counts[spec.name].escalations.get(f"{before} → {after}", 0)
        return min(1.0, escalations / max(1, self.replies(counts) - counts.reasks))

    def output_tokens(self, spec: StageSpec, alias: str) -> float:
        most = spec.params.get("max_tokens") or spec.params.get("max_completion_tokens")
        counts = self.model(spec, alias)
        if counts is not None and counts.tokens_out:
            mean = counts.tokens_out / self.replies(counts)
        elif self.cached_out.get((spec.name, alias)):
            found = self.cached_out[(spec.name, alias)]
            mean = sum(found) / len(found)
        else:
            return most or DEFAULT_OUTPUT_TOKENS
        return min(mean, most) if most else mean

    def output_from(self, spec: StageSpec, alias: str) -> str:
        if self.model(spec, alias) is not None:
            return "earlier replies"
        if self.cached_out.get((spec.name, alias)):
            return "cached replies"
        most = spec.params.get("max_tokens") or spec.params.get("max_completion_tokens")
        return f"max_tokens ({most})" if most else f"a guess of {DEFAULT_OUTPUT_TOKENS}"

    def cached_share(self, spec: StageSpec) -> float:
        """The share of input tokens the provider's prompt cache took in earlier runs."""
        totals = self.counts[spec.name]
        return totals.tokens_cached / totals.tokens_in if totals.tokens_in else 0.0


def render(result: Estimate) -> str:
    """A plain-text table, like the run summary: per stage and model, and the total."""
    lines = [f"estimate for {result.pipeline}: {result.records:,} input records, "
             f"{result.stale:,} to compute"]
    header = ("stage", "model", "records", "answered", "requests", "tok in", "tok out",
              "cost")
    rows = [header]
    for stage in result.stages:
        if stage.kind != "llm":
            rows.append((stage.stage, f"({stage.kind})", f"{stage.records:,.0f}", "", "",
                         "", "", ""))
            continue
        models = stage.models or {"-": ModelEstimate()}
        for n, (alias, m) in enumerate(models.items()):
            first = n == 0
            rows.append((stage.stage if first else "", alias,
                         f"{stage.records:,.0f}" if first else "",
                         f"{stage.answered:,.0f}" if first else "", f"{m.requests:,.0f}",
                         f"{m.tokens_in:,.0f}", f"{m.tokens_out:,.0f}", f"${m.cost:,.4f}"))
    rows.append(("total", "", "", "", "", f"{sum(s.tokens_in for s in result.stages):,.0f}",
                 f"{sum(s.tokens_out for s in result.stages):,.0f}", f"${result.cost:,.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    for stage in result.stages:
        if stage.mode == "batch":
            lines.append(f"{stage.stage}: batch mode: at the batch price")
    lines += result.notes
    return "\n".join(lines)
