"""What is stale: the freshness rules that `run` plans by and `status` reports, in one place.

A stage's shard is fresh when state.json records it done under the stage's current
fingerprint (a hash of its definition and its upstream's), made from what is upstream of
it now — the input shard's digest for the first stage, the upstream shard's commit token
for the others — and the part file it vouches for is still there, of the size its commit
wrote (a part cut short or emptied is recomputed, never trusted). Planning a shard finds the
first stage that is not fresh; it and everything after it are computed again. These are
pure functions of the pipeline and the state: what they need of the disk (does a part file
exist) they are given. `Planner` applies them to a run on its workdir.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from .config import ConfigError, Pipeline, StageSpec
from .state import ShardEntry, StageState, State
from .store import Entry, Key, Workdir


class NotFresh(Exception):
    """A stage outside the selection would have to be computed for this shard."""

    def __init__(self, stage: StageSpec, shard: int | None = None):
        super().__init__(stage.name)
        self.stage, self.shard = stage, shard


class ShardPlan(NamedTuple):
    """For one input shard: the position (in the pipeline) of the first stage to compute,
    None when every stage is fresh, and the token that stage reads from."""

    start: int | None
    source: str


def fresh_entry(saved: StageState | None, stage: StageSpec, shard: int,
                source: str) -> ShardEntry | None:
    """The shard's entry when state.json says it is fresh: done under the stage's current
    definition, from `source`."""
    if saved is None or saved.fingerprint != stage.fingerprint:
        return None
    entry = saved.shards.get(shard)
    return entry if entry is not None and entry.src == source else None


def plan_shard(stages: list[StageSpec], selected: list[StageSpec],
               states: dict[str, StageState], shard: int, digest: str,
               has_part: Callable[[StageSpec, int], bool],
               redo: Callable[[StageSpec, int, ShardEntry], bool]) -> ShardPlan:
    """Which of `stages` (the pipeline up to the last selected one) this shard needs.

    state.json is trusted only as far as the files it vouches for exist: a selected
    stage's shard whose part file is gone is recomputed, and so is an upstream one whose
    part a recomputed stage must read. `redo` says which fresh shards a partial rerun
    sends again. Raises NotFresh when a stage that is not selected would have to run."""
    sources = [digest]
    for position, stage in enumerate(stages):
        entry = fresh_entry(states.get(stage.name), stage, shard, sources[-1])
        if entry is not None and (redo(stage, shard, entry)
                                  or stage in selected and not has_part(stage, shard)):
            entry = None
        if entry is None:
            break
        sources.append(entry.token)
    else:
        return ShardPlan(None, sources[-1])
    while position > 0 and not has_part(stages[position - 1], shard):
        position -= 1  # what the stale stage reads is gone too: make it again
    if stages[position] not in selected:
        raise NotFresh(stages[position], shard)
    return ShardPlan(position, sources[position])


def why_stale(stage: StageSpec, saved: StageState, upstream: StageState | None,
              upstream_stale: bool, missing: int) -> str | None:
    """Why a stage that has run is not fresh as a whole, or None (status's view, from
    state.json alone: it cannot read the input's digests, so it compares with upstream's
    tokens). `missing`: its shards whose part files are gone."""
    if saved.fingerprint != stage.fingerprint:
        before = saved.definition
        changed = sorted(k for k in set(before) | set(stage.definition)
                         if k != "up" and before.get(k) != stage.definition.get(k))
        if changed and before:
            return "changed: " + ", ".join(changed)
        return "an upstream stage changed" if before else "its definition changed"
    if upstream is not None:
        tokens = {entry.token for entry in upstream.shards.values()}
        behind = sum(1 for entry in saved.shards.values() if entry.src not in tokens)
        if behind:
            return f"{behind} shards are behind their recomputed upstream"
    if upstream_stale:
        return "its upstream is stale"
    if missing:
        return (f"the output files of {missing} shard{'s' if missing > 1 else ''} are "
                "missing or damaged (the next run redoes them)")
    return None


@dataclass
class Planner:
    """The rules above applied to one run on its workdir: which stages start afresh, which
    stages each shard needs, and what a partial rerun keeps of a shard."""

    pipeline: Pipeline
    selected: list[StageSpec]
    workdir: Workdir
    state: State
    note: Callable[[str], None]
    stage: str | None = None  # `run --stage`: only this one
    rerun: str | None = None  # `rerun --stage`
    failed: bool = False  # `rerun --failed`
    ids: frozenset[str] | None = None  # `rerun --ids`
    missing_parts: set[str] = field(default_factory=set)  # stages found without a part

    def _upstream_not_fresh(self, upstream: StageSpec, shard: int | None = None) -> ConfigError:
        where = "" if shard is None else f" for shard {shard}"
        wanted = self.selected[0].name
        return ConfigError(f"stage {wanted!r} needs fresh output of {upstream.name!r}{where}; "
                           f"run with --until {wanted} instead")

    def reset_changed_stages(self) -> None:
        """Set aside every selected stage whose definition changed (or that is rerun) and
        start it afresh; refuse a `--stage` or `rerun` whose upstream is not fresh."""
        position = self.pipeline.stages.index(self.selected[0])
        if (self.stage or self.rerun) and position > 0:
            upstream = self.pipeline.stages[position - 1]
            saved = self.state.stages.get(upstream.name)
            if saved is None or saved.fingerprint != upstream.fingerprint:
                raise self._upstream_not_fresh(upstream)
        for stage in self.selected:
            saved = self.state.stages.get(stage.name)
            redo = stage.name == self.rerun
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
        return self.failed or self.ids is not None

    def _redo(self, stage: StageSpec, shard: int, entry: ShardEntry) -> bool:
        """Whether `rerun --failed` / `--ids` has records to redo in this fresh shard."""
        if stage.name != self.rerun or not self._partial_rerun:
            return False
        if self.failed:
            return bool(entry.counts.failed)  # state.json says so: no need to read the trace
        return any(map(self._redoes, self.workdir.read_trace(stage.name, shard)))

    def _redoes(self, trace: dict[str, Any]) -> bool:
        """Whether a partial rerun sends this record (its trace entry) again."""
        if self.failed:
            return trace.get("error") is not None
        return str(trace.get("_id")) in (self.ids or ())

    def reusable(self, stage: StageSpec, shard: int,
                  keys: list[Key] | None) -> dict[Key, Entry]:
        """For a partial rerun: the shard's finished records that stay as they are (the
        trace has one line per record of the upstream part, in its order)."""
        if stage.name != self.rerun or not self._partial_rerun:
            return {}
        kept = {}
        for i, trace in enumerate(self.workdir.read_trace(stage.name, shard)):
            if not self._redoes(trace):
                key = keys[i] if keys is not None and i < len(keys) else i
                kept[key] = Entry(key, trace, out=trace.get("output"), error=trace.get("error"))
        return kept

    def plan(self, shard: int, digest: str) -> tuple[list[StageSpec], str]:
        """The stages to compute for this shard and the source token the first one reads."""
        last = self.pipeline.stages.index(self.selected[-1])
        stages = self.pipeline.stages[: last + 1]
        try:
            planned = plan_shard(stages, self.selected, self.state.stages, shard, digest,
                                 self._has_part, self._redo)
        except NotFresh as e:
            raise self._upstream_not_fresh(e.stage, e.shard) from None
        if planned.start is None:
            return [], planned.source
        return stages[planned.start:], planned.source

    def _has_part(self, stage: StageSpec, shard: int) -> bool:
        """Whether the shard's part file is there as its commit wrote it."""
        saved = self.state.stages.get(stage.name)
        entry = saved.shards.get(shard) if saved is not None else None
        if entry is None:
            return self.workdir.part_path(stage.name, shard).exists()
        why = self.workdir.part_damage(stage.name, shard, entry)
        if why is None:
            return True
        if stage.name not in self.missing_parts:
            self.note(f"stage {stage.name!r}: {why}: recomputing shard {shard}")
        self.missing_parts.add(stage.name)
        return False
