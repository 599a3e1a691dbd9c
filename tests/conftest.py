"""Shared fixtures: a scratch project folder and a way to run the real `chunbot` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_stage(workdir: Path, stage: str) -> list[dict]:
    """All output records of a stage, shard by shard, in order."""
    records = []
    for part in sorted((workdir / stage).glob("part-*.jsonl")):
        if not part.name.endswith(".trace.jsonl"):
            records += read_jsonl(part)
    return records


def chunbot(*args: str, cwd: Path, input: bytes | None = None, timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real command in a subprocess, as a user or cron would."""
    return subprocess.run([sys.executable, "-m", "chunbot_cli", *args], cwd=cwd, input=input,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "CHUNBOT_LOG_INTERVAL": "0.2", **(env or {})})


def kill_all(pids: list[int]) -> None:
    """SIGKILL each of these processes that still runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that is the current directory, as when a user runs chunbot, with a
    response cache of its own (XDG_CACHE_HOME, inherited by chunbot processes)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    return tmp_path


class SimServer:
    """A `chunbot sim serve` process on 127.0.0.1; `url` is its root (add /v1 for OpenAI)."""

    def __init__(self, *flags: str, port: int = 0):
        self.flags = flags
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chunbot_cli", "sim", "serve", "--host", "127.0.0.1",
             "--port", str(port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.process.stdout.readline().decode()
        if "listening on " not in line:
            self.process.kill()
            raise RuntimeError(f"sim serve did not start: {line!r} "
                               f"{self.process.stderr.read().decode()}")
        self.url = line.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as response:
            return json.loads(response.read())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdout.close()
        self.process.stderr.close()

    def restart(self) -> None:
        """Kill it and start it again on the same port with the same flags."""
        self.kill()
        self.__init__(*self.flags, port=self.port)


@pytest.fixture
def sim_server():
    """Start `chunbot sim serve FLAGS…` processes; all are killed when the test ends."""
    servers: list[SimServer] = []

    def start(*flags: str, port: int = 0) -> SimServer:
        server = SimServer(*flags, port=port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
