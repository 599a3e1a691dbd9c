"""lookback/trace.py and `chunbot trace`: one record through every stage of a finished run."""

from __future__ import annotations

import json

from chunbot_cli import config, engine
from chunbot_cli.lookback import trace

from conftest import chunbot, write_jsonl

PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: 10
stages:
  - name: sentiment
    prompt: "Label the sentiment of: {{ text }}"
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    prompt: "Write an apology for the {{ product }}: {{ text }}"
"""
TEXTS = ["I love it, great value", "Terrible, it broke, I want a refund", "okay, average"]


def finished_run(project, n: int = 45) -> config.Pipeline:
    records = [{"id": f"r{i:03d}", "product": "kettle", "text": f"{TEXTS[i % 3]} #{i}"}
               for i in range(n)]
    del records[7]["product"]  # a negative record whose reply prompt cannot render
    write_jsonl(project / "data.jsonl", records)
    (project / "p.yaml").write_text(PIPELINE)
    pipeline = config.load(project / "p.yaml")
    engine.run(pipeline)
    return pipeline


def test_a_record_that_went_all_the_way(project):
    found = trace.find(finished_run(project), "r031")
    assert found["shard"] == 3 and found["input"]["text"] == "Terrible, it broke, I want a refund #31"
    assert "sentiment" not in found["input"]
    steps = {s["stage"]: s for s in found["stages"]}
    assert [s["status"] for s in found["stages"]] == ["ok", "ok", "ok"]
    assert steps["sentiment"]["output"] == "negative"
    reply = steps["reply"]["trace"]
    assert reply["request"]["messages"][0]["content"].startswith("Write an apology for the kettle")
    assert reply["response"] and reply["attempts"]


def test_filtered_out_and_failed_records_say_where_and_why(project):
    pipeline = finished_run(project)
    filtered = trace.find(pipeline, "r030")
    assert [s["status"] for s in filtered["stages"]] == ["ok", "filtered out", "not reached"]
    assert "sentiment == 'negative'" in filtered["stages"][1]["why"]
    failed = trace.find(pipeline, "r007")
    assert failed["stages"][2]["status"] == "failed"
    assert "product" in failed["stages"][2]["error"]
    assert trace.find(pipeline, "nope") is None


def test_the_command_prints_json_and_exits_1_for_an_unknown_id(project):
    finished_run(project)
    result = chunbot("trace", "p.yaml", "r004", "--json", cwd=project)
    assert result.returncode == 0
    assert json.loads(result.stdout)["stages"][0]["output"] == "negative"
    missing = chunbot("trace", "p.yaml", "r999", cwd=project)
    assert missing.returncode == 1 and "no record with _id 'r999'" in missing.stderr.decode()


def test_traces_are_apart_from_part_files_and_old_workdirs_still_read(project):
    pipeline = finished_run(project)
    reply = project / "runs/t/reply"
    assert sorted(p.name for p in reply.glob("part-*.jsonl")) == [
        f"part-{i:05d}.jsonl" for i in range(5)]  # records only: `cat part-*.jsonl` is the output
    assert (reply / "trace-00000.jsonl").exists()
    for stage in ("sentiment", "reply"):  # a workdir written before traces were renamed
        for path in (project / "runs/t" / stage).glob("trace-*.jsonl"):
            path.rename(path.with_name(f"part-{path.name[6:11]}.trace.jsonl"))
    found = trace.find(pipeline, "r031")
    assert found["stages"][2]["trace"]["response"]
    report = engine.run(pipeline, engine.RunOptions(rerun="reply", rerun_failed=True))
    assert report.exit_code == 1  # r007 still lacks its product
    redone = reply / "trace-00000.jsonl"  # r007's shard, redone: today's name, and only that
    assert redone.exists() and not (reply / "part-00000.trace.jsonl").exists()
    assert trace.find(pipeline, "r007")["stages"][2]["status"] == "failed"
