"""Executors run shard jobs and tell the engine when each has ended.

`LocalExecutor` runs them as tasks of this process's event loop, at most `window` at
once: enough shards in flight that every LLM stage keeps its model busy across shard
boundaries, few enough that memory stays bounded however long the input is.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Mapping

from .flow import JobEvents, ShardJob, run_job
from .stages import Stage


class LocalExecutor:
    def __init__(self, stages: Mapping[str, Stage], events: JobEvents, window: int,
                 ended: Callable[[ShardJob, BaseException | None], None]):
        self.stages, self.events, self.ended = stages, events, ended
        self.window = asyncio.Semaphore(window)
        self.jobs: dict[asyncio.Task[None], ShardJob] = {}

    async def submit(self, job: ShardJob) -> None:
        """Start the job once the window has room for it."""
        await self.window.acquire()
        task = asyncio.create_task(run_job(job, self.stages, self.events))
        self.jobs[task] = job
        task.add_done_callback(self._finished)
        await asyncio.sleep(0)  # let running jobs see their replies between shards

    def _finished(self, task: asyncio.Task[None]) -> None:
        job = self.jobs.pop(task)
        self.window.release()
        error = None if task.cancelled() else task.exception()
        self.ended(job, error)

    async def join(self) -> None:
        """Wait for every job submitted so far."""
        while self.jobs:
            await asyncio.wait(list(self.jobs))

    def stop(self) -> None:
        """Cancel every job (what they finished stays in the journals)."""
        for task in self.jobs:
            task.cancel()

    async def cancel(self) -> None:
        jobs = list(self.jobs)
        self.stop()
        await asyncio.gather(*jobs, return_exceptions=True)
