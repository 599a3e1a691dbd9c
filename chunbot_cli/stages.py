"""The three stage kinds: LLM (`prompt`), `filter` and `python`.

Each turns the records of one shard into that stage's output for the shard: the output
records in input order, the failures (for errors.jsonl) and, for LLM stages, one trace
entry per record. A failing record never stops the others. Filter and python stages are
plain loops over the shard; an LLM stage runs its requests concurrently and reports each
finished record to a callback (the journal) as soon as it is done.
"""

from __future__ import annotations

import asyncio
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import orjson

from .config import StageSpec, import_callable
from .llm.types import Request

if TYPE_CHECKING:
    from .llm.client import ModelClient


@dataclass
class Counters:
    """Live per-stage totals for progress lines and the run summary."""

    records_in: int = 0
    records_out: int = 0
    failed: int = 0
    filtered: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, other: "Counters") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class StageOutput:
    records: list[dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    trace: list[dict[str, Any]] | None = None
    counts: Counters = field(default_factory=Counters)


def failure(stage: str, record: dict[str, Any], error: str) -> dict[str, Any]:
    return {"_id": record.get("_id"), "stage": stage, "error": error, "record": record}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class FilterStage:
    def __init__(self, spec: StageSpec):
        from . import templates

        self.spec = spec
        self.predicate = templates.compile_expression(spec.filter or "")

    def run(self, records: list[dict[str, Any]]) -> StageOutput:
        out = StageOutput(records=[])
        keep, predicate = out.records.append, self.predicate
        for record in records:
            try:
                kept = predicate(record)
            except Exception as e:  # any error in a user expression is this record's failure
                out.errors.append(failure(self.spec.name, record, f"filter: {_describe(e)}"))
                continue
            if kept:
                keep(record)
        out.counts = Counters(records_in=len(records), records_out=len(out.records),
                              failed=len(out.errors),
                              filtered=len(records) - len(out.records) - len(out.errors))
        return out


class PythonStage:
    def __init__(self, spec: StageSpec, import_paths: list[str]):
        self.spec = spec
        self.function: Callable[[dict[str, Any]], Any] = import_callable(spec.python or "",
                                                                         import_paths)

    def run(self, records: list[dict[str, Any]]) -> StageOutput:
        out = StageOutput(records=[])
        keep, function, dropped = out.records.append, self.function, 0
        for record in records:
            parent = record.get("_id")
            try:
                result = function(record)
            except Exception as e:  # any error in user code is this record's failure
                where = traceback.extract_tb(e.__traceback__)[-1]
                reason = f"{_describe(e)} (at {where.filename}:{where.lineno})"
                out.errors.append(failure(self.spec.name, record, reason))
                continue
            if result is record:
                keep(result)
            elif isinstance(result, dict):
                result.setdefault("_id", parent)
                keep(result)
            elif result is None:
                dropped += 1
            elif isinstance(result, list) and all(isinstance(r, dict) for r in result):
                for j, child in enumerate(result):
                    if child.get("_id", parent) == parent:
                        child["_id"] = f"{parent}-{j}"
                    keep(child)
            else:
                out.errors.append(failure(
                    self.spec.name, record,
                    f"returned {type(result).__name__}; expected a dict, a list of dicts or None"))
        out.counts = Counters(records_in=len(records), records_out=len(out.records),
                              failed=len(out.errors), filtered=dropped)
        return out


class LLMStage:
    """Renders the prompt, asks the stage's model (the next one of a cascade on failure),
    parses the reply into the `output` field."""

    def __init__(self, spec: StageSpec, clients: dict[str, "ModelClient"]):
        from . import templates

        self.spec = spec
        self.clients = [clients[alias] for alias in spec.models]
        self.system = templates.compile_template(spec.system) if spec.system else None
        self.prompt = templates.compile_template(spec.prompt or "")

    @property
    def concurrency(self) -> int:
        """The most requests this stage may ever have in flight (its models' limits adapt
        below that)."""
        return max(client.ceiling for client in self.clients)

    async def run(self, records: list[dict[str, Any]], done: dict[int, dict[str, Any]],
                  on_done: Callable[[dict[str, Any]], None]) -> StageOutput:
        """`done` holds entries finished by an earlier attempt (from the journal); `on_done`
        gets each new entry as soon as its record is finished."""
        entries: list[dict[str, Any] | None] = [done.get(i) for i in range(len(records))]
        todo = [i for i, entry in enumerate(entries) if entry is None]
        queue = iter(todo)

        async def worker() -> None:
            for i in queue:
                entry = await self.process(i, records[i])
                entries[i] = entry
                on_done(entry)

        await asyncio.gather(*(worker() for _ in range(min(len(todo), self.concurrency))))
        return self.assemble(records, entries)

    async def process(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        """One record → a journal entry: {i, out | error, trace}."""
        trace: dict[str, Any] = {"_id": record.get("_id"), "stage": self.spec.name}
        try:
            messages = self.render(record)
        except Exception as e:  # a template error is this record's failure
            trace["error"] = f"template: {_describe(e)}"
            return {"i": index, "error": trace["error"], "trace": trace}
        request = Request(messages=messages, params=self.spec.params)
        trace["request"] = {"messages": messages, "params": self.spec.params}
        trace["attempts"] = []
        tokens_in = tokens_out = 0
        error = "no model answered"
        for client in self.clients:
            result = await client.complete(request, self.spec.retries, self.spec.outage_timeout)
            for attempt in result.attempts:
                attempt["model"] = client.spec.alias
            trace["attempts"] += result.attempts
            if result.reply is None:
                error = f"model {client.spec.alias!r}: {result.error}"
                continue
            reply = result.reply
            tokens_in += reply.input_tokens
            tokens_out += reply.output_tokens
            trace.update(model=client.spec.alias, model_name=reply.model,
                         endpoint=result.endpoint, response=reply.text,
                         latency_ms=result.latency_ms,
                         tokens={"in": tokens_in, "out": tokens_out})
            try:
                value = self.parse(reply.text)
            except ValueError as e:
                error = f"model {client.spec.alias!r}: {e}"
                continue
            trace["output"] = value
            trace["error"] = None
            return {"i": index, "out": value, "trace": trace}
        trace["error"] = error
        trace["tokens"] = {"in": tokens_in, "out": tokens_out}
        return {"i": index, "error": error, "trace": trace}

    def render(self, record: dict[str, Any]) -> list[dict[str, str]]:
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(record)})
        messages.append({"role": "user", "content": self.prompt.render(record)})
        return messages

    def parse(self, text: str) -> Any:
        if self.spec.parse == "text":
            return text.strip()
        body = text.strip()
        if body.startswith("```"):
            body = body.split("\n", 1)[-1].rsplit("```", 1)[0]
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"reply is not valid JSON ({e}): {text[:200]!r}") from None

    def assemble(self, records: list[dict[str, Any]],
                 entries: list[dict[str, Any] | None]) -> StageOutput:
        out = StageOutput(records=[], trace=[])
        field_name = self.spec.output or self.spec.name
        for record, entry in zip(records, entries):
            assert entry is not None
            trace = entry["trace"]
            out.trace.append(trace)
            tokens = trace.get("tokens") or {}
            out.counts.tokens_in += tokens.get("in", 0)
            out.counts.tokens_out += tokens.get("out", 0)
            if "error" in entry:
                out.errors.append(failure(self.spec.name, record, entry["error"]))
            else:
                record[field_name] = entry["out"]
                out.records.append(record)
        out.counts.records_in = len(records)
        out.counts.records_out = len(out.records)
        out.counts.failed = len(out.errors)
        return out
