"""templates.py: sandboxed Jinja2 prompts and filter expressions over record fields."""

from __future__ import annotations

import pytest
from jinja2 import UndefinedError
from jinja2.exceptions import SecurityError, TemplateSyntaxError

from chunbot_cli.templates import compile_expression, compile_template


def test_templates_see_record_fields():
    template = compile_template("Review of {{ product }}: {{ text | upper }}")
    assert template.render({"product": "kettle", "text": "great"}) == "Review of kettle: GREAT"


def test_a_missing_field_raises_instead_of_rendering_empty():
    with pytest.raises(UndefinedError, match="'text' is undefined"):
        compile_template("{{ text }}").render({"product": "kettle"})


def test_the_sandbox_keeps_python_internals_out_of_reach():
    with pytest.raises(SecurityError):
        compile_template("{{ ''.__class__.__mro__[1].__subclasses__() }}").render({})


def test_bad_syntax_is_refused_at_compile_time():
    with pytest.raises(TemplateSyntaxError):
        compile_template("{{ text }")


def test_filter_expressions_are_predicates():
    keep = compile_expression("rating <= 2 and 'refund' in text")
    assert keep({"rating": 1, "text": "I want a refund"}) is True
    assert keep({"rating": 5, "text": "I want a refund"}) is False
    with pytest.raises(UndefinedError):
        compile_expression("sentiment == 'negative'")({"text": "no label yet"})


@pytest.mark.parametrize("source", [
    "Label the sentiment: {{ text }}",
    "{{text}} and {{ product }}\n",
    "no fields at all",
    "{{ n }} stars, {{ flag }}, {{ missing_is_none }}",
])
def test_field_only_templates_render_exactly_like_jinja(source):
    record = {"text": "it broke", "product": "kettle", "n": 4, "flag": True,
              "missing_is_none": None}
    fast = compile_template(source)
    assert type(fast).__name__ == "FieldTemplate"
    assert fast.render(record) == _env_render(source, record)
    with pytest.raises(UndefinedError, match="'text' is undefined"):
        compile_template("Label: {{ text }}").render({"title": "no text"})


def test_anything_beyond_fields_goes_to_jinja():
    for source in ("{{ text | upper }}", "{% if x %}y{% endif %}", "{{ none }}", "{{- text }}",
                   "{{ range(2) | list }}"):
        assert type(compile_template(source)).__name__ != "FieldTemplate"


def _env_render(source, record):
    from chunbot_cli.templates import _env

    return _env.from_string(source).render(record)


def test_the_static_prefix_is_the_text_before_the_first_tag():
    from chunbot_cli.templates import static_prefix

    assert static_prefix("Label this review: {{ text }}") == "Label this review: "
    assert static_prefix("Label:   {{- text }}") == "Label:"
    assert static_prefix("{% if x %}a{% endif %}") == ""
    assert static_prefix("no tags") == "no tags"
