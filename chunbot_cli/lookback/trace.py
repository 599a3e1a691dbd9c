"""`chunbot trace`: one record's way through every stage of a run.

The first stage's id index (store.Workdir.shards_holding) says which shard holds the
record, so only that shard's files are read, whatever the size of the run. In each stage
the record is found in the part file (it went on), the trace (the exact request and reply
of an LLM stage), or errors.jsonl (it failed); found in none of them, it was filtered out
or dropped there, or never got that far.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..config import Pipeline
from ..store import Workdir


def find(pipeline: Pipeline, record_id: str) -> dict[str, Any] | None:
    """{"id", "shard", "input", "stages": [{"stage", "kind", "status", …}]}, or None."""
    workdir = Workdir(pipeline.workdir, pipeline.compress)
    first = pipeline.stages[0].name
    for candidate in _parents(record_id):
        for shard in workdir.shards_holding(first, candidate):
            found = _follow(pipeline, workdir, shard, record_id)
            if found is not None:
                return found
    return None


def _parents(record_id: str) -> list[str]:
    """The id, then the ids of the records it fanned out of ('r1-0-2' → 'r1-0', 'r1')."""
    ids = [record_id]
    while re.search(r"-\d+$", ids[-1]):
        ids.append(ids[-1].rsplit("-", 1)[0])
    return ids


def _follow(pipeline: Pipeline, workdir: Workdir, shard: int,
            record_id: str) -> dict[str, Any] | None:
    steps: list[dict[str, Any]] = []
    entered: dict[str, Any] | None = None
    alive = True
    for stage in pipeline.stages:
        step: dict[str, Any] = {"stage": stage.name, "kind": stage.kind}
        steps.append(step)
        if not alive:
            step["status"] = "not reached"
            continue
        record = _find_line(workdir.part_path(stage.name, shard), record_id, workdir)
        trace = (_find_line(workdir.find_trace(stage.name, shard), record_id, workdir)
                 if stage.kind == "llm" else None)
        error = _find_error(workdir, stage.name, shard, record_id)
        if trace is not None:
            step["trace"] = trace
        if record is not None:
            step["status"] = "ok"
            step["record"] = record
            if stage.kind == "llm":
                step["output"] = record.get(stage.output or stage.name)
        elif error is not None:
            step["status"] = "failed"
            step["error"] = error.get("error")
            record = error.get("record")
            alive = False
        elif stage.kind == "filter" and entered is not None:
            step["status"] = "filtered out"
            step["why"] = f"filter {stage.filter!r} was false"
            alive = False
        elif stage.kind == "python" and entered is not None:
            step["status"] = "dropped"
            step["why"] = f"{stage.python} returned None"
            alive = False
        else:
            step["status"] = "not found"  # not run yet for this shard, or another id
            alive = False
        if entered is None:
            entered = record
    if entered is None:
        return None
    added = {s.output or s.name for s in pipeline.stages if s.kind == "llm"}
    return {"id": record_id, "shard": shard,
            "input": {k: v for k, v in entered.items() if k not in added},
            "stages": steps}


def _find_line(path: Any, record_id: str, workdir: Workdir) -> dict[str, Any] | None:
    try:
        data = workdir.read_bytes(path)
    except FileNotFoundError:
        return None
    for needle in _needles(record_id):
        start = data.find(needle)
        while start >= 0:
            line_start = data.rfind(b"\n", 0, start) + 1
            line_end = data.find(b"\n", start)
            line = orjson.loads(data[line_start: line_end if line_end >= 0 else None])
            if str(line.get("_id")) == record_id:
                return line
            start = data.find(needle, start + 1)
    return None


def _find_error(workdir: Workdir, stage: str, shard: int,
                record_id: str) -> dict[str, Any] | None:
    try:
        data = workdir.errors_path(stage).read_bytes()
    except FileNotFoundError:
        return None
    for line in data.splitlines():
        if any(n in line for n in _needles(record_id)):
            error = orjson.loads(line)
            if str(error.get("_id")) == record_id and error.get("shard") == shard:
                return error
    return None


def _needles(record_id: str) -> list[bytes]:
    """How the id appears in orjson's output: as a string, or as a number."""
    needles = [b'"_id":' + orjson.dumps(record_id)]
    if re.fullmatch(r"-?\d+", record_id):
        needles.append(b'"_id":' + record_id.encode())
    return needles


def show(found: dict[str, Any]) -> None:
    """Rich panels on a terminal: the input, then one panel per stage."""
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.pretty import Pretty

    console = Console()
    console.print(Panel(Pretty(found["input"]), title=f"{found['id']} as it entered "
                                                      f"(shard {found['shard']})"))
    colours = {"ok": "green", "failed": "red", "filtered out": "yellow", "dropped": "yellow"}
    for step in found["stages"]:
        lines: list[Any] = []
        trace = step.get("trace") or {}
        for message in (trace.get("request") or {}).get("messages", []):
            lines.append(f"[bold]{message['role']}:[/] {escape(str(message['content']))}")
        if trace.get("route"):
            lines.append(f"[bold]route:[/] {escape(str(trace['route']))}")
        for refusal in trace.get("refused") or ():  # replies a check refused, in order
            lines.append(f"[yellow]refused[/] ({refusal.get('model')}): "
                         f"{escape(str(refusal.get('reply')))} — {escape(str(refusal.get('why')))}")
        if trace.get("escalations") or trace.get("reasks"):
            lines.append(f"re-asks {trace.get('reasks', 0)}; escalations: "
                         f"{', '.join(trace.get('escalations') or ()) or 'none'}")
        if "response" in trace:
            lines.append(f"[bold]reply[/] ({trace.get('model')} → {trace.get('model_name')}, "
                         f"{trace.get('endpoint') or ''} {trace.get('latency_ms', 0):.0f} ms, "
                         f"tokens {trace.get('tokens')}"
                         f"{', from the local cache' if trace.get('cache_hit') else ''}): "
                         f"{escape(str(trace['response']))}")
        for attempt in trace.get("attempts", []):
            if attempt.get("error"):
                lines.append(f"[red]attempt failed[/] at {attempt.get('endpoint')}: "
                             f"{escape(attempt['error'])}")
        if step["status"] == "ok" and step["kind"] == "llm":
            lines.append(f"[bold]output:[/] {escape(repr(step.get('output')))}")
        if step.get("error") or step.get("why"):
            lines.append(escape(step.get("error") or step["why"]))
        colour = colours.get(step["status"], "dim")
        console.print(Panel("\n".join(str(line) for line in lines) or step["status"],
                            title=f"{step['stage']} ({step['kind']}): "
                                  f"[{colour}]{step['status']}[/]", border_style=colour))
