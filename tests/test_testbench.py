"""testbench.py and `chunbot test`: assertions over a pipeline's output, per case."""

from __future__ import annotations

import json

import pytest

from chunbot_cli.testbench import (AssertionSpecError, case_assertions, check,
                                   parse_assertion)

from conftest import chunbot, write_jsonl


def render(template, case):
    from chunbot_cli import templates

    return templates.compile_template(template).render(case)


@pytest.mark.parametrize("raw, record, passed", [
    ({"field": "label", "equals": "{{ gold }}"}, {"label": "negative"}, True),
    ({"field": "label", "equals": "positive"}, {"label": "negative"}, False),
    ({"field": "n", "equals": "{{ count }}"}, {"n": 3}, True),  # a template's "3" is 3
    ({"field": "label", "one_of": ["negative", "neutral"]}, {"label": "neutral"}, True),
    ({"field": "label", "one_of": ["positive"]}, {"label": "neutral"}, False),
    ({"field": "reply", "contains": "sorry"}, {"reply": "we are sorry"}, True),
    ({"field": "reply", "contains": "Sorry"}, {"reply": "we are sorry"}, False),
    ({"field": "reply", "icontains": "SORRY"}, {"reply": "we are sorry"}, True),
    ({"field": "tags", "contains": "a"}, {"tags": ["a", "b"]}, True),
    ({"field": "reply", "regex": r"^we .* sorry$"}, {"reply": "we are sorry"}, True),
    ({"field": "reply", "regex": r"^sorry"}, {"reply": "we are sorry"}, False),
    ({"field": "score", "min": 3}, {"score": 4}, True),
    ({"field": "score", "max": 3}, {"score": 4}, False),
    ({"field": "reply", "min_length": 5}, {"reply": "hi"}, False),
    ({"field": "reply", "max_length": 5}, {"reply": "hi"}, True),
    ({"expr": "label == 'negative' and reply | length > 3"},
     {"label": "negative", "reply": "sorry"}, True),
    ({"expr": "missing.field"}, {"label": "x"}, False),
    ({"filtered": True}, None, True),
    ({"filtered": False}, None, False),
    ({"field": "label", "equals": "x"}, None, False),  # dropped: nothing to compare
])
def test_each_assertion_kind_passes_and_fails(raw, record, passed):
    case = {"gold": "negative", "count": 3}
    assert check(parse_assertion(raw), record, case, render).passed is passed


@pytest.mark.parametrize("raw, message", [
    ({"field": "x", "equal": 1}, "unknown assertion 'equal'"),
    ({"field": "x"}, "exactly one assertion kind"),
    ({"field": "x", "equals": 1, "contains": 1}, "exactly one"),
    ({"equals": 1}, "needs a `field`"),
    ({"field": "x", "regex": "("}, "regex does not compile"),
    ({"field": "x", "one_of": "a"}, "takes a list"),
    ({"field": "x", "min": "a lot"}, None),
])
def test_bad_assertions_are_refused(raw, message):
    if message is None:
        parse_assertion(raw)  # a number as a string is left to the check
        return
    with pytest.raises(AssertionSpecError, match=message):
        parse_assertion(raw)


def test_a_plain_expect_value_means_equals():
    found = case_assertions({"label": "negative", "reply": {"icontains": "sorry"}})
    assert [(a.field, a.kind, a.value) for a in found] == [("label", "equals", "negative"),
                                                           ("reply", "icontains", "sorry")]


PIPELINE = """
name: bench
input: unused.jsonl
models: {s: {provider: sim, model: sim-small, request_log: requests.log}}
stages:
  - name: sentiment
    model: s
    prompt: "Label the sentiment of: {{ text }}"
  - name: negatives
    filter: "sentiment == 'negative'"
tests:
  - {field: sentiment, equals: "{{ label }}"}
"""

CASES = [{"id": "a", "text": "great, love it", "label": "positive"},
         {"id": "b", "text": "it broke, terrible", "label": "negative",
          "expect": {"sentiment": {"icontains": "NEG"}}},
         {"id": "c", "text": "okay I guess", "label": "positive"},
         {"id": "d", "title": "no text", "label": "neutral"}]


def test_chunbot_test_checks_every_case_in_its_own_workdir_and_resends_nothing(project):
    (project / "p.yaml").write_text(PIPELINE)
    write_jsonl(project / "cases.jsonl", CASES)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment",
                     "-q", "--json", "report.json", cwd=project)
    assert result.returncode == 1  # c fails, d is an error
    report = json.loads((project / "report.json").read_text())
    assert (report["cases"], report["passed"], report["failed"], report["errors"]) == (4, 2, 1, 1)
    statuses = {r["id"]: r["status"] for r in report["results"]}
    assert statuses == {"a": "passed", "b": "passed", "c": "failed", "d": "error"}
    failure = next(r for r in report["results"] if r["id"] == "c")["failures"][0]
    assert failure == {"assertion": "sentiment equals", "expected": "positive", "got": "neutral"}
    assert report["assertions"]["sentiment icontains"] == {"passed": 1, "checked": 1}
    assert b"FAIL c: sentiment equals: expected 'positive', got 'neutral'" in result.stderr
    assert (project / "runs/bench/tests/cases/sentiment").is_dir()
    assert not (project / "runs/bench/sentiment").exists()  # the production workdir: untouched

    sent = len((project / "requests.log").read_text().splitlines())
    again = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
                    cwd=project)
    assert again.returncode == 1
    assert len((project / "requests.log").read_text().splitlines()) == sent


def test_bad_assertion_keys_are_refused_before_anything_runs(project):
    (project / "p.yaml").write_text(PIPELINE.replace("equals:", "equal:"))
    write_jsonl(project / "cases.jsonl", CASES)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", cwd=project)
    assert result.returncode == 2
    assert b"p.yaml" in result.stderr and b"key 'tests'" in result.stderr
    assert b"unknown assertion 'equal'" in result.stderr
    assert not (project / "requests.log").exists()


def test_a_bad_expect_in_a_case_names_its_line_before_anything_runs(project):
    (project / "p.yaml").write_text(PIPELINE)
    write_jsonl(project / "cases.jsonl", [CASES[0], {**CASES[1], "expect": {"x": {"regex": "("}}}])
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", cwd=project)
    assert result.returncode == 2
    assert b"cases.jsonl:2: case 'b': key 'expect': regex does not compile" in result.stderr
    assert not (project / "requests.log").exists()


def test_sim_gen_hard_share_is_the_share_a_test_finds_failing(project):
    generated = chunbot("sim", "gen", "--records", "1000", "--hard", "0.1", "--seed", "3",
                        cwd=project)
    assert generated.returncode == 0
    (project / "cases.jsonl").write_bytes(generated.stdout)
    (project / "p.yaml").write_text(PIPELINE.replace("  - name: negatives\n    filter: "
                                                     "\"sentiment == 'negative'\"\n", ""))
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r.json",
                     cwd=project)
    assert result.returncode == 1
    report = json.loads((project / "r.json").read_text())
    assert report["cases"] == 1000 and abs(report["pass_rate"] - 0.9) <= 0.02
    again = chunbot("sim", "gen", "--records", "1000", "--hard", "0.1", "--seed", "3",
                    cwd=project)
    assert again.stdout == generated.stdout  # the same seed, the same cases
