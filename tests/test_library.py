"""library.py: a notebook's way in — dicts in, dicts out, nothing on disk."""

from __future__ import annotations

import asyncio

import pytest

import chunbot_cli as chunbot

PIPELINE = {
    "name": "notebook",
    "workdir": "runs/notebook",
    "models": {"small": {"provider": "sim", "model": "sim-small", "latency_ms": 5}},
    "stages": [
        {"name": "sentiment", "model": "small", "prompt": "Label the sentiment of: {{ text }}"},
        {"name": "negatives", "filter": "sentiment == 'negative'"},
        {"name": "reply", "model": "small", "prompt": "Write an apology for: {{ text }}"},
    ],
}

ROWS = [{"id": "a", "text": "great, I love it"}, {"id": "b", "text": "it broke, terrible"},
        {"id": "c", "title": "no text"}, {"id": "d", "text": "awful, broke at once"}]


def test_run_records_gives_the_last_stage_in_input_order(project):
    errors, traces = [], []
    out = chunbot.run_records(PIPELINE, ROWS, errors=errors, traces=traces)
    assert [r["id"] for r in out] == ["b", "d"]
    assert all(r["sentiment"] == "negative" and r["reply"] for r in out)
    assert [(e["_id"], e["stage"]) for e in errors] == [("c", "sentiment")]
    assert "text" in errors[0]["error"]
    assert {(t["stage"], t["_id"]) for t in traces} >= {("sentiment", "a"), ("reply", "d")}
    reply = next(t for t in traces if t["stage"] == "reply" and t["_id"] == "b")
    assert reply["request"]["messages"][0]["content"].startswith("Write an apology")
    assert not (project / "runs").exists()
    assert ROWS[0] == {"id": "a", "text": "great, I love it"}  # the caller's rows untouched


def test_stream_yields_records_as_they_finish_and_stops_when_asked(project):
    rows = [{"text": f"it broke, terrible #{i}"} for i in range(200)]
    seen = []
    for record in chunbot.stream(PIPELINE, rows, until="sentiment"):
        seen.append(record)
        if len(seen) == 5:
            break
    assert len(seen) == 5 and all(r["sentiment"] == "negative" for r in seen)
    assert len(list(chunbot.stream(PIPELINE, rows, until="negatives"))) == 200


def test_astream_in_a_running_loop(project):
    async def main():
        return [r async for r in chunbot.astream(PIPELINE, ROWS, until="sentiment",
                                                 order="input")]

    assert [r["id"] for r in asyncio.run(main())] == ["a", "b", "d"]


def test_a_bad_pipeline_is_raised_before_anything_runs(project):
    with pytest.raises(chunbot.ConfigError, match="model"):
        chunbot.run_records({**PIPELINE, "stages": [{"name": "s", "prompt": "{{ text }}",
                                                     "model": "nope"}]}, ROWS)
