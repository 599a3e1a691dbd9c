"""llm/anthropic.py: the Messages body, reply and stream."""

from __future__ import annotations

import pytest

from chunbot_cli.config import ModelSpec
from chunbot_cli.llm import anthropic
from chunbot_cli.llm.types import ProviderError, Request

SPEC = ModelSpec(alias="claude", provider="anthropic", model="claude-sonnet-4-5",
                 base_url="https://api.anthropic.com", max_tokens=1024)


def test_system_becomes_the_top_field_and_max_tokens_has_a_default():
    request = Request([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}], {"temperature": 0})
    assert anthropic.body(SPEC, request) == {
        "model": "claude-sonnet-4-5", "system": "Be brief.", "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    assert anthropic.body(SPEC, Request([], {"max_tokens": 16}))["max_tokens"] == 16
    headers = anthropic.headers(SPEC, "sk-ant")
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"


def test_reply_joins_text_blocks():
    reply = anthropic.reply({"model": "claude-sonnet-4-5", "stop_reason": "end_turn",
                             "content": [{"type": "text", "text": "neg"},
                                         {"type": "text", "text": "ative"}],
                             "usage": {"input_tokens": 12, "output_tokens": 2}}, "x")
    assert (reply.text, reply.input_tokens, reply.output_tokens,
            reply.finish_reason) == ("negative", 12, 2, "end_turn")
    with pytest.raises(ProviderError, match="no content"):
        anthropic.reply({"type": "message"}, "x")


def test_stream_assembles_text_deltas_and_usage():
    stream = anthropic.Stream("x")
    for event in ({"type": "message_start",
                   "message": {"model": "claude-sonnet-4-5", "usage": {"input_tokens": 12}}},
                  {"type": "content_block_start", "index": 0},
                  {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "po"}},
                  {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "s"}},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": 1}},
                  {"type": "message_stop"}):
        stream.feed(event)
    reply = stream.reply()
    assert (reply.text, reply.model, reply.input_tokens, reply.output_tokens) == \
        ("pos", "claude-sonnet-4-5", 12, 1)
    with pytest.raises(ProviderError) as caught:
        stream.feed({"type": "error", "error": {"type": "overloaded_error"}})
    assert caught.value.retryable


def test_prompt_cache_marks_the_system_prompt_and_the_static_start_of_the_prompt():
    request = Request([{"role": "system", "content": "Long instructions."},
                       {"role": "user", "content": "Label this review: it broke"}],
                      {}, prompt_cache=True, static_prefix=len("Label this review: "))
    sent = anthropic.body(SPEC, request)
    assert sent["system"] == [{"type": "text", "text": "Long instructions.",
                               "cache_control": {"type": "ephemeral"}}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "Label this review: ", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "it broke"}]
    assert request.messages[1]["content"] == "Label this review: it broke"  # not changed


def test_cache_reads_and_writes_count_as_input_tokens():
    reply = anthropic.reply({"content": [{"type": "text", "text": "x"}], "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 900, "cache_creation_input_tokens": 0,
        "output_tokens": 2}}, "m")
    assert (reply.input_tokens, reply.cached_tokens, reply.cache_write_tokens) == (910, 900, 0)
