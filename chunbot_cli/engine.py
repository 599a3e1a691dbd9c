"""Runs a pipeline: decides what is stale, walks the input shard by shard, commits results.

The unit of work is a shard: `shard_size` input lines and everything derived from them in
every stage (`<stage>/part-NNNNN`). For each shard the engine walks the stages in order;
a stage's shard is fresh when state.json records it done under the stage's current
fingerprint and from the same source (the input shard's digest for the first stage, the
upstream shard's commit token for the others). The first stale stage and everything after
it are recomputed for that shard; fresh ones are skipped without reading their data.

Several shards are in flight at once so an LLM stage keeps its model busy across shard
boundaries; commits happen one at a time in the event loop (see store.py for their order).
A shard job is self-contained (its input lines or upstream part file in, stage outputs
out), which is what a distributed executor needs to ship it elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson

from . import batchmode
from .config import ConfigError, Pipeline, StageSpec, check_api_keys
from .plan import NotFresh, plan_shard
from .source import InputError, Shard, parse_line, read_shards, resolve
from .stages import FilterStage, LLMStage, PythonStage, StageOutput
from .state import Counters, ShardEntry, StageState, State
from .store import (Entry, Journal, Locked, StoreError, Workdir, describe, dumps_lines,
                    encode_lines, printable)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LATER = 0, 1, 2, 75
BATCH_POLL_S = float(os.environ.get("CHUNBOT_BATCH_POLL_S", "30"))
MAX_SHARDS_IN_FLIGHT = 64

__all__ = ["RunOptions", "RunReport", "run", "ConfigError", "InputError", "Locked",
           "StoreError", "Interrupted"]


class Interrupted(Exception):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM; what finished is kept."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
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


@dataclass
class StageReport:
    counts: Counters = field(default_factory=Counters)
    known: int = 0  # records handed to the stage in this run so far (done or not)
    fresh_records: int = 0  # records of the shards that were up to date: done before
    shards_run: int = 0
    shards_skipped: int = 0
    batches_pending: int = 0
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
        progress: Progress | None = None) -> RunReport:
    """Run (or resume) a pipeline; returns a report whose exit_code follows DESIGN.md.

    Raises ConfigError or InputError (exit 2) and Locked (exit 75) before any work starts.
    """
    options = options or RunOptions()
    check_api_keys(pipeline, selected_stages(pipeline, options))
    work = Run(pipeline, options, progress)
    try:
        return asyncio.run(work.execute())
    except asyncio.CancelledError:
        if work.stopped_by is None:
            raise
        raise Interrupted(work.stopped_by) from None
    except OSError as e:  # the lock or state.json, before or after the shards' work
        raise StoreError(f"cannot write the workdir: {describe(e)}") from None


def pending_batches(pipeline: Pipeline, stage: str | None = None,
                    cancel: bool = False) -> list[dict[str, Any]]:
    """The provider batches shards wait for (however batch mode was chosen: the YAML or
    `--mode batch`), with their state at the provider, asked now; with `cancel`,
    cancelled first. A later `run` collects what they finished and sends the rest again.
    Without the model's API key, they are listed unasked (cancelling needs it)."""
    workdir = Workdir(pipeline.workdir, pipeline.compress)
    chosen = [pipeline.stage(stage)] if stage else [s for s in pipeline.stages
                                                    if s.kind == "llm"]
    ledgers = {s.name: batchmode.Ledgers(workdir, s.name) for s in chosen}
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
        from .llm.batch import Batches
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
                        api = api or Batches(pipeline.models[spec.models[0]], session)
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
    def __init__(self, pipeline: Pipeline, options: RunOptions, progress: Progress | None):
        self.pipeline = pipeline
        self.options = options
        self.progress = progress
        self.workdir = Workdir(pipeline.workdir, pipeline.compress)
        self.selected = selected_stages(pipeline, options)
        self.last = pipeline.stages.index(self.selected[-1])
        self.report = RunReport(stages={s.name: StageReport() for s in self.selected})
        self.files = resolve(pipeline.input)
        self.input_bytes = _input_size(self.files)
        self.bytes_read = 0
        self.read_through = False  # the whole input has been read
        self.started = time.monotonic()
        self.clients: dict[str, Any] = {}
        self.session: Any = None  # the run's one aiohttp session, when a model speaks HTTP
        self.cache: Any = None  # the response cache, when an LLM stage uses it
        self.batch_ledgers: dict[str, batchmode.Ledgers] = {}  # batches.json per stage
        self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self.state = State()
        self.stopped_by: int | None = None  # the signal that interrupted the run
        self.stopping = False  # a fault of the workdir: read no more input
        self.missing_parts: set[str] = set()  # stages whose part files were found gone
        self.collecting: set[str] = set()  # realtime stages collecting earlier batches

    async def execute(self) -> RunReport:
        with self.workdir.lock() as previous_holder:
            if previous_holder and previous_holder != str(os.getpid()):
                self.note(f"took over the lock left by pid {previous_holder}, "
                          "which is no longer running")
            self.workdir.remove_temp_files()
            self.state = self.workdir.load_state()
            self.state.last_run = {"started": _now(), "pid": os.getpid()}
            self._reset_changed_stages()
            ticker = None
            self._on_signals(asyncio.current_task())
            try:
                runners = self._make_runners()
                if self.progress:
                    self.progress.start(self)
                ticker = asyncio.create_task(self._tick())
                await self._walk(runners)
            except asyncio.CancelledError:
                if self.stopped_by is not None:
                    self._record_interruption()
                raise
            finally:
                if ticker is not None:
                    ticker.cancel()
                self.committer.shutdown(wait=True)
                for client in self.clients.values():
                    await client.close()
                if self.session is not None:
                    await self.session.close()
                if self.cache is not None:
                    try:
                        await self.cache.close()  # its last buffered writes
                    except Exception as e:  # a full disk, a Redis gone away
                        self.report.errors.append(f"the response cache could not store the "
                                                  f"last replies: {type(e).__name__}: {e}")
                    self.report.cache_hits, self.report.cache_misses = (self.cache.hits,
                                                                        self.cache.misses)
            self._finish()
        if self.progress:
            self.progress.finish(self, self.report)
        return self.report

    def _on_signals(self, task: asyncio.Task[Any] | None) -> None:
        """SIGINT and SIGTERM stop the run the same way: no new requests, what finished
        is committed or stays in the journals, state.json says how the run ended."""
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            if self.stopped_by is None and task is not None:
                self.stopped_by = signum
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop, signum)
            except (ValueError, RuntimeError):  # not the main thread (a notebook's worker)
                return

    def _record_interruption(self) -> None:
        assert self.stopped_by is not None
        self.report.seconds = time.monotonic() - self.started
        self.report.exit_code = 128 + self.stopped_by
        self.state.last_run.update(ended=_now(), exit_code=self.report.exit_code,
                                   interrupted=signal.Signals(self.stopped_by).name)
        self.committer.shutdown(wait=True)  # the commits under way belong in the state
        self.workdir.save_state(self.state)
        if self.progress:
            self.progress.finish(self, self.report)

    # planning
    def _stage_state(self, stage: StageSpec) -> StageState:
        return self.state.stages[stage.name]

    def _upstream_not_fresh(self, upstream: StageSpec, shard: int | None = None) -> ConfigError:
        where = "" if shard is None else f" for shard {shard}"
        wanted = self.selected[0].name
        return ConfigError(f"stage {wanted!r} needs fresh output of {upstream.name!r}{where}; "
                           f"run with --until {wanted} instead")

    def _reset_changed_stages(self) -> None:
        position = self.pipeline.stages.index(self.selected[0])
        if (self.options.stage or self.options.rerun) and position > 0:
            upstream = self.pipeline.stages[position - 1]
            saved = self.state.stages.get(upstream.name)
            if saved is None or saved.fingerprint != upstream.fingerprint:
                raise self._upstream_not_fresh(upstream)
        for stage in self.selected:
            saved = self.state.stages.get(stage.name)
            redo = stage.name == self.options.rerun
            if saved is not None and redo and self._partial_rerun:
                self.workdir.snapshot_stage(stage.name)  # before and after, for `chunbot diff`
            elif saved is None or saved.fingerprint != stage.fingerprint or redo:
                if redo:
                    self.note(f"rerunning stage {stage.name!r}; its previous output is in "
                              f"{self.workdir.stage_dir(stage.name)}.prev")
                elif saved is not None:
                    self.note(f"stage {stage.name!r} changed: recomputing it")
                self.workdir.reset_stage(stage.name)
                self.state.stages[stage.name] = StageState(stage.fingerprint, stage.definition)
        self.workdir.save_state(self.state)

    @property
    def _partial_rerun(self) -> bool:
        return self.options.rerun_failed or self.options.rerun_ids is not None

    def _redo(self, stage: StageSpec, shard: int, entry: ShardEntry) -> bool:
        """Whether `rerun --failed` / `--ids` has records to redo in this fresh shard."""
        if stage.name != self.options.rerun or not self._partial_rerun:
            return False
        if self.options.rerun_failed:
            return bool(entry.counts.failed)  # state.json says so: no need to read the trace
        return any(map(self._redoes, self.workdir.read_trace(stage.name, shard)))

    def _redoes(self, trace: dict[str, Any]) -> bool:
        """Whether a partial rerun sends this record (its trace entry) again."""
        if self.options.rerun_failed:
            return trace.get("error") is not None
        return str(trace.get("_id")) in (self.options.rerun_ids or ())

    def _reusable(self, stage: StageSpec, shard: int) -> dict[int, Entry]:
        """For a partial rerun: the shard's finished records that stay as they are."""
        if stage.name != self.options.rerun or not self._partial_rerun:
            return {}
        kept = {}
        for i, trace in enumerate(self.workdir.read_trace(stage.name, shard)):
            if not self._redoes(trace):
                kept[i] = Entry(i, trace, out=trace.get("output"), error=trace.get("error"))
        return kept

    def _make_runners(self) -> dict[str, Any]:
        runners: dict[str, Any] = {}
        for stage in self.selected:
            if stage.kind == "filter":
                runners[stage.name] = FilterStage(stage)
            elif stage.kind == "python":
                runners[stage.name] = PythonStage(stage, self.pipeline.import_paths)
            else:
                first = self.pipeline.models[stage.models[0]]
                if self.options.mode == "batch" and not first.batch_api:
                    self.note(f"stage {stage.name!r}: model {first.alias!r} has no batch API "
                              "(batch_api: false): realtime")
                self._connect(stage.models)
                runners[stage.name] = LLMStage(stage, self.clients, self._open_cache(stage),
                                               cache_read=stage.name != self.options.rerun)
        return runners

    def _open_cache(self, stage: StageSpec) -> Any:
        if not stage.cache or not self.pipeline.cache.enabled or self.options.cache == "off":
            return None
        if self.cache is None:
            from .llm.cache import Cache

            try:
                self.cache = Cache(self.pipeline.cache, read=self.options.cache != "refresh")
            except Exception as e:  # an unreachable Redis, an unwritable folder
                raise ConfigError(f"{self.pipeline.path}: cache: cannot open it: "
                                  f"{type(e).__name__}: {e}") from None
        return self.cache

    def _connect(self, aliases: tuple[str, ...]) -> None:
        from .llm.client import ModelClient, make_provider  # tenacity: ~50 ms, LLM stages only

        for alias in aliases:
            if alias in self.clients:
                continue
            spec = self.pipeline.models[alias]
            if spec.provider != "sim" and self.session is None:
                from .llm.http import open_session  # aiohttp: ~100 ms, HTTP models only

                self.session = open_session(self._connections())
            self.clients[alias] = ModelClient(spec, make_provider(spec, self.session), self.note)

    def _connections(self) -> int:
        """Connection pool size: every request the run's HTTP models may have in flight."""
        from .llm.scheduler import MAX_LIMIT

        aliases = {a for stage in self.selected if stage.kind == "llm" for a in stage.models}
        return sum(self.pipeline.models[a].max_concurrency
                   or MAX_LIMIT * len(self.pipeline.models[a].urls)
                   for a in aliases if self.pipeline.models[a].provider != "sim")

    def _plan(self, shard: Shard) -> tuple[list[StageSpec], str]:
        """The stages to compute for this shard and the source token the first one reads."""
        stages = self.pipeline.stages[: self.last + 1]
        try:
            planned = plan_shard(stages, self.selected, self.state.stages, shard.index,
                                 shard.digest, self._has_part, self._redo)
        except NotFresh as e:
            raise self._upstream_not_fresh(e.stage, e.shard) from None
        if planned.start is None:
            return [], planned.source
        return stages[planned.start:], planned.source

    def _has_part(self, stage: StageSpec, shard: int) -> bool:
        if self.workdir.part_path(stage.name, shard).exists():
            return True
        if stage.name not in self.missing_parts:
            self.note(f"stage {stage.name!r}: the output of shard {shard} is missing "
                      f"({self.workdir.part_path(stage.name, shard)}): recomputing it")
        self.missing_parts.add(stage.name)
        return False

    # the shard walk
    async def _walk(self, runners: dict[str, Any]) -> None:
        window = asyncio.Semaphore(self._window(runners))
        jobs: dict[asyncio.Task[None], int] = {}

        def finished(job: asyncio.Task[None]) -> None:
            shard = jobs.pop(job)
            window.release()
            if not job.cancelled() and job.exception() is not None:
                self._job_failed(shard, job.exception())
                if self.stopping:
                    for other in jobs:
                        other.cancel()

        count = 0
        read_through = False
        if self.options.limit is None:
            self.state.input_shards = None  # known again once the input is read through
        try:
            try:
                for shard in read_shards(self.files, self.pipeline.shard_size,
                                         self.options.limit):
                    if self.stopping:
                        break
                    count += 1
                    self.report.lines_read += len(shard.lines)
                    self.bytes_read += shard.size + len(shard.lines)
                    todo, source = self._plan(shard)
                    for stage in self.selected:
                        if stage not in todo:
                            report = self.report.stages[stage.name]
                            report.shards_skipped += 1
                            report.fresh_records += self._stage_state(stage).shards[
                                shard.index].counts.records_in
                    if not todo:
                        continue
                    await window.acquire()
                    job = asyncio.create_task(self._shard_job(shard, todo, source, runners))
                    jobs[job] = shard.index
                    job.add_done_callback(finished)
                    await asyncio.sleep(0)  # let running jobs see their replies between shards
                else:
                    read_through = self.read_through = not self.stopping
            except InputError as e:  # a file that breaks off after some shards were read
                if count == 0:
                    raise
                self.report.errors.append(f"{e}; the records read before it were processed")
            while jobs:
                await asyncio.wait(list(jobs))
        except BaseException:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            raise
        if count == 0:
            self.note("input is empty: nothing to do")
        elif not any(stage.shards_run for stage in self.report.stages.values()) \
                and not self.report.errors:
            self.note("every selected stage is up to date: nothing to do")
        if self.options.limit is None and read_through:
            self._forget_shards_from(count)
            self.state.input_shards = count

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

    def _window(self, runners: dict[str, Any]) -> int:
        """Shards in flight: enough for every LLM stage to fill its concurrency twice over."""
        concurrency = sum(r.concurrency for r in runners.values())
        if not concurrency:
            return 2  # one shard computes while the other commits
        return min(MAX_SHARDS_IN_FLIGHT, 2 + 2 * concurrency // self.pipeline.shard_size)

    async def _shard_job(self, shard: Shard, todo: list[StageSpec], source: str,
                         runners: dict[str, Any]) -> None:
        first = todo[0]
        position = self.pipeline.stages.index(first)
        ids: list[Any] | None = None
        if position == 0:
            records, input_errors = self._parse(shard, first)
            ids = [r["_id"] for r in records] + [e["_id"] for e in input_errors]
        else:
            upstream = self.pipeline.stages[position - 1].name
            records = await asyncio.to_thread(self.workdir.read_shard, upstream, shard.index)
            input_errors = []
        shard.lines = []  # the raw lines are not needed any more
        commits: list[asyncio.Future[None]] = []
        for stage in todo:
            report = self.report.stages[stage.name]
            if report.first_start is None:
                report.first_start = time.monotonic()
            runner = runners[stage.name]
            report.known += len(records) + len(input_errors)
            if stage.kind == "llm":
                output = await self._run_llm(runner, stage, shard.index, source, records)
                if output is None:  # its batch is pending: downstream waits for the next run
                    report.batches_pending += 1
                    break
            else:
                output = runner.run(records)
                report.counts.add(output.counts)
            if input_errors:
                output.errors[:0] = input_errors
                output.counts.failed += len(input_errors)
                report.counts.failed += len(input_errors)
                report.counts.records_in += len(input_errors)
                output.counts.records_in += len(input_errors)
                input_errors = []
            source, commit = self._commit(stage, shard.index, source, output, ids)
            ids = None
            commits.append(commit)
            report.shards_run += 1
            report.last_end = time.monotonic()
            records = output.records
        await asyncio.gather(*commits)

    def _parse(self, shard: Shard, stage: StageSpec) -> tuple[list[dict[str, Any]],
                                                              list[dict[str, Any]]]:
        """Input lines → records with `_id`; bad lines → errors of the first stage."""
        records: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        keep, loads, id_field, position = records.append, orjson.loads, self.pipeline.id_field, \
            shard.start
        for i, line in enumerate(shard.lines):
            try:
                record = loads(line)
            except orjson.JSONDecodeError:
                record = None
            if type(record) is not dict:
                record, problem = parse_line(line)
                if record is None:
                    if problem is not None:
                        name, lineno = shard.origin(i)
                        errors.append({"_id": position + i, "stage": stage.name,
                                       "error": f"{name}:{lineno}: {problem}", "file": name,
                                       "line": lineno,
                                       "raw": line[:1000].decode("utf-8", "replace")})
                    continue
            if id_field is not None and id_field in record:
                record["_id"] = record[id_field]
            else:
                record["_id"] = position + i
            keep(record)
        return records, errors

    async def _run_llm(self, runner: LLMStage, stage: StageSpec, shard: int, source: str,
                       records: list[dict[str, Any]]) -> StageOutput | None:
        """One LLM stage of one shard, realtime or through a batch (None: still pending)."""
        counts = self.report.stages[stage.name].counts
        journal = Journal(self.workdir.journal_path(stage.name, shard),
                          {"stage": stage.name, "fingerprint": stage.fingerprint, "src": source})
        restored = {i: e for i, e in journal.load().items() if i < len(records)}
        for entry in restored.values():  # finished by an interrupted run: counted here too
            counts.count(entry)
        done = {**self._reusable(stage, shard), **restored}
        journal.open(done)

        def on_done(entry: Entry) -> None:
            if not entry.trace.get("cache_hit"):  # on a resume the cache answers again
                journal.append(entry)
            counts.count(entry)

        try:
            batched = self._batched(stage)
            if batched or self._batches_pending(stage, shard, source):
                return await self._run_batch(runner, stage, shard, source, records, done,
                                             on_done, realtime_rest=not batched)
            return await runner.run(records, done, on_done)
        finally:
            journal.close()

    def _batched(self, stage: StageSpec) -> bool:
        mode = self.options.mode or stage.mode
        return mode == "batch" and self.pipeline.models[stage.models[0]].batch_api

    def _batches_pending(self, stage: StageSpec, shard: int, source: str) -> bool:
        """Whether an earlier batch-mode run left batches at the provider for this shard
        (as it is now). A realtime run collects them rather than pay for the same
        requests twice, and sends only what they do not answer."""
        pending = self._ledgers(stage).pending(shard, source, stage.fingerprint)
        if pending and stage.name not in self.collecting:
            self.collecting.add(stage.name)
            self.note(f"stage {stage.name!r}: provider batches of an earlier batch-mode run "
                      "are pending: collecting them instead of sending their requests again "
                      f"(`chunbot cancel {self.pipeline.path} --stage {stage.name}` gives up "
                      "on them; what they did not answer then goes in realtime)")
        return pending

    async def _run_batch(self, runner: LLMStage, stage: StageSpec, shard: int, source: str,
                         records: list[dict[str, Any]], done: dict[int, Entry],
                         on_done: Any, realtime_rest: bool = False) -> StageOutput | None:
        from .llm.batch import Batches

        ledgers = self._ledgers(stage)
        ledgers.open(shard, source, stage.fingerprint)
        api = Batches(self.pipeline.models[stage.models[0]], self.session)
        metadata = {"chunbot_pipeline": self.pipeline.name, "chunbot_stage": stage.name,
                    "chunbot_shard": str(shard)}
        finished = dict(done)

        def remember(entry: Entry) -> None:
            finished[entry.i] = entry
            on_done(entry)

        while True:
            output = await batchmode.run_shard(runner, records, finished, remember, ledgers,
                                               shard, api, metadata, realtime_rest)
            if output is not None or not self.options.wait:
                return output
            await asyncio.sleep(BATCH_POLL_S)

    def _ledgers(self, stage: StageSpec) -> batchmode.Ledgers:
        if stage.name not in self.batch_ledgers:
            self.batch_ledgers[stage.name] = batchmode.Ledgers(self.workdir, stage.name)
        return self.batch_ledgers[stage.name]

    def _commit(self, stage: StageSpec, shard: int, source: str, output: StageOutput,
                ids: list[Any] | None = None) -> tuple[str, asyncio.Future[None]]:
        """Hand one stage's shard to the committer thread; returns its new token at once.

        One thread commits in order, so a downstream shard is never marked done before
        its upstream, and fsyncs overlap with the next shard's work.
        """
        token = os.urandom(8).hex()
        records, trace, errors = self._encode(stage, shard, output)
        entry = ShardEntry(source, token, dataclasses.replace(output.counts))
        future = asyncio.get_running_loop().run_in_executor(
            self.committer, self._persist, stage, shard, entry, records, trace, errors, ids)
        return token, future

    def _encode(self, stage: StageSpec, shard: int,
                output: StageOutput) -> tuple[bytes, bytes | None, bytes]:
        """The shard's part, trace and error lines. A record JSON cannot hold (a set, a
        key that is not a string, too deep) is that record's failure: it leaves the
        output, before the next stage sees it, for errors.jsonl."""
        records, bad = encode_lines(output.records)
        if bad:
            counts = (output.counts, self.report.stages[stage.name].counts)
            for i, why in reversed(bad):
                record = output.records.pop(i)
                output.errors.append({"_id": printable(record.get("_id")), "stage": stage.name,
                                      "error": f"the record cannot be written as JSON: {why}",
                                      "record": printable(record)})
            for c in counts:
                c.records_out -= len(bad)
                c.failed += len(bad)
        trace = None
        if output.trace is not None:
            trace, bad = encode_lines(output.trace)
            if bad:  # one line per record, always: `rerun` reads them by position
                for i, why in bad:
                    output.trace[i] = {"_id": printable(output.trace[i].get("_id")),
                                       "stage": stage.name,
                                       "error": f"the trace cannot be written as JSON: {why}"}
                trace = dumps_lines(output.trace)
        lines = [{**e, "shard": shard} for e in output.errors]
        errors, bad = encode_lines(lines)
        if bad:
            for i, _ in bad:
                lines[i] = printable(lines[i])
            errors = dumps_lines(lines)
        return records, trace, errors

    def _persist(self, stage: StageSpec, shard: int, entry: ShardEntry, records: bytes,
                 trace: bytes | None, errors: bytes, ids: list[Any] | None) -> None:
        """The commit itself, in the order store.py explains."""
        stage_state = self._stage_state(stage)
        previous = stage_state.shards.pop(shard, None)
        if previous is not None and previous.counts.failed:
            stage_state.errors_bytes = self.workdir.drop_errors(stage.name, {shard})
        if ids is not None:
            self.workdir.write_id_index(stage.name, shard, ids)
        self.workdir.write_shard(stage.name, shard, records, trace)
        stage_state.errors_bytes = self.workdir.append_errors(
            stage.name, stage_state.errors_bytes, errors)
        stage_state.shards[shard] = entry
        self.workdir.save_state(self.state)
        self.workdir.journal_path(stage.name, shard).unlink(missing_ok=True)

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
        failed = 0
        for stage in self.selected:
            count = self._stage_state(stage).failed()
            if count:
                self.report.failures.append(self._failures(stage, count))
            failed += count
        self.report.failed_total = failed
        pending = sum(stage.batches_pending for stage in self.report.stages.values())
        self.report.exit_code = (EXIT_FAILED if self.report.errors else EXIT_LATER if pending
                                 else EXIT_FAILED if failed else EXIT_OK)
        if pending:
            self.note(f"{pending} shard(s) wait for provider batches: run again later "
                      "(or use --wait)")
        if not pending and not self.report.errors:
            self._export()
        self.state.last_run.update(ended=_now(), exit_code=self.report.exit_code)
        self.workdir.save_state(self.state)

    def _export(self) -> None:
        """`output:` gets the last stage's records once every shard of it is done (with
        the whole input read, not `--limit`), and again whenever a shard changed."""
        output, last = self.pipeline.output, self.pipeline.stages[-1]
        if output is None or self.selected[-1] is not last or not self.read_through \
                or self.options.limit is not None:
            return
        shards = self._stage_state(last).shards
        if len(shards) != self.state.input_shards:
            return
        if self.report.stages[last.name].shards_run == 0 and output.exists():
            return  # nothing new since it was written
        try:
            count = self.workdir.export(last.name, sorted(shards), output)
        except OSError as e:
            self.report.errors.append(f"cannot write the output: {describe(e)}")
            self.report.exit_code = EXIT_FAILED
            return
        self.note(f"output: {count:,} records of stage {last.name!r} in {output}")

    def _failures(self, stage: StageSpec, count: int) -> StageFailures:
        reasons, scanned = self.workdir.failure_reasons(stage.name)
        rerun = (f"chunbot rerun {self.pipeline.path} --stage {stage.name} --failed"
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


def _input_size(files: list[str]) -> int | None:
    """Total bytes of the input when it is plain files (for a progress percentage)."""
    if any(name == "-" or name.endswith(".zst") for name in files):
        return None
    return sum(os.path.getsize(name) for name in files)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
