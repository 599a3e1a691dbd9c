"""`chunbot diff` through its library: what A and B may be, the join, the report, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from chunbot_cli.cli import show_diff
from chunbot_cli.lookback import diff as d

from conftest import chunbot, read_stage, write_jsonl

LABELS = ["positive", "negative", "neutral"]


def records(n: int) -> list[dict]:
    return [{"_id": f"r{i:03d}", "label": LABELS[i % 3], "score": i,
             "text": f"review number {i}, " + "long text " * 8} for i in range(n)]


def run(a, b, *options: str, **kwargs) -> tuple[int, str, str]:
    """`chunbot diff` as the command prints it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = show_diff(str(a), str(b), out=out, **kwargs)
    return code, out.getvalue(), err.getvalue()


def counts(result: d.DiffResult) -> tuple[int, int, int, int]:
    return result.same, result.changed, result.only_a, result.only_b


def test_equal_files_exit_0_whatever_the_order_and_spacing(project):
    write_jsonl(project / "a.jsonl", records(20))
    lines = [json.dumps(r, indent=None, separators=(", ", ": ")) for r in reversed(records(20))]
    (project / "b.jsonl").write_text("\n".join(lines) + "\n\n")
    code, out, err = run("a.jsonl", "b.jsonl")
    assert (code, err) == (0, "")
    assert "A and B are equal: 20 records" in out
    assert counts(d.diff("a.jsonl", "b.jsonl")) == (20, 0, 0, 0)
    assert all(len(line) <= 100 for line in out.splitlines())


def test_changed_only_in_a_only_in_b(project):
    a, b = records(10), records(10)
    b[1]["label"] = "neutral"             # changed
    b[2]["score"] = 2.0                   # 2 and 2.0 are different JSON
    del b[3]["text"]                      # a field missing on one side is a change
    b[4]["extra"] = {"x": 1}              # and so is one only B has
    b[6]["text"], a[6]["text"] = {"k": [1, 2], "j": None}, {"j": None, "k": [1, 2]}  # same
    del b[5]                              # r005: only in A
    b.append({"_id": "new", "label": "positive"})   # only in B
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    result = d.diff("a.jsonl", "b.jsonl")
    assert counts(result) == (5, 4, 1, 1)
    stats = result.field_stats
    assert (stats["label"].changed, stats["score"].changed) == (1, 1)
    assert (stats["text"].missing_b, stats["extra"].missing_a) == (1, 1)
    assert stats["score"].examples == [('"r002"', "2", "2.0")]
    assert "_id" not in stats
    code, out, _ = run("a.jsonl", "b.jsonl")
    assert code == 1
    assert re.search(r"^  changed +4$", out, re.M) and re.search(r"^  only in A +1$", out, re.M)
    assert re.search(r"^  only in B +1$", out, re.M) and re.search(r"^  same +5$", out, re.M)
    assert "A and B differ: 6 of 11 keys" in out
    assert "(missing)" in out and all(len(line) <= 100 for line in out.splitlines())


def test_fields_limits_the_comparison(project):
    a, b = records(6), records(6)
    b[0]["text"] = "rewritten"
    b[1]["label"] = "neutral"
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    result = d.diff("a.jsonl", "b.jsonl", fields=["label", "nope"])
    assert counts(result) == (5, 1, 0, 0)
    assert set(result.field_stats) == {"label", "nope"} and result.unseen_fields == ["nope"]
    code, out, _ = run("a.jsonl", "b.jsonl", fields="text")
    assert code == 1 and "text: 1 record" in out and "label" not in out.split("fields")[-1]
    code, out, _ = run("a.jsonl", "b.jsonl", fields="score")
    assert code == 0


def test_categorical_agreement_and_confusions(project):
    a = records(90)
    b = records(90)
    for i in range(0, 30, 3):        # ten positives became neutral
        b[i]["label"] = "neutral"
    for i in (1, 4, 7):              # three negatives became positive
        b[i]["label"] = "positive"
    for r in b:
        r["text"] = r["text"].upper()   # a long text field: not categorical
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    result = d.diff("a.jsonl", "b.jsonl")
    label = result.field_stats["label"]
    assert label.categorical and label.categories == {"positive", "negative", "neutral"}
    assert (label.both, label.same, label.changed) == (90, 77, 13)
    assert label.agreement == pytest.approx(77 / 90)
    assert label.top_confusions() == [("positive", "neutral", 10), ("negative", "positive", 3)]
    assert not result.field_stats["text"].categorical
    assert result.field_stats["text"].agreement is None
    assert not result.field_stats["score"].categorical   # numbers are not categories
    _, out, _ = run("a.jsonl", "b.jsonl")
    assert "agreement 85.6% (77 of 90)" in out
    assert "positive → neutral" in out and "negative → positive" in out
    assert out.index("text: 90 records") < out.index("label: 13 records")   # most first


def test_too_many_distinct_values_is_not_categorical(project, monkeypatch):
    monkeypatch.setattr(d, "MAX_CATEGORIES", 5)
    a = [{"_id": i, "tag": f"t{i % 8}"} for i in range(40)]
    b = [{"_id": i, "tag": f"t{(i + 1) % 8}"} for i in range(40)]
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    tag = d.diff("a.jsonl", "b.jsonl").field_stats["tag"]
    assert tag.changed == 40 and not tag.categorical and not tag.confusions


def test_jsonl_output_streams_each_difference_and_limit_bounds_it(project):
    a, b = records(8), records(8)
    b[2]["label"] = "positive"
    del b[3]["score"]
    del b[5]
    b.append({"_id": "r999", "label": "positive"})
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    code, out, err = run("a.jsonl", "b.jsonl", format="jsonl")
    assert code == 1 and err == ""
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [
        {"key": "r002", "status": "changed", "changes": {"label": ["neutral", "positive"]}},
        {"key": "r003", "status": "changed", "changes": {"score": [3, None]},
         "missing": {"score": "b"}},
        {"key": "r005", "status": "only_a", "a": a[5]},
        {"key": "r999", "status": "only_b", "b": {"_id": "r999", "label": "positive"}},
    ]
    code, out, err = run("a.jsonl", "b.jsonl", format="jsonl", limit=2)
    assert code == 1 and len(out.splitlines()) == 2
    assert "2 of 4 differing records printed" in err
    code, out, _ = run("a.jsonl", "b.jsonl", format="jsonl", limit=0)
    assert code == 1 and out == ""
    # the library: a callback gets them as they are found, at most `limit`
    seen: list[d.Difference] = []
    result = d.diff("a.jsonl", "b.jsonl", limit=3, on_difference=seen.append)
    assert [x.status for x in seen] == ["changed", "changed", "only_a"] and not result.differences
    assert seen[2].record == a[5] and result.differing == 4
    assert [x.key for x in d.diff("a.jsonl", "b.jsonl", limit=1).differences] == ["r002"]


def test_shard_folder_against_a_file_ignores_traces_journals_errors_and_temp(project):
    recs = records(25)
    folder = project / "stage"
    write_jsonl(folder / "part-00000.jsonl", recs[:10])
    write_jsonl(folder / "part-00001.jsonl", recs[10:20])
    write_jsonl(folder / "part-00002.jsonl", recs[20:])
    write_jsonl(folder / "part-00000.trace.jsonl", [{"_id": "r000", "request": {}}])
    (folder / "part-00003.journal").write_text('{"_id": "r777"}\n')
    write_jsonl(folder / "errors.jsonl", [{"_id": "r888", "error": "x"}])
    (folder / ".part-00003.jsonl.tmp123").write_text('{"_id": "r999"}\n')
    write_jsonl(project / "all.jsonl", recs)
    code, out, _ = run("stage", "all.jsonl")
    assert code == 0
    assert "stage  (3 part files, 25 records)" in out
    result = d.diff("all.jsonl", "stage")
    assert counts(result) == (25, 0, 0, 0) and result.b.kind == "folder"


def _workdir(root: Path, stages: dict[str, list[dict]], extra_state: list[str] = ()) -> Path:
    root.mkdir(parents=True)
    state = {"version": 1, "stages": {}, "last_run": {"exit_code": 0}}
    for name in [*stages, *extra_state]:
        state["stages"][name] = {"fingerprint": "f", "shards": {"0": {}}}
    for name, recs in stages.items():
        write_jsonl(root / name / "part-00000.jsonl", recs)
    (root / "state.json").write_text(json.dumps(state))
    return root


def test_a_workdir_is_compared_at_its_last_stage(project):
    recs = records(6)
    labelled = [dict(r, sentiment="positive") for r in recs]
    # state order is pipeline order; 'later' is in state.json but has no folder yet
    _workdir(project / "runs/x", {"sentiment": labelled, "keep": labelled[:3]},
             extra_state=["later"])
    (project / "runs/x/keep.prev").mkdir()
    write_jsonl(project / "runs/x/keep.prev/part-00000.jsonl", labelled)
    write_jsonl(project / "keep.jsonl", labelled[:3])
    code, out, _ = run("runs/x", "keep.jsonl")
    assert code == 0 and "stage 'keep'" in out
    result = d.diff("runs/x/sentiment", "runs/x/keep.prev")   # stage folders directly
    assert counts(result) == (6, 0, 0, 0)
    # two workdirs: the last stage they have in common
    _workdir(project / "runs/y", {"sentiment": labelled, "keep": labelled[:4],
                                  "reply": labelled[:1]})
    result = d.diff("runs/x", "runs/y")
    assert (result.a.stage, result.b.stage) == ("keep", "keep")
    assert counts(result) == (3, 0, 0, 1)
    _workdir(project / "runs/z", {"other": labelled})
    result = d.diff("runs/x", "runs/z")      # nothing in common: each its last stage
    assert (result.a.stage, result.b.stage) == ("keep", "other")


def test_zst_files_and_zst_shards(project):
    zstandard = pytest.importorskip("zstandard")
    recs = records(30)
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    (project / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (project / "s").mkdir()
    half = "".join(json.dumps(r) + "\n" for r in recs[:15]).encode()
    rest = "".join(json.dumps(dict(r, label="x")) + "\n" for r in recs[15:]).encode()
    (project / "s/part-00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(half))
    (project / "s/part-00001.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rest))
    (project / "s/part-00000.trace.jsonl.zst").write_bytes(b"not even zstd")
    result = d.diff("a.jsonl.zst", "s")
    assert counts(result) == (15, 15, 0, 0) and result.field_stats["label"].changed == 15
    (project / "bad.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    code, _, err = run("bad.jsonl.zst", "a.jsonl.zst")
    assert code == 2 and err.startswith("chunbot: diff: bad.jsonl.zst:1: cannot read")


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "chunbot: diff: missing.jsonl: no such file or folder"),
    (lambda p: (p / "missing.jsonl").mkdir(),
     "chunbot: diff: missing.jsonl: no part-*.jsonl or part-*.jsonl.zst files"),
    (lambda p: (p / "missing.jsonl").write_text('{"_id": 1}\n{"_id": 2,\n'),
     "chunbot: diff: missing.jsonl:2: not valid JSON"),
    (lambda p: (p / "missing.jsonl").write_text('{"_id": 1}\n\n[1, 2]\n'),
     "chunbot: diff: missing.jsonl:3: not a JSON object"),
    (lambda p: (p / "missing.jsonl").write_text('{"_id": 1}\n{"id": 2}\n'),
     "chunbot: diff: missing.jsonl:2: record has no '_id' field"),
    (lambda p: (p / "missing.jsonl").write_bytes(b'{"_id": "\xff"}\n'),
     "chunbot: diff: missing.jsonl:1: not valid JSON"),
    (lambda p: (p / "missing.jsonl").mkdir() or (p / "missing.jsonl/state.json").write_text("{"),
     "chunbot: diff: missing.jsonl/state.json: not a chunbot state file"),
])
def test_bad_inputs_exit_2_with_one_line_naming_them(project, setup, message):
    write_jsonl(project / "ok.jsonl", records(3))
    setup(project)
    for a, b in (("missing.jsonl", "ok.jsonl"), ("ok.jsonl", "missing.jsonl")):
        code, out, err = run(a, b)
        assert code == 2 and out == ""
        assert err.startswith(message) and err.count("\n") == 1, err


def test_bad_options_exit_2(project):
    write_jsonl(project / "a.jsonl", records(3))
    assert run("a.jsonl", "a.jsonl", format="xml")[0] == 2
    assert run("a.jsonl", "a.jsonl", limit=-1)[0] == 2
    code, _, err = run("a.jsonl", "a.jsonl", key="id")
    assert code == 2 and "a.jsonl:1: record has no 'id' field" in err


def test_several_sorted_runs_merge_like_one(project, monkeypatch):
    """Small runs and fan-in force spilling and a multi-pass merge; repeated keys keep their
    input order through both (the extra copies of 37 are only in A)."""
    a = [{"_id": (i * 37) % 101, "v": i % 4} for i in range(101)]   # ids 0…100, shuffled
    a.insert(60, {"_id": 37, "v": "second copy"})      # a[1] has id 37: repeated later
    a.insert(95, {"_id": 37, "v": "third copy"})
    b = [{"_id": (i * 37) % 101, "v": i % 4} for i in reversed(range(101))]
    b[7]["v"] = 9                                       # id 7
    b += [{"_id": 500 + i} for i in range(3)]
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    in_memory = d.diff("a.jsonl", "b.jsonl", limit=None)
    spilled_to = project / "tmp"
    spilled_to.mkdir()
    monkeypatch.setattr(d, "RUN_RECORDS", 4)
    monkeypatch.setattr(d, "FAN_IN", 3)
    written: list[str] = []
    write = d._Spill.write
    monkeypatch.setattr(d._Spill, "write", lambda self, items: written.append(1) or
                        write(self, items))
    spilled = d.diff("a.jsonl", "b.jsonl", limit=None, tmpdir=spilled_to)
    assert len(written) > 2 * (103 // 4)       # runs, plus the passes that merge them
    assert list(spilled_to.iterdir()) == []    # temp runs removed
    for result in (in_memory, spilled):
        assert counts(result) == (100, 1, 2, 3)
        assert (result.duplicates_a, result.duplicated_keys_a, result.duplicate_keys_a,
                result.duplicates_b) == (2, 1, [37], 0)
        # in order of the keys' JSON text, a key's records in input order
        assert [(x.key, x.status, x.occurrence) for x in result.differences] == \
            [(37, "only_a", 1), (37, "only_a", 2), (500, "only_b", 0), (501, "only_b", 0),
             (502, "only_b", 0), (7, "changed", 0)]
        assert [x.record["v"] for x in result.differences[:2]] == ["second copy", "third copy"]
    _, out, _ = run("a.jsonl", "b.jsonl")
    assert "A has 1 duplicated key (2 extra records, e.g. 37)" in out


def test_duplicates_that_differ_are_not_equal(project, monkeypatch):
    """Two outputs that differ only in a duplicated id's second record: paired 1st with
    1st, 2nd with 2nd, so the change shows (it used to be hidden: exit 0, "equal")."""
    a = [{"_id": "x", "v": 1}, {"_id": "y", "v": 2}, {"_id": "x", "v": 3}]
    b = [{"_id": "x", "v": 1}, {"_id": "y", "v": 2}, {"_id": "x", "v": 4}]
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    for run_records in (200_000, 1):               # in memory, then spilled run by run
        monkeypatch.setattr(d, "RUN_RECORDS", run_records)
        result = d.diff("a.jsonl", "b.jsonl", limit=None)
        assert counts(result) == (2, 1, 0, 0) and not result.equal
        assert (result.duplicated_keys_a, result.duplicated_keys_b) == (1, 1)
        (change,) = result.differences
        assert (change.key, change.occurrence, change.changes) == ("x", 1, {"v": (3, 4)})
    code, out, _ = run("a.jsonl", "b.jsonl")
    assert code == 1 and "A and B differ: 1 of 3 keys" in out
    assert "A has 1 duplicated key (1 extra record, e.g. \"x\")" in out
    assert "B has 1 duplicated key" in out
    code, out, _ = run("a.jsonl", "b.jsonl", format="jsonl")
    assert code == 1
    assert json.loads(out) == {"key": "x", "occurrence": 1, "status": "changed",
                               "changes": {"v": [3, 4]}}


def test_extra_duplicates_are_only_in_their_side(project):
    """A key with three records in A and one in B: the 1st pair, the 2nd and 3rd are only
    in A, in their order; the same file against itself is still equal."""
    a = [{"_id": 1, "v": "a"}, {"_id": 2}, {"_id": 1, "v": "b"}, {"_id": 1, "v": "c"}]
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", [{"_id": 2}, {"_id": 1, "v": "a"}])
    result = d.diff("a.jsonl", "b.jsonl", limit=None)
    assert counts(result) == (2, 0, 2, 0)
    assert (result.duplicates_a, result.duplicated_keys_a, result.duplicates_b) == (2, 1, 0)
    assert [(x.status, x.occurrence, x.record["v"]) for x in result.differences] == \
        [("only_a", 1, "b"), ("only_a", 2, "c")]
    same = d.diff("a.jsonl", "a.jsonl")
    assert counts(same) == (4, 0, 0, 0) and same.equal
    assert (same.duplicated_keys_a, same.duplicated_keys_b) == (1, 1)
    code, out, _ = run("a.jsonl", "a.jsonl")
    assert code == 0 and "A and B are equal: 4 records" in out


def test_keys_match_as_json_values(project):
    write_jsonl(project / "a.jsonl", [{"_id": 1, "v": 1}, {"_id": "x", "v": 1}])
    write_jsonl(project / "b.jsonl", [{"_id": "1", "v": 1}, {"_id": "x", "v": 1}])
    assert counts(d.diff("a.jsonl", "b.jsonl")) == (1, 0, 1, 1)     # 1 is not "1"
    write_jsonl(project / "c.jsonl", [{"_id": {"run": 1, "n": 2}, "v": 1}])
    write_jsonl(project / "d.jsonl", [{"_id": {"n": 2, "run": 1}, "v": 2}])
    result = d.diff("c.jsonl", "d.jsonl", limit=None)
    assert counts(result) == (0, 1, 0, 0) and result.differences[0].key == {"run": 1, "n": 2}


PIPELINE = """
name: {name}
input: data.jsonl
id_field: id
shard_size: 7
models:
  small: {{provider: sim, model: sim-small}}
  big: {{provider: sim, model: sim-large}}
stages:
  - name: sentiment
    model: {model}
    prompt: "Label the sentiment of: {{{{ text }}}}"
    output: sentiment
  - name: reply
    model: {model}
    prompt: "Write an apology for: {{{{ text }}}}"
    output: reply
"""


def test_two_pipeline_runs_with_different_models(project):
    texts = ["I love it, great value", "Terrible, it broke after a day, I want a refund",
             "It is okay, average", "The zipper is flimsy and the size is wrong"]
    write_jsonl(project / "data.jsonl", [{"id": f"r{i:03d}", "text": f"{texts[i % 4]} #{i}"}
                                         for i in range(30)])
    for name, model in (("small", "small"), ("large", "big")):
        (project / f"{name}.yaml").write_text(PIPELINE.format(name=name, model=model))
        done = chunbot("run", f"{name}.yaml", "--quiet", cwd=project)
        assert done.returncode == 0, done.stderr.decode()
    assert len(read_stage(project / "runs/small", "reply")) == 30
    result = d.diff("runs/small", "runs/large")
    assert (result.a.stage, result.b.stage, result.a.records) == ("reply", "reply", 30)
    sentiment, reply = result.field_stats["sentiment"], result.field_stats["reply"]
    assert (sentiment.both, sentiment.changed, sentiment.agreement) == (30, 0, 1.0)
    assert 0 < reply.changed <= 30 and result.changed == reply.changed
    assert set(result.field_stats) == {"id", "text", "sentiment", "reply"}
    code, out, _ = run("runs/small", "runs/large")
    assert code == 1 and f"reply: {reply.changed} record" in out
    assert "the same in every record found in both: id, text, sentiment" in out
    assert "sentiment" not in out.split("fields that differ")[1]
    assert run("runs/small/sentiment", "runs/large", fields="sentiment")[0] == 0
    code, out, _ = run("runs/small", "runs/large", format="jsonl")
    assert {tuple(json.loads(line)["changes"]) for line in out.splitlines()} == {("reply",)}


def test_b_is_read_in_a_forked_child_when_it_is_big(project, monkeypatch):
    a, b = records(300), records(300)[::-1]
    for r in b[::7]:
        r["label"] = "neutral"
    write_jsonl(project / "a.jsonl", a)
    write_jsonl(project / "b.jsonl", b)
    expected = d.diff("a.jsonl", "b.jsonl", limit=None)
    forks: list[int] = []
    fork = os.fork

    def counted_fork() -> int:
        pid = fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(d.os, "fork", counted_fork)
    monkeypatch.setattr(d, "RUN_BYTES", 4000)        # B is "big": 300 records of ~150 bytes
    (project / "tmp").mkdir()
    result = d.diff("a.jsonl", "b.jsonl", limit=None, tmpdir=project / "tmp")
    assert len(forks) == 1 and result.b.records == 300
    assert counts(result) == counts(expected) and result.changed > 0
    assert result.differences == expected.differences
    assert result.field_stats["label"].confusions == expected.field_stats["label"].confusions
    # an error in B comes back from the child; one in A stops the child
    (project / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a) + "{oops\n")
    code, _, err = run("a.jsonl", "bad.jsonl")
    assert code == 2 and err.startswith("chunbot: diff: bad.jsonl:301: not valid JSON")
    with pytest.raises(d.DiffError, match=r"^bad.jsonl:301: not valid JSON"):
        d.diff("bad.jsonl", "b.jsonl", tmpdir=project / "tmp")
    assert list((project / "tmp").iterdir()) == [] and len(forks) == 3
    for pid in forks:                            # no child left behind, none a zombie
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
