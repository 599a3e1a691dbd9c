"""`chunbot rerun`: a stage recomputed whole, only its failures, or only some records."""

from __future__ import annotations

from chunbot_cli import config, engine
from chunbot_cli.engine import RunOptions

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: 20
models:
  m: {{provider: {provider}, model: sim-small, {where}}}
defaults: {{retries: 0}}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment of: {{{{ text }}}}"
  - name: shout
    python: shout:upper
"""
TEXTS = ["great, love it", "broke, terrible", "okay"]


def setup(project, provider: str = "sim", where: str = "request_log: requests.log",
          n: int = 60) -> config.Pipeline:
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:02d}", "text": f"{TEXTS[i % 3]} #{i}"} for i in range(n)])
    (project / "shout.py").write_text(
        "def upper(record):\n    record['loud'] = record['sentiment'].upper()\n"
        "    return record\n")
    (project / "p.yaml").write_text(PIPELINE.format(provider=provider, where=where))
    return config.load(project / "p.yaml")


def sent(project) -> int:
    return len((project / "requests.log").read_text().splitlines())


def test_a_rerun_asks_the_model_again_and_keeps_the_previous_output(project):
    pipeline = setup(project)
    engine.run(pipeline)
    assert sent(project) == 60
    report = engine.run(pipeline, RunOptions(rerun="sentiment"))
    assert sent(project) == 120  # not answered from the cache
    assert report.stages["shout"].shards_run == 3  # downstream followed
    assert len(read_stage(project / "runs/t", "sentiment.prev")) == 60
    assert engine.run(pipeline).stages["sentiment"].shards_run == 0


def test_rerun_only_leaves_downstream_for_later(project):
    pipeline = setup(project)
    engine.run(pipeline)
    report = engine.run(pipeline, RunOptions(rerun="sentiment", rerun_only=True))
    assert "shout" not in report.stages
    assert engine.run(pipeline).stages["shout"].shards_run == 3  # now stale, redone


def test_rerun_ids_sends_only_those_records(project):
    pipeline = setup(project)
    engine.run(pipeline)
    report = engine.run(pipeline, RunOptions(rerun="sentiment",
                                             rerun_ids=frozenset({"r05", "r41"})))
    assert sent(project) == 62
    assert report.stages["sentiment"].shards_run == 2  # the shards holding them
    assert [r["_id"] for r in read_stage(project / "runs/t", "shout")] == \
        [f"r{i:02d}" for i in range(60)]


def test_rerun_failed_sends_only_the_failed_records_and_merges_them(project, sim_server):
    server = sim_server("--error-rate", "0.3", "--seed", "5")
    setup(project, "openai", f'base_url: "{server.url}/v1"')
    assert chunbot("run", "p.yaml", "-q", cwd=project).returncode == 1
    failed = {e["_id"] for e in read_jsonl(project / "runs/t/sentiment/errors.jsonl")}
    answered = server.stats()["answered"]
    for _ in range(10):  # 30% still fail each time, with retries 0
        result = chunbot("rerun", "p.yaml", "--stage", "sentiment", "--failed", "-q",
                         cwd=project)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr.decode()
    stats = server.stats()
    assert stats["answered"] == answered + len(failed)  # only the failed ones, once each
    assert stats["repeated"] == 0
    ids = [f"r{i:02d}" for i in range(60)]
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == ids
    assert [r["_id"] for r in read_stage(project / "runs/t", "shout")] == ids
    assert not (project / "runs/t/sentiment/errors.jsonl").read_text()
    assert (project / "runs/t/sentiment.prev/errors.jsonl").exists()


def test_failed_and_ids_need_an_llm_stage(project):
    setup(project)
    result = chunbot("rerun", "p.yaml", "--stage", "shout", "--failed", cwd=project)
    assert result.returncode == 2 and "is a python stage" in result.stderr.decode()
