"""Sandboxed Jinja2 for prompts and filter expressions.

Templates see a record's fields as variables. A field the record lacks raises
`UndefinedError` at render time (StrictUndefined), which the stage turns into a record
failure; the sandbox keeps a pipeline file from reaching Python internals.
"""

from __future__ import annotations

from typing import Any, Callable

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "compile_template", "compile_expression"]

_env = ImmutableSandboxedEnvironment(
    undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
)


def compile_template(source: str) -> Template:
    """Compile a prompt template; raises TemplateSyntaxError on bad syntax."""
    return _env.from_string(source)


def compile_expression(source: str) -> Callable[[dict[str, Any]], bool]:
    """Compile a filter expression into a predicate over a record."""
    expr = _env.compile_expression(source, undefined_to_none=False)

    def predicate(record: dict[str, Any]) -> bool:
        return bool(expr(record))

    return predicate
