"""The Python API for notebooks and programs: records in, records out, nothing on disk.

`stream`, `astream` and `run_records` run a pipeline over any iterable of dicts with memory
storage (no workdir; the response cache still answers what it has seen) and give the
output records of the last stage, or of `until`: as they finish, or in input order. Failed
records are reported to `errors` (a list to append to, or a function), never raised; each
LLM record's trace — what `chunbot trace` shows — goes to `traces` the same way. Errors
that stop a run before it starts (a bad pipeline, a missing API key) are raised.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

from . import engine
from .config import Pipeline, load
from .sinks import RecordsOut

if TYPE_CHECKING:
    from .estimator import Estimate

Sink = list[dict[str, Any]] | Callable[[dict[str, Any]], None] | None


async def astream(pipeline: Pipeline | str | Path | Mapping[str, Any],
                  rows: Iterable[dict[str, Any]], *, until: str | None = None,
                  order: str = "completion", errors: Sink = None, traces: Sink = None,
                  cache: str = "use", limit: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """The output records as they finish (`order="input"`: in input order), in the
    running event loop."""
    if not isinstance(pipeline, Pipeline):
        pipeline = load(pipeline)
    out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    options = engine.RunOptions(until=until, limit=limit, cache=cache, order=order,
                                storage="memory")
    run = asyncio.ensure_future(engine.arun(pipeline, options, None, RecordsOut(out.put_nowait),
                                            _taker(errors), rows, _taker(traces)))
    get: asyncio.Future[dict[str, Any]] | None = None
    try:
        while True:
            get = asyncio.ensure_future(out.get())
            await asyncio.wait({get, run}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                yield get.result()
                continue
            get.cancel()
            while not out.empty():
                yield out.get_nowait()
            run.result()  # what stopped it before it started
            return
    finally:
        if get is not None:
            get.cancel()
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


def stream(pipeline: Pipeline | str | Path | Mapping[str, Any], rows: Iterable[dict[str, Any]],
           **options: Any) -> Iterator[dict[str, Any]]:
    """`astream` for code without an event loop of its own (or inside a notebook's): the
    run goes on in a thread of its own while the records are taken here."""
    taken: queue.Queue[tuple[str, Any]] = queue.Queue()
    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[None]] = []

    async def produce() -> None:
        async for record in astream(pipeline, rows, **options):
            taken.put(("record", record))

    def work() -> None:
        try:
            task.append(loop.create_task(produce()))
            loop.run_until_complete(task[0])
            taken.put(("end", None))
        except BaseException as e:  # to be raised where the records are taken
            taken.put(("error", e))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=work, name="chunbot", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = taken.get()
            if kind == "record":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        if thread.is_alive() and task:
            loop.call_soon_threadsafe(task[0].cancel)
        thread.join()


def run_records(pipeline: Pipeline | str | Path | Mapping[str, Any],
                rows: Iterable[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    """The output records, in input order, as a list."""
    return list(stream(pipeline, rows, order="input", **options))


def estimate(pipeline: Pipeline | str | Path | Mapping[str, Any],
             limit: int | None = None) -> "Estimate":
    """What a run on the pipeline's workdir would spend now, per stage and model
    (estimator.py; `chunbot estimate`): sends nothing, writes nothing."""
    from .estimator import estimate as estimating

    if not isinstance(pipeline, Pipeline):
        pipeline = load(pipeline)
    return estimating(pipeline, limit)


def _taker(sink: Sink) -> Callable[[dict[str, Any]], None] | None:
    return sink.append if isinstance(sink, list) else sink
