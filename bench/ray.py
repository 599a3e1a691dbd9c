"""Ray benchmark: `chunbot run --executor ray` beside a local run on this machine, and the
two figures that bound a many-node run: the driver's commit rate and the Board actor's
call rate (issue 15's bench).

Every run sends N records (20,000 by default, `--requests`) of short review texts (~200
characters, each different) through one LLM stage: prompt "Label the sentiment of:
{{ text }}", `params: {max_tokens: 4}`, `shard_size: 1000` (20 shards), nothing about
concurrency, retries or limits, `chunbot run p.yaml -q --no-cache` (every request is sent)
with or without `--executor ray`. Ray is the local one chunbot starts itself (2 CPUs here:
2 worker tasks, 4 shards in flight), its temp dir a fresh short folder (CHUNBOT_RAY_TEMP),
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 so that its node address is 127.0.0.1 (otherwise its
gcs_server and raylet listen on every interface of the machine). chunbot's driver and
everything it starts (Ray's gcs_server, raylet, workers, ...) are
pinned to core 0 with taskset (`--client-cores 0,1` lets them use both), the sim
(`chunbot sim serve --port 0`, fresh for every run) to core 1, as in bench/throughput.py.
Scenarios:

  A  sim --latency-ms 200, no limits: local vs ray. For each: wall s (start to exit),
     chunbot's own summary seconds ("N.Ns, exit 0": from the run's start, so for ray it
     includes starting Ray), the stage's secs (its first job's start to its last job's
     end, after Ray's start-up) and the sim's serving span (first request seen to last
     answer, /stats polled every 0.2 s); req/s over each; CPU ms per request; peak RSS.
  B  sim --latency-ms 200 --rpm 30000 (500 req/s, announced in x-ratelimit headers, 429
     beyond it): ray with 2 workers, and local beside it. The achieved rate over the
     stage's secs and the 429 share of the requests the sim saw (/stats by_status).
     Targets (ray): >= 90% of 500 req/s, 429s < 2%.
  C  the driver's commit rate: an in-process `provider: sim` model (latency 0, no HTTP),
     shard_size 100 (200 shards of 100 records) ray and local, and shard_size 1000 ray,
     all unpinned: shards committed per second and records per second over the stage's
     secs and between the first and last commit (part files counted every 0.2 s), and the
     driver's own CPU in that window per commit and per record, so its ceiling with a core
     to itself (1 / CPU per commit); from the two ray runs, the driver's CPU split into a
     cost per commit and a cost per record, and the records/s it could take by shard size.
  D  the Board actor (chunbot_cli.rayexec.Board, as `ray.remote(num_cpus=0)(Board)`) on a
     local Ray started by a snippet (bench/out/ray/board.py, run by the venv's python,
     both cores): `share.remote("w", {"m": (30000.0, None)}, {}, 2.0)` K times one
     after another from the driver (ray.get each), K at once from the driver, and from 2 worker tasks at once
     each awaiting its calls one by one on an event loop as workers do (rayexec's
     take_share); calls/s and ms per call, the actor's call counter checked. Also the
     driver's rate of taking a generator task's yields (rayexec's event batches: a worker
     yields what its job reported every 20 ms, DRAIN_S), 1 and 25 events a yield, from
     one task and from two at once. Beside them, what a 100-node run asks of the board:
     one call per worker every 0.5 s (rayexec.SHARE_S), for 2, 8 and 32 workers a node.

CPU is measured three ways, because Ray's processes are not all the driver's children to
the end: the driver's own user+sys (read from /proc/<pid>/stat when it has exited and is
not reaped yet: os.waitid WNOWAIT), os.wait4's figure (the driver plus every descendant
it reaped, recursively), and the process tree's (every process whose parent chain or
session leads to the driver, its utime+stime read from /proc every 0.2 s until it is gone,
so a process's last 0.2 s may be missed). CPU ms per request uses the larger of the last
two; the serving-window figure is the tree's CPU between the sim's first request and last
answer, which leaves out Ray's start-up and shutdown; the tree's CPU is also split by
process: the driver, the workers that ran jobs (ray::_run_remote), gcs_server + raylet, and
Ray's other processes. Peak RSS: the driver's own VmHWM (sampled from /proc/<pid>/status),
and the peak of the tree's summed RSS.

Targets with PASS/FAIL: B's two; every run exits 0 with all N records in its output and
leaves no process behind (a tree process still alive 10 s after the driver exited is
reported, then killed).

    .venv/bin/python bench/ray.py                              # all, ~3 minutes
    .venv/bin/python bench/ray.py --scenarios A --requests 2000  # quicker
    .venv/bin/python bench/ray.py --scenarios A --client-cores 0,1  # Ray on both cores

Standard library only; chunbot runs as .venv/bin/chunbot. Everything it writes goes under
bench/out/ray/ (gitignored): data, one folder per run (pipeline, workdir, stderr, /stats
timeline as JSON), the board snippet and its output; Ray's temp dir is a fresh /tmp/cbrb*
folder, removed at the end. Only loopback addresses are used; every process it starts
(and every process those start) is killed, by pid, before it exits; never `ray stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "ray"
CHUNBOT = ROOT / ".venv" / "bin" / "chunbot"
PYTHON = ROOT / ".venv" / "bin" / "python"

CLIENT_CORE, SERVER_CORE = "0", "1"
POLL_S = 0.2
RUN_TIMEOUT_S = 300  # a run still going after 5 minutes is killed
LEFTOVER_S = 10.0  # how long the driver's processes may outlive it
SHARD_SIZE = 1000
COMMIT_SHARD_SIZE = 100  # scenario C
LATENCY = ["--latency-ms", "200"]
LIMIT_RPS = 500  # --rpm 30000
LIMITED = [*LATENCY, "--rpm", str(LIMIT_RPS * 60)]
RATE_TARGET, SHARE_429_TARGET = 0.9, 0.02
SHARE_S = 0.5  # rayexec.SHARE_S: a working worker's board call interval
NODES, WORKERS_PER_NODE = 100, (2, 8, 32)
# Ray's node address is the machine's own (its gcs_server and raylet listen on every
# interface); with this it is 127.0.0.1 and they listen on loopback only
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PIPELINE = """\
name: rb
input: {data}
workdir: {workdir}
id_field: id
shard_size: {shard_size}
models:
  m: {model}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment of: {{{{ text }}}}"
    params: {{max_tokens: 4}}
"""
HTTP_MODEL = '{{provider: openai, model: sim-small, base_url: "{url}/v1"}}'
SIM_MODEL = "{provider: sim, model: sim-small, latency_ms: 0}"

PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor"]
SENTENCES = ["I bought this {p} {n} weeks ago.", "It does what the box promises.",
             "The handle gets warm after a couple of minutes.", "The packaging was damaged.",
             "Customer service answered quickly.", "It is louder than I expected.",
             "The price was fair for what you get.", "One of the buttons sticks now and then.",
             "Delivery took {n} days longer than promised.", "I would buy it again."]

BOARD_SNIPPET = r'''
"""Board actor and generator-stream micro-benchmark (written and run by bench/ray.py)."""
import asyncio, json, sys, time
from chunbot_cli import rayexec

calls, temp = int(sys.argv[1]), sys.argv[2]
ray = rayexec.import_ray()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
         object_store_memory=int(1e8), _temp_dir=temp)
learned = {"m": (30000.0, None)}


class CountedBoard(rayexec.Board):
    def count(self):
        return self.calls


board = ray.remote(num_cpus=0)(CountedBoard).remote()
ray.get(board.expect.remote(2))
ray.get([board.share.remote("w", learned, {}, 2.0) for _ in range(200)])  # the actor is up and warm
out = {"warm-up calls": 200}

started = time.perf_counter()
for _ in range(calls):
    ray.get(board.share.remote("w", learned, {}, 2.0))
out["sequential"] = time.perf_counter() - started

started = time.perf_counter()
ray.get([board.share.remote("w", learned, {}, 2.0) for _ in range(calls)])
out["burst"] = time.perf_counter() - started


@ray.remote(num_cpus=1, max_retries=0)
def caller(board, n, at):
    """n calls one after another, awaited on an event loop as rayexec's take_share does."""
    async def go():
        while time.time() < at:  # both tasks start together
            await asyncio.sleep(0.001)
        began = time.perf_counter()
        for _ in range(n):
            await asyncio.wait_for(board.share.remote("w", learned, {}, 2.0), 10)
        return time.time() - (time.perf_counter() - began), time.time()
    return asyncio.run(go())


ray.get([caller.remote(board, 10, 0) for _ in range(2)])  # the two workers exist
spans = ray.get([caller.remote(board, calls // 2, time.time() + 1.0) for _ in range(2)])
out["two workers"] = max(end for _, end in spans) - min(begin for begin, _ in spans)
out["two workers calls"] = 2 * (calls // 2)
out["board calls"] = ray.get(board.count.remote())


@ray.remote(num_cpus=1, max_retries=0)
def stream(batches, size):
    """A generator task yielding batches as rayexec's _run_remote does."""
    batch = [("entry", "sentiment", 0, {"id": f"r{i:06d}", "sentiment": "positive"}, True)
             for i in range(size)]
    for _ in range(batches):
        yield batch


async def take(batches, size):
    began, taken = time.perf_counter(), 0
    async for ref in stream.remote(batches, size):
        taken += len(await ref)
    return time.perf_counter() - began, taken

async def two(batches, size):
    began = time.perf_counter()
    results = await asyncio.gather(take(batches, size), take(batches, size))
    return time.perf_counter() - began, sum(taken for _, taken in results)

asyncio.run(take(10, 1))  # warm
for size in (1, 25):
    seconds, taken = asyncio.run(take(calls, size))
    out[f"stream {size}"] = [seconds, taken, calls]
seconds, taken = asyncio.run(two(calls, 25))
out["stream 25 x2"] = [seconds, taken, 2 * calls]
out["calls"] = calls
ray.shutdown()
print(json.dumps(out))
'''


# ---------------------------------------------------------------------------------------
# inputs

def review(index: int, rng: random.Random) -> str:
    product = rng.choice(PRODUCTS)
    text = f"Review {index} of a {product}."
    while len(text) < 200:
        text += " " + rng.choice(SENTENCES).format(p=product, n=rng.randint(2, 9))
    return text


def write_data(records: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(15)
    data = WORK / "data.jsonl"
    with open(data, "w") as f:
        for i in range(records):
            f.write(json.dumps({"id": f"r{i:06d}", "text": review(i, rng)}) + "\n")
    return data


# ---------------------------------------------------------------------------------------
# processes: the sim, and one measured process with its tree

@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    pid: int


@contextmanager
def sim_server(args: list[str], log: Path) -> Iterator[Server]:
    command = ["taskset", "-c", SERVER_CORE, str(CHUNBOT), "sim", "serve",
               "--host", "127.0.0.1", "--port", "0", *args]
    with open(log, "w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            raise RuntimeError(f"the sim did not start ({line.strip()!r}; see {log})")
        yield Server(match.group(1), process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get_stats(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/stats", timeout=5) as response:
        return json.loads(response.read())


def read_stat(pid: int) -> dict[str, Any] | None:
    """The fields of /proc/<pid>/stat used here, None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, tail = text.rsplit(")", 1)
    f = tail.split()
    return {"comm": head.split("(", 1)[1], "state": f[0], "ppid": int(f[1]),
            "sid": int(f[3]), "cpu": (int(f[11]) + int(f[12])) / CLK,
            "children_cpu": (int(f[13]) + int(f[14])) / CLK, "start": int(f[19]),
            "rss": int(f[21]) * PAGE}


def vm_hwm(pid: int) -> int | None:
    """Peak RSS of the process itself (bytes), None once it is gone or a zombie."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_title(pid: int) -> str:
    """The process's title: Ray's workers set theirs to ray::IDLE, ray::_run_remote, ..."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in argv if w]
    if not words:
        return ""
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    script = next((w for w in words[1:] if w.endswith(".py")), "")
    return Path(words[0]).name + (f" {Path(script).name}" if script else "")


def cpu_by_role(seen: dict[tuple[int, int], dict[str, Any]], root: int) -> dict[str, float]:
    """The tree's CPU seconds: the driver, Ray's workers that ran chunbot jobs, gcs_server
    and raylet, and the rest of Ray's processes (dashboard, agents, monitors, idle workers)."""
    roles = {"driver": 0.0, "job workers": 0.0, "gcs+raylet": 0.0, "other Ray": 0.0}
    for (pid, _), p in seen.items():
        if pid == root:
            role = "driver"
        elif p["title"].startswith("ray::_run_remote"):
            role = "job workers"
        elif p["comm"] in ("gcs_server", "raylet"):
            role = "gcs+raylet"
        else:
            role = "other Ray"
        roles[role] += p["cpu"]
    return roles


class Tree:
    """The processes of the driver's tree: its descendants by parent, and anything in its
    session, each remembered (pid, start time) with its last CPU and RSS seen."""

    def __init__(self, root: int):
        self.root = root
        self.seen: dict[tuple[int, int], dict[str, Any]] = {}
        self.alive: set[tuple[int, int]] = set()
        self.peak_rss = 0
        self.driver_hwm = 0

    def sample(self) -> None:
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = read_stat(int(name))
                if stat is not None:
                    stats[int(name)] = stat
        tracked = {pid for pid, start in self.alive} | {self.root}
        members = {pid for pid, s in stats.items() if pid == self.root
                   or s["sid"] == self.root or (pid, s["start"]) in self.seen}
        grew = True
        while grew:  # descendants by parent, however deep
            grew = False
            for pid, s in stats.items():
                if pid not in members and (s["ppid"] in members or s["ppid"] in tracked):
                    members.add(pid)
                    grew = True
        alive, rss = set(), 0
        for pid in members:
            s = stats[pid]
            key = (pid, s["start"])
            known = self.seen.setdefault(key, {"pid": pid, "comm": s["comm"], "cpu": 0.0,
                                               "title": ""})
            known["cpu"] = max(known["cpu"], s["cpu"])
            if not known["title"].startswith("ray::_run_remote"):  # a worker keeps that name
                known["title"] = process_title(pid) or known["title"]
            if s["state"] != "Z":
                alive.add(key)
                rss += s["rss"]
        self.alive = alive
        self.peak_rss = max(self.peak_rss, rss)
        hwm = vm_hwm(self.root)
        if hwm:
            self.driver_hwm = max(self.driver_hwm, hwm)

    def cpu(self) -> float:
        return sum(p["cpu"] for p in self.seen.values())

    def others_alive(self) -> list[tuple[int, int]]:
        """Tree processes other than the driver still running (pid and start checked)."""
        left = []
        for pid, start in list(self.seen):
            if pid == self.root:
                continue
            stat = read_stat(pid)
            if stat is not None and stat["start"] == start and stat["state"] != "Z":
                left.append((pid, start))
        return left

    def kill_others(self) -> None:
        for pid, start in self.others_alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Run:
    label: str
    requests: int
    exit_code: int | None = None
    error: str | None = None
    wall_s: float = 0.0
    summary_s: float | None = None  # "N.Ns, exit 0"
    stage_s: float | None = None  # the summary table's secs
    executor: str = ""
    driver_cpu_s: float = 0.0  # own, at exit
    wait4_cpu_s: float = 0.0  # the driver plus what it reaped
    tree_cpu_s: float = 0.0  # sampled, every process of the tree
    processes: int = 0
    driver_rss_mb: float = 0.0  # own VmHWM
    wait4_rss_mb: float = 0.0  # the largest single process it reaped, or itself
    tree_rss_mb: float = 0.0  # peak of the sum
    roles: dict[str, float] = field(default_factory=dict)  # CPU s by cpu_by_role
    left_behind: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    stdout: str = ""

    @property
    def cpu_s(self) -> float:
        return max(self.wait4_cpu_s, self.tree_cpu_s)

    def per_request_ms(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000 / self.requests

    def rate(self, seconds: float | None) -> float | None:
        return self.requests / seconds if seconds else None

    def served(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The timeline points at the sim's first request and at its last answer."""
        answered = self.stats.get("answered", 0)
        first = next((p for p in self.timeline if p.get("requests", 0) > 0), None)
        last = next((p for p in self.timeline if p.get("answered", 0) >= answered), None)
        if not answered or first is None or last is None or last["t"] <= first["t"]:
            return None
        return first, last

    @property
    def served_s(self) -> float | None:
        points = self.served()
        return points[1]["t"] - points[0]["t"] if points else None

    @property
    def served_cpu_ms(self) -> float | None:
        points = self.served()
        if not points:
            return None
        return (points[1]["tree_cpu"] - points[0]["tree_cpu"]) * 1000 / self.requests

    @property
    def served_driver_ms(self) -> float | None:
        points = self.served()
        if not points or None in (points[0].get("driver_cpu"), points[1].get("driver_cpu")):
            return None
        return (points[1]["driver_cpu"] - points[0]["driver_cpu"]) * 1000 / self.requests

    def commits(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The timeline points at the first and the last part file seen."""
        parts = self.timeline[-1]["parts"] if self.timeline else 0
        first = next((p for p in self.timeline if p["parts"] > 0), None)
        last = next((p for p in self.timeline if p["parts"] >= parts), None)
        if first is None or last is None or last["t"] <= first["t"]:
            return None
        return first, last

    @property
    def share_429(self) -> float | None:
        sent = self.stats.get("requests")
        return self.stats.get("by_status", {}).get("429", 0) / sent if sent else None


def count_parts(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder)
                   if e.name.startswith("part-") and e.name.endswith(".jsonl"))
    except OSError:
        return 0


def run_measured(label: str, argv: list[str], cwd: Path, env: dict[str, str], log: Path,
                 requests: int, server: Server | None = None, parts: Path | None = None,
                 core: str | None = CLIENT_CORE, timeout: float = RUN_TIMEOUT_S) -> Run:
    """Run one process (its own session, pinned to `core`), sample its tree, the sim's
    /stats and the part files every POLL_S, and measure it at its exit."""
    run = Run(label, requests)
    print(f"  {label}: ...", end="", flush=True)
    command = (["taskset", "-c", core] if core is not None else []) + argv
    with open(log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err, start_new_session=True)
    tree = Tree(process.pid)
    ended: dict[str, Any] = {}

    def reap() -> None:
        # WNOWAIT first: the exited driver stays a zombie, whose /proc stat still has its
        # own CPU time; wait4 then reaps it and gives the rusage with its reaped children
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        ended.update(at=time.perf_counter(), zombie=read_stat(process.pid))
        _, status, usage = os.wait4(process.pid, 0)
        ended.update(status=status, usage=usage)

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    killed = False
    try:
        next_poll = started
        while "status" not in ended:
            now = time.perf_counter()
            if now >= next_poll:
                tree.sample()
                point: dict[str, Any] = {"t": round(now - started, 3), "tree_cpu": tree.cpu(),
                                         "parts": count_parts(parts) if parts else 0}
                own = read_stat(process.pid)
                point["driver_cpu"] = own["cpu"] if own else None
                if server is not None:
                    try:
                        stats = get_stats(server)
                        point.update(answered=stats["answered"], requests=stats["requests"],
                                     n429=stats["by_status"].get("429", 0),
                                     in_flight=stats["in_flight"])
                    except OSError:
                        pass  # a slow poll is skipped
                run.timeline.append(point)
                next_poll = max(next_poll + POLL_S, time.perf_counter())
            if now - started > timeout and not killed:
                os.killpg(process.pid, signal.SIGKILL)
                tree.kill_others()
                killed = True
            waiter.join(timeout=max(0.0, min(next_poll - time.perf_counter(), POLL_S)))
    finally:
        if "status" not in ended:  # interrupted: leave nothing running
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            waiter.join(timeout=10)
        # what outlives the driver: give it LEFTOVER_S to go, then report and kill it
        deadline = time.perf_counter() + LEFTOVER_S
        while tree.others_alive() and time.perf_counter() < deadline:
            tree.sample()
            time.sleep(0.1)
        for pid, start in tree.others_alive():
            stat = read_stat(pid) or {}
            run.left_behind.append(f"{pid} ({stat.get('comm', '?')})")
        tree.kill_others()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group: anything not yet seen
        except (ProcessLookupError, PermissionError):
            pass
    run.wall_s = ended["at"] - started
    run.exit_code = os.waitstatus_to_exitcode(ended["status"])
    usage = ended["usage"]
    run.wait4_cpu_s = usage.ru_utime + usage.ru_stime
    run.wait4_rss_mb = usage.ru_maxrss / 1024
    zombie = ended.get("zombie")
    if zombie is not None:
        run.driver_cpu_s = zombie["cpu"]
        tree.seen[(process.pid, zombie["start"])]["cpu"] = zombie["cpu"]
    run.tree_cpu_s = tree.cpu()
    run.roles = cpu_by_role(tree.seen, process.pid)
    run.processes = len(tree.seen)
    run.driver_rss_mb = tree.driver_hwm / 2**20
    run.tree_rss_mb = tree.peak_rss / 2**20
    if server is not None:
        run.stats = get_stats(server)
        run.timeline.append({"t": round(run.wall_s, 3), "tree_cpu": run.tree_cpu_s,
                             "parts": count_parts(parts) if parts else 0,
                             "driver_cpu": run.driver_cpu_s, "answered": run.stats["answered"],
                             "requests": run.stats["requests"],
                             "n429": run.stats["by_status"].get("429", 0),
                             "in_flight": run.stats["in_flight"]})
    elif parts is not None:
        run.timeline.append({"t": round(run.wall_s, 3), "tree_cpu": run.tree_cpu_s,
                             "parts": count_parts(parts), "driver_cpu": run.driver_cpu_s})
    run.stdout = log.with_suffix(".out").read_text()
    if killed:
        run.error = f"killed after {timeout:.0f} s"
    elif run.exit_code != 0:
        run.error = f"exit {run.exit_code} (see {log.relative_to(ROOT)})"
    print(f" {run.wall_s:.1f} s" + (f"  [{run.error}]" if run.error else ""), flush=True)
    return run


# ---------------------------------------------------------------------------------------
# chunbot runs

def parse_summary(run: Run, stderr: str) -> None:
    found = re.findall(r"(\d+(?:\.\d+)?)s, exit (\d+)", stderr)
    if found:
        run.summary_s = float(found[-1][0])
    match = re.search(r"executor: (Ray, \d+ CPUs, \d+ shards in flight)", stderr)
    run.executor = match.group(1) if match else "local"
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        header = re.split(r"\s{2,}", line.strip())
        if header[:2] == ["stage", "records"] and "secs" in header:
            for row in lines[i + 1:]:
                cells = row.split()
                if cells and cells[0] == "sentiment" and len(cells) == len(header):
                    run.stage_s = float(cells[header.index("secs")].replace(",", ""))
                    break
            break


def chunbot_run(label: str, executor: str, model: str, records: int, shard_size: int,
                data: Path, ray_temp: Path, server: Server | None = None,
                core: str | None = CLIENT_CORE) -> Run:
    folder = WORK / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    workdir = folder / "workdir"
    (folder / "p.yaml").write_text(PIPELINE.format(data=data, workdir=workdir,
                                                   shard_size=shard_size, model=model))
    argv = [str(CHUNBOT), "run", "p.yaml", "-q", "--no-cache"]
    if executor == "ray":
        argv += ["--executor", "ray"]
    env = {**os.environ, **LOOPBACK_RAY, "OPENAI_API_KEY": "sim",
           "CHUNBOT_RAY_TEMP": str(ray_temp), "COLUMNS": "200"}
    run = run_measured(label, argv, folder, env, folder / "chunbot.err", records, server,
                       workdir / "sentiment", core)
    parse_summary(run, (folder / "chunbot.err").read_text())
    stage = workdir / "sentiment"
    run.ok = sum(sum(1 for _ in open(p)) for p in stage.glob("part-*.jsonl"))
    errors = stage / "errors.jsonl"
    run.failed = sum(1 for _ in open(errors)) if errors.exists() else 0
    if run.ok != records and run.error is None:
        run.error = f"{run.ok:,} records out of {records:,} ({run.failed:,} failed)"
    (folder / "timeline.json").write_text(json.dumps(run.timeline))
    if run.left_behind:
        print(f"    ! left running after the driver exited (killed): "
              f"{', '.join(run.left_behind)}")
    return run


def http_run(label: str, executor: str, server_args: list[str], records: int, data: Path,
             ray_temp: Path, core: str = CLIENT_CORE) -> Run:
    with sim_server(server_args, WORK / f"{label}.sim.err") as server:
        run = chunbot_run(label, executor, HTTP_MODEL.format(url=server.url), records,
                          SHARD_SIZE, data, ray_temp, server, core)
    (WORK / label / "stats.json").write_text(json.dumps(run.stats))
    return run


# ---------------------------------------------------------------------------------------
# tables

def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    print(f"\n{title}")
    for row in [headers, *rows]:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))


def run_tables(title: str, runs: list[Run]) -> None:
    table(title + ": time and rate",
          ["run", "wall s", "summary s", "stage s", "served s", "req/s wall", "req/s stage",
           "req/s served", "max in flight", "429s", "429 share"],
          [[r.label, fmt(r.wall_s, 1), fmt(r.summary_s, 1), fmt(r.stage_s, 1),
            fmt(r.served_s, 1), fmt(r.rate(r.wall_s)), fmt(r.rate(r.stage_s)),
            fmt(r.rate(r.served_s)), fmt(r.stats.get("max_in_flight")),
            fmt(r.stats.get("by_status", {}).get("429", 0)), pct(r.share_429)]
           for r in runs])
    table(title + ": CPU and memory",
          ["run", "driver CPU s", "wait4 CPU s", "tree CPU s", "procs",
           "CPU ms/req", "served CPU ms/req", "driver ms/req", "driver served ms/req",
           "driver RSS MB", "tree RSS MB"],
          [[r.label, fmt(r.driver_cpu_s, 2), fmt(r.wait4_cpu_s, 2), fmt(r.tree_cpu_s, 2),
            fmt(r.processes), fmt(r.per_request_ms(r.cpu_s), 3), fmt(r.served_cpu_ms, 3),
            fmt(r.per_request_ms(r.driver_cpu_s), 3), fmt(r.served_driver_ms, 3),
            fmt(r.driver_rss_mb),
            fmt(r.tree_rss_mb)] for r in runs])
    for r in runs:
        if r.processes > 1:
            print(f"  {r.label} tree CPU by process: " + ", ".join(
                f"{role} {seconds:.2f} s ({seconds * 1000 / r.requests:.3f} ms/req)"
                for role, seconds in r.roles.items()))
    for r in runs:
        print(f"  {r.label}: executor {r.executor}; {r.ok:,} records out, {r.failed:,} failed"
              + (f", sim saw {r.stats.get('requests', 0):,} requests {r.stats.get('by_status')}"
                 if r.stats else "")
              + (f"  [{r.error}]" if r.error else ""))


def rates_line(run: Run) -> str:
    """Answered/s per second of the run (from the 0.2 s polls)."""
    rates, last = [], None
    for point in run.timeline:
        if "answered" not in point:
            continue
        if last is None or point["t"] - last["t"] >= 1.0 or point is run.timeline[-1]:
            if last is not None and point["t"] > last["t"]:
                rates.append(round((point["answered"] - last["answered"])
                                   / (point["t"] - last["t"])))
            last = point
    return " ".join(map(str, rates))


# ---------------------------------------------------------------------------------------
# scenarios

def commit_figures(run: Run, shards: int) -> dict[str, float | None]:
    figures: dict[str, float | None] = {
        "commits/s stage": shards / run.stage_s if run.stage_s else None,
        "records/s stage": run.requests / run.stage_s if run.stage_s else None}
    window = run.commits()
    figures.update({"commits/s window": None, "records/s window": None,
                    "driver busy": None, "driver ms/commit": None, "driver us/record": None})
    if window:
        first, last = window
        span = last["t"] - first["t"]
        commits = last["parts"] - first["parts"]
        figures["commits/s window"] = commits / span
        figures["records/s window"] = commits * run.requests / shards / span
        if first.get("driver_cpu") is not None and last.get("driver_cpu") is not None:
            cpu = last["driver_cpu"] - first["driver_cpu"]
            figures["driver busy"] = cpu / span
            if commits:
                figures["driver ms/commit"] = cpu * 1000 / commits
                figures["driver us/record"] = cpu * 1e6 / (commits * run.requests / shards)
    return figures


def board_bench(calls: int, ray_temp: Path) -> dict[str, Any] | None:
    folder = WORK / "board"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "board.py").write_text(BOARD_SNIPPET.lstrip())
    env = {**os.environ, **LOOPBACK_RAY, "RAY_USAGE_STATS_ENABLED": "0"}
    run = run_measured("board actor", [str(PYTHON), str(folder / "board.py"), str(calls),
                                       str(ray_temp)],
                       ROOT, env, folder / "board.err", calls, core=None)
    if run.left_behind:
        print(f"    ! left running after the snippet exited (killed): "
              f"{', '.join(run.left_behind)}")
    lines = run.stdout.strip().splitlines()
    if run.error or not lines:
        print(f"  ! board snippet: {run.error or 'no output'} (see {folder / 'board.err'})")
        return None
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="A,B,C,D",
                        help="comma-separated, from A, B, C, D (default: all)")
    parser.add_argument("--requests", type=int, default=20000,
                        help="records per run, one request each (default 20,000)")
    parser.add_argument("--client-cores", default=CLIENT_CORE,
                        help="taskset core list for chunbot and its Ray in A and B "
                             f"(default {CLIENT_CORE}; e.g. 0,1 to let Ray use both)")
    parser.add_argument("--board-calls", type=int, default=5000,
                        help="Board calls per measurement in D (default 5,000)")
    args = parser.parse_args()
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not set(scenarios) <= set("ABCD") or args.requests < 1000 or args.board_calls < 100:
        parser.error("--scenarios takes letters from A,B,C,D; --requests at least 1,000; "
                     "--board-calls at least 100")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        sys.exit("needs two cores and taskset (util-linux)")

    n, cores = args.requests, args.client_cores
    began = time.perf_counter()
    data = write_data(n)
    ray_temp = Path(tempfile.mkdtemp(prefix="cbrb", dir="/tmp"))  # short: socket paths
    verdicts: list[tuple[str, str, str, bool]] = []  # scenario, target, measured, passed
    all_runs: list[Run] = []
    print(f"chunbot ray bench: {n:,} records per run, shard_size {SHARD_SIZE} (C: "
          f"{COMMIT_SHARD_SIZE}); A, B: chunbot on core(s) {cores}, sim on core {SERVER_CORE}; "
          f"Ray temp {ray_temp}")
    try:
        if "A" in scenarios:
            print("\nA. sim --latency-ms 200, no limits: local vs --executor ray")
            runs = [http_run("A-local", "local", LATENCY, n, data, ray_temp, cores),
                    http_run("A-ray", "ray", LATENCY, n, data, ray_temp, cores)]
            all_runs += runs
            run_tables("A. 200 ms latency", runs)
            for r in runs:
                print(f"  {r.label} answered/s each ~1 s: {rates_line(r)}")
            local, ray = runs
            if local.stage_s and ray.stage_s:
                print(f"  ray / local: req/s over stage secs {local.stage_s / ray.stage_s:.2f}x, "
                      f"over wall {local.wall_s / ray.wall_s:.2f}x; "
                      f"CPU per request {ray.cpu_s / local.cpu_s:.2f}x; driver peak RSS "
                      f"{ray.driver_rss_mb / local.driver_rss_mb:.2f}x")
            if ray.summary_s and ray.stage_s:
                print(f"  ray start-up and shutdown: wall {ray.wall_s:.1f} s - stage "
                      f"{ray.stage_s:.1f} s = {ray.wall_s - ray.stage_s:.1f} s "
                      f"(local: {local.wall_s - (local.stage_s or 0):.1f} s)")

        if "B" in scenarios:
            print(f"\nB. sim --latency-ms 200 --rpm {LIMIT_RPS * 60} ({LIMIT_RPS} req/s "
                  "announced): ray with 2 workers, and local")
            runs = [http_run("B-ray", "ray", LIMITED, n, data, ray_temp, cores),
                    http_run("B-local", "local", LIMITED, n, data, ray_temp, cores)]
            all_runs += runs
            run_tables(f"B. {LIMIT_RPS} req/s limit", runs)
            for r in runs:
                print(f"  {r.label} answered/s each ~1 s: {rates_line(r)}")
            ray = runs[0]
            rate = ray.rate(ray.stage_s) or 0.0
            served = ray.rate(ray.served_s)
            verdicts.append(("B", f"ray: >= {RATE_TARGET:.0%} of {LIMIT_RPS} req/s "
                                  "(over the stage's secs)",
                             f"{rate:,.0f} req/s = {rate / LIMIT_RPS:.0%} of the limit "
                             f"(over the sim's serving span: {fmt(served)})",
                             rate >= RATE_TARGET * LIMIT_RPS and not ray.error))
            share = ray.share_429
            verdicts.append(("B", f"ray: 429s < {SHARE_429_TARGET:.0%} of requests",
                             f"{pct(share)} ({ray.stats.get('by_status', {}).get('429', 0):,} "
                             f"of {ray.stats.get('requests', 0):,})",
                             share is not None and share < SHARE_429_TARGET and not ray.error))

        if "C" in scenarios:
            shards = -(-n // COMMIT_SHARD_SIZE)
            print(f"\nC. the driver's commit rate: in-process sim model (latency 0), "
                  f"shard_size {COMMIT_SHARD_SIZE} ({shards} shards; and ray with "
                  f"{SHARD_SIZE}), both cores")
            plan = [("C-ray", "ray", COMMIT_SHARD_SIZE), ("C-local", "local", COMMIT_SHARD_SIZE),
                    (f"C-ray-{SHARD_SIZE}", "ray", SHARD_SIZE)]
            runs = [chunbot_run(label, executor, SIM_MODEL, n, size, data, ray_temp, core=None)
                    for label, executor, size in plan]
            all_runs += runs
            rows, figures = [], {}
            for r, (_, _, size) in zip(runs, plan):
                f = figures[r.label] = commit_figures(r, -(-n // size))
                rows.append([r.label, fmt(size), fmt(r.wall_s, 1), fmt(r.stage_s, 1),
                             fmt(f["commits/s stage"]), fmt(f["records/s stage"]),
                             fmt(f["commits/s window"]), fmt(f["records/s window"]),
                             pct(f["driver busy"], 0), fmt(f["driver ms/commit"], 2),
                             fmt(f["driver us/record"], 1),
                             fmt(1000 / f["driver ms/commit"] if f["driver ms/commit"]
                                 else None),
                             fmt(r.per_request_ms(r.cpu_s), 3), fmt(r.driver_rss_mb)])
            table("C. commits ('window': first to last part file seen; 'ceiling': 1 / the "
                  "driver's CPU per commit, the rate with a core to itself)",
                  ["run", "shard", "wall s", "stage s", "commits/s", "records/s",
                   "commits/s window", "records/s window", "driver busy",
                   "driver ms/commit", "driver µs/record", "ceiling commits/s",
                   "CPU ms/rec", "driver RSS MB"], rows)
            for r in runs:
                print(f"  {r.label}: executor {r.executor}; {r.ok:,} records out, "
                      f"{r.failed:,} failed; tree CPU {r.cpu_s:.1f} s in {r.processes} "
                      "processes" + (f"  [{r.error}]" if r.error else ""))
            small = figures["C-ray"]["driver ms/commit"]
            large = figures[f"C-ray-{SHARD_SIZE}"]["driver ms/commit"]
            if small and large and large > small:
                per_record = (large - small) / (SHARD_SIZE - COMMIT_SHARD_SIZE)  # ms
                per_commit = max(0.0, small - COMMIT_SHARD_SIZE * per_record)
                ceilings = ", ".join(
                    f"{size:,}: {1000 * size / (per_commit + size * per_record):,.0f}"
                    for size in (100, 1000, 10000))
                print(f"  the ray driver's CPU ~ {per_commit:.2f} ms a commit + "
                      f"{per_record * 1000:.0f} µs a record; so with a core to itself it "
                      f"takes at most (records/s, by shard_size) {ceilings}")

        if "D" in scenarios:
            k = args.board_calls
            print(f"\nD. the Board actor: {k:,} share() calls per measurement, "
                  "a local Ray of its own (2 CPUs), unpinned")
            board = board_bench(k, ray_temp)
            if board is not None:
                rows = []
                for name, key, count in (("sequential, ray.get each", "sequential", k),
                                         (f"{k:,} at once", "burst", k),
                                         ("2 worker tasks at once, awaited one by one",
                                          "two workers", board["two workers calls"])):
                    seconds = board[key]
                    rows.append([name, fmt(count), fmt(seconds, 2), fmt(count / seconds),
                                 fmt(seconds * 1000 / count, 3)])
                table("D. Board.share() calls", ["calls", "n", "s", "calls/s", "ms/call"],
                      rows)
                expected = board["warm-up calls"] + 2 * k + board["two workers calls"] + 20
                print(f"  the actor counted {board['board calls']:,} calls "
                      f"(expected {expected:,})")
                for key, what in (("stream 1", "1 task, 1 event a yield"),
                                  ("stream 25", "1 task, 25 events a yield"),
                                  ("stream 25 x2", "2 tasks at once, 25 events a yield")):
                    seconds, taken, yields = board[key]
                    print(f"  the driver taking generator yields ({what}): "
                          f"{yields / seconds:,.0f} yields/s, {taken / seconds:,.0f} events/s")
                capacity = max(k / board["burst"], board["two workers calls"]
                               / board["two workers"])
                single = board["two workers calls"] / board["two workers"]
                table(f"D. what a {NODES}-node run asks of the board (one share() per worker "
                      f"every {SHARE_S} s while it runs a job)",
                      ["workers per node", "workers", "calls/s", "of 2-worker rate",
                       "of best rate"],
                      [[str(w), fmt(NODES * w), fmt(NODES * w / SHARE_S),
                        pct(NODES * w / SHARE_S / single, 0),
                        pct(NODES * w / SHARE_S / capacity, 0)] for w in WORKERS_PER_NODE])
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)

    for r in all_runs:
        verdicts.append((r.label[0], f"{r.label}: exit 0, all records out, nothing left "
                                     "running",
                         "ok" if not r.error and not r.left_behind else
                         "; ".join(filter(None, [r.error, r.left_behind and
                                                 "left: " + ", ".join(r.left_behind)])),
                         not r.error and not r.left_behind))
    print(f"\nSummary ({n:,} records per run; {time.perf_counter() - began:.0f} s in all)")
    width = max((len(v[1]) for v in verdicts), default=0)
    for scenario, target, measured, passed in verdicts:
        print(f"  {scenario}  {target.ljust(width)}  {'PASS' if passed else 'FAIL'}  {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
