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

import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

from .llm.types import Reply, Request
from .store import Entry

if TYPE_CHECKING:
    from .llm.batch import Batches, BatchState
    from .stages import LLMStage, StageOutput
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

    def custom_id(self, index: int) -> str:
        """A batch item's id: the intent that sent it, and its place in the shard. A batch
        adopted by mistake after a crash (Anthropic's are matched by time and size) has
        none of this intent's ids, so its items are simply sent again, never taken for
        ours."""
        return f"{self.intent}-{index}"


class Ledgers:
    """One stage's batches.json: a Ledger per shard, written atomically on every change."""

    def __init__(self, workdir: "Workdir", stage: str):
        self.workdir, self.stage = workdir, stage
        self.shards = {int(k): Ledger.from_json(v)
                       for k, v in workdir.load_batches(stage).items()}

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
        self.workdir.save_batches(self.stage, {str(k): asdict(v)
                                               for k, v in sorted(self.shards.items())})


async def run_shard(stage: "LLMStage", records: list[dict[str, Any]],
                    done: dict[int, Entry], on_done: Callable[[Entry], None],
                    ledgers: Ledgers, shard: int, api: "Batches", metadata: dict[str, str],
                    realtime_rest: bool = False) -> "StageOutput | None":
    """The shard through the provider's batch API: its output, or None while its batches
    are pending. `ledgers.open(shard, …)` must have been called for this run."""
    from .llm.batch import split

    ledger = ledgers.shards[shard]
    entries, finish, requests = await stage.prepare(records, done, on_done)
    client = stage.clients[0]
    if requests and not ledger.batches:
        if ledger.intent:
            found = [b.id for b in await api.recent() if ledger.made(b)]
            if found:
                ledger.batches = found
                ledgers.save()
                return None
        if realtime_rest:
            await stage.send(records, requests, finish)
            ledgers.close(shard)
            return stage.assemble(records, entries)
        ledger.intent, ledger.intent_at = os.urandom(6).hex(), time.time()
        ledger.batches, ledger.items = [], len(requests)
        ledgers.save()
        items = [(ledger.custom_id(i), request) for i, request in requests.items()]
        for part in split(items, client.spec):
            batch_id = await api.submit(part, {**metadata, "intent": ledger.intent})
            if os.environ.get("CHUNBOT_FAILPOINT") == "batch-created":
                os.kill(os.getpid(), 9)  # tests: die where a crash costs the most
            ledger.batches.append(batch_id)
            ledgers.save()
        return None
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
            return None
        results: dict[str, Any] = {}
        for batch_id in ledger.batches:
            results.update(await api.results(batch_id))
        retry: dict[int, Request] = {}
        for i, request in requests.items():
            result = results.get(ledger.custom_id(i), "not in the batch's results")
            entry = (stage.answered(i, records[i], request, client, result, "batch")
                     if isinstance(result, Reply) else None)
            if entry is not None:
                finish(entry)
            else:
                retry[i] = request
                ledger.errors[str(i)] = str(result)
        if retry and (stage.spec.batch_fallback or ledger.past_deadline or realtime_rest):
            await stage.send(records, retry, finish)
        elif retry and ledger.rounds + 1 <= stage.spec.retries:
            ledger.rounds += 1
            ledger.batches, ledger.intent = [], None  # a new batch for them
            finished = {i: e for i, e in enumerate(entries) if e is not None}
            return await run_shard(stage, records, finished, on_done, ledgers, shard, api,
                                   metadata, realtime_rest)
        else:
            for i in retry:
                error = f"model {client.spec.alias!r}: {ledger.errors[str(i)]}"
                trace = stage.trace_of(records[i], requests[i])
                trace["error"] = error
                finish(Entry(i, trace, error=error))
    ledgers.close(shard)
    return stage.assemble(records, entries)
