"""Throughput benchmark: chunbot's request rate against `chunbot sim serve`, beside a raw
aiohttp loop and two peers (the official openai SDK and bespokelabs-curator).

Every side sends the same N requests (20,000 by default) of about 200 prompt tokens (a
generated review of ~800 characters, different for each request) and `max_tokens: 50` to
the sim's OpenAI route. The sim runs in its own process pinned to core 1, the client under
test in its own process pinned to core 0, and each side gets a fresh sim, so counters and
rate-limit buckets start clean. For each side it measures:

- wall seconds from the client's start to its exit, and req/s = N / wall;
- the steady rate: answered requests per second between 10% and 90% of N answered, read
  from the sim's /stats, which is polled every 0.5 s (answered, 429s, in flight), so it
  leaves out start-up and the tail;
- the client's CPU seconds (user + sys, from os.wait4) and CPU ms per request, its peak RSS;
- from the sim: requests, 429s, peak in flight, and the sim's own CPU share (it must not be
  the bottleneck).

Scenarios (one table each, then a summary of the targets with PASS/FAIL):

  A  latency 0, no limits: chunbot beside a raw aiohttp + orjson loop (256 in flight).
     Target: chunbot >= 0.8 x the raw loop's req/s.
  B  sim --latency-ms 300 --jitter-ms 100 --rpm 60000, nothing configured in chunbot's
     YAML. Targets: the rolling 1 s rate reaches 950 req/s (95% of the limit) within 10 s;
     429s < 2% of the requests sent after a 10 s warm-up.
  C  latency 2,000 ms, no limits. Target: >= 1,000 requests in flight, unconfigured.
  D  the load of B for two peers, each beside chunbot: openai's AsyncOpenAI (with
     DefaultAioHttpClient when the installed version has it) + asyncio.Semaphore(256), and
     bespokelabs-curator. Target: chunbot at least as fast as the fastest peer, with less
     CPU per request than every peer.

chunbot runs a generated pipeline (one LLM stage, provider openai, nothing about
concurrency or limits) as `chunbot run pipeline.yaml` + CHUNBOT_FLAGS, its workdir removed
first. The peers live in their own venvs under bench/out/ (never in chunbot's
dependencies), created with `python3 -m venv` + pip on first use; a peer whose install
fails is skipped. Everything this writes goes under bench/out/ (gitignored): data,
pipeline, client scripts and logs in bench/out/throughput/, each side's /stats timeline
as JSON beside them.

    .venv/bin/python bench/throughput.py                   # all scenarios, ~4 min (+1 min of
                                                           # peer installs the first time)
    .venv/bin/python bench/throughput.py --scenarios A --requests 5000   # quicker

Needs taskset (util-linux) and two cores; only loopback addresses are used. Any python3
can run this script itself (stdlib only); the clients run in their own interpreters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "throughput"
CHUNBOT = ROOT / ".venv" / "bin" / "chunbot"
CHUNBOT_PYTHON = ROOT / ".venv" / "bin" / "python"

CHUNBOT_FLAGS = ["--quiet"]  # `--no-cache` is added when `chunbot run --help` offers it
CLIENT_CORE, SERVER_CORE = "0", "1"
PROMPT_CHARS = 800  # ~200 tokens at the sim's ~4 characters per token
MAX_TOKENS = 50
PEER_CONCURRENCY = 256  # the raw loop's and the openai SDK's semaphore
POLL_S = 0.5
SIDE_TIMEOUT_S = 600  # a side still running after 10 minutes is killed
INSTALL_TIMEOUT_S = 1200

LIMITED = ["--latency-ms", "300", "--jitter-ms", "100", "--rpm", "60000"]
LIMIT_RPS = 1000  # --rpm 60000
RAMP_RPS = 950  # 95% of the limit
WARMUP_S = 10.0
SERVER_ARGS = {"A": [], "B": LIMITED, "C": ["--latency-ms", "2000"], "D": LIMITED}

# Each peer lives in its own venv (they pin different openai versions), never in chunbot's.
PEERS = {
    "openai": {"venv": OUT / "peers-openai", "packages": ["openai[aiohttp]"],
               "versions": ["openai", "httpx2", "httpx", "httpx-aiohttp", "aiohttp"]},
    "curator": {"venv": OUT / "peers-curator", "packages": ["bespokelabs-curator"],
                "versions": ["bespokelabs-curator", "litellm", "openai", "aiohttp"]},
}

# ---------------------------------------------------------------------------------------
# The client scripts. Each reads data.jsonl, sends one request per record and prints one
# JSON line at the end: {"ok": n, "failed": n, ...}.

RAW_LOOP = '''
"""Raw loop: aiohttp + orjson, 256 in flight (TCPConnector(limit=256) + a semaphore)."""
import asyncio, sys
from collections import Counter
import aiohttp, orjson

async def main(base_url, data, concurrency):
    texts = [orjson.loads(line)["text"] for line in open(data, "rb")]
    statuses = Counter()
    semaphore = asyncio.Semaphore(concurrency)
    url = base_url + "/chat/completions"
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(text):
            body = orjson.dumps({"model": "sim-small", "max_tokens": %(max_tokens)d,
                                 "messages": [{"role": "user", "content": text}]})
            async with semaphore:
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        if response.status == 200:
                            orjson.loads(payload)["choices"][0]["message"]["content"]
                        statuses[response.status] += 1
                except aiohttp.ClientError as e:
                    statuses[type(e).__name__] += 1
        await asyncio.gather(*(one(text) for text in texts))
    ok = statuses.pop(200, 0)
    print(orjson.dumps({"ok": ok, "failed": sum(statuses.values()),
                        "errors": {str(k): v for k, v in statuses.items()}}).decode())

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
'''

OPENAI_SDK = '''
"""The official openai SDK: AsyncOpenAI + asyncio.Semaphore, the SDK's default retries."""
import asyncio, json, sys
import openai

async def main(base_url, data, concurrency):
    texts = [json.loads(line)["text"] for line in open(data, "rb")]
    try:
        http_client, transport = openai.DefaultAioHttpClient(), "DefaultAioHttpClient"
    except Exception:  # an older SDK, or the aiohttp extra missing
        http_client, transport = None, "default httpx client"
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sim", http_client=http_client)
    semaphore = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "failed": 0}
    errors = {}

    async def one(text):
        async with semaphore:
            try:
                reply = await client.chat.completions.create(
                    model="sim-small", max_tokens=%(max_tokens)d,
                    messages=[{"role": "user", "content": text}])
                reply.choices[0].message.content
                counts["ok"] += 1
            except openai.OpenAIError as e:
                counts["failed"] += 1
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1

    await asyncio.gather(*(one(text) for text in texts))
    await client.close()
    print(json.dumps({**counts, "errors": errors, "transport": transport,
                      "max_retries": client.max_retries}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
'''

CURATOR = '''
"""bespokelabs-curator, backend "openai" pointed at the sim's base URL."""
import json, sys
from bespokelabs import curator

class Reviews(curator.LLM):
    def prompt(self, row):
        return row["text"]

    def parse(self, row, response):
        return {"id": row["id"], "answer": response}

def main(base_url, data):
    rows = [json.loads(line) for line in open(data, "rb")]
    # Two settings keep curator from measuring its defaults instead of its speed:
    # - the sim announces its RPM limit in x-ratelimit-* headers but no token limit, and
    #   curator then assumes 100,000 tokens per minute and ~4,300 tokens per request for a
    #   model it does not know (about 7 req/s): lift that assumed token limit;
    # - curator retries replies cut by max_tokens (finish_reason "length") up to 10 times,
    #   and most replies here are cut at 50 tokens: accept them, as the other sides do.
    llm = Reviews(model_name="sim-small", backend="openai",
                  generation_params={"max_tokens": %(max_tokens)d},
                  backend_params={"base_url": base_url, "api_key": "sim",
                                  "max_tokens_per_minute": 10**10,
                                  "invalid_finish_reasons": ["content_filter"]})
    result = llm(rows)
    dataset = getattr(result, "dataset", result)
    ok = sum(1 for row in dataset if row.get("answer") is not None)
    print(json.dumps({"ok": ok, "failed": len(rows) - ok}))

main(sys.argv[1], sys.argv[2])
'''

PIPELINE = """\
name: throughput
input: data.jsonl
id_field: id
shard_size: 10000
models:
  simhttp: {{provider: openai, model: sim-small, base_url: "{base_url}"}}
stages:
  - name: answer
    model: simhttp
    prompt: "{{{{ text }}}}"
    params: {{max_tokens: {max_tokens}}}
"""

# Review-like prompt text; it avoids the words that make the sim answer a special task
# (sentiment, JSON, summary, apology, reply, translation), so replies are plain text.
PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor",
            "keyboard", "tent", "vacuum cleaner", "hair dryer", "electric toothbrush"]
SENTENCES = [
    "I bought this {p} {n} weeks ago and I have mixed feelings about it.",
    "The build quality is solid and it does what the box promises.",
    "The lid is stiff and the handle gets warm after a couple of minutes.",
    "The instructions were confusing and the packaging was damaged when it arrived.",
    "Customer service answered quickly and offered a discount on my next order.",
    "It is loud enough to hear from the next room, which I did not expect.",
    "The price was fair for what you get, and the cord is long enough for my counter.",
    "My partner uses the {p} every morning and has not had a single problem so far.",
    "After {n} days the battery still lasts a full day of normal use.",
    "The colour is a little darker than in the photos but it looks nice in the kitchen.",
    "Setting it up took about {n} minutes, most of it spent finding the right cable.",
    "It is lighter than my old {p}, which makes it easier to carry around the house.",
    "The buttons feel cheap and one of them sticks now and then.",
    "Delivery took {n} days longer than promised, though the courier was friendly.",
    "For the money I expected a little more from a brand with this reputation.",
    "Overall it does the job and I would probably buy it again at a lower price.",
]


def review(index: int, rng: random.Random) -> str:
    product = rng.choice(PRODUCTS)
    text = f"Review {index} of a {product}."
    while len(text) < PROMPT_CHARS:
        text += " " + rng.choice(SENTENCES).format(p=product, n=rng.randint(2, 9))
    return text[:PROMPT_CHARS].rsplit(" ", 1)[0]


def write_inputs(requests: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20000)
    data = WORK / "data.jsonl"
    with open(data, "w") as f:
        for i in range(requests):
            f.write(json.dumps({"id": f"r{i:06d}", "text": review(i, rng)}) + "\n")
    for name, source in (("raw_loop.py", RAW_LOOP), ("openai_sdk.py", OPENAI_SDK),
                         ("curator_side.py", CURATOR)):
        (WORK / name).write_text(source.lstrip() % {"max_tokens": MAX_TOKENS})
    (WORK / "logs").mkdir(exist_ok=True)
    return data


def chunbot_flags() -> list[str]:
    usage = subprocess.run([str(CHUNBOT), "run", "--help"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "200"}).stdout
    return CHUNBOT_FLAGS + (["--no-cache"] if "--no-cache" in usage else [])


# ---------------------------------------------------------------------------------------
# Peer venvs

def peer_python(name: str) -> tuple[Path | None, str]:
    """The peer's venv python, creating the venv on first use; (None, why) if that fails."""
    peer = PEERS[name]
    venv = peer["venv"]
    python = venv / "bin" / "python"
    marker = venv / "installed.txt"
    if marker.exists() and python.exists():
        return python, marker.read_text().strip()
    print(f"  setting up peer '{name}': python3 -m venv {venv.relative_to(ROOT)} && "
          f"pip install {' '.join(peer['packages'])}", flush=True)
    started = time.perf_counter()
    try:
        subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True,
                       timeout=120, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *peer["packages"]],
                       check=True, timeout=INSTALL_TIMEOUT_S, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return None, f"pip install timed out after {INSTALL_TIMEOUT_S} s"
    except (subprocess.CalledProcessError, OSError) as e:
        output = getattr(e, "stderr", None) or getattr(e, "stdout", None) or str(e)
        tail = output.strip().splitlines()[-3:] if isinstance(output, str) else [str(e)]
        return None, f"install failed: {' | '.join(tail)}"
    versions = subprocess.run(
        [str(python), "-c", "import sys, importlib.metadata as m\n"
         "for n in sys.argv[1:]:\n"
         "    try: print(f'{n} {m.version(n)}', end='; ')\n"
         "    except m.PackageNotFoundError: pass", *peer["versions"]],
        capture_output=True, text=True, timeout=60).stdout.strip().rstrip(";")
    info = f"{versions} (installed in {time.perf_counter() - started:.0f} s)"
    marker.write_text(info + "\n")
    print(f"  peer '{name}' ready: {info}", flush=True)
    return python, info


def curator_env(python: Path) -> dict[str, str]:
    """Curator offline: tiktoken's file from litellm's package, a fresh cache, no telemetry."""
    site = subprocess.run([str(python), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    cache = WORK / "curator-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    return {**os.environ,
            "TIKTOKEN_CACHE_DIR": f"{site}/litellm/litellm_core_utils/tokenizers",
            "CURATOR_CACHE_DIR": str(cache), "TELEMETRY_ENABLED": "false",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HOME": str(cache / "hf"),
            "COLUMNS": "200",  # its log lines are wrapped to the terminal's width
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# ---------------------------------------------------------------------------------------
# The sim server and one measured side

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
                                   start_new_session=True)
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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    side: str
    requests: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    rss_mb: float = 0.0
    exit_code: int | None = None
    error: str | None = None  # why the side failed, if it did
    report: dict[str, Any] = field(default_factory=dict)  # the client's own counts
    stats: dict[str, Any] = field(default_factory=dict)  # the sim's /stats at the end
    timeline: list[dict[str, float]] = field(default_factory=list)
    server_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_s * 1000 / self.requests

    def steady_rps(self) -> float | None:
        """Answered/s between the polls at 10% and 90% of the requests answered."""
        low = next((p for p in self.timeline if p["answered"] >= 0.1 * self.requests), None)
        high = next((p for p in reversed(self.timeline)
                     if p["answered"] <= 0.9 * self.requests), None)
        if low is None or high is None or high["t"] - low["t"] < 1.0:
            return None
        return (high["answered"] - low["answered"]) / (high["t"] - low["t"])

    def rolling_rates(self) -> list[tuple[float, float]]:
        """(t, answered/s over the last ~1 s) at each poll."""
        rates, j = [], 0
        for point in self.timeline:
            while j + 1 < len(self.timeline) and self.timeline[j + 1]["t"] <= point["t"] - 1.0:
                j += 1
            start = self.timeline[j]
            if point["t"] - start["t"] >= 1.0:
                rates.append((point["t"], (point["answered"] - start["answered"])
                              / (point["t"] - start["t"])))
        return rates

    def time_to_rate(self, rate: float) -> float | None:
        return next((t for t, r in self.rolling_rates() if r >= rate), None)

    def share_429_after(self, warmup: float) -> float | None:
        start = next((p for p in self.timeline if p["t"] >= warmup), None)
        end = self.timeline[-1] if self.timeline else None
        if start is None or end is start or end["requests"] == start["requests"]:
            return None
        return (end["429"] - start["429"]) / (end["requests"] - start["requests"])

    @property
    def count_429(self) -> int:
        return self.stats.get("by_status", {}).get("429", 0)


def timeline_point(t: float, stats: dict[str, Any]) -> dict[str, float]:
    return {"t": round(t, 3), "answered": stats["answered"], "requests": stats["requests"],
            "429": stats["by_status"].get("429", 0), "in_flight": stats["in_flight"]}


def run_side(scenario: str, side: str, requests: int, server_args: list[str],
             client: Callable[[Server], tuple[list[str], Path, dict[str, str] | None]],
             check: Callable[[Result], None] | None = None) -> Result:
    """Start a fresh sim, run one client pinned to its core, poll /stats meanwhile."""
    result = Result(side, requests)
    logs = WORK / "logs"
    name = f"{scenario}-{side.split()[0]}"
    stdout_path = logs / f"{name}.out"
    print(f"  {scenario}: running {side} ...", end="", flush=True)
    with sim_server(server_args, logs / f"{name}.sim.err") as server:
        argv, cwd, env = client(server)
        server_cpu = cpu_seconds(server.pid)
        with open(stdout_path, "w") as out, open(logs / f"{name}.err", "w") as err:
            started = time.perf_counter()
            process = subprocess.Popen(["taskset", "-c", CLIENT_CORE, *argv], cwd=cwd, env=env,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                       start_new_session=True)
        ended: dict[str, Any] = {}

        def reap() -> None:  # wait4, not Popen.wait: it returns the child's rusage
            _, status, usage = os.wait4(process.pid, 0)
            ended.update(at=time.perf_counter(), status=status, usage=usage)

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        next_poll, killed = started, False
        try:
            while waiter.is_alive():  # ends: the client exits, or is killed at the deadline
                now = time.perf_counter()
                if now >= next_poll:
                    try:
                        result.timeline.append(timeline_point(time.perf_counter() - started,
                                                              get_stats(server)))
                    except OSError:
                        pass  # a slow poll is skipped, not fatal
                    next_poll = max(next_poll + POLL_S, time.perf_counter())
                if now - started > SIDE_TIMEOUT_S and not killed:
                    os.killpg(process.pid, signal.SIGKILL)
                    killed = True
                waiter.join(timeout=max(0.0, min(next_poll - time.perf_counter(), POLL_S)))
        finally:
            # not waiter.is_alive(): a Ctrl-C inside join() marks the thread stopped (3.11)
            if "status" not in ended:  # interrupted: don't leave the client running
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                waiter.join(timeout=10)
        process.returncode = result.exit_code = os.waitstatus_to_exitcode(ended["status"])
        result.wall_s = ended["at"] - started
        result.cpu_s = ended["usage"].ru_utime + ended["usage"].ru_stime
        result.rss_mb = ended["usage"].ru_maxrss / 1024
        result.stats = get_stats(server)
        result.server_cpu_s = cpu_seconds(server.pid) - server_cpu
        result.timeline.append(timeline_point(result.wall_s, result.stats))
    lines = stdout_path.read_text().strip().splitlines()
    if lines and lines[-1].startswith("{"):
        try:
            result.report = json.loads(lines[-1])
        except ValueError:
            pass
    if killed:
        result.error = f"killed after {SIDE_TIMEOUT_S} s"
    elif result.exit_code != 0:
        result.error = f"exit {result.exit_code} (see {(logs / name).relative_to(ROOT)}.err)"
    if check is not None:
        check(result)
    if result.report.get("failed"):
        result.error = (result.error or "") + f" {result.report['failed']} failed"
    (logs / f"{name}.timeline.json").write_text(json.dumps(result.timeline))
    print(f" {result.wall_s:.1f} s" + (f"  [{result.error.strip()}]" if result.error else ""),
          flush=True)
    return result


# ---------------------------------------------------------------------------------------
# The sides

def chunbot_client(flags: list[str]) -> Callable[[Server], tuple[list[str], Path, None]]:
    def client(server: Server) -> tuple[list[str], Path, None]:
        (WORK / "pipeline.yaml").write_text(PIPELINE.format(base_url=server.url + "/v1",
                                                            max_tokens=MAX_TOKENS))
        shutil.rmtree(WORK / "runs", ignore_errors=True)
        return [str(CHUNBOT), "run", "pipeline.yaml", *flags], WORK, None
    return client


def chunbot_check(result: Result) -> None:
    """chunbot prints no JSON line: count its output and error records instead."""
    stage = WORK / "runs" / "throughput" / "answer"
    ok = sum(sum(1 for _ in open(p)) for p in stage.glob("part-*.jsonl")
             if not p.name.endswith(".trace.jsonl"))
    errors = stage / "errors.jsonl"
    failed = sum(1 for _ in open(errors)) if errors.exists() else 0
    result.report = {"ok": ok, "failed": failed}
    if ok + failed != result.requests and result.error is None:
        result.error = f"{ok} records out of {result.requests}"


def script_client(python: Path, script: str, data: Path, extra: list[str],
                  env: Callable[[], dict[str, str]] | None = None):
    def client(server: Server) -> tuple[list[str], Path, dict[str, str] | None]:
        argv = [str(python), str(WORK / script), server.url + "/v1", str(data), *extra]
        return argv, WORK, env() if env else None
    return client


# ---------------------------------------------------------------------------------------
# Tables

def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def pct(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


COLUMNS: dict[str, tuple[str, Callable[[Result], str]]] = {
    "wall": ("wall s", lambda r: fmt(r.wall_s, 1)),
    "rps": ("req/s", lambda r: fmt(r.rps)),
    "steady": ("steady req/s", lambda r: fmt(r.steady_rps())),
    "cpu": ("CPU s", lambda r: fmt(r.cpu_s, 1)),
    "cpu1k": ("CPU s/1k req", lambda r: fmt(r.cpu_ms_per_request, 2)),
    "cpums": ("CPU ms/req", lambda r: fmt(r.cpu_ms_per_request, 2)),
    "rss": ("peak RSS MB", lambda r: fmt(r.rss_mb)),
    "ramp": ("t to 950/s", lambda r: fmt(r.time_to_rate(RAMP_RPS), 1)),
    "n429": ("429s", lambda r: fmt(r.count_429)),
    "share429": ("429 share >10s", lambda r: pct(r.share_429_after(WARMUP_S))),
    "inflight": ("max in flight", lambda r: fmt(r.stats.get("max_in_flight"))),
    "answered": ("answered", lambda r: fmt(r.stats.get("answered"))),
    "server": ("sim CPU", lambda r: pct(r.server_cpu_s / r.wall_s if r.wall_s else None, 0)),
}


def print_table(title: str, results: list[Result], columns: list[str]) -> None:
    headers = ["side"] + [COLUMNS[c][0] for c in columns]
    rows = [[r.side] + [COLUMNS[c][1](r) for c in columns] for r in results]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    print(f"\n{title}")
    print("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                           for i, (h, w) in enumerate(zip(headers, widths))))
    for row in rows:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    for r in results:
        if r.error:
            print(f"  ! {r.side}: {r.error.strip()}")
    for r in results:
        answered = r.stats.get("answered") or 0
        if answered:
            print(f"  {r.side}: {r.stats['tokens_in'] / answered:.0f} prompt / "
                  f"{r.stats['tokens_out'] / answered:.0f} reply tokens per answered request; "
                  f"{r.stats['requests']:,} requests sent, by status {r.stats['by_status']}")


def print_rates(results: list[Result]) -> None:
    """Answered/s over the run, one figure per second (or per few seconds for long runs,
    at most ~40 figures), to see the ramp and any dip."""
    for r in results:
        step = max(1, math.ceil(r.wall_s / 40))
        rates, last = [], {"t": 0.0, "answered": 0}
        for point in r.timeline:
            if point["t"] - last["t"] >= step or point is r.timeline[-1]:
                span = point["t"] - last["t"]
                rates.append(round((point["answered"] - last["answered"]) / span)
                             if span > 0 else 0)
                last = point
        print(f"  {r.side} answered/s each ~{step} s: {' '.join(map(str, rates))}")


# ---------------------------------------------------------------------------------------
# Scenarios

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="A,B,C,D",
                        help="comma-separated, from A, B, C, D (default: all)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per side")
    args = parser.parse_args()
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    if not set(scenarios) <= set(SERVER_ARGS) or args.requests < 100:
        parser.error("--scenarios takes letters from A,B,C,D; --requests at least 100")
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        sys.exit("needs two cores and taskset (util-linux)")

    n = args.requests
    began = time.perf_counter()
    data = write_inputs(n)
    flags = chunbot_flags()
    print(f"chunbot throughput: {n:,} requests per side, prompts of ~{PROMPT_CHARS} characters, "
          f"max_tokens {MAX_TOKENS}; client on core {CLIENT_CORE}, sim on core {SERVER_CORE}")
    print(f"chunbot run flags: {' '.join(flags)}"
          + ("" if "--no-cache" in flags else "  (`chunbot run` has no --no-cache yet)"))
    chunbot = chunbot_client(flags)
    verdicts: list[tuple[str, str, str, bool]] = []  # scenario, target, measured, passed

    def chunbot_side(scenario: str) -> Result:
        return run_side(scenario, "chunbot", n, SERVER_ARGS[scenario], chunbot, chunbot_check)

    if "A" in scenarios:
        print("\nA. latency 0, no limits")
        raw = run_side("A", "raw aiohttp loop", n, [],
                       script_client(CHUNBOT_PYTHON, "raw_loop.py", data,
                                     [str(PEER_CONCURRENCY)]))
        ours = chunbot_side("A")
        results = [raw, ours]
        print_table("A. latency 0, no limits (CPU s/1k req = CPU ms/req)", results,
                    ["wall", "rps", "steady", "cpu", "cpu1k", "rss", "inflight", "server"])
        ratio = ours.rps / raw.rps if raw.rps else 0.0
        steady = ""
        if ours.steady_rps() and raw.steady_rps():
            steady = f" (steady rates: {ours.steady_rps() / raw.steady_rps():.2f}x)"
        verdicts.append(("A", "chunbot req/s >= 0.8 x raw loop",
                         f"{ours.rps:,.0f} vs {raw.rps:,.0f} req/s = {ratio:.2f}x{steady}",
                         ratio >= 0.8 and not ours.error))

    if "B" in scenarios:
        print("\nB. sim 300±100 ms, --rpm 60000; nothing configured in chunbot")
        ours = chunbot_side("B")
        print_table("B. 300±100 ms, 60,000 RPM (1,000 req/s)", [ours],
                    ["wall", "rps", "steady", "ramp", "n429", "share429", "inflight",
                     "cpums", "rss", "server"])
        print_rates([ours])
        ramp, share = ours.time_to_rate(RAMP_RPS), ours.share_429_after(WARMUP_S)
        best = max((rate for _, rate in ours.rolling_rates()), default=0.0)
        verdicts.append(("B", f"rolling 1 s rate >= {RAMP_RPS} req/s within {WARMUP_S:.0f} s",
                         ("never reached" if ramp is None else f"after {ramp:.1f} s")
                         + f" (best 1 s rate {best:,.0f})",
                         ramp is not None and ramp <= WARMUP_S and not ours.error))
        verdicts.append(("B", "429s < 2% of requests after 10 s",
                         pct(share), share is not None and share < 0.02 and not ours.error))

    if "C" in scenarios:
        print("\nC. sim latency 2,000 ms, no limits")
        ours = chunbot_side("C")
        print_table("C. latency 2,000 ms", [ours],
                    ["wall", "rps", "steady", "inflight", "cpums", "rss", "server"])
        print_rates([ours])
        peak = ours.stats.get("max_in_flight", 0)
        verdicts.append(("C", ">= 1,000 in flight without configuration", f"{peak:,}",
                         peak >= 1000 and not ours.error))

    if "D" in scenarios:
        print("\nD. peers under B's load (300±100 ms, --rpm 60000)")
        results = []
        openai_python, openai_info = peer_python("openai")
        if openai_python is None:
            print(f"  skipping the openai SDK: {openai_info}")
        else:
            results.append(run_side("D", "openai SDK", n, SERVER_ARGS["D"],
                                    script_client(openai_python, "openai_sdk.py", data,
                                                  [str(PEER_CONCURRENCY)])))
        curator_python, curator_info = peer_python("curator")
        if curator_python is None:
            print(f"  skipping curator: {curator_info}")
        else:
            results.append(run_side("D", "curator", n, SERVER_ARGS["D"],
                                    script_client(curator_python, "curator_side.py", data, [],
                                                  lambda: curator_env(curator_python))))
        peers = [r for r in results if not r.error]
        ours = chunbot_side("D")
        results.append(ours)
        print_table("D. peers beside chunbot, 300±100 ms, 60,000 RPM", results,
                    ["wall", "rps", "steady", "cpu", "cpums", "rss", "n429", "ramp",
                     "inflight", "answered", "server"])
        print_rates(results)
        for r in results:
            if r.side == "openai SDK":
                print(f"  openai SDK: {openai_info}; transport "
                      f"{r.report.get('transport', '?')}, max_retries "
                      f"{r.report.get('max_retries', '?')}")
            if r.side == "curator":
                print(f"  curator: {curator_info}; wall {r.wall_s:.1f} s includes its start-up "
                      f"probe and request-file preparation (steady rate excludes them)")
        if peers:
            best = max(peers, key=lambda r: r.rps)
            leanest = min(peers, key=lambda r: r.cpu_ms_per_request)
            verdicts.append(("D", "chunbot req/s >= fastest peer",
                             f"{ours.rps:,.0f} vs {best.side} {best.rps:,.0f} req/s",
                             ours.rps >= best.rps and not ours.error))
            verdicts.append(("D", "chunbot CPU ms/req < every peer",
                             f"{ours.cpu_ms_per_request:.2f} vs {leanest.side} "
                             f"{leanest.cpu_ms_per_request:.2f}",
                             ours.cpu_ms_per_request < leanest.cpu_ms_per_request
                             and not ours.error))
        else:
            verdicts.append(("D", "chunbot vs peers", "no peer ran", False))

    print(f"\nSummary ({n:,} requests per side; {time.perf_counter() - began:.0f} s in all)")
    width = max((len(v[1]) for v in verdicts), default=0)
    for scenario, target, measured, passed in verdicts:
        print(f"  {scenario}  {target.ljust(width)}  {'PASS' if passed else 'FAIL'}  {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
