"""sim/server.py: `chunbot sim serve` as a real process, spoken to over real HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

import aiohttp
import pytest

from chunbot_cli.sim import model as sim_model
from chunbot_cli.sim.batches import item_fate
from chunbot_cli.sim.openai import go_duration
from chunbot_cli.sim.wire import split_words

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


# -- the batch APIs: OpenAI Files + Batches, Anthropic Message Batches --

REVIEWS = ["great phone, sturdy and fast", "the battery died after a week",
           "okay sound, average price", "screen cracked, support never answered",
           "love the strap, perfect fit", "delivery was late and the box was damaged"]


def get(url: str, headers: dict[str, str] | None = None) -> Answer:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, {k.lower(): v for k, v in response.headers.items()},
                          response.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def upload(url: str, data: bytes, purpose: str = "batch",
           headers: dict[str, str] | None = None) -> Answer:
    """POST /v1/files as the OpenAI SDK sends it: multipart/form-data."""
    async def run() -> Answer:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", data, filename="requests.jsonl",
                       content_type="application/jsonl")
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/files", data=form, headers=headers) as response:
                return Answer(response.status, dict(response.headers), await response.read())

    return asyncio.run(run())


def jsonl(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line]


def batch_line(custom_id: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body}


def openai_batch(url: str, lines: list[dict], metadata: dict | None = None,
                 headers: dict[str, str] | None = None) -> dict:
    """Upload the lines and create their batch; its object as created."""
    file = upload(url, "".join(json.dumps(line) + "\n" for line in lines).encode(),
                  headers=headers)
    assert file.status == 200, file.body
    created = post(url + "/v1/batches", {"input_file_id": file.json()["id"],
                                         "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", "metadata": metadata},
                   headers)
    assert created.status == 200, created.body
    return created.json()


def poll(url: str, until: tuple[str, ...], key: str = "status",
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[dict, list[str]]:
    """GET the batch until its status is one of `until`: (its object, the statuses seen)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        batch = get(url, headers).json()
        if not seen or seen[-1] != batch[key]:
            seen.append(batch[key])
        if batch[key] in until:
            return batch, seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)


def test_openai_batch_gives_the_realtime_replies(sim_server):
    server = sim_server("--batch-delay-s", "0.4")
    url = server.url
    bodies = {f"review-{i}": long_chat_body(f"Label the sentiment: {text}", max_tokens=16)
              for i, text in enumerate(REVIEWS)}
    bodies["no-messages"] = {"model": "sim-small"}  # a bad request: answered 400, as realtime
    lines = [batch_line(custom_id, body) for custom_id, body in bodies.items()]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()

    file = upload(url, data)
    assert file.status == 200
    uploaded = file.json()
    assert uploaded["id"].startswith("file-") and uploaded["object"] == "file"
    assert (uploaded["bytes"], uploaded["filename"], uploaded["purpose"]) == \
        (len(data), "requests.jsonl", "batch")
    assert isinstance(uploaded["created_at"], int)
    assert get(f"{url}/v1/files/{uploaded['id']}").json() == uploaded
    assert get(f"{url}/v1/files/{uploaded['id']}/content").body == data

    created = post(url + "/v1/batches", {"input_file_id": uploaded["id"],
                                         "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h",
                                         "metadata": {"chunbot_stage": "sentiment"}}).json()
    assert created["id"].startswith("batch_") and created["object"] == "batch"
    assert created["status"] == "validating"
    assert (created["endpoint"], created["input_file_id"], created["completion_window"]) == \
        ("/v1/chat/completions", uploaded["id"], "24h")
    assert created["output_file_id"] is None and created["error_file_id"] is None
    assert created["completed_at"] is None and created["cancelled_at"] is None
    assert created["expires_at"] == created["created_at"] + 86400
    assert created["metadata"] == {"chunbot_stage": "sentiment"}
    assert set(created["request_counts"]) == {"total", "completed", "failed"}

    batch, seen = poll(f"{url}/v1/batches/{created['id']}", ("completed",))
    assert seen[-1] == "completed" and "in_progress" in seen
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert seen == sorted(seen, key=order.index)
    assert batch["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
    assert batch["in_progress_at"] is not None and batch["completed_at"] is not None

    output = {line["custom_id"]: line
              for line in jsonl(get(f"{url}/v1/files/{batch['output_file_id']}/content").body)}
    errors = {line["custom_id"]: line
              for line in jsonl(get(f"{url}/v1/files/{batch['error_file_id']}/content").body)}
    assert set(output) == set(bodies) - {"no-messages"} and set(errors) == {"no-messages"}
    line = output["review-0"]
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
    bad = errors["no-messages"]
    assert bad["error"] is None and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["type"] == "invalid_request_error"

    # the same requests in realtime, from the same (empty) prompt cache, in the same order
    reset_stats(url)
    for custom_id, body in bodies.items():
        realtime = post(url + "/v1/chat/completions", body)
        if custom_id in errors:
            assert realtime.status == 400
            assert realtime.json() == errors[custom_id]["response"]["body"]
            continue
        reply, batched = realtime.json(), output[custom_id]["response"]["body"]
        assert batched["object"] == "chat.completion" and batched["id"].startswith("chatcmpl-")
        assert batched["choices"] == reply["choices"] and batched["model"] == reply["model"]
        assert batched["usage"] == reply["usage"]
    # the shared system prompt came from the provider's cache, in the batch as in realtime
    assert output["review-1"]["response"]["body"]["usage"]["prompt_tokens_details"][
        "cached_tokens"] >= shared_prefix_tokens(LONG_SYSTEM)


def test_openai_batches_are_listed_newest_first_with_their_metadata(sim_server):
    url = sim_server("--batch-delay-s", "0.2").url
    ids = [openai_batch(url, [batch_line("a", chat_body())],
                        {"chunbot_workdir": "runs/t", "shard": str(n)})["id"] for n in range(3)]
    first = get(url + "/v1/batches?limit=2").json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [b["id"] for b in first["data"]] == ids[:0:-1]
    assert (first["first_id"], first["last_id"]) == (ids[2], ids[1])
    assert [b["metadata"]["shard"] for b in first["data"]] == ["2", "1"]
    rest = get(f"{url}/v1/batches?limit=2&after={first['last_id']}").json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    everything = get(url + "/v1/batches").json()["data"]
    assert [b["id"] for b in everything
            if b["metadata"] == {"chunbot_workdir": "runs/t", "shard": "0"}] == [ids[0]]
    assert get(url + "/v1/batches?limit=0").status == 400
    assert get(url + "/v1/batches/batch_nope").status == 404


def test_openai_cancel_keeps_only_the_items_done_before_it(sim_server):
    url = sim_server("--batch-delay-s", "1").url
    lines = [batch_line(f"r{i}", chat_body(f"Summarize: item {i}")) for i in range(40)]
    created = openai_batch(url, lines)
    time.sleep(0.5)  # items are done evenly from 10% to 90% of the delay: about half now
    cancelling = post(f"{url}/v1/batches/{created['id']}/cancel", b"").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    batch, _ = poll(f"{url}/v1/batches/{created['id']}", ("cancelled",), timeout=2)
    assert batch["cancelled_at"] is not None and batch["completed_at"] is None
    done = batch["request_counts"]["completed"]
    assert 0 < done < 40 and batch["request_counts"]["total"] == 40
    output = jsonl(get(f"{url}/v1/files/{batch['output_file_id']}/content").body)
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(done)]
    assert batch["error_file_id"] is None
    refused = post(f"{url}/v1/batches/{created['id']}/cancel", b"")
    assert refused.status == 400 and "cancelled" in refused.json()["error"]["message"]

    # cancelled while validating: nothing was done
    early = openai_batch(url, lines)
    post(f"{url}/v1/batches/{early['id']}/cancel", b"")
    batch, _ = poll(f"{url}/v1/batches/{early['id']}", ("cancelled",), timeout=2)
    assert batch["output_file_id"] is None
    assert batch["request_counts"]["completed"] == batch["request_counts"]["failed"] == 0


def test_openai_bad_input_files_fail_the_batch(sim_server):
    url = sim_server("--batch-delay-s", "0.2").url
    lines = [json.dumps(batch_line("a", chat_body())), "{not json",
             json.dumps(batch_line("a", chat_body("Other"))),
             json.dumps({**batch_line("b", chat_body()), "url": "/v1/embeddings"})]
    file = upload(url, ("\n".join(lines) + "\n").encode()).json()
    created = post(url + "/v1/batches", {"input_file_id": file["id"],
                                         "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"}).json()
    assert created["status"] == "validating"
    batch, _ = poll(f"{url}/v1/batches/{created['id']}", ("failed",))
    assert [(e["code"], e["line"]) for e in batch["errors"]["data"]] == \
        [("invalid_json_line", 2), ("duplicate_custom_id", 3), ("url_mismatch", 4)]
    assert batch["failed_at"] is not None and batch["output_file_id"] is None
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}

    def create(**fields) -> Answer:
        return post(url + "/v1/batches", {"input_file_id": file["id"],
                                          "endpoint": "/v1/chat/completions",
                                          "completion_window": "24h", **fields})

    assert create(input_file_id="file-nope").status == 400
    assert create(endpoint="/v1/embeddings").status == 400
    assert create(completion_window="1h").status == 400
    assert create(metadata={"n": 1}).status == 400
    assert upload(url, b"{}\n", purpose="nonsense").status == 400
    assert get(url + "/v1/files/file-nope").status == 404


def test_anthropic_batch_gives_the_realtime_replies(sim_server):
    url = sim_server("--batch-delay-s", "0.3").url
    marked = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    params = {f"review-{i}": messages_body(f"Label the sentiment: {text}", system=marked)
              for i, text in enumerate(REVIEWS)}
    params["no-max-tokens"] = {"model": "sim-small", "messages": [{"role": "user",
                                                                   "content": "Hi"}]}
    created = post(url + "/v1/messages/batches",
                   {"requests": [{"custom_id": custom_id, "params": p}
                                 for custom_id, p in params.items()]}, ANTHROPIC_HEADERS)
    assert created.status == 200, created.body
    batch = created.json()
    assert batch["id"].startswith("msgbatch_") and batch["type"] == "message_batch"
    assert batch["processing_status"] == "in_progress"
    assert batch["request_counts"] == {"processing": 7, "succeeded": 0, "errored": 0,
                                       "canceled": 0, "expired": 0}
    assert batch["ended_at"] is None and batch["cancel_initiated_at"] is None
    assert batch["results_url"] is None
    created_at = datetime.fromisoformat(batch["created_at"].replace("Z", "+00:00"))
    assert abs((created_at - datetime.now(timezone.utc)).total_seconds()) < 60
    early = get(f"{url}/v1/messages/batches/{batch['id']}/results", ANTHROPIC_HEADERS)
    assert early.status == 400 and early.json()["error"]["type"] == "invalid_request_error"

    ended, seen = poll(f"{url}/v1/messages/batches/{batch['id']}", ("ended",),
                       "processing_status", ANTHROPIC_HEADERS)
    assert seen == ["in_progress", "ended"]
    assert ended["request_counts"] == {"processing": 0, "succeeded": 6, "errored": 1,
                                       "canceled": 0, "expired": 0}
    assert ended["ended_at"] is not None
    assert ended["results_url"] == f"{url}/v1/messages/batches/{batch['id']}/results"
    results = {line["custom_id"]: line["result"]
               for line in jsonl(get(ended["results_url"], ANTHROPIC_HEADERS).body)}
    assert set(results) == set(params)
    assert results["no-max-tokens"]["type"] == "errored"

    reset_stats(url)  # the same requests in realtime, from the same empty prompt cache
    for custom_id, body in params.items():
        realtime = post(url + "/v1/messages", body, ANTHROPIC_HEADERS)
        if custom_id == "no-max-tokens":
            assert realtime.status == 400
            assert results[custom_id]["error"] == realtime.json()
            continue
        reply, message = realtime.json(), results[custom_id]["message"]
        assert results[custom_id]["type"] == "succeeded" and message["id"].startswith("msg_")
        assert {k: v for k, v in message.items() if k != "id"} == \
            {k: v for k, v in reply.items() if k != "id"}
    usage = results["review-1"]["message"]["usage"]
    assert usage["cache_read_input_tokens"] == sim_model.count_tokens(LONG_SYSTEM)


def test_anthropic_batches_refuse_bad_custom_ids_and_keys(sim_server):
    url = sim_server("--api-key", "sk-right", "--batch-delay-s", "0.2").url
    key = {**ANTHROPIC_HEADERS, "x-api-key": "sk-right"}

    def create(*custom_ids: str, headers: dict[str, str] = key) -> Answer:
        return post(url + "/v1/messages/batches",
                    {"requests": [{"custom_id": c, "params": messages_body()}
                                  for c in custom_ids]}, headers)

    for bad in ("has space", "x" * 65, "", "dot.ted"):
        refused = create("fine", bad)
        assert refused.status == 400, bad
        assert refused.json()["error"]["type"] == "invalid_request_error"
    assert create("twice", "twice").status == 400
    assert create("a" * 64, "A-b_9").status == 200
    assert create("ok", headers={"x-api-key": "sk-right"}).status == 400  # no version
    assert create("ok", headers=ANTHROPIC_HEADERS).json()["error"]["type"] == \
        "authentication_error"
    assert get(url + "/v1/messages/batches", ANTHROPIC_HEADERS).status == 401
    # the OpenAI routes want the Bearer key
    assert get(url + "/v1/batches").status == 401
    assert upload(url, b"{}\n").status == 401
    bearer = {"Authorization": "Bearer sk-right"}
    assert upload(url, b"{}\n", headers=bearer).status == 200
    assert get(url + "/v1/batches", bearer).json()["data"] == []


def test_anthropic_batches_are_listed_and_cancelled(sim_server):
    url = sim_server("--batch-delay-s", "0.6").url

    def create(n: int) -> dict:
        return post(url + "/v1/messages/batches",
                    {"requests": [{"custom_id": f"r{i}", "params": messages_body(f"Item {i}")}
                                  for i in range(n)]}, ANTHROPIC_HEADERS).json()

    first, second, third = create(3), create(4), create(30)
    listed = get(url + "/v1/messages/batches?limit=2", ANTHROPIC_HEADERS).json()
    assert [b["id"] for b in listed["data"]] == [third["id"], second["id"]]
    assert listed["has_more"] is True and listed["last_id"] == second["id"]
    rest = get(f"{url}/v1/messages/batches?limit=2&after_id={second['id']}",
               ANTHROPIC_HEADERS).json()
    assert [b["id"] for b in rest["data"]] == [first["id"]] and rest["has_more"] is False

    canceling = post(f"{url}/v1/messages/batches/{second['id']}/cancel", b"",
                     ANTHROPIC_HEADERS).json()
    assert canceling["processing_status"] == "canceling"
    assert canceling["cancel_initiated_at"] is not None
    ended, _ = poll(f"{url}/v1/messages/batches/{second['id']}", ("ended",),
                    "processing_status", ANTHROPIC_HEADERS)
    assert ended["request_counts"] == {"processing": 0, "succeeded": 0, "errored": 0,
                                       "canceled": 4, "expired": 0}
    results = jsonl(get(ended["results_url"], ANTHROPIC_HEADERS).body)
    assert results == [{"custom_id": f"r{i}", "result": {"type": "canceled"}} for i in range(4)]
    assert post(f"{url}/v1/messages/batches/{second['id']}/cancel", b"",
                ANTHROPIC_HEADERS).status == 400

    time.sleep(0.35)  # the third is past half its items: those are answered, not canceled
    post(f"{url}/v1/messages/batches/{third['id']}/cancel", b"", ANTHROPIC_HEADERS)
    ended, _ = poll(f"{url}/v1/messages/batches/{third['id']}", ("ended",),
                    "processing_status", ANTHROPIC_HEADERS)
    counts = ended["request_counts"]
    assert 0 < counts["succeeded"] < 30 and counts["succeeded"] + counts["canceled"] == 30
    kinds = [line["result"]["type"] for line in jsonl(get(ended["results_url"],
                                                          ANTHROPIC_HEADERS).body)]
    assert kinds == ["succeeded"] * counts["succeeded"] + ["canceled"] * counts["canceled"]
    deleted = urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/messages/batches/{third['id']}", method="DELETE",
        headers=ANTHROPIC_HEADERS), timeout=10)
    assert json.loads(deleted.read())["type"] == "message_batch_deleted"
    assert get(f"{url}/v1/messages/batches/{third['id']}", ANTHROPIC_HEADERS).status == 404


def test_error_and_expire_rates_decide_each_item_by_seed_and_custom_id(sim_server):
    url = sim_server("--batch-delay-s", "0.2", "--seed", "7", "--batch-error-rate", "0.3",
                     "--batch-expire-rate", "0.2").url
    ids = [f"item-{i}" for i in range(40)]
    expected = {c: item_fate(7, c, 0.3, 0.2) for c in ids}
    assert set(expected.values()) == {"succeeded", "errored", "expired"}
    assert item_fate(8, "item-0", 0.3, 0.2) in ("succeeded", "errored", "expired")
    assert {item_fate(7, c, 0, 0) for c in ids} == {"succeeded"}

    created = openai_batch(url, [batch_line(c, chat_body(f"Item {c}")) for c in ids])
    batch, _ = poll(f"{url}/v1/batches/{created['id']}", ("completed",))
    kinds = {}
    for line in jsonl(get(f"{url}/v1/files/{batch['output_file_id']}/content").body):
        kinds[line["custom_id"]] = "succeeded"
    for line in jsonl(get(f"{url}/v1/files/{batch['error_file_id']}/content").body):
        if line["response"] is None:
            assert line["error"]["code"] == "batch_expired" and line["error"]["message"]
            kinds[line["custom_id"]] = "expired"
        else:
            assert line["response"]["status_code"] == 500 and line["error"] is None
            assert line["response"]["body"]["error"]["type"] == "server_error"
            kinds[line["custom_id"]] = "errored"
    assert kinds == expected
    succeeded = list(expected.values()).count("succeeded")
    assert batch["request_counts"] == {"total": 40, "completed": succeeded,
                                       "failed": 40 - succeeded}

    created = post(url + "/v1/messages/batches",
                   {"requests": [{"custom_id": c, "params": messages_body(f"Item {c}")}
                                 for c in ids]}, ANTHROPIC_HEADERS).json()
    ended, _ = poll(f"{url}/v1/messages/batches/{created['id']}", ("ended",),
                    "processing_status", ANTHROPIC_HEADERS)
    results = {line["custom_id"]: line["result"]
               for line in jsonl(get(ended["results_url"], ANTHROPIC_HEADERS).body)}
    assert {c: r["type"] for c, r in results.items()} == expected
    errored = next(r for r in results.values() if r["type"] == "errored")
    assert errored["error"]["type"] == "error"
    assert errored["error"]["error"]["type"] == "api_error"
    assert ended["request_counts"] == {
        "processing": 0, "canceled": 0,
        **{kind: list(expected.values()).count(kind)
           for kind in ("succeeded", "errored", "expired")}}
    assert server_stats(url)["batch_expired"] == 2 * list(expected.values()).count("expired")


def server_stats(url: str) -> dict:
    return get(url + "/stats").json()


def test_stats_count_batches_apart_from_realtime_requests(sim_server):
    url = sim_server("--batch-delay-s", "0.2").url
    post(url + "/v1/chat/completions", chat_body())
    created = openai_batch(url, [batch_line(f"r{i}", chat_body()) for i in range(3)])
    message_batch = post(url + "/v1/messages/batches",
                         {"requests": [{"custom_id": f"m{i}", "params": messages_body()}
                                       for i in range(2)]}, ANTHROPIC_HEADERS).json()
    batch, _ = poll(f"{url}/v1/batches/{created['id']}", ("completed",))
    poll(f"{url}/v1/messages/batches/{message_batch['id']}", ("ended",), "processing_status",
         ANTHROPIC_HEADERS)
    stats = server_stats(url)
    assert (stats["batches_created"], stats["batch_items"], stats["files_uploaded"]) == (2, 5, 1)
    assert stats["batch_answered"] == 5 and stats["batch_tokens_out"] > 0
    # realtime only: the one chat request
    assert (stats["requests"], stats["answered"], stats["unique"]) == (1, 1, 1)

    reset = reset_stats(url)
    assert reset["batches_created"] == reset["batch_items"] == reset["files_uploaded"] == 0
    assert reset["batch_answered"] == 0
    # the batches and files are kept
    assert get(f"{url}/v1/batches/{batch['id']}").json()["status"] == "completed"
    assert get(f"{url}/v1/files/{batch['output_file_id']}/content").status == 200
    assert get(f"{url}/v1/messages/batches/{message_batch['id']}",
               ANTHROPIC_HEADERS).json()["processing_status"] == "ended"


def test_hang_rate_one_holds_every_request_until_the_client_gives_up(sim_server):
    server = sim_server("--hang-rate", "1", "--seed", "5")
    started = time.monotonic()
    for url, body, headers in ((server.url + "/v1/chat/completions", chat_body(), {}),
                               (server.url + "/v1/messages", messages_body(),
                                ANTHROPIC_HEADERS)):
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **headers})
        try:
            urllib.request.urlopen(request, timeout=1)
            raise AssertionError("a hung request was answered")
        except TimeoutError:
            pass
    assert time.monotonic() - started < 5
    # the server answers everything else meanwhile, and notices the clients are gone
    deadline = time.monotonic() + 5
    while (stats := server.stats())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (stats["requests"], stats["hung"], stats["in_flight"]) == (2, 2, 0)
    assert stats["by_status"] == {} and stats["answered"] == 0


def test_a_poisoned_prompt_always_gets_500_and_others_200(sim_server):
    server = sim_server("--fail-prompt", "battery died")
    url = server.url
    for _ in range(2):
        refused = post(url + "/v1/chat/completions", chat_body(PROMPT))  # it says "battery died"
        assert refused.status == 500 and refused.json()["error"]["type"] == "server_error"
    anthropic = post(url + "/v1/messages", messages_body(PROMPT), ANTHROPIC_HEADERS)
    assert anthropic.status == 500 and anthropic.json()["error"]["type"] == "api_error"
    # in the system prompt too
    system = post(url + "/v1/messages", messages_body("Hi", system="My battery died."),
                  ANTHROPIC_HEADERS)
    assert system.status == 500
    other = post(url + "/v1/chat/completions", chat_body("Write an apology for: a late parcel"))
    assert other.status == 200 and other.json()["choices"][0]["message"]["content"]
    stats = server.stats()
    assert stats["poisoned"] == 4 and stats["by_status"] == {"200": 1, "500": 4}
    assert stats["answered"] == 1 and stats["hung"] == 0


def test_a_storm_answers_429_from_the_first_request_then_ends(sim_server):
    server = sim_server("--storm-s", "1", "--storm-retry-after", "2")
    url = server.url
    time.sleep(1.2)  # the storm starts with the first request, not with the server
    first = time.monotonic()
    limited = post(url + "/v1/chat/completions", chat_body())
    assert limited.status == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "2" and limited.headers["retry-after-ms"] == "2000"
    anthropic = post(url + "/v1/messages", messages_body(), ANTHROPIC_HEADERS)
    assert anthropic.status == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["retry-after"] == "2"
    time.sleep(max(0.0, first + 1.1 - time.monotonic()))
    assert post(url + "/v1/chat/completions", chat_body()).status == 200
    assert post(url + "/v1/messages", messages_body(), ANTHROPIC_HEADERS).status == 200
    assert server.stats()["by_status"] == {"200": 2, "429": 2}


# -- Gemini: generateContent, SSE, Batch Mode and the Files API --

GEMINI_KEY = {"x-goog-api-key": "AIza-right"}


def gemini_body(prompt: str = PROMPT, system: str | None = SYSTEM, **config) -> dict:
    body: dict = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    if system is not None:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if config:
        body["generationConfig"] = config
    return body


def gemini_url(url: str, method: str = "generateContent", model: str = "sim-small") -> str:
    return f"{url}/v1beta/models/{model}:{method}" + ("?alt=sse" if method.startswith("stream")
                                                      else "")


def delete(url: str, headers: dict[str, str] | None = None) -> Answer:
    request = urllib.request.Request(url, method="DELETE", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Answer(response.status, {}, response.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {}, e.read())


def test_gemini_json_and_sse_give_the_openai_routes_text(sim_server):
    url = sim_server().url
    openai = post(url + "/v1/chat/completions", chat_body(max_tokens=80, temperature=0)).json()
    plain = post(gemini_url(url), gemini_body(maxOutputTokens=80, temperature=0))
    assert plain.status == 200 and plain.headers["content-type"] == "application/json"
    reply = plain.json()
    [candidate] = reply["candidates"]
    assert candidate == {"content": {"parts": [{"text": openai["choices"][0]["message"]
                                                ["content"]}], "role": "model"},
                         "finishReason": "STOP", "index": 0}
    usage = reply["usageMetadata"]
    prompt = openai["usage"]["prompt_tokens"]
    assert usage["promptTokenCount"] == prompt
    assert usage["candidatesTokenCount"] == openai["usage"]["completion_tokens"]
    assert usage["totalTokenCount"] == prompt + usage["candidatesTokenCount"]
    assert usage["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": prompt}]
    assert reply["modelVersion"] == "sim-small" and reply["responseId"]

    # snake_case names, as protobuf JSON allows, are the same request
    snake = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
             "system_instruction": {"parts": [{"text": SYSTEM}]},
             "generation_config": {"max_output_tokens": 80, "temperature": 0}}
    assert post(gemini_url(url), snake).json()["candidates"] == reply["candidates"]

    streamed = post(gemini_url(url, "streamGenerateContent"),
                    gemini_body(maxOutputTokens=80, temperature=0))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.body.endswith(b"}\r\n\r\n") and b"[DONE]" not in streamed.body
    chunks = [json.loads(block.removeprefix(b"data: "))
              for block in streamed.body.split(b"\r\n\r\n") if block]
    assert 3 <= len(chunks) <= 8 and reply["responseId"] != chunks[0]["responseId"]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == \
        candidate["content"]["parts"][0]["text"]
    assert [c["candidates"][0].get("finishReason") for c in chunks] == \
        [None] * (len(chunks) - 1) + ["STOP"]
    last = chunks[-1]["usageMetadata"]  # the totals; the same prompt again: cached blocks
    assert last == {**usage, "cachedContentTokenCount": 16,
                    "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 16}]}
    assert all(c["usageMetadata"]["promptTokenCount"] == prompt for c in chunks)

    cut = post(gemini_url(url), gemini_body("Say a lot", maxOutputTokens=3)).json()
    assert cut["candidates"][0]["finishReason"] == "MAX_TOKENS"
    # a conversation: "model" turns are the assistant's
    turns = {"contents": [{"role": "user", "parts": [{"text": "Label: great"}]},
                          {"role": "model", "parts": [{"text": "neutral"}]},
                          {"role": "user", "parts": [{"text": "Again"}]}]}
    expected = sim_model.reply("sim-small", [{"role": "user", "content": "Label: great"},
                                             {"role": "assistant", "content": "neutral"},
                                             {"role": "user", "content": "Again"}], {})
    assert post(gemini_url(url), turns).json()["candidates"][0]["content"]["parts"][0][
        "text"] == expected.text


def test_gemini_caches_repeated_prefixes_implicitly(sim_server):
    server = sim_server()
    url = gemini_url(server.url)
    first = post(url, gemini_body("Label: great phone", LONG_SYSTEM)).json()["usageMetadata"]
    assert "cachedContentTokenCount" not in first
    second = post(url, gemini_body("Label: awful battery", LONG_SYSTEM)).json()["usageMetadata"]
    assert second["cachedContentTokenCount"] == shared_prefix_tokens(LONG_SYSTEM)
    assert second["promptTokenCount"] > second["cachedContentTokenCount"]
    # a cache of its own: the OpenAI route has not seen the prefix
    openai = post(server.url + "/v1/chat/completions", long_chat_body("Label: x")).json()
    assert openai["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    stats = server.stats()
    assert stats["by_route"] == {"chat": 1, "messages": 0, "gemini": 2}
    assert stats["cached_tokens"] == second["cachedContentTokenCount"]


def test_gemini_json_mode_answers_json_valid_for_the_schema(sim_server):
    import fastjsonschema

    server = sim_server()
    schema = {"type": "object", "required": ["sentiment", "summary", "keywords"],
              "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                             "summary": {"type": "string"},
                             "keywords": {"type": "array", "items": {"type": "string"}}}}
    reply = post(gemini_url(server.url), gemini_body(
        "Extract as JSON: the lid leaks, awful", responseMimeType="application/json",
        responseSchema=schema)).json()
    value = json.loads(reply["candidates"][0]["content"]["parts"][0]["text"])
    fastjsonschema.compile(schema)(value)
    assert value["sentiment"] == "negative"
    # JSON mode on a prompt whose answer is text: the text in an object
    plain = post(gemini_url(server.url), gemini_body(responseMimeType="application/json"))
    assert set(json.loads(plain.json()["candidates"][0]["content"]["parts"][0]["text"])) == \
        {"text"}
    assert server.stats()["structured"] == 1


def test_gemini_key_is_checked_in_the_header_or_the_query_and_never_echoed(sim_server):
    url = sim_server("--api-key", "AIza-right").url
    assert post(gemini_url(url), gemini_body(), GEMINI_KEY).status == 200
    assert post(gemini_url(url) + "?key=AIza-right", gemini_body()).status == 200
    wrong = post(gemini_url(url), gemini_body(), {"x-goog-api-key": "AIza-wrong-secret"})
    assert wrong.status == 400 and b"secret" not in wrong.body
    error = wrong.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["message"] == "API key not valid. Please pass a valid API key."
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    missing = post(gemini_url(url), gemini_body(), {"Authorization": "Bearer AIza-right"})
    assert missing.status == 403 and missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert get(url + "/v1beta/batches").status == 403
    assert get(url + "/v1beta/batches", GEMINI_KEY).json() == {"operations": []}


def test_gemini_errors_in_googles_shape(sim_server):
    url = sim_server().url
    unknown = post(gemini_url(url, model="gemini-9"), gemini_body())
    assert unknown.status == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"
    assert "models/gemini-9 is not found" in unknown.json()["error"]["message"]
    assert post(gemini_url(url, "countTokens"), gemini_body()).status == 404
    for bad in ({}, {"contents": []}, {"contents": [{"role": "bot", "parts": []}]},
                {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": 3}):
        refused = post(gemini_url(url), bad)
        assert refused.status == 400 and refused.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert post(gemini_url(url), b"{not json").json()["error"]["code"] == 400

    failing = sim_server("--error-rate", "1", "--seed", "3").url
    answers = burst(gemini_url(failing), gemini_body(), 12)
    assert {(a.status, a.json()["error"]["status"]) for a in answers} == \
        {(500, "INTERNAL"), (503, "UNAVAILABLE")}
    overloaded = next(a for a in answers if a.status == 503).json()["error"]
    assert overloaded["message"] == "The model is overloaded. Please try again later."


def details(answer: Answer) -> dict[str, dict]:
    return {d["@type"].rsplit(".", 1)[1]: d for d in answer.json()["error"]["details"]}


def test_gemini_429s_name_the_quota_and_the_delay_in_the_body(sim_server):
    url = sim_server("--rpm", "60").url
    answers = burst(gemini_url(url), gemini_body(), 4)
    assert sorted(a.status for a in answers) == [200, 429, 429, 429]
    limited = next(a for a in answers if a.status == 429)
    assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert not [h for h in limited.headers if "ratelimit" in h or "retry-after" in h]
    found = details(limited)
    assert set(found) == {"QuotaFailure", "Help", "RetryInfo"}
    assert found["QuotaFailure"]["violations"] == [{
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        "quotaDimensions": {"location": "global", "model": "sim-small"}, "quotaValue": "60"}]
    assert found["RetryInfo"]["retryDelay"] == "1s"
    assert not [h for h in answers[0].headers if "ratelimit" in h]  # on 200s neither

    tokens = sim_server("--tpm", "6000").url
    assert post(gemini_url(tokens), gemini_body(maxOutputTokens=90)).status == 200
    refused = post(gemini_url(tokens), gemini_body(maxOutputTokens=90))
    violation = details(refused)["QuotaFailure"]["violations"][0]
    assert violation["quotaId"] == "GenerateContentInputTokensPerModelPerMinute-FreeTier"
    assert violation["quotaMetric"].endswith("generate_content_free_tier_input_token_count")
    assert violation["quotaValue"] == "6000"

    storm = sim_server("--storm-s", "5", "--storm-retry-after", "7").url
    stormed = post(gemini_url(storm), gemini_body())
    assert stormed.status == 429 and details(stormed)["RetryInfo"]["retryDelay"] == "7s"
    assert "QuotaFailure" not in details(stormed) and "retry-after" not in stormed.headers


def gemini_operation(url: str, name: str) -> dict:
    return get(f"{url}/v1beta/{name}", GEMINI_KEY).json()


def poll_gemini(url: str, name: str, timeout: float = 10) -> tuple[dict, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        operation = gemini_operation(url, name)
        state = operation["metadata"]["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if operation.get("done"):
            return operation, seen
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)


def test_gemini_inline_batch_gives_the_realtime_replies_by_key(sim_server):
    server = sim_server("--api-key", "AIza-right", "--batch-delay-s", "0.4", "--seed", "7",
                        "--batch-error-rate", "0.3")
    url = server.url
    keys = [f"review-{i}" for i in range(12)]
    bodies = {key: gemini_body(f"Label the sentiment: {REVIEWS[i % 6]} #{i}", LONG_SYSTEM,
                               maxOutputTokens=16) for i, key in enumerate(keys)}
    bodies["no-contents"] = {"contents": []}  # a bad request: answered 400, as realtime
    created = post(gemini_url(url, "batchGenerateContent"), {"batch": {
        "displayName": "chunbot:stage=s", "inputConfig": {"requests": {"requests": [
            {"request": body, "metadata": {"key": key}} for key, body in bodies.items()]}}}},
        GEMINI_KEY)
    assert created.status == 200, created.body
    operation = created.json()
    about = operation["metadata"]
    assert operation["name"].startswith("batches/") and about["name"] == operation["name"]
    assert "done" not in operation and about["state"] == "BATCH_STATE_PENDING"
    assert about["@type"].endswith("GenerateContentBatch")
    assert (about["model"], about["displayName"]) == ("models/sim-small", "chunbot:stage=s")
    assert about["batchStats"] == {"requestCount": "13", "pendingRequestCount": "13",
                                   "successfulRequestCount": "0", "failedRequestCount": "0"}
    assert abs(datetime.fromisoformat(about["createTime"].replace("Z", "+00:00"))
               .timestamp() - time.time()) < 60

    done, seen = poll_gemini(url, operation["name"])
    assert seen[0] == "BATCH_STATE_PENDING" and seen[-1] == "BATCH_STATE_SUCCEEDED"
    assert "BATCH_STATE_RUNNING" in seen
    output = done["response"]
    assert output["@type"].endswith("GenerateContentBatchOutput")
    assert done["metadata"]["output"] == {k: v for k, v in output.items() if k != "@type"}
    results = output["inlinedResponses"]["inlinedResponses"]
    assert [r["metadata"]["key"] for r in results] == list(bodies)  # in input order
    fates = {key: item_fate(7, key, 0.3, 0) for key in keys}
    assert set(fates.values()) == {"succeeded", "errored"}
    succeeded = list(fates.values()).count("succeeded")
    assert done["metadata"]["batchStats"] == {
        "requestCount": "13", "pendingRequestCount": "0",
        "successfulRequestCount": str(succeeded), "failedRequestCount": str(13 - succeeded)}
    assert done["metadata"]["endTime"] >= done["metadata"]["createTime"]

    reset_stats(url)  # the same requests in realtime, from the same empty prompt cache
    by_key = {r["metadata"]["key"]: r for r in results}
    for key, body in bodies.items():
        if key == "no-contents":
            assert by_key[key]["error"]["status"] == "INVALID_ARGUMENT"
            continue
        if fates[key] == "errored":
            assert by_key[key]["error"] == {"code": 13, "status": "INTERNAL", "message":
                                            by_key[key]["error"]["message"]}
            continue
        realtime = post(gemini_url(url), body, GEMINI_KEY).json()
        batched = by_key[key]["response"]
        assert batched["candidates"] == realtime["candidates"]
        assert batched["usageMetadata"] == realtime["usageMetadata"]
    assert any("cachedContentTokenCount" in r["response"]["usageMetadata"]
               for r in results if "response" in r)


def resumable_upload(url: str, data: bytes, chunks: int = 1, display_name: str = "input",
                     version: str = "v1beta") -> dict:
    """The Files API's resumable upload as Google's SDKs do it: a start, then the bytes."""
    started = post(f"{url}/upload/{version}/files", {"file": {"displayName": display_name}},
                   {**GEMINI_KEY, "X-Goog-Upload-Protocol": "resumable",
                    "X-Goog-Upload-Command": "start",
                    "X-Goog-Upload-Header-Content-Length": str(len(data)),
                    "X-Goog-Upload-Header-Content-Type": "application/jsonl"})
    assert started.status == 200 and started.headers["x-goog-upload-status"] == "active"
    target = started.headers["x-goog-upload-url"]
    assert target.startswith(url + f"/upload/{version}/files?upload_id=")
    size = -(-len(data) // chunks)
    for offset in range(0, len(data), size):
        last = offset + size >= len(data)
        sent = post(target, data[offset:offset + size],
                    {"X-Goog-Upload-Command": "upload, finalize" if last else "upload",
                     "X-Goog-Upload-Offset": str(offset)})
        assert sent.status == 200, sent.body
        assert sent.headers["x-goog-upload-status"] == ("final" if last else "active")
    return sent.json()["file"]


def test_gemini_file_batch_answers_in_a_responses_file(sim_server):
    url = sim_server("--api-key", "AIza-right", "--batch-delay-s", "0.3").url
    lines = [{"key": f"k{i}", "request": gemini_body(f"Summarize: item {i} is fine", None)}
             for i in range(5)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode() + b"not json\n"
    file = resumable_upload(url, data, chunks=2)
    assert file["name"].startswith("files/") and file["sizeBytes"] == str(len(data))
    assert (file["displayName"], file["mimeType"], file["state"], file["source"]) == \
        ("input", "application/jsonl", "ACTIVE", "UPLOADED")
    assert get(f"{url}/v1beta/{file['name']}", GEMINI_KEY).json() == file
    assert get(f"{url}/download/v1beta/{file['name']}:download?alt=media",
               GEMINI_KEY).body == data
    assert get(f"{url}/v1beta/files", GEMINI_KEY).json()["files"] == [file]

    created = post(gemini_url(url, "batchGenerateContent"), {
        "batch": {"display_name": "by file", "input_config": {"file_name": file["name"]}}},
        GEMINI_KEY).json()
    done, _ = poll_gemini(url, created["name"])
    assert done["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    name = done["response"]["responsesFile"]
    assert done["metadata"]["output"] == {"responsesFile": name}
    generated = get(f"{url}/v1beta/{name}", GEMINI_KEY).json()
    assert generated["source"] == "GENERATED" and generated["downloadUri"]
    results = jsonl(get(generated["downloadUri"], GEMINI_KEY).body)
    assert [r["key"] for r in results] == [f"k{i}" for i in range(5)] + ["6"]
    for line, result in zip(lines, results):
        realtime = post(gemini_url(url), line["request"], GEMINI_KEY).json()
        assert result["response"]["candidates"] == realtime["candidates"]
    assert results[-1]["error"]["status"] == "INVALID_ARGUMENT"

    assert delete(f"{url}/v1beta/{file['name']}", GEMINI_KEY).body == b"{}"
    assert get(f"{url}/v1beta/{file['name']}", GEMINI_KEY).status == 404
    assert post(gemini_url(url, "batchGenerateContent"), {"batch": {"inputConfig": {
        "fileName": file["name"]}}}, GEMINI_KEY).status == 404


def test_gemini_batches_are_listed_cancelled_and_deleted(sim_server):
    url = sim_server("--batch-delay-s", "0.6").url

    def create(n: int) -> str:
        return post(gemini_url(url, "batchGenerateContent"), {"batch": {"inputConfig": {
            "requests": {"requests": [{"request": gemini_body(f"Item {i}"),
                                       "metadata": {"key": f"r{i}"}} for i in range(n)]}}}}
        ).json()["name"]

    first, second, third = create(3), create(4), create(30)
    page = get(url + "/v1beta/batches?pageSize=2").json()
    assert [o["name"] for o in page["operations"]] == [third, second]
    rest = get(f"{url}/v1beta/batches?pageSize=2&pageToken={page['nextPageToken']}").json()
    assert [o["name"] for o in rest["operations"]] == [first] and "nextPageToken" not in rest

    assert post(f"{url}/v1beta/{second}:cancel", b"").body == b"{}"
    done, seen = poll_gemini(url, second)
    assert seen[-1] == "BATCH_STATE_CANCELLED"
    errors = [r["error"] for r in done["response"]["inlinedResponses"]["inlinedResponses"]]
    assert [e["status"] for e in errors] == ["CANCELLED"] * 4
    refused = post(f"{url}/v1beta/{second}:cancel", b"")
    assert refused.status == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"

    time.sleep(0.35)  # the third is past half its items: those are answered, not cancelled
    post(f"{url}/v1beta/{third}:cancel", b"")
    done, _ = poll_gemini(url, third)
    kinds = ["response" if "response" in r else r["error"]["status"]
             for r in done["response"]["inlinedResponses"]["inlinedResponses"]]
    answered = kinds.count("response")
    assert 0 < answered < 30 and kinds == ["response"] * answered + ["CANCELLED"] * (30 - answered)
    assert done["metadata"]["batchStats"]["successfulRequestCount"] == str(answered)

    assert delete(f"{url}/v1beta/{first}").body == b"{}"
    assert get(f"{url}/v1beta/{first}").status == 404
    # the OpenAI route of the same path is still OpenAI's
    assert get(url + "/v1/batches").json()["object"] == "list"


def test_gemini_refuses_inline_batches_over_20_mb_and_files_over_2_gb(sim_server):
    url = sim_server().url
    big = {"batch": {"inputConfig": {"requests": {"requests": [
        {"request": gemini_body("x" * 1_000_000)} for _ in range(21)]}}}}
    refused = post(gemini_url(url, "batchGenerateContent"), big)
    assert refused.status == 400 and "exceeds the limit" in refused.json()["error"]["message"]
    huge = post(url + "/upload/v1beta/files", {"file": {}}, {
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(2 * 2**30 + 1)})
    assert huge.status == 400 and huge.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_the_google_genai_sdk_works_against_sim_serve(sim_server, tmp_path):
    genai = pytest.importorskip("google.genai")
    from google.genai import types

    server = sim_server("--api-key", "AIza-right", "--batch-delay-s", "0.3")
    client = genai.Client(api_key="AIza-right",
                          http_options=types.HttpOptions(base_url=server.url))
    config = types.GenerateContentConfig(system_instruction=SYSTEM, max_output_tokens=80,
                                         temperature=0.5)  # a float: what the SDK sends
    reply = client.models.generate_content(model="sim-small", contents=PROMPT, config=config)
    openai = post(server.url + "/v1/chat/completions", chat_body(max_tokens=80, temperature=0.5),
                  {"Authorization": "Bearer AIza-right"}).json()
    assert reply.text == openai["choices"][0]["message"]["content"]
    assert reply.usage_metadata.prompt_token_count == openai["usage"]["prompt_tokens"]
    pieces = [chunk.text for chunk in client.models.generate_content_stream(
        model="sim-small", contents=PROMPT, config=config)]
    assert len(pieces) >= 3 and "".join(pieces) == reply.text

    job = client.batches.create(model="sim-small", src=[
        {"contents": [{"role": "user", "parts": [{"text": f"Label the sentiment: {text}"}]}],
         "metadata": {"key": f"r{i}"}} for i, text in enumerate(REVIEWS)],
        config={"display_name": "sdk"})
    assert job.state.name == "JOB_STATE_PENDING" and job.display_name == "sdk"
    deadline = time.monotonic() + 10
    while not job.done:
        assert time.monotonic() < deadline
        time.sleep(0.05)
        job = client.batches.get(name=job.name)
    assert job.state.name == "JOB_STATE_SUCCEEDED"
    labels = {r.metadata["key"]: r.response.text for r in job.dest.inlined_responses}
    assert labels == {f"r{i}": sim_model.sentiment(text) for i, text in enumerate(REVIEWS)}
    assert [b.name for b in client.batches.list(config={"page_size": 10})] == [job.name]
    pending = client.batches.create(model="sim-small", src=[{"contents": "Hello"}])
    client.batches.cancel(name=pending.name)
    while not (pending := client.batches.get(name=pending.name)).done:
        time.sleep(0.05)
    assert pending.state.name == "JOB_STATE_CANCELLED"

    data = b'{"key": "a", "request": {"contents": [{"parts": [{"text": "Summarize: ok"}]}]}}\n'
    (tmp_path / "in.jsonl").write_bytes(data)
    file = client.files.upload(file=tmp_path / "in.jsonl",
                               config={"mime_type": "application/jsonl"})
    assert file.size_bytes == len(data) and file.state.name == "ACTIVE"
    assert client.files.download(file=file.name) == data
    by_file = client.batches.create(model="sim-small", src=file.name)
    while not (by_file := client.batches.get(name=by_file.name)).done:
        time.sleep(0.05)
    [line] = jsonl(client.files.download(file=by_file.dest.file_name))
    assert line["key"] == "a" and line["response"]["candidates"][0]["content"]["parts"][0][
        "text"] == "ok"


def test_block_prompt_is_refused_in_each_vendors_shape(sim_server):
    server = sim_server("--block-prompt", "forbidden", "--batch-delay-s", "0.2")
    url = server.url
    bad = "Label the sentiment: forbidden words"
    openai = post(url + "/v1/chat/completions", chat_body(bad)).json()
    assert openai["choices"][0]["message"]["content"] is None
    assert openai["choices"][0]["finish_reason"] == "content_filter"
    assert openai["usage"]["completion_tokens"] == 0 and openai["usage"]["prompt_tokens"] > 0
    streamed = [json.loads(d) for _, d in sse_events(post(url + "/v1/chat/completions",
                                                          chat_body(bad, stream=True)).body)[:-1]]
    assert streamed[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == ""

    anthropic = post(url + "/v1/messages", messages_body(bad), ANTHROPIC_HEADERS).json()
    assert anthropic["content"] == [] and anthropic["stop_reason"] == "refusal"
    events = [name for name, _ in sse_events(post(url + "/v1/messages",
                                                  messages_body(bad, stream=True),
                                                  ANTHROPIC_HEADERS).body)]
    assert events == ["message_start", "message_delta", "message_stop"]

    # Gemini: in the system instruction the prompt is blocked, in the turns the reply
    prompt = post(gemini_url(url), gemini_body("Hi", "Be forbidden.")).json()
    assert "candidates" not in prompt
    assert prompt["promptFeedback"] == {"blockReason": "SAFETY", "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
         "blocked": True}]}
    tokens = prompt["usageMetadata"]["promptTokenCount"]
    assert tokens > 0 and prompt["usageMetadata"]["totalTokenCount"] == tokens
    reply = post(gemini_url(url), gemini_body(bad)).json()
    [candidate] = reply["candidates"]
    assert candidate["finishReason"] == "SAFETY" and "content" not in candidate
    assert candidate["safetyRatings"][0]["blocked"] is True
    chunks = post(gemini_url(url, "streamGenerateContent"), gemini_body(bad)).body
    assert [json.loads(c.removeprefix(b"data: "))["candidates"][0]["finishReason"]
            for c in chunks.split(b"\r\n\r\n") if c] == ["SAFETY"]
    assert post(gemini_url(url), gemini_body("Label: fine")).json()["candidates"][0][
        "finishReason"] == "STOP"

    # the same in batch results
    created = post(gemini_url(url, "batchGenerateContent"), {"batch": {"inputConfig": {
        "requests": {"requests": [{"request": gemini_body(text), "metadata": {"key": key}}
                                  for key, text in (("ok", "Label: fine"), ("no", bad))]}}}})
    done, _ = poll_gemini(url, created.json()["name"])
    results = {r["metadata"]["key"]: r["response"]
               for r in done["response"]["inlinedResponses"]["inlinedResponses"]}
    assert results["no"]["candidates"][0]["finishReason"] == "SAFETY"
    assert results["ok"]["candidates"][0]["finishReason"] == "STOP"
    message_batch = post(url + "/v1/messages/batches", {"requests": [
        {"custom_id": "no", "params": messages_body(bad)}]}, ANTHROPIC_HEADERS).json()
    ended, _ = poll(f"{url}/v1/messages/batches/{message_batch['id']}", ("ended",),
                    "processing_status", ANTHROPIC_HEADERS)
    [line] = jsonl(get(ended["results_url"], ANTHROPIC_HEADERS).body)
    assert line["result"]["message"]["stop_reason"] == "refusal"
    stats = server.stats()
    assert stats["blocked"] == 9 and stats["answered"] == 8  # and a batch item of each
