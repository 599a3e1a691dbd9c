"""testbench.py and `chunbot test`: assertions over a pipeline's output, per case."""

from __future__ import annotations

import json

import pytest

from chunbot_cli.testbench import (AssertionSpecError, case_assertions, check,
                                   parse_assertion)

from conftest import chunbot, read_jsonl, write_jsonl


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
    ({"field": "data", "json_schema": {"type": "object", "required": ["name"]}},
     {"data": {"name": "x"}}, True),
    ({"field": "data", "json_schema": {"type": "object", "required": ["name"]}},
     {"data": {"title": "x"}}, False),
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
    ({"field": "x", "min": "a lot"}, r"'min' takes a number .*not 'a lot'"),
    ({"field": "x", "max": "high"}, r"'max' takes a number"),
    ({"field": "x", "min": [1]}, r"'min' takes a number"),
    ({"field": "x", "min": True}, r"'min' takes a number"),
    ({"field": "x", "max": "nan"}, r"'max' takes a number"),
    ({"field": "x", "min_length": 2.5}, "whole number"),
    ({"field": "x", "max_length": -1}, "whole number"),
    ({"field": "x", "min": "{{ floor }}"}, None),  # a template: filled in per case
    ({"field": "x", "min": "2.5"}, None),  # a number in a string
    ({"field": "x", "min_length": 3}, None),
    ({"field": "x", "equalz": 1}, r"unknown assertion 'equalz' \(did you mean 'equals'\?\)"),
    ({"field": "x"}, "it has none, so it would check nothing"),
    ({"field": "x", "json_schema": {"type": "nonsense"}}, "not a valid JSON Schema"),
    ({"field": "x", "json_schema": {"file": "missing.json"}}, "cannot read"),
    ({"python": "no_such_module:check"}, "cannot import 'no_such_module'"),
    ({"field": "x", "judge": {"model": "big"}}, "needs a `rubric`"),
    ({"field": "x", "judge": {"model": "nope", "rubric": "r"}}, "no model alias 'nope'"),
])
def test_bad_assertions_are_refused(raw, message):
    if message is None:
        parse_assertion(raw, models={"big"})
        return
    with pytest.raises(AssertionSpecError, match=message):
        parse_assertion(raw, models={"big"})


def test_a_python_check_returns_a_verdict_and_maybe_a_reason(tmp_path):
    (tmp_path / "mychecks.py").write_text(
        "def short(record, case):\n"
        "    return len(record['reply']) <= case['most'], f\"{len(record['reply'])} chars\"\n"
        "def polite(record, case):\n"
        "    return 'sorry' in record['reply']\n"
        "def broken(record, case):\n"
        "    return record['nope']\n")
    record, case = {"reply": "we are sorry"}, {"most": 5}
    short = check(parse_assertion({"python": "mychecks:short"}, tmp_path), record, case, render)
    assert (short.passed, short.reason) == (False, "12 chars")
    polite = parse_assertion({"field": "reply", "python": "mychecks:polite"}, tmp_path)
    assert check(polite, record, case, render).passed
    broken = check(parse_assertion({"python": "mychecks:broken"}, tmp_path), record, case, render)
    assert not broken.passed and broken.reason == "KeyError: 'nope'"


def test_a_plain_expect_value_means_equals():
    found = case_assertions({"label": "negative", "reply": {"icontains": "sorry"}})
    assert [(a.field, a.kind, a.value) for a in found] == [("label", "equals", "negative"),
                                                           ("reply", "icontains", "sorry")]
    wrapped = case_assertions({"data": {"equals": {"name": "x"}}})  # an object, compared
    assert [(a.kind, a.value) for a in wrapped] == [("equals", {"name": "x"})]


@pytest.mark.parametrize("expect, message", [
    # an object is an assertion: a misspelt kind was taken for the value to equal
    ({"sentiment": {"equalz": "x"}}, r"unknown assertion 'equalz' \(did you mean 'equals'\?\)"
                                     r".*\(field 'sentiment'\)"),
    ({"data": {"name": "x", "n": 1}}, r"unknown assertion 'name'.*\{\"equals\": \{…\}\}"),
    ({"score": {"min": "high"}}, r"'min' takes a number .*not 'high' \(field 'score'\)"),
    ({"label": {}}, r"an object names one assertion"),
    ({"label": {"field": "other", "equals": "x"}}, r"an object names one assertion"),
    (["label"], "must be an object"),
])
def test_a_bad_expect_is_refused_not_compared_with(expect, message):
    with pytest.raises(AssertionSpecError, match=message):
        case_assertions(expect)


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


NO_TESTS = PIPELINE.split("tests:")[0]
ENTRY_LINE = PIPELINE.splitlines().index("tests:") + 2  # the first entry's line


@pytest.mark.parametrize("pipeline, cases, where, message", [
    # each of these checked nothing, or what never passes, and ran to a report
    (PIPELINE, [CASES[0], {**CASES[1], "expect": {"sentiment": {"equalz": "x"}}}],
     "cases.jsonl:2: case 'b': key 'expect': ",
     "unknown assertion 'equalz' (did you mean 'equals'?)"),
    (PIPELINE, [{**CASES[0], "expect": {"sentiment": {"min": "high"}}}],
     "cases.jsonl:1: case 'a': key 'expect': ", "'min' takes a number"),
    (PIPELINE.replace('equals: "{{ label }}"', "min: high"), CASES,
     f"p.yaml:{ENTRY_LINE}: key 'tests': entry #1: ", "'min' takes a number"),
    (PIPELINE.replace("field: sentiment,", "field: sentimnt,"), CASES,
     f"p.yaml:{ENTRY_LINE}: key 'tests': entry #1: ",
     "no output record has a field 'sentimnt' (did you mean 'sentiment'?)"),
    (PIPELINE, [*CASES[:2], {**CASES[2], "expect": {"lable": "positive"}}],
     "cases.jsonl:3: case 'c': key 'expect': ",
     "no output record has a field 'lable' (did you mean 'label'?)"),
    (NO_TESTS + "tests:\n  - {field: sentiment, equals: x}\n  - field: sentiment\n", CASES,
     f"p.yaml:{ENTRY_LINE + 1}: key 'tests': entry #2: ", "so it would check nothing"),
    (NO_TESTS, [c for c in CASES if "expect" not in c], "cases.jsonl:1: key 'expect': ",
     "nothing would be checked"),
    (NO_TESTS, [{**c, "expect": {}} for c in CASES], "cases.jsonl:1: key 'expect': ",
     "nothing would be checked"),
])
def test_a_test_that_checks_nothing_is_refused_before_anything_runs(project, pipeline, cases,
                                                                    where, message):
    (project / "p.yaml").write_text(pipeline)
    write_jsonl(project / "cases.jsonl", cases)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", cwd=project)
    assert result.returncode == 2, result.stderr.decode()
    (line,) = result.stderr.decode().splitlines()  # one line, no traceback
    assert line.startswith(f"chunbot: {where}") and message in line, line
    assert not (project / "requests.log").exists() and not (project / "runs").exists()


def test_the_key_at_fault_in_a_tests_entry_gives_its_line(project):
    (project / "p.yaml").write_text(NO_TESTS + "tests:\n  - field: sentiment\n"
                                               "    max_length: lots\n")
    write_jsonl(project / "cases.jsonl", CASES)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", cwd=project)
    assert result.returncode == 2
    assert f"p.yaml:{ENTRY_LINE + 1}: key 'tests': entry #1: 'max_length' takes a number" \
        in result.stderr.decode()


def test_every_case_is_read_before_a_request_and_a_field_may_come_late(project):
    """A bad `expect` deep in a many-shard file stops the test before any request; a field
    only the last case has is a field (the whole file is read, not its first cases)."""
    (project / "p.yaml").write_text(PIPELINE.replace("input: unused.jsonl",
                                                     "input: unused.jsonl\nshard_size: 10"))
    cases = [{"id": f"c{i}", "text": "fine", "label": "positive"} for i in range(300)]
    late = {"id": "late", "text": "fine", "label": "positive", "gold": "positive",
            "expect": {"gold": "positive"}}
    write_jsonl(project / "cases.jsonl", [*cases, {**cases[0], "id": "bad",
                                                   "expect": {"sentiment": {"regx": "."}}}])
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", cwd=project)
    assert result.returncode == 2
    assert b"cases.jsonl:301: case 'bad': key 'expect': unknown assertion 'regx' (did you " \
           b"mean 'regex'?)" in result.stderr
    assert not (project / "requests.log").exists()
    (project / "p.yaml").write_text(PIPELINE.replace('field: sentiment, equals: "{{ label }}"',
                                                     "field: gold, equals: positive"))
    write_jsonl(project / "cases.jsonl", [*cases[:20], late])
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
                     "--json", "r.json", cwd=project)
    assert result.returncode == 1, result.stderr.decode()  # the first 20 have no gold
    report = json.loads((project / "r.json").read_text())
    assert (report["cases"], report["passed"]) == (21, 1)


def test_fields_a_stage_may_add_at_will_are_not_held_to_a_list():
    from chunbot_cli import config
    from chunbot_cli.testbench.validate import stage_fields

    spec = config.StageSpec
    nested = spec("s", "llm", "", output="reply")
    closed = spec("j", "llm", "", spread=True, schema={
        "type": "object", "properties": {"score": {}}, "additionalProperties": False})
    assert stage_fields([nested, spec("f", "filter", "")]) == {"reply"}
    assert stage_fields([nested, closed]) == {"reply", "score"}
    assert stage_fields([nested, spec("p", "python", "")]) is None  # any field
    assert stage_fields([spec("j", "llm", "", spread=True, schema={
        "properties": {"score": {}}})]) is None  # the reply may have more keys


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


JUDGED = """
name: judged
input: unused.jsonl
id_field: id
models:
  s: {provider: sim, model: sim-small, request_log: requests.log}
  grader: {provider: sim, model: sim-large, request_log: judge.log}
stages:
  - name: reply
    model: s
    prompt: "Write a reply to the customer who wrote: {{ text }}"
tests:
  - {field: reply, judge: {model: grader, rubric: 'It names the "{{ part }}".'}}
"""


def test_a_judge_grades_each_case_once_and_its_verdicts_are_kept(project):
    (project / "p.yaml").write_text(JUDGED)
    write_jsonl(project / "cases.jsonl", [
        {"id": "a", "text": "The battery died after a week.", "part": "battery"},
        {"id": "b", "text": "The strap broke.", "part": "strap"},
        {"id": "c", "text": "The lid leaks.", "part": "handle",  # the reply names the lid
         "expect": {"reply": {"judge": {"model": "grader", "rubric": "It says 'sorry'."}}}}])
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r.json",
                     cwd=project)
    assert result.returncode == 1, result.stderr.decode()
    report = json.loads((project / "r.json").read_text())
    assert (report["passed"], report["failed"]) == (2, 1)
    assert report["judges"]["requests"] == 4  # one per case and judge assertion
    assert len((project / "judge.log").read_text().splitlines()) == 4
    c = next(r for r in report["results"] if r["id"] == "c")
    assert c["failures"][0]["reason"] == "it does not say 'handle'"
    assert c["failures"][0]["expected"] == 'It names the "handle".'  # the rubric, filled in
    assert [j["verdict"] for j in c["judges"]] == ["fail", "pass"]
    verdicts = [r["judgement"] for r in read_jsonl(
        project / "runs/judged/tests/cases/.judge/judge/part-00000.jsonl")]
    assert [v["verdict"] for v in verdicts] == ["pass", "pass", "fail", "pass"]

    again = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r2.json",
                    cwd=project)
    assert again.returncode == 1
    assert len((project / "judge.log").read_text().splitlines()) == 4  # judged before
    assert json.loads((project / "r2.json").read_text())["results"] == report["results"]


FLAKY = PIPELINE.replace("request_log: requests.log}",
                         "request_log: requests.log, flaky_rate: 0.3}").replace(
    "  - name: negatives\n    filter: \"sentiment == 'negative'\"\n", "")


def test_repeats_are_fresh_samples_cached_in_turn_and_flaky_cases_are_listed(project):
    (project / "p.yaml").write_text(FLAKY)
    generated = chunbot("sim", "gen", "--records", "60", "--seed", "5", cwd=project)
    (project / "cases.jsonl").write_bytes(generated.stdout)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--repeat", "4", "-q",
                     "--json", "r.json", cwd=project)
    report = json.loads((project / "r.json").read_text())
    assert report["repeat"] == 4 and report["runs"] == 240
    assert len((project / "requests.log").read_text().splitlines()) == 240  # none shared
    flaky = [r for r in report["results"] if r["status"] == "flaky"]
    assert flaky and report["flaky"] == len(flaky)
    assert all(0 < r["passes"] < 4 and r["runs"] == 4 for r in flaky)
    low, high = report["pass_rate_95"]
    assert low < report["pass_rate"] < high
    assert abs(report["pass_rate"] - 0.7) < 0.12
    assert f"FLAKY {flaky[0]['id']}: passed {flaky[0]['passes']} of 4" in result.stderr.decode()

    again = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--repeat", "4", "-q",
                    "--json", "r2.json", cwd=project)
    assert len((project / "requests.log").read_text().splitlines()) == 240  # from the cache
    assert json.loads((project / "r2.json").read_text())["results"] == report["results"]
    assert again.returncode == result.returncode == 1


def test_junit_xml_has_a_testcase_per_case_with_failures_and_errors(project):
    import xml.etree.ElementTree as ET

    (project / "p.yaml").write_text(PIPELINE)
    write_jsonl(project / "cases.jsonl", CASES)
    chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
            "--junit", "junit.xml", cwd=project)
    suite = ET.parse(project / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert list(cases) == ["a", "b", "c", "d"]
    assert not list(cases["a"]) and not list(cases["b"])
    failure = cases["c"].find("failure")
    assert "sentiment equals: expected 'positive', got 'neutral'" in failure.get("message")
    assert cases["d"].find("error") is not None and cases["d"].find("failure") is None
    assert "sentiment" in cases["d"].find("error").get("message")


def test_a_regression_against_the_baseline_exits_1_and_names_the_case(project):
    (project / "p.yaml").write_text(PIPELINE)
    write_jsonl(project / "cases.jsonl", CASES)
    saved = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
                    "--save-baseline", "base", cwd=project)
    assert saved.returncode == 1  # c fails, d errs: the baseline keeps them as they are
    same = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
                   "--baseline", "base", cwd=project)
    assert same.returncode == 0, same.stderr.decode()  # no regression
    changed = [dict(CASES[0], label="negative"), *CASES[1:3], dict(CASES[3], text="so bad")]
    changed[2] = dict(changed[2], label="neutral")
    write_jsonl(project / "cases.jsonl", changed)
    result = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
                     "--baseline", "base", "--json", "r.json", cwd=project)
    assert result.returncode == 1
    baseline = json.loads((project / "r.json").read_text())["baseline"]
    assert (baseline["regressions"], baseline["regressed"]) == (1, ["a"])
    assert baseline["improved"] == ["c"]
    assert "REGRESSED a" in result.stderr.decode()
    assert "IMPROVED c" in result.stderr.decode()


def test_fail_under_passes_a_pass_rate_at_or_above_it(project):
    (project / "p.yaml").write_text(PIPELINE)
    write_jsonl(project / "cases.jsonl", CASES)
    args = ("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q")
    assert chunbot(*args, "--fail-under", "0.5", cwd=project).returncode == 0  # 2 of 4
    assert chunbot(*args, "--fail-under", "0.6", cwd=project).returncode == 1
    assert chunbot(*args, "--fail-under", "2", cwd=project).returncode == 2  # usage


def test_a_second_test_sends_nothing_to_the_server(project, sim_server):
    server = sim_server()
    (project / "p.yaml").write_text(PIPELINE.replace(
        "{provider: sim, model: sim-small, request_log: requests.log}",
        f"{{provider: openai, model: sim-small, base_url: '{server.url}/v1'}}"))
    write_jsonl(project / "cases.jsonl", CASES)
    env = {"OPENAI_API_KEY": "sk-test"}
    first = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r1.json",
                    cwd=project, env=env)
    sent = server.stats()["answered"]
    assert first.returncode == 1 and sent == 3  # d has no text: no request
    second = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r2.json",
                     cwd=project, env=env)
    assert second.returncode == 1 and server.stats()["answered"] == sent
    results = [json.loads((project / f).read_text())["results"] for f in ("r1.json", "r2.json")]
    assert results[0] == results[1]


def test_kill_9_during_a_test_then_again_gives_the_same_report(project):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    slow = FLAKY.replace("flaky_rate: 0.3}", "latency_ms: 20, max_concurrency: 4}").replace(
        "input: unused.jsonl", "input: unused.jsonl\nshard_size: 50")
    (project / "p.yaml").write_text(slow)
    generated = chunbot("sim", "gen", "--records", "400", "--hard", "0.1", "--seed", "9",
                        cwd=project)
    (project / "cases.jsonl").write_bytes(generated.stdout)
    process = subprocess.Popen([sys.executable, "-m", "chunbot_cli", "test", "p.yaml",
                                "--cases", "cases.jsonl", "-q"], cwd=project,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = project / "requests.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            not log.exists() or len(log.read_text().splitlines()) < 120):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -9, "the test finished before the kill"
    before = len(log.read_text().splitlines())
    assert before < 400
    resumed = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "r.json",
                      cwd=project, timeout=120)
    assert resumed.returncode == 1, resumed.stderr.decode()
    assert len(log.read_text().splitlines()) <= 400 + 4  # only requests in flight again
    shutil.rmtree(project / "runs")
    shutil.rmtree(project / ".cache")
    clean = chunbot("test", "p.yaml", "--cases", "cases.jsonl", "-q", "--json", "clean.json",
                    cwd=project, timeout=120)
    assert clean.returncode == 1
    report, expected = (json.loads((project / f).read_text()) for f in ("r.json", "clean.json"))
    assert report["results"] == expected["results"]
    assert (report["cases"], report["passed"]) == (expected["cases"], expected["passed"]) \
        and report["cases"] == 400


def test_the_wilson_interval_stays_inside_0_and_1_at_the_edges():
    from chunbot_cli.testbench.report import wilson

    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    assert wilson(0, 10)[0] == 0.0 and 0.2 < wilson(0, 10)[1] < 0.35
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 0.0)


def test_a_baseline_is_read_in_step_with_the_cases_and_holds_only_what_is_out_of_order(
        tmp_path):
    from chunbot_cli.testbench.report import Baseline

    write_jsonl(tmp_path / "results.jsonl", [{"id": i, "status": "passed" if i % 2 else "failed"}
                                             for i in range(6)])
    baseline = Baseline(tmp_path)
    assert [baseline.status(i) for i in (0, 1, 2)] == ["failed", "passed", "failed"]
    assert not baseline.ahead  # in order: nothing held
    assert baseline.status(4) == "failed" and list(baseline.ahead) == [3]
    assert baseline.status(3) == "passed" and baseline.status("new") is None
    baseline.close()


def test_errors_stay_errors_until_retried_and_the_summary_says_how(project, sim_server):
    server = sim_server("--fail-prompt", "broke")  # answers 500 to case b's prompt
    (project / "p.yaml").write_text(PIPELINE.replace(
        "{provider: sim, model: sim-small, request_log: requests.log}",
        f"{{provider: openai, model: sim-small, base_url: '{server.url}/v1'}}").replace(
        "tests:", "defaults: {retries: 0}\ntests:"))
    write_jsonl(project / "cases.jsonl", CASES[:3])
    args = ("test", "p.yaml", "--cases", "cases.jsonl", "--stage", "sentiment", "-q",
            "--json", "r.json")
    env = {"OPENAI_API_KEY": "sk-test"}
    first = chunbot(*args, cwd=project, env=env)
    assert json.loads((project / "r.json").read_text())["errors"] == 1
    assert "chunbot test p.yaml --cases cases.jsonl --stage sentiment --retry-errors" \
        in first.stderr.decode()
    server.kill()
    sim_server(port=server.port)  # the same server, mended
    again = chunbot(*args, cwd=project, env=env)
    assert json.loads((project / "r.json").read_text())["errors"] == 1  # committed: kept
    retried = chunbot(*args, "--retry-errors", cwd=project, env=env)
    report = json.loads((project / "r.json").read_text())
    assert (report["errors"], report["passed"], report["failed"]) == (0, 2, 1), \
        retried.stderr.decode()
    assert again.returncode == retried.returncode == 1
