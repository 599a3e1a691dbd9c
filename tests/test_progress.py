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
    for cell in ("2,500/2,500", "100%", "limited by", "idle", "in flight"):
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


# --- why a run is slow, and when it ends: the limiting factor per model, the run's ETA ----

import asyncio
from types import SimpleNamespace

from chunbot_cli import progress as progress_module
from chunbot_cli.llm.client import ModelClient
from chunbot_cli.progress import Tracker, limited_by, model_rows, run_eta, stage_rows

TWO_STAGES = """\
name: t
input: d.jsonl
models:
  {alias}: {{provider: sim, model: sim-small}}
  m2: {{provider: sim, model: sim-small, max_concurrency: 32}}
defaults: {{model: {alias}}}
stages:
  - name: {stage}
    prompt: 'sentiment: {{{{ text }}}}'
  - name: keep
    filter: "'great' in text"
  - name: reply
    model: m2
    prompt: 'reply to: {{{{ text }}}}'
"""


class Clock:
    """time.monotonic for progress.py, moved by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def staged_run(project, alias="m", stage="s"):
    """A real Run of a three-stage pipeline that has not started: its counters are set by
    the test, as the engine would."""
    write_jsonl(project / "d.jsonl", [{"text": "great"}] * 10)
    (project / "p.yaml").write_text(TWO_STAGES.format(alias=alias, stage=stage))
    pipeline = config.load(project / "p.yaml")
    run = engine.Run(pipeline, engine.RunOptions(), None)
    run.clients = {a: ModelClient(pipeline.models[a]) for a in (alias, "m2")}
    return run


def counts(run, stage, records, out=None, known=None, first_start=None):
    report = run.report.stages[stage]
    report.counts.records_in, report.counts.records_out = records, records if out is None else out
    report.known = records if known is None else known
    report.first_start = first_start


def test_a_stage_whose_records_come_later_waits_for_upstream_and_counts_in_the_run_eta(
        project, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module, "time", clock)
    run = staged_run(project)
    run.started, run.read_through, run.report.lines_read = clock.now - 10, True, 1000
    counts(run, "s", 100, out=100, known=1000, first_start=clock.now - 10)  # 10 rec/s
    counts(run, "keep", 0)
    counts(run, "reply", 0)
    s, keep, reply = stage_rows(run)
    assert keep["state"] == reply["state"] == "waiting for upstream"
    assert (s["total"], keep["total"], reply["total"]) == (1000, 900, 900)
    assert keep["pct"] == 0.0 and keep["eta_s"] >= s["eta_s"] == 90.0  # not "100%, 0s"
    assert run_eta([s, keep, reply]) == reply["eta_s"] >= 90.0
    # the filter passes a third: what is still to come downstream shrinks to match
    clock.now += 10
    counts(run, "s", 200, out=200, known=1000, first_start=clock.now - 20)
    counts(run, "keep", 200, out=60, first_start=clock.now - 9)
    counts(run, "reply", 20, known=60, first_start=clock.now - 8)
    s, keep, reply = stage_rows(run)
    assert (keep["total"], reply["total"]) == (1000, 60 + round(800 * 0.3))
    assert reply["state"] == "running" and reply["eta_s"] >= s["eta_s"]
    assert reply["rate"] == 2.0 and reply["eta_s"] == 140.0  # 280 to come at 2 rec/s
    lines = render(run)
    assert lines[0].endswith("run ETA 2m20s"), lines  # the last stage's: it counts them all


def render(run, width=80):
    stream = io.StringIO()
    console = Console(file=stream, width=width, force_terminal=True)
    console.print(RichProgress(console)._render(run), crop=False)
    return ANSI.sub("", stream.getvalue()).splitlines()


def test_the_eta_follows_the_recent_rate_not_the_average_since_the_start(project,
                                                                         monkeypatch):
    """A stage that stood still for a minute (an outage), then does 100 rec/s: 9 s before
    the end the rate since the start said 1m03s; the last 10 s say 9 s."""
    clock = Clock()
    monkeypatch.setattr(progress_module, "time", clock)
    run = staged_run(project)
    run.started = start = clock.now
    run.read_through, run.report.lines_read = True, 1900
    for second in range(71):  # the display looks every second
        clock.now = start + second
        counts(run, "s", max(0, second - 60) * 100, known=1900, first_start=start)
        s = stage_rows(run)[0]
    assert s["done"] == 1000 and s["rate"] == 100.0
    assert s["eta_s"] == 9.0  # 900 left at 100 rec/s (the old display: 900 / (1000/70) = 63 s)
    # a stall inside the window: the ETA grows, but no more than twice elapsed × left / done
    for second in range(71, 100):
        clock.now = start + second
        s = stage_rows(run)[0]
    assert s["rate"] == 0.0 and s["eta_s"] == round(2 * 900 * 99 / 1000, 1)


def test_each_model_says_what_holds_it_back(project):
    run = staged_run(project)
    client = run.clients["m"]
    idle = (0, 0, 0)
    assert limited_by(client, idle, "waiting for input") == "waiting for input"
    client.request_budget.announce(6000)  # a server said so; requests sleep for it
    client.request_budget.reserve(200)
    assert limited_by(client, idle, "idle") == "paced: 6,000 rpm announced"
    client.token_budget = type(client.token_budget)(configured=100_000)
    client.token_budget.reserve(1e6)
    assert limited_by(client, idle, "idle") == "paced: 100,000 tpm configured"
    assert limited_by(client, (50, 3, 0), "idle") == "backoff (429s)"
    client.paused_until = time.monotonic() + 11.5
    assert limited_by(client, (50, 3, 0), "idle") == "paused 12s (429s)"
    client.pool.endpoints[0].down = True
    client.pool.all_down_since = time.monotonic() - 40
    assert limited_by(client, idle, "idle") == "outage: every endpoint down 40s"
    other = run.clients["m2"]
    assert limited_by(other, (100, 0, 20), "idle") == "retrying 5xx (20%)"
    loop = asyncio.new_event_loop()
    try:
        other.pool._waiters.append(loop.create_future())  # one request in line for room
        assert limited_by(other, idle, "idle") == "max_concurrency 32"
        client.pool.all_down_since, client.paused_until = None, 0.0
        client.pool.endpoints[0].down = False
        client.request_budget = type(client.request_budget)()
        client.token_budget = type(client.token_budget)()
        client.pool._waiters.append(loop.create_future())
        assert limited_by(client, idle, "idle") == f"adaptive limit {client.limit}"
    finally:
        loop.close()


def test_models_waiting_for_their_stages_records_say_which(project):
    run = staged_run(project)
    run.report.lines_read = 100
    counts(run, "s", 0, known=100, first_start=time.monotonic())
    m, m2 = model_rows(run)
    assert (m["limited_by"], m2["limited_by"]) == ("waiting for input", "waiting for upstream")
    run.read_through = True
    counts(run, "s", 100, known=100)
    counts(run, "keep", 100)
    counts(run, "reply", 100)
    assert [row["limited_by"] for row in model_rows(run)] == ["idle", "idle"]


def test_the_live_display_fits_80_columns_with_long_names_and_big_numbers(project):
    run = staged_run(project, alias="a_very_long_model_alias_for_the_first_stage",
                     stage="classify_the_sentiment_of_each_review")
    run.report.lines_read, run.input_bytes, run.bytes_read = 12_345_678, 10**10, 10**9
    counts(run, "classify_the_sentiment_of_each_review", 9_876_543, known=12_345_678,
           first_start=run.started - 3000)
    counts(run, "keep", 9_876_543, out=4_000_000)
    counts(run, "reply", 3_999_000, known=4_000_000, first_start=run.started - 2999)
    client = run.clients["a_very_long_model_alias_for_the_first_stage"]
    client.pool.endpoints[0].down = True
    client.pool.all_down_since = time.monotonic() - 3725
    client.requests, client.throttled, client.faults = 10**7, 123_456, 54_321
    lines = render(run)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    shown = "\n".join(lines)
    for cell in ("run ETA", "outage: every endpoint down 1h02m", "a_very_long_m…", "in flight",
                 "m2", "limited by"):
        assert cell in shown, shown


def test_log_lines_carry_the_limiting_factor_and_the_run_eta(project, sim_server):
    """A real server that announces 3,000 rpm: the run is paced to it, and says so."""
    server = sim_server("--rpm", "3000")
    write_jsonl(project / "d.jsonl", [{"text": f"great, review {i}"} for i in range(200)])
    (project / "p.yaml").write_text(
        "name: t\ninput: d.jsonl\nshard_size: 50\nmodels:\n"
        f"  m: {{provider: openai, model: sim-small, base_url: \"{server.url}/v1\"}}\n"
        "stages:\n  - name: s\n    model: m\n    prompt: 'sentiment: {{ text }}'\n"
        "  - name: keep\n    filter: \"'great' in text\"\n")
    result = chunbot("run", str(project / "p.yaml"), "--log-format", "json", cwd=project,
                     env={"CHUNBOT_LOG_INTERVAL": "0.5"})
    assert result.returncode == 0, result.stderr.decode()
    events = [json.loads(line) for line in result.stderr.decode().splitlines()]
    models = [e for e in events if e["event"] == "model"]
    assert sum(e["limited_by"] == "paced: 3,000 rpm announced" for e in models) >= 3, models
    inputs = [e for e in events if e["event"] == "input"]
    assert inputs and all("eta_s" in e for e in inputs)
    middle = [e for e in inputs if e["eta_s"]]
    assert middle and all(e["eta_s"] < 10 for e in middle)  # 200 requests at 49/s: ~4 s
    states = {e["state"] for e in events if e["event"] == "progress"}
    assert states <= {"running", "waiting for input", "waiting for upstream", "done"}
    text = chunbot("run", str(project / "p.yaml"), "-q", cwd=project)
    assert text.returncode == 0, text.stderr.decode()
