"""progress.py: log lines and the run summary, as a cron job or a log shipper sees them."""

from __future__ import annotations

import io
import json

from chunbot_cli import config, engine
from chunbot_cli.progress import LogProgress, make_progress

from conftest import write_jsonl


def run_with(project, progress):
    write_jsonl(project / "d.jsonl", [{"text": "great"}, {"text": "awful"}, {}])
    (project / "p.yaml").write_text("name: t\ninput: d.jsonl\nstages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    return engine.run(config.load(project / "p.yaml"), progress=progress)


def test_json_log_lines_parse_and_end_with_a_summary(project):
    stream = io.StringIO()
    progress = LogProgress(stream, as_json=True)
    progress.interval = 0.01
    run_with(project, progress)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert events[0]["event"] == "start" and events[0]["stages"] == ["s"]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 1
    [stage] = summary["stages"]
    assert (stage["records"], stage["out"], stage["failed"]) == (3, 2, 1)


def test_text_summary_is_a_table(project):
    stream = io.StringIO()
    run_with(project, LogProgress(stream, as_json=False))
    lines = stream.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    assert header.split()[:5] == ["stage", "records", "out", "failed", "filtered"]
    assert lines[-1].startswith("0.") or "exit 1" in lines[-1]
    assert "1 failed records in total" in lines[-1]
    assert any("next: chunbot rerun" in line for line in lines)


def test_without_a_terminal_progress_is_log_lines():
    assert isinstance(make_progress(stream=io.StringIO()), LogProgress)
    assert make_progress(log_format="json", stream=io.StringIO()).as_json


# --- progress while a run works: per stage and per model, JSON lines and the live table ----

import re
import signal
import subprocess
import sys
import time

from rich.console import Console

from chunbot_cli.progress import RichProgress

from conftest import chunbot, read_stage

SLOW = """\
name: t
input: d.jsonl
shard_size: {shard_size}
models:
  m: {{provider: sim, model: sim-small, latency_ms: {latency}{extra},
      price: {{input: 3.0, output: 15.0}}}}
defaults: {{model: m}}
stages:
  - name: {stage}
    prompt: 'sentiment: {{{{ text }}}}'
"""


def slow_pipeline(project, n: int, latency: int = 100, extra: str = "", shard_size: int = 100,
                  stage: str = "s"):
    """n records (the last lacks `text`: it fails) through a simulated model that takes
    `latency` ms a request, with prices so there is a cost."""
    write_jsonl(project / "d.jsonl", [{"text": f"great, review {i}"} for i in range(n - 1)]
                + [{"note": "no text"}])
    (project / "p.yaml").write_text(SLOW.format(latency=latency, extra=extra, stage=stage,
                                                shard_size=shard_size))
    return project / "p.yaml"


def test_json_log_lines_follow_each_stage_and_each_model(project):
    pipeline = slow_pipeline(project, 300, extra=", max_concurrency: 32")  # ~1 s of work
    result = chunbot("run", str(pipeline), "--log-format", "json", cwd=project,
                     env={"CHUNBOT_LOG_INTERVAL": "0.1"})
    assert result.returncode == 1, result.stderr.decode()  # the record without text
    events = [json.loads(line) for line in result.stderr.decode().splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    models = [e for e in events if e["event"] == "model"]
    assert len(progress) >= 3 and models
    for event in progress:
        assert event["stage"] == "s"
        assert {"done", "known", "pct", "eta_s", "failed", "cost"} <= set(event)
        assert 0 <= event["done"] <= event["known"] <= 300
    middle = [e for e in progress if 0 < e["done"] < 300]
    assert middle, "no progress line while the stage worked"
    assert all(0 < e["pct"] < 100 and e["eta_s"] is not None and e["eta_s"] >= 0
               and e["cost"] > 0 for e in middle if e["done"] > 10)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert any(e["failed"] == 1 for e in progress)
    for event in models:
        assert event["model"] == "m"
        assert {"req_s", "in_flight", "limit", "throttled_pct", "faults_pct"} <= set(event)
        assert 0 <= event["in_flight"] <= event["limit"] == 32
        assert event["throttled_pct"] == 0 and event["faults_pct"] == 0
    assert any(e["req_s"] > 0 and e["in_flight"] > 0 for e in models)
    summary = events[-1]
    assert summary["event"] == "summary"
    [stage] = summary["stages"]
    assert (stage["done"], stage["known"], stage["pct"], stage["eta_s"]) == (300, 300, 100.0, 0.0)
    assert (stage["out"], stage["failed"]) == (299, 1) and stage["cost"] > 0
    [model] = summary["models"]
    assert model["model"] == "m" and model["requests"] == 299


class Keeper:
    """A progress object that shows nothing and keeps the Run it is given."""

    interval = 0.05

    def start(self, run):
        self.run = run

    def update(self, run):
        pass

    def message(self, text):
        pass

    def finish(self, run, report):
        pass


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_live_table_fits_in_80_columns(project):
    pipeline = slow_pipeline(project, 2500, latency=1, stage="draft_customer_reply_v2")
    keeper = Keeper()
    report = engine.run(config.load(pipeline), progress=keeper)
    assert report.exit_code == 1
    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True)
    console.print(RichProgress(console)._render(keeper.run), crop=False)
    lines = ANSI.sub("", stream.getvalue()).splitlines()
    assert len(lines) >= 3  # the input line, the table's header and its row, the model
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    shown = "\n".join(lines)
    for cell in ("2,500/2,500", "100%", "model m:", "in flight"):
        assert cell in shown, shown  # nothing that matters is cut off to fit


def test_a_resumed_run_counts_the_records_it_restored_from_journals(project):
    pipeline = slow_pipeline(project, 300, latency=50, extra=", max_concurrency: 4",
                             shard_size=1000)  # one shard: ~4 s of work
    journal = project / "runs/t/s/part-00000.journal"
    run = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline), "-q"],
                           cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (journal.exists() and journal.read_bytes().count(b"\n") > 60):
            assert run.poll() is None and time.monotonic() < deadline, "no journal grew"
            time.sleep(0.02)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert journal.exists() and not list((project / "runs/t/s").glob("part-*.jsonl"))
    result = chunbot("run", str(pipeline), "--log-format", "json", cwd=project)
    assert result.returncode == 1, result.stderr.decode()
    summary = json.loads(result.stderr.decode().splitlines()[-1])
    [stage] = summary["stages"]
    assert (stage["records"], stage["out"], stage["failed"]) == (300, 299, 1)
    assert (stage["done"], stage["known"]) == (300, 300)
    assert len(read_stage(project / "runs/t", "s")) == 299
    assert summary["models"][0]["requests"] < 299  # the restored ones were not sent again
