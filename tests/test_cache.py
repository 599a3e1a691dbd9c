"""llm/cache.py: keys, the SQLite and Redis stores, and the cache in real runs.

Real SQLite files, a real redis-server on 127.0.0.1, real `chunbot` processes against
`chunbot sim serve`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunbot_cli.config import CacheSpec, ModelSpec
from chunbot_cli.llm import cache
from chunbot_cli.llm.types import Reply, Request

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

SPEC = ModelSpec(alias="ds", provider="openai", model="deepseek-chat",
                 base_url="https://api.deepseek.com/v1", api_key_env="DEEPSEEK_API_KEY",
                 endpoints=("http://a/v1", "http://b/v1"))
REQUEST = Request([{"role": "user", "content": "Label: great"}], {"temperature": 0})


def test_the_key_covers_what_decides_the_reply_and_nothing_else():
    key = cache.request_key(SPEC, REQUEST)
    same = [
        cache.request_key(SPEC, Request(REQUEST.messages, {"temperature": 0, "stream": True,
                                                           "stream_options": {"x": 1}})),
        cache.request_key(ModelSpec(**{**SPEC.__dict__, "endpoints": ()}), REQUEST),
        cache.request_key(ModelSpec(**{**SPEC.__dict__, "api_key_env": "OTHER"}), REQUEST),
        cache.request_key(SPEC, Request(REQUEST.messages, REQUEST.params, prompt_cache=True,
                                        static_prefix=7)),
    ]
    assert all(k == key for k in same)
    different = [
        cache.request_key(SPEC, Request(REQUEST.messages, {"temperature": 0.7})),
        cache.request_key(SPEC, Request(REQUEST.messages, {"temperature": 0, "seed": 1})),
        cache.request_key(SPEC, Request(REQUEST.messages, {"temperature": 0,
                                                           "vendor_knob": True})),
        cache.request_key(ModelSpec(**{**SPEC.__dict__, "base_url": "http://gpu:8000/v1"}),
                          REQUEST),
        cache.request_key(ModelSpec(**{**SPEC.__dict__, "model": "deepseek-reasoner"}), REQUEST),
        cache.request_key(SPEC, REQUEST, namespace="sample-2"),
        cache.request_key(SPEC, Request([{"role": "user", "content": "Label: good"}],
                                        REQUEST.params)),
    ]
    assert len({key, *different}) == len(different) + 1


def test_sqlite_store_round_trip_ttl_stats_and_clear(tmp_path):
    store = cache.SQLiteStore(tmp_path / "c.sqlite3", ttl=None)
    reply = Reply("negative", "m", 12, 1, "stop")
    store.put_many([(b"k1", cache.encode(reply)), (b"k2", cache.encode(reply))])
    assert {k: cache.decode(v) for k, v in store.get_many([b"k1", b"k3"]).items()} == \
        {b"k1": reply}
    assert store.stats()[0] == 2
    assert store.clear(older_than=3600) == 0
    assert store.clear(older_than=None) == 2 and store.stats()[0] == 0
    store.close()
    aged = cache.SQLiteStore(tmp_path / "c.sqlite3", ttl=0.001)
    aged.put_many([(b"k", cache.encode(reply))])
    time.sleep(0.01)
    assert aged.get_many([b"k"]) == {}  # too old to be used


PIPELINE = """
name: {name}
input: data.jsonl
id_field: id
shard_size: 50
{cache}
models:
  m: {{provider: openai, model: sim-small, base_url: "{url}/v1"}}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment: {{{{ text }}}}"
    params: {{temperature: 0, max_tokens: 8}}
"""


def cache_project(project: Path, url: str, name: str = "t", cache_block: str = "",
                  n: int = 200) -> Path:
    if not (project / "data.jsonl").exists():
        write_jsonl(project / "data.jsonl",
                    [{"id": i, "text": f"great value, love it #{i}"} for i in range(n)])
    path = project / f"{name}.yaml"
    path.write_text(PIPELINE.format(name=name, url=url, cache=cache_block))
    return path


def test_a_rerun_after_deleting_outputs_sends_nothing_and_refresh_sends_everything(
        project, sim_server):
    server = sim_server()
    pipeline = cache_project(project, server.url)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    assert server.stats()["answered"] == 200
    shutil.rmtree(project / "runs")
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0
    assert server.stats()["answered"] == 200, "the cache should have answered every request"
    assert "local cache: 200 of 200 records answered" in result.stderr.decode()
    traces = read_jsonl(project / "runs/t/sentiment/trace-00000.jsonl")
    assert all(t["cache_hit"] for t in traces)
    assert len(read_stage(project / "runs/t", "sentiment")) == 200
    stats = chunbot("cache", "stats", cwd=project).stdout.decode()
    assert "entries:  200" in stats and "last run: 200 hits (100.0%), 0 misses" in stats

    shutil.rmtree(project / "runs")
    assert chunbot("run", str(pipeline), "-q", "--refresh-cache", cwd=project).returncode == 0
    assert server.stats()["answered"] == 400
    shutil.rmtree(project / "runs")
    assert chunbot("run", str(pipeline), "-q", "--no-cache", cwd=project).returncode == 0
    assert server.stats()["answered"] == 600
    assert "removed 200" in chunbot("cache", "clear", cwd=project).stdout.decode()


def test_two_processes_share_one_sqlite_cache_at_once(project, sim_server):
    server = sim_server("--latency-ms", "5")
    shared = f"cache: {{path: {project / 'shared.sqlite3'}}}"
    first = cache_project(project, server.url, "one", shared, n=2000)
    second = cache_project(project, server.url, "two", shared)
    runs = [subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(p), "-q"],
                             cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for p in (first, second)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err.decode()
        assert b"Error" not in err
    entries = chunbot("cache", "stats", str(first), cwd=project).stdout.decode()
    assert "entries:  2,000" in entries  # both wrote the same 2,000 replies, once each


def test_a_namespace_separates_otherwise_equal_requests(project, sim_server):
    server = sim_server()
    pipeline = cache_project(project, server.url, n=20)
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0
    pipeline.write_text(pipeline.read_text().replace(
        "    params:", "    cache: {namespace: sample-2}\n    params:"))
    assert chunbot("run", str(pipeline), "-q", cwd=project).returncode == 0  # stage is stale
    assert server.stats()["answered"] == 40


@pytest.fixture
def redis_url(tmp_path):
    """A real redis-server on a free loopback port, for one test."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.kill()
    process.wait()


def test_redis_store_round_trip_and_clear(redis_url):
    store = cache.RedisStore(redis_url, ttl=3600)
    reply = Reply("positive", "m", 3, 1, "stop")
    store.put_many([(b"a", cache.encode(reply)), (b"b", cache.encode(reply))])
    assert cache.decode(store.get_many([b"a", b"zz"])[b"a"]) == reply
    assert store.stats()[0] == 2
    assert store.client.ttl(store.PREFIX + b"a") > 3000
    assert store.clear(older_than=3600) == 0 and store.clear(older_than=None) == 2
    store.close()


def test_a_pipeline_on_redis_shares_replies_across_workdirs(project, sim_server, redis_url):
    server = sim_server()
    block = f"cache: {{backend: redis, url: '{redis_url}', ttl: 30d}}"
    assert chunbot("run", str(cache_project(project, server.url, "one", block)), "-q",
                   cwd=project).returncode == 0
    result = chunbot("run", str(cache_project(project, server.url, "two", block)), "-q",
                     cwd=project)
    assert result.returncode == 0
    assert server.stats()["answered"] == 200
    assert "local cache: 200 of 200" in result.stderr.decode()
