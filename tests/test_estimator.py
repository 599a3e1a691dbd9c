"""`chunbot estimate` against a real `chunbot sim serve`: it sends nothing, lands within
±15% of what the run that follows costs, counts only the stale part (nothing after a
complete run; only the rest after one stopped at its cost cap), and knows a cascade's
escalations from earlier runs."""

from __future__ import annotations

import json

import chunbot_cli as chunbot
from conftest import chunbot as command, write_jsonl

PRICES = {"small": {"input": 0.5, "output": 2.0}, "big": {"input": 5.0, "output": 20.0}}


def _reviews(project, records: int) -> None:
    out = command("sim", "gen", "--records", str(records), "--seed", "3", cwd=project)
    cases = [json.loads(line) for line in out.stdout.splitlines()]
    for n, case in enumerate(cases):  # every prompt its own, as in real data
        case["text"] = f"{n}. {case['text']}"
    write_jsonl(project / "in.jsonl", cases)


def _demo(project, url: str) -> None:
    """The demo's shape on a vendor protocol: label, keep the negatives, reply to them."""
    (project / "p.yaml").write_text(f"""
name: bill
input: in.jsonl
shard_size: 100
models:
  small:
    provider: openai
    model: gpt-4o-mini
    base_url: {url}/v1
    api_key_env: SIM_KEY
    price: {json.dumps(PRICES["small"])}
stages:
  - name: sentiment
    model: small
    prompt: "Label the sentiment (positive/negative/neutral) of this review: {{{{ text }}}}"
    params: {{max_tokens: 4}}
  - name: negatives
    filter: "sentiment == 'negative'"
  - name: reply
    model: small
    prompt: "Write a two-line apology to the customer who wrote this review: {{{{ text }}}}"
    params: {{max_tokens: 80}}
""")


def _billed(server) -> float:
    """What the server's replies so far cost at the small model's price (OpenAI bills
    prompt-cache reads at half)."""
    stats, price = server.stats(), PRICES["small"]
    plain = stats["tokens_in"] - stats["cached_tokens"]
    return (plain * price["input"] + stats["cached_tokens"] * price["input"] / 2
            + stats["tokens_out"] * price["output"]) / 1e6


def _estimate(project) -> dict:
    result = command("estimate", "p.yaml", "--json", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_the_estimate_sends_nothing_and_is_within_15_percent(project, sim_server):
    server = sim_server()
    _reviews(project, 1000)
    _demo(project, server.url)
    env = {"SIM_KEY": "k"}
    pilot = command("run", "p.yaml", "--limit", "100", "-q", cwd=project, env=env)
    assert pilot.returncode == 0, pilot.stderr.decode()
    sent = server.stats()["requests"]
    spent = _billed(server)

    estimate = _estimate(project)
    assert server.stats()["requests"] == sent  # not one request
    assert [s["stage"] for s in estimate["stages"]] == ["sentiment", "negatives", "reply"]
    sentiment = estimate["stages"][0]
    assert {"tokens_in", "tokens_out", "cost", "models"} <= set(sentiment)
    assert sentiment["output_tokens_from"] == "earlier replies"
    assert abs(estimate["cost"] - sum(s.get("cost", 0) for s in estimate["stages"])) < 1e-5

    run = command("run", "p.yaml", "-q", cwd=project, env=env)
    assert run.returncode == 0, run.stderr.decode()
    actual = _billed(server) - spent
    assert abs(estimate["cost"] - actual) <= 0.15 * actual, (estimate["cost"], actual)

    after = _estimate(project)
    assert after["cost"] == 0 and after["stale"] == 0
    assert "0 to compute" in command("estimate", "p.yaml", cwd=project).stdout.decode()


def test_after_the_cost_cap_it_counts_only_what_is_left(project, sim_server):
    server = sim_server("--latency-ms", "10")
    _reviews(project, 600)
    _demo(project, server.url)
    env = {"SIM_KEY": "k"}
    assert command("run", "p.yaml", "--limit", "100", "-q", cwd=project, env=env).returncode == 0
    capped = command("run", "p.yaml", "--max-cost", "0.02", "-q", cwd=project, env=env)
    assert capped.returncode == 75, capped.stderr.decode()
    spent = _billed(server)
    left = _estimate(project)
    assert left["stale"] < 600
    finish = command("run", "p.yaml", "-q", cwd=project, env=env)
    assert finish.returncode == 0, finish.stderr.decode()
    actual = _billed(server) - spent
    assert abs(left["cost"] - actual) <= 0.15 * actual, (left["cost"], actual)


def test_a_cascade_is_estimated_by_the_share_earlier_runs_escalated(project):
    _reviews(project, 600)
    pipeline = chunbot.load(_cascade(project, "cascade", max_tokens=100))
    cold = chunbot.estimate(pipeline)
    assert set(cold.stages[0].models) == {"small"}  # no run yet: the first model only,
    assert any("escalations is left out" in note for note in cold.notes)  # and it says so

    from chunbot_cli import engine

    engine.run(pipeline, engine.RunOptions(limit=200))
    warm = chunbot.estimate(pipeline)
    models = warm.stages[0].models
    assert 350 <= models["small"].requests <= 450  # the 400 records not done
    assert 0.15 * 400 <= models["big"].requests <= 0.45 * 400  # escalated ~30%
    before = sum(s.totals().cost for s in _state(pipeline).stages.values())
    engine.run(pipeline)
    actual = sum(s.totals().cost for s in _state(pipeline).stages.values()) - before
    assert abs(warm.cost - actual) <= 0.15 * actual, (warm.cost, actual)


def _cascade(project, name: str, **params) -> dict:
    """A JSON extraction asked of small, then of big when small's reply misses a key (the
    simulated small model does so for 30% of the records)."""
    return {
        "name": name, "input": str(project / "in.jsonl"), "shard_size": 100,
        "workdir": str(project / "runs"),
        "models": {"small": {"provider": "sim", "model": "sim-small", "wrong_rate": 0.3,
                             "price": PRICES["small"]},
                   "big": {"provider": "sim", "model": "sim-large", "price": PRICES["big"]}},
        "stages": [{"name": "facts", "model": ["small", "big"], "parse": "json",
                    "prompt": "Extract the sentiment, a summary and keywords as JSON: "
                              "{{ text }}",
                    "schema": {"type": "object",
                               "required": ["sentiment", "summary", "keywords"]},
                    "params": params}]}


def _state(pipeline):
    from chunbot_cli.store import Workdir

    return Workdir(pipeline.workdir).load_state()


def test_what_the_cache_answers_through_a_cascade_costs_nothing(project):
    """Replies the cache holds are replayed as the run replays them: a refused one, then
    the next model's, cost nothing."""
    _reviews(project, 300)
    spec = _cascade(project, "replay")
    from chunbot_cli import engine

    engine.run(chunbot.load(spec))
    spec["workdir"] = str(project / "elsewhere")  # no workdir: only the cache knows
    again = chunbot.estimate(spec)
    assert again.stale == 300 and again.stages[0].answered == 300 and again.cost == 0


def test_lines_that_are_no_records_and_failing_templates_cost_nothing(project):
    (project / "in.jsonl").write_text('{"text": "fine"}\nnot json\n{"other": 1}\n')
    result = chunbot.estimate({
        "name": "odd", "input": str(project / "in.jsonl"), "workdir": str(project / "runs"),
        "models": {"m": {"provider": "sim", "model": "sim-small", "price": PRICES["small"]}},
        "stages": [{"name": "s", "model": "m", "prompt": "{{ text }}"}]})
    assert result.stale == 3 and result.stages[0].models["m"].requests == 1
    assert any("1 record(s) fail its templates" in note and "'text' is undefined" in note
               for note in result.notes), result.notes
