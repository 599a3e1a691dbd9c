"""The deterministic simulated model: the same messages and parameters give the same reply.

It recognises a few tasks from the prompt, so demos and tests produce meaningful data
without a key or a network: sentiment labels by keyword counting, JSON extraction,
summaries, apologies that name what went wrong, translations, a judge's verdict (a rubric
whose quoted words the output must contain) and plain text. Token counts
are about one per four characters, like real tokenizers on English.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

import orjson

POSITIVE = frozenset("""great love loved loving excellent perfect amazing awesome recommend
recommended happy fantastic best wonderful superb solid reliable comfortable delighted
impressed pleased sturdy beautiful fast easy worth brilliant outstanding favorite""".split())
NEGATIVE = frozenset("""terrible broke broken disappointed disappointing refund waste poor worst
returned returning awful horrible useless cheap flimsy defective faulty rude late never
stopped died leaks leaked annoying frustrating bad junk regret unusable damaged""".split())
NEUTRAL = frozenset("okay ok average fine decent mixed mediocre acceptable alright".split())
NEGATORS = frozenset("not no never hardly isn't wasn't don't didn't doesn't".split())
ASPECTS = ("battery", "sound", "delivery", "shipping", "price", "build quality", "customer service",
           "size", "screen", "taste", "smell", "fit", "instructions", "packaging", "charger",
           "noise", "temperature", "app", "strap", "lid", "handle", "warranty")
_WORD = re.compile(r"[a-z']+")
_VOCABULARY = ("the model answers with plain deterministic text that depends only on the "
               "request so tests can compare runs and count tokens across every stage").split()


@dataclass(frozen=True)
class SimReply:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str = "stop"


def count_tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The prompt's tokens as vendors count them: each message's content and a few more."""
    return sum(count_tokens(str(m.get("content", ""))) + 4 for m in messages)


def request_seed(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> int:
    digest = hashlib.sha256(orjson.dumps([model, messages, params],
                                         option=orjson.OPT_SORT_KEYS)).digest()
    return int.from_bytes(digest[:8], "big")


def sentiment(text: str) -> str:
    """positive / negative / neutral by counting lexicon words; 'not good' counts against."""
    score, neutral, previous = 0, 0, ""
    for word in _WORD.findall(text.lower()):
        sign = -1 if previous in NEGATORS else 1
        if word in POSITIVE:
            score += sign
        elif word in NEGATIVE:
            score -= sign
        elif word in NEUTRAL:
            neutral += 1
        previous = word
    # one stray word does not outweigh a hedge such as "okay" or "average"
    if score >= 2 or (score == 1 and not neutral):
        return "positive"
    if score <= -2 or (score == -1 and not neutral):
        return "negative"
    return "neutral"


def reply(model: str, messages: list[dict[str, Any]], params: dict[str, Any],
          wrong_rate: float = 0.0, flaky_rate: float = 0.0) -> SimReply:
    """`wrong_rate`: the share of requests (drawn from the request, so always the same
    ones) answered wrongly the first time — a sentiment label that is not the right one, a
    JSON object missing a key; asked again (the conversation holds its earlier reply), the
    model answers right, as a weak model told its mistake often does. `flaky_rate`: a
    share of answers wrong at random, a fresh draw each time, as sampling at a temperature
    above 0 makes a model's answers to the same request differ."""
    asked = [m for m in messages if m.get("role") == "user"]
    reasked = any(m.get("role") == "assistant" for m in messages)
    prompt = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "system")
    if reasked:
        prompt = str(asked[0].get("content", ""))  # the task, not the follow-up
    seed = request_seed(model, messages, params)
    text = _answer(prompt, seed)
    if wrong_rate and not reasked and (seed % 10_000) < wrong_rate * 10_000:
        text = _wrong(text)
    elif flaky_rate and not reasked and random.random() < flaky_rate:
        text = _wrong(text)
    input_tokens = prompt_tokens(messages)
    limit = params.get("max_tokens") or params.get("max_completion_tokens")
    finish = "stop"
    if isinstance(limit, int) and limit > 0 and count_tokens(text) > limit:
        text, finish = text[: limit * 4], "length"
    return SimReply(text, input_tokens, count_tokens(text), finish)


def _wrong(text: str) -> str:
    labels = ("positive", "negative", "neutral")
    if text in labels:
        return labels[(labels.index(text) + 1) % 3]
    if text.startswith("{"):
        value = orjson.loads(text)
        value.pop(next(reversed(value)), None)  # incomplete: its last key is missing
        return orjson.dumps(value).decode()
    return text


def _answer(prompt: str, seed: int) -> str:
    lower = prompt.lower()
    if "rubric:" in lower and "verdict" in lower:
        return _verdict(prompt)
    subject = prompt.split(":", 1)[1].strip() if ":" in prompt else prompt
    if "json" in lower:
        words = [w for w in _WORD.findall(subject.lower()) if len(w) > 4]
        keywords = sorted(set(words), key=lambda w: (-words.count(w), w))[:3]
        return orjson.dumps({"sentiment": sentiment(subject), "summary": _first_words(subject, 12),
                             "keywords": keywords}).decode()
    if "sentiment" in lower:
        return sentiment(subject)
    if "summar" in lower:
        return _first_words(subject, 20)
    if "apolog" in lower or "reply" in lower or "respond" in lower:
        return _apology(subject, seed, two_lines="two" in lower)
    if "translat" in lower:
        language = re.search(r"\binto ([A-Za-z]+)", prompt)
        return f"[{(language.group(1) if language else 'fr').lower()[:2]}] {subject}"
    count = 20 + seed % 40
    return " ".join(_VOCABULARY[(seed >> (i % 48)) % len(_VOCABULARY)] for i in range(count))


def _verdict(prompt: str) -> str:
    """A judge: the words the rubric quotes must all be in the output (the text after the
    line that starts with "Output"), case aside."""
    rubric = re.search(r"^Rubric:(.*)$", prompt, re.M | re.I)
    output = re.search(r"^Output[^:\n]*:(.*)", prompt, re.M | re.I | re.S)
    wanted = re.findall(r'"([^"]+)"|\'([^\']+)\'', rubric.group(1) if rubric else "")
    got = (output.group(1) if output else "").lower()
    missing = [a or b for a, b in wanted if (a or b).lower() not in got]
    if missing:
        return orjson.dumps({"verdict": "fail",
                             "reason": f"it does not say {missing[0]!r}"}).decode()
    return orjson.dumps({"verdict": "pass", "reason": "it does what the rubric asks"}).decode()


def _first_words(text: str, n: int) -> str:
    sentence = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    words = sentence.split()
    return " ".join(words[:n]) + ("…" if len(words) > n else "")


def _apology(text: str, seed: int, two_lines: bool) -> str:
    lower = text.lower()
    aspect = next((a for a in ASPECTS if a in lower), "experience")
    openers = ("We're sorry the {a} let you down.", "Thank you for telling us about the {a}.",
               "We apologise for the trouble with the {a}.")
    offers = ("Please reply with your order number and we will send a replacement or a refund.",
              "Our support team will contact you today to make it right.",
              "We have passed this on to our quality team and will refund you in full.")
    first = openers[seed % len(openers)].format(a=aspect)
    second = offers[(seed >> 8) % len(offers)]
    return f"{first}\n{second}" if two_lines else f"{first} {second}"
