"""state.json as typed classes: the run's `State`, a `StageState` per stage and a
`ShardEntry` per committed shard, with the `Counters` every shard and stage adds up.

The file's format stays what it has always been (shard keys are strings, counts are flat
fields named `in`, `out`, `failed`, …), so workdirs written before read the same; what
reads or writes it goes through these classes, never through dicts indexed by string.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store import Entry

STATE_VERSION = 1


@dataclass
class Counters:
    """Per-stage totals: of a shard (in state.json), or live for progress and the summary."""

    records_in: int = 0
    records_out: int = 0
    failed: int = 0
    filtered: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_cached: int = 0  # of tokens_in, read from the provider's prompt cache
    cache_hits: int = 0  # records answered from the local cache: no request, no tokens
    cost: float = 0.0  # USD, when the models have prices
    cost_full: float = 0.0  # what it would have cost without any cache

    def add(self, other: "Counters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, Any]:
        """The counts by the names state.json and `status --json` give them."""
        return {_JSON_NAMES.get(f.name, f.name): round(getattr(self, f.name), 8)
                if f.type == "float" else getattr(self, f.name) for f in fields(self)}

    def count(self, entry: "Entry") -> None:
        """One finished record of an LLM stage."""
        trace = entry.trace
        self.records_in += 1
        if entry.failed:
            self.failed += 1
        else:
            self.records_out += 1
        if trace.get("cache_hit"):
            self.cache_hits += 1
        else:
            tokens = trace.get("tokens") or {}
            self.tokens_in += tokens.get("in", 0)
            self.tokens_out += tokens.get("out", 0)
            self.tokens_cached += tokens.get("cached", 0)
        self.cost += trace.get("cost", 0.0)
        self.cost_full += trace.get("cost_full", 0.0)


# Counters' fields as state.json names them
_JSON_NAMES = {"records_in": "in", "records_out": "out"}


@dataclass
class ShardEntry:
    """A committed shard of one stage: what it was made from (`src`: the input shard's
    digest, or the upstream shard's token), its own token (what downstream was made
    from), and its counts."""

    src: str
    token: str
    counts: Counters = field(default_factory=Counters)

    def to_json(self) -> dict[str, Any]:
        return {"src": self.src, "token": self.token, **self.counts.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardEntry":
        counts = Counters(**{f.name: data.get(_JSON_NAMES.get(f.name, f.name), 0)
                             for f in fields(Counters)})
        return cls(str(data.get("src", "")), str(data.get("token", "")), counts)


def _new_epoch() -> str:
    return os.urandom(6).hex()


@dataclass
class StageState:
    fingerprint: str
    definition: dict[str, Any] = field(default_factory=dict)  # what the fingerprint hashed
    errors_bytes: int = 0  # errors.jsonl's committed length
    shards: dict[int, ShardEntry] = field(default_factory=dict)
    epoch: str = field(default_factory=_new_epoch)  # new whenever the stage starts afresh

    def token(self, source: str) -> str:
        """The commit token of a filter or python stage's shard made from `source`: the
        same for the same input until the stage is reset, so a stage downstream that is
        at work while the shard is uncommitted finds its journal again after a crash."""
        return hashlib.blake2b(f"{source}/{self.epoch}".encode(), digest_size=8).hexdigest()

    def failed(self) -> int:
        return sum(entry.counts.failed for entry in self.shards.values())

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "definition": self.definition,
                "errors_bytes": self.errors_bytes, "epoch": self.epoch,
                "shards": {str(k): v.to_json() for k, v in sorted(self.shards.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageState":
        return cls(data["fingerprint"], data.get("definition") or {},
                   int(data.get("errors_bytes", 0)),
                   {int(k): ShardEntry.from_json(v) for k, v in data["shards"].items()},
                   str(data.get("epoch") or _new_epoch()))


@dataclass
class State:
    """The whole of state.json."""

    stages: dict[str, StageState] = field(default_factory=dict)
    input_shards: int | None = None  # known once a run read the whole input
    last_run: dict[str, Any] = field(default_factory=dict)  # started, pid, ended, exit_code…

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": STATE_VERSION,
                                "stages": {k: v.to_json() for k, v in self.stages.items()}}
        if self.input_shards is not None:
            data["input_shards"] = self.input_shards
        if self.last_run:
            data["last_run"] = self.last_run
        return data

    @classmethod
    def from_json(cls, data: Any) -> "State | None":
        """The state a file holds; None when it is not one chunbot wrote."""
        if not (isinstance(data, dict) and isinstance(data.get("stages"), dict)):
            return None
        stages = data["stages"]
        if not all(isinstance(s, dict) and isinstance(s.get("fingerprint"), str)
                   and isinstance(s.get("shards"), dict)
                   and all(isinstance(e, dict) and str(k).isdigit()
                           for k, e in s["shards"].items())
                   for s in stages.values()):
            return None
        shards = data.get("input_shards")
        return cls({name: StageState.from_json(s) for name, s in stages.items()},
                   shards if isinstance(shards, int) else None,
                   data.get("last_run") if isinstance(data.get("last_run"), dict) else {})
