"""Duplicate input ids: kept as records of their own, named in one note of the summary."""

from __future__ import annotations

import zlib
from array import array

from chunbot_cli import config, duplicates, engine
from chunbot_cli.lookback import trace
from chunbot_cli.store import Workdir

from conftest import chunbot, read_stage, write_jsonl

# two different ids with the same CRC-32: a candidate the note must not count
COLLIDING = ("k97872", "k15860000")

PIPELINE = """
name: t
input: data.jsonl
shard_size: 4
stages:
  - name: mark
    python: marks:mark
"""


def test_colliding_ids_share_a_crc():
    assert zlib.crc32(COLLIDING[0].encode()) == zlib.crc32(COLLIDING[1].encode())


def test_within_and_across_shards_in_input_order():
    ids = duplicates.DuplicateIds()
    index = ids.add(1, ["c", "a", "d", "a"])          # shard 1 repeats a (and a of shard 0)
    ids.add(0, ["a", "b", 7, COLLIDING[0]])           # shards commit in any order
    ids.add(2, ["7", "e", "d", COLLIDING[1]])         # 7 as text; d of shard 1
    assert index == array("I", sorted(zlib.crc32(t.encode()) for t in "cada"))
    assert ids.note() == ("input: 4 records share an id with an earlier one (first: a, a, 7); "
                          "they are kept, each its own record; trace shows the first, "
                          "rerun --ids redoes them all")


def test_no_note_without_duplicates_even_when_crcs_collide(monkeypatch):
    monkeypatch.setattr(duplicates, "PARTITION", 3)   # several slices of CRC space
    ids = duplicates.DuplicateIds()
    for shard in range(5):
        ids.add(shard, [f"r{shard}-{i}" for i in range(4)] + [COLLIDING[shard % 2]] * (
            shard < 2))
    assert ids.note() is None
    assert duplicates.DuplicateIds().note() is None   # nothing seen


def test_one_duplicate_across_several_slices(monkeypatch):
    monkeypatch.setattr(duplicates, "PARTITION", 2)
    ids = duplicates.DuplicateIds()
    ids.add(0, [f"x{i}" for i in range(10)])
    ids.add(1, [f"y{i}" for i in range(10)] + ["x3"])
    assert ids.note().startswith("input: 1 record shares an id with an earlier one "
                                 "(first: x3);")


def _project(project, records):
    write_jsonl(project / "data.jsonl", records)
    (project / "marks.py").write_text("def mark(record):\n    record['seen'] = True\n"
                                      "    return record\n")
    (project / "p.yaml").write_text(PIPELINE)
    return config.load(project / "p.yaml")


def test_run_keeps_duplicates_and_names_them(project):
    """Records that share an id are each processed and written; the summary says so once,
    with the id index the same as it was (trace finds the first)."""
    records = [{"id": i, "v": i} for i in ("a7", "b1", "a7", "c2", "b3", "d4", "a7", "b3")]
    records += [{"v": "no id"}]                       # its position, 8, is its id
    pipeline = _project(project, records)
    report = engine.run(pipeline)
    assert report.exit_code == 0
    notes = [n for n in report.notes if "share an id" in n]
    assert notes == ["input: 3 records share an id with an earlier one (first: a7, a7, b3); "
                     "they are kept, each its own record; trace shows the first, rerun --ids "
                     "redoes them all"]
    assert [(r["_id"], r["v"]) for r in read_stage(project / "runs/t", "mark")] == \
        [(r.get("id", 8), r["v"]) for r in records]
    workdir = Workdir(pipeline.workdir)
    assert workdir.shards_holding("mark", "a7") == [0, 1]
    assert workdir.shards_holding("mark", "b3") == [1]
    assert trace.find(pipeline, "a7")["shard"] == 0
    again = engine.run(pipeline)                       # nothing to do: nothing read anew
    assert not [n for n in again.notes if "share an id" in n]


def test_run_without_duplicates_has_no_note(project):
    pipeline = _project(project, [{"id": f"r{i}", "v": i} for i in range(10)])
    report = engine.run(pipeline)
    assert not [n for n in report.notes if "share an id" in n]


def test_the_command_prints_the_note(project):
    _project(project, [{"id": 1}, {"id": 1}])
    done = chunbot("run", "p.yaml", cwd=project)
    assert done.returncode == 0, done.stderr
    assert b"input: 1 record shares an id with an earlier one (first: 1)" in done.stderr
