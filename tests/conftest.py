"""Shared fixtures: a scratch project folder and a way to run the real `chunbot` process."""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that is the current directory, as when a user runs chunbot."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
