"""`run --max-cost USD` against a real `chunbot sim serve`: the run stops sending at the cap,
keeps what finished, exits 75, and a run with a higher cap finishes the rest, every record
once and no request sent twice (counted at the server)."""

from __future__ import annotations

import json

from chunbot_cli.llm.price import CostCap, Spending
from conftest import chunbot, read_stage, write_jsonl

PRICE = {"input": 1.0, "output": 4.0}  # USD per million tokens
SLOTS = 8  # the model's max_concurrency: requests in flight at most


def _pipeline(project, url: str, records: int = 600) -> None:
    out = chunbot("sim", "gen", "--records", str(records), "--seed", "7", cwd=project)
    cases = [json.loads(line) for line in out.stdout.splitlines()]
    for n, case in enumerate(cases):  # every prompt its own: none is answered by the cache
        case["text"] = f"{n}. {case['text']}"
    write_jsonl(project / "in.jsonl", cases)
    (project / "p.yaml").write_text(f"""
name: capped
input: in.jsonl
shard_size: 100
models:
  m:
    provider: openai
    model: gpt-4o-mini
    base_url: {url}/v1
    api_key_env: SIM_KEY
    max_concurrency: {SLOTS}
    price: {json.dumps(PRICE)}
stages:
  - name: sentiment
    model: m
    prompt: "Label the sentiment (positive/negative/neutral) of this review: {{{{ text }}}}"
    params: {{max_tokens: 8}}
""")


def _spent(stats: dict) -> float:
    """What the server's replies cost: OpenAI bills prompt-cache reads at half."""
    plain = stats["tokens_in"] - stats["cached_tokens"]
    return (plain * PRICE["input"] + stats["cached_tokens"] * PRICE["input"] / 2
            + stats["tokens_out"] * PRICE["output"]) / 1e6


def test_the_cap_stops_the_run_and_a_higher_one_finishes_it(project, sim_server):
    server = sim_server("--latency-ms", "20")
    _pipeline(project, server.url)
    env = {"SIM_KEY": "k"}
    cap = 0.01
    first = chunbot("run", "p.yaml", "--max-cost", str(cap), "-q", cwd=project, env=env)
    assert first.returncode == 75, first.stderr.decode()
    log = first.stderr.decode()
    assert "--max-cost $0.01 reached" in log and "run again with a higher --max-cost" in log
    stats = server.stats()
    assert 0 < stats["answered"] < 600
    largest = (60 * PRICE["input"] + 8 * PRICE["output"]) / 1e6  # a request's most, about
    assert _spent(stats) <= cap + SLOTS * largest

    again = chunbot("run", "p.yaml", "--max-cost", str(cap), "-q", cwd=project, env=env)
    assert again.returncode == 75  # the cap counts what the output has cost so far: at
    assert _spent(server.stats()) <= cap + SLOTS * largest  # most what room was left

    last = chunbot("run", "p.yaml", "--max-cost", "1", "-q", cwd=project, env=env)
    assert last.returncode == 0, last.stderr.decode()
    records = read_stage(project / "runs" / "capped", "sentiment")
    assert len(records) == 600 and len({r["_id"] for r in records}) == 600
    stats = server.stats()
    assert stats["answered"] == 600 and stats["repeated"] == 0


def test_defaults_max_cost_caps_a_run_too(project, sim_server):
    server = sim_server()
    _pipeline(project, server.url, records=200)
    text = (project / "p.yaml").read_text().replace("stages:", "defaults: {max_cost: 0.002}\n"
                                                    "stages:")
    (project / "p.yaml").write_text(text)
    result = chunbot("run", "p.yaml", "-q", cwd=project, env={"SIM_KEY": "k"})
    assert result.returncode == 75
    assert "--max-cost $0.002 reached" in result.stderr.decode()


def test_a_cap_needs_every_model_priced(project):
    (project / "in.jsonl").write_text('{"text": "fine"}\n')
    (project / "p.yaml").write_text("""
name: unpriced
input: in.jsonl
stages:
  - {name: s, prompt: "{{ text }}"}
""")
    result = chunbot("run", "p.yaml", "--max-cost", "5", cwd=project)
    assert result.returncode == 2
    assert "model 'sim' (stage 's') has no price" in result.stderr.decode()


def test_spending_refuses_what_would_pass_the_cap_and_then_everything():
    spending = Spending(cap=1.0, before=0.5)
    held = spending.reserve(0.3)
    try:
        spending.reserve(0.3)  # 0.5 spent + 0.3 in flight + 0.3 > 1.0
    except CostCap:
        pass
    else:
        raise AssertionError("the cap was passed")
    spending.settle(held, 0.1)
    assert spending.total == 0.6 and spending.in_flight == 0
    try:
        spending.reserve(0.01)  # there would be room, but the run is winding down
    except CostCap:
        pass
    else:
        raise AssertionError("a request went out after the cap was reached")


def test_a_batch_is_made_only_when_it_fits_under_the_cap(project, sim_server):
    server = sim_server()
    _pipeline(project, server.url, records=200)
    text = (project / "p.yaml").read_text().replace("    params:", "    mode: batch\n    params:")
    text = text.replace("    max_concurrency:", "    batch_api: true\n    max_concurrency:")
    (project / "p.yaml").write_text(text)
    env = {"SIM_KEY": "k", "CHUNBOT_BATCH_POLL_S": "0.1"}
    # a batch of a shard (100 requests) may cost $0.0038 at the batch price, as reserved
    capped = chunbot("run", "p.yaml", "--max-cost", "0.005", "--wait", "-q", cwd=project,
                     env=env)
    assert capped.returncode == 75, capped.stderr.decode()
    assert "--max-cost $0.005 reached" in capped.stderr.decode()
    assert server.stats()["batches_created"] == 1
    done = chunbot("run", "p.yaml", "--max-cost", "1", "--wait", "-q", cwd=project, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert server.stats()["batches_created"] == 2
    assert len(read_stage(project / "runs" / "capped", "sentiment")) == 200


def test_batches_an_earlier_run_made_count_until_they_are_collected(project, sim_server):
    server = sim_server("--batch-delay-s", "60")  # still pending at the second run
    _pipeline(project, server.url, records=200)
    text = (project / "p.yaml").read_text().replace("    params:", "    mode: batch\n    params:")
    text = text.replace("    max_concurrency:", "    batch_api: true\n    max_concurrency:")
    (project / "p.yaml").write_text(text)
    env = {"SIM_KEY": "k"}
    for _ in range(2):  # the first makes one batch; the second finds no room for another
        result = chunbot("run", "p.yaml", "--max-cost", "0.005", "-q", cwd=project, env=env)
        assert result.returncode == 75, result.stderr.decode()
        assert server.stats()["batches_created"] == 1
    assert "--max-cost $0.005 reached" in result.stderr.decode()


def test_a_capped_stop_waits_for_its_requests_in_flight_and_the_next_run_pays_none_twice(
        project, sim_server):
    """Two LLM stages, the second at work on records while the first is capped: its
    requests in flight are answered and journaled before the process exits."""
    server = sim_server("--latency-ms", "300")
    _pipeline(project, server.url, records=400)
    pipeline = project / "p.yaml"
    pipeline.write_text(pipeline.read_text() + """
  - name: summary
    model: m
    prompt: "Summarize in five words: {{ text }}"
    params: {max_tokens: 8}
""")
    env = {"SIM_KEY": "k"}
    first = chunbot("run", "p.yaml", "--max-cost", "0.004", "-q", cwd=project, env=env)
    assert first.returncode == 75, first.stderr.decode()
    err = first.stderr.decode()
    assert "Traceback" not in err and "never retrieved" not in err, err
    at_exit = server.stats()
    import time

    time.sleep(0.8)  # longer than a request takes: nothing of the run is still out
    assert server.stats()["requests"] == at_exit["requests"]

    for cap in ("0.008", "1"):
        again = chunbot("run", "p.yaml", "--max-cost", cap, "-q", cwd=project, env=env)
        err = again.stderr.decode()
        assert "Traceback" not in err and "never retrieved" not in err, err
    assert again.returncode == 0, err
    assert len(read_stage(project / "runs" / "capped", "summary")) == 400
    stats = server.stats()
    assert stats["answered"] == 800 and stats["repeated"] == 0


def test_status_after_a_capped_stop_counts_what_the_journals_hold(project, sim_server):
    """The records a capped run answered in shards it could not commit are in `status`
    (marked uncommitted, with their cost), and the next run says it took them up."""
    server = sim_server("--latency-ms", "20")
    _pipeline(project, server.url)
    env = {"SIM_KEY": "k"}
    assert chunbot("run", "p.yaml", "--max-cost", "0.01", "-q", cwd=project,
                   env=env).returncode == 75
    [row] = json.loads(chunbot("status", "p.yaml", "--json", cwd=project).stdout)["stages"]
    open_ = row["uncommitted"]
    assert open_["shards"] >= 1 and open_["in"] > 0 and open_["cost"] > 0
    assert row["in"] + open_["in"] == server.stats()["answered"]  # every reply is counted
    text = chunbot("status", "p.yaml", cwd=project).stdout.decode()
    assert f"sentiment: uncommitted: {open_['in']:,} records" in text

    last = chunbot("run", "p.yaml", "--max-cost", "1", "-q", cwd=project, env=env)
    assert last.returncode == 0, last.stderr.decode()
    assert (f"stage 'sentiment': resumed from {open_['in']:,} records an interrupted run had "
            "finished") in last.stderr.decode()
    [row] = json.loads(chunbot("status", "p.yaml", "--json", cwd=project).stdout)["stages"]
    assert "uncommitted" not in row and row["in"] == 600


def test_the_summaries_of_a_stopped_and_a_resumed_run_add_up_to_what_status_says(
        project, sim_server):
    """Records a run takes from an interrupted run's journals were paid by that run: the
    resumed run's summary does not count them again (nor as cache answers)."""
    import re

    server = sim_server("--latency-ms", "20")
    _pipeline(project, server.url)
    env = {"SIM_KEY": "k"}
    said = []
    for cap in ("0.01", "1"):
        run = chunbot("run", "p.yaml", "--max-cost", cap, "-q", cwd=project, env=env)
        said.append(float(re.search(r"^cost \$([\d.,]+);", run.stderr.decode(), re.M)
                          .group(1).replace(",", "")))
        hits = re.search(r"local cache: ([\d,]+) of", run.stderr.decode())
        assert hits is None or hits.group(1) == "0"  # every prompt its own
    assert run.returncode == 0
    [row] = json.loads(chunbot("status", "p.yaml", "--json", cwd=project).stdout)["stages"]
    assert abs(sum(said) - row["cost"]) < 2e-4, (said, row["cost"])
    assert abs(row["cost"] - _spent(server.stats())) < 2e-4
