"""Where finished records go.

Storage: `DiskStore` keeps each LLM stage's journal and commits whole stage shards to the
workdir, one at a time on a thread, in the order store.py explains; `MemoryStore` keeps
nothing (`--storage memory`, the library). Output: `JsonLinesOut` writes the last stage's
records to a stream (stdout) as JSON lines, `RecordsOut` hands them to a function (the
library), and `InputOrder` holds either back into input order.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Callable, Protocol

import orjson

from .config import StageSpec
from .stages import Batch, StageOutput, in_key_order
from .state import ShardEntry, State
from .store import Entry, Journal, Key, Workdir, dumps_lines, encode_lines, printable


class Store(Protocol):
    def journal(self, stage: StageSpec, shard: int, source: str,
                keep: dict[Key, Entry]) -> tuple[dict[Key, Entry], str]: ...

    def append(self, stage: str, shard: int, entry: Entry) -> None: ...

    def close(self, stage: str, shard: int) -> None: ...

    def commit(self, stage: str, shard: int, source: str, token: str, output: StageOutput,
               downstream: str | None) -> "asyncio.Future[None] | None": ...

    def shutdown(self) -> None: ...


class DiskStore:
    """Journals and commits in a workdir, under the run's State."""

    def __init__(self, workdir: Workdir, state: State):
        self.workdir, self.state = workdir, state
        self.journals: dict[tuple[str, int], Journal] = {}
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")

    def journal(self, stage: StageSpec, shard: int, source: str,
                keep: dict[Key, Entry]) -> tuple[dict[Key, Entry], str]:
        """Open the stage's journal for the shard: the records done before (`keep`, and
        what an interrupted run finished) and the token the shard will commit with."""
        journal = Journal(self.workdir.journal_path(stage.name, shard),
                          {"stage": stage.name, "fingerprint": stage.fingerprint, "src": source})
        done = {**keep, **journal.load()}
        journal.open(done)
        self.journals[(stage.name, shard)] = journal
        return done, journal.token

    def append(self, stage: str, shard: int, entry: Entry) -> None:
        self.journals[(stage, shard)].append(entry)

    def close(self, stage: str, shard: int) -> None:
        journal = self.journals.pop((stage, shard), None)
        if journal is not None:
            journal.close()

    def commit(self, stage: str, shard: int, source: str, token: str, output: StageOutput,
               downstream: str | None) -> "asyncio.Future[None]":
        """Hand a stage's whole shard to the committer thread. One thread commits in order,
        so a downstream shard is never marked done before its upstream, and fsyncs overlap
        with the work on other records. `downstream`: the stage already at work on this
        shard's records, whose journal knows them by their keys."""
        data = output.data
        trace = None
        if output.trace is not None:
            trace, bad = encode_lines(output.trace)
            if bad:  # one line per record, always: `rerun` reads them by position
                for i, why in bad:
                    output.trace[i] = {"_id": printable(output.trace[i].get("_id")),
                                       "stage": stage,
                                       "error": f"the trace cannot be written as JSON: {why}"}
                trace = dumps_lines(output.trace)
        lines = [{**e, "shard": shard} for e in output.errors]
        errors, bad = encode_lines(lines)
        if bad:
            for i, _ in bad:
                lines[i] = printable(lines[i])
            errors = dumps_lines(lines)
        keys = None
        if downstream is not None and output.keys != list(range(len(output.keys))):
            keys = output.keys
        entry = ShardEntry(source, token, output.counts.copy())
        return asyncio.get_running_loop().run_in_executor(
            self.committer, self._persist, stage, shard, entry, data, trace, errors,
            output.ids, downstream, keys)

    def _persist(self, stage: str, shard: int, entry: ShardEntry, records: bytes,
                 trace: bytes | None, errors: bytes, ids: list[Any] | None,
                 downstream: str | None, keys: list[Key] | None) -> None:
        """The commit itself, in the order store.py explains."""
        workdir = self.workdir
        if keys is not None:
            workdir.write_keys(downstream, shard, entry.token, keys)  # type: ignore[arg-type]
        stage_state = self.state.stages[stage]
        previous = stage_state.shards.pop(shard, None)
        if previous is not None and previous.counts.failed:
            stage_state.errors_bytes = workdir.drop_errors(stage, {shard})
        if ids is not None:
            workdir.write_id_index(stage, shard, ids)
        entry.part_bytes = workdir.write_shard(stage, shard, records, trace)
        entry.part_records = records.count(b"\n")
        stage_state.errors_bytes = workdir.append_errors(stage, stage_state.errors_bytes, errors)
        stage_state.shards[shard] = entry
        workdir.save_state(self.state)
        workdir.journal_path(stage, shard).unlink(missing_ok=True)
        workdir.keys_path(stage, shard).unlink(missing_ok=True)

    def shutdown(self) -> None:
        self.committer.shutdown(wait=True)
        for stage, shard in list(self.journals):
            self.close(stage, shard)


class MemoryStore:
    """Keeps nothing: every record is computed (or answered by the cache) each run."""

    def journal(self, stage: StageSpec, shard: int, source: str,
                keep: dict[Key, Entry]) -> tuple[dict[Key, Entry], str]:
        return keep, os.urandom(8).hex()

    def append(self, stage: str, shard: int, entry: Entry) -> None:
        pass

    def close(self, stage: str, shard: int) -> None:
        pass

    def commit(self, stage: str, shard: int, source: str, token: str, output: StageOutput,
               downstream: str | None) -> None:
        return None

    def shutdown(self) -> None:
        pass


class Output(Protocol):
    """Takes the last selected stage's records as they finish."""

    needs_records: bool  # the dicts, not only their JSON lines (a Ray run ships them then)

    def records(self, shard: int, data: bytes, batch: Batch | None) -> None: ...
    # `data`: the records as JSON lines; `batch`: as dicts with their keys (None: records
    # read back from a part file, in order)

    def shard_done(self, shard: int) -> None: ...  # no more records of this shard come


class JsonLinesOut:
    """Each batch of records as JSON lines on a binary stream, flushed at once (raises
    BrokenPipeError when the reader has gone away)."""

    needs_records = False

    def __init__(self, stream: IO[bytes]):
        self.stream = stream

    def records(self, shard: int, data: bytes, batch: Batch | None) -> None:
        if data:
            self.stream.write(data)
            self.stream.flush()

    def shard_done(self, shard: int) -> None:
        pass


class RecordsOut:
    """Each record as a dict to a function."""

    needs_records = True

    def __init__(self, take: Callable[[dict[str, Any]], None]):
        self.take = take

    def records(self, shard: int, data: bytes, batch: Batch | None) -> None:
        if batch is None:
            for line in data.splitlines():
                self.take(orjson.loads(line))
        else:
            for record in batch.records:
                self.take(record)

    def shard_done(self, shard: int) -> None:
        pass


class InputOrder:
    """Holds records back into input order: a shard's go out once it is done and every
    shard before it is out, so at most the shards in flight are held."""

    def __init__(self, out: Output, first: int = 0):
        self.out, self.next = out, first
        self.needs_records = out.needs_records
        self.held: dict[int, list[tuple[bytes, Batch | None]]] = {}
        self.finished: set[int] = set()

    def records(self, shard: int, data: bytes, batch: Batch | None) -> None:
        self.held.setdefault(shard, []).append((data, batch))

    def shard_done(self, shard: int) -> None:
        self.finished.add(shard)
        while self.next in self.finished:
            self.finished.discard(self.next)
            self._release(self.next)
            self.next += 1

    def _release(self, shard: int) -> None:
        chunks = self.held.pop(shard, [])
        if chunks and all(batch is not None for _, batch in chunks):  # by key (part files
            # read whole come in order, without keys)
            keys = [key for _, batch in chunks for key in batch.keys]  # type: ignore[union-attr]
            records = [r for _, batch in chunks for r in batch.records]  # type: ignore[union-attr]
            data, order = in_key_order(b"".join(data for data, _ in chunks), keys)
            chunks = [(data, Batch([keys[i] for i in order], [records[i] for i in order]))]
        for data, batch in chunks:
            self.out.records(shard, data, batch)
        self.out.shard_done(shard)
