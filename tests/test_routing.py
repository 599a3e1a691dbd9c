"""Mixing models: `route:` sends each record to the cascade its first true `when` picks, and
`fields: spread` puts a JSON reply's keys into the record."""

from __future__ import annotations

import json

import pytest

from chunbot_cli.config import ConfigError, load

from conftest import chunbot, read_jsonl, read_stage, write_jsonl

ROUTED = """
name: routed
input: data.jsonl
models:
  small: {provider: sim, model: sim-small, request_log: small.log}
  big: {provider: sim, model: sim-large, request_log: big.log}
stages:
  - name: sentiment
    route:
      - {when: "text | length > 40", model: big}
      - {model: [small, big]}
    prompt: "Label the sentiment of: {{ text }}"
  - name: facts
    model: small
    prompt: "Extract as JSON: {{ text }}"
    parse: json
    fields: spread
  - name: negatives
    filter: "sentiment == 'negative' and keywords | length > 0"
"""


def logged(project, name: str) -> int:
    path = project / name
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_routes_by_length_pick_the_model_and_the_trace_says_which(project):
    short = ["great, love it", "it broke, terrible", "okay"]
    long = ["it broke after two days and the seller never answered, terrible",
            "wonderful quality, arrived early and works perfectly, love it"]
    write_jsonl(project / "data.jsonl", [{"id": f"r{i}", "text": t}
                                         for i, t in enumerate(short + long)])
    (project / "p.yaml").write_text(ROUTED)
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert logged(project, "big.log") == 2 + 0  # the long ones, and no short one escalated
    assert logged(project, "small.log") == 3 + 5  # the short ones, then every facts request
    traces = {t["_id"]: t for t in read_jsonl(project / "runs/routed/sentiment/trace-00000.jsonl")}
    assert traces["r0"]["route"] == "default" and traces["r0"]["model"] == "small"
    assert traces["r3"]["route"] == "text | length > 40" and traces["r3"]["model"] == "big"

    facts = read_stage(project / "runs/routed", "facts")
    assert all({"summary", "keywords"} <= set(r) and "facts" not in r for r in facts)
    assert facts[1]["sentiment"] == "negative"  # the record's own field, from the first stage
    negatives = read_stage(project / "runs/routed", "negatives")
    assert [r["_id"] for r in negatives] == ["r1", "r3"]  # a filter on the spread keys


def test_spread_refuses_a_reply_that_is_not_an_object(project):
    write_jsonl(project / "data.jsonl", [{"id": "a", "text": "fine"}])
    (project / "p.yaml").write_text(
        "name: s\ninput: data.jsonl\nmodels: {m: {provider: sim, model: sim-small}}\n"
        "stages:\n  - name: label\n    model: m\n    prompt: 'Label the sentiment of: "
        "{{ text }}'\n    parse: json\n    fields: spread\n    retries: 0\n")
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 1
    error = read_jsonl(project / "runs/s/label/errors.jsonl")[0]
    assert "not valid JSON" in error["error"] or "JSON object" in error["error"]


BASE = ("name: r\ninput: d.jsonl\nmodels:\n  small: {provider: sim, model: sim-small}\n"
        "  big: {provider: sim, model: sim-large}\nstages:\n  - name: s\n"
        "    prompt: '{{ text }}'\n")


@pytest.mark.parametrize("stage, expected", [
    ("    route:\n      - {when: 'text | length > 9', model: huge}\n      - {model: small}\n",
     "key 'route': unknown model alias 'huge'"),
    ("    route:\n      - {when: 'text | length > 9', model: big}\n",
     "key 'route': needs a default"),
    ("    route:\n      - {model: small}\n      - {when: 'x', model: big}\n",
     "key 'route': entry #1 has no `when` (the default) and must come last"),
    ("    route:\n      - {when: 'text |', model: big}\n      - {model: small}\n",
     "key 'route': entry #1: `when` does not compile"),
    ("    route:\n      - {model: small, if: x}\n", "key 'route': entry #1 must be a mapping"),
    ("    route:\n      - {model: small}\n    mode: batch\n",
     "key 'mode': a stage with `route:` runs in realtime"),
    ("    fields: spread\n", "key 'fields': 'spread' needs parse: json"),
    ("    fields: flat\n", "key 'fields': must be 'nested'"),
])
def test_validate_names_the_stage_and_the_key(project, stage, expected):
    (project / "p.yaml").write_text(BASE + stage)
    with pytest.raises(ConfigError, match="stage 's': " + expected.replace("(", r"\(")
                       .replace(")", r"\)").replace("|", r"\|")):
        load(project / "p.yaml")


def test_routes_and_spread_are_part_of_the_fingerprint(project):
    (project / "a.yaml").write_text(BASE + "    route:\n      - {model: small}\n")
    (project / "b.yaml").write_text(BASE + "    route:\n      - {when: 'text', model: big}\n"
                                    "      - {model: small}\n")
    (project / "c.yaml").write_text(BASE + "    model: small\n")
    prints = {load(project / f"{n}.yaml").stages[0].fingerprint for n in "abc"}
    assert len(prints) == 3
    assert json.dumps(load(project / "b.yaml").stages[0].definition["route"][0]["when"]) \
        == '"text"'


CHECKED = """
name: checked
input: data.jsonl
models:
  weak: {{provider: sim, model: sim-small, wrong_rate: {wrong}, request_log: weak.log,
          price: {{input: 0.1, output: 0.1}}}}
  strong: {{provider: sim, model: sim-large, request_log: strong.log,
            price: {{input: 1.0, output: 1.0}}}}
stages:
  - name: sentiment
    model: [weak, strong]
    prompt: "Label the sentiment of: {{{{ text }}}}"
    accept: "{accept}"
    reask: {reask}
"""


def labelled(n: int) -> list[dict]:
    texts = ["great, I love it", "it broke, terrible", "okay I guess"]
    return [{"id": f"r{i:03d}", "text": f"{texts[i % 3]} #{i}",
             "gold": ["positive", "negative", "neutral"][i % 3]} for i in range(n)]


def test_a_cascade_escalates_what_accept_refuses_and_a_rerun_sends_nothing(project):
    write_jsonl(project / "data.jsonl", labelled(200))
    # `accept` that knows the gold label stands for a check the weak model often fails
    (project / "p.yaml").write_text(CHECKED.format(wrong=0.25, accept="sentiment == gold",
                                                   reask=0))
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    out = read_stage(project / "runs/checked", "sentiment")
    assert all(r["sentiment"] == r["gold"] for r in out)  # the strong model's accuracy
    weak, strong = logged(project, "weak.log"), logged(project, "strong.log")
    assert weak == 200 and 25 <= strong <= 75  # only what the weak model got wrong
    traces = read_jsonl(project / "runs/checked/sentiment/trace-00000.jsonl")
    escalated = [t for t in traces if t.get("escalations")]
    assert len(escalated) == strong
    assert escalated[0]["escalations"] == ["weak → strong"] and escalated[0]["model"] == "strong"
    assert escalated[0]["refused"][0]["why"] == "`sentiment == gold` is false"

    again = chunbot("run", "p.yaml", "-q", "--workdir", "runs/again", cwd=project)
    assert again.returncode == 0
    assert (logged(project, "weak.log"), logged(project, "strong.log")) == (weak, strong)
    assert read_stage(project / "runs/again", "sentiment") == out


def test_a_reask_fixes_the_reply_without_escalating(project):
    write_jsonl(project / "data.jsonl", labelled(60))
    (project / "p.yaml").write_text(CHECKED.format(wrong=0.5, accept="sentiment == gold",
                                                   reask=1))
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert logged(project, "strong.log") == 0
    traces = read_jsonl(project / "runs/checked/sentiment/trace-00000.jsonl")
    reasked = [t for t in traces if t.get("reasks")]
    assert 10 <= len(reasked) <= 50 and logged(project, "weak.log") == 60 + len(reasked)
    follow_up = reasked[0]
    assert follow_up["model"] == "weak" and follow_up["refused"][0]["model"] == "weak"
    assert follow_up["request"]["messages"][-1]["content"].startswith("Label the sentiment")
    assert follow_up["reasks"] == 1 and not follow_up.get("escalations")
    assert all(r["sentiment"] == r["gold"] for r in read_stage(project / "runs/checked",
                                                               "sentiment"))


def test_an_incomplete_json_reply_is_reasked_and_a_schema_failure_keeps_the_replies(project):
    write_jsonl(project / "data.jsonl", [{"id": f"r{i}", "text": f"the kettle leaks {i}"}
                                         for i in range(20)])
    schema = {"type": "object", "required": ["sentiment", "summary", "keywords"]}
    (project / "schemas").mkdir()
    (project / "schemas/facts.json").write_text(json.dumps(schema))
    pipeline = (
        "name: facts\ninput: data.jsonl\n"
        "models: {weak: {provider: sim, model: sim-small, wrong_rate: 1.0, "
        "request_log: weak.log}}\n"
        "stages:\n  - name: facts\n    model: weak\n    prompt: 'Extract as JSON: {{ text }}'\n"
        "    parse: json\n    schema: {file: schemas/facts.json}\n    reask: REASK\n")
    (project / "p.yaml").write_text(pipeline.replace("REASK", "1"))
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert logged(project, "weak.log") == 40  # every first reply lacked a key; asked again
    assert all("keywords" in r["facts"] for r in read_stage(project / "runs/facts", "facts"))

    (project / "p.yaml").write_text(pipeline.replace("REASK", "0").replace("runs/facts", "x")
                                    .replace("name: facts\n", "name: nofix\n", 1))
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 1
    error = read_jsonl(project / "runs/nofix/facts/errors.jsonl")[0]
    assert "keywords" in error["error"] and "schema" in error["error"]
    assert error["replies"][0]["model"] == "weak" and "summary" in error["replies"][0]["reply"]


def test_a_schema_that_is_not_json_schema_is_refused(project):
    (project / "p.yaml").write_text(BASE.replace("prompt: '{{ text }}'", "prompt: '{{ text }}'\n"
                                                 "    parse: json\n    schema: {type: strin}"))
    with pytest.raises(ConfigError, match="stage 's': key 'schema': not a valid JSON Schema"):
        load(project / "p.yaml")


def test_structured_requests_carry_each_providers_own_format(project, sim_server):
    server = sim_server()
    write_jsonl(project / "data.jsonl", [{"id": f"r{i}", "text": f"the lid leaks, awful {i}"}
                                         for i in range(12)])
    schema = "{type: object, required: [sentiment, summary, keywords]}"
    for provider, stream in (("openai", ""), ("anthropic", ""), ("anthropic", ", stream: true")):
        base = server.url + ("/v1" if provider == "openai" else "")
        name = f"{provider}{'-sse' if stream else ''}"
        (project / f"{name}.yaml").write_text(
            f"name: {name}\ninput: data.jsonl\n"
            f"models: {{m: {{provider: {provider}, model: sim-small, base_url: '{base}'}}}}\n"
            "stages:\n  - name: facts\n    model: m\n    prompt: 'Extract as JSON: {{ text }}'\n"
            f"    parse: json\n    schema: {schema}\n    structured: true\n"
            f"    cache: false\n    params: {{max_tokens: 200{stream}}}\n")
        before = server.stats()
        result = chunbot("run", f"{name}.yaml", "-q", cwd=project)
        assert result.returncode == 0, result.stderr.decode()
        after = server.stats()
        assert after["structured"] - before["structured"] == 12  # every request asked for it
        facts = read_stage(project / f"runs/{name}", "facts")
        assert len(facts) == 12 and all(set(r["facts"]) == {"sentiment", "summary", "keywords"}
                                        for r in facts)
    (project / "bad.yaml").write_text(BASE + "    structured: true\n")
    with pytest.raises(ConfigError, match="key 'structured': asks the provider"):
        load(project / "bad.yaml")


def test_the_structured_bodies_are_the_vendors_own():
    from chunbot_cli.config import ModelSpec
    from chunbot_cli.llm import anthropic, openai
    from chunbot_cli.llm.types import Request

    schema = {"type": "object", "required": ["defect"]}
    request = Request(messages=[{"role": "user", "content": "x"}], schema=schema)
    sent = openai.body(ModelSpec(alias="o", provider="openai", model="gpt"), request)
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": schema, "strict": True}}
    sent = anthropic.body(ModelSpec(alias="a", provider="anthropic", model="claude"), request)
    assert sent["tools"][0]["input_schema"] == schema
    assert sent["tool_choice"] == {"type": "tool", "name": sent["tools"][0]["name"]}
    reply = anthropic.reply({"content": [{"type": "tool_use", "id": "t", "name": "reply",
                                          "input": {"defect": "leaks"}}]}, "claude")
    assert json.loads(reply.text) == {"defect": "leaks"}


def test_status_counts_per_model_what_the_models_saw(project):
    write_jsonl(project / "data.jsonl", labelled(120))
    (project / "p.yaml").write_text(CHECKED.format(wrong=0.4, accept="sentiment == gold",
                                                   reask=1).replace("reask: 1", "reask: 1\n"
                                                   "    route:\n      - {when: \"'#7' in text\""
                                                   ", model: strong}\n      - {model: [weak, strong]}"))
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    status = chunbot("status", "p.yaml", "--json", cwd=project)
    stage = json.loads(status.stdout)["stages"][0]
    weak, strong = stage["models"]["weak"], stage["models"]["strong"]
    assert weak["requests"] == logged(project, "weak.log")
    assert strong["requests"] == logged(project, "strong.log")
    assert weak["answered"] + strong["answered"] == 120
    assert weak["reasks"] > 0 and weak["cost"] > 0 and strong["cost"] > 0
    assert abs(weak["cost"] + strong["cost"] - stage["cost"]) < 1e-5
    assert b"model weak:" in result.stderr and b"model strong:" in result.stderr  # the summary


def test_sim_serve_has_a_weak_model_too(project, sim_server):
    server = sim_server("--wrong-rate", "1")
    write_jsonl(project / "data.jsonl", labelled(9))
    (project / "p.yaml").write_text(
        "name: served\ninput: data.jsonl\n"
        f"models: {{weak: {{provider: openai, model: sim-small, base_url: '{server.url}/v1'}}}}\n"
        "stages:\n  - name: sentiment\n    model: weak\n"
        "    prompt: 'Label the sentiment of: {{ text }}'\n    accept: 'sentiment == gold'\n"
        "    reask: 1\n    cache: false\n")
    result = chunbot("run", "p.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert server.stats()["answered"] == 18  # every first answer wrong, every re-ask right
    assert all(r["sentiment"] == r["gold"] for r in read_stage(project / "runs/served",
                                                               "sentiment"))
