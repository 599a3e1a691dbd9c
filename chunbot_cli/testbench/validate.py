"""What `chunbot test` refuses before it sends a request: a test that would check nothing,
or check what can never pass.

- a bad assertion in a case's `expect` (an unknown kind, a value of the wrong type);
- a field that no output record has: named by a `tests:` entry or a case's `expect`, and
  neither a field of some case nor one the checked stages add (with a did-you-mean);
- no assertion at all: no `tests:`, and no case with an `expect`.
(`tests:` entries themselves are checked by config.py when the pipeline is read.)

The cases are read once, in full, before the run starts. Why not the first N cases up
front and the rest as they stream, failed as errors: a field exists when *any* case has it,
so only the whole file tells a typo from a field that later cases bring; and a bad `expect`
at case 900,000 would be found after 899,999 cases were paid for, and shown as one red case
among many instead of refused. The pass is cheap: read and parse each line, note its keys,
read its `expect`; nothing rendered and nothing kept but the set of field names and where
each `expect` field is first named (≈0.5 s per 100 MB of cases, against minutes of requests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .assertions import AssertionSpecError, case_assertions, did_you_mean


@dataclass
class _Scan:
    """What one pass over the cases found."""

    fields: set[str] = field(default_factory=set)  # every key of every case
    named: dict[str, str] = field(default_factory=dict)  # `expect` field → "file:line: case x"
    expects: int = 0  # cases whose `expect` holds an assertion
    first: str | None = None  # where the first case is, for "nothing would be checked"
    judged: bool = False  # some `expect` has a judge


def validate(files: list[str], pipeline: Any, checked: list[Any], limit: int | None) -> bool:
    """Read every case (up to `limit`) and refuse, with ConfigError naming the file, line
    and key, a test that checks nothing or names a field no output record has; True when
    some assertion is a judge. `checked`: the stages that run, up to the checked one."""
    from ..config import ConfigError

    scan = _scan(files, pipeline, limit)
    if not pipeline.tests and not scan.expects and scan.first is not None:
        raise ConfigError(f"{scan.first}: key 'expect': no case has an assertion there, and "
                          f"{pipeline.path} has no `tests:`: nothing would be checked (every "
                          "case would pass); give the pipeline `tests:` or the cases `expect`")
    added = stage_fields(checked)
    if added is not None:  # else a stage may add any field: there is nothing to hold to
        known = scan.fields | added | {"_id"}
        for n, assertion in enumerate(pipeline.tests, 1):
            if assertion.field is not None and assertion.field not in known:
                where = f"{pipeline.path}:{assertion.line}" if assertion.line else \
                    str(pipeline.path)
                raise ConfigError(f"{where}: key 'tests': entry #{n}: "
                                  f"{_missing(assertion.field, known, checked)}")
        for name, where in scan.named.items():
            if name not in known:
                raise ConfigError(f"{where}: key 'expect': {_missing(name, known, checked)}")
    return scan.judged or any(a.kind == "judge" for a in pipeline.tests)


def _scan(files: list[str], pipeline: Any, limit: int | None) -> _Scan:
    """One pass over the cases: their fields, and every `expect` parsed (a bad one raises
    ConfigError naming its line). A line that is no JSON object is left to the walk, which
    makes it an error case as before."""
    from ..config import ConfigError
    from ..source import read_shards

    scan = _Scan()
    folder = Path(pipeline.path).parent
    for shard in read_shards(files, pipeline.shard_size, limit, pipeline.max_line_bytes):
        for i, line in enumerate(shard.lines):
            try:
                case = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(case, dict):
                continue
            scan.fields.update(case)
            if scan.first is None:
                scan.first = "{}:{}".format(*shard.origin(i))
            expect = case.get("expect")
            if expect is None:
                continue
            try:
                checks = case_assertions(expect, folder, pipeline.models)
            except AssertionSpecError as e:
                raise ConfigError(f"{_where(shard, i, case, pipeline)}: key 'expect': {e}") \
                    from None
            scan.expects += bool(checks)
            for assertion in checks:
                scan.judged = scan.judged or assertion.kind == "judge"
                if assertion.field is not None and assertion.field not in scan.named:
                    scan.named[assertion.field] = _where(shard, i, case, pipeline)
    return scan


def _where(shard: Any, i: int, case: dict[str, Any], pipeline: Any) -> str:
    """'cases.jsonl:7: case 'c7'', as the walk names a case."""
    name, lineno = shard.origin(i)
    position = shard.start + i
    case_id = case.get(pipeline.id_field, position) if pipeline.id_field else position
    return f"{name}:{lineno}: case {case_id!r}"


def stage_fields(stages: list[Any]) -> set[str] | None:
    """The fields the stages add to a record; None when one may add any: a python stage,
    or `fields: spread` with a schema that does not close its properties (the reply's keys
    become fields, and a model may give keys its schema does not list)."""
    added: set[str] = set()
    for spec in stages:
        if spec.kind == "python":
            return None
        if spec.kind != "llm":  # a filter keeps or drops a record, adding nothing
            continue
        if not spec.spread:
            added.add(spec.output or spec.name)
            continue
        schema = spec.schema or {}
        properties = schema.get("properties")
        if not isinstance(properties, dict) or schema.get("additionalProperties") is not False:
            return None
        added |= set(properties)
    return added


def _missing(name: str, known: set[str], checked: list[Any]) -> str:
    """Why a field will not be there, with the closest field that will."""
    shown = sorted(known - {"_id", "expect"})
    listing = ", ".join(shown[:12]) + (", …" if len(shown) > 12 else "")
    upto = f" up to {checked[-1].name!r}" if checked else ""
    return (f"no output record has a field {name!r}{did_you_mean(name, shown)}: no case has "
            f"it and no stage{upto} adds it (fields: {listing})")
