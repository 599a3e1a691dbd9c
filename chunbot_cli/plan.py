"""What is stale: the freshness rules that `run` plans by and `status` reports, in one place.

A stage's shard is fresh when state.json records it done under the stage's current
fingerprint (a hash of its definition and its upstream's), made from what is upstream of
it now — the input shard's digest for the first stage, the upstream shard's commit token
for the others — and the part file it vouches for still exists. Planning a shard finds the
first stage that is not fresh; it and everything after it are computed again. These are
pure functions of the pipeline and the state: what they need of the disk (does a part file
exist) they are given.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from .config import StageSpec
from .state import ShardEntry, StageState


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
                "missing (the next run redoes them)")
    return None
