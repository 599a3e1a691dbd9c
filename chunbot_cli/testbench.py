"""The test bench: assertions over a pipeline's output records, and the report of a run of
`chunbot test` (DESIGN.md, "Test bench").

An assertion names a `field` of the output record and one kind: `equals`, `one_of`,
`contains`, `icontains`, `regex`, `min`, `max`, `min_length`, `max_length`, `expr` (a Jinja2
expression over the output record, true passes) or `filtered` (the case was dropped by a
filter stage, or not). The pipeline's `tests:` list applies to every case, its values
templates over the case's fields; a case's own `expect` object adds more (`{"label":
"negative", "reply": {"icontains": "sorry"}}`: a plain value means `equals`). A case whose
pipeline run failed is an error, not a failure.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

KINDS = ("equals", "one_of", "contains", "icontains", "regex", "min", "max", "min_length",
         "max_length", "expr", "filtered")


class AssertionSpecError(ValueError):
    """An assertion that cannot be checked (an unknown kind, a value of the wrong type)."""


@dataclass(frozen=True)
class Assertion:
    field: str | None  # None: `expr` over the whole record, or `filtered`
    kind: str
    value: Any  # as written: a template (a string) for the `tests:` list's values

    @property
    def label(self) -> str:
        return f"{self.field} {self.kind}" if self.field else self.kind


def parse_assertion(raw: Any) -> Assertion:
    """One entry of `tests:` (`{field: F, KIND: VALUE}`); raises AssertionSpecError."""
    if not isinstance(raw, dict):
        raise AssertionSpecError("must be a mapping like {field: label, equals: positive}")
    kinds = [k for k in raw if k != "field"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise AssertionSpecError(f"unknown assertion {unknown[0]!r}; known: {', '.join(KINDS)}")
    if len(kinds) != 1:
        raise AssertionSpecError("needs exactly one assertion kind besides `field`")
    kind = kinds[0]
    name = raw.get("field")
    if name is not None and not isinstance(name, str):
        raise AssertionSpecError("`field` must be a field name")
    if name is None and kind not in ("expr", "filtered"):
        raise AssertionSpecError(f"{kind!r} needs a `field`")
    value = raw[kind]
    if kind in ("expr", "regex"):
        if not isinstance(value, str):
            raise AssertionSpecError(f"{kind!r} takes a string")
        if kind == "regex":
            try:
                re.compile(value)
            except re.error as e:
                raise AssertionSpecError(f"regex does not compile: {e}") from None
        else:
            from . import templates

            try:
                templates.compile_expression(value)
            except templates.TemplateError as e:
                raise AssertionSpecError(f"expr does not compile: {e}") from None
    if kind == "one_of" and not isinstance(value, list):
        raise AssertionSpecError("'one_of' takes a list")
    if kind == "filtered" and not isinstance(value, bool):
        raise AssertionSpecError("'filtered' takes true or false")
    if kind in ("min", "max", "min_length", "max_length") and (
            isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise AssertionSpecError(f"{kind!r} takes a number")
    return Assertion(name, kind, value)


def case_assertions(expect: Any) -> list[Assertion]:
    """A case's `expect` object: per field a plain value (equals) or `{KIND: VALUE}`."""
    if expect is None:
        return []
    if not isinstance(expect, dict):
        raise AssertionSpecError("`expect` must be an object of field: value")
    found = []
    for name, wanted in expect.items():
        if isinstance(wanted, dict) and len(wanted) == 1 and next(iter(wanted)) in KINDS:
            found.append(parse_assertion({"field": name, **wanted}))
        else:
            found.append(Assertion(name, "equals", wanted))
    return found


@dataclass
class Outcome:
    assertion: Assertion
    passed: bool
    expected: Any
    got: Any


def check(assertion: Assertion, record: dict[str, Any] | None, case: dict[str, Any],
          render: Callable[[str, dict[str, Any]], Any]) -> Outcome:
    """Check one assertion. `record`: the case's output record, None when it was dropped
    by a filter; `render` fills a `tests:` template from the case's fields."""
    wanted = assertion.value
    if isinstance(wanted, str) and "{" in wanted and assertion.kind not in ("expr", "regex"):
        wanted = render(wanted, case)
    if assertion.kind == "filtered":
        return Outcome(assertion, (record is None) == wanted, wanted, record is None)
    if record is None:
        return Outcome(assertion, False, wanted, "(filtered out)")
    if assertion.kind == "expr":
        try:
            passed = _expression(wanted)(record)
        except Exception as e:  # an error in the user's expression fails the case
            return Outcome(assertion, False, wanted, f"{type(e).__name__}: {e}")
        return Outcome(assertion, bool(passed), wanted, None)
    got = record.get(assertion.field) if assertion.field else record
    kind = assertion.kind
    try:
        if kind == "equals":  # a template's "3" equals 3
            passed = got == wanted or (type(got) is not type(wanted)
                                       and str(got) == str(wanted))
        elif kind == "one_of":
            passed = got in wanted
        elif kind == "contains":
            passed = str(wanted) in got if isinstance(got, str) else wanted in (got or ())
        elif kind == "icontains":
            passed = str(wanted).lower() in str(got).lower()
        elif kind == "regex":
            passed = re.search(wanted, str(got)) is not None
        elif kind == "min":
            passed = float(got) >= float(wanted)
        elif kind == "max":
            passed = float(got) <= float(wanted)
        elif kind == "min_length":
            passed = len(got) >= int(wanted)
        else:  # max_length
            passed = len(got) <= int(wanted)
    except (TypeError, ValueError):
        passed = False
    return Outcome(assertion, bool(passed), wanted, got)


@lru_cache(maxsize=256)
def _expression(source: str) -> Callable[[dict[str, Any]], bool]:
    """An `expr` compiled once, not once per case."""
    from . import templates

    return templates.compile_expression(source)


@dataclass
class CaseResult:
    case_id: Any
    status: str  # "passed", "failed" or "error"
    outcomes: list[Outcome] = field(default_factory=list)
    error: str | None = None  # why its pipeline run failed


@dataclass
class Report:
    cases: list[CaseResult]

    @property
    def passed(self) -> int:
        return sum(1 for c in self.cases if c.status == "passed")

    @property
    def failed(self) -> int:
        return sum(1 for c in self.cases if c.status == "failed")

    @property
    def errors(self) -> int:
        return sum(1 for c in self.cases if c.status == "error")

    @property
    def pass_rate(self) -> float:
        checked = self.passed + self.failed + self.errors
        return self.passed / checked if checked else 0.0

    def by_assertion(self) -> dict[str, tuple[int, int]]:
        """Per assertion label: passed, checked."""
        passed: Counter[str] = Counter()
        checked: Counter[str] = Counter()
        for case in self.cases:
            for outcome in case.outcomes:
                checked[outcome.assertion.label] += 1
                passed[outcome.assertion.label] += outcome.passed
        return {label: (passed[label], checked[label]) for label in checked}

    def first_failures(self, n: int = 10) -> list[tuple[Any, Outcome]]:
        found = []
        for case in self.cases:
            for outcome in case.outcomes:
                if not outcome.passed:
                    found.append((case.case_id, outcome))
                    if len(found) == n:
                        return found
        return found

    def to_json(self) -> dict[str, Any]:
        return {"cases": len(self.cases), "passed": self.passed, "failed": self.failed,
                "errors": self.errors, "pass_rate": round(self.pass_rate, 6),
                "assertions": {label: {"passed": p, "checked": c}
                               for label, (p, c) in self.by_assertion().items()},
                "results": [{"id": c.case_id, "status": c.status, "error": c.error,
                             "failures": [{"assertion": o.assertion.label,
                                           "expected": o.expected, "got": o.got}
                                          for o in c.outcomes if not o.passed]}
                            for c in self.cases]}


def run_tests(pipeline: Any, cases: str, stage: str | None = None, limit: int | None = None,
              progress: Any = None) -> tuple[Report, Any]:
    """Run the pipeline (up to `stage`) over the cases in its own workdir,
    `<workdir>/tests/<cases stem>/` — resumable, cached, the production workdir untouched —
    then check every case. Returns the report and the run's RunReport."""
    import dataclasses
    from pathlib import Path

    import orjson

    from . import engine, templates
    from .source import resolve
    from .store import Workdir

    last = pipeline.stage(stage) if stage else pipeline.stages[-1]
    files = resolve(cases)
    for _ in _cases(files, pipeline, limit):  # a bad `expect` stops it before any request
        pass
    stem = Path(cases).name.removesuffix(".zst").removesuffix(".jsonl")
    workdir = Path(pipeline.workdir) / "tests" / stem
    options = engine.RunOptions(until=last.name, limit=limit)
    ran = engine.run(dataclasses.replace(pipeline, input=cases, workdir=workdir, output=None),
                     options, progress)
    store = Workdir(workdir, pipeline.compress)
    outputs: dict[Any, dict[str, Any]] = {}
    for part in sorted(store.stage_dir(last.name).glob("part-*.jsonl*")):
        for line in store.read_bytes(part).splitlines():
            record = orjson.loads(line)
            outputs[record.get("_id")] = record
    failures: dict[Any, str] = {}
    for spec in pipeline.stages[: pipeline.stages.index(last) + 1]:
        try:
            lines = store.errors_path(spec.name).read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            error = orjson.loads(line)
            failures.setdefault(error.get("_id"), f"{spec.name}: {error.get('error')}")
    rendered: dict[str, Any] = {}

    def render(template: str, case: dict[str, Any]) -> Any:
        if template not in rendered:
            rendered[template] = templates.compile_template(template)
        return rendered[template].render(case)

    results = []
    for case_id, case, checks in _cases(files, pipeline, limit):
        if case is None or case_id in failures:  # the pipeline's errors.jsonl says why
            results.append(CaseResult(case_id, "error", error=failures.get(case_id)))
            continue
        record = outputs.get(case_id)
        outcomes = [check(a, record, case, render) for a in checks]
        results.append(CaseResult(case_id, "passed" if all(o.passed for o in outcomes)
                                  else "failed", outcomes))
    return Report(results), ran


def _cases(files: list[str], pipeline: Any, limit: int | None) -> Any:
    """(id, case or None when the line is no JSON object, its assertions) per case, in
    order; a bad `expect` raises ConfigError naming the file, line and key."""
    import orjson

    from .config import ConfigError
    from .source import read_shards

    for shard in read_shards(files, pipeline.shard_size, limit):
        for i, line in enumerate(shard.lines):
            try:
                case = orjson.loads(line)
            except orjson.JSONDecodeError:
                case = None
            position = shard.start + i
            if not isinstance(case, dict):
                yield position, None, []
                continue
            case_id = case.get(pipeline.id_field, position) if pipeline.id_field else position
            try:
                checks = [*pipeline.tests, *case_assertions(case.get("expect"))]
            except AssertionSpecError as e:
                name, lineno = shard.origin(i)
                raise ConfigError(f"{name}:{lineno}: case {case_id!r}: key 'expect': {e}") \
                    from None
            yield case_id, case, checks
