"""What a run shows while it works and when it ends, on stderr (stdout stays for data).

On a TTY: a live rich table, one row per stage. Otherwise, or with --quiet: a plain log
line per stage every `interval` seconds, as text or as JSON objects for log shippers.
Both end with a summary of records, failures, tokens and seconds per stage.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from .engine import Run, RunReport


def make_progress(quiet: bool = False, log_format: str = "text",
                  stream: TextIO | None = None) -> "RichProgress | LogProgress":
    stream = stream or sys.stderr
    if log_format == "json":
        return LogProgress(stream, as_json=True)
    if quiet or not stream.isatty():
        return LogProgress(stream, as_json=False)
    from rich.console import Console  # rich costs ~50 ms to import: only for terminals

    return RichProgress(Console(file=stream))


def stage_rows(run: "Run") -> list[dict[str, Any]]:
    """One dict per selected stage: its counters in this run, rate and model load."""
    elapsed = max(time.monotonic() - run.started, 1e-9)
    rows = []
    for stage in run.selected:
        report = run.report.stages[stage.name]
        counts = report.counts
        row: dict[str, Any] = {
            "stage": stage.name, "records": counts.records_in, "out": counts.records_out,
            "failed": counts.failed, "filtered": counts.filtered,
            "tokens_in": counts.tokens_in, "tokens_out": counts.tokens_out,
            "rate": round(counts.records_in / elapsed, 1),
            "shards_done": report.shards_run, "shards_skipped": report.shards_skipped,
            "cache_hits": counts.cache_hits, "tokens_cached": counts.tokens_cached,
            "cost": round(counts.cost, 6), "cost_full": round(counts.cost_full, 6),
        }
        if stage.kind == "llm":
            clients = [run.clients[a] for a in stage.models if a in run.clients]
            requests = sum(c.requests for c in clients)
            row["in_flight"] = sum(c.in_flight for c in clients)
            row["limit"] = sum(c.limit for c in clients)
            row["requests"] = requests
            row["req_s"] = round(sum(c.request_rate() for c in clients), 1)
            row["throttled_pct"] = round(100 * sum(c.throttled for c in clients)
                                         / max(requests, 1), 2)
        rows.append(row)
    return rows


def input_line(run: "Run") -> str:
    read = f"{run.report.lines_read:,} lines read"
    if run.input_bytes:
        read = f"{min(100.0, 100 * run.bytes_read / run.input_bytes):.0f}% of input, " + read
    return f"{read}, {time.monotonic() - run.started:.1f}s"


class LogProgress:
    """Periodic plain or JSON log lines."""

    def __init__(self, stream: TextIO, as_json: bool):
        self.stream = stream
        self.as_json = as_json
        self.interval = float(os.environ.get("CHUNBOT_LOG_INTERVAL", "10"))

    def _emit(self, event: str, fields: dict[str, Any], text: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.as_json:
            line = orjson.dumps({"ts": stamp, "event": event, **fields}).decode()
        else:
            line = f"{stamp} {text}"
        print(line, file=self.stream, flush=True)

    def start(self, run: "Run") -> None:
        self._emit("start", {"pipeline": run.pipeline.name,
                             "stages": [s.name for s in run.selected]},
                   f"run {run.pipeline.name}: stages {', '.join(s.name for s in run.selected)}")

    def update(self, run: "Run") -> None:
        for row in stage_rows(run):
            text = (f"{row['stage']}: {row['records']:,} records ({row['rate']:,.0f}/s), "
                    f"{row['out']:,} out, {row['failed']:,} failed, "
                    f"{row['tokens_in'] + row['tokens_out']:,} tokens")
            if "limit" in row:
                text += (f", {row['req_s']:,.0f} req/s, {row['in_flight']} in flight "
                         f"(limit {row['limit']}), {row['throttled_pct']:g}% 429s")
            self._emit("progress", row, text)
        self._emit("input", {"lines_read": run.report.lines_read}, input_line(run))

    def message(self, text: str) -> None:
        self._emit("note", {"message": text}, text)

    def finish(self, run: "Run", report: "RunReport") -> None:
        rows = stage_rows(run)
        if self.as_json:
            self._emit("summary", {"stages": rows, "seconds": round(report.seconds, 3),
                                   "failed_total": report.failed_total,
                                   "cache_hits": report.cache_hits,
                                   "cache_misses": report.cache_misses,
                                   "exit_code": report.exit_code}, "")
            return
        print(summary_text(rows, report), file=self.stream, flush=True)


class RichProgress:
    """A live table on a terminal."""

    interval = 0.25

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None

    def _render(self, run: "Run") -> Group:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold")
        for column in ("stage", "records", "rec/s", "out", "failed", "tokens", "req/s",
                       "in flight/limit", "429s"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for row in stage_rows(run):
            llm = "limit" in row
            table.add_row(row["stage"], f"{row['records']:,}", f"{row['rate']:,.0f}",
                          f"{row['out']:,}", _red(row["failed"]),
                          f"{row['tokens_in'] + row['tokens_out']:,}",
                          f"{row['req_s']:,.0f}" if llm else "",
                          f"{row['in_flight']}/{row['limit']}" if llm else "",
                          f"{row['throttled_pct']:g}%" if llm else "")
        return Group(Text(input_line(run), style="dim"), table)

    def start(self, run: "Run") -> None:
        from rich.live import Live

        self.live = Live(self._render(run), console=self.console, auto_refresh=False,
                         transient=True)
        self.live.start()

    def update(self, run: "Run") -> None:
        if self.live:
            self.live.update(self._render(run), refresh=True)

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]•[/] {text}")

    def finish(self, run: "Run", report: "RunReport") -> None:
        if self.live:
            self.live.stop()
        self.console.print(summary_table(stage_rows(run), report))


def _red(count: int) -> Text:
    from rich.text import Text

    return Text(f"{count:,}", style="red" if count else "")


def _summary_cells(rows: list[dict[str, Any]], report: "RunReport") -> list[list[str]]:
    cells = []
    for row in rows:
        seconds = report.stages[row["stage"]].seconds
        cells.append([row["stage"], f"{row['records']:,}", f"{row['out']:,}",
                      f"{row['failed']:,}", f"{row['filtered']:,}",
                      f"{row['tokens_in']:,}", f"{row['tokens_out']:,}", f"{seconds:.1f}",
                      f"{row['shards_skipped']:,}"])
    return cells


SUMMARY_COLUMNS = ("stage", "records", "out", "failed", "filtered", "tok in", "tok out",
                   "secs", "fresh")


def _summary_footer(rows: list[dict[str, Any]], report: "RunReport") -> str:
    lines = []
    asked = report.cache_hits + report.cache_misses
    if asked:
        lines.append(f"local cache: {report.cache_hits:,} of {asked:,} requests answered "
                     f"({100 * report.cache_hits / asked:.0f}%)")
    cached = sum(row["tokens_cached"] for row in rows)
    if cached:
        tokens_in = sum(row["tokens_in"] for row in rows)
        lines.append(f"provider prompt cache: {cached:,} of {tokens_in:,} input tokens "
                     f"({100 * cached / max(tokens_in, 1):.0f}%)")
    cost, full = sum(row["cost"] for row in rows), sum(row["cost_full"] for row in rows)
    if full:
        lines.append(f"cost ${cost:,.4f}; without caches ${full:,.4f} "
                     f"(saved ${full - cost:,.4f})")
    lines += [f"error: {error}" for error in report.errors]
    footer = f"{report.seconds:.1f}s, exit {report.exit_code}"
    if report.failed_total:
        footer += (f"; {report.failed_total:,} failed records in total, "
                   "see each stage's errors.jsonl")
    return "\n".join(lines + [footer])


def summary_table(rows: list[dict[str, Any]], report: "RunReport") -> Group:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rich import box

    table = Table(title="run summary", header_style="bold", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="left" if column == "stage" else "right",
                         no_wrap=True)
    for cells in _summary_cells(rows, report):
        table.add_row(*cells)
    return Group(table, Text(_summary_footer(rows, report)))


def summary_text(rows: list[dict[str, Any]], report: "RunReport") -> str:
    grid = [list(SUMMARY_COLUMNS)] + _summary_cells(rows, report)
    widths = [max(len(row[i]) for row in grid) for i in range(len(SUMMARY_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in grid]
    return "\n".join(lines + [_summary_footer(rows, report)])
