"""llm/gemini.py: the generateContent body, reply, stream and error details."""

from __future__ import annotations

import orjson
import pytest

from chunbot_cli.config import ModelSpec
from chunbot_cli.llm import gemini
from chunbot_cli.llm.types import ProviderError, RateLimits, Request

SPEC = ModelSpec(alias="g", provider="gemini", model="gemini-2.5-flash",
                 base_url="https://generativelanguage.googleapis.com")


def test_the_model_is_in_the_path_and_the_key_in_a_header():
    assert gemini.path(SPEC, False) == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert gemini.path(SPEC, True) == \
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    headers = gemini.headers(SPEC, "AIza-secret")
    assert headers["x-goog-api-key"] == "AIza-secret"
    assert "AIza-secret" not in gemini.path(SPEC, True)


def test_system_and_params_take_geminis_names():
    request = Request([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"},
                       {"role": "user", "content": "Label it"}],
                      {"max_tokens": 8, "temperature": 0, "top_p": 0.9, "stop": "\n",
                       "stream": True, "topK": 3, "safetySettings": [{"category": "X"}]})
    assert gemini.body(SPEC, request) == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]},
                     {"role": "model", "parts": [{"text": "Hello"}]},
                     {"role": "user", "parts": [{"text": "Label it"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 8, "temperature": 0, "topP": 0.9,
                             "stopSequences": ["\n"], "topK": 3},
        "safetySettings": [{"category": "X"}]}


def test_structured_asks_for_json_against_the_schema():
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    sent = gemini.body(SPEC, Request([{"role": "user", "content": "x"}], schema=schema))
    assert sent["generationConfig"] == {"responseMimeType": "application/json",
                                        "responseSchema": schema}


def test_reply_joins_parts_and_counts_cached_tokens():
    reply = gemini.reply({
        "candidates": [{"content": {"role": "model", "parts": [{"text": "neg"},
                                                                {"text": "ative"}]},
                        "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 1200, "candidatesTokenCount": 2,
                          "cachedContentTokenCount": 1024, "thoughtsTokenCount": 5},
        "modelVersion": "gemini-2.5-flash-001"}, "x")
    assert (reply.text, reply.model, reply.input_tokens, reply.output_tokens,
            reply.cached_tokens, reply.finish_reason) == \
        ("negative", "gemini-2.5-flash-001", 1200, 7, 1024, "STOP")


@pytest.mark.parametrize("data, said", [
    ({"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
         "blocked": True}]}},
     r"blocked the prompt \(promptFeedback.blockReason SAFETY\): HARM_CATEGORY_DANGEROUS"),
    ({"candidates": [{"finishReason": "SAFETY", "index": 0}]},
     r"stopped the reply \(finishReason SAFETY\)"),
    ({"candidates": [{"finishReason": "RECITATION", "content": {"parts": []}}]},
     "finishReason RECITATION"),
])
def test_a_blocked_prompt_or_reply_is_a_failure_that_says_so(data, said):
    with pytest.raises(ProviderError, match=said) as caught:
        gemini.reply(data, "x")
    assert not caught.value.retryable


def test_stream_assembles_the_pieces_and_the_last_usage():
    stream = gemini.Stream("x")
    for chunk in ({"candidates": [{"content": {"parts": [{"text": "pos"}]}, "index": 0}],
                   "usageMetadata": {"promptTokenCount": 9}},
                  {"candidates": [{"content": {"parts": [{"text": "itive"}]},
                                   "finishReason": "STOP", "index": 0}],
                   "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2},
                   "modelVersion": "gemini-2.5-flash"}):
        stream.feed(chunk)
    reply = stream.reply()
    assert (reply.text, reply.model, reply.input_tokens, reply.output_tokens) == \
        ("positive", "gemini-2.5-flash", 9, 2)
    with pytest.raises(ProviderError, match="SAFETY"):
        gemini.Stream("x").feed({"candidates": [{"finishReason": "SAFETY"}]})


def test_a_429_body_gives_the_delay_and_the_quota_it_hit():
    body = orjson.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
            {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_"
                            "requests",
             "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
             "quotaValue": "15"},
            {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_"
                            "input_token_count",
             "quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier",
             "quotaValue": "250000"},
            {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
             "quotaValue": "200"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "27s"}]}})
    assert gemini.error_hints(body) == (27.0, RateLimits(15.0, 250000.0))
    assert gemini.error_hints(b"<html>") == (None, None)
