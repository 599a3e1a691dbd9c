"""The `output:` file: rewritten whenever it no longer holds what the last stage's shards
do (a kill -9 mid-export included), and refused before a run when the input reads it or
it cannot be written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

PIPELINE = """
name: t
input: {input}
output: {output}
shard_size: 20
models:
  small: {{provider: sim, model: sim-small, request_log: requests.log}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{{{ text }}}}"
"""


def make(project: Path, input: str = "data.jsonl", output: str = "out/result.jsonl",
         n: int = 60) -> Path:
    if not (project / "data.jsonl").exists():
        write_jsonl(project / "data.jsonl", [{"id": f"r{i:03d}", "text": f"great #{i}"}
                                             for i in range(n)])
    (project / "p.yaml").write_text(PIPELINE.format(input=input, output=output))
    return project / "p.yaml"


def status(project: Path) -> dict:
    return json.loads(chunbot("status", "p.yaml", "--json", cwd=project).stdout)


def test_an_export_killed_before_its_rename_is_written_again_by_the_next_run(project):
    pipeline = make(project)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    out = project / "out/result.jsonl"
    assert status(project)["output"]["state"] == "fresh"
    records = read_jsonl(project / "data.jsonl")
    records[25]["text"] = "terrible #25"  # shard 1 changes
    write_jsonl(project / "data.jsonl", records)

    killed = chunbot("run", str(pipeline), "-q", cwd=project,
                     env={"CHUNBOT_FAILPOINT": "export-written"})
    assert killed.returncode == -9
    assert list(out.parent.glob(".result.jsonl.tmp*")), "the export's temp file"
    assert "great #25" in out.read_text()  # the old output, for now
    assert status(project)["output"]["state"] == "stale"

    again = chunbot("run", str(pipeline), "-q", cwd=project)
    assert again.returncode == 0, again.stderr.decode()
    assert read_jsonl(out) == read_stage(project / "runs/t", "sentiment")
    assert read_jsonl(out)[25]["text"] == "terrible #25"
    assert not list(out.parent.glob(".result.jsonl.tmp*"))
    assert status(project)["output"] == {"path": "out/result.jsonl", "state": "fresh",
                                         "records": 60}


def test_an_output_changed_or_removed_by_hand_is_written_again(project):
    pipeline = make(project)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    out = project / "out/result.jsonl"
    whole = out.read_bytes()
    out.write_bytes(whole[: len(whole) // 2])
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    assert out.read_bytes() == whole
    out.unlink()
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    assert out.read_bytes() == whole


@pytest.mark.parametrize("input, output", [
    ("data.jsonl", "data.jsonl"),  # the input file itself
    ("data.jsonl", "./sub/../data.jsonl"),
    ("in", "in/result.jsonl"),  # a file the input folder reads
    ("in", "in/deeper/result.jsonl"),
    ("in/*.jsonl", "in/result.jsonl"),  # a file the glob matches
    ("in/**/*.jsonl", "in/a/b/result.jsonl"),
], ids=["file", "same file another way", "folder", "below the folder", "glob", "** glob"])
def test_an_output_the_input_reads_is_refused_before_anything_runs(project, input, output):
    (project / "sub").mkdir()
    write_jsonl(project / "in/part.jsonl", [{"id": "a", "text": "x"}])
    pipeline = make(project, input=input, output=output)
    before = (project / "data.jsonl").read_bytes()
    result = chunbot("run", str(pipeline), cwd=project)
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert "is read by the input" in err and "\n" not in err, err
    assert not (project / "requests.log").exists()
    assert (project / "data.jsonl").read_bytes() == before


def test_an_output_beside_the_input_that_it_does_not_read_is_fine(project):
    write_jsonl(project / "in/part.jsonl", [{"id": "a", "text": "x"}])
    pipeline = make(project, input="in/*.jsonl", output="in/result.jsonl.zst.txt.jsonl.d/x.jsonl")
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0


@pytest.mark.parametrize("output", ["blocker/result.jsonl", "folder.jsonl"],
                         ids=["below a file", "a folder"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(project, output):
    (project / "blocker").write_text("a file, not a folder")
    (project / "folder.jsonl").mkdir()
    pipeline = make(project, output=output)
    result = chunbot("run", str(pipeline), cwd=project)
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert "cannot be written" in err and output.split("/")[0] in err and "\n" not in err, err
    assert not (project / "requests.log").exists()  # found before a single request
