"""Runs a pipeline: decides what is stale, walks the input shard by shard, commits results.

The unit of work is a shard: `shard_size` input lines and everything derived from them in
every stage (`<stage>/part-NNNNN`). For each input shard the engine plans (plan.py) which
stages are stale, makes a shard job of them (flow.py: plain data, run by a function) and
hands it to the executor, which keeps several shards in flight so an LLM stage keeps its
model busy across shard boundaries. Within a job records flow from stage to stage one by
one. What a job reports comes back here: counts for progress and the summary, finished
records for the journal and the output (stdout, the library), whole stage shards for the
store (sinks.py: the workdir, or nothing with `--storage memory`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol

from . import batchmode
from .batchmode import pending_batches
from .config import ConfigError, Pipeline, StageSpec, check_api_keys
from .duplicates import DuplicateIds
from .executor import LocalExecutor
from .export import check_output, remove_orphan_temp_files
from .flow import Lines, Part, Rows, ShardJob, StageWork
from .llm.price import Spending
from .plan import Planner
from .sinks import DiskStore, InputOrder, MemoryStore, Output, Store
from .source import InputError, Shard, read_shards, resolve, row_shards
from .stages import Batch, Stage, StageOutput
from .stageset import StageSet
from .state import Counters, Export, StageState, State
from .store import Entry, Locked, StoreError, Workdir, describe, reason_of

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LATER = 0, 1, 2, 75
# `run --wait` polls a batch after 1 s, then ever less often, up to this (seconds)
BATCH_POLL_S = float(os.environ.get("CHUNBOT_BATCH_POLL_S", "30"))
MAX_SHARDS_IN_FLIGHT = 64

__all__ = ["RunOptions", "RunReport", "run", "arun", "ConfigError", "InputError", "Locked",
           "StoreError", "Interrupted", "pending_batches"]


class Interrupted(Exception):
    """The run was stopped by SIGINT (Ctrl-C), SIGTERM or a closed stdout (SIGPIPE's exit
    code); what finished is kept."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        if signum == signal.SIGPIPE:  # the reader chose to stop (`| head`): nothing to resume
            super().__init__("stdout was closed: what finished is kept")
            return
        name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        super().__init__(f"{name}: what finished is kept; run the same command again to "
                         "resume")


@dataclass
class RunOptions:
    stage: str | None = None  # only this stage; its upstream must be fresh
    until: str | None = None  # this stage and everything before it
    limit: int | None = None  # only the first N input lines
    cache: str = "use"  # "use" the response cache, "off" (neither read nor write), "refresh"
    mode: str | None = None  # "realtime" or "batch" for every LLM stage, over the YAML
    wait: bool = False  # batch mode: poll until every batch is done instead of exiting 75
    rerun: str | None = None  # recompute this stage (and, unless rerun_only, downstream)
    rerun_only: bool = False
    rerun_failed: bool = False  # only its records in errors.jsonl
    rerun_ids: frozenset[str] | None = None  # only these records
    storage: str = "disk"  # "memory": nothing under the workdir, every stage computed
    order: str = "completion"  # of the output records: as they finish, or "input"
    again: str | None = None  # the command that sends failed records again, for the summary
    executor: str | None = None  # "local" or "ray" (None: the pipeline's `executor:`)
    ray_address: str | None = None  # "auto" or HOST:PORT: join that cluster, else start one
    max_cost: float | None = None  # USD the selected stages' output may cost, over the
    # pipeline's `defaults.max_cost`


@dataclass
class StageReport:
    counts: Counters = field(default_factory=Counters)
    known: int = 0  # records handed to the stage in this run so far (done or not)
    fresh_records: int = 0  # records of the shards that were up to date: done before
    shards_run: int = 0
    shards_skipped: int = 0
    batches_pending: int = 0
    capped: int = 0  # shards the cost cap left unfinished
    stopped: int = 0  # shards left unfinished when the stage's tripwire stopped it
    committed: list[int] = field(default_factory=list)  # shards this run committed
    resumed: Counters = field(default_factory=Counters)  # taken from journals (and from
    # the shards a partial rerun keeps): done before this run
    first_start: float | None = None
    last_end: float | None = None

    @property
    def seconds(self) -> float:
        if self.first_start is None or self.last_end is None:
            return 0.0
        return self.last_end - self.first_start


@dataclass
class RunReport:
    stages: dict[str, StageReport]
    exit_code: int = EXIT_OK
    seconds: float = 0.0
    lines_read: int = 0
    failed_total: int = 0  # failures recorded for the selected stages, this run or before
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what stopped work beyond one record
    failures: list["StageFailures"] = field(default_factory=list)  # why records failed


@dataclass
class StageFailures:
    """Why a stage's records failed, for the summary: the most common reasons."""

    stage: str
    failed: int  # records of the stage in errors.jsonl (this run or before)
    errors_file: str
    reasons: list[tuple[str, int]]  # the most common, with their counts
    scanned: int  # lines of errors.jsonl the reasons were counted over
    rerun: str  # the command that sends them again


class Progress(Protocol):
    """What the engine tells whoever displays progress (see progress.py)."""

    interval: float

    def start(self, run: "Run") -> None: ...

    def update(self, run: "Run") -> None: ...

    def message(self, text: str) -> None: ...

    def finish(self, run: "Run", report: RunReport) -> None: ...


def run(pipeline: Pipeline, options: RunOptions | None = None,
        progress: Progress | None = None, output: Output | None = None,
        errors: Callable[[dict[str, Any]], None] | None = None,
        rows: Iterable[dict[str, Any]] | None = None,
        traces: Callable[[dict[str, Any]], None] | None = None) -> RunReport:
    """Run (or resume) a pipeline; returns a report whose exit_code follows DESIGN.md.

    `output` gets the last selected stage's records as they finish (`options.order`);
    `errors` each failed record, where no errors.jsonl keeps them (memory storage); `rows`
    are the input instead of the pipeline's `input`; `traces` each LLM record's trace.
    SIGINT and SIGTERM stop the run.
    Raises ConfigError or InputError (exit 2) and Locked (exit 75) before any work starts.
    """
    options = options or RunOptions()
    check_api_keys(pipeline, selected_stages(pipeline, options))
    _check_executor(pipeline, options)
    _check_max_cost(pipeline, options)
    work = Run(pipeline, options, progress, output, errors, rows, traces)
    try:
        return asyncio.run(work.execute(signals=True))
    except asyncio.CancelledError:
        if work.stopped_by is None:
            raise
        raise Interrupted(work.stopped_by) from None
    except OSError as e:  # the lock or state.json, before or after the shards' work
        raise StoreError(f"cannot write the workdir: {describe(e)}") from None


async def arun(pipeline: Pipeline, options: RunOptions | None = None,
               progress: Progress | None = None, output: Output | None = None,
               errors: Callable[[dict[str, Any]], None] | None = None,
               rows: Iterable[dict[str, Any]] | None = None,
               traces: Callable[[dict[str, Any]], None] | None = None) -> RunReport:
    """`run` in a running event loop (a notebook's, a program's); no signal handlers."""
    options = options or RunOptions()
    check_api_keys(pipeline, selected_stages(pipeline, options))
    _check_executor(pipeline, options)
    _check_max_cost(pipeline, options)
    try:
        return await Run(pipeline, options, progress, output, errors, rows, traces).execute()
    except OSError as e:
        raise StoreError(f"cannot write the workdir: {describe(e)}") from None


def selected_stages(pipeline: Pipeline, options: RunOptions) -> list[StageSpec]:
    names = [s.name for s in pipeline.stages]
    if options.stage and options.until:
        raise ConfigError("use --stage or --until, not both")
    if options.rerun:
        stage = pipeline.stage(options.rerun)
        if (options.rerun_failed or options.rerun_ids is not None) and stage.kind != "llm":
            raise ConfigError(f"stage {stage.name!r} is a {stage.kind} stage: --failed and --ids "
                              "redo records of LLM stages; rerun the whole stage instead")
        start = names.index(stage.name)
        return [stage] if options.rerun_only else pipeline.stages[start:]
    if options.stage:
        return [pipeline.stage(options.stage)]
    if options.until:
        return pipeline.stages[: names.index(pipeline.stage(options.until).name) + 1]
    return list(pipeline.stages)


class Run:
    """One invocation: plans each input shard, hands its jobs to the executor, and takes
    what the jobs report (the JobEvents): counts for progress and the summary, journal
    lines and commits for the store, the last stage's records for the output."""

    def __init__(self, pipeline: Pipeline, options: RunOptions, progress: Progress | None,
                 output: Output | None = None, errors: Callable[[dict[str, Any]], None] | None
                 = None, rows: Iterable[dict[str, Any]] | None = None,
                 traces: Callable[[dict[str, Any]], None] | None = None):
        self.pipeline = pipeline
        self.options = options
        self.progress = progress
        self.memory = options.storage == "memory"
        self.workdir = Workdir(pipeline.workdir, pipeline.compress)
        self.selected = selected_stages(pipeline, options)
        self.last = pipeline.stages.index(self.selected[-1])
        self.report = RunReport(stages={s.name: StageReport() for s in self.selected})
        self.rows = rows
        self.files = [] if rows is not None else resolve(pipeline.input)
        if not self.memory and rows is None:
            check_output(pipeline, self.files)
        self.input_bytes = None if rows is not None else _input_size(self.files)
        self.bytes_read = 0
        self.read_through = False  # the whole input has been read
        self.started = time.monotonic()
        self.clients: dict[str, Any] = {}  # the stage set's, for progress
        self.batching = batchmode.Batching(pipeline, self.workdir, options.mode, options.wait,
                                           BATCH_POLL_S, self.note, keep=not self.memory)
        if self.memory:
            _check_memory(options, self.selected, self.batching.batched)
        self.state = State()
        self.store: Store = MemoryStore()
        self.output = output
        if output is not None and options.order == "input":
            self.output = InputOrder(output)
        self.errors_out = errors  # failed records, when no errors.jsonl keeps them
        self.reasons: dict[str, Counter[str]] = {}  # why they failed, per stage
        self.duplicates = DuplicateIds()  # input ids seen before, for a note
        self.traces = traces
        self.stopped_by: int | None = None  # the signal that interrupted the run
        self.stopping = False  # a fault of the workdir: read no more input
        self.planner: Planner | None = None  # what is stale (disk storage)
        self.task: asyncio.Task[Any] | None = None
        self.executor: Any = None  # LocalExecutor or rayexec.RayExecutor
        self.ray_started = False  # this run started a local Ray: it shuts it down
        cap = _cost_cap(pipeline, options)
        self.spending = Spending(cap) if cap is not None else None

    async def execute(self, signals: bool = False) -> RunReport:
        self.task = asyncio.current_task()
        if signals:
            self._on_signals()
        if self.memory:
            self.state = State(stages={s.name: StageState(s.fingerprint, s.definition)
                                       for s in self.selected})
            await self._work()
        else:
            with self.workdir.lock() as previous_holder:
                if previous_holder and previous_holder != str(os.getpid()):
                    self.note(f"took over the lock left by pid {previous_holder}, "
                              "which is no longer running")
                self.workdir.remove_temp_files()
                if self.pipeline.output is not None:
                    remove_orphan_temp_files(self.pipeline.output)
                self.state = self.workdir.load_state()
                self.workdir.remove_committed_journals(self.state)
                self.state.last_run = {"started": _now(), "pid": os.getpid()}
                self.store = DiskStore(self.workdir, self.state)
                self.planner = Planner(pipeline=self.pipeline, selected=self.selected,
                                       workdir=self.workdir, state=self.state, note=self.note,
                                       stage=self.options.stage, rerun=self.options.rerun,
                                       failed=self.options.rerun_failed,
                                       ids=self.options.rerun_ids)
                self.planner.reset_changed_stages()
                if self.spending is not None:  # what the output as it stands has cost,
                    self.spending.before = sum(self._stage_state(s).totals().cost
                                               for s in self.selected)
                    self.spending.in_flight = self.batching.reserved(self.selected)  # and
                    # what the batches earlier runs made may still cost
                await self._work()
        if self.progress:
            self.progress.finish(self, self.report)
        return self.report

    async def _work(self) -> None:
        ticker = None
        stages = None
        try:
            stages = StageSet(self.pipeline, self.selected, self.note, self.options.cache,
                              self.options.rerun, self.options.mode, self.batching.batch_mode,
                              self.spending)
            self.clients = stages.clients
            if self.progress:
                self.progress.start(self)
            ticker = asyncio.create_task(self._tick())
            await self._walk(stages.stages)
            self._tripped(stages.stages)
        except asyncio.CancelledError:
            if self.stopped_by is not None:
                self._record_interruption()
            raise
        finally:
            if ticker is not None:
                ticker.cancel()
            self.store.shutdown()
            if stages is not None:
                self.report.errors += await stages.close()
                hits, misses = stages.cache_counts()  # the driver's (Ray's workers add theirs)
                self.report.cache_hits += hits
                self.report.cache_misses += misses
            if self.ray_started:
                import ray

                ray.shutdown()
        self._finish()

    def _tripped(self, stages: dict[str, Stage]) -> None:
        """A stage whose first records all failed one way stopped: say so in one line (an
        error: exit 1) and forget those failures, so the run after the fix asks again."""
        for name, stage in stages.items():
            if stage.tripwire.tripped is None:
                continue
            self.report.errors.append(
                f"stage {name!r} stopped: its first {stage.tripwire.limit} records all failed "
                f"with: {stage.tripwire.tripped}; nothing more was sent. Fix that, then run "
                "the same command again: it goes on from what finished")
            if not self.memory:
                self.store.shutdown()  # every commit made, every journal closed
                self.workdir.forget_failures(name, self.state,
                                             self.report.stages[name].committed)

    def stop(self, signum: int) -> None:
        """Stop the run the way SIGINT and SIGTERM do: no new requests, what finished is
        committed or stays in the journals, state.json says how the run ended."""
        if self.stopped_by is None and self.task is not None:
            self.stopped_by = signum
            self.task.cancel()
        elif self.stopped_by is not None and signum != signal.SIGPIPE:
            self._hurry(signum)

    def _hurry(self, signum: int) -> None:
        """A second signal while winding down: leave at once, with the exit code the first
        one gave (every write is atomic, so the next run resumes as after a kill -9)."""
        code = 128 + (self.stopped_by or signum)
        self.note(f"{signal.Signals(signum).name} again: stopping at once, exit {code}; what "
                  "was committed is kept: run the same command again to resume")
        os._exit(code)

    def _on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self.stop, signum)
            except (ValueError, RuntimeError):  # not the main thread (a notebook's worker)
                return

    def _record_interruption(self) -> None:
        assert self.stopped_by is not None
        self.report.seconds = time.monotonic() - self.started
        self.report.exit_code = 128 + self.stopped_by
        self.store.shutdown()  # the commits under way belong in the state
        if not self.memory:
            self.state.last_run.update(ended=_now(), exit_code=self.report.exit_code,
                                       interrupted=signal.Signals(self.stopped_by).name)
            self._save_state()
            self.report.exit_code = 128 + self.stopped_by
        if self.progress:
            self.progress.finish(self, self.report)

    # planning
    def _stage_state(self, stage: StageSpec) -> StageState:
        return self.state.stages[stage.name]

    def _plan(self, shard: Shard) -> tuple[list[StageSpec], str]:
        """The stages to compute for this shard and the source token the first one reads."""
        if self.planner is None:  # memory: nothing is kept, everything is computed
            return self.pipeline.stages[: self.last + 1], shard.digest
        return self.planner.plan(shard.index, shard.digest)

    def _job(self, shard: Shard, todo: list[StageSpec], source: str,
             rows: list[dict[str, Any]] | None) -> ShardJob:
        """The shard's job: what it reads, and per stage its source, token and what is done."""
        position = self.pipeline.stages.index(todo[0])
        keys = None
        job_input: Lines | Part | Rows
        if rows is not None:
            job_input = Rows(rows, shard.start, self.pipeline.id_field)
        elif position == 0:
            job_input = Lines(shard.lines, shard.start, shard.origins, self.pipeline.id_field)
        else:
            job_input = self._part_input(todo[0].name, shard.index, source)
            keys = job_input.keys
        work = []
        for stage in todo:
            if stage.kind == "llm":
                keep = (self.planner.reusable(stage, shard.index, keys)
                        if self.planner is not None and stage is todo[0] else {})
                done, token = self.store.journal(stage, shard.index, source, keep)
                mode = self.batching.mode(stage, shard.index, source)
            else:
                done, token, mode = {}, self._stage_state(stage).token(source), None
            work.append(StageWork(stage.name, source, token, done, mode))
            source = token
        return ShardJob(shard.index, job_input, work)

    def _part_input(self, stage: str, shard: int, source: str) -> Part:
        """What a stage reads when the stage before it is committed: that one's part file,
        with the keys its records go by."""
        upstream = self.pipeline.stages[self.pipeline.stages.index(self.pipeline.stage(stage))
                                        - 1]
        return Part(str(self.workdir.part_path(upstream.name, shard)), self.pipeline.compress,
                    self.workdir.read_keys(stage, shard, source))

    def _executor(self, stages: dict[str, Stage]) -> Any:
        """The run's executor: the local window, or Ray (DESIGN.md, "Many machines")."""
        local = LocalExecutor(stages, self, self._window(stages), self._job_ended)
        if (self.options.executor or self.pipeline.executor) != "ray":
            return local
        from . import rayexec

        executor, self.ray_started = rayexec.for_run(
            self.pipeline, self.selected, self.options, self, self._job_ended, local,
            lambda work, shard: self._part_input(work.stage, shard, work.source),
            output=None if self.output is None
            else "records" if self.output.needs_records else "lines", note=self.note,
            report=self.report, spending=self.spending)
        return executor

    # the shard walk
    def _shards(self) -> Iterator[tuple[Shard, list[dict[str, Any]] | None]]:
        if self.rows is not None:
            yield from row_shards(self.rows, self.pipeline.shard_size, self.options.limit)
            return
        for shard in read_shards(self.files, self.pipeline.shard_size, self.options.limit,
                                 self.pipeline.max_line_bytes):
            yield shard, None

    async def _walk(self, stages: dict[str, Stage]) -> None:
        executor = self.executor = self._executor(stages)
        count = 0
        read_through = False
        if self.options.limit is None and not self.memory:
            self.state.input_shards = None  # known again once the input is read through
        try:
            try:
                for shard, rows in self._shards():
                    if self.stopping or self.spending is not None and self.spending.reached \
                            or any(stage.tripwire.tripped for stage in stages.values()):
                        break
                    count += 1
                    self.report.lines_read += len(rows) if rows is not None else len(shard.lines)
                    self.bytes_read += shard.size + len(shard.lines)
                    todo, source = self._plan(shard)
                    for stage in self.selected:
                        if stage not in todo:
                            report = self.report.stages[stage.name]
                            report.shards_skipped += 1
                            report.fresh_records += self._stage_state(stage).shards[
                                shard.index].counts.records_in
                    if not todo:
                        self._stream_part(shard.index)
                        continue
                    job = self._job(shard, todo, source, rows)
                    shard.lines = []  # the job holds them now
                    await executor.submit(job)
                else:
                    read_through = self.read_through = not self.stopping
            except InputError as e:  # a file refused or breaking off once reading began
                if count == 0 and not e.midway:
                    raise  # nothing was run: exit 2, as for a missing file
                # a break (truncated .zst) is exit 1 wherever the cut fell, even before the
                # first whole record: what came before is kept, the rest is for the next run
                before = "the records read before it were processed" if count else \
                    "no record was read before it"
                self.report.errors.append(f"{e}; {before}")
            await executor.join()
        except BaseException:
            await executor.cancel()
            raise
        duplicates = self.duplicates.note()
        if duplicates:
            self.note(duplicates)
        if count == 0 and not self.report.errors:
            self.note("input is empty: nothing to do")
        elif not any(stage.shards_run or stage.batches_pending or stage.capped or stage.stopped
                     for stage in self.report.stages.values()) \
                and not self.report.errors and not self.memory:
            self.note("every selected stage is up to date: nothing to do")
        if self.options.limit is None and read_through and not self.memory:
            self._forget_shards_from(count)
            self.state.input_shards = count

    def _stream_part(self, shard: int) -> None:
        """A shard whose last selected stage was done before: its records go out as well,
        so the output always carries all of them."""
        if self.output is None:
            return
        stage = self.selected[-1].name
        data = self.workdir.read_part(stage, shard, self.state.stages[stage].shards.get(shard))
        self._emit(shard, data, None)
        if self.output is not None:
            self.output.shard_done(shard)

    def _emit(self, shard: int, data: bytes, batch: Batch | None) -> None:
        assert self.output is not None
        try:
            self.output.records(shard, data, batch)
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop as
            self.output = None  # SIGINT would, with SIGPIPE's exit code
            self.stop(signal.SIGPIPE)

    def _job_ended(self, job: ShardJob, error: BaseException | None) -> None:
        for work in job.stages:
            self.store.close(work.stage, job.shard)
        if self.output is not None:
            self.output.shard_done(job.shard)
        if error is not None:
            self._job_failed(job.shard, error)
            if self.stopping and self.executor is not None:
                self.executor.stop()

    def _job_failed(self, shard: int, error: BaseException) -> None:
        """A shard job that raised: its shard stays undone (the next run redoes it) and the
        run ends with exit 1. A workdir that cannot be written stops the whole run."""
        if isinstance(error, OSError):
            if not self.stopping:
                self.stopping = True
                self.report.errors.append(
                    f"cannot write the workdir: {describe(error)}; stopped (what was "
                    "committed is kept: free space or fix the permissions, then run again "
                    "to resume)")
            return
        self.report.errors.append(f"shard {shard}: {type(error).__name__}: {error} "
                                  "(a bug in chunbot; the shard is redone by the next run)")

    def _window(self, stages: dict[str, Stage]) -> int:
        """Shards in flight: enough for every LLM stage to fill its concurrency twice over."""
        concurrency = sum(stage.concurrency for stage in stages.values())
        if not concurrency:
            return 2  # one shard computes while the other commits
        return min(MAX_SHARDS_IN_FLIGHT, 2 + 2 * concurrency // self.pipeline.shard_size)

    # what jobs report (flow.JobEvents)
    def fed(self, stage: str, count: int) -> None:
        report = self.report.stages[stage]
        if report.first_start is None:
            report.first_start = time.monotonic()
        report.known += count

    def entry(self, stage: str, shard: int, entry: Entry, new: bool) -> None:
        if new and not entry.trace.get("cache_hit"):  # on a resume the cache answers again
            self.store.append(stage, shard, entry)
        elif not new:  # finished (and paid for) by an interrupted run
            self.report.stages[stage].resumed.count(entry)
            if self.spending is not None:
                self.spending.before += entry.trace.get("cost", 0.0)
        self.report.stages[stage].counts.count(entry)
        if self.traces is not None:
            self.traces(entry.trace)

    def passed(self, stage: str, shard: int, batch: Batch, data: bytes,
               counts: Counters | None) -> None:
        if counts is not None:
            self.report.stages[stage].counts.add(counts)
        if self.output is not None and stage == self.selected[-1].name:
            self._emit(shard, data, batch)

    def done(self, job: ShardJob, position: int, output: StageOutput) -> Any:
        work = job.stages[position]
        report = self.report.stages[work.stage]
        report.shards_run += 1
        report.committed.append(job.shard)
        report.last_end = time.monotonic()
        if position == 0 and output.ids is not None:  # sorted CRC-32s: its id index
            output.ids = self.duplicates.add(job.shard, output.ids)  # type: ignore[assignment]
        if self.errors_out is not None:
            reasons = self.reasons.setdefault(work.stage, Counter())
            for error in output.errors:
                reasons[reason_of(error)] += 1
                self.errors_out({**error, "shard": job.shard})
        downstream = job.stages[position + 1].stage if position + 1 < len(job.stages) else None
        return self.store.commit(work.stage, job.shard, work.source, work.token, output,
                                 downstream)

    def pending(self, stage: str, shard: int, why: str) -> None:
        report = self.report.stages[stage]
        if why == "max_cost":
            report.capped += 1
        elif why == "failing":
            report.stopped += 1
        else:
            report.batches_pending += 1

    def _forget_shards_from(self, count: int) -> None:
        """The input shrank: shards past its end no longer exist in any selected stage."""
        changed = False
        for stage in self.selected:
            stage_state = self._stage_state(stage)
            gone = {k for k in stage_state.shards if k >= count}
            if not gone:
                continue
            if any(stage_state.shards[k].counts.failed for k in gone):
                stage_state.errors_bytes = self.workdir.drop_errors(stage.name, gone)
            for k in gone:
                del stage_state.shards[k]
                self.workdir.remove_shard(stage.name, k)
            changed = True
        if changed:
            self.workdir.save_state(self.state)

    def _finish(self) -> None:
        self.report.seconds = time.monotonic() - self.started
        for name, stage in self.report.stages.items():
            resumed = stage.resumed
            if resumed.records_in and not self.options.rerun:
                cost = f" (${resumed.cost:,.4f} paid then)" if resumed.cost else ""
                self.note(f"stage {name!r}: resumed from {resumed.records_in:,} records an "
                          f"interrupted run had finished{cost}")
        failed = 0
        for stage in self.selected:
            if self.memory:
                count = self.report.stages[stage.name].counts.failed
            else:
                count = self._stage_state(stage).failed()
            if count:
                self.report.failures.append(self._failures(stage, count))
            failed += count
        self.report.failed_total = failed
        pending = sum(stage.batches_pending for stage in self.report.stages.values())
        capped = self._capped()
        self.report.exit_code = (EXIT_FAILED if self.report.errors else EXIT_LATER
                                 if pending or capped else EXIT_FAILED if failed else EXIT_OK)
        if pending:
            self.note(f"{pending} shard(s) wait for provider batches: run again later "
                      "(or use --wait)")
        if self.memory:
            return
        if not pending and not capped and not self.report.errors:
            self._export()
        self.state.last_run.update(ended=_now(), exit_code=self.report.exit_code)
        self._save_state()

    def _save_state(self) -> None:
        """state.json at the end of a run: what the commits wrote is in it already, so a
        disk that is full by now costs the run's end time, said once (exit 1), not a run
        that stopped before it started (exit 2)."""
        try:
            self.workdir.save_state(self.state)
        except OSError as e:
            message = f"cannot write the workdir: {describe(e)}"
            if not any(error.startswith("cannot write the workdir") for error in
                       self.report.errors):
                self.report.errors.append(message + "; what was committed is kept")
            self.report.exit_code = EXIT_FAILED

    def _capped(self) -> bool:
        """Whether the cost cap stopped work that is left to do: say so, in one line."""
        spending = self.spending
        if spending is None or not spending.reached:
            return False
        shards = max((stage.capped for stage in self.report.stages.values()), default=0)
        if not shards and self.read_through:
            return False  # it was reached by the very last request: nothing is left
        left = " and ".join(([f"{shards} shard(s) not finished"] if shards else [])
                            + ([] if self.read_through else ["the rest of the input not read"]))
        self.note(f"--max-cost ${spending.cap:g} reached: ${spending.total:,.4f} spent on this "
                  f"output (${spending.spent:,.4f} by this run), {left}; what finished is "
                  "kept: run again with a higher --max-cost to go on")
        return True

    def _export(self) -> None:
        """`output:` gets the last stage's records once every shard of it is done (with
        the whole input read, not `--limit`), and again whenever it no longer holds what
        the shards do (state.json's `export` says what it was written from)."""
        output, last = self.pipeline.output, self.pipeline.stages[-1]
        if output is None or self.selected[-1] is not last or not self.read_through \
                or self.options.limit is not None:
            return
        shards = self._stage_state(last).shards
        if len(shards) != self.state.input_shards:
            return
        if self.state.export is not None and self.state.export.holds(str(output), shards):
            return  # nothing new since it was written
        try:
            count = self.workdir.export(last.name, shards, output)
        except OSError as e:
            self.report.errors.append(f"cannot write the output: {describe(e)}")
            self.report.exit_code = EXIT_FAILED
            return
        except StoreError as e:
            self.report.errors.append(f"output {output} not written: {e}")
            self.report.exit_code = EXIT_FAILED
            return
        self.state.export = Export(str(output), Export.digest(shards), output.stat().st_size,
                                   count)
        self.note(f"output: {count:,} records of stage {last.name!r} in {output}")

    def _failures(self, stage: StageSpec, count: int) -> StageFailures:
        if self.memory:  # nothing to rerun: the failed records went to `errors`
            reasons = self.reasons.get(stage.name, Counter())
            return StageFailures(stage.name, count, "", reasons.most_common(3), count, "")
        reasons, scanned = self.workdir.failure_reasons(stage.name)
        rerun = self.options.again or (
            f"chunbot rerun {self.pipeline.path} --stage {stage.name} --failed"
            if stage.kind == "llm" else f"chunbot rerun {self.pipeline.path} "
            f"--stage {stage.name}")
        return StageFailures(stage.name, count, str(self.workdir.errors_path(stage.name)),
                             reasons.most_common(3), scanned, rerun)

    # progress
    def note(self, text: str) -> None:
        self.report.notes.append(text)
        if self.progress:
            self.progress.message(text)

    async def _tick(self) -> None:
        if not self.progress:
            return
        while True:
            await asyncio.sleep(self.progress.interval)
            self.progress.update(self)


def _check_memory(options: RunOptions, selected: list[StageSpec],
                  batched: Callable[[StageSpec], bool]) -> None:
    """What `--storage memory` cannot do: it keeps nothing between runs."""
    if options.stage or options.rerun:
        raise ConfigError("--storage memory computes every stage from the input and keeps "
                          "nothing: use --until instead of --stage or rerun")
    for stage in selected:
        if stage.kind == "llm" and batched(stage) and not options.wait:
            raise ConfigError(f"stage {stage.name!r} is in batch mode: with --storage memory "
                              "nothing remembers its batches between runs; add --wait (or "
                              "--mode realtime)")


def _cost_cap(pipeline: Pipeline, options: RunOptions) -> float | None:
    """USD the run's output may cost: `--max-cost`, else `defaults.max_cost`."""
    return options.max_cost if options.max_cost is not None else pipeline.max_cost


def _check_max_cost(pipeline: Pipeline, options: RunOptions) -> None:
    """A cost cap needs the price of every model the run may ask."""
    if _cost_cap(pipeline, options) is None:
        return
    for stage in selected_stages(pipeline, options):
        for alias in stage.models if stage.kind == "llm" else ():
            if not pipeline.models[alias].price:
                raise ConfigError(f"{pipeline.path}: model {alias!r} (stage {stage.name!r}) "
                                  "has no price, so --max-cost cannot count what it costs: "
                                  "give it price: {input: USD, output: USD} (per million "
                                  "tokens)")


def _check_executor(pipeline: Pipeline, options: RunOptions) -> None:
    """Ray is there when the run asks for it, and the run keeps a workdir."""
    if (options.executor or pipeline.executor) != "ray":
        return
    if options.storage == "memory":
        raise ConfigError("--executor ray needs disk storage: the driver journals what the "
                          "workers finish")
    from .rayexec import import_ray

    import_ray(local=(options.ray_address or pipeline.ray_address) is None)


def _input_size(files: list[str]) -> int | None:
    """Total bytes of the input when it is plain files (for a progress percentage)."""
    if any(name == "-" or name.endswith(".zst") for name in files):
        return None
    return sum(os.path.getsize(name) for name in files)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
