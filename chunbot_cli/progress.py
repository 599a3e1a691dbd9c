"""What a run shows while it works and when it ends, on stderr (stdout stays for data).

On a TTY: a live rich table, one row per stage. Otherwise, or with --quiet: a plain log
line per stage every `interval` seconds, as text or as JSON objects for log shippers.
Both end with a summary of records, failures, tokens and seconds per stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import weakref
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

import orjson

if TYPE_CHECKING:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
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


WINDOW_S = 10.0  # rates are over about the last this many seconds: a pace that changed
# (a 429 storm over, a stage that waited and now flows) shows within that, not diluted
# in the average since the start
ETA_CAP = 2.0  # an ETA is at most this many times what the stage's rate since it began
# gives: a stall inside the window (a pause, an outage) at most doubles it, never ∞
FAULTY = 0.05  # a share of server faults lately that slows a model (its retries)


class Tracker:
    """What the display remembers between two looks at a run, to tell what happens
    lately where the counters only say what happened since the start: per stage and per
    model some (time, counts) samples over the last WINDOW_S. A tuple a look each, taken
    when the display draws: nothing per request."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[tuple[float, tuple[int, ...]]]] = {}

    def lately(self, key: str, now: float, values: tuple[int, ...],
               start: float) -> tuple[float, tuple[int, ...]]:
        """Over how many seconds lately, and by how much, each of `values` grew (from zero
        at `start` while the window holds no older look)."""
        samples = self.samples.get(key)
        if samples is None:
            samples = self.samples[key] = deque([(start, (0,) * len(values))])
        samples.append((now, values))
        while len(samples) > 2 and samples[1][0] <= now - WINDOW_S:
            samples.popleft()
        then, before = samples[0]
        return now - then, tuple(v - b for v, b in zip(values, before))


_trackers: "weakref.WeakKeyDictionary[Any, Tracker]" = weakref.WeakKeyDictionary()


def tracker(run: "Run") -> Tracker:
    """The run's Tracker: every display of one run shares what it has seen."""
    try:
        return _trackers.setdefault(run, Tracker())
    except TypeError:  # a stand-in that cannot be weakly referenced: no memory
        return Tracker()


def stage_rows(run: "Run") -> list[dict[str, Any]]:
    """One dict per selected stage: records done of those known (and of the estimated
    total), the recent rate, what it waits for (`state`), the seconds until it is done
    (`eta_s`, its upstream's work included), failures, tokens and cost — in this run,
    plus the shards that were already done."""
    now, seen = time.monotonic(), tracker(run)
    rows: list[dict[str, Any]] = []
    pace = 0.0  # the rate of the nearest stage upstream that has one
    for stage in run.selected:
        report = run.report.stages[stage.name]
        upstream = rows[-1] if rows else None
        row = _counted(stage.name, report)
        row["kind"] = stage.kind
        row["total"] = _first_total(run, row) if upstream is None else _coming(row, upstream)
        pace = _pace(row, upstream, run.read_through, report.first_start or now, seen, now,
                     pace)
        rows.append(row)
    return rows


def _counted(name: str, report: Any) -> dict[str, Any]:
    counts = report.counts
    done = counts.records_in + report.fresh_records
    row: dict[str, Any] = {
        "stage": name, "done": done, "known": max(done, report.known + report.fresh_records),
        "records": counts.records_in, "out": counts.records_out,
        "failed": counts.failed, "filtered": counts.filtered,
        "tokens_in": counts.tokens_in, "tokens_out": counts.tokens_out,
        "shards_done": report.shards_run, "shards_skipped": report.shards_skipped,
        "cache_hits": counts.cache_hits, "tokens_cached": counts.tokens_cached,
        "cost": round(counts.cost, 6), "cost_full": round(counts.cost_full, 6),
        "resumed": report.resumed.records_in, "resumed_cost": round(report.resumed.cost, 6),
        "resumed_cost_full": round(report.resumed.cost_full, 6),
        "resumed_cache_hits": report.resumed.cache_hits,
        "total": None, "pct": None, "eta_s": None,
    }
    counted = counts.to_json()
    for key in ("models", "escalations"):  # per model, when the stage mixes them
        if key in counted:
            row[key] = counted[key]
    return row


def _first_total(run: "Run", row: dict[str, Any]) -> int | None:
    """The first stage's records in all: what reached it per input line so far, over the
    whole input."""
    total_lines, lines = input_total(run), run.report.lines_read
    if not total_lines or not lines:
        return None
    return max(row["known"], round(row["known"] / lines * total_lines))


def _coming(row: dict[str, Any], upstream: dict[str, Any]) -> int | None:
    """A later stage's records in all: those it has, and the share of what its upstream
    has still to do that it passed so far (a filter passes a share; all, before any)."""
    if upstream["total"] is None:
        return None
    share = upstream["out"] / upstream["records"] if upstream["records"] else 1.0
    return row["known"] + round(max(0, upstream["total"] - upstream["done"]) * share)


def _pace(row: dict[str, Any], upstream: dict[str, Any] | None, read_through: bool,
          start: float, seen: Tracker, now: float, pace: float) -> float:
    """The stage's state, recent rate, share done and ETA; returns the rate for the
    stages after it to go by until they have their own: its own, else `pace`."""
    fed_all = read_through if upstream is None else upstream["state"] == "done"
    if row["done"] < row["known"]:
        row["state"] = "running"
    elif fed_all:
        row["state"] = "done"
    else:  # nothing to do until more records come
        row["state"] = "waiting for input" if upstream is None else "waiting for upstream"
    span, (grown,) = seen.lately("stage " + row["stage"], now, (row["records"],), start)
    rate = grown / span if span > 0 else 0.0
    row["rate"] = round(rate, 1)
    total = row["total"]
    if total is not None:
        row["pct"] = round(100 * row["done"] / total, 1) if total else 100.0
        if row["state"] != "done":  # an estimate: not done before it is
            row["pct"] = min(row["pct"], 99.9)
    row["eta_s"] = _eta(row, upstream, rate, now - start, pace)
    return rate if row["records"] and rate else pace


def _eta(row: dict[str, Any], upstream: dict[str, Any] | None, rate: float,
         ran: float, pace: float) -> float | None:
    """Seconds until the stage is done. Records flow, so it ends no sooner than its
    upstream; its own work is what is left of its total at its recent rate, or its
    upstream's (`pace`) before it has done any. Recent, because the rate since the start lags a
    change of pace: a stage that waited a minute and then flows would show minutes for
    seconds of work. Capped at ETA_CAP times what its rate since it began gives (elapsed
    × left / done), so a pause in the window gives a longer ETA but not an absurd one."""
    if row["state"] == "done":
        return 0.0
    after = upstream["eta_s"] if upstream is not None else 0.0
    if after is None or row["total"] is None:
        return None
    left = max(0, row["total"] - row["done"])
    own = left / rate if rate else math.inf
    if row["records"] and ran > 0:
        own = min(own, ETA_CAP * left * ran / row["records"])
    elif pace:
        own = left / pace
    if not left:
        own = 0.0
    return None if own == math.inf else round(max(after, own), 1)


def run_eta(rows: list[dict[str, Any]]) -> float | None:
    """Seconds until the whole run is done: the last stage's ETA, which counts every
    stage before it."""
    return rows[-1]["eta_s"] if rows else None


def model_rows(run: "Run", stages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One dict per model alias in use: request rate, in flight against the limit, the
    shares of 429s and server faults, and what holds it back now (`limited_by`)."""
    stages = stage_rows(run) if stages is None else stages
    now, seen = time.monotonic(), tracker(run)
    rows = []
    for alias, client in run.clients.items():
        sent = max(client.requests, 1)
        _, lately = seen.lately("model " + alias, now,
                                (client.requests, client.throttled, client.faults), run.started)
        uses = [i for i, s in enumerate(run.selected) if alias in s.models and i < len(stages)]
        rows.append({"model": alias, "requests": client.requests,
                     "req_s": round(client.request_rate(), 1), "in_flight": client.in_flight,
                     "limit": client.limit,
                     "throttled_pct": round(100 * client.throttled / sent, 2),
                     "faults_pct": round(100 * client.faults / sent, 2),
                     "limited_by": limited_by(client, lately, _feeding(stages, uses,
                                                                        run.read_through))})
    return rows


def _feeding(stages: list[dict[str, Any]], uses: list[int], read_through: bool) -> str:
    """What a model that has room for more requests waits for: the most telling state of
    its stages (`uses`, their places in `stages`)."""
    states = set()
    for i in uses:
        state = stages[i]["state"]
        if state == "running":  # it has records, all on the wire: do more come?
            fed_all = read_through if i == 0 else stages[i - 1]["state"] == "done"
            state = "finishing" if fed_all else ("waiting for input" if i == 0
                                                 else "waiting for upstream")
        states.add(state)
    for state in ("waiting for input", "waiting for upstream", "finishing"):
        if state in states:
            return state
    return "idle"


def limited_by(client: Any, lately: tuple[int, int, int], feeding: str) -> str:
    """What holds a model back now, in a few words, from what its client, budgets and
    endpoints know; the first that applies wins, the most specific first. `lately`: its
    requests, 429s and server faults over the recent window; `feeding`: what it waits for
    when none of these does (see _feeding)."""
    pool = client.pool
    if pool.all_down_since is not None:
        return f"outage: every endpoint down {_duration(pool.clock() - pool.all_down_since)}"
    paused = client.paused_until - time.monotonic()
    if paused > 0:  # a 429's pause: its retry-after, or a back-off
        return f"paused {_duration(math.ceil(paused))} (429s)"
    requests, throttled, faults = lately
    if throttled:  # the limiter cut the limit for them, and eases back in
        return "backoff (429s)"
    paced = _paced(client)
    if paced:
        return paced
    if requests and faults / requests >= FAULTY:
        return f"retrying 5xx ({100 * faults / requests:.0f}%)"
    if pool.waiting:  # requests in line for room: the concurrency limit holds them
        if pool.cap:
            return f"max_concurrency {pool.cap}"
        down_count = sum(1 for endpoint in pool.endpoints if endpoint.down)
        return f"adaptive limit {pool.limit}" + (
            f", {down_count}/{len(pool.endpoints)} down" if down_count else "")
    return feeding


def _paced(client: Any) -> str | None:
    """The budget requests sleep for, as "paced: 6,000 rpm announced"; None: neither."""
    behind, unit, limit = max(((client.request_budget.behind, "rpm",
                                client.request_budget.per_minute),
                               (client.token_budget.behind, "tpm",
                                client.token_budget.per_minute)), key=lambda b: b[0])
    if not behind or limit is None:
        return None
    per_minute, source = limit
    figure = f"{per_minute:,.0f}" if per_minute < 1e6 else f"{per_minute / 1e6:.3g}M"
    return f"paced: {figure} {unit} {source}"


def input_line(run: "Run", rows: list[dict[str, Any]]) -> str:
    """The input read so far, the time, and the ETA of the whole run (run_eta)."""
    total, lines = input_total(run), run.report.lines_read
    if run.read_through:
        read = f"input {lines:,} lines, all read"
    elif total:
        read = f"input {lines:,} of ~{total:,} lines read"
    else:
        read = f"input {lines:,} lines read so far"
    elapsed = time.monotonic() - run.started
    text = f"{read} · {elapsed:.1f}s" if elapsed < 60 else f"{read} · {_duration(elapsed)}"
    eta = run_eta(rows)
    if eta is not None:
        text += f" · run ETA {_duration(eta)}"
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
    if row["state"].startswith("waiting"):
        text += f", {row['state']}"
    if row["eta_s"] is not None:
        text += f", ETA {_duration(row['eta_s'])}"
    text += f", {row['failed']:,} failed"
    if row["cost_full"]:
        text += f", ${row['cost']:,.4f}"
    return text


def model_text(row: dict[str, Any]) -> str:
    return (f"model {row['model']}: {row['limited_by']}, {row['req_s']:,.0f} req/s, "
            f"{row['in_flight']}/"
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
                             input_total(run), "read_through": run.read_through,
                             "eta_s": run_eta(rows)},
                   input_line(run, rows))
        for row in rows:
            self._emit("progress", row, stage_text(row))
        for row in model_rows(run, rows):
            self._emit("model", row, model_text(row))

    def message(self, text: str) -> None:
        self._emit("note", {"message": text}, text)

    def finish(self, run: "Run", report: "RunReport") -> None:
        rows = stage_rows(run)
        if self.as_json:
            self._emit("summary", {"stages": rows, "models": model_rows(run, rows),
                                   "seconds": round(report.seconds, 3),
                                   "failed_total": report.failed_total,
                                   "failures": [dataclasses.asdict(f) for f in report.failures],
                                   "errors": report.errors,
                                   **dict(zip(("cache_hits", "cache_misses"),
                                              _cache_answers(rows))),
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
            waits = row["state"].startswith("waiting") and not row["records"]
            table.add_row(row["stage"], f"{_compact(row['done'])}/{_compact(row['known'])}",
                          f"{row['pct']:.0f}%" if row["pct"] is not None else "",
                          "waiting" if waits else f"{row['rate']:,.0f}",
                          _duration(row["eta_s"]) if row["eta_s"] is not None else "",
                          _red(row["failed"]),
                          _money(row["cost"]) if row["cost_full"] else "")
        parts = [Text(input_line(run, rows), style="dim", no_wrap=True, overflow="ellipsis"),
                 table]
        models = model_rows(run, rows)
        if models:
            parts.append(model_table(models))
        return Group(*parts)

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


def model_table(rows: list[dict[str, Any]]) -> "Table":
    """Per model: what holds it back, its request rate, in flight of its limit, and its
    shares of 429s and server faults; a long alias is cut to fit 80 columns."""
    from rich.table import Table

    table = Table(box=None, header_style="dim bold", style="dim", pad_edge=False)
    for column in ("model", "limited by", "req/s", "in flight", "429s", "5xx"):
        table.add_column(column, justify="left" if column in ("model", "limited by")
                         else "right", no_wrap=True, overflow="ellipsis",
                         max_width={"model": 14, "limited by": 33}.get(column))
    for row in rows:
        table.add_row(row["model"], row["limited_by"], _compact(round(row["req_s"])),
                      f"{row['in_flight']}/{row['limit']}", _percent(row["throttled_pct"]),
                      _percent(row["faults_pct"]), style="dim")
    return table


def _compact(count: int) -> str:
    """A count that fits a narrow column: 123,456, then 1.23M, 4.56G."""
    if count < 1_000_000:
        return f"{count:,}"
    if count < 1_000_000_000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e9:.2f}G"


def _percent(share: float) -> str:
    """A share in at most 4 characters: 0%, 0.4%, 12%."""
    return f"{share:.1f}%" if 0 < share < 9.95 else f"{share:.0f}%"


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
    hits, misses = _cache_answers(rows)
    if hits + misses:
        lines.append(f"local cache: {hits:,} of {hits + misses:,} records answered "
                     f"({100 * hits / (hits + misses):.0f}%)")
    cached = sum(row["tokens_cached"] for row in rows)
    if cached:
        tokens_in = sum(row["tokens_in"] for row in rows)
        lines.append(f"provider prompt cache: {cached:,} of {tokens_in:,} input tokens "
                     f"({100 * cached / max(tokens_in, 1):.0f}%)")
    # this run's: what records taken from an interrupted run's journals cost is that run's
    cost = sum(row["cost"] - row["resumed_cost"] for row in rows)
    full = sum(row["cost_full"] - row["resumed_cost_full"] for row in rows)
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


def _cache_answers(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """The LLM records this run finished that the local cache answered, and those it did
    not: counted on the records themselves, so they agree with the stages' counts (a
    re-ask, a cascade or a batch round looks a record up again; it is still one record)."""
    llm = [row for row in rows if row.get("kind") == "llm"]
    hits = sum(row["cache_hits"] - row["resumed_cache_hits"] for row in llm)
    return hits, sum(row["records"] - row["resumed"] for row in llm) - hits


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
