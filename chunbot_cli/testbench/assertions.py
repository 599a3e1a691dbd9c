"""Assertions: what `chunbot test` checks in one case's output record.

An assertion names a `field` of the output record and one kind: `equals`, `one_of`,
`contains`, `icontains`, `regex`, `min`, `max`, `min_length`, `max_length`, `json_schema`,
`expr` (a Jinja2 expression over the output record, true passes), `python`
(`module:function(record, case)` returning a bool or `(bool, reason)`), `judge` (an LLM's
verdict on the field against a rubric: judges.py asks it) or `filtered` (the case was
dropped by a filter stage, or not). The pipeline's `tests:` list applies to every case, its
values templates over the case's fields; a case's own `expect` object adds more (`{"label":
"negative", "reply": {"icontains": "sorry"}}`: a plain value means `equals`).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Collection

import orjson

KINDS = ("equals", "one_of", "contains", "icontains", "regex", "min", "max", "min_length",
         "max_length", "json_schema", "expr", "python", "judge", "filtered")
_WHOLE_RECORD = ("expr", "python", "filtered")  # kinds that need no `field`
_NOT_TEMPLATES = ("expr", "regex", "python", "json_schema")


class AssertionSpecError(ValueError):
    """An assertion that cannot be checked (an unknown kind, a value of the wrong type).
    `key`: the key at fault, so the pipeline file's message can give that key's line."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Assertion:
    field: str | None  # None: `expr` or `python` over the whole record, or `filtered`
    kind: str
    value: Any  # as written: a template (a string) for the `tests:` list's values
    # json_schema: the compiled validator; python: the imported function
    function: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    line: int = field(default=0, compare=False)  # a `tests:` entry's line in the pipeline file

    @property
    def label(self) -> str:
        return f"{self.field} {self.kind}" if self.field else self.kind


@dataclass(frozen=True)
class Judge:
    """A `judge` assertion's value: which model grades, by which rubric (a template)."""

    model: str
    rubric: str


def parse_assertion(raw: Any, folder: Path | None = None,
                    models: Collection[str] | None = None) -> Assertion:
    """One entry of `tests:` (`{field: F, KIND: VALUE}`); raises AssertionSpecError.
    `folder`: where `json_schema: {file: …}` and `python:` modules are found (beside the
    current directory); `models`: the aliases a judge may name."""
    if not isinstance(raw, dict):
        raise AssertionSpecError("must be a mapping like {field: label, equals: positive}")
    kinds = [k for k in raw if k != "field"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise AssertionSpecError(f"unknown assertion {unknown[0]!r}"
                                 f"{did_you_mean(unknown[0], KINDS)}; known: {', '.join(KINDS)}",
                                 str(unknown[0]))
    if not kinds:  # `{field: x}` alone would pass every case
        raise AssertionSpecError("needs exactly one assertion kind besides `field` (it has "
                                 "none, so it would check nothing)", "field")
    if len(kinds) != 1:
        raise AssertionSpecError("needs exactly one assertion kind besides `field`", kinds[1])
    kind = kinds[0]
    name = raw.get("field")
    if name is not None and not isinstance(name, str):
        raise AssertionSpecError("`field` must be a field name", "field")
    if name is None and kind not in _WHOLE_RECORD:
        raise AssertionSpecError(f"{kind!r} needs a `field`", kind)
    try:
        value, function = _value(kind, raw[kind], folder, models)
    except AssertionSpecError as e:
        raise AssertionSpecError(str(e), kind) from None
    return Assertion(name, kind, value, function)


def _value(kind: str, value: Any, folder: Path | None, models: Collection[str] | None
           ) -> tuple[Any, Callable[..., Any] | None]:
    """An assertion's value, checked to be one its kind can compare with (and what the kind
    compiled from it); raises AssertionSpecError."""
    if kind in ("expr", "regex", "python") and not isinstance(value, str):
        raise AssertionSpecError(f"{kind!r} takes a string")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as e:
            raise AssertionSpecError(f"regex does not compile: {e}") from None
    elif kind == "expr":
        from .. import templates

        try:
            templates.compile_expression(value)
        except templates.TemplateError as e:
            raise AssertionSpecError(f"expr does not compile: {e}") from None
    elif kind == "python":
        return value, _import(value, str(folder or Path.cwd()))
    elif kind == "json_schema":
        return _schema(value, folder)
    elif kind == "judge":
        return _judge(value, models), None
    elif kind == "one_of" and not isinstance(value, list):
        raise AssertionSpecError("'one_of' takes a list")
    elif kind == "filtered" and not isinstance(value, bool):
        raise AssertionSpecError("'filtered' takes true or false")
    elif kind in _NUMBERS:
        _number(kind, value)
    return value, None


_NUMBERS = ("min", "max", "min_length", "max_length")


def _number(kind: str, value: Any) -> None:
    """`min`/`max` take a number, `min_length`/`max_length` a whole one of 0 or more: as
    written, or as a string holding one (`"3"`), or a template filled in per case
    (`"{{ floor }}"`). Anything else (`"high"`) would fail every case without saying why."""
    if isinstance(value, str) and "{" in value:  # check() renders it, as every template
        return
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            not math.isfinite(number):
        raise AssertionSpecError(f"{kind!r} takes a number (or a template like "
                                 f"\"{{{{ floor }}}}\"), not {value!r}")
    if kind.endswith("_length") and (number < 0 or number != int(number)):
        raise AssertionSpecError(f"{kind!r} takes a whole number of 0 or more, not {value!r}")


def did_you_mean(name: Any, known: Collection[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `known`, or ''."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def case_assertions(expect: Any, folder: Path | None = None,
                    models: Collection[str] | None = None) -> list[Assertion]:
    """A case's `expect` object: per field a plain value (equals) or an object naming one
    kind, `{KIND: VALUE}`. An object always names a kind — to compare with an object, write
    `{"equals": {…}}` — so a misspelt kind (`{"equalz": "x"}`) is refused, not taken for
    the value the field must equal (which no reply ever is: it failed every case)."""
    if expect is None:
        return []
    if not isinstance(expect, dict):
        raise AssertionSpecError("`expect` must be an object of field: value")
    found = []
    for name, wanted in expect.items():
        if not isinstance(wanted, dict):
            found.append(Assertion(name, "equals", wanted))
            continue
        if not wanted or "field" in wanted:
            raise AssertionSpecError(f"an object names one assertion, {{\"KIND\": VALUE}} "
                                     f"(to compare with an object: {{\"equals\": {{…}}}}), "
                                     f"not {orjson.dumps(wanted).decode()[:80]} (field {name!r})")
        try:
            found.append(parse_assertion({"field": name, **wanted}, folder, models))
        except AssertionSpecError as e:
            hint = "; to compare with an object: {\"equals\": {…}}" if e.key not in KINDS else ""
            raise AssertionSpecError(f"{e}{hint} (field {name!r})") from None
    return found


def _import(target: str, folder: str) -> Callable[..., Any]:
    from ..config import ConfigError

    try:
        return _imported(target, folder)
    except ConfigError as e:
        raise AssertionSpecError(f"python: {e}") from None


@lru_cache(maxsize=64)  # a case's `expect` names the same function case after case
def _imported(target: str, folder: str) -> Callable[..., Any]:
    from ..config import import_callable

    return import_callable(target, [str(Path.cwd()), folder])


def _schema(value: Any, folder: Path | None) -> tuple[Any, Callable[[Any], Any]]:
    """`json_schema`: a schema inline or `{file: x.json}`; (the schema, its validator)."""
    if isinstance(value, dict) and set(value) == {"file"} and isinstance(value["file"], str):
        path = Path(value["file"])
        path = path if path.is_absolute() else (folder or Path.cwd()) / path
        try:
            value = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as e:
            raise AssertionSpecError(f"json_schema: cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise AssertionSpecError("'json_schema' takes a JSON Schema object or {file: x.json}")
    try:
        return value, _validator(orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    except Exception as e:  # fastjsonschema raises several kinds for a bad schema
        raise AssertionSpecError(f"json_schema: not a valid JSON Schema: {e}") from None


@lru_cache(maxsize=64)
def _validator(schema: bytes) -> Callable[[Any], Any]:
    import fastjsonschema  # ~35 ms: only when an assertion needs it

    return fastjsonschema.compile(orjson.loads(schema))


def _judge(value: Any, models: Collection[str] | None) -> Judge:
    if not isinstance(value, dict) or set(value) - {"model", "rubric"}:
        raise AssertionSpecError("'judge' takes {model: ALIAS, rubric: TEXT}")
    model, rubric = value.get("model"), value.get("rubric")
    if not isinstance(rubric, str) or not rubric.strip():
        raise AssertionSpecError("a judge needs a `rubric`: what a good answer does")
    if not isinstance(model, str):
        raise AssertionSpecError("a judge needs a `model`: an alias from `models:`")
    if models is not None and model not in models:
        raise AssertionSpecError(f"judge: no model alias {model!r} (models: "
                                 f"{', '.join(sorted(models))})")
    from .. import templates

    try:
        templates.compile_template(rubric)
    except templates.TemplateError as e:
        raise AssertionSpecError(f"judge: the rubric does not compile: {e}") from None
    return Judge(model, rubric)


@dataclass
class Outcome:
    assertion: Assertion
    passed: bool
    expected: Any
    got: Any
    reason: str | None = None  # a python check's or a judge's words, a schema's complaint


def check(assertion: Assertion, record: dict[str, Any] | None, case: dict[str, Any],
          render: Callable[[str, dict[str, Any]], Any],
          verdict: tuple[bool, str] | None = None) -> Outcome:
    """Check one assertion. `record`: the case's output record, None when it was dropped
    by a filter; `render` fills a `tests:` template from the case's fields; `verdict`: a
    judge's (passed, reason)."""
    wanted = assertion.value
    kind = assertion.kind
    if isinstance(wanted, str) and "{" in wanted and kind not in _NOT_TEMPLATES:
        wanted = render(wanted, case)
    if kind == "filtered":
        return Outcome(assertion, (record is None) == wanted, wanted, record is None)
    if record is None:
        return Outcome(assertion, False, wanted if kind != "judge" else wanted.rubric,
                       "(filtered out)")
    if kind == "expr":
        try:
            passed = _expression(wanted)(record)
        except Exception as e:  # an error in the user's expression fails the case
            return Outcome(assertion, False, wanted, f"{type(e).__name__}: {e}")
        return Outcome(assertion, bool(passed), wanted, None)
    got = record.get(assertion.field) if assertion.field else record
    if kind == "python":
        return _python(assertion, record, case, got)
    if kind == "json_schema":
        try:
            assert assertion.function is not None
            assertion.function(got)
        except Exception as e:  # JsonSchemaValueException: the reply is not as described
            return Outcome(assertion, False, "(valid per schema)", got, str(e))
        return Outcome(assertion, True, "(valid per schema)", got)
    if kind == "judge":
        rubric = render(wanted.rubric, case) if "{" in wanted.rubric else wanted.rubric
        if verdict is None:
            return Outcome(assertion, False, rubric, got, "the judge gave no verdict")
        return Outcome(assertion, verdict[0], rubric, got, verdict[1])
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


def _python(assertion: Assertion, record: dict[str, Any], case: dict[str, Any],
            got: Any) -> Outcome:
    assert assertion.function is not None
    try:
        answer = assertion.function(record, case)
    except Exception as e:  # the user's check raising fails the case, with why
        return Outcome(assertion, False, assertion.value, got, f"{type(e).__name__}: {e}")
    if isinstance(answer, tuple) and len(answer) == 2:
        return Outcome(assertion, bool(answer[0]), assertion.value, got,
                       None if answer[1] is None else str(answer[1]))
    return Outcome(assertion, bool(answer), assertion.value, got)


@lru_cache(maxsize=256)
def _expression(source: str) -> Callable[[dict[str, Any]], bool]:
    """An `expr` compiled once, not once per case."""
    from .. import templates

    return templates.compile_expression(source)
