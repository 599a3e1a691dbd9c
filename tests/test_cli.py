"""The `chunbot` command as users and cron run it: exit codes, messages, crashes, the lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from chunbot_cli.cli import app
from chunbot_cli.sim.model import request_seed

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

SLOW = """
name: slow
input: data.jsonl
id_field: id
shard_size: 20
models:
  small: {{provider: sim, model: sim-small, latency_ms: {latency}, max_concurrency: 4,
          request_log: requests.log}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{{{ text }}}}"
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "Write an apology for: {{{{ text }}}}"
"""


def slow_project(project: Path, n: int = 200, latency: int = 20) -> Path:
    texts = ["great, I love it", "it broke, terrible", "okay I guess"]
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:04d}", "text": f"{texts[i % 3]} #{i}"} for i in range(n)])
    (project / "slow.yaml").write_text(SLOW.format(latency=latency))
    return project / "slow.yaml"


def start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chunbot_cli", *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def logged_keys(project: Path) -> list[str]:
    log = project / "requests.log"
    return [json.loads(line)["key"] for line in log.read_text().splitlines()] if log.exists() \
        else []


def recorded_keys(workdir: Path) -> set[str]:
    """Requests whose replies chunbot had made durable: journals and committed traces."""
    keys = set()
    for path in workdir.glob("*/*"):
        if path.name.endswith(".journal"):
            entries = [e["trace"] for e in read_jsonl(path)[1:]]
        elif path.name.startswith("trace-"):
            entries = read_jsonl(path)
        else:
            continue
        for trace in entries:
            if trace.get("response") is not None:
                request = trace["request"]
                keys.add(f"{request_seed('sim-small', request['messages'], request['params']):016x}")
    return keys


def test_kill_9_mid_run_then_resume_is_exactly_once(project):
    pipeline = slow_project(project)
    process = start(project, "run", str(pipeline), "--quiet")
    wait_for(lambda: len(logged_keys(project)) >= 90)
    process.send_signal(signal.SIGKILL)
    process.wait()
    workdir = project / "runs/slow"
    durable = recorded_keys(workdir)
    sent_before = logged_keys(project)
    assert len(sent_before) < 200 + 67, "the kill should land mid-run"
    assert durable and durable <= set(sent_before)
    # only requests in flight at the kill may be answered without being recorded
    assert len(set(sent_before) - durable) <= 4

    result = chunbot("run", str(pipeline), "--quiet", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    sent_after = logged_keys(project)[len(sent_before):]
    assert not durable & set(sent_after), "a finished request was sent again"
    assert len(sent_after) == len(set(sent_after))
    ids = [f"r{i:04d}" for i in range(200)]
    assert [r["_id"] for r in read_stage(workdir, "sentiment")] == ids
    assert [r["_id"] for r in read_stage(workdir, "reply")] == ids[1::3]
    assert not list(workdir.glob("*/part-*.journal"))
    assert chunbot("run", str(pipeline), "--quiet", cwd=project).returncode == 0
    assert len(logged_keys(project)) == len(sent_before) + len(sent_after)


def test_second_run_while_one_works_exits_75_naming_the_pid(project):
    pipeline = slow_project(project, n=400, latency=50)
    process = start(project, "run", str(pipeline), "--quiet")
    try:
        wait_for(lambda: (project / "runs/slow/lock").exists()
                 and (project / "runs/slow/lock").read_text().strip() == str(process.pid))
        result = chunbot("run", str(pipeline), cwd=project)
        assert result.returncode == 75
        assert f"pid {process.pid}" in result.stderr.decode()
    finally:
        process.kill()
        process.wait()
    # the lock of the killed run is taken over
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert f"lock left by pid {process.pid}" in result.stderr.decode()


def test_missing_input_is_exit_2_naming_it(project):
    (project / "p.yaml").write_text("name: t\ninput: nowhere.jsonl\nstages:\n"
                                    "  - name: s\n    prompt: '{{ text }}'\n")
    result = chunbot("run", "p.yaml", cwd=project)
    assert result.returncode == 2
    assert "nowhere.jsonl" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_config_error_is_exit_2_with_one_line(project):
    (project / "p.yaml").write_text("name: t\ninput: d.jsonl\nstages:\n"
                                    "  - name: s\n    promt: '{{ text }}'\n")
    result = chunbot("run", "p.yaml", cwd=project)
    assert result.returncode == 2
    message = result.stderr.decode().strip()
    assert message.count("\n") == 0
    assert "p.yaml:5" in message and "'s'" in message and "'promt'" in message


def test_bad_lines_exit_1_and_empty_input_exit_0(project):
    (project / "d.jsonl").write_text('{"text": "great"}\nnot json\n')
    (project / "p.yaml").write_text("name: t\ninput: d.jsonl\nstages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"s: 1 failed, in {Path('runs/t/s/errors.jsonl')}" in err
    assert "  1  not valid JSON" in err  # the reason, counted, without its line number
    assert "next: chunbot rerun p.yaml --stage s --failed" in err
    (project / "d.jsonl").write_text("")
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0
    assert "input is empty" in result.stderr.decode()


def test_stdin_input_and_json_logs(project):
    (project / "p.yaml").write_text("name: t\ninput: '-'\nstages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    body = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in ["great", "awful"] * 50)
    result = chunbot("run", "p.yaml", "--log-format", "json", cwd=project, input=body)
    assert result.returncode == 0
    events = [json.loads(line) for line in result.stderr.decode().splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 0
    assert summary["stages"][0]["records"] == 100
    assert len(read_stage(project / "runs/t", "s")) == 100


def test_plain_log_lines_come_periodically(project):
    pipeline = slow_project(project, n=60, latency=30)
    result = chunbot("run", str(pipeline), "--quiet", cwd=project)
    lines = result.stderr.decode().splitlines()
    assert any("sentiment:" in line and "rec/s" in line and "failed" in line
               for line in lines)
    assert any("model " in line and "in flight" in line and "429s" in line for line in lines)
    assert any(line.startswith("stage") and "records" in line for line in lines[-7:])


def test_validate_with_typer_runner(project):
    (project / "p.yaml").write_text("name: t\ninput: d.jsonl\nstages:\n"
                                    "  - name: s\n    prompt: '{{ text }}'\n"
                                    "  - name: keep\n    filter: 's != \"\"'\n")
    result = CliRunner().invoke(app, ["validate", "p.yaml"])
    assert result.exit_code == 0 and "s (llm) → keep (filter)" in result.output
    (project / "p.yaml").write_text("name: t\ninput: d.jsonl\nstages:\n"
                                    "  - name: s\n    model: gpt\n    prompt: '{{ text }}'\n")
    result = CliRunner().invoke(app, ["validate", "p.yaml"])
    assert result.exit_code == 2
    assert "unknown model alias 'gpt'" in result.output


def test_unknown_option_is_exit_2(project):
    assert chunbot("run", "p.yaml", "--bogus", cwd=project).returncode == 2


def test_demo_pipeline_runs_offline(project):
    repo = Path(__file__).resolve().parents[1]
    os.symlink(repo / "datasets", project / "datasets")
    (project / "configs").mkdir()
    shutil.copy(repo / "configs/demo.yaml", project / "configs/demo.yaml")
    (project / "elsewhere").mkdir()  # cron's current directory is rarely the checkout
    result = chunbot("run", "../configs/demo.yaml", "-q", cwd=project / "elsewhere",
                     timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert not (project / "elsewhere/runs").exists()  # paths are the pipeline file's
    labelled = read_stage(project / "runs/demo", "sentiment")
    assert len(labelled) >= 2000
    assert {r["sentiment"] for r in labelled} == {"positive", "negative", "neutral"}
    replies = read_stage(project / "runs/demo", "reply")
    assert replies and all(r["sentiment"] == "negative" and r["reply"] for r in replies)
    demo = str(project / "configs/demo.yaml")
    status = json.loads(chunbot("status", demo, "--json", cwd=project).stdout)
    assert [s["state"] for s in status["stages"]] == ["fresh"] * 3
    assert status["stages"][2]["out"] == len(replies)
    kept, dropped = replies[0]["_id"], next(r["_id"] for r in labelled
                                           if r["sentiment"] != "negative")
    traced = json.loads(chunbot("trace", demo, kept, "--json", cwd=project).stdout)
    assert traced["stages"][2]["trace"]["response"] == replies[0]["reply"]
    traced = json.loads(chunbot("trace", demo, dropped, "--json", cwd=project).stdout)
    assert [s["status"] for s in traced["stages"]] == ["ok", "filtered out", "not reached"]


def test_input_and_workdir_given_on_the_command_line_win(project):
    (project / "jobs").mkdir()
    (project / "jobs/p.yaml").write_text("name: t\ninput: missing.jsonl\nstages:\n"
                                         "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    write_jsonl(project / "today.jsonl", [{"id": "a", "text": "great"}, {"text": "awful"}])
    result = chunbot("run", "jobs/p.yaml", "--input", "today.jsonl", "--workdir", "w", "-q",
                     cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "w", "s")] == ["a", 1]  # `id`, else position
    assert not (project / "jobs/runs").exists()


def test_a_reader_that_stops_early_ends_a_finished_run_quietly(project):
    """`run --stream | head` on a finished run: SIGPIPE's exit code (README), and no advice
    to run again: the reader chose to stop, there is nothing to resume."""
    pipeline = slow_project(project, n=60, latency=1)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    shell = subprocess.run(f"{sys.executable} -m chunbot_cli run {pipeline} -q --stream | head -2;"
                           " exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                           cwd=project, capture_output=True, timeout=60)
    # 141 when a write met the closed pipe; 0 when all of it fit in the pipe's buffer first
    assert shell.returncode in (0, 141), shell.stderr.decode()
    assert len(shell.stdout.splitlines()) == 2
    assert b"nothing to do" in shell.stderr  # the log lines, and nothing after them
    assert b"again" not in shell.stderr and b"stdout was closed" not in shell.stderr, \
        shell.stderr.decode()


def test_rerunning_a_stage_that_never_ran_says_so_and_sends_nothing(project):
    pipeline = slow_project(project, n=30, latency=1)
    for flags in (["--failed"], ["--only"], []):
        result = chunbot("rerun", str(pipeline), "--stage", "sentiment", *flags, cwd=project)
        assert result.returncode == 2, result.stderr.decode()
        message = result.stderr.decode()
        assert "stage 'sentiment' has not run yet" in message and ".prev" not in message
        assert f"chunbot run {pipeline}" in message
    assert logged_keys(project) == [] and not (project / "runs/slow/sentiment").exists()
    unknown = chunbot("rerun", str(pipeline), "--stage", "sentimnet", "--failed", cwd=project)
    assert unknown.returncode == 2 and b"no stage named 'sentimnet'" in unknown.stderr
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    again = chunbot("rerun", str(pipeline), "--stage", "sentiment", "--failed", "-q",
                    cwd=project)
    assert again.returncode == 0, again.stderr.decode()


def test_stdin_from_a_terminal_is_announced_once(project):
    import pty

    (project / "p.yaml").write_text("name: t\ninput: '-'\nstages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    main, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", "p.yaml", "-q"],
                               cwd=project, stdin=terminal, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        first = process.stderr.readline()  # before any record: said while it waits
        assert b"reading JSONL records from stdin (Ctrl-D to end)" in first, first
        os.write(main, json.dumps({"text": "great"}).encode() + b"\n\x04")  # a line, then EOF
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(main)
    assert process.returncode == 0, rest.decode()
    assert b"stdin" not in rest  # once
    assert len(read_stage(project / "runs/t", "s")) == 1
    piped = chunbot("run", "p.yaml", "-q", "--workdir", "w", cwd=project,
                    input=json.dumps({"text": "awful"}).encode() + b"\n")
    assert piped.returncode == 0 and b"stdin" not in piped.stderr  # a pipe says nothing
