"""llm/openai.py: the chat-completions body, reply and stream."""

from __future__ import annotations

import pytest

from chunbot_cli.config import ModelSpec
from chunbot_cli.llm import openai
from chunbot_cli.llm.types import ProviderError, Request

SPEC = ModelSpec(alias="big", provider="openai", model="deepseek-chat",
                 base_url="https://api.deepseek.com/v1", headers={"x-team": "data"})


def test_body_passes_every_param_through_and_headers_carry_the_key():
    request = Request([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}],
                      {"temperature": 0, "seed": 7, "response_format": {"type": "json_object"}})
    assert openai.body(SPEC, request) == {"model": "deepseek-chat",
                                          "messages": request.messages, "temperature": 0,
                                          "seed": 7, "response_format": {"type": "json_object"}}
    assert openai.headers(SPEC, "sk-1") == {"content-type": "application/json", "user-agent": "chunbot",
                                            "authorization": "Bearer sk-1", "x-team": "data"}
    assert "authorization" not in openai.headers(SPEC, None)


def test_reply_reads_text_usage_and_finish_reason():
    reply = openai.reply({"model": "deepseek-chat-v3", "choices": [
        {"message": {"role": "assistant", "content": "negative"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1}}, "deepseek-chat")
    assert (reply.text, reply.model, reply.input_tokens, reply.output_tokens,
            reply.finish_reason) == ("negative", "deepseek-chat-v3", 20, 1, "stop")


def test_a_reply_without_choices_is_a_clear_non_retryable_error():
    with pytest.raises(ProviderError) as caught:
        openai.reply({"id": "x", "object": "chat.completion"}, "m")
    assert "no choices[0].message.content" in str(caught.value) and not caught.value.retryable


def test_stream_assembles_deltas_and_takes_usage_from_the_last_chunk():
    stream = openai.Stream("m")
    for event in ({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": "We're "}}]},
                  {"choices": [{"delta": {"content": "sorry."}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}):
        stream.feed(event)
    reply = stream.reply()
    assert (reply.text, reply.input_tokens, reply.output_tokens,
            reply.finish_reason) == ("We're sorry.", 9, 3, "stop")


def test_cached_prompt_tokens_are_read_from_openai_or_deepseek_usage():
    base = {"choices": [{"message": {"content": "x"}}]}
    openai_usage = {"prompt_tokens": 2000, "completion_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 1792}}
    deepseek_usage = {"prompt_tokens": 2000, "completion_tokens": 5,
                      "prompt_cache_hit_tokens": 1920, "prompt_cache_miss_tokens": 80}
    assert openai.reply({**base, "usage": openai_usage}, "m").cached_tokens == 1792
    assert openai.reply({**base, "usage": deepseek_usage}, "m").cached_tokens == 1920
