"""Token counts without a tokenizer: what vendors' tokenizers would count, approximated.

`chunbot estimate` predicts a run's tokens from a sample of thousands of rendered prompts,
so this must be fast and need nothing installed: pure Python and `re`. It mimics how a BPE
tokenizer (OpenAI's cl100k_base, the one reference it was calibrated on) cuts text: English
by words, digits by threes, punctuation by runs, and CJK (Chinese, Japanese, Korean) by
characters at ratios measured per script.

How close, measured against tiktoken's cl100k_base by bench/tokens.py: English reviews and
prose 0.6-2.4% under in total (2-5% mean error per text); Chinese, Japanese and Korean from
4% under (web pages) to 10% over (software docs and UI strings) in total, 7-18% per text.
JSON records are within 1%, Python source 5% under, Russian 4% under; German comes out
about 30% under (cl100k cuts its words finer than English ones). Not measured: other
vendors' tokenizers, and newer OpenAI vocabularies (o200k_base, reportedly leaner on CJK).
Speed: 20-45 MB/s of English text, 7-20 MB/s of CJK, on one core of a shared machine whose
figures vary with its load.
"""

from __future__ import annotations

import re
from typing import Any

_PUNCT = r"!-/:-@\[-`{-~"  # ASCII punctuation and symbols
# Each match is about one cl100k token:
# - a word with the space or the punctuation character before it (" the", ".path"): words
#   of up to 11 letters are one token, longer ones are cut again (12+ letters: 1.3-2);
# - digits by groups of three, as cl100k cuts them;
# - a run of one punctuation character ("---", "=="), up to 16, with the newlines after it;
# - a newline, or a run of 2+ spaces (a single space goes with the next word);
# - a space before digits or before Chinese or Japanese text, a token of its own there.
# re.ASCII: \s and \d match ASCII only; other characters are counted below, by script.
_UNITS = re.compile(rf"[ {_PUNCT}]?[A-Za-z]{{1,11}}|\d{{1,3}}|([{_PUNCT}])\1{{0,15}}\n*"
                    r"|\s\s+|\n| (?=[\d\u3040-\u30ff\u3400-\u9fff])", re.ASCII)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_KANA = re.compile(r"[\u3041-\u30ff\u31f0-\u31ff\uff66-\uff9f]+")
_HANGUL = re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]+")
# two bytes in UTF-8: accented Latin, Greek, Cyrillic, Hebrew, Arabic (0.45 a character
# measured on Russian)
_TWO_BYTES = re.compile(r"[\u0080-\u07ff]+")
# Common characters that only traditional Chinese writes (這 for 这, 們 for 们): cl100k
# spends about 1.5 tokens on a traditional ideograph, 1-1.2 on a simplified one.
_TRADITIONAL = re.compile("[這們個為來會對說時與過發從應後開將於無還麼當點體實關經電學國"
                          "長問現見動門間東樣頭車書裡讓氣給檔數資錯號訊設選項]")


def _chars(pattern: re.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def count(text: str) -> int:
    """About how many tokens a vendor's tokenizer counts in text."""
    units = len(_UNITS.findall(text))
    if text.isascii():
        return units
    # the scripts are counted in the non-ASCII characters only, so that English text with
    # a few curly quotes or dashes stays about as fast as plain ASCII
    other = "".join(_NON_ASCII.findall(text))
    han, kana, hangul, two = (_chars(p, other) for p in (_HAN, _KANA, _HANGUL, _TWO_BYTES))
    # the rest: CJK punctuation and full-width forms (measured 1 token each), symbols,
    # emoji, scripts not measured
    rest = len(other) - han - kana - hangul - two
    # Tokens per character measured with cl100k, on general text (web pages) / on software
    # docs and UI strings (fewer, commoner words): simplified Chinese ideographs 1.2 / 0.96,
    # traditional 1.54 / 1.40, Japanese kanji (kana present) 1.47 / 1.27, kana 0.93 / 0.87,
    # hangul 1.35 / 1.21. The ratios sit between the two, nearer general text as prompts
    # mostly are, and were checked on whole texts (bench/tokens.py).
    per_han = 1.35 if kana else 1.5 if _TRADITIONAL.search(other) else 1.15
    return round(units + per_han * han + 0.92 * kana + 1.3 * hangul + 0.45 * two + rest)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A chat request's prompt: each message's text and 4 more (its role and the separators
    vendors add), as `sim.model.prompt_tokens` counts it. Of content given as a list of
    parts, the parts' "text"; other parts (images, files) are not counted."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += count(content)
        elif isinstance(content, list):
            total += sum(count(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
        total += 4
    return total


MOST_TOKENS_PER_CHAR = 4  # byte-level BPE: a character is at most its UTF-8 bytes
FEWEST_TOKENS_PER_CHAR = 1 / 16  # no tokenizer packs more than this into one token


def over(messages: list[dict[str, Any]], limit: int) -> int | None:
    """The prompt's tokens when they are more than `limit`, else None. Counting costs a
    pass over the text, so a prompt that fits by its length alone is not counted (every
    ordinary one), nor one far beyond the limit by its length (its count is then that
    bound)."""
    chars = sum(map(_text_length, messages))
    if chars * MOST_TOKENS_PER_CHAR + 4 * len(messages) <= limit:
        return None
    if chars * FEWEST_TOKENS_PER_CHAR > limit:
        return int(chars * FEWEST_TOKENS_PER_CHAR)
    tokens = prompt_tokens(messages)
    return tokens if tokens > limit else None


def _text_length(message: dict[str, Any]) -> int:
    """The characters of a message's text, as prompt_tokens counts them: its content, or
    the "text" of its parts."""
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content
                   if isinstance(part, dict) and isinstance(part.get("text"), str))
    return 0
