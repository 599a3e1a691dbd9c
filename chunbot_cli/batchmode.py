"""Batch mode: one shard of an LLM stage through the provider's batch API, and the ledger
(`<stage>/batches.json`) that makes it safe to crash at any point.

A shard's ledger names the batches it waits for. The intent (a random id carried by every
item's custom_id and, where the provider keeps metadata, by the batch) is saved before a
batch is created and each batch id right after, so a crash in between is reconciled with
the provider's list of recent batches instead of creating a second one. A run collects
finished batches; items that failed go into a new batch (up to the stage's `retries`
rounds) or, with `batch_fallback: realtime` or past `batch_deadline`, to realtime. A
realtime run that finds batches an earlier batch-mode run left (`realtime_rest`) creates
none: it collects them and sends only the rest, in realtime, so nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

from .llm.types import Reply, Request
from .store import Entry, Key, failpoint

# `--wait` asks about new batches after this many seconds, then twice as long each time up
# to the poll interval: a small batch done in seconds is collected within seconds of it, a
# day-long one costs a request per interval (a fixed 30 s made a 3 s batch wait 30.7 s)
FIRST_POLL_S = 1.0

if TYPE_CHECKING:
    from .config import Pipeline, StageSpec
    from .llm.batch import BatchAPI, BatchState
    from .stages import LLMShard
    from .store import Workdir


@dataclass
class Ledger:
    """A shard's entry in batches.json."""

    src: str | None = None  # the input it was made for, and the stage's definition:
    fingerprint: str | None = None  # batches made for others are not this shard's
    intent: str | None = None
    intent_at: float = 0.0  # Unix time
    batches: list[str] = field(default_factory=list)
    items: int = 0
    rounds: int = 0  # batches made again for failed items
    errors: dict[str, str] = field(default_factory=dict)  # why an item had no reply
    past_deadline: bool = False  # what is not done goes realtime
    reserved: float = 0.0  # USD its batches may cost: held under a cost cap till collected

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Ledger":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and v is not None})

    @property
    def pending(self) -> bool:
        """Batches exist, or may exist (an intent whose batch id was not recorded)."""
        return bool(self.batches or self.intent)

    def made(self, batch: "BatchState") -> bool:
        """Whether a batch found at the provider is the one this intent created: by the
        intent in its metadata (OpenAI), or — Anthropic batches carry none — by being
        created just after the intent with as many items."""
        if batch.metadata:
            return batch.metadata.get("intent") == self.intent
        return (batch.items == self.items
                and self.intent_at - 5 <= batch.created <= self.intent_at + 600)

    def custom_id(self, key: Key) -> str:
        """A batch item's id: the intent that sent it, and its place in the shard. A batch
        adopted by mistake after a crash (Anthropic's are matched by time and size) has
        none of this intent's ids, so its items are simply sent again, never taken for
        ours."""
        return f"{self.intent}-{key}"


class Ledgers:
    """One stage's batches.json: a Ledger per shard, written atomically on every change
    (with no workdir, memory storage: kept for the run only)."""

    def __init__(self, workdir: "Workdir | None", stage: str):
        self.workdir, self.stage = workdir, stage
        self.shards = {} if workdir is None else {
            int(k): Ledger.from_json(v) for k, v in workdir.load_batches(stage).items()}

    def pending(self, shard: int, source: str, fingerprint: str) -> bool:
        ledger = self.shards.get(shard)
        return (ledger is not None and ledger.pending and ledger.src == source
                and ledger.fingerprint == fingerprint)

    def open(self, shard: int, source: str, fingerprint: str) -> Ledger:
        """The shard's ledger; a fresh one when the one there was made for other input or
        another definition of the stage."""
        ledger = self.shards.get(shard)
        if ledger is None or ledger.src not in (None, source) \
                or ledger.fingerprint not in (None, fingerprint):
            ledger = self.shards[shard] = Ledger()
        ledger.src, ledger.fingerprint = source, fingerprint
        return ledger

    def close(self, shard: int) -> None:
        """The shard is done with batches."""
        self.shards.pop(shard, None)
        self.save()

    def save(self) -> None:
        if self.workdir is None:
            return
        self.workdir.save_batches(self.stage, {str(k): asdict(v)
                                               for k, v in sorted(self.shards.items())})


def batched(pipeline: "Pipeline", stage: "StageSpec", override: str | None = None) -> bool:
    """Whether the stage's requests go through its model's batch API (`mode: batch`, or
    `--mode batch` as `override`)."""
    return ((override or stage.mode) == "batch" and not stage.routes  # a batch goes to one
            and pipeline.models[stage.models[0]].batch_api)  # model


class Batching:
    """Which shards of a run's LLM stages go through provider batches: those of a stage in
    batch mode (the YAML or `--mode batch`, when the model has a batch API), and — in a
    realtime run — those an earlier batch-mode run left batches for, which are collected
    rather than paid for twice. `keep` False (memory storage): no ledgers are read."""

    def __init__(self, pipeline: "Pipeline", workdir: "Workdir", mode: str | None,
                 wait: bool, poll_s: float, note: Callable[[str], None], keep: bool = True):
        self.pipeline, self.workdir, self.override = pipeline, workdir, mode
        self.wait, self.poll_s, self.note, self.keep = wait, poll_s, note, keep
        self.ledgers: dict[str, Ledgers] = {}  # batches.json per stage
        self.collecting: set[str] = set()  # realtime stages collecting earlier batches

    def batched(self, stage: "StageSpec") -> bool:
        return batched(self.pipeline, stage, self.override)

    def mode(self, stage: "StageSpec", shard: int, source: str) -> str | None:
        """A shard's mode for `LLMStage.open`: "batch", "collect" or None (realtime)."""
        if self.batched(stage):
            return "batch"
        return "collect" if self._pending(stage, shard, source) else None

    def batch_mode(self, stage: "StageSpec", session: Any) -> "BatchMode | None":
        """The stage's BatchMode, when any of its shards may need one."""
        if not self.batched(stage) and not (self.keep and self._ledgers(stage).shards):
            return None
        from .llm.batch import batch_api

        return BatchMode(self._ledgers(stage),
                         batch_api(self.pipeline.models[stage.models[0]], session),
                         {"chunbot_pipeline": self.pipeline.name, "chunbot_stage": stage.name},
                         self.wait, self.poll_s)

    def reserved(self, stages: list["StageSpec"]) -> float:
        """What the batches earlier runs made for these stages, not collected yet, may
        cost: in flight, for a cost cap."""
        if not self.keep:
            return 0.0
        return sum(ledger.reserved for stage in stages if stage.kind == "llm"
                   for ledger in self._ledgers(stage).shards.values()
                   if ledger.pending and ledger.fingerprint == stage.fingerprint)

    def _pending(self, stage: "StageSpec", shard: int, source: str) -> bool:
        if not self.keep:
            return False
        pending = self._ledgers(stage).pending(shard, source, stage.fingerprint)
        if pending and stage.name not in self.collecting:
            self.collecting.add(stage.name)
            self.note(f"stage {stage.name!r}: provider batches of an earlier batch-mode run "
                      "are pending: collecting them instead of sending their requests again "
                      f"(`chunbot cancel {self.pipeline.path} --stage {stage.name}` gives up "
                      "on them; what they did not answer then goes in realtime)")
        return pending

    def _ledgers(self, stage: "StageSpec") -> Ledgers:
        if stage.name not in self.ledgers:
            self.ledgers[stage.name] = Ledgers(self.workdir if self.keep else None, stage.name)
        return self.ledgers[stage.name]


class BatchMode:
    """How one LLM stage's shards go through the provider's batch API: its ledgers, the
    API, and whether a run waits for the batches (`--wait`) or leaves them pending."""

    def __init__(self, ledgers: Ledgers, api: "BatchAPI", metadata: dict[str, str],
                 wait: bool = False, poll_s: float = 30.0):
        self.ledgers, self.api, self.metadata = ledgers, api, metadata
        self.wait, self.poll_s = wait, poll_s

    async def run(self, shard: "LLMShard", realtime_rest: bool = False) -> bool:
        """Finish the shard's records through batches; False while they are pending."""
        self.ledgers.open(shard.shard, shard.source, shard.stage.spec.fingerprint)
        delay, waited_for = 0.0, None
        while True:
            if await self._round(shard, realtime_rest):
                return True
            if not self.wait or shard.held:  # the cost cap: waiting would not change it
                return False
            batches = self.ledgers.shards[shard.shard].batches
            if batches != waited_for:  # new batches (a retry round's too) may be quick
                delay, waited_for = min(FIRST_POLL_S, self.poll_s), list(batches)
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.poll_s)

    async def _round(self, shard: "LLMShard", realtime_rest: bool) -> bool:
        from .llm.batch import split

        stage, ledgers, api = shard.stage, self.ledgers, self.api
        ledger = ledgers.shards[shard.shard]
        todo = {k: r for k, r in shard.records.items() if k not in shard.finished}
        requests = await stage.requests(todo, shard.done, shard.complete)
        client = stage.clients[0]
        if requests and not ledger.batches:
            if ledger.intent:
                found = [b.id for b in await api.recent() if ledger.made(b)]
                if found:
                    ledger.batches = found
                    ledgers.save()
                    return False
            if realtime_rest:
                await shard.send(requests)
                ledgers.close(shard.shard)
                return True
            if not self._afford(client, ledger, requests):
                shard.held = len(requests)
                return False
            ledger.intent, ledger.intent_at = os.urandom(6).hex(), time.time()
            ledger.batches, ledger.items = [], len(requests)
            ledgers.save()
            items = [(ledger.custom_id(key), request) for key, request in requests.items()]
            metadata = {**self.metadata, "chunbot_shard": str(shard.shard),
                        "intent": ledger.intent}
            for part in split(items, client.spec):
                batch_id = await api.submit(part, metadata)
                failpoint("batch-created")
                ledger.batches.append(batch_id)
                ledgers.save()
            return False
        if requests:
            states = [await api.state(batch_id) for batch_id in ledger.batches]
            if not all(state.done for state in states):
                deadline = stage.spec.batch_deadline
                if deadline and time.time() - ledger.intent_at > deadline \
                        and not ledger.past_deadline:
                    ledger.past_deadline = True
                    ledgers.save()
                    for state in states:
                        if not state.done:
                            await api.cancel(state.id)
                return False
            results: dict[str, Any] = {}
            for batch_id in ledger.batches:
                results.update(await api.results(batch_id))
            retry: dict[Key, Request] = {}
            refused: dict[Key, Request] = {}  # answered, but not as the stage accepts
            collected = 0.0  # what the batches' replies cost
            for key, request in requests.items():
                result = results.get(ledger.custom_id(key), "not in the batch's results")
                entry = (stage.answered(key, shard.records[key], request, client, result,
                                        "batch") if isinstance(result, Reply) else None)
                if entry is not None:
                    collected += entry.trace["cost"]
                    shard.complete(entry)
                elif isinstance(result, Reply) and stage.checks:
                    refused[key] = request
                else:
                    retry[key] = request
                    ledger.errors[str(key)] = (f"the reply does not parse: {result.text[:200]!r}"
                                               if isinstance(result, Reply) else str(result))
            if client.spending is not None:  # what their reservation held becomes spent
                client.spending.settle(ledger.reserved, collected)
            ledger.reserved = 0.0
            if refused:  # re-asked and escalated in realtime, from the batch's reply
                await shard.send(refused)
            if retry and (stage.spec.batch_fallback or ledger.past_deadline or realtime_rest):
                await shard.send(retry)
            elif retry and ledger.rounds + 1 <= stage.spec.retries:
                ledger.rounds += 1
                ledger.batches, ledger.intent = [], None  # a new batch for them
                return await self._round(shard, realtime_rest)
            else:
                for key in retry:
                    error = f"model {client.spec.alias!r}: {ledger.errors[str(key)]}"
                    trace = stage.trace_of(shard.records[key], requests[key])
                    trace["error"] = error
                    shard.complete(Entry(key, trace, error=error))
        ledgers.close(shard.shard)
        return True

    @staticmethod
    def _afford(client: Any, ledger: Ledger, requests: dict[Key, Request]) -> bool:
        """Whether a batch of these fits under the run's cost cap; what it may cost is
        reserved in its ledger until its replies come back, in this run or a later one."""
        if client.spending is None:
            return True
        from .llm.price import CostCap, batch_share

        most = sum(map(client.most_cost, requests.values())) * batch_share(client.spec.price)
        try:
            ledger.reserved += client.spending.reserve(most)
        except CostCap:
            return False
        return True


def pending_batches(pipeline: "Pipeline", stage: str | None = None,
                    cancel: bool = False) -> list[dict[str, Any]]:
    """The provider batches shards wait for (however batch mode was chosen: the YAML or
    `--mode batch`), with their state at the provider, asked now; with `cancel`,
    cancelled first. A later `run` collects what they finished and sends the rest again.
    Without the model's API key, they are listed unasked (cancelling needs it)."""
    from .config import ConfigError, check_api_keys
    from .store import Workdir

    workdir = Workdir(pipeline.workdir, pipeline.compress)
    chosen = [pipeline.stage(stage)] if stage else [s for s in pipeline.stages
                                                    if s.kind == "llm"]
    ledgers = {s.name: Ledgers(workdir, s.name) for s in chosen}
    stages = [s for s in chosen if ledgers[s.name].shards]
    keyless: dict[str, str] = {}
    for spec in stages:
        try:
            check_api_keys(pipeline, [spec])
        except ConfigError as e:
            if cancel:
                raise
            keyless[spec.name] = str(e)

    async def ask() -> list[dict[str, Any]]:
        from .llm.batch import batch_api
        from .llm.http import open_session
        from .llm.types import ProviderError

        found = []
        async with open_session(8) as session:
            for spec in stages:
                api = None
                for shard, ledger in ledgers[spec.name].shards.items():
                    for batch_id in ledger.batches:
                        row = {"stage": spec.name, "shard": shard, "batch": batch_id}
                        found.append(row)
                        if spec.name in keyless:
                            row.update(status="unknown", error=keyless[spec.name])
                            continue
                        api = api or batch_api(pipeline.models[spec.models[0]], session)
                        try:
                            state = await (api.cancel(batch_id) if cancel
                                           else api.state(batch_id))
                            row.update(status=state.status, counts=state.counts)
                        except ProviderError as e:
                            row.update(status="unknown", error=str(e))
        return found

    if not stages:
        return []
    if not cancel:
        return asyncio.run(ask())
    with workdir.lock():
        return asyncio.run(ask())
