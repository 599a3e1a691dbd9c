"""Streaming benchmark: do records flow stage to stage, so the first one comes out of a
three-stage pipeline at once and the whole run takes little more than its slowest stage?

N records (20,000 by default, `--records`) of short review texts (~70 characters, each
different, `{"id": "r00001", "text": ...}`) go through a pipeline of THREE LLM stages, each
with its own model alias (provider `openai`, `model: sim-small`, `base_url` the URL of a
`chunbot sim serve --port 0 --latency-ms 300` + "/v1", `max_concurrency: 256`), and
`cache: false` on every stage (every run really sends its requests):

  sentiment  "Label the sentiment (positive/negative/neutral): {{ text }}", max_tokens 16
  topic      "Name the topic of: {{ text }}"
  reply      "Write a one-line reply to: {{ text }}"

Measured, every run with a fresh sim and a fresh workdir:

  a. `chunbot run p.yaml --quiet --stream` of the three stages: the seconds from just
     before Popen to the FIRST complete line on stdout (stdout read as it comes, with
     select + os.read; time.monotonic), the seconds to the last line, the wall seconds to
     the process's exit, and the lines on stdout: each must be a JSON record, every input
     id exactly once (duplicates, missing ids and unparsable lines are counted).
  b. each stage alone, as a one-stage pipeline over the same input with the same alias
     settings, run the same way (`--quiet --stream`, so both sides pay for writing their
     records to stdout): its wall seconds. "Slowest stage alone" is the max of the three.

With `--repeat K` every measurement is made K times (a, then b's three stages, K rounds)
and the targets use the medians. Alongside: chunbot's CPU seconds and peak RSS (os.wait4),
the sim's requests and peak in flight (GET /stats) and the sim's CPU share, so a sim that
became the bottleneck shows; and the start-up floor: the fastest of three
`chunbot run --help` (interpreter + imports) plus one round trip per stage (3 x latency).

Targets (PASS/FAIL): first record <= 1.5 s after the start (start-up included); total
wall / slowest stage alone <= 1.3; exactly N lines streamed; 0 duplicates (and 0 missing).

    .venv/bin/python bench/streaming.py                      # ~2 minutes
    .venv/bin/python bench/streaming.py --records 5000       # quicker
    .venv/bin/python bench/streaming.py --repeat 3           # medians of 3
    .venv/bin/python bench/streaming.py --latency-ms 100

As bench/throughput.py does, the sim runs pinned to core 1 and chunbot to core 0
(`taskset -c`); this script moves itself to core 1 too (it only reads stdout). Needs
taskset (util-linux) and two cores. The script uses the standard library only; chunbot
and the sim run as `.venv/bin/python -m chunbot_cli` (this interpreter when there is no
.venv). Everything it writes goes under bench/out/streaming/ (gitignored): the data, one
folder per run with its pipeline and workdir, and logs/ (chunbot's stderr, its stdout
lines' timings, the sim's stderr and /stats). Only loopback addresses are used; every
process it starts is killed before it exits; a run still going after 300 s is killed and
reported as TIMEOUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "streaming"
LOGS = WORK / "logs"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CHUNBOT = [str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)), "-m",
           "chunbot_cli"]
CLIENT_CORE, SERVER_CORE = "0", "1"
RUN_TIMEOUT_S = 300  # a chunbot run still going after this is killed: TIMEOUT
START_TIMEOUT_S = 30  # for the sim to listen
EXIT_WAIT_S = 30  # from stdout's end to the process's exit
CONCURRENCY = 256
NAME = "streaming"
TARGET_FIRST_S = 1.5
TARGET_RATIO = 1.3

STAGES = [  # name, alias, prompt, params
    ("sentiment", "sim_sentiment", "Label the sentiment (positive/negative/neutral): "
     "{{ text }}", {"max_tokens": 16}),
    ("topic", "sim_topic", "Name the topic of: {{ text }}", None),
    ("reply", "sim_reply", "Write a one-line reply to: {{ text }}", None),
]

PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor",
            "keyboard", "tent", "vacuum cleaner", "hair dryer", "electric toothbrush"]
OPINIONS = ["Solid build, does what the box promises.", "The lid is stiff.",
            "Confusing instructions and a damaged box.", "Support answered quickly.",
            "Louder than I expected.", "Fair price, long enough cord.",
            "It broke after a month.", "Easy to clean, love it.",
            "Terrible smell out of the box.", "Great value, works perfectly.",
            "The color differs from the photos.", "Shipping was slow."]


def generate(path: Path, count: int) -> tuple[list[str], float]:
    """Write `count` records r00001.. with distinct texts; returns (ids, mean text length)."""
    width = max(5, len(str(count)))
    ids, chars = [], 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, count + 1):
            product = PRODUCTS[i % len(PRODUCTS)]
            opinion = OPINIONS[(i // len(PRODUCTS)) % len(OPINIONS)]
            text = f"Review {i}: my {product}, {i % 29 + 2} days in. {opinion}"
            record_id = f"r{i:0{width}d}"
            ids.append(record_id)
            chars += len(text)
            f.write(json.dumps({"id": record_id, "text": text}) + "\n")
    return ids, chars / max(count, 1)


def pipeline_yaml(data: Path, base_url: str, stages: list[tuple]) -> str:
    aliases = "\n".join(
        f'  {alias}: {{provider: openai, model: sim-small, base_url: "{base_url}", '
        f"max_concurrency: {CONCURRENCY}}}" for _, alias, _, _ in stages)
    body = []
    for name, alias, prompt, params in stages:
        body.append(f"  - name: {name}\n    model: {alias}\n    cache: false\n"
                    f"    prompt: {json.dumps(prompt)}")
        if params:
            body.append("    params: {" + ", ".join(f"{k}: {v}" for k, v in params.items())
                        + "}")
    return (f"name: {NAME}\ninput: {json.dumps(str(data))}\nid_field: id\nmodels:\n{aliases}\n"
            "stages:\n" + "\n".join(body) + "\n")


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["XDG_CACHE_HOME"] = str(WORK / "xdg-cache")  # unused (cache: false), kept apart
    environment.pop("CHUNBOT_LOG_INTERVAL", None)
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sim:
    url: str  # http://127.0.0.1:PORT
    pid: int


@contextmanager
def sim_server(latency_ms: float, log: Path) -> Iterator[Sim]:
    """`chunbot sim serve --port 0 --latency-ms L` pinned to the server core."""
    with open(log, "w") as err:
        process = subprocess.Popen(["taskset", "-c", SERVER_CORE, *CHUNBOT, "sim", "serve",
                                    "--host", "127.0.0.1", "--port", "0",
                                    "--latency-ms", f"{latency_ms:g}"],
                                   cwd=WORK, env=env(), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=err, text=True,
                                   start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            raise RuntimeError(f"the sim did not start ({line.strip()!r}; see {log})")
        yield Sim(match.group(1), process.pid)
    finally:
        stop(process)
        process.stdout.close()


def sim_stats(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/stats", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}


@dataclass
class Run:
    label: str
    kind: str  # "pipeline" or a stage's name
    records: int
    first_s: float | None = None  # the first complete stdout line
    last_s: float | None = None  # the last one
    wall_s: float = 0.0
    code: int | None = None  # None: TIMEOUT (or no exit status)
    timed_out: bool = False
    lines: int = 0
    duplicates: int = 0
    missing: int = 0
    unknown: int = 0  # ids not in the input
    bad: int = 0  # lines that are not a JSON object with the id
    incomplete: int = 0  # records lacking a stage's field
    cpu_s: float = 0.0
    rss_mb: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    sim_cpu_s: float = 0.0
    log: Path | None = None


def measure(label: str, kind: str, stages: list[tuple], data: Path, ids: list[str],
            latency_ms: float) -> Run:
    """A fresh sim and folder; `chunbot run p.yaml --quiet --stream`, stdout read live."""
    run = Run(label, kind, len(ids))
    folder = WORK / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run.log = LOGS / f"{label}.err"
    print(f"  {label:<18} {' -> '.join(s[0] for s in stages)} ...", end="", flush=True)
    expected = set(ids)
    seen: set[str] = set()
    fields = [s[0] for s in stages]
    timings = []  # (seconds, lines so far), about every 1,000 lines
    with sim_server(latency_ms, LOGS / f"{label}.sim.err") as sim:
        (folder / "p.yaml").write_text(pipeline_yaml(data, sim.url + "/v1", stages))
        sim_cpu = cpu_seconds(sim.pid)
        with open(run.log, "w") as err:
            started = time.monotonic()
            process = subprocess.Popen(["taskset", "-c", CLIENT_CORE, *CHUNBOT, "run", "p.yaml",
                                        "--quiet", "--stream"], cwd=folder, env=env(),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=err, start_new_session=True)
        fd = process.stdout.fileno()
        carry = b""
        status = usage = None
        try:
            deadline = started + RUN_TIMEOUT_S
            while True:  # ends at stdout's EOF or the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    run.timed_out = True
                    break
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
                now = time.monotonic() - started
                if not chunk:
                    break
                *complete, carry = (carry + chunk).split(b"\n")
                if not complete:
                    continue
                if run.first_s is None:
                    run.first_s = now
                run.last_s = now
                for line in complete:
                    if not line.strip():
                        continue
                    run.lines += 1
                    try:
                        record = json.loads(line)
                        record_id = record.get("id", record.get("_id"))
                    except (ValueError, AttributeError):
                        run.bad += 1
                        continue
                    if not isinstance(record_id, str):
                        run.bad += 1
                    elif record_id in seen:
                        run.duplicates += 1
                    elif record_id not in expected:
                        run.unknown += 1
                    else:
                        seen.add(record_id)
                    if any(record.get(f) in (None, "") for f in fields):
                        run.incomplete += 1
                    if run.lines % 1000 == 0:
                        timings.append((round(now, 3), run.lines))
            if carry.strip():  # a last line without its newline
                run.lines += 1
                run.bad += 1
            # stdout is closed (or the deadline passed): reap it, bounded
            exit_deadline = time.monotonic() + (0 if run.timed_out else EXIT_WAIT_S)
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() >= exit_deadline:
                    run.timed_out = True
                    kill_group(process)
                    _, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.005)
            run.wall_s = time.monotonic() - started
        finally:  # too slow, or Ctrl-C: never leave chunbot running
            if status is None:
                kill_group(process)
                try:
                    os.wait4(process.pid, 0)
                except ChildProcessError:
                    pass
            process.returncode = -1 if status is None else os.waitstatus_to_exitcode(status)
            process.stdout.close()
        run.code = None if run.timed_out else os.waitstatus_to_exitcode(status)
        run.cpu_s = usage.ru_utime + usage.ru_stime
        run.rss_mb = usage.ru_maxrss / 1024
        run.sim_cpu_s = cpu_seconds(sim.pid) - sim_cpu
        run.stats = sim_stats(sim.url)
    run.missing = len(expected - seen)
    timings.append((run.last_s, run.lines))
    (LOGS / f"{label}.stats.json").write_text(json.dumps(run.stats, indent=1))
    (LOGS / f"{label}.timings.json").write_text(json.dumps(
        {"first_s": run.first_s, "last_s": run.last_s, "wall_s": run.wall_s,
         "lines_at": timings}))
    print(f" first line {fmt(run.first_s, 2)} s, wall {run.wall_s:.1f} s, "
          + ("TIMEOUT" if run.timed_out else f"exit {run.code}")
          + f", {run.lines:,} lines", flush=True)
    return run


def startup_s() -> float:
    """The fastest of three `chunbot run --help`: the interpreter and chunbot's imports."""
    best = float("inf")
    for _ in range(3):
        started = time.monotonic()
        subprocess.run(["taskset", "-c", CLIENT_CORE, *CHUNBOT, "run", "--help"], env=env(),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        best = min(best, time.monotonic() - started)
    return best


def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def print_table(runs: list[Run]) -> None:
    headers = ["run", "first line s", "last line s", "wall s", "exit", "lines", "dupes",
               "missing", "bad", "incomplete", "CPU s", "peak RSS MB", "sim requests",
               "sim max in flight", "sim CPU"]
    rows = []
    for r in runs:
        rows.append([r.label, fmt(r.first_s, 2), fmt(r.last_s, 2), fmt(r.wall_s, 2),
                     "TIMEOUT" if r.timed_out else str(r.code), fmt(r.lines),
                     fmt(r.duplicates), fmt(r.missing), fmt(r.bad + r.unknown),
                     fmt(r.incomplete), fmt(r.cpu_s, 1), fmt(r.rss_mb),
                     fmt(r.stats.get("requests")), fmt(r.stats.get("max_in_flight")),
                     f"{r.sim_cpu_s / r.wall_s:.0%}" if r.wall_s else "–"])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="input records")
    parser.add_argument("--latency-ms", type=float, default=300.0,
                        help="the sim's delay before each answer")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds (pipeline + each stage alone); targets use medians")
    args = parser.parse_args()
    if args.records < 1 or args.repeat < 1 or args.latency_ms < 0:
        parser.error("--records and --repeat at least 1, --latency-ms at least 0")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        sys.exit("needs two cores and taskset (util-linux)")
    try:  # this script only reads chunbot's stdout: keep it off chunbot's core
        os.sched_setaffinity(0, {int(SERVER_CORE)})
    except (AttributeError, OSError):
        pass
    began = time.monotonic()

    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True)
    data = WORK / "data.jsonl"
    ids, mean_chars = generate(data, args.records)
    floor = startup_s()
    ideal_stage_s = args.records / (CONCURRENCY / (args.latency_ms / 1000)) \
        if args.latency_ms else None
    print(f"chunbot streaming benchmark: {args.records:,} records of ~{mean_chars:.0f}-character "
          f"reviews; 3 LLM stages ({', '.join(s[0] for s in STAGES)}), each its own alias "
          f"(openai -> chunbot sim serve --latency-ms {args.latency_ms:g}, max_concurrency "
          f"{CONCURRENCY}, cache: false); chunbot on core {CLIENT_CORE}, sim on core "
          f"{SERVER_CORE}; {args.repeat} round(s); runs killed after {RUN_TIMEOUT_S} s")
    print(f"  start-up floor: `chunbot run --help` {floor:.2f} s (fastest of 3) + 3 x "
          f"{args.latency_ms:g} ms = {floor + 3 * args.latency_ms / 1000:.2f} s to a first "
          f"record at best"
          + (f"; one stage at {CONCURRENCY} in flight: >= {ideal_stage_s:.1f} s"
             if ideal_stage_s else ""))
    print("runs:")

    runs: list[Run] = []
    for k in range(args.repeat):
        suffix = "" if args.repeat == 1 else f"#{k + 1}"
        runs.append(measure(f"pipeline{suffix}", "pipeline", STAGES, data, ids,
                            args.latency_ms))
        for stage in STAGES:
            runs.append(measure(f"{stage[0]}-alone{suffix}", stage[0], [stage], data, ids,
                                args.latency_ms))

    print("\nResults (first/last line s: from just before Popen to the first/last complete "
          "line on stdout; bad: unparsable lines or unknown ids; incomplete: records lacking "
          "a stage's field; CPU s and peak RSS: chunbot's, from os.wait4; sim CPU: the sim's "
          "share of one core)")
    print_table(runs)
    for r in runs:
        if r.timed_out or r.code != 0:
            print(f"  ! {r.label}: " + ("TIMEOUT" if r.timed_out else f"exit {r.code}")
                  + f" (see {r.log.relative_to(ROOT) if r.log else 'logs'})")
        if "error" in r.stats:
            print(f"  ! {r.label}: /stats: {r.stats['error']}")

    pipelines = [r for r in runs if r.kind == "pipeline"]
    alone = {s[0]: [r for r in runs if r.kind == s[0]] for s in STAGES}
    firsts = [r.first_s for r in pipelines if r.first_s is not None]
    first = statistics.median(firsts) if len(firsts) == len(pipelines) else None
    total = statistics.median(r.wall_s for r in pipelines)
    alone_s = {name: statistics.median(r.wall_s for r in group)
               for name, group in alone.items()}
    slowest = max(alone_s, key=alone_s.get)
    ratio = total / alone_s[slowest] if alone_s[slowest] else None
    sum_alone = sum(alone_s.values())
    med = " (medians)" if args.repeat > 1 else ""
    print(f"\nSummary{med}: pipeline {total:.2f} s; alone: "
          + ", ".join(f"{n} {s:.2f} s" for n, s in alone_s.items())
          + f" (sum {sum_alone:.2f} s: a stage-after-stage run would take about that)")
    any_timeout = any(r.timed_out for r in runs)
    print(f"\nTargets ({time.monotonic() - began:.0f} s in all)")
    print(f"  first record <= {TARGET_FIRST_S} s (start-up included)  "
          f"{verdict(first is not None and first <= TARGET_FIRST_S)}  "
          + (f"{first:.2f} s" if first is not None else "no line at all") + med
          + f"; floor {floor + 3 * args.latency_ms / 1000:.2f} s")
    print(f"  total / slowest stage alone <= {TARGET_RATIO}  "
          f"{verdict(ratio is not None and ratio <= TARGET_RATIO and not any_timeout)}  "
          + (f"{ratio:.2f} x ({total:.2f} s vs {slowest} alone {alone_s[slowest]:.2f} s)"
             if ratio is not None else "–") + med)
    for r in pipelines:
        ok = r.lines == r.records and r.missing == 0 and r.bad == 0 and r.unknown == 0
        print(f"  {r.label}: lines streamed = {r.records:,}  {verdict(ok)}  {r.lines:,} lines, "
              f"{r.records - r.missing:,} distinct input ids, {r.missing:,} missing, "
              f"{r.bad + r.unknown:,} bad" + (f", {r.incomplete:,} incomplete"
                                              if r.incomplete else ""))
        print(f"  {r.label}: duplicates = 0  {verdict(r.duplicates == 0)}  {r.duplicates:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
