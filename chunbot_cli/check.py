"""What `validate` checks beyond the YAML itself: that the first input records have the
fields the stages' templates and filters use.

A field a record lacks fails that record at run time (it lands in errors.jsonl), so a typo
in a template fails every record; this finds it before any request. Fields that earlier
LLM stages add (their `output`, or with `fields: spread` the keys their schema names) count
as present; after a python stage or a spread stage whose schema names no keys, which may
add anything, nothing further is checked.
"""

from __future__ import annotations

import itertools

import orjson

from . import templates
from .config import Pipeline, StageSpec
from .source import InputError, read_shards, resolve

SAMPLE = 100


def field_warnings(pipeline: Pipeline, sample: int = SAMPLE) -> list[str]:
    """One warning per stage and field that some of the first `sample` input records lack."""
    if pipeline.input in (None, "-"):
        return []  # reading stdin here would eat the run's input
    try:
        records = [r for r in _first_records(resolve(pipeline.input), sample)
                   if isinstance(r, dict)]
    except InputError:
        return []  # `run` says what is wrong with the input
    if not records:
        return []
    added = {"_id"}
    warnings = []
    for stage in pipeline.stages:
        if stage.kind == "python":
            break
        if stage.kind == "filter":
            used = {"filter": templates.fields_used(stage.filter or "", expression=True)}
        else:
            used = {key: templates.fields_used(source)
                    for key, source in (("system", stage.system), ("prompt", stage.prompt))
                    if source}
        for key, fields in used.items():
            for name in sorted(fields - added):
                lacking = sum(1 for r in records if name not in r)
                if lacking:
                    warnings.append(
                        f"{pipeline.path}:{stage.line}: stage {stage.name!r}: warning: {key} "
                        f"uses {name!r}, which {lacking} of the first {len(records)} input "
                        f"records lack (they would fail); fields seen: "
                        f"{', '.join(sorted(set().union(*records))[:12])}")
        more = _fields_added(stage)
        if more is None:
            break  # what follows may use fields no one can foresee here
        added |= more
    return warnings


def _fields_added(stage: StageSpec) -> set[str] | None:
    """The fields a stage adds to the records it passes on; None when they cannot be known.

    An LLM stage adds its `output`; with `fields: spread`, the reply's keys instead, which
    its schema names (`properties`, `required`): without a schema naming any, they are
    the model's choice."""
    if stage.kind != "llm":
        return set()
    if not stage.spread:
        return {stage.output or stage.name}
    schema = stage.schema if isinstance(stage.schema, dict) else {}
    properties = schema.get("properties")
    named = set(properties) if isinstance(properties, dict) else set()
    named |= {k for k in schema.get("required") or () if isinstance(k, str)}
    return named or None


def _first_records(files: list[str], sample: int) -> list[object]:
    found = []
    for shard in itertools.islice(read_shards(files, sample, sample), 1):
        for line in shard.lines:
            try:
                found.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return found
