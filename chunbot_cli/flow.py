"""A shard job, and `run_job`, which flows its records through the stages.

A `ShardJob` is plain data: which shard, what it reads (input lines, the committed part
file of the stage before, or records handed over in memory), and for each stage it
computes the source it reads, the token its commit will carry and the records already done
(from its journal). An executor runs it here or could ship it elsewhere; everything the
job produces goes to its `JobEvents`.

Records flow: a record enters stage k+1 as soon as it leaves stage k, in batches of
whatever has arrived. A stage's shard is whole when its upstream's is and its own records
are all done; it then goes to `JobEvents.done` (the commit) before the next stage is told
that no more records come, so commits happen upstream first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Coroutine, Mapping, Protocol

import orjson

from .source import line_origin, parse_line
from .stages import Batch, Outlet, Stage, StageOutput
from .state import Counters
from .store import Entry, Key, read_lines


@dataclass
class Lines:
    """Input lines of the pipeline's input (`start`: the first one's place in it)."""

    lines: list[bytes]
    start: int
    origins: list[tuple[str, int, int]]  # (file, first line, count), for error messages
    id_field: str | None


@dataclass
class Part:
    """The committed part file of the stage before, and the keys its records go by."""

    path: str
    compress: str | None = None
    keys: list[Key] | None = None  # None: their places in the file


@dataclass
class Rows:
    """Records handed over in memory (the library's)."""

    rows: list[dict[str, Any]]
    start: int
    id_field: str | None


@dataclass
class StageWork:
    """One stage of a job: what it reads from, what it commits as, what is done."""

    stage: str
    source: str
    token: str
    done: dict[Key, Entry] = field(default_factory=dict)
    mode: str | None = None  # "batch", "collect" (an earlier run's batches), None: realtime


@dataclass
class ShardJob:
    shard: int
    input: Lines | Part | Rows
    stages: list[StageWork]


class JobEvents(Protocol):
    """What a running job reports (to the engine, which counts, journals and commits)."""

    def fed(self, stage: str, count: int) -> None: ...  # records handed to a stage

    def entry(self, stage: str, shard: int, entry: Entry, new: bool) -> None: ...

    def passed(self, stage: str, shard: int, batch: Batch, data: bytes,
               counts: Counters | None) -> None: ...  # records out of a stage

    def done(self, job: ShardJob, position: int,
             output: StageOutput) -> Awaitable[None] | None: ...  # a stage's shard is whole

    def pending(self, stage: str, shard: int, why: str) -> None: ...  # not whole: it waits
    # for provider batches ("batches") or a higher cost cap ("max_cost")


_END, _GIVE_UP = "end", "give up"  # what a stage tells the next once it has no more records


async def run_job(job: ShardJob, stages: Mapping[str, Stage], events: JobEvents) -> None:
    """Flow the job's records through its stages; raises what a stage raised (the job's
    shards that were not whole stay uncommitted)."""
    batch, failed = await _read(job)
    ids = None
    if isinstance(job.input, Lines):  # for the first stage's index of record ids
        ids = [record["_id"] for record in batch.records] + [error["_id"] for error in failed]
    inboxes: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in job.stages]
    spawned: set[asyncio.Task[Any]] = set()
    commits: list[Awaitable[None]] = []

    def spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coroutine)
        spawned.add(task)
        task.add_done_callback(spawned.discard)
        return task

    async def drive(position: int) -> None:
        work = job.stages[position]
        name, shard = work.stage, job.shard
        after = inboxes[position + 1] if position + 1 < len(job.stages) else None
        following = job.stages[position + 1].stage if after is not None else None

        def emit(passed: Batch, data: bytes, counts: Counters | None) -> None:
            events.passed(name, shard, passed, data, counts)
            if after is not None and passed.records:
                after.put_nowait(passed)
                events.fed(following, len(passed))  # type: ignore[arg-type]

        def entry(done: Entry, new: bool) -> None:
            events.entry(name, shard, done, new)

        stage_shard = stages[name].open(shard, work.source, Outlet(emit, entry, spawn),
                                        work.done, work.mode)
        inbox, end = inboxes[position], None
        while end is None:
            item = await inbox.get()
            if not isinstance(item, Batch):
                end = item
                continue
            while not inbox.empty():  # whatever else has arrived goes in the same batch
                more = inbox.get_nowait()
                if not isinstance(more, Batch):
                    end = more
                    break
                item = item + more
            await stage_shard.feed(item)
        if end == _GIVE_UP:
            await stage_shard.abandon()
            if after is not None:
                after.put_nowait(_GIVE_UP)
            return
        output = await stage_shard.finish()
        if not isinstance(output, StageOutput):  # downstream waits for the next run
            events.pending(name, shard, output)
            if after is not None:
                after.put_nowait(_GIVE_UP)
            return
        if position == 0:
            output.ids = ids
            if failed:
                output.errors[:0] = failed
                output.counts.records_in += len(failed)
                output.counts.failed += len(failed)
        commit = events.done(job, position, output)
        if commit is not None:
            commits.append(commit)
        if after is not None:
            after.put_nowait(_END)

    first = job.stages[0].stage
    events.fed(first, len(batch) + len(failed))
    if failed:
        events.passed(first, job.shard, Batch([], []), b"",
                      Counters(records_in=len(failed), failed=len(failed)))
    drivers = [asyncio.ensure_future(drive(k)) for k in range(len(job.stages))]
    inboxes[0].put_nowait(batch)
    inboxes[0].put_nowait(_END)
    try:
        await asyncio.gather(*drivers)
    except BaseException:
        for task in (*drivers, *spawned):
            task.cancel()
        await asyncio.gather(*drivers, *spawned, return_exceptions=True)
        raise
    finally:
        if commits:  # what was handed to the committer belongs in the state
            await asyncio.gather(*commits)


async def _read(job: ShardJob) -> tuple[Batch, list[dict[str, Any]]]:
    """The job's first records with their keys, and the input lines that are no record."""
    source = job.input
    if isinstance(source, Part):
        records = await asyncio.to_thread(read_lines, source.path, source.compress)
        keys = source.keys if source.keys is not None and len(source.keys) == len(records) \
            else list(range(len(records)))
        return Batch(keys, records), []
    if isinstance(source, Rows):
        id_field, start = source.id_field, source.start
        batch = Batch(list(range(len(source.rows))), [])
        for i, row in enumerate(source.rows):
            record = dict(row)
            record["_id"] = record[id_field] if id_field is not None and id_field in record \
                else start + i
            batch.records.append(record)
        return batch, []
    parsed = parse(source, job.stages[0].stage)
    source.lines = []  # the raw lines are not needed any more: let them go
    return parsed


def parse(source: Lines, stage: str) -> tuple[Batch, list[dict[str, Any]]]:
    """Input lines → records with `_id` (the `id_field`, else the line's place in the
    input); a line that is no JSON object → a failure of the first stage, naming it."""
    batch = Batch([], [])
    errors: list[dict[str, Any]] = []
    keep_key, keep, loads, id_field, start = batch.keys.append, batch.records.append, \
        orjson.loads, source.id_field, source.start
    for i, line in enumerate(source.lines):
        try:
            record = loads(line)
        except orjson.JSONDecodeError:
            record = None
        if type(record) is not dict:
            record, problem = parse_line(line)
            if record is None:
                if problem is not None:
                    name, lineno = line_origin(source.origins, i)
                    errors.append({"_id": start + i, "stage": stage,
                                   "error": f"{name}:{lineno}: {problem}", "file": name,
                                   "line": lineno, "raw": line[:1000].decode("utf-8", "replace")})
                continue
        if id_field is not None and id_field in record:
            record["_id"] = record[id_field]
        else:
            record["_id"] = start + i
        keep_key(i)
        keep(record)
    return batch, errors
