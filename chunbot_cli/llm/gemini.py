"""The Gemini API's native wire format (`generateContent`): request body, reply, SSE stream,
error details.

The model is in the URL (`/v1beta/models/{model}:generateContent`, streamed with
`:streamGenerateContent?alt=sse`), the key in the `x-goog-api-key` header, never in the URL.
The system prompt is `systemInstruction`; the stage's params go to `generationConfig`
under Gemini's names (`max_tokens` → `maxOutputTokens`, `top_p` → `topP`, `stop` →
`stopSequences`; names Gemini spells itself pass through), except the request's own
top-level fields (`safetySettings`, `tools`, ...). A reply or prompt Gemini blocked
(finishReason SAFETY, RECITATION, ...; `promptFeedback.blockReason`) is a failure that
says so. Gemini announces no limits in headers: a 429's body names the quota it hit (a
`QuotaFailure` with its value) and how long to wait (a `RetryInfo` delay), which are the
limits and pause learned. Pure functions; `http.py` does the sending.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from ..config import ModelSpec
from .types import ProviderError, RateLimits, Reply, Request, excerpt

API = "/v1beta"
LIMIT_HEADERS = None  # in the 429's body instead: error_hints

# the stage's params under Gemini's names, in generationConfig
CONFIG_NAMES = {"max_tokens": "maxOutputTokens", "max_output_tokens": "maxOutputTokens",
                "top_p": "topP", "top_k": "topK", "stop": "stopSequences",
                "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty",
                "n": "candidateCount"}
# the request's own fields: a param of these names goes beside generationConfig
REQUEST_FIELDS = frozenset({"safetySettings", "tools", "toolConfig", "cachedContent",
                            "labels"})
STREAM_FLAGS = frozenset({"stream", "stream_options"})  # the URL says it, not the body
# why a candidate ended that means it has no (whole) reply
BLOCKED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                     "LANGUAGE", "IMAGE_SAFETY", "MALFORMED_FUNCTION_CALL", "OTHER"})


def path(spec: ModelSpec, streaming: bool) -> str:
    if streaming:
        return model_path(spec, "streamGenerateContent") + "?alt=sse"
    return model_path(spec, "generateContent")


def model_path(spec: ModelSpec, method: str) -> str:
    """The path of one of the model's methods (generateContent, batchGenerateContent…)."""
    model = spec.model if spec.model.startswith("models/") else f"models/{spec.model}"
    return f"{API}/{model}:{method}"


def headers(spec: ModelSpec, api_key: str | None) -> dict[str, str]:
    sent = {"content-type": "application/json", "user-agent": "chunbot"}
    if api_key:
        sent["x-goog-api-key"] = api_key
    return {**sent, **spec.headers}


def body(spec: ModelSpec, request: Request) -> dict[str, Any]:
    system = [m["content"] for m in request.messages if m.get("role") == "system"]
    contents = [{"role": "model" if m.get("role") == "assistant" else "user",
                 "parts": [{"text": _as_text(m.get("content"))}]}
                for m in request.messages if m.get("role") != "system"]
    sent: dict[str, Any] = {"contents": contents}
    if system:
        sent["systemInstruction"] = {"parts": [{"text": "\n\n".join(map(_as_text, system))}]}
    config: dict[str, Any] = {}
    for name, value in request.params.items():
        if name in STREAM_FLAGS:
            continue
        if name in REQUEST_FIELDS:
            sent[name] = value
        elif name == "generationConfig" and isinstance(value, dict):
            config.update(value)
        else:
            if name == "stop" and isinstance(value, str):
                value = [value]
            config[CONFIG_NAMES.get(name, name)] = value
    if request.schema is not None:  # structured output: Gemini holds the reply to it
        config["responseMimeType"] = "application/json"
        config["responseSchema"] = request.schema
    if config:
        sent["generationConfig"] = config
    return sent


def _as_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content blocks
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return "" if content is None else str(content)


def reply(data: dict[str, Any], model: str) -> Reply:
    if not isinstance(data, dict):
        raise ProviderError(f"reply is not an object: {excerpt(data)}", retryable=False)
    _check_prompt(data)
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise ProviderError(f"reply has no candidates: {excerpt(data)}", retryable=False)
    candidate = candidates[0]
    finish = candidate.get("finishReason")
    _check_finish(finish, candidate)
    text = "".join(_texts(candidate))
    return _reply(text, data.get("modelVersion") or model, data.get("usageMetadata") or {},
                  finish)


def _texts(candidate: dict[str, Any]) -> list[str]:
    parts = (candidate.get("content") or {}).get("parts") or ()
    return [p["text"] for p in parts
            if isinstance(p, dict) and isinstance(p.get("text"), str) and not p.get("thought")]


def _reply(text: str, model: str, usage: dict[str, Any], finish: str | None) -> Reply:
    # thinking models count their thoughts apart; they are billed as output
    output = (usage.get("candidatesTokenCount") or 0) + (usage.get("thoughtsTokenCount") or 0)
    return Reply(text=text, model=model, input_tokens=usage.get("promptTokenCount") or 0,
                 output_tokens=output, finish_reason=finish,
                 cached_tokens=usage.get("cachedContentTokenCount") or 0)


def _check_prompt(data: dict[str, Any]) -> None:
    feedback = data.get("promptFeedback") or {}
    reason = feedback.get("blockReason")
    if reason:
        raise ProviderError(f"Gemini blocked the prompt (promptFeedback.blockReason "
                            f"{reason}){_ratings(feedback)}", retryable=False)


def _check_finish(finish: str | None, candidate: dict[str, Any]) -> None:
    if finish in BLOCKED:
        raise ProviderError(f"Gemini stopped the reply (finishReason {finish})"
                            f"{_ratings(candidate)}", retryable=False)


def _ratings(holder: dict[str, Any]) -> str:
    """The safety categories that were rated likely, for the failure's text."""
    flagged = [r.get("category", "?") for r in holder.get("safetyRatings") or ()
               if isinstance(r, dict) and (r.get("blocked") or r.get("probability")
                                           in ("MEDIUM", "HIGH"))]
    return f": {', '.join(flagged)}" if flagged else ""


class Stream:
    """Assembles a reply from the `data:` events of a streamed generateContent: each a
    GenerateContentResponse holding the next piece of the text; the last has the
    finishReason, and usageMetadata adds up to the whole in the last that has it."""

    def __init__(self, model: str):
        self.parts: list[str] = []
        self.model = model
        self.usage: dict[str, Any] = {}
        self.finish_reason: str | None = None
        self.seen = False

    def feed(self, event: dict[str, Any]) -> None:
        if "error" in event:
            raise ProviderError(f"error in the stream: {excerpt(event['error'])}",
                                retryable=True)
        _check_prompt(event)
        self.model = event.get("modelVersion") or self.model
        self.usage = event.get("usageMetadata") or self.usage
        for candidate in event.get("candidates") or ():
            if candidate.get("index", 0) != 0:
                continue
            self.seen = True
            self.parts.extend(_texts(candidate))
            if candidate.get("finishReason"):
                self.finish_reason = candidate["finishReason"]
                _check_finish(self.finish_reason, candidate)

    def reply(self) -> Reply:
        if not self.seen:
            raise ProviderError("the stream ended without any candidate", retryable=False)
        return _reply("".join(self.parts), self.model, self.usage, self.finish_reason)


def error_hints(data: bytes) -> tuple[float | None, RateLimits | None]:
    """From an error body: the seconds its RetryInfo asks to wait, and the per-minute
    request and token limits its QuotaFailure names (429 RESOURCE_EXHAUSTED)."""
    try:
        error = orjson.loads(data).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return None, None
    delay, requests, tokens = None, None, None
    for detail in error.get("details") or ():
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type", "")
        if kind.endswith("google.rpc.RetryInfo"):
            delay = _seconds(detail.get("retryDelay"))
        elif kind.endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or ():
                quota = f"{violation.get('quotaId', '')} {violation.get('quotaMetric', '')}"
                value = _number(violation.get("quotaValue"))
                if value is None or "PerMinute" not in quota and "per_minute" not in quota:
                    continue
                if "token" in quota.lower():
                    tokens = min(tokens or value, value)
                elif "request" in quota.lower():
                    requests = min(requests or value, value)
    limits = RateLimits(requests, tokens) if requests or tokens else None
    return delay, limits


def _seconds(value: Any) -> float | None:
    """A protobuf Duration as JSON: "30s", "1.5s"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)s\s*", value) if isinstance(value, str) else None
    return float(match.group(1)) if match else None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
