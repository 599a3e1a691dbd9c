"""The vendors' prompt caching in `chunbot sim serve`, reported in each reply's usage.

Two models: automatic prefix caching (OpenAI, DeepSeek, Gemini 2.5's implicit caching),
where whole blocks of the prompt seen before are read from the cache, and Anthropic's,
where the prefix up to the last block marked `cache_control` is written once and read
after. Each route keeps its own PrefixCache, bounded, so a long benchmark keeps a bounded
memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from . import model as sim_model
from .wire import Call, as_string

# Automatic caching caches whole blocks of this many characters of the prompt (role and
# content of each message, concatenated); each remembered prefix is one entry, and the least
# recently used ones are forgotten beyond CACHE_ENTRIES per route.
CACHE_BLOCK = 64
CACHE_ENTRIES = 200_000


@dataclass(frozen=True)
class CacheUse:
    """The prompt tokens a request read from the provider's cache and wrote to it."""

    read: int = 0
    created: int = 0


NO_CACHE = CacheUse()


class PrefixCache:
    """Hashes of prompt prefixes seen before, least recently used forgotten first."""

    def __init__(self, limit: int = CACHE_ENTRIES):
        self.limit = limit
        self.seen: OrderedDict[bytes, None] = OrderedDict()

    def leading_hits(self, keys: list[bytes]) -> int:
        """How many of `keys` (a request's cumulative prefixes, shortest first) were seen
        before, counting from the first up to the first miss; then all are remembered."""
        seen = self.seen
        hits, run = 0, True
        for key in keys:
            if key in seen:
                seen.move_to_end(key)
                if run:
                    hits += 1
            else:
                run = False
                seen[key] = None
        while len(seen) > self.limit:
            seen.popitem(last=False)
        return hits

    def check_and_add(self, key: bytes) -> bool:
        """Whether `key` was seen before; it is remembered either way."""
        return self.leading_hits([key]) == 1

    def clear(self) -> None:
        self.seen.clear()


def prefix_keys(messages: list[dict[str, Any]]) -> list[bytes]:
    """The hashes of the prompt's cumulative prefixes that end at each whole block of
    CACHE_BLOCK characters (a partial last block does not count). The prompt is every
    message's role and content, in order; the hash is carried from block to block, so each
    character is hashed once."""
    prompt = "".join([as_string(m.get("role")) + as_string(m.get("content"))
                      for m in messages])
    end = len(prompt) - len(prompt) % CACHE_BLOCK
    if not end:
        return []
    digest = hashlib.blake2b(digest_size=16)
    keys = []
    if prompt.isascii():  # one character, one byte
        data = memoryview(prompt.encode())
        for start in range(0, end, CACHE_BLOCK):
            digest.update(data[start:start + CACHE_BLOCK])
            keys.append(digest.digest())
    else:
        for start in range(0, end, CACHE_BLOCK):
            digest.update(prompt[start:start + CACHE_BLOCK].encode("utf-8", "surrogatepass"))
            keys.append(digest.digest())
    return keys


def automatic_use(cache: PrefixCache, call: Call, answer: sim_model.SimReply) -> CacheUse:
    """Automatic prefix caching: the whole blocks of the prompt seen before are read."""
    keys = prefix_keys(call.messages)
    if not keys:
        return NO_CACHE
    hits = cache.leading_hits(keys)
    if not hits:
        return NO_CACHE
    return CacheUse(read=min(hits * CACHE_BLOCK // 4, answer.input_tokens))


def _cache_marked(block: Any) -> bool:
    control = block.get("cache_control") if isinstance(block, dict) else None
    return isinstance(control, dict) and control.get("type") == "ephemeral"


def anthropic_cache_prefix(body: dict[str, Any]) -> tuple[bytes, int] | None:
    """The hash and the tokens of the cacheable prefix of an Anthropic request: the system
    blocks, then the messages' blocks, up to and including the last block marked with
    `cache_control`; None when no block is. Tokens are counted per message (the system
    prompt being one) over the texts of its blocks in the prefix, as the model counts them."""
    units: list[tuple[str, list[Any]]] = []
    system = body.get("system")
    if system is not None:
        units.append(("system", system if isinstance(system, list) else [system]))
    for message in body["messages"]:
        content = message.get("content")
        units.append((as_string(message.get("role")),
                      content if isinstance(content, list) else [content]))
    last = None
    for u, (_, blocks) in enumerate(units):
        for b, block in enumerate(blocks):
            if _cache_marked(block):
                last = (u, b)
    if last is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    tokens = 0
    for u in range(last[0] + 1):
        role, blocks = units[u]
        if u == last[0]:
            blocks = blocks[:last[1] + 1]
        digest.update(b"\x00" + role.encode("utf-8", "surrogatepass") + b"\x00")
        texts = []
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "text":
                text = as_string(block.get("text"))
                texts.append(text)
                piece = b"t" + text.encode("utf-8", "surrogatepass")
            elif isinstance(block, str):
                texts.append(block)
                piece = b"t" + block.encode("utf-8", "surrogatepass")
            else:  # an image, a tool use…: its content, whatever its cache marks
                if isinstance(block, dict):
                    block = {k: v for k, v in block.items() if k != "cache_control"}
                piece = b"j" + orjson.dumps(block, option=orjson.OPT_SORT_KEYS
                                            | orjson.OPT_NON_STR_KEYS, default=str)
            digest.update(len(piece).to_bytes(8, "big"))
            digest.update(piece)
        tokens += sim_model.count_tokens("".join(texts))
    return digest.digest(), tokens


def marked_use(cache: PrefixCache, call: Call, answer: sim_model.SimReply) -> CacheUse:
    """Anthropic's caching: the marked prefix is written the first time, read after."""
    prefix = anthropic_cache_prefix(call.body) if call.body is not None else None
    if prefix is None:
        return NO_CACHE
    key, tokens = prefix
    if cache.check_and_add(key):
        return CacheUse(read=tokens)
    return CacheUse(created=tokens)
