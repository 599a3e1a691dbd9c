"""Sandboxed Jinja2 for prompts and filter expressions.

Templates see a record's fields as variables. A field the record lacks raises
`UndefinedError` at render time (StrictUndefined), which the stage turns into a record
failure; the sandbox keeps a pipeline file from reaching Python internals.

Most prompts only put fields into text ("Label: {{ text }}"). Those are rendered by
`FieldTemplate` with plain joins: same output, same error for a missing field, and
about a tenth of Jinja's cost per record, which shows at thousands of requests a second.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from jinja2 import StrictUndefined, Template, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "compile_template", "compile_expression", "fields_used"]

_env = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)
_FIELD = re.compile(r"{{\s*([A-Za-z_][A-Za-z0-9_]*)\s*}}")
_JINJA_NAMES = {"true", "false", "none", "True", "False", "None", *_env.globals}


class FieldTemplate:
    """A template whose only Jinja is `{{ field }}`."""

    def __init__(self, source: str):
        self.parts = _FIELD.split(source)  # text, name, text, name, …, text

    def render(self, record: Mapping[str, Any]) -> str:
        parts = self.parts
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            try:
                value = record[parts[i]]
            except KeyError:
                raise UndefinedError(f"{parts[i]!r} is undefined") from None
            out.append(value if type(value) is str else str(value))
            out.append(parts[i + 1])
        return "".join(out)


def compile_template(source: str) -> Template | FieldTemplate:
    """Compile a prompt template; raises TemplateSyntaxError on bad syntax."""
    template = _env.from_string(source)  # checks the syntax in every case
    rest = _FIELD.sub("", source)
    if any(mark in rest for mark in ("{{", "{%", "{#")) or _JINJA_NAMES & set(
            _FIELD.findall(source)):
        return template
    return FieldTemplate(source)


def compile_expression(source: str) -> Callable[[dict[str, Any]], bool]:
    """Compile a filter expression into a predicate over a record."""
    expr = _env.compile_expression(source, undefined_to_none=False)

    def predicate(record: dict[str, Any]) -> bool:
        return bool(expr(record))

    return predicate


def static_prefix(source: str) -> str:
    """The text every rendering of `source` starts with: what comes before its first tag.

    Provider prompt caches match on leading text, so this part is what gets marked."""
    first = min((i for i in (source.find("{{"), source.find("{%"), source.find("{#"))
                 if i >= 0), default=len(source))
    prefix = source[:first]
    if source[first + 2: first + 3] == "-":  # `{{-` strips the whitespace before it
        prefix = prefix.rstrip()
    return prefix


def fields_used(source: str, expression: bool = False) -> set[str]:
    """The record fields a template (or a filter expression) reads."""
    from jinja2 import meta

    text = "{{ " + source + " }}" if expression else source
    return meta.find_undeclared_variables(_env.parse(text)) - _JINJA_NAMES
