"""Test-bench benchmark: how fast does `chunbot test` get through a 100M-token test set, does
its memory stay flat however big the set is, and does it find the pass rate the set was made
with?

The test sets are made by `chunbot sim gen --records N --hard H --words W --seed S` (H 0.1,
W 400, S 7 by default: `--hard`, `--words`, `--seed`): reviews with a gold `label`, padded
with neutral filler to about W words, a share H of them written so that the simulator labels
them wrongly, so a test of them passes 1 - H. Each set is sized by tokens — prompt + reply
tokens as the providers count them: max(1, (len(text) + 3) // 4) per message content + 4
per message for the prompt, the same formula for the reply — from the mean of a 2,000-case
sample: ~491 tokens a case at W 400, so 100M tokens is ~204,000 cases. Each file is made
once and kept (bench/out/testbench/data/, reused by later invocations with the same
N, H, W, S); its exact token count is computed from the file itself. The pipeline:

    name: testbench
    workdir: <fresh folder>/work           # a fresh folder per measurement
    id_field: id
    cache: {path: <fresh folder>/cache.sqlite3}   # so every run really sends its requests
    models: {s: {provider: sim, model: sim-small}}   # in-process, or over HTTP:
    #       {s: {provider: openai, model: sim-small, base_url: http://127.0.0.1:PORT/v1,
    #            api_key_env: CHUNBOT_TESTBENCH_KEY}}
    stages:
      - {name: sentiment, model: s, output: sentiment, params: {temperature: 0, max_tokens: 4},
         prompt: "Label the sentiment (positive/negative/neutral) of this review: {{ text }}"}
    tests:
      - {field: sentiment, equals: "{{ label }}"}

run as `chunbot test p.yaml --cases CASES.jsonl -q --json report.json`. Configurations:

  inproc   the `sim` provider in chunbot's process: --small-tokens (10M) then --tokens (100M)
  http     `chunbot sim serve --port 0 --api-key K` (latency 0, a fresh one per measurement,
           on its own core) through the openai provider: 10M then 100M
  21k      --cases-21k (21,000) cases, on both providers: promptfoo's published case (350 MB
           peak once it streamed its results to JSONL, over 4 GB before)

Measured per run: cases; tokens in + out (chunbot's --json report when it has `tokens_in` /
`tokens_out`, else the run summary's "tok in" / "tok out" on stderr, else the count from the
case file; for http the sim's own /stats count beside it); wall seconds from just before
Popen to the exit, and the engine's own seconds (its "N.Ns, exit 0" line) — the rest is
start-up and checking the cases; tokens/s and requests/s over the wall time (requests: the
report's `requests`, else the sim's /stats, else the summary's cache line); chunbot's peak
RSS (ru_maxrss from os.wait4 on chunbot's pid, that one process, never the sim: the sim is
not chunbot's child), VmRSS when the engine finished (polled from /proc every 0.5 s), its
CPU share; the pass rate it found against 1 - H; the report's cost and latency p50/p95 when
it has them.

Targets (PASS/FAIL): http at --tokens in <= 600 s (scaled by --tokens / 100M when that is not
100M); every run's peak RSS <= 500 MB; peak RSS at --tokens / at --small-tokens <= 1.2 per
provider (constant memory); every run's pass rate within +-0.02 of 1 - H, with no errors.

    .venv/bin/python bench/testbench.py                  # 10M + 100M on both, 21k: ~5 min
    .venv/bin/python bench/testbench.py --quick          # --tokens 2M --small-tokens 200k
    .venv/bin/python bench/testbench.py --only http --tokens 20000000

As bench/throughput.py does, chunbot runs pinned to core 0 and the sim (and `sim gen`) to
core 1 (`taskset -c`); this script moves itself to core 1. Needs taskset (util-linux) and two
cores. The script uses the standard library only; chunbot runs as `.venv/bin/python -m
chunbot_cli` (this interpreter when there is no .venv). Everything it writes goes under
bench/out/testbench/ (gitignored): data/ (the case files, kept), runs/ (one fresh folder
per measurement, removed before it starts) and logs/ (chunbot's and the sim's stderr, the
sim's /stats and the RSS timelines as JSON). Only loopback addresses are used; every
process it starts is killed before it exits; a run still going after --timeout seconds (900)
is killed and reported as TIMEOUT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "testbench"
DATA = WORK / "data"
RUNS = WORK / "runs"
LOGS = WORK / "logs"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CHUNBOT = [str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)), "-m",
           "chunbot_cli"]
CLIENT_CORE, SERVER_CORE = "0", "1"
RUN_TIMEOUT_S = 900
START_TIMEOUT_S = 30  # for the sim to listen
EXIT_WAIT_S = 60  # from stderr's end to the process's exit
GEN_RATE_FLOOR = 500  # cases/s: `sim gen` is killed when slower than this (it does ~3,000)
POLL_S = 0.5
SAMPLE_CASES = 2000
KEY_ENV = "CHUNBOT_TESTBENCH_KEY"

PROMPT = "Label the sentiment (positive/negative/neutral) of this review: "
TARGET_HTTP_S_PER_100M = 600.0
TARGET_RSS_MB = 500.0
TARGET_RATIO = 1.2
TARGET_PASS_DELTA = 0.02
PROMPTFOO_MB = (350, 4096)  # 21,420 cases: streamed results, before

PIPELINE = """\
name: testbench
workdir: {workdir}
id_field: id
cache: {{path: {cache}}}
models:
  s: {model}
stages:
  - name: sentiment
    model: s
    prompt: "Label the sentiment (positive/negative/neutral) of this review: {{{{ text }}}}"
    output: sentiment
    params: {{temperature: 0, max_tokens: 4}}
tests:
  - {{field: sentiment, equals: "{{{{ label }}}}"}}
"""
ENGINE_END = re.compile(r"^(\d+(?:\.\d+)?)s, exit (\d+)\s*$")
STAGE_ROW = re.compile(r"^sentiment\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+"
                       r"([\d,]+)\s")
CACHE_LINE = re.compile(r"local cache: ([\d,]+) of ([\d,]+) requests answered")


def count_tokens(text: str) -> int:
    """The simulator's (and, roughly, real tokenizers') count: ~4 characters a token."""
    return max(1, (len(text) + 3) // 4)


def env(key: str | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    environment["XDG_CACHE_HOME"] = str(WORK / "xdg-cache")  # unused (cache.path), kept apart
    environment.pop("CHUNBOT_LOG_INTERVAL", None)
    environment["COLUMNS"] = "200"
    if key:
        environment[KEY_ENV] = key
    return environment


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; the process group (start_new_session) as a whole."""
    if process.poll() is None:
        kill_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_group(process)
            process.wait(timeout=10)


def reap(process: subprocess.Popen | None) -> None:
    """Kill and reap a process that was not waited for (an error, Ctrl-C)."""
    if process is not None and process.returncode is None:
        kill_group(process)
        try:
            os.wait4(process.pid, 0)
        except ChildProcessError:
            pass
        process.returncode = -9


def wait_bounded(process: subprocess.Popen, seconds: float):
    """os.wait4 until `process` exits, SIGKILL after `seconds`: (status, rusage, killed)."""
    deadline = time.monotonic() + seconds
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return status, usage, False
        if time.monotonic() >= deadline:
            kill_group(process)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            return status, usage, True
        time.sleep(0.01)


def proc_rss_kib(pid: int) -> int | None:
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------
# The test sets

@dataclass
class CaseSet:
    path: Path
    cases: int
    tokens_in: int  # computed from the file: the rendered prompt + 4
    tokens_out: int  # the reply: a label, 2 tokens
    hard: float
    made_s: float | None = None  # None: reused from an earlier invocation

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out


def scan(path: Path) -> tuple[int, int, int]:
    """(cases, prompt tokens, reply tokens) of a case file, the way the sim counts them."""
    cases = tokens_in = tokens_out = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            case = json.loads(line)
            cases += 1
            tokens_in += count_tokens(PROMPT + case["text"]) + 4
            tokens_out += count_tokens(case["label"])  # every label is 2 tokens, right or not
    return cases, tokens_in, tokens_out


def generate(records: int, hard: float, words: int, seed: int, log: Path) -> CaseSet:
    """`chunbot sim gen` into data/, once: a file with its .meta.json beside it is reused."""
    name = f"cases-n{records}-h{hard:g}-w{words}-s{seed}"
    path, meta = DATA / f"{name}.jsonl", DATA / f"{name}.meta.json"
    if path.exists() and meta.exists():
        m = json.loads(meta.read_text())
        if m.get("bytes") == path.stat().st_size:
            return CaseSet(path, m["cases"], m["tokens_in"], m["tokens_out"], hard)
    partial = path.with_suffix(".part")
    timeout = 60 + records / GEN_RATE_FLOOR
    started = time.monotonic()
    with open(partial, "wb") as out, open(log, "w") as err:
        process = subprocess.Popen(["taskset", "-c", SERVER_CORE, *CHUNBOT, "sim", "gen",
                                    "--records", str(records), "--hard", f"{hard:g}",
                                    "--words", str(words), "--seed", str(seed)],
                                   cwd=WORK, env=env(), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=err, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"sim gen --records {records} still running after "
                               f"{timeout:.0f} s: killed") from None
        finally:
            reap(process)
    made = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"sim gen exited {process.returncode} (see {log})")
    cases, tokens_in, tokens_out = scan(partial)
    if cases != records:
        raise RuntimeError(f"sim gen wrote {cases} cases, not {records}")
    partial.rename(path)
    meta.write_text(json.dumps({"cases": cases, "tokens_in": tokens_in,
                                "tokens_out": tokens_out, "bytes": path.stat().st_size,
                                "made_s": round(made, 1)}))
    return CaseSet(path, cases, tokens_in, tokens_out, hard, made)


def cases_for(tokens: int, per_case: float) -> int:
    return max(1, math.ceil(tokens / per_case))


# ---------------------------------------------------------------------------------------
# The sim server

@dataclass
class Sim:
    url: str  # http://127.0.0.1:PORT
    pid: int
    key: str


@contextmanager
def sim_server(log: Path) -> Iterator[Sim]:
    """`chunbot sim serve --port 0 --api-key K` (latency 0) pinned to the server core."""
    key = secrets.token_hex(8)
    with open(log, "w") as err:
        process = subprocess.Popen(["taskset", "-c", SERVER_CORE, *CHUNBOT, "sim", "serve",
                                    "--host", "127.0.0.1", "--port", "0", "--api-key", key],
                                   cwd=WORK, env=env(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            raise RuntimeError(f"the sim did not start ({line.strip()!r}; see {log})")
        yield Sim(match.group(1), process.pid, key)
    finally:
        stop(process)
        process.stdout.close()


def sim_stats(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/stats", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}


# ---------------------------------------------------------------------------------------
# One measurement

@dataclass
class Run:
    label: str
    provider: str  # "inproc" or "http"
    size: str  # "small", "large" or "21k"
    data: CaseSet
    wall_s: float = 0.0
    engine_s: float | None = None  # the engine's own "N.Ns, exit 0"
    engine_rss_mb: float | None = None  # VmRSS when that line came
    code: int | None = None
    timed_out: bool = False
    rss_mb: float = 0.0
    cpu_s: float = 0.0
    sim_cpu_s: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)  # from the stderr summary
    stats: dict[str, Any] = field(default_factory=dict)  # the sim's /stats
    timeline: list[dict[str, float]] = field(default_factory=list)
    log: Path | None = None
    last_line: str = ""  # chunbot's last line on stderr

    def rss_at(self, share: float) -> float | None:
        """VmRSS (MB) at the first poll at or after `share` of the wall time."""
        point = next((p for p in self.timeline if p["t"] >= share * self.wall_s), None)
        return point["rss_mb"] if point else None

    @property
    def expected(self) -> float:
        return 1 - self.data.hard

    @property
    def pass_rate(self) -> float | None:
        return self.report.get("pass_rate")

    def tokens(self) -> tuple[int | None, int | None, str]:
        """(in, out, where from): the report, else the run summary, else the case file."""
        r = self.report
        if isinstance(r.get("tokens_in"), int) and isinstance(r.get("tokens_out"), int):
            return r["tokens_in"], r["tokens_out"], "report"
        if "tokens_in" in self.summary:
            return self.summary["tokens_in"], self.summary["tokens_out"], "summary"
        return self.data.tokens_in, self.data.tokens_out, "case file"

    def requests(self) -> tuple[int | None, str]:
        if isinstance(self.report.get("requests"), int):
            return self.report["requests"], "report"
        if isinstance(self.stats.get("requests"), int):
            return self.stats["requests"], "sim /stats"
        if "requests" in self.summary:
            return self.summary["requests"], "summary"
        return None, "–"

    @property
    def total_tokens(self) -> int | None:
        tin, tout, _ = self.tokens()
        return tin + tout if tin is not None and tout is not None else None

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.code in (0, 1) and bool(self.report)


def pipeline_yaml(folder: Path, sim: Sim | None) -> str:
    model = ("{provider: sim, model: sim-small}" if sim is None else
             f'{{provider: openai, model: sim-small, base_url: "{sim.url}/v1", '
             f"api_key_env: {KEY_ENV}}}")
    return PIPELINE.format(workdir=json.dumps(str(folder / "work")),
                           cache=json.dumps(str(folder / "cache.sqlite3")), model=model)


def parse_summary(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in text.splitlines():
        row = STAGE_ROW.match(line.strip())
        if row:
            found["tokens_in"] = int(row.group(5).replace(",", ""))
            found["tokens_out"] = int(row.group(6).replace(",", ""))
        cache = CACHE_LINE.search(line)
        if cache:
            hits, asked = (int(g.replace(",", "")) for g in cache.groups())
            found["requests"] = asked - hits
    return found


def measure(label: str, provider: str, size: str, data: CaseSet, timeout_s: float) -> Run:
    run = Run(label, provider, size, data)
    folder = RUNS / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run.log = LOGS / f"{label}.err"
    report_path = folder / "report.json"
    print(f"  {label:<12} {data.cases:>9,} cases, {data.tokens:>12,} tokens ...", end="",
          flush=True)
    with (sim_server(LOGS / f"{label}.sim.err") if provider == "http"
          else _nothing()) as sim:
        (folder / "p.yaml").write_text(pipeline_yaml(folder, sim))
        sim_cpu = cpu_seconds(sim.pid) if sim else None
        chunbot = None
        stderr_text = []
        try:
            started = time.monotonic()
            chunbot = subprocess.Popen(["taskset", "-c", CLIENT_CORE, *CHUNBOT, "test",
                                        str(folder / "p.yaml"), "--cases", str(data.path),
                                        "-q", "--json", str(report_path)],
                                       cwd=folder, env=env(sim.key if sim else None),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
            fd = chunbot.stderr.fileno()
            carry = b""
            next_poll = started
            deadline = started + timeout_s
            while True:  # until stderr's EOF or the deadline
                now = time.monotonic()
                if now >= next_poll:
                    rss = proc_rss_kib(chunbot.pid)
                    if rss is not None:
                        run.timeline.append({"t": round(now - started, 2),
                                             "rss_mb": round(rss / 1024, 1)})
                    next_poll = now + POLL_S
                if now >= deadline:
                    run.timed_out = True
                    break
                ready, _, _ = select.select([fd], [], [], min(deadline - now, POLL_S))
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                stderr_text.append(chunk)
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                for line in lines:
                    match = ENGINE_END.match(line.decode(errors="replace").strip())
                    if match and run.engine_s is None:
                        run.engine_s = float(match.group(1))
                        rss = proc_rss_kib(chunbot.pid)
                        run.engine_rss_mb = rss / 1024 if rss is not None else None
            status, usage, killed = wait_bounded(chunbot, 0 if run.timed_out else EXIT_WAIT_S)
            run.wall_s = time.monotonic() - started
            run.timed_out = run.timed_out or killed
        finally:  # too slow, or Ctrl-C: never leave a process running
            reap(chunbot)
            if chunbot is not None:
                chunbot.stderr.close()
        if sim:
            run.sim_cpu_s = cpu_seconds(sim.pid) - sim_cpu
            run.stats = sim_stats(sim.url)
            (LOGS / f"{label}.sim-stats.json").write_text(json.dumps(run.stats, indent=1))
    text = b"".join(stderr_text).decode(errors="replace")
    run.log.write_text(text)
    run.summary = parse_summary(text)
    run.last_line = next((line.strip(" │") for line in reversed(text.splitlines())
                          if line.strip(" │")), "")
    run.code = None if run.timed_out else os.waitstatus_to_exitcode(status)
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.rss_mb = usage.ru_maxrss / 1024
    if report_path.exists() and not run.timed_out:
        try:
            report = json.loads(report_path.read_bytes())
            report.pop("results", None)  # one entry per case: not needed here
            run.report = report
        except ValueError:
            pass
    (LOGS / f"{label}.timeline.json").write_text(json.dumps(run.timeline))
    shutil.rmtree(folder / "work", ignore_errors=True)  # GBs of records at 100M tokens
    (folder / "cache.sqlite3").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        (folder / f"cache.sqlite3{suffix}").unlink(missing_ok=True)
    rate = run.pass_rate
    print(f" {run.wall_s:.1f} s, " + ("TIMEOUT" if run.timed_out else f"exit {run.code}")
          + f", peak RSS {run.rss_mb:.0f} MB"
          + (f", pass rate {rate:.4f}" if rate is not None else ", no report"), flush=True)
    return run


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# ---------------------------------------------------------------------------------------
# The figures

def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def per_s(count: int | None, seconds: float) -> float | None:
    return count / seconds if count is not None and seconds else None


def share(seconds: float | None, wall: float) -> str:
    return f"{seconds / wall:.0%}" if seconds is not None and wall else "–"


def print_table(runs: list[Run]) -> None:
    headers = ["config", "cases", "tokens in+out", "wall s", "engine s", "tokens/s",
               "requests", "requests/s", "peak RSS MB", "RSS @25/50/75% wall",
               "RSS at engine end", "pass rate", "expected", "errors", "exit", "chunbot CPU",
               "sim CPU", "p50/p95 ms", "cost"]
    rows = []
    for r in runs:
        requests, _ = r.requests()
        latency = r.report.get("latency_ms") or {}
        cost = r.report.get("cost")
        rows.append([r.label, fmt(r.report.get("cases", r.data.cases)), fmt(r.total_tokens),
                     fmt(r.wall_s, 1), fmt(r.engine_s, 1),
                     fmt(per_s(r.total_tokens, r.wall_s)), fmt(requests),
                     fmt(per_s(requests, r.wall_s)), fmt(r.rss_mb),
                     "/".join(fmt(r.rss_at(x)) for x in (0.25, 0.5, 0.75)),
                     fmt(r.engine_rss_mb),
                     fmt(r.pass_rate, 4) if r.pass_rate is not None else "–",
                     f"{r.expected:.4f}", fmt(r.report.get("errors")),
                     "TIMEOUT" if r.timed_out else str(r.code), share(r.cpu_s, r.wall_s),
                     share(r.sim_cpu_s, r.wall_s),
                     f"{fmt(latency.get('p50'), 1)}/{fmt(latency.get('p95'), 1)}"
                     if latency else "–",
                     f"${cost:,.4f}" if isinstance(cost, (int, float)) else "–"])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_tokens(runs: list[Run]) -> None:
    """Where each run's token figure came from, and whether the counts agree."""
    for r in runs:
        tin, tout, source = r.tokens()
        parts = [f"{source}: {fmt(tin)} in + {fmt(tout)} out"]
        if source != "summary" and "tokens_in" in r.summary:
            parts.append(f"summary: {r.summary['tokens_in']:,} + {r.summary['tokens_out']:,}")
        if isinstance(r.stats.get("tokens_in"), int):
            parts.append(f"sim /stats: {r.stats['tokens_in']:,} + {r.stats['tokens_out']:,}"
                         f" in {r.stats.get('requests', 0):,} requests")
        parts.append(f"case file: {r.data.tokens_in:,} + {r.data.tokens_out:,}")
        agree = (tin, tout) == (r.data.tokens_in, r.data.tokens_out)
        requests, where = r.requests()
        print(f"  {r.label}: " + "; ".join(parts)
              + ("" if agree else "  <- differs from the case file")
              + f"; requests from {where}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000,
                        help="the large test set's size in tokens (prompt + reply)")
    parser.add_argument("--small-tokens", type=int, default=10_000_000,
                        help="the small test set's size, for the constant-memory ratio")
    parser.add_argument("--cases-21k", type=int, default=21_000,
                        help="cases in the promptfoo-sized set (peak RSS only)")
    parser.add_argument("--only", default="inproc,http,21k",
                        help="comma-separated: inproc, http, 21k")
    parser.add_argument("--quick", action="store_true",
                        help="for development: --tokens 2000000 --small-tokens 200000")
    parser.add_argument("--hard", type=float, default=0.1,
                        help="sim gen --hard: the share of cases the sim labels wrongly")
    parser.add_argument("--words", type=int, default=400,
                        help="sim gen --words: ~490 tokens a case at 400")
    parser.add_argument("--seed", type=int, default=7, help="sim gen --seed")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S,
                        help="seconds after which a run is killed (TIMEOUT)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.small_tokens = 2_000_000, 200_000
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only or only - {"inproc", "http", "21k"}:
        parser.error("--only takes inproc, http and/or 21k")
    if min(args.tokens, args.small_tokens, args.cases_21k) < 1 or args.timeout <= 0 \
            or not 0 <= args.hard <= 1 or args.words < 0:
        parser.error("sizes at least 1, --timeout positive, --hard in [0, 1]")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        sys.exit("needs two cores and taskset (util-linux)")
    try:  # this script (it only waits and reads stderr): off chunbot's core
        os.sched_setaffinity(0, {int(SERVER_CORE)})
    except (AttributeError, OSError):
        pass
    began = time.monotonic()
    shutil.rmtree(RUNS, ignore_errors=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    for folder in (DATA, RUNS, LOGS):
        folder.mkdir(parents=True, exist_ok=True)

    sample = generate(SAMPLE_CASES, args.hard, args.words, args.seed, LOGS / "gen-sample.err")
    per_case = sample.tokens / sample.cases
    print(f"chunbot test-bench benchmark: `chunbot test p.yaml --cases CASES -q --json R` over "
          f"`chunbot sim gen --hard {args.hard:g} --words {args.words} --seed {args.seed}` "
          f"cases (~{per_case:.0f} tokens a case, {sample.tokens_out / sample.cases:.0f} of "
          f"them the reply); one sentiment stage, tests: sentiment equals label; chunbot on "
          f"core {CLIENT_CORE}, the sim on core {SERVER_CORE}; a fresh workdir and cache per "
          f"run; runs killed after {args.timeout:.0f} s (TIMEOUT)")
    sizes = {"small": cases_for(args.small_tokens, per_case),
             "large": cases_for(args.tokens, per_case), "21k": args.cases_21k}
    plan = [(provider, size) for provider in ("inproc", "http") if provider in only
            for size in ("small", "large")]
    plan += [(provider, "21k") for provider in ("inproc", "http") if "21k" in only]
    sets: dict[str, CaseSet] = {}
    print("test sets:")
    for size in dict.fromkeys(size for _, size in plan):
        n = sizes[size]
        print(f"  {size:<5} {n:>9,} cases ...", end="", flush=True)
        data = generate(n, args.hard, args.words, args.seed, LOGS / f"gen-{size}.err")
        sets[size] = data
        print(f" {data.tokens:,} tokens ({data.tokens_in:,} in + {data.tokens_out:,} out), "
              f"{data.path.stat().st_size / 1e6:,.0f} MB, "
              + (f"made in {data.made_s:.1f} s" if data.made_s is not None
                 else f"reused {data.path.relative_to(ROOT)}"), flush=True)

    print("runs:")
    runs: list[Run] = []
    names = {"small": _short(args.small_tokens), "large": _short(args.tokens), "21k": None}
    for k, (provider, size) in enumerate(plan):
        data = sets[size]
        label = f"{provider}-{names[size] or _short(data.cases) + '-cases'}"
        run = measure(label, provider, size, data, args.timeout)
        runs.append(run)
        if size == "small" and k + 1 < len(plan) and plan[k + 1] == (provider, "large") \
                and run.total_tokens and run.wall_s:
            guess = sets["large"].tokens / (run.total_tokens / run.wall_s)
            print(f"    at {run.total_tokens / run.wall_s:,.0f} tokens/s, "
                  f"{sets['large'].tokens:,} tokens would take ~{guess:.0f} s"
                  + (f": over the {args.timeout:.0f} s timeout" if guess > args.timeout
                     else ""), flush=True)

    print("\nResults (tokens: prompt + reply as the provider counts them; wall s: Popen to exit;"
          " engine s: chunbot's own run time, the rest is start-up and checking; /s over wall;"
          " peak RSS: chunbot's ru_maxrss (os.wait4); RSS @x% wall: VmRSS polled then; RSS at"
          " engine end: VmRSS when the engine printed its exit line; CPU: share of one core)")
    print_table(runs)
    print("tokens and requests, by source:")
    print_tokens(runs)
    for r in runs:
        if not r.ok:
            print(f"  ! {r.label}: " + ("TIMEOUT" if r.timed_out else f"exit {r.code}")
                  + ("" if r.report else ", no --json report")
                  + f" (see {r.log.relative_to(ROOT) if r.log else 'logs'})"
                  + (f": {r.last_line!r}" if r.last_line else ""))
        if r.stats.get("by_status") and set(r.stats["by_status"]) != {"200"}:
            print(f"  ! {r.label}: the sim answered {r.stats['by_status']}")

    print(f"\nTargets ({time.monotonic() - began:.0f} s in all)")
    by = {(r.provider, r.size): r for r in runs}
    http_large = by.get(("http", "large"))
    if http_large:
        limit = TARGET_HTTP_S_PER_100M * args.tokens / 100_000_000
        scaled = "" if args.tokens == 100_000_000 else \
            f" (scaled from 600 s per 100M tokens to {_short(args.tokens)})"
        ok = http_large.ok and not http_large.timed_out and http_large.wall_s <= limit
        print(f"  http {_short(args.tokens)} tokens in <= {limit:.0f} s{scaled}  {verdict(ok)}  "
              f"{http_large.wall_s:.1f} s" + (" (TIMEOUT)" if http_large.timed_out else ""))
    for r in runs:
        ok = r.rss_mb <= TARGET_RSS_MB and not r.timed_out
        extra = (f" (promptfoo, 21,420 cases: {PROMPTFOO_MB[0]} MB streaming, over "
                 f"{PROMPTFOO_MB[1] // 1024} GB before)" if r.size == "21k" else "")
        print(f"  {r.label}: peak RSS <= {TARGET_RSS_MB:.0f} MB  {verdict(ok)}  "
              f"{r.rss_mb:.0f} MB{extra}")
    for provider in ("inproc", "http"):
        small, large = by.get((provider, "small")), by.get((provider, "large"))
        if small and large:
            ratio = large.rss_mb / small.rss_mb if small.rss_mb else None
            ok = ratio is not None and ratio <= TARGET_RATIO and not large.timed_out
            print(f"  {provider}: peak RSS at {_short(args.tokens)} / at "
                  f"{_short(args.small_tokens)} <= {TARGET_RATIO}  {verdict(ok)}  "
                  + (f"{ratio:.2f} x ({large.rss_mb:.0f} MB vs {small.rss_mb:.0f} MB)"
                     if ratio else "–"))
    for r in runs:
        rate = r.pass_rate
        ok = (rate is not None and abs(rate - r.expected) <= TARGET_PASS_DELTA
              and not r.report.get("errors"))
        print(f"  {r.label}: pass rate within +-{TARGET_PASS_DELTA} of {r.expected:.2f}, no "
              f"errors  {verdict(ok)}  "
              + (f"{rate:.4f} ({r.report.get('passed', 0):,} passed, "
                 f"{r.report.get('failed', 0):,} failed, {r.report.get('errors', 0):,} errors"
                 f" of {r.report.get('cases', 0):,})" if rate is not None else "no report"))
    return 0


def _short(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.3g}{unit}"
    return str(n)


if __name__ == "__main__":
    sys.exit(main())
