"""plan.py: which stages of a shard are stale, as a pure function of the state."""

from __future__ import annotations

import pytest

from chunbot_cli.config import StageSpec
from chunbot_cli.plan import NotFresh, plan_shard, why_stale
from chunbot_cli.state import ShardEntry, StageState

A, B, C = (StageSpec(name=n, kind="llm", fingerprint=f"f{n}", definition={"prompt": n})
           for n in "abc")


def done(*chain: tuple[StageSpec, str, str]) -> dict[str, StageState]:
    """State where shard 0 of each stage was made from `src` and has `token`."""
    return {s.name: StageState(s.fingerprint, s.definition, shards={0: ShardEntry(src, token)})
            for s, src, token in chain}


STATES = done((A, "digest", "ta"), (B, "ta", "tb"), (C, "tb", "tc"))


def plan(states=STATES, selected=(A, B, C), digest="digest", parts=None, redo=()):
    return plan_shard([A, B, C], list(selected), states, 0, digest,
                      lambda stage, shard: parts is None or stage.name in parts,
                      lambda stage, shard, entry: stage.name in redo)


def test_a_fresh_shard_needs_nothing():
    assert plan() == (None, "tc")


def test_changed_input_redoes_every_stage():
    assert plan(digest="other") == (0, "other")


def test_a_changed_stage_and_what_follows_are_redone_from_upstreams_token():
    states = {**STATES, "b": StageState("old", shards=STATES["b"].shards)}
    assert plan(states) == (1, "ta")


def test_a_missing_part_is_redone_and_so_is_the_upstream_part_it_reads():
    assert plan(parts={"a", "b"}) == (2, "tb")
    assert plan(parts={"c"}, redo={"c"}) == (0, "digest")  # c must read b's part: gone


def test_a_stage_outside_the_selection_that_must_run_is_refused():
    with pytest.raises(NotFresh) as refused:
        plan(digest="other", selected=(C,))
    assert refused.value.stage is A


def test_status_says_why_a_stage_is_stale():
    changed = StageSpec(name="b", kind="llm", fingerprint="new", definition={"prompt": "x"})
    assert why_stale(changed, STATES["b"], STATES["a"], False, 0) == "changed: prompt"
    behind = done((A, "digest", "ta2"))["a"]
    assert why_stale(B, STATES["b"], behind, False, 0) == \
        "1 shards are behind their recomputed upstream"
    assert why_stale(B, STATES["b"], STATES["a"], False, 2).startswith(
        "the output files of 2 shards are missing")
    assert why_stale(B, STATES["b"], STATES["a"], False, 0) is None
