"""`mode: batch` end to end: run → exit 75 while batches are pending → run → exit 0, with
the same output files as a realtime run, against `chunbot sim serve`'s batch APIs."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import chunbot, read_stage, write_jsonl

PIPELINE = """
name: {name}
input: data.jsonl
id_field: id
shard_size: 25
models:
  m: {{provider: {provider}, model: sim-small, base_url: "{url}", batch_api: true}}
defaults: {{mode: {mode}, retries: 3}}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment: {{{{ text }}}}"
    params: {{max_tokens: 8, temperature: 0}}
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: m
    prompt: "Write an apology for: {{{{ text }}}}"
    params: {{max_tokens: 60, temperature: 0}}
"""
TEXTS = ["great, love it", "it broke, terrible", "okay I guess", "the lid leaks, awful"]


def batch_project(project, url: str, provider: str, mode: str, name: str):
    if not (project / "data.jsonl").exists():
        write_jsonl(project / "data.jsonl",
                    [{"id": f"r{i:03d}", "text": f"{TEXTS[i % 4]} #{i}"} for i in range(60)])
    base = url + ("/v1" if provider == "openai" else "")
    path = project / f"{name}.yaml"
    path.write_text(PIPELINE.format(name=name, provider=provider, url=base, mode=mode))
    return path


def test_batch_cycle_gives_the_realtime_output_for_every_provider(project, sim_server):
    server = sim_server("--batch-delay-s", "0.3")
    for provider in ("openai", "anthropic", "gemini"):
        realtime = batch_project(project, server.url, provider, "realtime", f"rt-{provider}")
        assert chunbot("run", str(realtime), "-q", "--no-cache", cwd=project).returncode == 0
        batch = batch_project(project, server.url, provider, "batch", f"b-{provider}")
        first = chunbot("run", str(batch), "-q", "--no-cache", cwd=project)
        assert first.returncode == 75, first.stderr.decode()
        assert b"nothing to do" not in first.stderr  # it sent batches
        ledger = json.loads((project / f"runs/b-{provider}/sentiment/batches.json").read_text())
        assert len(ledger) == 3 and all(len(s["batches"]) == 1 for s in ledger.values())
        for _ in range(20):  # cron, every little while
            result = chunbot("run", str(batch), "-q", "--no-cache", cwd=project)
            if result.returncode != 75:
                break
        assert result.returncode == 0, result.stderr.decode()
        for stage in ("sentiment", "negatives", "reply"):
            assert read_stage(project / f"runs/b-{provider}", stage) == \
                read_stage(project / f"runs/rt-{provider}", stage)
        assert not (project / f"runs/b-{provider}/sentiment/batches.json").read_text().strip("{}")
    stats = server.stats()
    assert stats["batches_created"] == 3 * (3 + 3)  # a batch per shard per LLM stage
    assert stats["batch_items"] == 3 * (60 + 30)


def test_wait_polls_until_done_and_failed_items_are_batched_again(project, sim_server):
    server = sim_server("--batch-delay-s", "0.2", "--batch-error-rate", "0.2", "--seed", "4")
    batch = batch_project(project, server.url, "openai", "batch", "w")
    batch.write_text(batch.read_text().replace("retries: 3", "retries: 12"))  # 0.2^13: none fail
    result = chunbot("run", str(batch), "-q", "--wait", "--no-cache", cwd=project,
                     env={"CHUNBOT_BATCH_POLL_S": "0.1"})
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_stage(project / "runs/w", "sentiment")) == 60
    assert server.stats()["batches_created"] > 6  # the errored items went again


def test_batch_fallback_finishes_what_a_batch_could_not_in_realtime(project, sim_server):
    server = sim_server("--batch-delay-s", "0.2", "--batch-expire-rate", "0.3", "--seed", "2")
    batch = batch_project(project, server.url, "anthropic", "batch", "f")
    batch.write_text(batch.read_text().replace("mode: batch,", "mode: batch, "
                                               "batch_fallback: realtime,"))
    result = chunbot("run", str(batch), "-q", "--wait", "--no-cache", cwd=project,
                     env={"CHUNBOT_BATCH_POLL_S": "0.1"})
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_stage(project / "runs/f", "sentiment")) == 60
    assert server.stats()["answered"] > 0  # the expired ones, in realtime


def test_kill_9_between_creating_a_batch_and_recording_it_makes_no_second_batch(
        project, sim_server):
    """The process kills itself (SIGKILL, via CHUNBOT_FAILPOINT) right after the provider
    created the batch and before batches.json names it; the next run must find that batch
    at the provider instead of creating another."""
    server = sim_server("--batch-delay-s", "0.3")
    for provider in ("openai", "anthropic", "gemini"):
        batch = batch_project(project, server.url, provider, "batch", f"k-{provider}")
        batch.write_text(batch.read_text().replace("shard_size: 25", "shard_size: 100"))
        killed = chunbot("run", str(batch), "-q", "--no-cache", cwd=project,
                         env={"CHUNBOT_FAILPOINT": "batch-created"})
        assert killed.returncode == -9
        created = server.stats()["batches_created"]
        ledger = json.loads((project / f"runs/k-{provider}/sentiment/batches.json").read_text())
        assert [s["batches"] for s in ledger.values()] == [[]]  # the intent, not the id
        for _ in range(20):
            result = chunbot("run", str(batch), "-q", "--no-cache", cwd=project)
            if result.returncode != 75:
                break
        assert result.returncode == 0, result.stderr.decode()
        # the sentiment batch was found, not made again; the reply stage's is the only new one
        assert server.stats()["batches_created"] == created + 1
        assert len(read_stage(project / f"runs/k-{provider}", "sentiment")) == 60


@pytest.mark.parametrize("provider, named, cancelled", [
    ("openai", "batch batch_", {"cancelling", "cancelled"}),
    ("gemini", "batch batches/", {"BATCH_STATE_CANCELLED"})])
def test_status_lists_pending_batches_and_cancel_cancels_them(project, sim_server, provider,
                                                              named, cancelled):
    server = sim_server("--batch-delay-s", "30")
    batch = batch_project(project, server.url, provider, "batch", "s")
    assert chunbot("run", str(batch), "-q", "--no-cache", cwd=project).returncode == 75
    status = chunbot("status", str(batch), cwd=project).stdout.decode()
    assert status.count(named) == 3 and "(sentiment, shard 0)" in status, status
    done = chunbot("cancel", str(batch), cwd=project)
    assert done.returncode == 0 and done.stdout.decode().count("sentiment shard") == 3
    for _ in range(50):  # a cancel takes a moment (a tenth of the batch delay at the sim)
        data = json.loads(chunbot("status", str(batch), "--json", cwd=project).stdout)
        if {b["status"] for b in data["batches"]} <= cancelled:
            break
        time.sleep(0.2)
    assert {b["status"] for b in data["batches"]} <= cancelled, data


def test_batch_deadline_finishes_stragglers_in_realtime(project, sim_server):
    server = sim_server("--batch-delay-s", "60")
    batch = batch_project(project, server.url, "anthropic", "batch", "d")
    batch.write_text(batch.read_text().replace("mode: batch,", "mode: batch, "
                                               "batch_deadline: 1s,"))
    result = chunbot("run", str(batch), "-q", "--wait", "--no-cache", cwd=project,
                     env={"CHUNBOT_BATCH_POLL_S": "0.3"}, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_stage(project / "runs/d", "reply")) == 30
    assert server.stats()["answered"] == 60 + 30  # all of it in realtime, after the deadline


def test_wait_collects_a_quick_batch_within_seconds_of_it_finishing(project, sim_server):
    """Without CHUNBOT_BATCH_POLL_S: the first poll comes after 1 s, then 2, 4… up to 30 s,
    so a 3 s batch is not waited for 30 s."""
    server = sim_server("--batch-delay-s", "3")
    batch = batch_project(project, server.url, "openai", "batch", "q")
    batch.write_text(batch.read_text().replace("shard_size: 25", "shard_size: 100"))
    started = time.monotonic()
    result = chunbot("run", str(batch), "-q", "--wait", "--no-cache", "--until", "sentiment",
                     cwd=project, env={"CHUNBOT_BATCH_POLL_S": "30"})
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_stage(project / "runs/q", "sentiment")) == 60
    assert server.stats()["batches_created"] == 1
    assert took < 3 + 6, took  # polled at 1, 3 and 7 s at most; a fixed 30 s: over 30 s
