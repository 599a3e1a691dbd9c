"""The stages a run computes, built from the pipeline: one object per stage (stages.py),
and what the LLM stages share — a client per model alias (with its adaptive limits), one
aiohttp session for the HTTP models, the response cache — and closing all of it.

The engine builds one per run; an executor elsewhere would build its own from the same
pipeline, since a shard job names its stages and carries nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .config import ConfigError, Pipeline, StageSpec
from .stages import FilterStage, LLMStage, PythonStage, Stage

if TYPE_CHECKING:
    from .batchmode import BatchMode
    from .llm.price import Spending


class StageSet:
    def __init__(self, pipeline: Pipeline, selected: list[StageSpec],
                 note: Callable[[str], None], cache: str = "use", rerun: str | None = None,
                 mode: str | None = None,
                 batch_mode: Callable[[StageSpec, Any], "BatchMode | None"] | None = None,
                 spending: "Spending | None" = None):
        """`cache`: "use", "off" or "refresh" (ask again, store the new replies); `rerun`:
        the stage whose models are asked again rather than the cache; `mode`: "batch" or
        "realtime" over the YAML; `batch_mode` gives a stage its BatchMode, if any;
        `spending`: the run's cost cap, which every model's requests count against."""
        self.pipeline, self.selected, self.note = pipeline, selected, note
        self.spending = spending
        self.cache_mode = cache
        self.clients: dict[str, Any] = {}
        self.session: Any = None  # the run's one aiohttp session, when a model speaks HTTP
        self.cache: Any = None  # the response cache, when an LLM stage uses it
        self.stages: dict[str, Stage] = {}
        for spec in selected:
            if spec.kind == "filter":
                self.stages[spec.name] = FilterStage(spec)
            elif spec.kind == "python":
                self.stages[spec.name] = PythonStage(spec, pipeline.import_paths)
            else:
                first = pipeline.models[spec.models[0]]
                if mode == "batch" and not first.batch_api:
                    note(f"stage {spec.name!r}: model {first.alias!r} has no batch API "
                         "(batch_api: false): realtime")
                self._connect(spec.models)
                self.stages[spec.name] = LLMStage(
                    spec, self.clients, self._open_cache(spec), cache_read=spec.name != rerun,
                    batches=batch_mode(spec, self.session) if batch_mode else None)

    def _open_cache(self, stage: StageSpec) -> Any:
        if not stage.cache or not self.pipeline.cache.enabled or self.cache_mode == "off":
            return None
        if self.cache is None:
            from .llm.cache import Cache

            try:
                self.cache = Cache(self.pipeline.cache, read=self.cache_mode != "refresh")
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
            self.clients[alias] = ModelClient(spec, make_provider(spec, self.session), self.note,
                                              self.spending)

    def _connections(self) -> int:
        """Connection pool size: every request the run's HTTP models may have in flight."""
        from .llm.scheduler import MAX_LIMIT

        models = self.pipeline.models
        aliases = {a for stage in self.selected if stage.kind == "llm" for a in stage.models}
        return sum(models[a].max_concurrency or MAX_LIMIT * len(models[a].urls)
                   for a in aliases if models[a].provider != "sim")

    def cache_counts(self) -> tuple[int, int]:
        """Requests the response cache answered, and those it did not."""
        return (self.cache.hits, self.cache.misses) if self.cache is not None else (0, 0)

    async def close(self) -> list[str]:
        """Close the clients, the session and the cache (its last buffered writes); what
        could not be done, for the run's errors."""
        for client in self.clients.values():
            await client.close()
        if self.session is not None:
            await self.session.close()
        if self.cache is not None:
            try:
                await self.cache.close()
            except Exception as e:  # a full disk, a Redis gone away
                return [f"the response cache could not store the last replies: "
                        f"{type(e).__name__}: {e}"]
        return []
