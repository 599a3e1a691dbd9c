"""Faults and feedback: what a run does when the network or the server misbehaves.

Each test is one situation a user meets with a real server, played by a `chunbot sim
serve` process on 127.0.0.1 with its fault flags (random 5xx, a storm of 429s, requests
that never come back, a poisoned prompt, a wrong key), against the real `chunbot run`
process with nothing about retries or concurrency in its YAML unless the test says so.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from chunbot_cli import config
from chunbot_cli.llm.endpoints import FAILURE_STREAK
from chunbot_cli.llm.http import HTTPProvider

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

TEXTS = ["great, I love it", "it broke, terrible, refund please", "okay I guess",
         "the battery died, awful", "excellent and sturdy"]

PIPELINE = """\
name: t
input: data.jsonl
id_field: id
shard_size: 100
models:
  m: {model}
defaults: {defaults}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment (positive/negative/neutral): {{{{ text }}}}"
    params: {{temperature: 0, max_tokens: 8}}
"""


def reviews(n: int) -> list[dict]:
    return [{"id": f"r{i:04d}", "text": f"{TEXTS[i % len(TEXTS)]} #{i}"} for i in range(n)]


def one_stage(project: Path, model: str, records: list[dict], defaults: str = "{}") -> Path:
    """A pipeline with one LLM stage `sentiment` on model alias `m` (a YAML flow mapping)."""
    write_jsonl(project / "data.jsonl", records)
    path = project / "p.yaml"
    path.write_text(PIPELINE.format(model=model, defaults=defaults))
    return path


def openai_at(url: str, extra: str = "") -> str:
    return f'{{provider: openai, model: sim-small, base_url: "{url}/v1"{extra}}}'


def ids(records: list[dict]) -> list[str]:
    return [r["id"] for r in records]


def output_ids(project: Path) -> list[str]:
    return [r["_id"] for r in read_stage(project / "runs/t", "sentiment")]


def attempts(project: Path) -> list[dict]:
    return [attempt for path in sorted((project / "runs/t/sentiment").glob("trace-*.jsonl"))
            for trace in read_jsonl(path) for attempt in trace["attempts"]]


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_random_server_errors_lose_nothing_and_never_take_the_endpoint_out(project,
                                                                          sim_server):
    server = sim_server("--error-rate", "0.3", "--seed", "5")
    records = reviews(300)
    pipeline = one_stage(project, openai_at(server.url), records)  # no `retries`: the default
    result = chunbot("run", str(pipeline), "--quiet", cwd=project)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert output_ids(project) == ids(records)  # every record, once, in input order
    stats = server.stats()
    assert stats["by_status"].get("500", 0) + stats["by_status"].get("503", 0) > 60
    assert stats["answered"] == 300
    tried = attempts(project)
    assert len(tried) == stats["requests"]
    assert not [a for a in tried if a.get("endpoint_down")]  # 30% errors are chance
    assert "is down" not in stderr and "every endpoint" not in stderr


def test_a_storm_of_429s_is_waited_out_not_failed(project, sim_server):
    server = sim_server("--storm-s", "3", "--latency-ms", "20")
    records = reviews(300)
    pipeline = one_stage(project, openai_at(server.url), records)
    started = time.monotonic()
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert time.monotonic() - started > 3  # it did meet the storm
    assert output_ids(project) == ids(records)
    stats = server.stats()
    assert stats["by_status"]["429"] > 0 and stats["answered"] == 300
    # the model pauses for the retry-after as a whole: the storm costs a few requests,
    # not every record retried in lockstep until its retries run out
    assert stats["requests"] < 2 * len(records), stats
    assert not (project / "runs/t/sentiment/errors.jsonl").exists()


def test_a_poisoned_record_fails_alone_and_quickly(project, sim_server):
    records = reviews(300)
    records[137]["text"] = "it melted on the stove, a poisoned review"
    server = sim_server("--fail-prompt", "a poisoned review")
    pipeline = one_stage(project, openai_at(server.url), records)
    started = time.monotonic()
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert time.monotonic() - started < 30
    errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert [e["_id"] for e in errors] == ["r0137"]
    assert "HTTP 500" in errors[0]["error"]
    assert output_ids(project) == [r["id"] for r in records if r["id"] != "r0137"]
    assert server.stats()["poisoned"] >= 2  # it was tried again, then given up on
    assert "every endpoint is down" not in stderr


POISON = "zz-poisoned-zz"


def poisoned_run(project: Path, sim_server, count: int, every: int, defaults: str = "{}",
                 timeout: float = 120) -> tuple[float, list[str]]:
    """Run `count` records, one in `every` containing POISON (which the sim always answers
    500), with the default retries (6), and check that exactly the poisoned ones failed,
    each after its retries, the endpoint never down; the run's wall seconds and the
    poisoned records' ids."""
    records = reviews(count)
    for record in records[every // 2::every]:
        record["text"] += f" {POISON}"
    server = sim_server("--fail-prompt", POISON)
    pipeline = one_stage(project, openai_at(server.url), records, defaults)
    started = time.monotonic()
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=timeout)
    wall = time.monotonic() - started
    poisoned = [r["id"] for r in records if POISON in r["text"]]
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert sorted(e["_id"] for e in errors) == poisoned, stderr  # in the order they failed
    assert all("HTTP 500" in e["error"] and "(after 7 attempts)" in e["error"]
               for e in errors), errors[0]
    assert output_ids(project) == [r["id"] for r in records if r["id"] not in poisoned]
    assert "every endpoint" not in stderr and "is down" not in stderr
    assert not [a for a in attempts(project) if a.get("endpoint_down")]
    return wall, poisoned


def test_a_few_percent_of_poisoned_records_fail_alone_in_seconds_and_the_endpoint_stays_up(
        project, sim_server):
    # the end of such a run sends only the poisoned records, again and again: that is
    # still those records failing, not the endpoint, which answered everything else
    wall, poisoned = poisoned_run(project, sim_server, 2400, 25)
    assert len(poisoned) == 96
    assert wall < 30, f"{wall:.1f}s"


def test_poisoned_records_never_wait_for_the_outage_timeout(project, sim_server):
    wall, poisoned = poisoned_run(project, sim_server, 200, 50, "{outage_timeout: 60s}",
                                  timeout=90)
    assert len(poisoned) == 4
    assert wall < 15, f"{wall:.1f}s"


def test_an_outage_of_5xx_to_every_request_is_waited_out_without_using_retries(project,
                                                                            sim_server):
    failing = sim_server("--error-rate", "1", "--seed", "4")  # 500 or 503 to every request
    records = reviews(200)
    pipeline = one_stage(project, openai_at(failing.url, ", max_concurrency: 4"), records)
    answering = []

    def mend_it() -> None:  # a few seconds of 5xx, then it answers again on its port
        for _ in range(200):
            if failing.stats()["requests"] >= 20:
                break
            time.sleep(0.05)
        time.sleep(2)
        failing.kill()
        answering.append(sim_server("--latency-ms", "5", port=failing.port))

    mender = threading.Thread(target=mend_it)
    mender.start()
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=90)
    mender.join(30)
    stderr = result.stderr.decode()
    assert answering and result.returncode == 0, stderr
    assert output_ids(project) == ids(records)
    assert "every endpoint is down" in stderr and "answers again" in stderr
    traces = [t for path in sorted((project / "runs/t/sentiment").glob("trace-*.jsonl"))
              for t in read_jsonl(path)]
    own = [[a for a in t["attempts"] if a["status"] != 200 and not a.get("endpoint_down")]
           for t in traces]
    # only the streak that took the endpoint out was the records'; the rest was waited out
    assert sum(map(len, own)) <= 2 * FAILURE_STREAK, [t["attempts"] for t in traces if t["attempts"][1:]]
    assert sum(len(t["attempts"]) > 1 for t in traces) >= 4


def test_requests_that_hang_time_out_and_are_sent_again(project, sim_server):
    server = sim_server("--hang-rate", "0.05", "--seed", "2")
    records = reviews(200)
    pipeline = one_stage(project, openai_at(server.url, ", timeout: 2s"), records)
    started = time.monotonic()
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=60)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert time.monotonic() - started < 60
    assert output_ids(project) == ids(records)
    assert server.stats()["hung"] > 0
    tried = attempts(project)
    assert any("no complete reply within 2s" in (a["error"] or "") for a in tried)
    assert not [a for a in tried if a.get("endpoint_down")], stderr


# --- a vendor's key goes to the vendor only -------------------------------------------

def _model_spec(project: Path, model: str):
    pipeline = one_stage(project, model, reviews(3))
    return config.load(pipeline).models["m"]


def _header(headers: dict[str, str], name: str) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get(name.lower())


@pytest.mark.parametrize("provider, variable, header, vendor, other", [
    ("openai", "OPENAI_API_KEY", "Authorization", "https://api.openai.com/v1",
     "http://127.0.0.1:9/v1"),
    ("anthropic", "ANTHROPIC_API_KEY", "x-api-key", "https://api.anthropic.com",
     "http://127.0.0.1:9"),
])
def test_a_vendors_key_is_never_sent_to_other_servers(project, monkeypatch, provider, variable,
                                                      header, vendor, other):
    monkeypatch.setenv(variable, "sk-vendor-secret")
    for urls in (f'endpoints: ["{other}"]', f'base_url: "{other}"',
                 f'base_url: "{vendor}", endpoints: ["{vendor}", "{other}"]'):
        spec = _model_spec(project, f"{{provider: {provider}, model: m, {urls}}}")
        assert spec.api_key_env is None and spec.batch_api is False, urls
        assert _header(HTTPProvider(spec, session=None).headers, header) is None, urls
    # the vendor's own URL, said or left out, gets the vendor's variable by default
    for urls in ("", f', base_url: "{vendor}"'):
        spec = _model_spec(project, f"{{provider: {provider}, model: m{urls}}}")
        assert spec.api_key_env == variable and spec.batch_api is True
        assert "sk-vendor-secret" in _header(HTTPProvider(spec, session=None).headers, header)
    # and a key variable named in the YAML is used wherever the server is
    spec = _model_spec(project, f"{{provider: {provider}, model: m, base_url: \"{other}\", "
                                f"api_key_env: {variable}}}")
    assert "sk-vendor-secret" in _header(HTTPProvider(spec, session=None).headers, header)


def test_a_run_against_another_server_does_not_need_the_vendors_key(project, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: it cannot connect
    pipeline = one_stage(project, f'{{provider: openai, model: m, endpoints: ["{dead}"], '
                                  "timeout: 2s}", reviews(3), "{outage_timeout: 2s}")
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr  # it ran, and its records failed: not exit 2
    assert "OPENAI_API_KEY" not in stderr
    errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
    assert len(errors) == 3 and all("every endpoint has been down" in e["error"] for e in errors)
    assert all("cannot connect" in e["error"] for e in errors)


# --- credentials in URLs -----------------------------------------------------------------

def test_credentials_in_a_url_are_never_written_or_printed(project, sim_server):
    server = sim_server("--latency-ms", "5")
    live = f"http://user:s3cretTOKEN@127.0.0.1:{server.port}/v1"
    dead = f"http://user:s3cretTOKEN@127.0.0.1:{free_port()}/v1"
    records = reviews(120)
    pipeline = one_stage(project, f'{{provider: openai, model: sim-small, base_url: "{live}", '
                                  f'endpoints: ["{live}", "{dead}"]}}', records)
    for log_format in ("text", "json"):
        result = chunbot("run", str(pipeline), "--log-format", log_format, "--no-cache",
                         cwd=project)
        assert result.returncode == 0, result.stderr.decode()
        assert output_ids(project) == ids(records)
        printed = result.stdout + result.stderr
        assert b"s3cretTOKEN" not in printed, log_format
        assert b"http://***@127.0.0.1" in printed  # the dead endpoint was said to be down
        written = {p: p.read_bytes() for p in (project / "runs").rglob("*") if p.is_file()}
        assert {p.name for p in written} >= {"state.json", "part-00000.jsonl",
                                            "trace-00000.jsonl"}
        assert [p for p, data in written.items() if b"s3cretTOKEN" in data] == []
        refused = [a for a in attempts(project) if "cannot connect" in (a["error"] or "")]
        assert refused, "the dead endpoint was never tried"
        shown = config.redact_url(dead)  # http://***@127.0.0.1:PORT/v1
        assert all(a["endpoint"] == shown and shown in a["error"] for a in refused)
        (project / "runs/t/state.json").unlink()  # the next format runs it all again
    # what `chunbot trace` and `status` print comes from those files
    for command in (("trace", str(pipeline), "r0000", "--json"), ("status", str(pipeline))):
        shown = chunbot(*command, cwd=project)
        assert b"s3cretTOKEN" not in shown.stdout + shown.stderr


def test_a_credential_in_a_url_is_masked_in_errors_and_error_files(project, sim_server):
    server = sim_server()
    # a base URL without /v1: every record fails with a 404 naming the URL it went to
    url = f"http://user:s3cretTOKEN@127.0.0.1:{server.port}"
    pipeline = one_stage(project, f'{{provider: openai, model: sim-small, base_url: "{url}"}}',
                         reviews(5))
    for log_format in ("text", "json"):
        result = chunbot("run", str(pipeline), "--log-format", log_format, cwd=project)
        assert result.returncode == 1, result.stderr.decode()
        errors = read_jsonl(project / "runs/t/sentiment/errors.jsonl")
        assert errors and all("HTTP 404 from http://***@127.0.0.1" in e["error"]
                              for e in errors), errors[0]
        assert b"s3cretTOKEN" not in result.stdout + result.stderr
        assert b"http://***@127.0.0.1" in result.stderr  # the summary's reason shows the URL
        everything = b"".join(p.read_bytes() for p in (project / "runs").rglob("*")
                              if p.is_file())
        assert b"s3cretTOKEN" not in everything
        (project / "runs/t/state.json").unlink()


# --- why records failed, in the summary ----------------------------------------------------

def test_the_summary_says_why_records_failed_where_they_are_and_what_to_do(project,
                                                                         sim_server):
    server = sim_server("--api-key", "right-key")
    pipeline = one_stage(project, openai_at(server.url, ", api_key_env: SOME_VAR"), reviews(40))  # under the 50 that stop a stage
    result = chunbot("run", str(pipeline), "--quiet", cwd=project, env={"SOME_VAR": "sk-wrong-7f3a"})
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    errors_file = Path("runs/t/sentiment/errors.jsonl")
    assert len(read_jsonl(project / errors_file)) == 40
    lines = stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("sentiment: 40 failed"))
    assert str(errors_file) in lines[head]
    count, reason = lines[head + 1].split(maxsplit=1)
    assert count == "40" and reason.startswith("model 'm': authentication failed"), lines[head + 1]
    assert "check SOME_VAR" in reason
    assert lines[head + 2].strip() == f"next: chunbot rerun {pipeline} --stage sentiment --failed"
    assert "40 failed records in total" in lines[-1] and "exit 1" in lines[-1]
    assert "sk-wrong-7f3a" not in stderr  # the key itself is never printed


def test_json_summary_lists_the_failure_reasons_too(project, sim_server):
    server = sim_server("--api-key", "right-key")
    pipeline = one_stage(project, openai_at(server.url, ", api_key_env: SOME_VAR"), reviews(40))
    result = chunbot("run", str(pipeline), "--log-format", "json", cwd=project,
                     env={"SOME_VAR": "sk-wrong-7f3a"})
    assert result.returncode == 1
    summary = json.loads(result.stderr.decode().splitlines()[-1])
    assert summary["event"] == "summary" and summary["failed_total"] == 40
    [failures] = summary["failures"]
    assert failures["stage"] == "sentiment" and failures["failed"] == 40
    assert failures["errors_file"] == str(project / "runs/t/sentiment/errors.jsonl")
    [(reason, count)] = failures["reasons"]
    assert count == 40 and "authentication failed" in reason
    assert failures["rerun"] == f"chunbot rerun {pipeline} --stage sentiment --failed"
