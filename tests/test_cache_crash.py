"""The response cache when a run dies: kill -9, SIGTERM and SIGINT.

Real `chunbot run` processes against a real `chunbot sim serve` with latency, killed by
real signals. The sim's latency and the model's `max_concurrency` bound how fast replies
come in, so how many of them a kill may lose before they reach the cache is known: those in
flight and at most `cache.FLUSH_SECONDS` worth of finished ones.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chunbot_cli.llm import cache

from conftest import chunbot, write_jsonl

RECORDS = 300
LATENCY_MS = 100
CONCURRENCY = 4
FASTEST = CONCURRENCY * 1000 / LATENCY_MS  # replies per second the sim can give at most
# finished replies a kill -9 may catch before they reach the cache: one flush interval's
# worth, plus a little for the write under way and a loaded machine
AT_RISK = CONCURRENCY + math.ceil(FASTEST * cache.FLUSH_SECONDS) + 10

PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: 50
models:
  m: {{provider: openai, model: sim-small, base_url: "{url}/v1",
      max_concurrency: {concurrency}}}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment: {{{{ text }}}}"
    params: {{temperature: 0, max_tokens: 8}}
"""


def slow_pipeline(project: Path, url: str) -> Path:
    write_jsonl(project / "data.jsonl",
                [{"id": i, "text": f"great value, love it #{i}"} for i in range(RECORDS)])
    path = project / "t.yaml"
    path.write_text(PIPELINE.format(url=url, concurrency=CONCURRENCY))
    return path


class Run:
    """A `chunbot run` process whose stdout lines are counted as they come."""

    def __init__(self, project: Path, *args: str):
        self.started = time.monotonic()
        self.stderr = open(project / "run.err", "ab")  # read it when a run misbehaves
        self.process = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", *args],
                                        cwd=project, stdout=subprocess.PIPE,
                                        stderr=self.stderr)
        self.lines = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for _ in self.process.stdout:
            self.lines += 1

    def wait_until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.02)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=30)
        self.reader.join(timeout=10)
        self.process.stdout.close()
        self.stderr.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.stop(signal.SIGKILL)


@pytest.fixture
def runs():
    started: list[Run] = []

    def start(project: Path, *args: str) -> Run:
        run = Run(project, *args)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()


def cached_entries(project: Path) -> int:
    with sqlite3.connect(project / ".cache/chunbot/cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM replies").fetchone()[0]


def journaled(workdir: Path) -> set:
    """Ids of the records whose replies the run made durable: journals and traces."""
    ids = set()
    for path in (workdir / "sentiment").glob("*"):
        if not (path.name.endswith(".journal") or path.name.startswith("trace-")):
            continue
        try:  # a journal goes once its shard is committed; its last line may be half-written
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines[1:] if path.name.endswith(".journal") else lines:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            trace = item.get("trace", {}) if path.name.endswith(".journal") else item
            if trace.get("response") is not None:
                ids.add(trace["_id"])
    return ids


def test_a_memory_run_killed_9_has_cached_all_but_its_last_second(
        project, sim_server, runs):
    server = sim_server("--latency-ms", str(LATENCY_MS))
    pipeline = slow_pipeline(project, server.url)
    first = runs(project, str(pipeline), "--storage", "memory", "-q")
    first.wait_until(lambda: first.lines >= 100 and time.monotonic() - first.started > 2)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    printed, sent = first.lines, server.stats()["requests"]
    assert printed < RECORDS - 50, "the kill should land mid-run"

    again = chunbot("run", str(pipeline), "--storage", "memory", "-q", cwd=project,
                    timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert len(again.stdout.splitlines()) == RECORDS
    total = server.stats()["requests"]
    # without a time bound on the writes the first run's replies were all lost: ~RECORDS
    # + printed; now only those of its last flush interval are asked again
    assert total <= RECORDS + AT_RISK, (printed, sent, total)


def test_a_disk_run_killed_9_has_cached_nearly_every_journaled_reply(
        project, sim_server, runs):
    server = sim_server("--latency-ms", str(LATENCY_MS))
    pipeline = slow_pipeline(project, server.url)
    workdir = project / "runs/t"
    first = runs(project, str(pipeline), "-q")
    first.wait_until(lambda: time.monotonic() - first.started > 2
                     and len(journaled(workdir)) >= 100)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    durable = len(journaled(workdir))
    assert durable < RECORDS - 50, "the kill should land mid-run"

    shutil.rmtree(workdir)  # so that the next run asks the cache for every record
    again = chunbot("run", str(pipeline), "-q", cwd=project, timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    hits = int(re.search(r"local cache: ([\d,]+) of", again.stderr.decode())
               .group(1).replace(",", ""))
    assert hits >= durable - AT_RISK, (durable, hits)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_by_a_signal_has_cached_every_reply_it_printed(
        project, sim_server, runs, signum):
    server = sim_server("--latency-ms", str(LATENCY_MS))
    pipeline = slow_pipeline(project, server.url)
    first = runs(project, str(pipeline), "--storage", "memory", "-q")
    first.wait_until(lambda: first.lines >= 20)
    assert first.stop(signum) == 128 + signum
    assert first.lines < RECORDS, "the signal should land mid-run"
    assert cached_entries(project) >= first.lines  # the pending writes were flushed
    again = chunbot("run", str(pipeline), "--storage", "memory", "-q", cwd=project,
                    timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    # only the requests cancelled in flight are asked again
    assert server.stats()["requests"] <= RECORDS + CONCURRENCY


def test_a_run_whose_stdout_is_closed_has_cached_every_reply_it_had(project, sim_server):
    """`chunbot run … | head`: the run ends on the broken pipe, an error, not a signal."""
    server = sim_server("--latency-ms", str(LATENCY_MS))
    pipeline = slow_pipeline(project, server.url)
    run = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline),
                            "--storage", "memory", "-q"], cwd=project,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    head = subprocess.run(["head", "-n", "20"], stdin=run.stdout, capture_output=True,
                          timeout=60)
    run.stdout.close()  # head's end is the only reader left: gone once head exits
    try:
        assert run.wait(timeout=60) == 128 + signal.SIGPIPE
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert len(head.stdout.splitlines()) == 20
    assert cached_entries(project) >= 20
    again = chunbot("run", str(pipeline), "--storage", "memory", "-q", cwd=project,
                    timeout=120)
    assert again.returncode == 0, again.stderr.decode()
    assert server.stats()["requests"] <= RECORDS + CONCURRENCY
