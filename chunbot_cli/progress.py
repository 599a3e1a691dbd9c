"""What a run shows while it works and when it ends, on stderr (stdout stays for data).

On a TTY: a live rich table, one row per stage. Otherwise, or with --quiet: a plain log
line per stage every `interval` seconds, as text or as JSON objects for log shippers.
Both end with a summary of records, failures, tokens and seconds per stage.
"""

from __future__ import annotations

import dataclasses
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

    from .engine import Run, RunReport, StageFailures


def make_progress(quiet: bool = False, log_format: str = "text",
                  stream: TextIO | None = None) -> "RichProgress | LogProgress":
    stream = stream or sys.stderr
    if log_format == "json":
        return LogProgress(stream, as_json=True)
    if quiet or not stream.isatty():
        return LogProgress(stream, as_json=False)
    from rich.console import Console  # rich costs ~50 ms to import: only for terminals

    return RichProgress(Console(file=stream))


def input_total(run: "Run") -> int | None:
    """Input lines in all: exact once read through, else estimated from the share of the
    input's bytes read so far (plain files); None when that cannot be known (stdin, .zst)."""
    lines = run.report.lines_read
    if run.read_through:
        return lines
    if not run.input_bytes or not run.bytes_read:
        return None
    return max(lines, round(lines * run.input_bytes / run.bytes_read))


def stage_rows(run: "Run") -> list[dict[str, Any]]:
    """One dict per selected stage: records done of those known (and of the estimated
    total), rate, ETA, failures, tokens and cost — in this run, plus the shards that were
    already done."""
    elapsed = max(time.monotonic() - run.started, 1e-9)
    total_lines = input_total(run)
    rows = []
    for stage in run.selected:
        report = run.report.stages[stage.name]
        counts = report.counts
        done = counts.records_in + report.fresh_records
        known = max(done, report.known + report.fresh_records)
        row: dict[str, Any] = {
            "stage": stage.name, "done": done, "known": known,
            "records": counts.records_in, "out": counts.records_out,
            "failed": counts.failed, "filtered": counts.filtered,
            "tokens_in": counts.tokens_in, "tokens_out": counts.tokens_out,
            "rate": round(counts.records_in / elapsed, 1),
            "shards_done": report.shards_run, "shards_skipped": report.shards_skipped,
            "cache_hits": counts.cache_hits, "tokens_cached": counts.tokens_cached,
            "cost": round(counts.cost, 6), "cost_full": round(counts.cost_full, 6),
            "total": None, "pct": None, "eta_s": None,
        }
        counted = counts.to_json()
        for key in ("models", "escalations"):  # per model, when the stage mixes them
            if key in counted:
                row[key] = counted[key]
        lines = run.report.lines_read
        if total_lines and lines:
            # what reached this stage per input line so far, over the whole input
            total = max(known, round(known / lines * total_lines)) if lines else known
            row["total"] = total
            row["pct"] = round(100 * done / total, 1) if total else 100.0
            if not run.read_through or done < known:  # an estimate: not done before it is
                row["pct"] = min(row["pct"], 99.9)
            if counts.records_in and total > done:
                row["eta_s"] = round((total - done) / (counts.records_in / elapsed), 1)
            elif total <= done:
                row["eta_s"] = 0.0
        rows.append(row)
    return rows


def model_rows(run: "Run") -> list[dict[str, Any]]:
    """One dict per model alias in use: request rate, in flight against the limit, and
    the shares of 429s and server faults (a slow-down shows its cause)."""
    rows = []
    for alias, client in run.clients.items():
        sent = max(client.requests, 1)
        rows.append({"model": alias, "requests": client.requests,
                     "req_s": round(client.request_rate(), 1), "in_flight": client.in_flight,
                     "limit": client.limit, "throttled_pct": round(100 * client.throttled / sent, 2),
                     "faults_pct": round(100 * client.faults / sent, 2)})
    return rows


def input_line(run: "Run", rows: list[dict[str, Any]]) -> str:
    """The input read so far, the time, and the ETA of the slowest stage in `rows`."""
    total, lines = input_total(run), run.report.lines_read
    if run.read_through:
        read = f"input {lines:,} lines, all read"
    elif total:
        read = f"input {lines:,} of ~{total:,} lines read"
    else:
        read = f"input {lines:,} lines read so far"
    eta = [row["eta_s"] for row in rows]
    text = f"{read} · {time.monotonic() - run.started:.1f}s"
    if eta and all(e is not None for e in eta):
        text += f" · ETA {_duration(max(eta))}"
    return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def stage_text(row: dict[str, Any]) -> str:
    text = f"{row['stage']}: {row['done']:,}/{row['known']:,}"
    if row["pct"] is not None:
        text += f" ({row['pct']:.0f}% of ~{row['total']:,})"
    text += f", {row['rate']:,.0f} rec/s"
    if row["eta_s"] is not None:
        text += f", ETA {_duration(row['eta_s'])}"
    text += f", {row['failed']:,} failed"
    if row["cost_full"]:
        text += f", ${row['cost']:,.4f}"
    return text


def model_text(row: dict[str, Any]) -> str:
    return (f"model {row['model']}: {row['req_s']:,.0f} req/s, {row['in_flight']}/"
            f"{row['limit']} in flight, 429s {row['throttled_pct']:g}%, "
            f"5xx {row['faults_pct']:g}%")


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
        rows = stage_rows(run)
        self._emit("input", {"lines_read": run.report.lines_read, "lines_total":
                             input_total(run), "read_through": run.read_through},
                   input_line(run, rows))
        for row in rows:
            self._emit("progress", row, stage_text(row))
        for row in model_rows(run):
            self._emit("model", row, model_text(row))

    def message(self, text: str) -> None:
        self._emit("note", {"message": text}, text)

    def finish(self, run: "Run", report: "RunReport") -> None:
        rows = stage_rows(run)
        if self.as_json:
            self._emit("summary", {"stages": rows, "models": model_rows(run),
                                   "seconds": round(report.seconds, 3),
                                   "failed_total": report.failed_total,
                                   "failures": [dataclasses.asdict(f) for f in report.failures],
                                   "errors": report.errors,
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

        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("stage", "done/known", "%", "rec/s", "ETA", "failed", "cost"):
            table.add_column(column, justify="left" if column == "stage" else "right",
                             no_wrap=True, max_width=18 if column == "stage" else None)
        rows = stage_rows(run)
        for row in rows:
            table.add_row(row["stage"], f"{_compact(row['done'])}/{_compact(row['known'])}",
                          f"{row['pct']:.0f}%" if row["pct"] is not None else "",
                          f"{row['rate']:,.0f}",
                          _duration(row["eta_s"]) if row["eta_s"] is not None else "",
                          _red(row["failed"]),
                          _money(row["cost"]) if row["cost_full"] else "")
        models = [Text(model_text(row), style="dim") for row in model_rows(run)]
        return Group(Text(input_line(run, rows), style="dim"), table, *models)

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


def _compact(count: int) -> str:
    """A count that fits a narrow column: 123,456, then 1.23M, 4.56G."""
    if count < 1_000_000:
        return f"{count:,}"
    if count < 1_000_000_000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e9:.2f}G"


def _money(usd: float) -> str:
    return f"${usd:,.4f}" if usd < 100 else f"${usd:,.0f}"


def _red(count: int) -> Text:
    from rich.text import Text

    return Text(_compact(count), style="red" if count else "")


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
    for row in rows:
        lines += model_lines(row["stage"], row.get("models") or {}, row.get("escalations") or {})
    for failures in report.failures:
        lines += failure_lines(failures)
    lines += [f"error: {error}" for error in report.errors]
    footer = f"{report.seconds:.1f}s, exit {report.exit_code}"
    if report.failed_total:
        footer += f"; {report.failed_total:,} failed records in total"
    return "\n".join(lines + [footer])


def model_lines(stage: str, models: dict[str, dict[str, Any]],
                escalations: dict[str, int]) -> list[str]:
    """Per model of a stage that mixes them: what each answered, asked and cost."""
    if len(models) < 2 and not escalations and not any(m.get("reasks") for m in models.values()):
        return []  # one model did it all: the stage's row says it
    lines = [f"{stage}: model {alias}: {m['answered']:,} answered, {m['requests']:,} requests "
             f"({m['reasks']:,} re-asks), {m['tokens_in']:,} / {m['tokens_out']:,} tokens"
             + (f", ${m['cost']:,.4f}" if m["cost"] else "") for alias, m in models.items()]
    if escalations:
        lines.append(f"{stage}: escalations: " + ", ".join(f"{pair} {count:,}"
                                                           for pair, count in escalations.items()))
    return lines


def failure_lines(failures: "StageFailures") -> list[str]:
    """Why a stage's records failed, where they are, and what to do next."""
    where = f", in {failures.errors_file}" if failures.errors_file else ""
    lines = [f"{failures.stage}: {failures.failed:,} failed{where}"
             + (f" (reasons from its first {failures.scanned:,} lines)"
                if failures.scanned < failures.failed else "")]
    width = max((len(f"{count:,}") for _, count in failures.reasons), default=0)
    lines += [f"  {count:>{width},}  {reason}" for reason, count in failures.reasons]
    if failures.rerun:
        lines.append(f"  next: {failures.rerun}")
    return lines


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
