"""Faults and feedback: what chunbot does when records, files, disks, signals or a user's
switch of mode go wrong, told as a user meets them: the real `chunbot` process where a
real one matters (exit codes, stderr, signals, limits), the library elsewhere."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from chunbot_cli import config, engine

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

TEXTS = ["great, I love it", "it broke, terrible", "okay I guess"]

PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: {shard_size}
models:
  small: {{provider: sim, model: sim-small, latency_ms: {latency}, max_concurrency: {concurrency},
          request_log: requests.log}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{{{ text }}}}"
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "{reply_prompt}"
"""


def reviews(n: int) -> list[dict]:
    return [{"id": f"r{i:04d}", "text": f"{TEXTS[i % 3]} #{i}"} for i in range(n)]


def ids(n: int) -> list[str]:
    return [f"r{i:04d}" for i in range(n)]


def make(project: Path, n: int = 60, shard_size: int = 20, latency: int = 0,
         concurrency: str = "auto", reply_prompt: str = "Write an apology for: {{ text }}"
         ) -> Path:
    """The demo's shape (label, keep the negatives, reply) on the in-process simulator,
    every answered request logged in requests.log."""
    if not (project / "data.jsonl").exists():
        write_jsonl(project / "data.jsonl", reviews(n))
    (project / "p.yaml").write_text(PIPELINE.format(
        shard_size=shard_size, latency=latency, concurrency=concurrency,
        reply_prompt=reply_prompt))
    return project / "p.yaml"


def start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chunbot_cli", *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CHUNBOT_LOG_INTERVAL": "0.2"})


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def logged_keys(project: Path) -> list[str]:
    log = project / "requests.log"
    if not log.exists():
        return []
    return [json.loads(line)["key"] for line in log.read_text().splitlines() if line]


def shards_committed(workdir: Path, stage: str) -> int:
    try:
        state = json.loads((workdir / "state.json").read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(state.get("stages", {}).get(stage, {}).get("shards", {}))


def no_traceback(result) -> str:
    err = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    assert "Traceback" not in err, err
    assert "Task exception was never retrieved" not in err, err
    return err


def kill_9_mid_run(project: Path, pipeline: Path, until) -> None:
    """Start `chunbot run`, wait until `until()` holds, then SIGKILL it."""
    process = start(project, "run", str(pipeline), "--quiet")
    try:
        wait_for(until)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
    assert process.returncode == -9, "the run finished before the kill"


# 1. a record JSON cannot write fails alone


def test_an_input_line_nested_300_deep_fails_alone(project):
    lines = [json.dumps(r) for r in reviews(9)]
    lines[4] = '{"id": "deep", "text": "x", "deep": ' + "[" * 300 + "]" * 300 + "}"
    (project / "data.jsonl").write_text("\n".join(lines) + "\n")
    pipeline = make(project, shard_size=5)
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 1
    assert "a bug in chunbot" not in no_traceback(result)
    [error] = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert error["_id"] == "deep"
    assert "cannot be written as JSON" in error["error"]
    labelled = read_stage(project / "runs/t", "sentiment")
    assert [r["_id"] for r in labelled] == [i for i in ids(9) if i != "r0004"]
    # the run is complete apart from it: a second run has nothing to do and still says exit 1
    again = chunbot("run", str(pipeline), "-q", cwd=project)
    assert again.returncode == 1 and "nothing to do" in again.stderr.decode()


@pytest.mark.parametrize("returned", [
    pytest.param("{1: 'one'}", id="int-key"),
    pytest.param("{'tags': {'a', 'b'}}", id="set-value"),
    pytest.param("__import__('json').loads('[' * 300 + ']' * 300)", id="nested-300")])
def test_a_python_stage_returning_what_json_cannot_hold_fails_that_record(project, returned):
    (project / "mypkg.py").write_text(
        "def f(r):\n"
        f"    if r['id'] == 'r0003':\n        return dict(r, extra={returned})\n"
        "    return dict(r, n=len(r['text']))\n")
    write_jsonl(project / "data.jsonl", reviews(8))
    (project / "p.yaml").write_text("name: t\ninput: data.jsonl\nid_field: id\nshard_size: 4\n"
                                    "stages:\n  - name: tidy\n    python: mypkg:f\n"
                                    "  - name: keep\n    filter: 'n > 0'\n")
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 1
    assert "a bug in chunbot" not in no_traceback(result)
    [error] = read_jsonl(project / "runs/t/tidy/errors.jsonl")
    assert error["_id"] == "r0003" and "cannot be written as JSON" in error["error"]
    others = [i for i in ids(8) if i != "r0003"]
    assert [r["_id"] for r in read_stage(project / "runs/t", "tidy")] == others
    assert [r["_id"] for r in read_stage(project / "runs/t", "keep")] == others


# 2. foreign lines in a journal are ignored

def test_lines_chunbot_did_not_write_in_a_journal_are_ignored(project):
    pipeline = make(project, n=200, latency=20, concurrency="4")
    workdir = project / "runs/t"

    def journal_with_entries():
        for journal in workdir.glob("sentiment/part-*.journal"):
            try:
                if len(journal.read_bytes().splitlines()) >= 4:
                    return True
            except FileNotFoundError:  # committed meanwhile
                pass
        return False

    kill_9_mid_run(project, pipeline, journal_with_entries)
    journals = list(workdir.glob("sentiment/part-*.journal"))
    assert journals
    json.loads(journals[0].read_bytes().splitlines()[0])  # its header is JSON
    foreign = [b"[1,2]", b'{"x": 1}', b'{"i": "a"}', b'{"i": 99999, "out": 1, "trace": {}}',
               b'{"i": -1, "out": 1, "trace": {}}', b'{"i": true, "out": 1, "trace": {}}',
               b'{"i": 2, "out": "x", "trace": 7}', b"null", b"42", b'"text"', b"\xff\xfe",
               b'{"i": 1.5, "error": "e", "trace": {}}']
    for journal in journals:
        with open(journal, "ab") as f:
            f.write(b"\n" + b"\n".join(foreign) + b"\n")

    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    no_traceback(result)
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(200)
    assert [r["_id"] for r in read_stage(workdir, "reply")] == ids(200)[1::3]
    assert all(isinstance(r["sentiment"], str) for r in read_stage(workdir, "sentiment"))
    assert not list(workdir.glob("*/part-*.journal"))


# 3. a full disk stops the run in one line; the next run resumes

FULL_DISK_LIMIT = 60_000  # bytes a file may grow to: each shard's files need more


def full_disk_project(project: Path, kind: str) -> Path:
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:05d}", "text": f"{TEXTS[i % 3]}, a kettle review #{i} " + "x" * 100}
                 for i in range(3000)])
    (project / "mypkg.py").write_text("def f(r):\n    return dict(r, n=len(r['text']))\n")
    first = ("    prompt: 'Label the sentiment of: {{ text }}'" if kind == "llm"
             else "    python: mypkg:f")
    (project / "p.yaml").write_text(f"name: t\ninput: data.jsonl\nid_field: id\nshard_size: 500\n"
                                    f"stages:\n  - name: first\n{first}\n"
                                    "  - name: keep\n    filter: '_id != \"\"'\n")
    return project / "p.yaml"


def run_with_file_size_limit(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`chunbot run` as on a full disk: writes past FULL_DISK_LIMIT fail with EFBIG (Python
    ignores SIGXFSZ), which takes the code path of ENOSPC."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_LIMIT, FULL_DISK_LIMIT))

    return subprocess.run([sys.executable, "-m", "chunbot_cli", "run", *args], cwd=project,
                          capture_output=True, timeout=60, preexec_fn=limit,
                          env={**os.environ, "CHUNBOT_LOG_INTERVAL": "0.2"})


@pytest.mark.parametrize("kind", ["llm", "python"])
def test_a_full_disk_stops_the_run_in_one_line_and_the_next_run_resumes(project, kind):
    pipeline = full_disk_project(project, kind)
    full = run_with_file_size_limit(project, str(pipeline), "-q", "--no-cache")
    assert full.returncode == 1
    err = no_traceback(full)
    [line] = [line for line in err.splitlines() if "cannot write the workdir" in line]
    assert "File too large" in line
    assert not [p for p in project.rglob("*") if ".tmp" in p.name]

    result = chunbot("run", str(pipeline), "-q", "--no-cache", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    expected = [f"r{i:05d}" for i in range(3000)]
    assert [r["_id"] for r in read_stage(project / "runs/t", "first")] == expected
    assert [r["_id"] for r in read_stage(project / "runs/t", "keep")] == expected


@pytest.mark.parametrize("kind", ["llm", "python"])
def test_the_full_disk_line_names_the_file_it_could_not_write(project, kind):
    pipeline = full_disk_project(project, kind)
    full = run_with_file_size_limit(project, str(pipeline), "-q", "--no-cache")
    [line] = [line for line in full.stderr.decode().splitlines()
              if "cannot write the workdir" in line]
    assert "File too large" in line
    assert re.search(r"runs/t/first/\.?part-\d{5}", line), line


def test_a_full_disk_with_the_response_cache_on_is_one_line_too(project):
    pipeline = full_disk_project(project, "llm")
    full = run_with_file_size_limit(project, str(pipeline), "-q")
    assert full.returncode == 1
    err = no_traceback(full)
    assert len([line for line in err.splitlines() if "cannot write" in line]) == 1
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert len(read_stage(project / "runs/t", "keep")) == 3000


# 4. truncated or fake .zst input, an empty folder

def zst_frames(records: list[dict], per_frame: int) -> bytes:
    """The records as a .jsonl.zst of several frames, as `cat a.zst b.zst` makes."""
    import zstandard

    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress("".join(json.dumps(r) + "\n"
                                                for r in records[i:i + per_frame]).encode())
                    for i in range(0, len(records), per_frame))


def zst_project(project: Path, input: str = "in") -> Path:
    (project / "p.yaml").write_text(f"name: t\ninput: {input}\nid_field: id\nshard_size: 40\n"
                                    "stages:\n  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    return project / "p.yaml"


def test_a_truncated_zst_input_is_named_and_what_came_before_is_processed(project):
    import zstandard

    records = reviews(200)
    whole = zst_frames(records, per_frame=50)
    fourth = zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in records[150:]).encode())
    assert whole.endswith(fourth)
    cut = len(whole) - len(fourth) // 2  # in the middle of the fourth frame
    (project / "in").mkdir()
    (project / "in/x.jsonl.zst").write_bytes(whole[:cut])
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 1
    err = no_traceback(result)
    assert "x.jsonl.zst" in err and "ends in the middle of a zstd frame" in err
    done = [r["_id"] for r in read_stage(project / "runs/t", "s")]
    assert done and done == ids(200)[:len(done)]
    assert len(done) >= 120  # the three whole shards of the first 150 records at least


def test_every_whole_record_before_the_cut_of_a_zst_input_is_processed(project):
    whole = zst_frames(reviews(200), per_frame=50)
    (project / "in").mkdir()
    (project / "in/x.jsonl.zst").write_bytes(whole[:len(whole) - 40])  # into the 4th frame
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 1
    assert [r["_id"] for r in read_stage(project / "runs/t", "s")] == ids(150)


def test_a_zst_input_that_is_not_zstd_is_exit_2_naming_it(project):
    (project / "in").mkdir()
    write_jsonl(project / "in/x.jsonl.zst", reviews(5))  # plain JSONL, misnamed
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 2
    err = no_traceback(result)
    assert "x.jsonl.zst" in err and "zstd" in err
    assert not list((project / "runs").glob("t/s/part-*.jsonl"))


def test_an_empty_input_folder_is_exit_2_like_a_missing_input(project):
    (project / "in").mkdir()
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 2
    err = no_traceback(result)
    assert f"{project / 'in'}'" in err and err.strip().count("\n") == 0


# 5. a deleted part file is recomputed

def test_a_deleted_part_file_is_no_longer_fresh_and_the_next_run_redoes_it(project):
    pipeline = make(project)
    workdir = project / "runs/t"
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    sent = len(logged_keys(project))
    (workdir / "sentiment/part-00001.jsonl").unlink()

    status = chunbot("status", str(pipeline), cwd=project)
    assert status.returncode == 0
    assert "sentiment: stale: the output files of 1 shard" in status.stdout.decode()
    rows = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)["stages"]
    assert rows[0]["state"] == "stale" and "missing" in rows[0]["why"]

    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    no_traceback(result)
    assert "missing" in result.stderr.decode() and "part-00001" in result.stderr.decode()
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(60)
    assert [r["_id"] for r in read_stage(workdir, "reply")] == ids(60)[1::3]
    assert len(logged_keys(project)) == sent  # the response cache answered it again
    rows = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)["stages"]
    assert [r["state"] for r in rows] == ["fresh"] * 3


@pytest.mark.parametrize("damage", ["half", "ten lines", "empty", "torn last line"])
def test_a_truncated_or_emptied_part_file_is_not_trusted(project, damage):
    """state.json knows each part's size and records: a part cut short is redone, the
    output complete, and status names the file until then."""
    pipeline = make(project)
    workdir = project / "runs/t"
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    part = workdir / "sentiment/part-00001.jsonl"
    data = part.read_bytes()
    lines = data.splitlines(keepends=True)
    part.write_bytes({"half": b"".join(lines[:10]), "ten lines": b"".join(lines[:-10]),
                      "empty": b"", "torn last line": data[:-7]}[damage])

    rows = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)["stages"]
    assert rows[0]["state"] == "stale" and "damaged" in rows[0]["why"], rows[0]
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    err = no_traceback(result)
    assert "part-00001.jsonl is damaged" in err, err
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(60)
    assert part.read_bytes() == data
    rows = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)["stages"]
    assert [r["state"] for r in rows] == ["fresh"] * 3


@pytest.mark.parametrize("deleted", ["sentiment", "negatives"])
def test_a_deleted_upstream_part_and_an_edited_downstream_prompt_finish(project, deleted):
    """The edited stage must read the shard whose part is gone: it is made again first."""
    pipeline = make(project)
    workdir = project / "runs/t"
    assert engine.run(config.load(pipeline)).exit_code == 0
    (workdir / deleted / "part-00001.jsonl").unlink()
    make(project, reply_prompt="Write a two-line apology for: {{ text }}")
    report = engine.run(config.load(pipeline))
    assert report.errors == []  # no shard job failed (FileNotFoundError, say)
    assert report.exit_code == 0
    assert report.stages["reply"].shards_run == 3
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(60)
    assert [r["_id"] for r in read_stage(workdir, "negatives")] == ids(60)[1::3]
    replies = read_stage(workdir, "reply")
    assert [r["_id"] for r in replies] == ids(60)[1::3]
    assert all("\n" in r["reply"] for r in replies)  # the edited prompt's two lines


# 6. switching from batch to realtime does not pay twice

BATCH_THEN_REALTIME = """
name: b
input: data.jsonl
id_field: id
shard_size: 25
models:
  m: {{provider: openai, model: sim-small, base_url: "{url}/v1", batch_api: true}}
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


def test_a_realtime_run_collects_the_pending_batches_of_a_batch_run(project, sim_server):
    server = sim_server("--batch-delay-s", "3")
    write_jsonl(project / "data.jsonl", reviews(60))
    (project / "b.yaml").write_text(BATCH_THEN_REALTIME.format(url=server.url))
    submitted = chunbot("run", "b.yaml", "-q", "--mode", "batch", cwd=project)
    assert submitted.returncode == 75, submitted.stderr.decode()
    assert server.stats()["batches_created"] == 3  # a batch per shard

    # the YAML says realtime: the user drops --mode batch, before the batches are done
    again = chunbot("run", "b.yaml", "-q", cwd=project)
    assert again.returncode == 75, again.stderr.decode()
    err = no_traceback(again)
    assert "collecting them instead of sending their requests again" in err
    stats = server.stats()
    assert stats["by_route"]["chat"] == 0 and stats["answered"] == 0
    assert stats["batches_created"] == 3

    status = chunbot("status", "b.yaml", cwd=project)
    assert status.returncode == 0
    assert status.stdout.decode().count("batch batch_") == 3
    listed = json.loads(chunbot("status", "b.yaml", "--json", cwd=project).stdout)["batches"]
    assert sorted(b["shard"] for b in listed) == [0, 1, 2]
    assert {b["stage"] for b in listed} == {"sentiment"}

    deadline = time.monotonic() + 20
    while True:  # cron, every little while
        result = chunbot("run", "b.yaml", "-q", cwd=project)
        if result.returncode != 75 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "runs/b", "sentiment")] == ids(60)
    assert [r["_id"] for r in read_stage(project / "runs/b", "reply")] == ids(60)[1::3]
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["batch_items"] == 60
    # realtime requests: the reply stage's 20, none of the labels the batches answered
    assert stats["by_route"]["chat"] == 20 and stats["repeated"] == 0
    assert json.loads(chunbot("status", "b.yaml", "--json", cwd=project).stdout)["batches"] == []


# 7. SIGTERM stops the run like Ctrl-C, recorded in state.json

@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_with_128_plus_it_and_the_next_run_resumes(project, signum,
                                                                           code, said):
    """`kill PID` (a CI timeout, systemd, docker stop) or Ctrl-C: no new requests, what
    finished is kept, state.json says how the run ended."""
    pipeline = make(project, n=240, latency=200, concurrency="16")
    process = start(project, "run", str(pipeline), "--quiet")
    try:
        time.sleep(1.5)
        wait_for(lambda: len(logged_keys(project)) >= 16)  # it is at work
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == code
    err = stderr.decode()
    assert "Traceback" not in err and "Task exception was never retrieved" not in err, err
    [line] = [line for line in err.splitlines() if said in line]
    assert "run the same command again to resume" in line
    answered_before = logged_keys(project)
    assert len(answered_before) < 240 + 80, "the signal should land mid-run"

    status = chunbot("status", str(pipeline), "--json", cwd=project)
    assert status.returncode == 0
    last_run = json.loads(status.stdout)["last_run"]
    assert last_run["exit_code"] == code and last_run["interrupted"] == signum.name
    assert last_run["ended"] >= last_run["started"]
    datetime.fromisoformat(last_run["ended"])
    assert f"exit {code}" in chunbot("status", str(pipeline), cwd=project).stdout.decode()

    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    no_traceback(result)
    workdir = project / "runs/t"
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(240)
    assert [r["_id"] for r in read_stage(workdir, "reply")] == ids(240)[1::3]
    answered = Counter(logged_keys(project))
    assert len(answered) == 240 + 80  # every request answered…
    assert sum(n - 1 for n in answered.values()) <= 16  # …twice at most those in flight
    assert json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout
                      )["last_run"]["exit_code"] == 0


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("pause", [0.0, 0.05])
def test_a_second_signal_hurries_the_stop_and_the_exit_code_is_the_one_printed(
        project, signum, code, pause):
    pipeline = make(project, n=240, latency=200, concurrency="16")
    process = start(project, "run", str(pipeline))
    try:
        wait_for(lambda: len(logged_keys(project)) >= 16)
        process.send_signal(signum)
        time.sleep(pause)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:  # through the
            process.send_signal(signum)  # wind-down, to the very end of the process
            time.sleep(0.002)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = stderr.decode()
    assert process.returncode == code, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    assert f"exit {code}" in err
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "runs/t", "reply")] == ids(240)[1::3]


# 8. damaged state, a workdir that cannot be made, bad config: one line, exit 2

def one_line(result) -> str:
    err = no_traceback(result).strip()
    assert err and "\n" not in err, err
    return err


def test_a_corrupt_state_json_is_exit_2_naming_it_for_run_and_status(project):
    pipeline = make(project)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    for damaged in (b'{"ver', b"", b"[1, 2]", b'{"version": 1}', b"\xff\x00"):
        (project / "runs/t/state.json").write_bytes(damaged)
        for command in ("run", "status"):
            result = chunbot(command, str(pipeline), cwd=project)
            assert result.returncode == 2, (damaged, command, result.stderr)
            assert "state.json" in one_line(result)
    (project / "runs/t/state.json").unlink()  # as the message says: start afresh
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0


@pytest.mark.parametrize("damaged", [b'{"version": 1, "stages": {"sentiment": 5}}',
                                     b'{"version": 1, "stages": {"sentiment": {}}}'],
                         ids=["int", "no-shards"])
def test_a_state_json_of_the_wrong_shape_is_exit_2_naming_it(project, damaged):
    pipeline = make(project)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    (project / "runs/t/state.json").write_bytes(damaged)
    for command in ("status", "run"):
        result = chunbot(command, str(pipeline), cwd=project)
        assert result.returncode == 2, (command, result.stderr)
        assert "state.json" in one_line(result)


def test_a_corrupt_batches_json_is_exit_2_naming_it(project):
    pipeline = make(project)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    (project / "runs/t/sentiment/batches.json").write_bytes(b'{"0": ')
    result = chunbot("status", str(pipeline), cwd=project)
    assert result.returncode == 2
    assert "batches.json" in one_line(result)


def test_a_workdir_that_cannot_be_created_is_exit_2(project):
    pipeline = make(project)
    (project / "afile").write_text("not a folder\n")
    pipeline.write_text(pipeline.read_text().replace("id_field: id", "id_field: id\n"
                                                     "workdir: afile/run"))
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 2
    err = one_line(result)
    assert "cannot write the workdir" in err and "afile" in err
    assert not logged_keys(project)


@pytest.mark.parametrize("model_keys, named", [
    ("params: {1: 2}", "params"),
    ("max_concurrency: true", "max_concurrency"),
    ("rpm: -5", "rpm"),
    ("rpm: 0", "rpm"),
    ("tpm: 2.5", "tpm"),
])
def test_validate_refuses_bad_values_with_one_line(project, model_keys, named):
    where = "stage" if model_keys.startswith("params") else "model"
    text = ("name: t\ninput: data.jsonl\n"
            "models:\n  small: {provider: sim, model: sim-small"
            + (f", {model_keys}" if where == "model" else "") + "}\n"
            "stages:\n  - name: s\n    model: small\n    prompt: '{{ text }}'\n"
            + (f"    {model_keys}\n" if where == "stage" else ""))
    write_jsonl(project / "data.jsonl", reviews(3))
    (project / "p.yaml").write_text(text)
    result = chunbot("validate", "p.yaml", cwd=project)
    assert result.returncode == 2
    err = one_line(result)
    assert "p.yaml:" in err and (f"'{named}'" in err or f"key {named}" in err), err
    assert chunbot("run", "p.yaml", "-q", cwd=project).returncode == 2


def test_temp_files_left_by_killed_writes_are_removed_by_the_next_run(project):
    pipeline = make(project)
    assert engine.run(config.load(pipeline)).exit_code == 0
    workdir = project / "runs/t"
    leftovers = [workdir / ".state.json.tmp12345", workdir / "sentiment/.part-00000.jsonl.tmp999",
                 workdir / "reply/.part-00001.trace.jsonl.tmp4242"]
    for path in leftovers:
        path.write_bytes(b'{"half": ')  # a write killed half-way, before its rename
    report = engine.run(config.load(pipeline))
    assert report.exit_code == 0 and "nothing to do" in " ".join(report.notes)
    assert not [p for p in project.rglob("*") if ".tmp" in p.name]
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids(60)


# 9. status after an interrupted first run

def test_status_after_a_first_run_killed_mid_way_says_incomplete_not_fresh(project):
    pipeline = make(project, n=200, latency=20, concurrency="4")
    workdir = project / "runs/t"
    kill_9_mid_run(project, pipeline, lambda: shards_committed(workdir, "sentiment") >= 1)
    assert shards_committed(workdir, "sentiment") < 10

    table = chunbot("status", str(pipeline), cwd=project)
    assert table.returncode == 0
    lines = table.stdout.decode().splitlines()
    [row] = [line for line in lines if line.startswith("sentiment ")]
    assert "incomplete" in row and "fresh" not in row
    assert any(line.startswith("sentiment: incomplete:") for line in lines)
    report = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)
    sentiment = report["stages"][0]
    assert sentiment["state"] == "incomplete" and sentiment["shards_done"] >= 1
    assert "fresh" not in [s["state"] for s in report["stages"]]

    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    report = json.loads(chunbot("status", str(pipeline), "--json", cwd=project).stdout)
    assert [s["state"] for s in report["stages"]] == ["fresh"] * 3
    assert report["stages"][0]["shards_done"] == report["stages"][0]["shards_total"] == 10


# 10. validate warns about fields the input lacks

def test_validate_warns_about_a_field_the_first_records_lack(project):
    records = reviews(10)
    del records[3]["text"]
    write_jsonl(project / "data.jsonl", records)
    (project / "p.yaml").write_text(
        "name: t\ninput: data.jsonl\nid_field: id\nstages:\n"
        "  - name: sentiment\n    prompt: 'Label the sentiment of: {{ text }}'\n"
        "  - name: kettles\n    filter: \"product == 'kettle'\"\n"
        "  - name: reply\n    prompt: 'Answer this {{ sentiment }} review of {{ titel }}'\n")
    result = chunbot("validate", "p.yaml", cwd=project)
    assert result.returncode == 0
    assert "ok: sentiment (llm) → kettles (filter) → reply (llm)" in result.stdout.decode()
    warnings = no_traceback(result).splitlines()
    assert len(warnings) == 3, warnings
    text, product, titel = warnings
    assert "stage 'sentiment'" in text and "'text'" in text and "1 of the first 10" in text
    assert "stage 'kettles'" in product and "'product'" in product
    assert "stage 'reply'" in titel and "'titel'" in titel
    assert all("warning" in w and "p.yaml:" in w for w in warnings)
    assert not any("uses 'sentiment'" in w for w in warnings)  # the first stage adds it


def test_validate_says_nothing_when_the_records_have_every_field(project):
    write_jsonl(project / "data.jsonl", reviews(10))
    pipeline = make(project)
    result = chunbot("validate", str(pipeline), cwd=project)
    assert result.returncode == 0 and result.stderr.decode() == ""


# 11. a line or a prompt too big for any model fails alone, before anything is paid

def test_an_input_line_over_max_line_bytes_is_a_bad_record_read_in_bounded_memory(project):
    pipeline = make(project, n=6)
    pipeline.write_text(pipeline.read_text().replace("shard_size: 20",
                                                     "shard_size: 20\nmax_line_bytes: 1000000"))
    records = reviews(6)
    with open(project / "data.jsonl", "w") as f:
        for i, record in enumerate(records):
            if i == 2:
                record["text"] = "x" * (80 << 20)  # 80 MB in one line
            f.write(json.dumps(record) + "\n")
    del records
    process = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline), "-q"],
                               cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr.decode()
    no_traceback(subprocess.CompletedProcess([], 1, b"", stderr))
    [error] = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert error["line"] == 3 and "over max_line_bytes (1,000,000)" in error["error"]
    assert "83,886,107 bytes" in error["error"]  # its size, counted as it streamed by
    assert len(error["raw"]) < 100
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == \
        ["r0000", "r0001", "r0003", "r0004", "r0005"]
    assert "r0002" not in "".join(logged_keys(project))


def test_peak_memory_stays_far_below_an_oversized_line(project):
    pipeline = make(project, n=3)
    pipeline.write_text(pipeline.read_text().replace("shard_size: 20",
                                                     "shard_size: 20\nmax_line_bytes: 1000000"))
    with open(project / "data.jsonl", "w") as f:
        f.write(json.dumps({"id": "big", "text": "y" * (300 << 20)}) + "\n")
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", script, sys.executable, "-m", "chunbot_cli",
                             "run", str(pipeline), "-q"], cwd=project, capture_output=True,
                            timeout=120)
    peak_kb = int(result.stdout.split()[-1])
    assert peak_kb < 250_000, f"{peak_kb} KB for a 300 MB line"


def test_a_prompt_over_max_input_tokens_is_not_sent_and_the_next_model_takes_it(project):
    (project / "data.jsonl").write_text(
        json.dumps({"id": "short", "text": "great"}) + "\n"
        + json.dumps({"id": "long", "text": "word " * 400}) + "\n"
        + json.dumps({"id": "longest", "text": "word " * 4000}) + "\n")
    (project / "p.yaml").write_text("""
name: t
input: data.jsonl
models:
  small: {provider: sim, model: sim-small, max_input_tokens: 100, request_log: small.log}
  big: {provider: sim, model: sim-large, max_input_tokens: 1000, request_log: big.log}
stages:
  - {name: one, model: small, prompt: "Label: {{ text }}"}
""")
    p = config.load(project / "p.yaml")
    report = engine.run(p)
    assert report.exit_code == 1
    errors = {e["_id"]: e["error"] for e in read_jsonl(project / "runs/t/one/errors.jsonl")}
    assert set(errors) == {"long", "longest"}
    assert "over max_input_tokens of 'small' (100): not sent" in errors["long"]
    assert len((project / "small.log").read_text().splitlines()) == 1  # "short" only

    (project / "small.log").unlink()
    cascade = project / "p.yaml"
    cascade.write_text(cascade.read_text().replace("model: small, prompt", "model: [small, big], prompt"))
    report = engine.run(config.load(cascade), engine.RunOptions(cache="off"))
    assert report.exit_code == 1
    two = {r["_id"]: r for r in read_stage(project / "runs/t", "one")}
    assert set(two) == {"short", "long"}  # big took the long one
    [error] = read_jsonl(project / "runs/t/one/errors.jsonl")
    assert error["_id"] == "longest" and "of 'small' (100), 'big' (1,000): not sent" in error["error"]
    assert len((project / "small.log").read_text().splitlines()) == 1
    assert len((project / "big.log").read_text().splitlines()) == 1


# 12. a stage whose first records all fail the same way stops early

def test_a_wrong_key_stops_the_stage_after_its_first_records_and_the_fixed_run_goes_on(
        project, sim_server):
    server = sim_server("--api-key", "right", "--latency-ms", "5")
    write_jsonl(project / "data.jsonl", reviews(600))
    (project / "p.yaml").write_text(f"""
name: t
input: data.jsonl
shard_size: 100
models:
  m: {{provider: openai, model: sim-small, base_url: "{server.url}/v1", api_key_env: KEY,
      max_concurrency: 4}}
stages:
  - {{name: sentiment, model: m, prompt: "Label: {{{{ text }}}}"}}
""")
    wrong = chunbot("run", "p.yaml", "-q", cwd=project, env={"KEY": "wrong"})
    assert wrong.returncode == 1
    err = no_traceback(wrong)
    [line] = [line for line in err.splitlines() if "stopped" in line]
    assert "first 50 records all failed" in line and "401" in line, line
    assert server.stats()["requests"] <= 50 + 4  # then nothing more was sent

    fixed = chunbot("run", "p.yaml", "-q", cwd=project, env={"KEY": "right"})
    assert fixed.returncode == 0, fixed.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == ids(600)
    assert not (project / "runs/t/sentiment/errors.jsonl").read_bytes() \
        if (project / "runs/t/sentiment/errors.jsonl").exists() else True


def test_a_template_field_no_record_has_stops_the_stage_without_a_request(project):
    pipeline = make(project, n=200, shard_size=100,
                    reply_prompt="Write an apology for: {{ txet.upper() }}")
    report = engine.run(config.load(pipeline))
    assert report.exit_code == 1
    [line] = [e for e in report.errors if "stopped" in e]
    assert "stage 'reply' stopped: its first 50 records all failed with: template:" in line
    assert len(logged_keys(project)) == 200  # sentiment's; reply sent nothing


def test_failures_among_successes_do_not_stop_a_stage(project):
    pipeline = make(project, n=200, shard_size=100,
                    reply_prompt="Write an apology for: {{ text if id != 'r0007' else txet.x }}")
    report = engine.run(config.load(pipeline))
    assert report.exit_code == 1 and report.errors == []
    assert report.failed_total == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real full disk (ENOSPC for every file on it, as a full volume)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_exit_1_and_the_run_resumes_once_there_is_room(
        project, small_disk):
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:05d}", "text": f"a kettle review #{i} " + "x" * 200}
                 for i in range(20000)])
    (small_disk / "p.yaml").write_text(f"""
name: t
input: {project / "data.jsonl"}
shard_size: 2000
models:
  s: {{provider: sim, model: sim-small, latency_ms: 100}}
stages:
  - {{name: first, model: s, prompt: "Label: {{{{ text }}}}"}}
  - {{name: second, model: s, prompt: "Again: {{{{ text }}}}"}}
""")
    full = chunbot("run", "p.yaml", "--no-cache", cwd=small_disk, timeout=120)
    assert full.returncode == 1
    err = no_traceback(full)
    [line] = [line for line in err.splitlines() if "cannot write" in line]
    assert "No space left on device" in line
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    again = chunbot("run", "p.yaml", "--no-cache", "-q", cwd=small_disk, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert len(read_stage(small_disk / "runs/t", "second")) == 20000


# 12. input that is not JSON Lines is refused up front; a truncated .zst is exit 1 anywhere

def gzipped(records: list[dict]) -> bytes:
    import gzip

    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


NOT_JSONL = {
    "csv": (lambda: ("id,text\n" + "".join(f"r{i:04d},{TEXTS[i % 3]}\n" for i in range(60))
                     ).encode(), "looks like CSV"),
    "gzip": (lambda: gzipped(reviews(60)), "gzip-compressed"),
    "binary": (lambda: bytes(range(256)) * 40, "binary"),
    "one JSON document": (lambda: json.dumps(reviews(60), indent=2).encode(),
                          "one JSON document"),
}


@pytest.mark.parametrize("kind", NOT_JSONL)
def test_input_that_is_not_jsonl_is_exit_2_in_one_line_before_any_request(project, kind):
    content, said = NOT_JSONL[kind]
    (project / "data.jsonl").write_bytes(content())
    result = chunbot("run", str(make(project)), "-q", cwd=project)
    assert result.returncode == 2
    err = no_traceback(result)
    [line] = [line for line in err.splitlines() if "data.jsonl" in line]
    assert said in line and "is not read" in line
    assert "rerun" not in err and "failed" not in err
    assert logged_keys(project) == []
    assert not list(project.glob("runs/t/*/part-*.jsonl"))


def test_gzip_on_stdin_is_refused_from_its_first_bytes(project):
    pipeline = make(project)
    pipeline.write_text(pipeline.read_text().replace("input: data.jsonl", 'input: "-"'))
    result = chunbot("run", str(pipeline), "-q", cwd=project, input=gzipped(reviews(60)))
    assert result.returncode == 2
    assert "gzip-compressed" in no_traceback(result)
    assert logged_keys(project) == []


def test_a_utf8_bom_at_the_start_is_skipped_and_the_first_record_parses(project):
    write_jsonl(project / "data.jsonl", reviews(60))
    (project / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + (project / "data.jsonl").read_bytes())
    result = chunbot("run", str(make(project)), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == ids(60)


def test_a_few_bad_lines_after_good_ones_still_fail_one_by_one(project):
    write_jsonl(project / "data.jsonl", reviews(60))
    with open(project / "data.jsonl", "ab") as f:
        f.write(b"id,text\n\x00\x01binary\n")
    result = chunbot("run", str(make(project)), "-q", cwd=project)
    assert result.returncode == 1
    assert "--failed" in no_traceback(result)
    assert len(read_stage(project / "runs/t", "sentiment")) == 60


def test_a_csv_file_in_a_folder_is_named_and_nothing_runs(project):
    write_jsonl(project / "in/a.jsonl", reviews(10))
    (project / "in/b.jsonl").write_text("id,text\nr0001,great\n")
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 2
    [line] = [line for line in no_traceback(result).splitlines() if "b.jsonl" in line]
    assert "looks like CSV" in line
    assert not list(project.glob("runs/t/s/part-*.jsonl"))


def test_a_zst_holding_csv_is_refused_like_a_plain_csv(project):
    import zstandard

    (project / "in").mkdir()
    (project / "in/x.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"id,text\nr0001,great\nr0002,bad\n"))
    result = chunbot("run", str(zst_project(project)), "-q", cwd=project)
    assert result.returncode == 2
    assert "x.jsonl.zst" in no_traceback(result) and "looks like CSV" in result.stderr.decode()


@pytest.mark.parametrize("where", ["file", "folder", "folder after a file"])
def test_a_zst_cut_before_its_first_record_is_exit_1_alone_or_in_a_folder(project, where):
    (project / "in").mkdir()
    whole = zst_frames(reviews(10), per_frame=10)
    (project / "in/x.jsonl.zst").write_bytes(whole[:len(whole) - 5])  # nothing decodes
    if where == "folder after a file":
        write_jsonl(project / "in/a.jsonl", reviews(5))
    spec = "in/x.jsonl.zst" if where == "file" else "in"
    result = chunbot("run", str(zst_project(project, spec)), "-q", cwd=project)
    assert result.returncode == 1
    [line] = [line for line in no_traceback(result).splitlines() if "x.jsonl.zst" in line]
    assert "ends in the middle of a zstd frame" in line
