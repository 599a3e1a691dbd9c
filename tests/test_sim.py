"""sim/model.py: the deterministic simulated model."""

from __future__ import annotations

import json

from chunbot_cli.sim.model import count_tokens, reply, sentiment


def ask(prompt: str, **params) -> str:
    return reply("sim-small", [{"role": "user", "content": prompt}], params).text


def test_the_same_request_gives_the_same_reply():
    messages = [{"role": "user", "content": "Tell me something"}]
    assert reply("sim-small", messages, {}) == reply("sim-small", messages, {})
    assert reply("sim-small", messages, {}).text != reply("sim-small", messages, {"seed": 2}).text


def test_sentiment_labels_depend_on_the_text():
    assert ask("Label the sentiment: I love it, great value") == "positive"
    assert ask("Label the sentiment: Terrible, it broke after a day") == "negative"
    assert ask("Label the sentiment: It is okay, average") == "neutral"
    assert sentiment("this is not good and not great") == "negative"


def test_json_prompts_get_json():
    data = json.loads(ask("Return JSON for this review: Excellent kettle, boils fast"))
    assert data["sentiment"] == "positive" and data["keywords"]


def test_apologies_name_the_problem():
    text = ask("Write a two-line apology for: the battery died after a week")
    assert "battery" in text and text.count("\n") == 1


def test_max_tokens_truncates_with_finish_reason_length():
    answer = reply("sim-small", [{"role": "user", "content": "Say a lot"}], {"max_tokens": 3})
    assert answer.finish_reason == "length" and answer.output_tokens <= 3


def test_token_counts_are_about_four_characters_each():
    assert count_tokens("x" * 400) == 100
    answer = reply("sim-small", [{"role": "user", "content": "y" * 400}], {})
    assert 100 <= answer.input_tokens <= 110
