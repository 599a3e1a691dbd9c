"""The engine through its library API: what runs, what is skipped, what lands on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunbot_cli import config, engine
from chunbot_cli.engine import RunOptions

from conftest import read_jsonl, read_stage, write_jsonl

TEXTS = ["I love it, great value", "Terrible, it broke after a day, I want a refund",
         "It is okay, average"]


def reviews(n: int) -> list[dict]:
    return [{"id": f"r{i:04d}", "product": "kettle", "text": f"{TEXTS[i % 3]} (#{i})"}
            for i in range(n)]


PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: 10
models:
  small: {{provider: sim, model: sim-small, request_log: requests.log}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{{{ text }}}}"
    output: sentiment
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "{reply_prompt}"
    output: reply
"""


def make(project: Path, n: int = 30, reply_prompt: str = "Write an apology for: {{ text }}",
         **extra: str) -> config.Pipeline:
    if not (project / "data.jsonl").exists():
        write_jsonl(project / "data.jsonl", reviews(n))
    text = PIPELINE.format(reply_prompt=reply_prompt)
    for key, value in extra.items():
        text = text.replace("shard_size: 10", f"shard_size: 10\n{key}: {value}")
    (project / "p.yaml").write_text(text)
    return config.load(project / "p.yaml")


def requests_sent(project: Path) -> int:
    log = project / "requests.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_run_writes_every_stage_in_input_order(project):
    report = engine.run(make(project))
    assert report.exit_code == 0
    labelled = read_stage(project / "runs/t", "sentiment")
    assert [r["_id"] for r in labelled] == [f"r{i:04d}" for i in range(30)]
    assert [r["sentiment"] for r in labelled[:3]] == ["positive", "negative", "neutral"]
    replies = read_stage(project / "runs/t", "reply")
    assert [r["_id"] for r in replies] == [f"r{i:04d}" for i in range(1, 30, 3)]
    assert all(r["reply"] and r["text"] and r["sentiment"] == "negative" for r in replies)
    assert report.stages["negatives"].counts.filtered == 20
    assert requests_sent(project) == 40
    traces = read_jsonl(project / "runs/t/sentiment/trace-00000.jsonl")
    assert traces[0]["request"]["messages"][-1]["content"].startswith("Label the sentiment")
    assert traces[0]["response"] == "positive" and traces[0]["tokens"]["in"] > 0


def test_second_run_does_no_work_and_sends_no_request(project):
    engine.run(make(project))
    before = requests_sent(project)
    report = engine.run(make(project))
    assert report.exit_code == 0
    assert requests_sent(project) == before
    assert all(s.shards_run == 0 and s.shards_skipped == 3 for s in report.stages.values())


def test_editing_a_stage_recomputes_it_and_downstream_only(project):
    engine.run(make(project))
    first = requests_sent(project)
    report = engine.run(make(project, reply_prompt="Write a two-line apology for: {{ text }}"))
    assert report.stages["sentiment"].shards_run == 0
    assert report.stages["reply"].shards_run == 3
    assert requests_sent(project) == first + 10
    assert "\n" in read_stage(project / "runs/t", "reply")[0]["reply"]
    assert (project / "runs/t/reply.prev/part-00000.jsonl").exists()


def test_changed_input_line_redoes_only_its_shard(project):
    engine.run(make(project))
    first = requests_sent(project)
    records = reviews(30)
    records[12]["text"] = "Worst kettle ever, it leaked and broke"
    write_jsonl(project / "data.jsonl", records)
    report = engine.run(make(project))
    assert report.stages["sentiment"].shards_run == 1
    assert report.stages["sentiment"].shards_skipped == 2
    # shard 1 is redone, but the response cache answers all but the changed record: its
    # sentiment, and (it is negative now) its reply
    assert requests_sent(project) == first + 2


def test_shrunk_input_drops_shards_past_its_end(project):
    engine.run(make(project))
    write_jsonl(project / "data.jsonl", reviews(15))
    engine.run(make(project))
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == \
        [f"r{i:04d}" for i in range(15)]
    assert not (project / "runs/t/sentiment/part-00002.jsonl").exists()


def test_until_and_stage_select_stages(project):
    pipeline = make(project)
    report = engine.run(pipeline, RunOptions(until="negatives"))
    assert set(report.stages) == {"sentiment", "negatives"}
    assert not (project / "runs/t/reply").exists()
    report = engine.run(pipeline, RunOptions(stage="reply"))
    assert set(report.stages) == {"reply"}
    assert len(read_stage(project / "runs/t", "reply")) == 10


def test_stage_refuses_when_upstream_is_not_done(project):
    with pytest.raises(config.ConfigError, match="--until reply"):
        engine.run(make(project), RunOptions(stage="reply"))


def test_limit_processes_the_first_lines_only(project):
    report = engine.run(make(project), RunOptions(limit=12))
    assert report.lines_read == 12
    assert len(read_stage(project / "runs/t", "sentiment")) == 12


def test_bad_lines_go_to_the_first_stage_errors_and_the_rest_goes_on(project):
    lines = [json.dumps(r) for r in reviews(5)]
    lines[1] = "{not json"
    lines[3] = "[1, 2]"
    (project / "data.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    report = engine.run(make(project))
    assert report.exit_code == 1
    errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    data = str(project / "data.jsonl")  # the pipeline's input, beside it
    assert [(e["line"], e["file"]) for e in errors] == [(2, data), (4, data), (6, data)]
    assert "not valid JSON" in errors[0]["error"] and "not valid UTF-8" in errors[2]["error"]
    assert len(read_stage(project / "runs/t", "sentiment")) == 3
    # failures stay counted on a later run with nothing to do
    assert engine.run(make(project)).exit_code == 1


def test_missing_template_field_is_a_record_failure(project):
    records = reviews(4)
    del records[1]["text"]
    write_jsonl(project / "data.jsonl", records)
    report = engine.run(make(project))
    assert report.exit_code == 1
    [error] = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert error["_id"] == "r0001" and "text" in error["error"]
    assert error["record"]["product"] == "kettle"


def test_redone_shard_does_not_repeat_its_errors(project):
    records = reviews(20)
    del records[1]["text"]
    write_jsonl(project / "data.jsonl", records)
    engine.run(make(project))
    records[5]["text"] = "changed"
    write_jsonl(project / "data.jsonl", records)
    engine.run(make(project))
    assert len(read_jsonl(project / "runs/t/sentiment/errors.jsonl")) == 1


def test_empty_input_finishes_and_says_so(project):
    (project / "data.jsonl").write_text("")
    report = engine.run(make(project))
    assert report.exit_code == 0
    assert "input is empty: nothing to do" in report.notes


def test_positional_ids_without_id_field(project):
    write_jsonl(project / "data.jsonl", [{"text": "great"}, {"text": "awful"}])
    (project / "p.yaml").write_text(
        "name: t\ninput: data.jsonl\nstages:\n  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    engine.run(config.load(project / "p.yaml"))
    assert [r["_id"] for r in read_stage(project / "runs/t", "s")] == [0, 1]


def test_python_stage_fans_out_and_drops(project):
    (project / "fan_module.py").write_text(
        "def split(record):\n"
        "    if record['n'] == 0:\n        return None\n"
        "    return [dict(record, part=i) for i in range(record['n'])]\n")
    write_jsonl(project / "data.jsonl", [{"id": "a", "n": 2}, {"id": "b", "n": 0},
                                         {"id": "c", "n": 1}])
    (project / "p.yaml").write_text("name: t\ninput: data.jsonl\nid_field: id\nstages:\n"
                                    "  - name: fan\n    python: fan_module:split\n")
    report = engine.run(config.load(project / "p.yaml"))
    assert [r["_id"] for r in read_stage(project / "runs/t", "fan")] == ["a-0", "a-1", "c-0"]
    assert report.stages["fan"].counts.filtered == 1


def test_zstd_output(project):
    import zstandard

    engine.run(make(project, compress="zstd"))
    data = (project / "runs/t/sentiment/part-00000.jsonl.zst").read_bytes()
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(data).splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["sentiment"] == "positive"


def test_glob_and_zst_input(project):
    import zstandard

    write_jsonl(project / "in/a.jsonl", reviews(3))
    body = "".join(json.dumps(r) + "\n" for r in reviews(6)[3:]).encode()
    (project / "in/b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body))
    (project / "p.yaml").write_text("name: t\ninput: in/*.jsonl*\nid_field: id\nstages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    engine.run(config.load(project / "p.yaml"))
    assert [r["_id"] for r in read_stage(project / "runs/t", "s")] == \
        [f"r{i:04d}" for i in range(6)]


def test_output_gets_the_last_stage_in_input_order_once_every_shard_is_done(project):
    pipeline = make(project, 30, output="out/replies.jsonl")
    report = engine.run(pipeline, RunOptions(limit=15))
    assert report.exit_code == 0 and not (project / "out/replies.jsonl").exists()  # --limit
    engine.run(pipeline)
    written = read_jsonl(project / "out/replies.jsonl")
    assert written == read_stage(project / "runs/t", "reply")
    assert [r["_id"] for r in written] == [f"r{i:04d}" for i in range(1, 30, 3)]
    assert not list((project / "out").glob(".*"))  # written whole, then renamed


def test_output_can_be_compressed_and_comes_from_the_pipelines_folder(project, monkeypatch):
    import zstandard

    pipeline = make(project, 30, output="replies.jsonl.zst")
    (project / "elsewhere").mkdir()
    monkeypatch.chdir(project / "elsewhere")
    assert engine.run(pipeline).exit_code == 0
    data = zstandard.ZstdDecompressor().stream_reader(
        open(project / "replies.jsonl.zst", "rb")).read()
    assert len(data.splitlines()) == 10
