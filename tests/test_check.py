"""`chunbot validate`'s field warnings (chunbot_cli/check.py): a field a template or filter
uses is missing only if neither the input nor an earlier stage gives it."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import chunbot, write_jsonl

SPREAD = """
name: t
input: data.jsonl
stages:
  - name: facts
    prompt: "Extract as JSON: {{{{ text }}}}"
    parse: json
    fields: spread
{schema}
  - name: negatives
    filter: "sentiment == 'negative' and {typo} != ''"
  - name: reply
    prompt: "Apologise for this {{{{ summary }}}}"
"""


def validate(project: Path, schema: str, typo: str = "summary") -> list[str]:
    write_jsonl(project / "data.jsonl", [{"id": f"r{i}", "text": "it broke"} for i in range(5)])
    (project / "p.yaml").write_text(SPREAD.format(schema=schema, typo=typo))
    result = chunbot("validate", "p.yaml", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    return result.stderr.decode().splitlines()


def test_the_mixed_config_validates_without_a_false_warning(project):
    repo = Path(__file__).resolve().parents[1]
    os.symlink(repo / "datasets", project / "datasets")
    (project / "configs").mkdir()
    (project / "configs/mixed.yaml").write_text((repo / "configs/mixed.yaml").read_text())
    result = chunbot("validate", "configs/mixed.yaml", cwd=project)
    assert result.returncode == 0 and result.stderr.decode() == "", result.stderr.decode()


def test_a_spread_stage_adds_the_keys_its_schema_names(project):
    required = "    schema: {type: object, required: [sentiment, summary]}"
    assert validate(project, required) == []
    properties = ("    schema: {type: object, properties: {sentiment: {type: string}, "
                  "summary: {type: string}}}")
    assert validate(project, properties) == []
    warned = validate(project, properties, typo="sumary")  # a key the schema does not name
    assert len(warned) == 1 and "stage 'negatives'" in warned[0] and "'sumary'" in warned[0]


def test_after_a_spread_stage_without_named_keys_nothing_is_guessed(project):
    assert validate(project, "", typo="anything") == []  # the model's keys: not foreseeable
