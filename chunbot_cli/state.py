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
class ModelCounts:
    """What one model did for one stage: records it answered (its reply was kept),
    requests sent to it (every try), the replies they got, re-asks among them, their
    tokens and cost."""

    answered: int = 0
    requests: int = 0
    replies: int = 0
    reasks: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0

    def add(self, other: "ModelCounts") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_json(self) -> dict[str, Any]:
        return {f.name: round(getattr(self, f.name), 8) if f.type == "float"
                else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Any) -> "ModelCounts":
        data = data if isinstance(data, dict) else {}
        return cls(**{f.name: data.get(f.name, 0) for f in fields(cls)})


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
    models: dict[str, ModelCounts] = field(default_factory=dict)  # LLM stages, by alias
    escalations: dict[str, int] = field(default_factory=dict)  # "small → big": records

    def add(self, other: "Counters") -> None:
        for name in _PLAIN:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for alias, counts in other.models.items():
            self.model(alias).add(counts)
        for pair, count in other.escalations.items():
            self.escalations[pair] = self.escalations.get(pair, 0) + count

    def model(self, alias: str) -> ModelCounts:
        if alias not in self.models:
            self.models[alias] = ModelCounts()
        return self.models[alias]

    def copy(self) -> "Counters":
        copy = Counters()
        copy.add(self)
        return copy

    def to_json(self) -> dict[str, Any]:
        """The counts by the names state.json and `status --json` give them."""
        data: dict[str, Any] = {_JSON_NAMES.get(name, name): round(getattr(self, name), 8)
                                if isinstance(getattr(self, name), float)
                                else getattr(self, name) for name in _PLAIN}
        if self.models:
            data["models"] = {alias: counts.to_json() for alias, counts in self.models.items()}
        if self.escalations:
            data["escalations"] = dict(self.escalations)
        return data

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
        by_model = trace.get("models")
        if isinstance(by_model, dict):  # a cascade, a route or re-asks: each model's share
            for alias, used in by_model.items():
                self.model(alias).add(ModelCounts.from_json(used))
        elif trace.get("model"):  # one model did it all
            counts = self.model(trace["model"])
            if not trace.get("cache_hit"):
                tokens = trace.get("tokens") or {}
                counts.requests += len(trace.get("attempts") or ()) or 1
                counts.replies += "response" in trace
                counts.tokens_in += tokens.get("in", 0)
                counts.tokens_out += tokens.get("out", 0)
                counts.cost += trace.get("cost", 0.0)
        if not entry.failed and trace.get("model"):
            self.model(trace["model"]).answered += 1
        for pair in trace.get("escalations") or ():
            self.escalations[pair] = self.escalations.get(pair, 0) + 1


# Counters' fields as state.json names them
_JSON_NAMES = {"records_in": "in", "records_out": "out"}
_PLAIN = ("records_in", "records_out", "failed", "filtered", "tokens_in", "tokens_out",
          "tokens_cached", "cache_hits", "cost", "cost_full")


@dataclass
class ShardEntry:
    """A committed shard of one stage: what it was made from (`src`: the input shard's
    digest, or the upstream shard's token), its own token (what downstream was made
    from), its counts, and what its part file held when it was committed (bytes on
    disk and records), so a truncated or emptied part is found without reading it."""

    src: str
    token: str
    counts: Counters = field(default_factory=Counters)
    part_bytes: int | None = None  # None: committed before these were kept
    part_records: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = {"src": self.src, "token": self.token, **self.counts.to_json()}
        if self.part_bytes is not None:
            data.update(part_bytes=self.part_bytes, part_records=self.part_records)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardEntry":
        counts = Counters(**{name: data.get(_JSON_NAMES.get(name, name), 0) for name in _PLAIN})
        if isinstance(data.get("models"), dict):
            counts.models = {str(k): ModelCounts.from_json(v) for k, v in data["models"].items()}
        if isinstance(data.get("escalations"), dict):
            counts.escalations = {str(k): int(v) for k, v in data["escalations"].items()}
        part_bytes, part_records = data.get("part_bytes"), data.get("part_records")
        return cls(str(data.get("src", "")), str(data.get("token", "")), counts,
                   part_bytes if isinstance(part_bytes, int) else None,
                   part_records if isinstance(part_records, int) else None)


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

    def totals(self) -> Counters:
        """The counts of every committed shard, added up."""
        counts = Counters()
        for entry in self.shards.values():
            counts.add(entry.counts)
        return counts

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
class Export:
    """The `output:` file as the last export wrote it: from which commits of the last
    stage (`made_from`, a digest of their tokens in order), and its size, so the output
    is rewritten whenever it no longer holds what the shards do (an export killed before
    its rename, a shard recomputed, the file changed or gone)."""

    path: str
    made_from: str
    size: int
    records: int

    @staticmethod
    def digest(shards: dict[int, ShardEntry]) -> str:
        tokens = ",".join(f"{k}:{shards[k].token}" for k in sorted(shards))
        return hashlib.blake2b(tokens.encode(), digest_size=12).hexdigest()

    def holds(self, path: str, shards: dict[int, ShardEntry]) -> bool:
        """Whether the file at `path` is this export of these shards."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return False
        return (os.path.realpath(path) == os.path.realpath(self.path) and size == self.size
                and self.made_from == self.digest(shards))

    @classmethod
    def from_json(cls, data: Any) -> "Export | None":
        try:
            return cls(str(data["path"]), str(data["made_from"]), int(data["size"]),
                       int(data["records"]))
        except (TypeError, KeyError, ValueError):
            return None


@dataclass
class State:
    """The whole of state.json."""

    stages: dict[str, StageState] = field(default_factory=dict)
    input_shards: int | None = None  # known once a run read the whole input
    last_run: dict[str, Any] = field(default_factory=dict)  # started, pid, ended, exit_code…
    export: Export | None = None  # what `output:` holds

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": STATE_VERSION,
                                "stages": {k: v.to_json() for k, v in self.stages.items()}}
        if self.input_shards is not None:
            data["input_shards"] = self.input_shards
        if self.last_run:
            data["last_run"] = self.last_run
        if self.export is not None:
            data["export"] = vars(self.export)
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
                   data.get("last_run") if isinstance(data.get("last_run"), dict) else {},
                   Export.from_json(data.get("export")))
