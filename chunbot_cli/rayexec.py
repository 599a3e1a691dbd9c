"""Shard jobs on a Ray cluster: `run --executor ray` (DESIGN.md, "Many machines").

The driver — this process — plans, journals and commits exactly as a local run does. A job
goes to the cluster as a Ray generator task. The worker process builds the run's stages
once (their own model clients, session and cache, on an event loop of its own), runs the job
there, and streams back what it reports — records finished, records out, a stage's shard
whole — a few dozen events at a time. The driver hands them to the engine's `JobEvents` in
order, so the journal has every finished record within moments, and commits stay upstream
first. A worker that dies costs only its requests in flight: the job goes again from what
the driver journalled, without the stages it had already committed. Jobs with batch-mode
stages run on the driver, so provider batches are created and collected there only.

The API keys the run's models name (`api_key_env`) go from the driver's environment to the
workers with each task, as an argument of its own (`Keys`, which never shows them): a
cluster's nodes need none of their own, and no key is in the pipeline, Ray's job or
runtime_env metadata, a log or a trace. The run's spending account (`--max-cost`) is kept by
the board: each worker takes room from it and says what it spent (raycost.py),
and the driver's Spending follows it, so the cluster stays under the cap as one process does.

When the driver is gone, so is its work: Ray ends the jobs' workers of a cluster that
outlives the driver (its raylet tells the GCS the driver died); a worker whose board died
(it lives on the driver's node, and Ray ends it with its owner) stops its job once Ray has
the job as ended, whether Ray ends it or not; and a Ray this run started, whose GCS and
raylet die with the driver so that nobody tells the workers, is ended whole by a watchdog
process the moment the driver's end of a pipe closes (raywatch.py) — kill -9 too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .config import ConfigError
from .flow import JobEvents, ShardJob, StageWork, run_job
from .llm.price import Spending
from .raycost import BOARD_TIMEOUT_S, Account, Allowance, Mirror
from .raywatch import guard
from .stages import Batch

LOST_WORKER_RETRIES = 5  # times one job goes again after the worker running it died
DRAIN_S = 0.02  # a worker sends what its job reported at least this often…
SHARE_S = 0.5  # …and asks the board for its share this often, on a small cluster
# On a large one, less often: measured here, a driver takes ~2,400 event batches a second
# and the board answers 666–2,108 calls a second (bench/ray.py): the cluster together sends
# at most about this many of each per second
YIELDS_PER_S = SHARES_PER_S = 1000
_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# a Ray this run starts serves this machine only: on loopback (Ray's own switch for that,
# read when Ray is imported), so with no token (which makes joins hang for ~30 s)
_LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


class RayMissing(ConfigError):
    """Ray is not installed: `pip install 'chunbot[ray]'`."""


def import_ray(local: bool = True) -> Any:
    """Ray, imported; `local`: for a Ray this process starts, not a cluster it joins."""
    for name, value in {**_RAY_ENV, **(_LOCAL_RAY_ENV if local else {})}.items():
        os.environ.setdefault(name, value)
    try:
        import ray
    except ImportError:
        raise RayMissing("--executor ray needs Ray: pip install 'chunbot[ray]'") from None
    return ray


@dataclasses.dataclass(frozen=True)
class Blueprint:
    """What a worker needs to build the run's stages: plain, picklable data."""

    pipeline: Any  # config.Pipeline, with an absolute path and no `tests:`
    selected: tuple[str, ...]
    cache: str
    rerun: str | None
    mode: str | None
    cwd: str  # the driver's: `python:` stages are imported from it too
    # what the driver streams of the last stage's records: None (nothing), "lines" (their
    # JSON lines) or "records" (the records too, for the library)
    output: str | None = None
    drain_s: float = DRAIN_S  # how often a worker sends its job's events…
    share_s: float = SHARE_S  # …and asks the board for its share: longer on a big cluster
    capped: bool = False  # the run has a cost cap: requests take room from the board's account

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.pipeline.path, tuple(s.fingerprint for s in self.pipeline.stages),
                self.selected, self.cache, self.rerun, self.mode)


@dataclasses.dataclass(frozen=True)
class Keys:
    """The API keys of the run's models, by variable (`api_key_env`), as the driver has
    them: shipped with each task, set in the worker process's environment, never shown —
    its repr names the variables only."""

    values: Mapping[str, str]

    def __repr__(self) -> str:
        return f"Keys({', '.join(sorted(self.values))})"


def keys_of(pipeline: Any, selected: list[Any]) -> Keys:
    """The keys the selected stages' models name, from this process's environment."""
    variables = {pipeline.models[alias].api_key_env for stage in selected
                 if stage.kind == "llm" for alias in stage.models}
    return Keys({name: os.environ[name] for name in sorted(v for v in variables if v)
                 if os.environ.get(name)})


class RayExecutor:
    """Runs shard jobs as Ray tasks; `local` runs those that must stay on the driver.
    The interface is LocalExecutor's."""

    def __init__(self, blueprint: Blueprint, events: JobEvents, window: int,
                 ended: Callable[[ShardJob, BaseException | None], None],
                 local: Any, resume: Callable[[ShardJob, set[str], dict[str, dict]], ShardJob],
                 note: Callable[[str], None], report: Any, keys: Keys = Keys({}),
                 spending: Spending | None = None):
        self.ray = sys.modules["ray"]  # imported by start()
        self.blueprint, self.events, self.ended = blueprint, events, ended
        self.local, self.resume, self.note = local, resume, note
        self.report = report  # the run's engine.RunReport: the workers' cache use adds up
        self.keys = keys
        self.remote = self.ray.remote(max_retries=0)(_run_remote)
        # on the driver's node, so the board is gone only when the driver is: then the
        # workers stop (and Ray ends an actor whose owner died)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(),
                                              soft=False)
        self.mirror = Mirror(spending) if spending is not None else None
        self.board = self.ray.remote(num_cpus=0, scheduling_strategy=here)(Board).remote(
            *((spending.cap, self.mirror.own()) if self.mirror is not None else ()))
        self.syncing: asyncio.Task[None] | None = None  # the mirror, kept in step
        self.unsynced = False  # the board did not answer a sync: said once
        self.cpus = cluster_cpus(self.ray)
        self.running = 0  # jobs on the cluster: tasks queued or at work
        self.window = asyncio.Semaphore(window)
        self.jobs: dict[asyncio.Task[None], ShardJob] = {}

    async def submit(self, job: ShardJob) -> None:
        if self.mirror is not None and self.syncing is None:
            self.syncing = asyncio.create_task(self._keep_account())
        if any(work.mode is not None for work in job.stages):  # provider batches
            await self.local.submit(job)
            return
        await self.window.acquire()
        task = asyncio.create_task(self._drive(job))
        self.jobs[task] = job
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        job = self.jobs.pop(task)
        self.window.release()
        self.ended(job, None if task.cancelled() else task.exception())

    async def _drive(self, job: ShardJob) -> None:
        """Run the job remotely, handing its events over in order; after a lost worker,
        run what is left of it again."""
        ray = self.ray
        attempt = job
        committed: set[str] = set()
        received: dict[str, dict[Any, Any]] = {work.stage: {} for work in job.stages}
        passed: dict[str, set[Any]] = {work.stage: set() for work in job.stages}
        self._count(+1)
        try:
            for lost in range(LOST_WORKER_RETRIES + 1):
                events = self.remote.remote(self.blueprint, attempt, self.board, self.keys)
                try:
                    async for ref in events:
                        for event in await ref:
                            await self._hand_over(attempt, event, committed, received,
                                                  passed)
                    return
                except asyncio.CancelledError:  # the run stops: so does the job, out there
                    ray.cancel(events)
                    raise
                except ray.exceptions.RayTaskError as e:  # the job raised, as a local one
                    raise e.as_instanceof_cause() from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError) as e:
                    if lost == LOST_WORKER_RETRIES or len(committed) == len(job.stages):
                        raise
                    self.note(f"shard {job.shard}: its worker was lost "
                              f"({type(e).__name__}); it goes again from what was journalled")
                    attempt = self.resume(job, committed, received)
        finally:
            self._count(-1)

    def _count(self, change: int) -> None:
        """Tell the board how many workers are at this run's jobs."""
        self.running += change
        self.board.expect.remote(min(self.running, self.cpus))

    async def _hand_over(self, job: ShardJob, event: tuple[Any, ...], committed: set[str],
                         received: dict[str, dict[Any, Any]], passed: dict[str, set[Any]]
                         ) -> None:
        kind = event[0]
        if kind == "entry":
            _, stage, shard, entry, new = event
            received[stage][entry.key] = entry
            self.events.entry(stage, shard, entry, new)
        elif kind == "passed":
            _, stage, shard, batch, data, counts = event
            seen = passed[stage]
            if seen.intersection(batch.keys):  # a job that went again passes them again
                keep = [i for i, key in enumerate(batch.keys) if key not in seen]
                lines = data.split(b"\n")
                batch = Batch([batch.keys[i] for i in keep], [batch.records[i] for i in keep])
                data = b"".join(lines[i] + b"\n" for i in keep)
            seen.update(batch.keys)
            self.events.passed(stage, shard, batch, data, counts)
        elif kind == "fed":
            self.events.fed(*event[1:])
        elif kind == "done":
            _, position, output = event
            if output.trace == []:  # the traces came with the entries: not twice
                finished = received[job.stages[position].stage]
                output.trace = [finished[key].trace for key in sorted(finished)]
            commit = self.events.done(job, position, output)
            if commit is not None:
                await commit  # committed before anything that comes after it
            committed.add(job.stages[position].stage)
        elif kind == "pending":
            if event[3] == "max_cost" and self.mirror is not None:  # a worker was refused:
                self.mirror.spending.reached = True  # the driver reads no more input either
            self.events.pending(*event[1:])
        elif kind == "note":
            self.note(event[1])
        elif kind == "cache":
            _, hits, misses, failure = event
            self.report.cache_hits += hits
            self.report.cache_misses += misses
            if failure is not None and failure not in self.report.errors:
                self.report.errors.append(failure)

    async def join(self) -> None:
        while self.jobs:
            await asyncio.wait(list(self.jobs))
        await self.local.join()
        if self.syncing is not None:  # every job has ended: the account as it is now
            self.syncing.cancel()
            await self._sync()

    async def _keep_account(self) -> None:
        """The driver's Spending and the board's account in step, as long as the run
        goes (join() and stop() end it)."""
        while True:
            await self._sync()
            await asyncio.sleep(self.blueprint.share_s)

    async def _sync(self) -> None:
        assert self.mirror is not None
        try:
            await asyncio.wait_for(self.mirror.sync(self.board), BOARD_TIMEOUT_S)
        except (asyncio.TimeoutError, self.ray.exceptions.RayError) as e:
            if not self.unsynced:  # once: it is asked again every share_s
                self.note(f"--max-cost: the board did not answer ({type(e).__name__}); "
                          "the driver counts what it last heard from it")
            self.unsynced = True

    def stop(self) -> None:
        for task in self.jobs:
            task.cancel()
        if self.syncing is not None:
            self.syncing.cancel()
        self.local.stop()

    async def cancel(self) -> None:
        jobs = list(self.jobs)
        self.stop()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self.local.cancel()


def for_run(pipeline: Any, selected: list[Any], options: Any, events: JobEvents,
            ended: Callable[[ShardJob, BaseException | None], None], local: Any,
            part_input: Callable[[StageWork, int], Any], output: str | None,
            note: Callable[[str], None], report: Any, spending: Spending | None = None
            ) -> tuple["RayExecutor", bool]:
    """A run's Ray executor (its engine.RunOptions say where the cluster is), and whether
    it started a Ray of its own, to shut down after the run. `spending`: the run's cost
    cap, if it has one, which the workers' requests count against too."""
    ray, started = start(options.ray_address or pipeline.ray_address)
    cpus = cluster_cpus(ray)
    blueprint = dataclasses.replace(
        blueprint_of(pipeline, selected, options.cache, options.rerun, options.mode, output,
                     workers=cpus), capped=spending is not None)
    window = 2 * cpus  # a task holds a CPU while its shard runs
    note(f"executor: Ray, {cpus} CPUs, {window} shards in flight")

    def resume(job: ShardJob, committed: set[str], received: dict[str, dict]) -> ShardJob:
        return resumed(job, committed, received, part_input)

    return RayExecutor(blueprint, events, window, ended, local, resume, note, report,
                       keys_of(pipeline, selected), spending), started


def start(address: str | None) -> tuple[Any, bool]:
    """Ray, joined to the cluster at `address` ("auto", "HOST:PORT") or to a local one it
    starts; and whether it started it (so shuts it down after the run)."""
    ray = import_ray(local=address is None)
    if ray.is_initialized():
        return ray, False
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "configure_logging": False}
    if address is None:
        options.update(object_store_memory=int(1e8),
                       _temp_dir=os.environ.get("CHUNBOT_RAY_TEMP", "/tmp/chunbot-ray"))
    ray.init(address=address, **options)
    _news_to_stderr()
    if address is None:
        guard(ray)
    return ray, address is None


def _news_to_stderr() -> None:
    """Ray prints the cluster's news ("a worker died…") on the driver's stdout, which is
    the records' with --stream: send it to stderr, with the logs."""
    try:
        from ray._private import worker
    except ImportError:
        return
    show = worker.print_to_stdstream
    if getattr(show, "chunbot", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        show({**data, "is_err": True}, ignore_prefix)

    to_stderr.chunbot = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


Learned = dict[str, tuple[float | None, float | None]]  # alias: requests, tokens a minute
Concurrency = dict[tuple[str, str], float]  # (alias, endpoint URL): concurrency limit


class Board:
    """A Ray actor: the run's shared view of its models. It knows how many workers run
    the run's jobs at once (the driver counts them), the request and token limits the
    servers announced to any of them, and each worker's concurrency limit at each
    endpoint. So a worker that starts knows the limits before its first request, and
    starts at its share of the concurrency the others found instead of slow start. Each
    worker takes 1/N of every model's budgets, so together they stay under the server's
    limits; concurrency limits stay each worker's own after that (like TCP flows, their
    AIMD finds each its share)."""

    def __init__(self, cap: float | None = None, used: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.workers = 1
        self.limits: Learned = {}
        self.concurrency: dict[str, tuple[float, Concurrency]] = {}  # worker: when, what
        self.calls = 0  # share() calls answered: what bench/ray.py counts
        self.account = Account(cap, driver=used) if cap is not None else None

    def expect(self, workers: int) -> None:
        self.workers = max(1, workers)

    def take(self, worker: str, spent: float, used: float, returned: float, want: float,
             need: float) -> tuple[float, bool]:
        """A worker's part of the run's spending account: see Account.take()."""
        assert self.account is not None, "a run with no cost cap keeps no account"
        return self.account.take(worker, spent, used, returned, want, need, self.workers)

    def sync(self, driver: float, reached: bool) -> tuple[float, float, bool]:
        """The driver's side of the account: see Account.sync()."""
        assert self.account is not None, "a run with no cost cap keeps no account"
        return self.account.sync(driver, reached)

    def share(self, worker: str, learned: Learned, concurrency: Concurrency, stale_s: float
              ) -> tuple[int, Learned, Concurrency]:
        """What a worker learned in: the limits its servers announced, its concurrency
        limits found (none while it has had no reply); out: the workers at work, what
        every worker learned, and the other workers' concurrency limits added up per
        endpoint (those heard from in the last `stale_s` seconds: the ones at work)."""
        self.calls += 1
        for alias, (requests, tokens) in learned.items():
            known = self.limits.get(alias, (None, None))
            self.limits[alias] = (requests or known[0], tokens or known[1])
        now = self.clock()
        self.concurrency[worker] = (now, concurrency)
        others: Concurrency = {}
        for name, (heard, limits) in list(self.concurrency.items()):
            if now - heard > stale_s:
                del self.concurrency[name]
            elif name != worker:
                for endpoint, limit in limits.items():
                    others[endpoint] = others.get(endpoint, 0.0) + limit
        return self.workers, self.limits, others


# ---------------------------------------------------------------------------------------
# the worker's side

class _Recorder:
    """JobEvents on a worker: what the job reports, queued for the driver — each thing
    once, and only what the driver uses: a stage's traces went with its entries; records
    out of a stage only when they are the run's output, as JSON lines, as records too if
    the driver hands out records; otherwise only their counts (the part file has them)."""

    def __init__(self, out: "queue.SimpleQueue[tuple[Any, ...]]", output: str | None,
                 last: str):
        self.out, self.output, self.last = out, output, last

    def fed(self, stage: str, count: int) -> None:
        self.out.put(("fed", stage, count))

    def entry(self, stage: str, shard: int, entry: Any, new: bool) -> None:
        self.out.put(("entry", stage, shard, entry, new))

    def passed(self, stage: str, shard: int, batch: Any, data: bytes, counts: Any) -> None:
        if self.output is None or stage != self.last:
            if counts is not None:
                self.out.put(("passed", stage, shard, Batch([], []), b"", counts))
            return
        if self.output != "records":
            batch = Batch(batch.keys, [])
        self.out.put(("passed", stage, shard, batch, data, counts))

    def done(self, job: ShardJob, position: int, output: Any) -> None:
        if output.trace is not None:
            output = dataclasses.replace(output, trace=[])
        self.out.put(("done", position, output))

    def pending(self, stage: str, shard: int, why: str) -> None:
        self.out.put(("pending", stage, shard, why))


def use_keys(keys: Keys, pipeline: Any, selected: list[Any], worker: str) -> str | None:
    """Put the driver's keys in this worker process's environment, where the model
    clients read them as on the driver (the process serves the driver's job only); a
    model that still has none, in one line — its requests would all fail with 401."""
    os.environ.update(keys.values)
    missing = sorted({f"{alias!r} ({variable})" for stage in selected
                      if stage.kind == "llm" for alias in stage.models
                      if (variable := pipeline.models[alias].api_key_env)
                      and not os.environ.get(variable)})
    if not missing:
        return None
    return (f"worker {worker}: no API key for model {', '.join(missing)}: it is set "
            "neither where the driver runs nor here")


class _Runtime:
    """A worker process's event loop (on a thread) and the run's stages built on it."""

    def __init__(self, blueprint: Blueprint, keys: Keys):
        from .stageset import StageSet

        if blueprint.cwd not in sys.path:
            sys.path.insert(0, blueprint.cwd)
        self.notes: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self.name = f"{socket.gethostname()}/{os.getpid()}"  # this worker, to the board
        self.keys = keys
        self.driver_gone = False  # board and job ended: nobody takes what the jobs report
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True,
                         name="chunbot-worker").start()
        pipeline = blueprint.pipeline
        selected = [pipeline.stage(name) for name in blueprint.selected]
        missing = use_keys(keys, pipeline, selected, self.name)
        if missing is not None:
            self.notes.put(missing)

        async def build() -> Any:
            return StageSet(pipeline, selected, self.notes.put, blueprint.cache,
                            blueprint.rerun, blueprint.mode)

        self.stageset = asyncio.run_coroutine_threadsafe(build(), self.loop).result()
        self.stages: Mapping[str, Any] = self.stageset.stages

    async def take_share(self, board: Any, stale_s: float) -> None:
        """Tell the board the limits this worker's servers announced and the concurrency
        it found; take the limits any worker learned, 1/N of every budget (N the workers at
        work), and, at an endpoint it has had no reply from yet, its share of what the
        others found. Awaited on the loop: a blocking ray.get would lend this task's CPU
        to another task meanwhile."""
        clients = self.stageset.clients
        learned = {alias: (c.request_budget.announced, c.token_budget.announced)
                   for alias, c in clients.items()}
        found = {(alias, e.url): e.limiter.limit for alias, c in clients.items()
                 for e in c.pool.endpoints if e.limiter.answered}
        try:
            workers, limits, others = await asyncio.wait_for(
                board.share.remote(self.name, learned, found, stale_s), BOARD_TIMEOUT_S)
        except Exception as e:
            # dead, the board says the driver may be (they share a node, and Ray ends an
            # actor with its owner): if Ray has the job as ended, the job stops, whether or
            # not Ray ends its workers itself. Slow to answer: keep what it has
            import ray

            if isinstance(e, ray.exceptions.ActorDiedError):
                self.driver_gone = await asyncio.to_thread(_job_ended)
            return
        for alias, client in clients.items():
            requests, tokens = limits.get(alias, (None, None))
            for budget, announced in ((client.request_budget, requests),
                                      (client.token_budget, tokens)):
                budget.set_share(1 / max(1, workers))
                if announced:
                    budget.announce(announced)
            for endpoint in client.pool.endpoints:
                if (alias, endpoint.url) in others:
                    endpoint.limiter.join(others[alias, endpoint.url] / max(1, workers))

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.stageset.close(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def _job_ended() -> bool:
    """Whether Ray's GCS has this worker's job as ended (its driver gone), or cannot say;
    not when only the board was lost (the kernel's OOM killer) and the driver goes on."""
    import ray

    try:
        job = ray.get_runtime_context().get_job_id()
        return any(info["JobID"] == job and info["IsDead"]
                   for info in ray._private.state.jobs())
    except Exception:  # no GCS to ask, or a Ray whose job table reads otherwise
        return True


_runtimes: dict[tuple[Any, ...], _Runtime] = {}  # this worker process's: at most one


def _runtime(blueprint: Blueprint, keys: Keys) -> _Runtime:
    """The worker's runtime for this run's pipeline; another pipeline's is closed first
    (a worker of a long-lived cluster serves one run after another)."""
    runtime = _runtimes.get(blueprint.key)
    if runtime is None or runtime.keys != keys:
        for old in _runtimes.values():
            old.close()
        _runtimes.clear()
        runtime = _runtimes[blueprint.key] = _Runtime(blueprint, keys)
    return runtime


class DriverGone(Exception):
    """The driver of this job is gone: what the job would report reaches nobody."""


def _run_remote(blueprint: Blueprint, job: ShardJob, board: Any, keys: Keys) -> Any:
    """The Ray task: run the job on this worker's loop, yielding its events as they come."""
    runtime = _runtime(blueprint, keys)
    hits, misses = runtime.stageset.cache_counts()
    events: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
    stale_s = 4 * blueprint.share_s  # a worker not heard from for longer is not at work
    allowance = Allowance(board, runtime.name) if blueprint.capped else None
    for client in runtime.stageset.clients.values():
        client.spending = allowance  # this job's part of the run's account, if it has one

    async def shared_then_run() -> None:
        await runtime.take_share(board, stale_s)  # before its first request
        try:
            await run_job(job, runtime.stages, _Recorder(events, blueprint.output,
                                                             blueprint.selected[-1]))
        finally:
            if allowance is not None:  # stopped too: what it used, and the room left
                await allowance.close()

    async def in_touch() -> None:  # every share_s
        await runtime.take_share(board, stale_s)
        if allowance is not None:
            allowance.report()

    future = asyncio.run_coroutine_threadsafe(shared_then_run(), runtime.loop)
    asked = time.monotonic()
    try:
        while True:
            finished = future.done()
            batch = []
            while not events.empty():
                batch.append(events.get())
            while not runtime.notes.empty():
                batch.append(("note", runtime.notes.get()))
            if batch:
                yield batch
            if finished:
                break
            if runtime.driver_gone:
                raise DriverGone(f"worker {runtime.name}: the driver is gone: job stopped")
            concurrent.futures.wait([future], timeout=blueprint.drain_s)
            if time.monotonic() - asked > blueprint.share_s:
                asyncio.run_coroutine_threadsafe(in_touch(), runtime.loop)
                asked = time.monotonic()
    finally:  # cancelled by the driver (the run stopped), or it is gone: the job stops
        if not future.done():
            future.cancel()
    yield from _flush_cache(runtime, hits, misses)
    future.result()  # the job's error, after what it sent


def _flush_cache(runtime: _Runtime, hits: int, misses: int) -> Iterator[list[tuple]]:
    """The replies the job got, stored for the jobs after it; and how the cache served."""
    cache = runtime.stageset.cache
    if cache is None:
        return
    failure = None
    try:
        asyncio.run_coroutine_threadsafe(cache.flush(), runtime.loop).result()
    except Exception as e:  # a full disk, a Redis gone away: the run's error, as locally
        failure = (f"the response cache could not store replies on worker "
                   f"{runtime.name}: {type(e).__name__}: {e}")
    yield [("cache", cache.hits - hits, cache.misses - misses, failure)]


def blueprint_of(pipeline: Any, selected: list[Any], cache: str, rerun: str | None,
                 mode: str | None, output: str | None, workers: int) -> Blueprint:
    shipped = dataclasses.replace(pipeline, path=Path(pipeline.path).resolve(), tests=(),
                                  workdir=Path(pipeline.workdir).resolve())
    return Blueprint(shipped, tuple(s.name for s in selected), cache, rerun, mode,
                     str(Path.cwd()), output, max(DRAIN_S, workers / YIELDS_PER_S),
                     max(SHARE_S, workers / SHARES_PER_S))


def resumed(job: ShardJob, committed: set[str], received: dict[str, dict[Any, Any]],
            part_input: Callable[[StageWork, int], Any]) -> ShardJob:
    """What is left of a job whose worker died: the stages not committed yet, each with
    the records the driver received from it as done, reading the last committed stage's
    part file (`part_input`) or the job's own input."""
    left = [work for work in job.stages if work.stage not in committed]
    first = job.stages.index(left[0])
    source = job.input if first == 0 else part_input(left[0], job.shard)
    return ShardJob(job.shard, source,
                    [dataclasses.replace(work, done={**work.done, **received[work.stage]})
                     for work in left])
