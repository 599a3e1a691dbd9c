"""HTTP providers end to end: `chunbot run` against `chunbot sim serve` processes on 127.0.0.1.

The pipelines here are what users write for OpenAI, DeepSeek, vLLM or Anthropic; only the
base URL points at the simulator.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

TEXTS = ["great, I love it", "it broke, terrible, refund please", "okay I guess",
         "the battery died, awful", "excellent and sturdy"]

PIPELINE = """
name: t
input: data.jsonl
id_field: id
shard_size: 40
models:
  m:
    provider: {provider}
    model: sim-small
    {urls}
    {extra}
defaults: {{retries: {retries}, outage_timeout: 60s}}
stages:
  - name: sentiment
    model: m
    system: You are a precise annotator.
    prompt: "Label the sentiment (positive/negative/neutral): {{{{ text }}}}"
    params: {{temperature: 0, max_tokens: 8{stream}}}
  - name: reply
    model: m
    prompt: "Write an apology for: {{{{ text }}}}"
    params: {{max_tokens: 60{stream}}}
"""


def http_project(project: Path, url: str | list[str], provider: str = "openai",
                 stream: bool = False, retries: int = 6, extra: str = "", n: int = 120) -> Path:
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} #{i}"} for i in range(n)])
    root = "/v1" if provider == "openai" else ""
    if isinstance(url, list):
        urls = f"base_url: {url[0]}{root}\n    endpoints: [{', '.join(u + root for u in url)}]"
    else:
        urls = f"base_url: {url}{root}"
    stream_params = ", stream: true, stream_options: {include_usage: true}" if stream and \
        provider == "openai" else ", stream: true" if stream else ""
    (project / "p.yaml").write_text(PIPELINE.format(provider=provider, urls=urls, extra=extra,
                                                    retries=retries, stream=stream_params))
    return project / "p.yaml"


def outputs(project: Path) -> list[dict]:
    return read_stage(project / "runs/t", "sentiment") + read_stage(project / "runs/t", "reply")


def traces(project: Path, stage: str) -> list[dict]:
    return [t for path in sorted((project / "runs/t" / stage).glob("trace-*.jsonl"))
            for t in read_jsonl(path)]


def test_every_protocol_json_and_sse_give_identical_outputs(project, sim_server):
    server = sim_server()
    results = {}
    for provider in ("openai", "anthropic", "gemini"):
        for stream in (False, True):
            pipeline = http_project(project, server.url, provider, stream)
            result = chunbot("run", str(pipeline), "--quiet", "--no-cache", cwd=project)
            assert result.returncode == 0, result.stderr.decode()
            results[provider, stream] = outputs(project)
            assert "tok in" in result.stderr.decode()
            trace = traces(project, "reply")[0]
            assert trace["tokens"]["in"] > 0 and trace["tokens"]["out"] > 0
            assert trace["endpoint"] == server.url + ("/v1" if provider == "openai" else "")
            (project / "runs/t/state.json").unlink()
    first = results["openai", False]
    assert len(first) == 240 and {r["sentiment"] for r in first} == {
        "positive", "negative", "neutral"}
    assert all(result == first for result in results.values())
    stats = server.stats()
    assert stats["streamed"] == 3 * 240
    assert stats["by_route"] == {"chat": 480, "messages": 480, "gemini": 480}


def test_server_errors_are_retried_until_every_record_is_done_once(project, sim_server):
    server = sim_server("--error-rate", "0.3", "--seed", "3")
    pipeline = http_project(project, server.url, retries=10)
    result = chunbot("run", str(pipeline), "--quiet", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    records = read_stage(project / "runs/t", "sentiment")
    assert [r["_id"] for r in records] == [f"r{i:04d}" for i in range(120)]
    stats = server.stats()
    assert stats["answered"] == 240 and stats["repeated"] == 0
    assert stats["by_status"].get("500", 0) + stats["by_status"].get("503", 0) > 30
    retried = [t for t in traces(project, "sentiment") if len(t["attempts"]) > 1]
    assert retried and all(a["status"] in (500, 503) for t in retried for a in t["attempts"][:-1])


def test_a_server_killed_mid_run_and_restarted_on_its_port_lets_the_run_finish(project,
                                                                              sim_server):
    server = sim_server("--latency-ms", "40")
    pipeline = http_project(project, server.url, extra="max_concurrency: 4", n=200)
    run = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline),
                            "--quiet"], cwd=project, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_env())
    _wait_for(lambda: server.stats()["answered"] >= 40)
    server.kill()
    time.sleep(1.5)  # down for a while: requests must wait, not fail
    server.restart()
    out, err = run.communicate(timeout=90)
    assert run.returncode == 0, err.decode()
    assert "every endpoint is down" in err.decode() and "answers again" in err.decode()
    ids = [r["_id"] for r in read_stage(project / "runs/t", "sentiment")]
    assert ids == [f"r{i:04d}" for i in range(200)]


def test_two_endpoints_one_dead_all_records_go_through_the_other_and_it_is_probed(
        project, sim_server):
    alive = sim_server("--latency-ms", "50")
    dead_port = _free_port()
    dead = f"http://127.0.0.1:{dead_port}"
    pipeline = http_project(project, [alive.url, dead], extra="max_concurrency: 4", n=300)
    run = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline),
                            "--quiet"], cwd=project, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_env())
    time.sleep(1.0)
    revived = sim_server("--latency-ms", "50", port=dead_port)  # probing finds it back
    out, err = run.communicate(timeout=90)
    assert run.returncode == 0, err.decode()
    assert f"{dead}/v1 is down" in err.decode()
    assert len(read_stage(project / "runs/t", "sentiment")) == 300
    assert revived.stats()["answered"] > 0, "the dead endpoint was never probed again"
    assert alive.stats()["answered"] + revived.stats()["answered"] == 600


def test_a_401_stops_the_stage_saying_authentication_failed_without_the_key(project,
                                                                           sim_server):
    server = sim_server("--api-key", "right-key")
    pipeline = http_project(project, server.url,
                            extra="api_key_env: SIM_KEY\n    max_concurrency: 8")
    result = chunbot("run", str(pipeline), "--until", "sentiment", "--quiet", cwd=project,
                     env={"SIM_KEY": "sk-wrong-secret"})
    assert result.returncode == 1
    [line] = [line for line in result.stderr.decode().splitlines() if "stopped" in line]
    assert "first 50 records all failed with: model 'm': authentication failed" in line
    assert server.stats()["by_status"]["401"] <= 8  # one 401 stops the others being sent
    errors = project / "runs/t/sentiment/errors.jsonl"  # not kept as done: the run
    assert not errors.exists() or not errors.read_bytes()  # with the right key asks again
    everything = result.stderr + result.stdout + b"".join(
        p.read_bytes() for p in (project / "runs").rglob("*") if p.is_file())
    assert b"sk-wrong-secret" not in everything


def test_a_missing_key_variable_is_exit_2_before_any_request(project, sim_server):
    server = sim_server()
    pipeline = http_project(project, server.url, extra="api_key_env: SIM_KEY_NOT_SET")
    result = chunbot("run", str(pipeline), cwd=project)
    assert result.returncode == 2
    assert "model 'm': environment variable SIM_KEY_NOT_SET is not set" in result.stderr.decode()
    assert server.stats()["requests"] == 0


def test_replies_that_are_not_json_or_lack_choices_are_record_failures(project, sim_server):
    for kind, reason in (("not-json", "is not JSON (HTTP 200, text/html)"),
                         ("no-choices", "reply has no choices[0].message.content")):
        server = sim_server("--malformed", kind)
        pipeline = http_project(project, server.url, n=10)
        result = chunbot("run", str(pipeline), "--quiet", cwd=project)
        assert result.returncode == 1
        errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
        assert len(errors) == 10 and all(reason in e["error"] for e in errors), errors[0]
        (project / "runs/t/state.json").unlink()


def test_a_4xx_is_not_retried_and_keeps_the_status_and_body(project, sim_server):
    server = sim_server()
    pipeline = http_project(project, server.url, n=5)
    # a common slip: an OpenAI-compatible base_url without /v1
    pipeline.write_text(pipeline.read_text().replace(f"{server.url}/v1", server.url))
    result = chunbot("run", str(pipeline), "--until", "sentiment", "--quiet", cwd=project)
    assert result.returncode == 1
    errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert all(f"HTTP 404 from {server.url}/chat/completions (an OpenAI-compatible base_url "
               "usually ends in /v1)" in e["error"] for e in errors), errors[0]
    assert server.stats()["requests"] == 0  # the sim counts its API routes only


def _env() -> dict:
    import os

    return {**os.environ, "CHUNBOT_LOG_INTERVAL": "0.2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_provider_prompt_caching_is_used_and_its_savings_reported(project, sim_server):
    server = sim_server()
    instructions = "You label customer reviews. " * 40  # a long, shared system prompt
    for provider in ("anthropic", "openai", "gemini"):
        pipeline = http_project(project, server.url, provider, n=40,
                                extra="price: {input: 3.0, output: 15.0}")
        text = pipeline.read_text().replace("You are a precise annotator.", instructions)
        pipeline.write_text(text.replace("defaults: {", "defaults: {prompt_cache: true, "))
        result = chunbot("run", str(pipeline), "--until", "sentiment", "-q", "--no-cache",
                         cwd=project)
        assert result.returncode == 0, result.stderr.decode()
        summary = result.stderr.decode()
        assert "provider prompt cache:" in summary and "without caches $" in summary
        done = traces(project, "sentiment")
        assert sum(t["tokens"]["cached"] > 0 for t in done) >= 30
        assert all(t["cost"] < t["cost_full"] for t in done if t["tokens"]["cached"])
        (project / "runs/t/state.json").unlink()
    stats = server.stats()
    assert stats["cached_tokens"] > 0 and stats["cache_creation_tokens"] > 0


def test_kill_9_mid_run_over_http_then_resume_repeats_only_what_was_in_flight(project,
                                                                             sim_server):
    server = sim_server("--latency-ms", "30")
    pipeline = http_project(project, server.url, extra="max_concurrency: 8", n=400)
    run = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "run", str(pipeline), "-q"],
                           cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: server.stats()["answered"] >= 150)
    run.kill()  # SIGKILL
    run.wait()
    before = server.stats()["answered"]
    assert before < 800, "the kill should land mid-run"
    result = chunbot("run", str(pipeline), "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    stats = server.stats()
    assert stats["unique"] == 800  # every request of both stages answered…
    assert stats["repeated"] <= 8  # …and only those in flight at the kill asked twice
    ids = [f"r{i:04d}" for i in range(400)]
    assert [r["_id"] for r in read_stage(project / "runs/t", "sentiment")] == ids
    assert [r["_id"] for r in read_stage(project / "runs/t", "reply")] == ids
