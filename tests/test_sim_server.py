"""sim/server.py: `chunbot sim serve` as a real process, spoken to over real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

import aiohttp

from chunbot_cli.sim import model as sim_model
from chunbot_cli.sim.server import go_duration, split_words

SYSTEM = "You are a precise annotator."
PROMPT = "Write a two-line apology for: the battery died after a week"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def post(url: str, body: dict | bytes, headers: dict[str, str] | None = None) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()},
                          response.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def burst(url: str, body: dict, n: int, headers: dict[str, str] | None = None) -> list[Answer]:
    """n copies of one request, all in flight at once."""
    async def one(session: aiohttp.ClientSession) -> Answer:
        async with session.post(url, json=body, headers=headers) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()},
                          await response.read())

    async def run() -> list[Answer]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session) for _ in range(n)))

    return asyncio.run(run())


def chat_body(prompt: str = PROMPT, **extra) -> dict:
    return {"model": "sim-small", "messages": [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": prompt}], **extra}


def messages_body(prompt: str = PROMPT, **extra) -> dict:
    return {"model": "sim-small", "system": SYSTEM, "max_tokens": 80,
            "messages": [{"role": "user", "content": prompt}], **extra}


def cached_fields(cached: int, prompt_tokens: int) -> dict:
    """The usage fields of OpenAI's and DeepSeek's prompt caching for `cached` tokens."""
    return {"prompt_tokens_details": {"cached_tokens": cached},
            "prompt_cache_hit_tokens": cached,
            "prompt_cache_miss_tokens": prompt_tokens - cached}


def reset_stats(url: str) -> dict:
    request = urllib.request.Request(url + "/stats/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    """(event name or None, data) per server-sent event."""
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


def test_openai_json_and_sse_give_the_same_text_and_usage(sim_server):
    url = sim_server().url + "/v1/chat/completions"
    plain = post(url, chat_body(max_tokens=80))
    assert plain.status == 200 and plain.headers["content-type"] == "application/json"
    reply = plain.json()
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] == "stop"
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    streamed = post(url, chat_body(max_tokens=80, stream=True,
                                   stream_options={"include_usage": True}))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [data for _, data in sse_events(streamed.body)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert 3 <= len([p for p in pieces if p]) <= 8
    assert "".join(pieces) == reply["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # the same prompt again: only its provider-side cache share differs
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {**usage, **cached_fields(16, usage["prompt_tokens"])}

    without_usage = post(url, chat_body(max_tokens=80, stream=True))
    assert all(json.loads(d)["choices"] for _, d in sse_events(without_usage.body)[:-1])


def test_anthropic_json_and_sse_give_the_same_text_and_usage(sim_server):
    url = sim_server().url + "/v1/messages"
    plain = post(url, messages_body(), ANTHROPIC_HEADERS)
    assert plain.status == 200
    reply = plain.json()
    assert reply["id"].startswith("msg_") and reply["type"] == "message"
    assert reply["role"] == "assistant" and reply["model"] == "sim-small"
    assert reply["stop_reason"] == "end_turn" and reply["stop_sequence"] is None
    [block] = reply["content"]

    streamed = post(url, messages_body(stream=True), ANTHROPIC_HEADERS)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = [(name, json.loads(data)) for name, data in sse_events(streamed.body)]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events if name not in ("ping", "content_block_delta")]
    assert names == ["message_start", "content_block_start", "content_block_stop",
                     "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert reply["usage"]["cache_creation_input_tokens"] == 0  # nothing marked cache_control
    assert reply["usage"]["cache_read_input_tokens"] == 0
    assert start["usage"] == {**reply["usage"], "output_tokens": 1}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert len(deltas) >= 3 and all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == block["text"]
    message_delta = next(data for name, data in events if name == "message_delta")
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] == reply["usage"]["output_tokens"]


def test_both_protocols_answer_as_the_in_process_model(sim_server):
    url = sim_server().url
    params = {"max_tokens": 80, "temperature": 0}
    openai = post(url + "/v1/chat/completions", chat_body(**params)).json()
    # Anthropic: system as a list of blocks, content as a list of parts
    anthropic = post(url + "/v1/messages",
                     {"model": "sim-small", "system": [{"type": "text", "text": SYSTEM}],
                      "messages": [{"role": "user",
                                    "content": [{"type": "text", "text": PROMPT}]}],
                      **params}, ANTHROPIC_HEADERS).json()
    expected = sim_model.reply("sim-small", [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": PROMPT}], params)
    assert openai["choices"][0]["message"]["content"] == expected.text
    assert anthropic["content"][0]["text"] == expected.text
    assert openai["usage"]["prompt_tokens"] == anthropic["usage"]["input_tokens"] \
        == expected.input_tokens


# A long system prompt shared by requests, as pipelines send it: 610 characters
LONG_SYSTEM = ("You are a meticulous annotator of customer reviews. Read each review, "
               "weigh every sentence and answer with one word only. ") * 5


def long_chat_body(prompt: str, **extra) -> dict:
    return {"model": "sim-small", "messages": [{"role": "system", "content": LONG_SYSTEM},
                                               {"role": "user", "content": prompt}], **extra}


def shared_prefix_tokens(system: str) -> int:
    """The cached tokens of a request whose prompt after the system prompt's role and
    content is new from its first character: the whole 64-character blocks before it."""
    shared = len("system" + system + "user")
    return shared // 64 * 64 // 4


def test_openai_reports_prompt_prefix_caching_in_json_and_sse(sim_server):
    url = sim_server().url + "/v1/chat/completions"
    expected = shared_prefix_tokens(LONG_SYSTEM)
    assert expected == 9 * 64 // 4  # "system" + LONG_SYSTEM + "user": 9 whole blocks

    first = post(url, long_chat_body("Label: great phone")).json()["usage"]
    assert first == {**first, **cached_fields(0, first["prompt_tokens"])}
    second = post(url, long_chat_body("Label: awful battery")).json()["usage"]
    assert second == {**second, **cached_fields(expected, second["prompt_tokens"])}
    assert second["prompt_tokens"] > expected  # the total, cached or not

    # streamed, with a system prompt of its own: the usage chunk carries the same fields
    other = LONG_SYSTEM.replace("customer", "product")
    usages = []
    for prompt in ("Label: fine", "Label: broken"):
        body = long_chat_body(prompt, stream=True, stream_options={"include_usage": True})
        body["messages"][0]["content"] = other
        events = sse_events(post(url, body).body)
        usages.append(json.loads(events[-2][1])["usage"])
    assert usages[0] == {**usages[0], **cached_fields(0, usages[0]["prompt_tokens"])}
    assert usages[1] == {**usages[1], **cached_fields(shared_prefix_tokens(other),
                                                      usages[1]["prompt_tokens"])}

    # only whole 64-character blocks are cached: a shorter prompt never is
    tiny = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    assert [post(url, tiny).json()["usage"]["prompt_cache_hit_tokens"]
            for _ in range(2)] == [0, 0]


def test_anthropic_caches_what_cache_control_marks(sim_server):
    url = sim_server().url + "/v1/messages"
    marked = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    plain = post(url, messages_body(system=LONG_SYSTEM), ANTHROPIC_HEADERS).json()
    system_tokens = sim_model.count_tokens(LONG_SYSTEM)
    total = plain["usage"]["input_tokens"]
    assert plain["usage"]["cache_creation_input_tokens"] == 0
    assert plain["usage"]["cache_read_input_tokens"] == 0

    first = post(url, messages_body(system=marked), ANTHROPIC_HEADERS).json()
    assert first["content"] == plain["content"]  # cache_control does not change the text
    assert first["usage"] == {**plain["usage"], "input_tokens": total - system_tokens,
                              "cache_creation_input_tokens": system_tokens,
                              "cache_read_input_tokens": 0}

    # the same cached prefix, another question, streamed: read from the cache
    streamed = post(url, messages_body("Another question", system=marked, stream=True),
                    ANTHROPIC_HEADERS)
    start = json.loads(sse_events(streamed.body)[0][1])["message"]["usage"]
    assert start["cache_read_input_tokens"] == system_tokens
    assert start["cache_creation_input_tokens"] == 0
    again = post(url, messages_body(system=marked), ANTHROPIC_HEADERS).json()
    assert again["content"] == plain["content"]
    assert again["usage"] == {**first["usage"], "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": system_tokens}

    # the prefix runs up to the LAST marked block, here in the user's content blocks
    content = [{"type": "text", "text": "Review: "},
               {"type": "text", "text": PROMPT, "cache_control": {"type": "ephemeral"}},
               {"type": "text", "text": " Be brief."}]
    body = messages_body(system=marked, messages=[{"role": "user", "content": content}])
    prefix = system_tokens + sim_model.count_tokens("Review: " + PROMPT)
    usages = [post(url, body, ANTHROPIC_HEADERS).json()["usage"] for _ in range(2)]
    assert usages[0]["cache_creation_input_tokens"] == prefix
    assert usages[1]["cache_read_input_tokens"] == prefix
    assert usages[1]["input_tokens"] == usages[0]["input_tokens"] > 0
    flat = messages_body(system=LONG_SYSTEM,
                         messages=[{"role": "user", "content": f"Review: {PROMPT} Be brief."}])
    assert post(url, flat, ANTHROPIC_HEADERS).json()["content"] == \
        post(url, body, ANTHROPIC_HEADERS).json()["content"]


def test_stats_count_cached_tokens_and_reset_forgets_the_cache(sim_server):
    server = sim_server()
    chat, messages = server.url + "/v1/chat/completions", server.url + "/v1/messages"
    marked = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    system_tokens = sim_model.count_tokens(LONG_SYSTEM)
    openai_cached = shared_prefix_tokens(LONG_SYSTEM)
    prompts = ("Good phone: sturdy, bright, and its battery lasts two days or more.",
               "Bad phone: it heats up, the screen cracked and support never answered.")
    cached = []
    for _ in range(2):
        for prompt in prompts:  # they differ from their first character
            cached.append(post(chat, long_chat_body(prompt)).json()["usage"]
                          ["prompt_tokens_details"]["cached_tokens"])
        post(messages, messages_body(system=marked), ANTHROPIC_HEADERS)
    # the second finds the system prompt's blocks; the repeats find all their whole blocks
    whole = [len("system" + LONG_SYSTEM + "user" + p) // 64 * 64 // 4
             for p in prompts]
    assert cached == [0, openai_cached, *whole] and whole[0] > openai_cached
    stats = server.stats()
    assert stats["cache_creation_tokens"] == system_tokens
    assert stats["cached_tokens"] == sum(cached) + system_tokens

    reset = reset_stats(server.url)
    assert reset["cached_tokens"] == reset["cache_creation_tokens"] == 0
    usage = post(chat, long_chat_body("Label: good")).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}  # the cache was forgotten
    usage = post(messages, messages_body(system=marked), ANTHROPIC_HEADERS).json()["usage"]
    assert usage["cache_creation_input_tokens"] == system_tokens
    assert server.stats()["cache_creation_tokens"] == system_tokens


def test_max_tokens_cuts_the_reply_with_the_vendors_stop_reason(sim_server):
    url = sim_server().url
    openai = post(url + "/v1/chat/completions", chat_body("Say a lot", max_tokens=3)).json()
    anthropic = post(url + "/v1/messages", messages_body("Say a lot", max_tokens=3),
                     ANTHROPIC_HEADERS).json()
    assert openai["choices"][0]["finish_reason"] == "length"
    assert anthropic["stop_reason"] == "max_tokens"


def test_a_burst_over_the_rpm_gets_429_with_retry_headers(sim_server):
    url = sim_server("--rpm", "60").url  # one request per second, bucket of one
    answers = burst(url + "/v1/chat/completions", chat_body(), 5)
    assert sorted(a.status for a in answers) == [200, 429, 429, 429, 429]
    limited = next(a for a in answers if a.status == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert 0 < int(limited.headers["retry-after-ms"]) <= 1000
    assert limited.headers["x-ratelimit-limit-requests"] == "60"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"

    answers = burst(url + "/v1/messages", messages_body(), 3, ANTHROPIC_HEADERS)
    assert {a.status for a in answers} == {429}  # the bucket has not refilled yet
    assert answers[0].json()["error"]["type"] == "rate_limit_error"
    assert answers[0].headers["anthropic-ratelimit-requests-limit"] == "60"


def test_a_request_over_the_tpm_waits_for_tokens(sim_server):
    url = sim_server("--tpm", "6000").url + "/v1/chat/completions"  # 100 tokens a second
    assert post(url, chat_body(max_tokens=90)).status == 200
    refused = post(url, chat_body(max_tokens=90))
    assert refused.status == 429 and refused.json()["error"]["type"] == "tokens"
    assert "x-ratelimit-limit-requests" not in refused.headers


def test_rate_limit_headers_on_every_answer(sim_server):
    url = sim_server("--rpm", "600", "--tpm", "120000").url
    openai = post(url + "/v1/chat/completions", chat_body(max_tokens=80))
    assert openai.status == 200
    assert openai.headers["x-ratelimit-limit-requests"] == "600"
    assert openai.headers["x-ratelimit-remaining-requests"] == "540"  # 9 of 10 left, per minute
    assert openai.headers["x-ratelimit-reset-requests"].endswith("ms")
    assert openai.headers["x-ratelimit-limit-tokens"] == "120000"
    assert int(openai.headers["x-ratelimit-remaining-tokens"]) < 120000

    anthropic = post(url + "/v1/messages", messages_body(), ANTHROPIC_HEADERS)
    assert anthropic.status == 200
    assert anthropic.headers["anthropic-ratelimit-requests-limit"] == "600"
    assert int(anthropic.headers["anthropic-ratelimit-tokens-remaining"]) < 120000
    reset = datetime.strptime(anthropic.headers["anthropic-ratelimit-requests-reset"],
                              "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert 0 <= (reset - datetime.now(timezone.utc)).total_seconds() <= 3


def test_no_rate_limit_headers_without_limits(sim_server):
    answer = post(sim_server().url + "/v1/chat/completions", chat_body())
    assert not [name for name in answer.headers if "ratelimit" in name]


def test_api_key_is_required_and_never_echoed(sim_server):
    url = sim_server("--api-key", "sk-right").url
    wrong = "sk-wrong-secret-1234"
    refused = post(url + "/v1/chat/completions", chat_body(), {"Authorization": f"Bearer {wrong}"})
    assert refused.status == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert b"secret" not in refused.body and b"1234" not in refused.body
    refused = post(url + "/v1/messages", messages_body(), {**ANTHROPIC_HEADERS, "x-api-key": wrong})
    assert refused.status == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert b"secret" not in refused.body and b"1234" not in refused.body
    assert post(url + "/v1/chat/completions", chat_body()).status == 401

    assert post(url + "/v1/chat/completions", chat_body(),
                {"Authorization": "Bearer sk-right"}).status == 200
    assert post(url + "/v1/messages", messages_body(),
                {**ANTHROPIC_HEADERS, "x-api-key": "sk-right"}).status == 200


def test_error_rate_one_fails_every_request_with_vendor_bodies(sim_server):
    url = sim_server("--error-rate", "1", "--seed", "3").url
    answers = burst(url + "/v1/chat/completions", chat_body(), 12)
    assert {a.status for a in answers} == {500, 503}
    assert all(a.json()["error"]["type"] == "server_error" for a in answers)
    answers = burst(url + "/v1/messages", messages_body(), 12, ANTHROPIC_HEADERS)
    assert {a.json()["error"]["type"] for a in answers} == {"api_error", "overloaded_error"}


def test_malformed_replies(sim_server):
    html = sim_server("--malformed", "not-json").url
    answer = post(html + "/v1/chat/completions", chat_body())
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    assert answer.body == b"<html><body>upstream error</body></html>"

    empty = sim_server("--malformed", "no-choices").url
    openai = post(empty + "/v1/chat/completions", chat_body(stream=True))
    assert openai.status == 200 and "choices" not in openai.json() and "usage" in openai.json()
    anthropic = post(empty + "/v1/messages", messages_body(), ANTHROPIC_HEADERS)
    assert anthropic.status == 200 and "content" not in anthropic.json()


def test_bad_requests_get_400_with_vendor_bodies(sim_server):
    url = sim_server().url
    anthropic = post(url + "/v1/messages", messages_body())  # no anthropic-version
    assert anthropic.status == 400
    assert anthropic.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "anthropic-version: header is required"}}
    no_max = messages_body()
    del no_max["max_tokens"]
    assert post(url + "/v1/messages", no_max, ANTHROPIC_HEADERS).status == 400
    not_json = post(url + "/v1/chat/completions", b"{not json")
    assert not_json.status == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    assert post(url + "/v1/chat/completions", {"model": "sim-small"}).status == 400
    assert post(url + "/v1/chat/completions", {"messages": []}).status == 400


def test_stats_count_what_clients_sent(sim_server):
    server = sim_server("--latency-ms", "100")
    url = server.url
    burst(url + "/v1/chat/completions", chat_body(), 4)  # the same request four times
    post(url + "/v1/chat/completions", chat_body("Another prompt", stream=True))
    post(url + "/v1/messages", messages_body(), ANTHROPIC_HEADERS)
    post(url + "/v1/messages", messages_body())  # 400: no anthropic-version
    stats = server.stats()
    assert stats["requests"] == 7
    assert stats["by_route"] == {"chat": 5, "messages": 2}
    assert stats["by_status"] == {"200": 6, "400": 1}
    # four identical requests, another prompt, and the Anthropic one (it has max_tokens)
    assert (stats["answered"], stats["unique"], stats["repeated"]) == (6, 3, 3)
    assert stats["streamed"] == 1
    assert stats["max_in_flight"] == 4 and stats["in_flight"] == 0
    assert stats["tokens_in"] > 0 and stats["tokens_out"] > 0

    reset = json.loads(urllib.request.urlopen(urllib.request.Request(
        url + "/stats/reset", method="POST"), timeout=10).read())
    assert reset["requests"] == reset["answered"] == reset["max_in_flight"] == 0
    assert server.stats()["by_status"] == {}


def test_models_are_listed(sim_server):
    with urllib.request.urlopen(sim_server().url + "/v1/models", timeout=10) as response:
        ids = [m["id"] for m in json.loads(response.read())["data"]]
    assert "sim-small" in ids


def test_sigterm_stops_the_server_cleanly(sim_server):
    server = sim_server()
    post(server.url + "/v1/chat/completions", chat_body())
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=10) == 0
    assert server.process.stderr.read() == b""


def test_stream_pieces_join_back_to_the_text():
    text = "We're sorry the battery let you down.\nPlease  reply today."
    for seed in range(12):
        pieces = split_words(text, seed)
        assert "".join(pieces) == text and 3 <= len(pieces) <= 8
    assert split_words("", 0) == [""]


def test_reset_durations_in_openai_format():
    assert [go_duration(s) for s in (0, 0.12, 1, 1.5, 360, 3723.25)] == \
        ["0s", "120ms", "1s", "1.5s", "6m0s", "1h2m3.25s"]
