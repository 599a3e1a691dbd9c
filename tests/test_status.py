"""lookback/status.py and `chunbot status`: fresh or stale and why, counts, the last run."""

from __future__ import annotations

import json

from chunbot_cli import config, engine
from chunbot_cli.lookback import status

from conftest import chunbot, write_jsonl

PIPELINE = """
name: t
input: data.jsonl
shard_size: 10
models:
  small: {provider: sim, model: sim-small, price: {input: 1.0, output: 2.0}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{ text }}"
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "Write an apology for: {{ text }}"
"""


def project_with(project, text: str = PIPELINE) -> config.Pipeline:
    write_jsonl(project / "data.jsonl",
                [{"text": t} for t in ["great, love it", "broke, terrible", "okay"] * 10])
    (project / "p.yaml").write_text(text)
    return config.load(project / "p.yaml")


def test_a_finished_run_is_fresh_with_its_counts_and_last_run(project):
    engine.run(project_with(project))
    report = status.status(config.load(project / "p.yaml"))
    sentiment, negatives, reply = report["stages"]
    assert [s["state"] for s in report["stages"]] == ["fresh"] * 3
    assert (sentiment["shards_done"], sentiment["shards_total"]) == (3, 3)
    assert (negatives["in"], negatives["out"], negatives["filtered"]) == (30, 10, 20)
    assert sentiment["tokens_in"] > 0 and sentiment["cost"] > 0
    assert report["last_run"]["exit_code"] == 0


def test_an_edited_stage_is_stale_naming_the_key_and_downstream_follows(project):
    engine.run(project_with(project))
    edited = PIPELINE.replace("Write an apology for", "Write a kind apology for")
    (project / "p.yaml").write_text(edited.replace("'negative'", "'positive'"))
    report = status.status(config.load(project / "p.yaml"))
    rows = {r["stage"]: r for r in report["stages"]}
    assert rows["sentiment"]["state"] == "fresh"
    assert rows["negatives"]["why"] == "changed: filter"
    assert rows["reply"]["state"] == "stale" and "prompt" in rows["reply"]["why"]


def test_the_command_prints_a_table_or_json(project):
    project_with(project)
    before = chunbot("status", "p.yaml", cwd=project)
    assert before.returncode == 0 and "sentiment: not run: never run" in before.stdout.decode()
    chunbot("run", "p.yaml", "-q", cwd=project)
    table = chunbot("status", "p.yaml", cwd=project).stdout.decode()
    assert "sentiment" in table and "fresh" in table and "last run:" in table
    data = json.loads(chunbot("status", "p.yaml", "--json", cwd=project).stdout)
    assert data["stages"][2]["out"] == 10
