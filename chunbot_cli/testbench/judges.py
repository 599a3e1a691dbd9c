"""LLM judges: the `judge` assertions of a test, asked as one more chunbot run.

After the pipeline has run over the cases, each judge assertion of each case that reached
the checked stage becomes a task line — the rubric filled from the case, the field's value,
the case — in `<tests workdir>/.judge/tasks.jsonl`. A one-stage pipeline, routed by the
judge's model alias, runs over them in `.judge/`: resumable, cached and rate-limited like
every stage, its replies (`{"verdict": "pass" | "fail", "reason": …}`) kept in its part
files and read back in task order, which is case order.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import orjson

from .assertions import Assertion, Judge

FOLDER = ".judge"  # a stage name cannot start with a dot: no clash with the pipeline's
OUTPUT = "judgement"
PROMPT = """You grade one output of an LLM pipeline against a rubric.
Rubric: {{ rubric }}
Case: {{ case }}
Output ({{ field }}): {{ output }}
Answer with a JSON object only, like {"verdict": "pass", "reason": "one short sentence"}; \
the verdict is "pass" or "fail"."""
VERDICT = {"type": "object", "required": ["verdict", "reason"],
           "properties": {"verdict": {"enum": ["pass", "fail"]}, "reason": {"type": "string"}}}


def task_id(position: int, n: int) -> str:
    """A judge task's id: the case's position in the cases and the assertion's index."""
    return f"{position}.{n}"


class Tasks:
    """The task lines of one run's judges, written as the cases are walked."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self.models: set[str] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path.with_suffix(".tmp"), "wb")

    def add(self, position: int, n: int, assertion: Assertion, record: dict[str, Any],
            case: dict[str, Any], rubric: str) -> None:
        judge: Judge = assertion.value
        value = record.get(assertion.field) if assertion.field else record
        shown_case = {k: v for k, v in case.items() if k != "expect"}
        line = orjson.dumps({
            "task": task_id(position, n), "model": judge.model, "field": assertion.field,
            "rubric": rubric,
            "output": value if isinstance(value, str) else orjson.dumps(value).decode(),
            "case": orjson.dumps(shown_case).decode()}) + b"\n"
        self.file.write(line)
        self.count += 1
        self.models.add(judge.model)

    def close(self) -> None:
        self.file.close()
        os.replace(self.path.with_suffix(".tmp"), self.path)


def pipeline(base: Any, tasks: Tasks, workdir: Path, namespace: str | None) -> Any:
    """The judges' one-stage pipeline over the tasks. A shard of tasks that changed (the
    pipeline's outputs did) is judged again, like any input shard that changed."""
    from ..config import extra_stage

    aliases = sorted(tasks.models)
    raw: dict[str, Any] = {"name": "judge", "prompt": PROMPT, "output": OUTPUT, "parse": "json",
                           "schema": VERDICT, "reask": 1,
                           "params": {"temperature": 0, "max_tokens": 300}}
    if len(aliases) == 1:
        raw["model"] = aliases[0]
    else:
        raw["route"] = [{"when": f"model == {a!r}", "model": a} for a in aliases[:-1]] + \
            [{"model": aliases[-1]}]
    if namespace is not None:
        raw["cache"] = {"namespace": namespace}
    stage = extra_stage(base, raw, upstream=FOLDER)
    return replace(base, input=str(tasks.path), workdir=workdir, id_field="task", stages=[stage],
                   tests=(), output=None)


class Verdicts:
    """The judges' answers of one run, read in task order; a task whose judging failed is
    found in the stage's errors.jsonl instead."""

    def __init__(self, workdir: Path, compress: str | None):
        from ..store import Workdir

        self.store = Workdir(workdir, compress)
        self.failed = {str(task): why for task, why in self.store.errors_by_id("judge").items()}
        self.answers = self._answers()
        self.ahead: tuple[str, Any] | None = None

    def _answers(self) -> Iterator[tuple[str, Any]]:
        folder = self.store.stage_dir("judge")
        for part in sorted(folder.glob("part-*.jsonl*")):
            for line in self.store.read_bytes(part).splitlines():
                record = orjson.loads(line)
                yield str(record.get("_id")), record.get(OUTPUT)

    def get(self, task: str) -> tuple[bool, str] | None:
        """(passed, reason) of a task; None when it has none (an error says why)."""
        if self.ahead is None:
            self.ahead = next(self.answers, None)
        if self.ahead is not None and self.ahead[0] == task:
            answer, self.ahead = self.ahead[1], None
            if isinstance(answer, dict):
                return answer.get("verdict") == "pass", str(answer.get("reason", ""))
        return None

    def error(self, task: str) -> str | None:
        return self.failed.get(task)
