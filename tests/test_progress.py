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
