"""rayexec.py and `run --executor ray`: shard jobs on a real local Ray cluster, started by
the run itself on this machine; every process a test starts is killed by pid at its end."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import chunbot, kill_all, read_stage, write_jsonl

# before Ray is imported: every Ray process of these tests on loopback, with no token
for _name, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                      "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_name, _value)
ray = pytest.importorskip("ray")

from chunbot_cli import rayexec  # noqa: E402
from chunbot_cli.stages import Batch  # noqa: E402
from chunbot_cli.state import Counters  # noqa: E402

PIPELINE = """
name: spread
input: data.jsonl
id_field: id
shard_size: 25
models:
  small: {{provider: sim, model: sim-small, latency_ms: {latency}, max_concurrency: 8,
          request_log: requests.log}}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment of: {{{{ text }}}}"
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "Write an apology for: {{{{ text }}}}"
"""
TEXTS = ["great, I love it", "it broke, terrible", "okay I guess"]
ENV = {"CHUNBOT_RAY_TEMP": "/tmp/cbray"}  # socket paths must stay short


def make(project: Path, n: int = 300, latency: int = 5) -> Path:
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:04d}", "text": f"{TEXTS[i % 3]} #{i}"} for i in range(n)])
    (project / "p.yaml").write_text(PIPELINE.format(latency=latency))
    return project / "p.yaml"


def logged(project: Path) -> list[str]:
    log = project / "requests.log"
    return [json.loads(line)["key"] for line in log.read_text().splitlines()] \
        if log.exists() else []


def descendants(pid: int) -> list[int]:
    """Every live process under `pid`, from /proc (Ray's raylet, GCS and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chunbot_cli", *args], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **ENV})


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def expected_ids(n: int = 300) -> tuple[list[str], list[str]]:
    ids = [f"r{i:04d}" for i in range(n)]
    return ids, ids[1::3]


def test_the_board_adds_up_the_other_workers_concurrency_and_forgets_idle_ones():
    now = [0.0]
    board = rayexec.Board(clock=lambda: now[0])
    board.expect(3)
    endpoint = ("m", "http://127.0.0.1:9/v1")
    board.share("a", {"m": (600.0, None)}, {endpoint: 120.0}, stale_s=2.0)
    board.share("b", {}, {endpoint: 80.0}, stale_s=2.0)
    # a third worker, before its first reply: the limit a server announced to one of
    # them, and the others' concurrency (its share of it: 200 / 3)
    assert board.share("c", {}, {}, stale_s=2.0) == (3, {"m": (600.0, None)},
                                                      {endpoint: 200.0})
    now[0] = 3.0  # a and b have not been heard from for longer than stale_s: not at work
    assert board.share("c", {}, {endpoint: 70.0}, stale_s=2.0)[2] == {}


def test_a_worker_sends_the_records_out_of_a_stage_only_when_they_are_the_output():
    sent: queue.SimpleQueue = queue.SimpleQueue()
    batch, counts = Batch([0, 1], [{"a": 1}, {"a": 2}]), Counters()
    rayexec._Recorder(sent, None, "last").passed("last", 0, batch, b"lines", counts)
    rayexec._Recorder(sent, "lines", "last").passed("first", 0, batch, b"lines", None)
    rayexec._Recorder(sent, "lines", "last").passed("last", 0, batch, b"lines", None)
    rayexec._Recorder(sent, "records", "last").passed("last", 0, batch, b"lines", None)
    assert [sent.get_nowait() for _ in range(sent.qsize())] == [
        ("passed", "last", 0, Batch([], []), b"", counts),  # counted, nothing streamed
        ("passed", "last", 0, Batch([0, 1], []), b"lines", None),
        ("passed", "last", 0, batch, b"lines", None)]


def test_a_ray_run_writes_what_a_local_run_writes(project):
    pipeline = make(project)
    ran = chunbot("run", str(pipeline), "--executor", "ray", "-q", "--no-cache", cwd=project,
                  timeout=180, env=ENV)
    assert ran.returncode == 0, ran.stderr.decode()
    assert b"executor: Ray" in ran.stderr
    local = chunbot("run", str(pipeline), "-q", "--no-cache", "--workdir", "local",
                    cwd=project)
    assert local.returncode == 0
    for stage in ("sentiment", "reply"):
        assert chunbot("diff", f"runs/spread/{stage}", f"local/{stage}",
                       cwd=project).returncode == 0
        parts = sorted((project / "runs/spread" / stage).glob("part-*.jsonl"))
        assert [p.read_bytes() for p in parts] == \
            [(project / "local" / stage / p.name).read_bytes() for p in parts]
        traces = sorted((project / "runs/spread" / stage).glob("trace-*.jsonl"))
        assert [[(t["_id"], t["request"]) for t in map(json.loads, p.read_text().splitlines())]
                for p in traces] == \
            [[(t["_id"], t["request"]) for t in map(json.loads, (
                project / "local" / stage / p.name).read_text().splitlines())] for p in traces]
        assert len(traces) == len(parts)
    status = chunbot("status", str(pipeline), "--json", cwd=project)
    assert all(s["state"] == "fresh" for s in json.loads(status.stdout)["stages"])
    traced = json.loads(chunbot("trace", str(pipeline), "r0001", "--json", cwd=project).stdout)
    assert [s["stage"] for s in traced["stages"]] == ["sentiment", "negatives", "reply"]
    assert traced["stages"][0]["trace"]["request"]["messages"]
    again = chunbot("run", str(pipeline), "-q", cwd=project)  # moves to the local executor
    assert again.returncode == 0 and b"nothing to do" in again.stderr
    rerun = chunbot("rerun", str(pipeline), "--stage", "reply", "-q", cwd=project)
    assert rerun.returncode == 0
    assert chunbot("diff", "runs/spread/reply.prev", "runs/spread/reply",
                   cwd=project).returncode == 0


def test_the_workers_cache_adds_up_in_the_summary_and_serves_the_next_run(project):
    pipeline = make(project)
    first = chunbot("run", str(pipeline), "--executor", "ray", cwd=project, timeout=180,
                    env=ENV)
    assert first.returncode == 0, first.stderr.decode()
    assert b"local cache: 0 of 400 records answered (0%)" in first.stderr
    sent = len(logged(project))
    again = chunbot("run", str(pipeline), "--executor", "ray", "--workdir", "again",
                    cwd=project, timeout=180, env=ENV)
    assert again.returncode == 0, again.stderr.decode()
    assert b"local cache: 400 of 400 records answered (100%)" in again.stderr
    assert len(logged(project)) == sent  # every reply came from what the workers stored


def test_without_ray_the_flag_names_the_install_command(project):
    blocker = project / "noray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no ray here')\n")
    pipeline = make(project, n=3)
    result = chunbot("run", str(pipeline), "--executor", "ray", cwd=project,
                     env={"PYTHONPATH": str(project / "noray")})
    assert result.returncode == 2
    assert b"pip install 'chunbot[ray]'" in result.stderr
    assert b"Traceback" not in result.stderr
    assert not logged(project)


def test_a_worker_killed_mid_run_costs_only_its_requests_in_flight(project):
    pipeline = make(project, latency=40)
    process = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline),
                                "--executor", "ray", "-q", "--stream"], cwd=project,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **ENV})
    started: list[int] = []
    try:
        wait_for(lambda: len(logged(project)) >= 60, timeout=90)
        started = descendants(process.pid)
        workers = [p for p in started if "ray::_run_remote" in command_line(p)]  # busy ones
        assert workers, [command_line(p) for p in started]
        os.kill(workers[0], signal.SIGKILL)
        out, err = process.communicate(timeout=180)
    finally:
        kill_all([process.pid, *started, *descendants(process.pid)])
    assert process.returncode == 0, err.decode()
    assert b"worker was lost" in err
    ids, replies = expected_ids()
    bad = [line for line in out.splitlines() if not line.startswith(b"{")]
    assert not bad, bad[:3]
    streamed = [json.loads(line)["_id"] for line in out.splitlines()]
    assert sorted(streamed) == replies  # --stream: each record once, the lost job's too
    assert [r["_id"] for r in read_stage(project / "runs/spread", "sentiment")] == ids
    assert [r["_id"] for r in read_stage(project / "runs/spread", "reply")] == replies
    sent = logged(project)
    assert len(sent) - len(set(sent)) <= 8 * 2  # at most the killed worker's in flight


def test_a_driver_killed_mid_run_is_finished_by_a_local_run(project):
    pipeline = make(project, latency=40)
    process = start(project, "run", str(pipeline), "--executor", "ray", "-q")
    started: list[int] = []
    try:
        wait_for(lambda: len(logged(project)) >= 60, timeout=90)
        started = descendants(process.pid)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        kill_all([*started, *descendants(process.pid)])
    assert process.returncode == -9
    before = logged(project)
    assert len(before) < 300 + 100, "the kill should land mid-run"
    finished = chunbot("run", str(pipeline), "-q", cwd=project, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()
    ids, replies = expected_ids()
    assert [r["_id"] for r in read_stage(project / "runs/spread", "sentiment")] == ids
    assert [r["_id"] for r in read_stage(project / "runs/spread", "reply")] == replies
    sent = logged(project)
    assert len(sent) - len(set(sent)) <= 2 * 2 * 8  # only what was in flight went again


def test_workers_share_a_servers_announced_rate_limit(project, sim_server):
    server = sim_server("--rpm", "2400")  # 40 requests a second, announced in its headers
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:04d}", "text": f"{TEXTS[i % 3]} #{i}"} for i in range(600)])
    (project / "p.yaml").write_text(f"""
name: limited
input: data.jsonl
shard_size: 25
models:
  m: {{provider: openai, model: sim-small, base_url: "{server.url}/v1"}}
stages:
  - {{name: sentiment, model: m, prompt: "Label the sentiment of: {{{{ text }}}}"}}
""")
    ran = chunbot("run", "p.yaml", "--executor", "ray", "-q", "--no-cache", cwd=project,
                  timeout=180, env={**ENV, "OPENAI_API_KEY": "sk-test"})
    assert ran.returncode == 0, ran.stderr.decode()
    stats = server.stats()
    throttled = stats["by_status"].get("429", 0)
    assert stats["answered"] == 600
    # two workers at one budget: the first requests of each, sent before any reply told
    # them the limit, may meet 429s; after that, 1/2 each keeps them under it
    assert throttled <= 2 * 16 + 0.02 * 600, stats["by_status"]
    seconds = float(ran.stderr.decode().rsplit("s, exit", 1)[0].rsplit()[-1])
    assert seconds > 600 / 40 * 0.8  # and it was the limit that paced them


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_joins_a_two_node_cluster_by_its_address(project):
    from ray.cluster_utils import Cluster

    Path("/tmp/ray").mkdir(exist_ok=True)  # where Ray notes the address of its last cluster
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "gcs_server_port": free_port(), "include_dashboard": False,
        "object_store_memory": 100 * 1024 * 1024, "temp_dir": "/tmp/cbray2"})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
        cluster.wait_for_nodes(timeout=60)
        pipeline = make(project, n=200)
        ran = chunbot("run", str(pipeline), "--ray-address", cluster.address, "-q",
                      "--no-cache", cwd=project, timeout=180, env=ENV)
        assert ran.returncode == 0, ran.stderr.decode()
        assert b"executor: Ray, 2 CPUs" in ran.stderr
        ids, replies = expected_ids(200)
        assert [r["_id"] for r in read_stage(project / "runs/spread", "sentiment")] == ids
        assert [r["_id"] for r in read_stage(project / "runs/spread", "reply")] == replies
    finally:
        cluster.shutdown()
