"""`run --executor ray` when things go wrong, against real processes: a `chunbot sim serve`,
the chunbot driver, and Ray's own. A driver killed mid-run takes its work and the Ray it
started with it; the API keys reach the workers of a cluster whose nodes do not have them,
and nowhere else; `--max-cost` holds for the whole cluster. Every process a test starts is
killed by pid (or by its session) at its end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import chunbot, kill_all, read_stage, write_jsonl

# before Ray is imported: every Ray process of these tests on loopback, with no token
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
for _name, _value in RAY_ENV.items():
    os.environ.setdefault(_name, _value)
pytest.importorskip("ray")

from chunbot_cli import raycost, rayexec  # noqa: E402

CONCURRENCY = 16  # each worker's max_concurrency: requests in flight, per worker, at most
WORKERS = 2  # the CPUs of the Ray a run starts here (the machine's)


@pytest.fixture
def ray_temp():
    """A Ray temp folder of the test's own (short: Ray's socket paths must stay short)."""
    folder = Path(f"/tmp/cbrf-{uuid.uuid4().hex[:8]}")
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _pipeline(project: Path, url: str, records: int, shard_size: int, extra: str = "") -> None:
    write_jsonl(project / "data.jsonl", [{"id": f"r{i:05d}", "text": f"review number {i}"}
                                         for i in range(records)])
    (project / "p.yaml").write_text(f"""
name: faults
input: data.jsonl
id_field: id
shard_size: {shard_size}
models:
  m:
    provider: openai
    model: sim-small
    base_url: {url}/v1
    api_key_env: SIM_KEY
    max_concurrency: {CONCURRENCY}
{extra}stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment of: {{{{ text }}}}"
    params: {{max_tokens: 8}}
""")


def ray_processes(temp: Path) -> list[int]:
    """Live processes of any Ray session under `temp`: Ray keeps every process's logs
    there (the same test as the watchdog's, read here from /proc on its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith(f"{temp}/") for link in links):
            found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(step)
    return time.monotonic() - start


def test_a_killed_driver_takes_its_work_and_its_ray_with_it(project, sim_server, ray_temp):
    server = sim_server("--latency-ms", "40")
    _pipeline(project, server.url, records=2400, shard_size=600)  # each worker: a long job
    env = {**os.environ, "SIM_KEY": "k", "CHUNBOT_RAY_TEMP": str(ray_temp)}
    driver = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", "p.yaml",
                               "--executor", "ray", "-q", "--no-cache"], cwd=project,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started: list[int] = []
    try:
        wait_for(lambda: server.stats()["answered"] >= 150 or driver.poll() is not None, 90)
        started = ray_processes(ray_temp)
        assert len(started) > 5, "Ray's GCS, raylet, agents and workers"
        before = server.stats()
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        killed = time.monotonic()
        gone = wait_for(lambda: not ray_processes(ray_temp), timeout=5)
        time.sleep(max(0.0, killed + 0.5 - time.monotonic()))
        settled = server.stats()["requests"]
        time.sleep(1.0)
        after = server.stats()
    finally:
        kill_all([driver.pid, *started, *ray_processes(ray_temp)])
        driver.stderr.close()
    assert before["answered"] < 2400 - 300, "the kill should land mid-run"
    # within half a second of the kill no request starts any more (before the fix: ~1,400
    # in the 0.3 s the workers went on), and those that did were in flight, or about to be
    assert after["requests"] == settled, (settled, after["requests"])
    assert settled - before["requests"] <= 2 * WORKERS * CONCURRENCY, (before, settled)
    assert gone < 3.0  # every process of the Ray it started, the agents too, in seconds

    resumed = chunbot("run", "p.yaml", "-q", "--no-cache", cwd=project, timeout=120,
                      env={"SIM_KEY": "k"})
    assert resumed.returncode == 0, resumed.stderr.decode()
    records = read_stage(project / "runs" / "faults", "sentiment")
    assert len(records) == 2400 and len({r["_id"] for r in records}) == 2400
    # what went again is what was on the wire when the driver died and the replies then on
    # their way to its journal (measured: 47-83, with 32 in flight; before the fix,
    # 419-1,040: the workers ran on, their shards to the end)
    assert server.stats()["repeated"] <= 3 * WORKERS * CONCURRENCY, server.stats()


def test_a_board_lost_while_the_driver_lives_does_not_stop_the_run(project, sim_server,
                                                                   ray_temp):
    server = sim_server("--latency-ms", "40")
    _pipeline(project, server.url, records=1200, shard_size=100)
    driver = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", "p.yaml",
                               "--executor", "ray", "-q", "--no-cache"], cwd=project,
                              env={**os.environ, "SIM_KEY": "k",
                                   "CHUNBOT_RAY_TEMP": str(ray_temp)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started: list[int] = []
    try:
        wait_for(lambda: server.stats()["answered"] >= 200 or driver.poll() is not None, 90)
        started = ray_processes(ray_temp)
        boards = [pid for pid in started
                  if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Board")]
        assert boards, "the board is an actor process of its own"
        kill_all(boards)  # as the kernel's OOM killer would
        _, err = driver.communicate(timeout=120)
    finally:
        kill_all([driver.pid, *started, *ray_processes(ray_temp)])
    # the workers see their board die, ask Ray whether the job ended, and go on
    assert driver.returncode == 0, err.decode()[-3000:]
    assert b"DriverGone" not in err
    assert len(read_stage(project / "runs" / "faults", "sentiment")) == 1200


def _start_head(temp: Path, port: int, env: dict) -> subprocess.CompletedProcess:
    """`ray start --head` in a session of its own, as on a machine of its own: its
    processes are found by that session id when the test ends."""
    ray_cli = Path(sys.executable).parent / "ray"
    return subprocess.run(
        [str(ray_cli), "start", "--head", "--port", str(port), "--node-ip-address",
         "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false",
         "--disable-usage-stats", "--object-store-memory", str(100 * 1024 * 1024),
         "--temp-dir", str(temp)], env=env, capture_output=True, timeout=90,
        start_new_session=True)


def _session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _stop_cluster(temp: Path, session: int | None) -> None:
    """Kill every process of the cluster (bounded: 5 s), by its session and its folder."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = ray_processes(temp) + [int(p.name) for p in Path("/proc").iterdir()
                                      if p.name.isdigit() and session is not None
                                      and _session_of(int(p.name)) == session]
        if not pids:
            return
        kill_all(pids)
        time.sleep(0.1)


def test_keys_reach_the_workers_of_a_cluster_started_without_them(project, sim_server,
                                                                    ray_temp):
    key = f"sk-test-{uuid.uuid4().hex}"
    server = sim_server("--api-key", key)
    _pipeline(project, server.url, records=200, shard_size=25)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node_env = {k: v for k, v in os.environ.items() if k != "SIM_KEY"}  # nodes: no key
    head = None
    try:
        head = _start_head(ray_temp, port, node_env)
        assert head.returncode == 0, head.stderr.decode()[-2000:]
        session = next((_session_of(pid) for pid in ray_processes(ray_temp)), None)
        ran = chunbot("run", "p.yaml", "--ray-address", f"127.0.0.1:{port}", "-q",
                      "--no-cache", cwd=project, timeout=180, env={"SIM_KEY": key})
        assert ran.returncode == 0, ran.stderr.decode()
        assert b"executor: Ray" in ran.stderr
        stats = server.stats()
        assert stats["answered"] == 200 and "401" not in stats["by_status"], stats
        assert len(read_stage(project / "runs" / "faults", "sentiment")) == 200
        assert key.encode() not in ran.stdout + ran.stderr
    finally:
        _stop_cluster(ray_temp, session if head is not None else None)
    assert not ray_processes(ray_temp)
    for folder in (ray_temp, project / "runs"):  # Ray's session logs; the workdir, traces
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert key.encode() not in path.read_bytes(), path


def test_a_worker_takes_the_drivers_keys_and_says_in_one_line_which_it_lacks(monkeypatch):
    from chunbot_cli import load

    url = "http://127.0.0.1:9/v1"
    pipeline = load({"name": "k", "input": "in.jsonl", "models": {
        "a": {"provider": "openai", "model": "x", "base_url": url, "api_key_env": "CB_A_KEY"},
        "b": {"provider": "openai", "model": "x", "base_url": url, "api_key_env": "CB_B_KEY"}},
        "stages": [{"name": "s", "model": "a", "prompt": "{{ text }}"},
                   {"name": "t", "model": "b", "prompt": "{{ text }}"}]})
    monkeypatch.setenv("CB_A_KEY", "secret-a")
    monkeypatch.delenv("CB_B_KEY", raising=False)
    keys = rayexec.keys_of(pipeline, pipeline.stages)
    assert keys.values == {"CB_A_KEY": "secret-a"} and repr(keys) == "Keys(CB_A_KEY)"
    monkeypatch.delenv("CB_A_KEY")  # a worker, started without it
    assert rayexec.use_keys(keys, pipeline, pipeline.stages, "host/1") == (
        "worker host/1: no API key for model 'b' (CB_B_KEY): it is set neither where the "
        "driver runs nor here")
    assert os.environ["CB_A_KEY"] == "secret-a"
    assert rayexec.use_keys(keys, pipeline, pipeline.stages[:1], "host/1") is None


PRICE = {"input": 1.0, "output": 4.0}  # USD per million tokens, as in test_max_cost.py


def _spent(stats: dict) -> float:
    plain = stats["tokens_in"] - stats["cached_tokens"]
    return (plain * PRICE["input"] + stats["cached_tokens"] * PRICE["input"] / 2
            + stats["tokens_out"] * PRICE["output"]) / 1e6


def test_max_cost_holds_for_the_whole_cluster(project, sim_server, ray_temp):
    server = sim_server("--latency-ms", "20")
    _pipeline(project, server.url, records=600, shard_size=100,
              extra=f"    price: {json.dumps(PRICE)}\n")
    env = {"SIM_KEY": "k", "CHUNBOT_RAY_TEMP": str(ray_temp)}
    cap = 0.01
    first = chunbot("run", "p.yaml", "--executor", "ray", "--max-cost", str(cap), "-q",
                    cwd=project, timeout=180, env=env)
    log = first.stderr.decode()
    assert first.returncode == 75, log
    assert "--max-cost $0.01 reached" in log and "run again with a higher --max-cost" in log
    stats = server.stats()
    assert 0 < stats["answered"] < 600
    largest = (60 * PRICE["input"] + 8 * PRICE["output"]) / 1e6  # a request's most, about
    assert _spent(stats) <= cap + WORKERS * CONCURRENCY * largest, (_spent(stats), stats)
    assert _spent(stats) >= cap / 2, "the cap, not something else, stopped it"
    spent_said = float(log.split("reached: $", 1)[1].split(" ", 1)[0])
    assert abs(spent_said - _spent(stats)) <= WORKERS * CONCURRENCY * largest

    last = chunbot("run", "p.yaml", "--executor", "ray", "--max-cost", "1", "-q",
                   cwd=project, timeout=180, env=env)
    assert last.returncode == 0, last.stderr.decode()
    records = read_stage(project / "runs" / "faults", "sentiment")
    assert len(records) == 600 and len({r["_id"] for r in records}) == 600
    stats = server.stats()
    assert stats["answered"] == 600 and stats["repeated"] == 0, stats


def test_the_account_gives_each_worker_its_share_and_refuses_past_the_cap():
    account = raycost.Account(cap=1.0, driver=0.2)  # the output cost 0.2 before
    given, reached = account.take("a", 0.0, 0.0, 0.0, want=0.5, need=0.1, workers=2)
    assert (given, reached) == (0.4, False)  # half of what is left, not all it wanted
    account.take("a", spent=0.05, used=0.1, returned=0.0, want=0.0, need=0.0, workers=2)
    assert account.held == {"a": pytest.approx(0.3)} and account.spent == 0.05
    # b: 1.0 - 0.2 - 0.05 - 0.3 = 0.45 free; its share, 0.225
    assert account.take("b", 0.0, 0.0, 0.0, want=1.0, need=0.1, workers=2)[0] == \
        pytest.approx(0.225)
    assert account.sync(driver=0.6, reached=False) == (0.05, pytest.approx(0.525), False)
    given, reached = account.take("c", 0.0, 0.0, 0.0, want=0.1, need=0.1, workers=2)
    assert (given, reached) == (0.0, True)  # no room for c's request: the cap is reached
    assert account.take("a", 0.0, 0.0, 0.0, want=0.1, need=0.0, workers=2) == (0.0, True)
    account.take("a", 0.1, 0.1, returned=0.2, want=0.0, need=0.0, workers=2)
    assert "a" not in account.held  # what it held went back
