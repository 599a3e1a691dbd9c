"""`run --stream` and `--storage memory` as users pipe them: stdout carries the last stage's
records, each exactly once per invocation, whatever happened before."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from conftest import chunbot, read_jsonl, read_stage, write_jsonl
from test_cli import logged_keys, slow_project, start, wait_for


def records(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_stream_gives_the_part_files_records_as_they_finish_or_in_input_order(project):
    pipeline = slow_project(project, n=90, latency=5)
    result = chunbot("run", str(pipeline), "-q", "--stream", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    on_disk = read_stage(project / "runs/slow", "reply")
    streamed = records(result.stdout)
    assert sorted(streamed, key=lambda r: r["_id"]) == on_disk
    assert b"records" in result.stderr or b"reply" in result.stderr  # the summary: stderr

    sent = len(logged_keys(project))
    again = chunbot("run", str(pipeline), "-q", "--stream", "--order", "input", cwd=project)
    assert again.returncode == 0
    assert records(again.stdout) == on_disk  # a finished run: its output, in input order
    assert len(logged_keys(project)) == sent  # without a request


def test_kill_9_during_stream_then_rerun_streams_every_record_once(project):
    pipeline = slow_project(project, n=200, latency=20)
    process = start(project, "run", str(pipeline), "-q", "--stream")
    wait_for(lambda: len(logged_keys(project)) >= 150)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    result = chunbot("run", str(pipeline), "-q", "--stream", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    ids = [r["_id"] for r in records(result.stdout)]
    assert sorted(ids) == [f"r{i:04d}" for i in range(200)][1::3]
    assert len(ids) == len(set(ids))


def test_a_closed_stdout_stops_the_run_and_the_next_one_resumes(project):
    pipeline = slow_project(project, n=200, latency=10)
    shell = subprocess.run(f"{sys.executable} -m chunbot_cli run {pipeline} -q --stream | head -2;"
                           " exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                           cwd=project, capture_output=True, timeout=60)
    assert shell.returncode == 141, shell.stderr.decode()
    assert len(shell.stdout.splitlines()) == 2
    # the reader's choice: no message, and no Traceback of the broken pipe
    assert b"stdout was closed" not in shell.stderr and b"Traceback" not in shell.stderr
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0
    assert len(read_stage(project / "runs/slow", "reply")) == 67


def test_memory_storage_leaves_no_file_and_reports_failures(project):
    write_jsonl(project / "data.jsonl", [{"id": "a", "text": "great, I love it"},
                                         {"id": "b", "title": "no text"},
                                         {"id": "c", "text": "it broke, terrible"}])
    (project / "p.yaml").write_text(
        "name: mem\ninput: data.jsonl\nworkdir: runs/mem\n"
        "models: {small: {provider: sim, model: sim-small}}\n"
        "stages:\n  - name: label\n    model: small\n    prompt: 'Label the sentiment of: {{ text }}'\n")
    result = chunbot("run", "p.yaml", "-q", "--storage", "memory", "--order", "input",
                     cwd=project)
    assert result.returncode == 1  # a record failed
    assert [(r["_id"], r["label"]) for r in records(result.stdout)] == [("a", "positive"),
                                                                        ("c", "negative")]
    failed = [json.loads(line) for line in result.stderr.splitlines() if line.startswith(b"{")]
    assert [(e["_id"], e["stage"]) for e in failed] == [("b", "label")]
    assert "text" in failed[0]["error"]
    assert not (project / "runs").exists()

    piped = chunbot("run", "p.yaml", "-q", "--storage", "memory", "--input", "-",
                    "--errors", "failed.jsonl", cwd=project,
                    input=(project / "data.jsonl").read_bytes())
    assert piped.returncode == 1
    assert sorted(r["_id"] for r in records(piped.stdout)) == ["a", "c"]
    assert [e["_id"] for e in read_jsonl(project / "failed.jsonl")] == ["b"]
    assert not (project / "runs").exists()


def test_memory_storage_refuses_what_needs_a_workdir(project):
    slow_project(project)
    result = chunbot("run", "slow.yaml", "--storage", "memory", "--stage", "reply",
                     cwd=project)
    assert result.returncode == 2 and b"--until" in result.stderr
    result = chunbot("run", "slow.yaml", "--errors", "e.jsonl", cwd=project)
    assert result.returncode == 2 and b"--storage memory" in result.stderr


def test_batch_mode_in_memory_waits_for_its_batches(project, sim_server):
    from test_batch_mode import batch_project

    server = sim_server("--batch-delay-s", "0.2")
    pipeline = batch_project(project, server.url, "openai", "batch", "mem-batch")
    result = chunbot("run", str(pipeline), "--storage", "memory", cwd=project)
    assert result.returncode == 2 and b"--wait" in result.stderr
    result = chunbot("run", str(pipeline), "-q", "--storage", "memory", "--wait",
                     "--order", "input", cwd=project, env={"CHUNBOT_BATCH_POLL_S": "0.2"})
    assert result.returncode == 0, result.stderr.decode()
    replies = records(result.stdout)
    assert [r["_id"] for r in replies] == [f"r{i:03d}" for i in range(60)
                                           if i % 4 in (1, 3)]
    assert server.stats()["batches_created"] >= 2 and not (project / "runs").exists()


def test_memory_storage_still_uses_the_response_cache(project):
    pipeline = slow_project(project, n=30, latency=1)
    first = chunbot("run", str(pipeline), "-q", "--storage", "memory", cwd=project)
    assert first.returncode == 0, first.stderr.decode()
    sent = len(logged_keys(project))
    again = chunbot("run", str(pipeline), "-q", "--storage", "memory", cwd=project)
    assert again.returncode == 0
    assert sorted(records(again.stdout), key=lambda r: r["_id"]) == \
        sorted(records(first.stdout), key=lambda r: r["_id"])
    assert len(logged_keys(project)) == sent  # every request answered by the cache
    assert not (project / "runs").exists()
