"""Memory benchmark: does `chunbot run --storage memory` keep its memory flat however many
records flow through it?

Records are generated on the fly by a small generator process (this script's interpreter,
standard library only) whose stdout is chunbot's stdin, a pipe: nothing is written to disk.
`{"id": "r00000001", "text": "Review 1: my blender, 3 days in. Solid build, does what the
box promises."}`, ~70-character texts, each different. The generator formats ~1M
records/s, well above what chunbot takes, and both pipes (into chunbot and out of it) are
widened to 1 MiB (F_SETPIPE_SZ; with Linux's default 64 KiB chunbot and its feeder took
turns and chunbot idled ~30%), so chunbot is the bottleneck and would have to hold any
backlog itself. chunbot runs

    chunbot run p.yaml --storage memory --input - --quiet --errors logs/<run>.errors.jsonl

over a pipeline of one `python` stage (`- name: touch`, `python: "passmod:touch"`, with
passmod.py beside p.yaml: `def touch(r): r["n"] = len(r.get("text", "")); return r`; the
pipeline's folder is on the import path). --storage memory implies --stream: the records
come out on stdout, which this script reads and checks as it comes: lines, every input id
exactly once (a bitmap over the ids; duplicates and missing ids counted), `"n":` in each.
The sizes (1,000,000 then 10,000,000 by default, `--sizes`) run one after the other, each
from a fresh, empty folder (after the run nothing may be left in it nor beside p.yaml).

For each size: wall seconds (from just before Popen to the process's exit) and records/s
(records out / wall); chunbot's peak RSS, from os.wait4 on chunbot's pid: ru_maxrss of
that one child (chunbot starts no processes of its own). resource.getrusage(
RUSAGE_CHILDREN) is not used: its ru_maxrss is the largest of every child reaped so far,
so the 1M run would leak into the 10M figure. Beside it, /proc/PID/status (VmRSS, VmHWM)
is polled every 0.5 s to show how RSS moves while the records flow (RSS when 10%, 50% and
90% of the records were out); the CPU share of one core of chunbot, of the generator and of
this script (the counter): chunbot near 100% and the other two below it say chunbot is
what limits the rate.

Targets (PASS/FAIL): the largest size's peak RSS <= 1.2 x the smallest's; for every size,
records out = records in, every id once, exit 0. A size still running after `--timeout`
seconds (900 by default) is killed and reported as TIMEOUT; after each size the next one's
time is extrapolated (linearly) and printed.

    .venv/bin/python bench/memory.py                         # 1M and 10M, ~30-60 s
    .venv/bin/python bench/memory.py --sizes 100000,1000000  # quicker

As bench/throughput.py does, chunbot runs pinned to core 0 (`taskset -c 0`); the
generator and this script (the counter) run on core 1. Needs taskset (util-linux) and two
cores. The script uses the standard library only; chunbot runs as `.venv/bin/python -m
chunbot_cli` (this interpreter when there is no .venv). Everything it writes goes under
bench/out/memory/ (gitignored): the pipeline folder, one empty run folder per size, and
logs/ (chunbot's and the generator's stderr, failed records, the RSS timeline as JSON).
No network is used; every process it starts is killed before it exits.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "memory"
LOGS = WORK / "logs"
PIPELINE_DIR = WORK / "pipeline"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CHUNBOT = [str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)), "-m",
           "chunbot_cli"]
CLIENT_CORE, SCRIPT_CORE = "0", "1"
TIMEOUT_S = 900
EXIT_WAIT_S = 60  # from stdout's end to the process's exit
POLL_S = 0.5
PIPE_BYTES = 1 << 20  # both pipes' size: with Linux's default 64 KiB, chunbot idled ~30%
TARGET_RATIO = 1.2

PIPELINE = """\
name: memory
id_field: id
stages:
  - name: touch
    python: "passmod:touch"
"""
PASSMOD = '''\
def touch(r):
    r["n"] = len(r.get("text", ""))
    return r
'''

# The generator: `python -c GENERATOR N WIDTH` writes records 1..N to stdout, then "sent N"
# to stderr. The texts repeat with a period of 17 x 12 x 29 = 5,916 records (product,
# opinion, days), the review number makes each one different; they need no JSON escaping.
GENERATOR = r'''
import sys
PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor",
            "keyboard", "tent", "vacuum cleaner", "hair dryer", "electric toothbrush"]
OPINIONS = ["Solid build, does what the box promises.", "The lid is stiff.",
            "Confusing instructions and a damaged box.", "Support answered quickly.",
            "Louder than I expected.", "Fair price, long enough cord.",
            "It broke after a month.", "Easy to clean, love it.",
            "Terrible smell out of the box.", "Great value, works perfectly.",
            "The color differs from the photos.", "Shipping was slow."]
PERIOD = len(PRODUCTS) * len(OPINIONS) * 29
TAILS = [f'my {PRODUCTS[i % len(PRODUCTS)]}, {i % 29 + 2} days in. '
         f'{OPINIONS[(i // len(PRODUCTS)) % len(OPINIONS)]}"}}\n' for i in range(PERIOD)]

def lines(start, end, width):
    template = '{"id": "r%0' + str(width) + 'd", "text": "Review %d: %s'
    return "".join([template % (i, i, TAILS[i % PERIOD]) for i in range(start, end)])

def main(count, width, batch=4000):
    out = sys.stdout.buffer
    sent = 0
    try:
        for start in range(1, count + 1, batch):
            end = min(start + batch, count + 1)
            out.write(lines(start, end, width).encode())
            sent = end - 1
        out.flush()
    except BrokenPipeError:
        pass
    finally:
        sys.stderr.write(f"sent {sent}\n")
        sys.stderr.flush()

if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
'''
ID_RE = re.compile(rb'"id":\s*"r(\d+)"')


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["XDG_CACHE_HOME"] = str(WORK / "xdg-cache")  # the response cache, kept apart
    environment.pop("CHUNBOT_LOG_INTERVAL", None)
    return environment


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of a running process; {} once it is gone."""
    values = {}
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith(("VmRSS:", "VmHWM:")):
                key, value = row.split(":", 1)
                values[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return values


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if "__pycache__" not in p.parts)


@dataclass
class Run:
    records: int
    label: str
    wall_s: float = 0.0
    code: int | None = None
    timed_out: bool = False
    sent: int | None = None  # records the generator wrote (its "sent N")
    generator_code: int | None = None
    generator_cpu_s: float = 0.0
    lines: int = 0
    occurrences: int = 0  # lines with an input id
    ids: int = 0  # distinct input ids seen
    duplicates: int = 0
    unknown: int = 0  # lines without an input id
    touched: int = 0  # lines with "n":
    failed: int = 0  # lines in the --errors file
    cpu_s: float = 0.0
    rss_mb: float = 0.0  # os.wait4 ru_maxrss
    hwm_mb: float | None = None  # the last VmHWM polled
    pipe_bytes: int | None = None  # the pipes' size after widen()
    script_cpu_s: float = 0.0
    timeline: list[dict[str, float]] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # files left behind
    log: Path | None = None

    @property
    def missing(self) -> int:
        return self.records - self.ids

    @property
    def rate(self) -> float:
        return self.lines / self.wall_s if self.wall_s else 0.0

    def rss_at(self, share: float) -> float | None:
        """VmRSS (MB) at the first poll with at least `share` of the records out."""
        point = next((p for p in self.timeline if p["out"] >= share * self.records), None)
        return point["rss_mb"] if point else None

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.code == 0 and self.sent == self.records
                and self.lines == self.records
                and self.ids == self.records and not self.duplicates and not self.unknown
                and self.touched == self.records and not self.failed)


def generator_source() -> dict:
    namespace: dict = {"__name__": "generator"}
    exec(GENERATOR, namespace)
    return namespace


def count_block(block: bytes, seen: bytearray, run: Run) -> None:
    """Count the complete lines in `block`: lines, "n": fields, ids (marked in `seen`)."""
    newlines = block.count(b"\n")
    blank = block.count(b"\n\n") + block.startswith(b"\n")
    run.lines += newlines - blank
    run.touched += block.count(b'"n":')
    found = ID_RE.findall(block)
    run.unknown += newlines - blank - len(found)
    run.occurrences += len(found)
    try:
        for i in map(int, found):
            seen[i] = 1
    except IndexError:  # an id beyond the input: the slow way, for this block only
        for i in map(int, found):
            if 0 < i < len(seen):
                seen[i] = 1
            else:
                run.unknown += 1
                run.occurrences -= 1


def widen(fd: int) -> int | None:
    """Make a pipe PIPE_BYTES large (F_SETPIPE_SZ, Linux); its size, or None if it can't."""
    try:
        limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(PIPE_BYTES, limit))
    except (AttributeError, OSError, ValueError):
        return None


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


def reap(process: subprocess.Popen | None) -> None:
    """Kill and reap a process that was not waited for (an error, Ctrl-C)."""
    if process is not None and process.returncode is None:
        kill_group(process)
        try:
            os.wait4(process.pid, 0)
        except ChildProcessError:
            pass
        process.returncode = -9


def measure(records: int, timeout_s: float) -> Run:
    label = f"n{records}"
    run = Run(records, label)
    folder = WORK / f"run-{records}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    before = files_under(PIPELINE_DIR)
    run.log = LOGS / f"{label}.err"
    errors_file = LOGS / f"{label}.errors.jsonl"
    generator_log = LOGS / f"{label}.generator.err"
    width = max(5, len(str(records)))
    seen = bytearray(records + 1)
    print(f"  {records:>12,} records ...", end="", flush=True)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    generator = chunbot = None
    try:
        with open(run.log, "w") as err, open(generator_log, "w") as generator_err:
            started = time.monotonic()
            generator = subprocess.Popen(["taskset", "-c", SCRIPT_CORE, sys.executable, "-c",
                                          GENERATOR, str(records), str(width)],
                                         cwd=folder, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=generator_err,
                                         start_new_session=True)
            widen(generator.stdout.fileno())
            chunbot = subprocess.Popen(["taskset", "-c", CLIENT_CORE, *CHUNBOT, "run",
                                        str(PIPELINE_DIR / "p.yaml"), "--storage", "memory",
                                        "--input", "-", "--quiet", "--errors",
                                        str(errors_file)],
                                       cwd=folder, env=env(), stdin=generator.stdout,
                                       stdout=subprocess.PIPE, stderr=err,
                                       start_new_session=True)
            generator.stdout.close()  # chunbot is its only reader: SIGPIPE if chunbot dies
        run.pipe_bytes = widen(chunbot.stdout.fileno())
        fd = chunbot.stdout.fileno()
        carry = b""
        next_poll = started
        deadline = started + timeout_s
        while True:  # ends at stdout's EOF or the deadline
            now = time.monotonic()
            if now >= next_poll:
                values = proc_status(chunbot.pid)
                if values:
                    run.timeline.append({"t": round(now - started, 2), "out": run.lines,
                                         "rss_mb": values["VmRSS"] / 1024,
                                         "hwm_mb": values["VmHWM"] / 1024})
                    run.hwm_mb = values["VmHWM"] / 1024
                next_poll = now + POLL_S
            if now >= deadline:
                run.timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(deadline - now, POLL_S))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            cut = chunk.rfind(b"\n")
            if cut < 0:
                carry += chunk
                continue
            count_block(carry + chunk[:cut + 1], seen, run)
            carry = chunk[cut + 1:]
        if carry.strip():  # a last line without its newline
            run.lines += 1
            run.unknown += 1
        status, usage, killed = wait_bounded(chunbot, 0 if run.timed_out else EXIT_WAIT_S)
        run.wall_s = time.monotonic() - started
        run.timed_out = run.timed_out or killed
        gen_status, gen_usage, _ = wait_bounded(generator, 10)
    finally:  # too slow, or Ctrl-C: never leave a process running
        reap(chunbot)
        reap(generator)
        if chunbot is not None:
            chunbot.stdout.close()
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    run.script_cpu_s = (self_after.ru_utime - self_before.ru_utime
                        + self_after.ru_stime - self_before.ru_stime)
    run.code = None if run.timed_out else os.waitstatus_to_exitcode(status)
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.rss_mb = usage.ru_maxrss / 1024
    run.generator_cpu_s = gen_usage.ru_utime + gen_usage.ru_stime
    run.generator_code = os.waitstatus_to_exitcode(gen_status)
    match = re.search(r"sent (\d+)", generator_log.read_text())
    run.sent = int(match.group(1)) if match else None
    run.ids = seen.count(1, 1)  # seen[0]: no input id is r0
    run.duplicates = run.occurrences - run.ids
    if errors_file.exists():
        with open(errors_file, "rb") as f:
            run.failed = sum(1 for row in f if row.strip())
    run.left = files_under(folder) + [p for p in files_under(PIPELINE_DIR) if p not in before]
    (LOGS / f"{label}.timeline.json").write_text(json.dumps(run.timeline))
    print(f" {run.wall_s:.1f} s, " + ("TIMEOUT" if run.timed_out else f"exit {run.code}")
          + f", {run.lines:,} out, {run.rate:,.0f} records/s, peak RSS {run.rss_mb:.0f} MB",
          flush=True)
    return run


def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def share(seconds: float, wall: float) -> str:
    return f"{seconds / wall:.0%}" if wall else "–"


def print_table(runs: list[Run]) -> None:
    headers = ["records in", "sent", "out", "ids once", "dupes", "missing", "failed", "wall s",
               "exit", "records/s", "peak RSS MB", "VmHWM MB", "RSS@10%", "RSS@50%", "RSS@90%",
               "chunbot CPU", "generator CPU", "counter CPU", "files left"]
    rows = []
    for r in runs:
        rows.append([fmt(r.records), fmt(r.sent), fmt(r.lines), fmt(r.ids), fmt(r.duplicates),
                     fmt(r.missing), fmt(r.failed), fmt(r.wall_s, 1),
                     "TIMEOUT" if r.timed_out else str(r.code), fmt(r.rate),
                     fmt(r.rss_mb), fmt(r.hwm_mb), fmt(r.rss_at(0.1)), fmt(r.rss_at(0.5)),
                     fmt(r.rss_at(0.9)), share(r.cpu_s, r.wall_s),
                     share(r.generator_cpu_s, r.wall_s), share(r.script_cpu_s, r.wall_s),
                     fmt(len(r.left))])
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000",
                        help="comma-separated record counts, run in this order")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help="seconds after which a size's run is killed (TIMEOUT)")
    args = parser.parse_args()
    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if not sizes or min(sizes) < 1 or args.timeout <= 0:
        parser.error("--sizes: at least one size, each at least 1; --timeout positive")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        sys.exit("needs two cores and taskset (util-linux)")
    try:  # the counter (and the generator, started with taskset): off chunbot's core
        os.sched_setaffinity(0, {int(SCRIPT_CORE)})
    except (AttributeError, OSError):
        pass
    began = time.monotonic()

    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True)
    PIPELINE_DIR.mkdir(parents=True)
    (PIPELINE_DIR / "p.yaml").write_text(PIPELINE)
    (PIPELINE_DIR / "passmod.py").write_text(PASSMOD)
    generator = generator_source()
    sample = generator["lines"](1, 1001, 8)
    started = time.monotonic()
    generator["lines"](1, 200_001, 8)
    generator_rate = 200_000 / (time.monotonic() - started)
    print(f"chunbot memory benchmark: sizes {', '.join(f'{n:,}' for n in sizes)}; records of "
          f"~{len(sample) / 1000:.0f} bytes piped into `chunbot run p.yaml "
          f"--storage memory --input - --quiet`, one python stage (passmod:touch); chunbot on "
          f"core {CLIENT_CORE}, the generator and this script (the counter) on core "
          f"{SCRIPT_CORE}; each size killed after {args.timeout:.0f} s (TIMEOUT)")
    print(f"  the generator formats ~{generator_rate:,.0f} records/s (measured here, without "
          f"writing them); pipes widened to {PIPE_BYTES >> 10} KiB where the kernel allows")
    print("runs:")
    runs: list[Run] = []
    for k, n in enumerate(sizes):
        run = measure(n, args.timeout)
        runs.append(run)
        if k + 1 < len(sizes) and run.rate:
            nxt = sizes[k + 1]
            guess = nxt / run.rate
            print(f"    at {run.rate:,.0f} records/s, {nxt:,} records would take ~{guess:.0f} s"
                  + (f": over the {args.timeout:.0f} s timeout" if guess > args.timeout
                     else ""), flush=True)

    print("\nResults (peak RSS: chunbot's ru_maxrss from os.wait4; VmHWM: the last "
          "/proc/PID/status poll; RSS@x%: VmRSS when x% of the records were out; "
          "CPU: each process's share of one core (counter: this script); files left: under the "
          "run folder and new beside p.yaml)")
    print_table(runs)
    for r in runs:
        if r.timed_out or r.code != 0 or r.generator_code != 0 or r.sent != r.records:
            print(f"  ! {r.label}: " + ("TIMEOUT" if r.timed_out else f"exit {r.code}")
                  + f"; the generator: exit {r.generator_code}, sent {fmt(r.sent)}"
                  + f" (see {r.log.relative_to(ROOT) if r.log else 'logs'})")
        if r.pipe_bytes is None:
            print(f"  ! {r.label}: the pipes could not be widened (64 KiB): chunbot may idle")
        if r.left:
            print(f"  ! {r.label}: left behind: {', '.join(r.left[:5])}"
                  + (" …" if len(r.left) > 5 else ""))

    print(f"\nTargets ({time.monotonic() - began:.0f} s in all)")
    small, large = min(runs, key=lambda r: r.records), max(runs, key=lambda r: r.records)
    if small is not large:
        ratio = large.rss_mb / small.rss_mb if small.rss_mb else None
        ok = ratio is not None and ratio <= TARGET_RATIO and not large.timed_out
        print(f"  peak RSS at {large.records:,} <= {TARGET_RATIO} x at {small.records:,}  "
              f"{verdict(ok)}  " + (f"{ratio:.2f} x ({large.rss_mb:.0f} MB vs "
                                    f"{small.rss_mb:.0f} MB)" if ratio else "–")
              + (" (the larger run timed out: its figure is a lower bound)"
                 if large.timed_out else ""))
    for r in runs:
        print(f"  {r.records:,}: records out = records in, each once, exit 0  {verdict(r.ok)}  "
              f"{r.lines:,} out of {r.records:,} in ({fmt(r.sent)} sent), {r.ids:,} distinct ids, "
              f"{r.duplicates:,} duplicates, {r.missing:,} missing, {r.unknown:,} unknown, "
              f"{r.touched:,} with n, {r.failed:,} failed, "
              + ("TIMEOUT" if r.timed_out else f"exit {r.code}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
