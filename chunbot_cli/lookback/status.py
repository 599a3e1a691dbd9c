"""`chunbot status`: where a pipeline's workdir stands, from state.json and the journals.

Per stage: fresh or stale and why (which keys of its definition changed, or that an
upstream stage was recomputed), shards done, records ok / failed / filtered, tokens,
cost, local cache hits; what the journals of shards a stopped run left hold (records,
tokens, cost: uncommitted, taken up by the next run); whether `output:` is fresh; and the
last run's start, end and exit code. Of the data files it stats the parts and reads only
those journals, so it is instant on any size of run.
"""

from __future__ import annotations

from typing import Any

from ..config import Pipeline
from ..plan import why_stale
from ..progress import model_lines
from ..state import StageState, State
from ..store import Workdir


def status(pipeline: Pipeline) -> dict[str, Any]:
    workdir = Workdir(pipeline.workdir, pipeline.compress)
    state = workdir.load_state()
    total = state.input_shards
    stages = []
    upstream: StageState | None = None
    upstream_stale = False
    for stage in pipeline.stages:
        saved = state.stages.get(stage.name)
        row: dict[str, Any] = {"stage": stage.name, "kind": stage.kind,
                               "shards_total": total}
        journaled, open_shards = workdir.journaled(stage.name, stage.fingerprint, state)
        if open_shards:  # finished by a run that stopped: not in the committed counts
            row["uncommitted"] = {"shards": open_shards, **journaled.to_json()}
        if saved is None:
            row.update(state="not run", why="never run", shards_done=0)
            stages.append(row)
            upstream, upstream_stale = None, True
            continue
        shards = saved.shards
        row["shards_done"] = len(shards)
        row.update(saved.totals().to_json())
        row["cost"], row["cost_full"] = round(row["cost"], 6), round(row["cost_full"], 6)
        missing = sum(1 for k, entry in shards.items()
                      if workdir.part_damage(stage.name, k, entry) is not None)
        why = why_stale(stage, saved, upstream, upstream_stale, missing)
        if why is None and total is not None and len(shards) < total:
            why = f"{total - len(shards)} of {total} shards not done"
        if why is None and total is None:
            row.update(state="incomplete", why=f"{len(shards)} shards done; the input has "
                       "not been read through yet (run again to go on)")
        else:
            row.update(state="stale" if why else "fresh", why=why or "")
        stages.append(row)
        upstream, upstream_stale = saved, why is not None
    return {"pipeline": pipeline.name, "workdir": str(pipeline.workdir), "stages": stages,
            "output": _output(pipeline, state, stages[-1]), "last_run": state.last_run or None}


def _output(pipeline: Pipeline, state: State, last: dict[str, Any]) -> dict[str, Any] | None:
    """Whether `output:` holds what the last stage's shards do (state.json's export)."""
    if pipeline.output is None:
        return None
    path = str(pipeline.output)
    saved = state.stages.get(pipeline.stages[-1].name)
    if state.export is not None and saved is not None \
            and state.export.holds(path, saved.shards):
        return {"path": path, "state": "fresh", "records": state.export.records}
    why = ("not written yet" if not pipeline.output.exists() else
           "it does not hold what the last stage's shards do (changed since it was written, "
           "or its export was cut short)")
    if last["state"] == "fresh":
        why += ": the next run writes it"
    return {"path": path, "state": "stale", "why": why}


def render(report: dict[str, Any]) -> str:
    """A plain-text table for a terminal or a log."""
    header = ("stage", "state", "shards", "records", "ok", "failed", "filtered", "tok in",
              "tok out", "cached", "hits", "cost")
    rows = [header]
    for row in report["stages"]:
        total = row["shards_total"]
        shards = f"{row['shards_done']}/{total}" if total is not None else str(row["shards_done"])
        if row["state"] == "not run":
            rows.append((row["stage"], "not run", shards) + ("",) * 9)
            continue
        hits = (f"{100 * row['cache_hits'] / row['in']:.0f}%"
                if row["kind"] == "llm" and row["in"] else "")
        cost = f"${row['cost']:,.4f}" if row["cost_full"] else ""
        rows.append((row["stage"], row["state"], shards, f"{row['in']:,}", f"{row['out']:,}",
                     f"{row['failed']:,}", f"{row['filtered']:,}", f"{row['tokens_in']:,}",
                     f"{row['tokens_out']:,}", f"{row['tokens_cached']:,}", hits, cost))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    for row in report["stages"]:
        lines += model_lines(row["stage"], row.get("models") or {}, row.get("escalations") or {})
    for row in report["stages"]:
        if row["state"] != "fresh":
            lines.append(f"{row['stage']}: {row['state']}: {row['why']}")
        if row.get("uncommitted"):
            lines.append(_uncommitted(row["stage"], row["uncommitted"]))
    for row in report.get("batches", []):
        counts = ", ".join(f"{k} {v}" for k, v in (row.get("counts") or {}).items())
        lines.append(f"batch {row['batch']} ({row['stage']}, shard {row['shard']}): "
                     f"{row['status']}" + (f"; {counts}" if counts else ""))
    output = report.get("output")
    if output:
        lines.append(f"output {output['path']}: " + (
            f"fresh, {output['records']:,} records" if output["state"] == "fresh"
            else f"stale: {output['why']}"))
    last = report.get("last_run")
    if last:
        lines.append(f"last run: started {last.get('started')}, ended {last.get('ended', '-')}, "
                     f"exit {last.get('exit_code', '-')}")
    else:
        lines.append("no run yet")
    return "\n".join(lines)


def _uncommitted(stage: str, counts: dict[str, Any]) -> str:
    """A stage's records in the journals of shards not committed yet, in one line."""
    cost = f", ${counts['cost']:,.4f}" if counts["cost"] else ""
    return (f"{stage}: uncommitted: {counts['in']:,} records ({counts['out']:,} ok, "
            f"{counts['failed']:,} failed; tokens {counts['tokens_in']:,} in, "
            f"{counts['tokens_out']:,} out{cost}) in the journals of {counts['shards']:,} "
            "shard(s) a stopped run left: the next run goes on from them")
