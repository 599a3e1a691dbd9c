"""`chunbot test`, end to end: the pipeline over the cases (once per repeat), the judges,
then the walk that checks every case in input order, shard by shard.

Each repeat runs in a workdir of its own — the first in `<workdir>/tests/<cases stem>/`,
repeat k in its `.repeat-k/` — and its LLM stages in a cache namespace of their own, so
repeats never share an answer while a second `chunbot test` is answered from the cache.
The walk holds one shard of each repeat's output at a time and writes each case's result
to `results.jsonl` as it goes: memory stays flat whatever the number of cases.
"""

from __future__ import annotations

import dataclasses
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from . import judges
from .assertions import AssertionSpecError, Outcome, case_assertions, check
from .report import Baseline, CaseResult, Report, Tally, Usage, percentiles
from .validate import validate

class ComeBackLater(Exception):
    """Batch-mode stages wait for provider batches: run `chunbot test` again later."""


@dataclass(frozen=True)
class TestOptions:
    stage: str | None = None  # check this stage's output (default: the last stage's)
    limit: int | None = None  # only the first N cases
    repeat: int = 1  # run every case this many times, with fresh samples
    baseline: Path | None = None  # compare each case with the results saved here
    wait: bool = False  # batch-mode stages: wait for their batches instead of exit 75
    retry_errors: bool = False  # send the failed records of the LLM stages again first
    again: str | None = None  # the command that retries errors, for the run's summary


@dataclass
class _Case:
    position: int
    case_id: Any
    case: dict[str, Any] | None  # None: the line is no JSON object
    checks: list[Any]
    why_not: str | None = None  # why `case` is None


def run_tests(pipeline: Any, cases: str, options: TestOptions | None = None,
              progress: Any = None) -> Report:
    """Run the pipeline (up to `options.stage`) over the cases — resumable, cached, the
    production workdir untouched — then check every case. Raises ConfigError for a bad
    assertion (before any request), ComeBackLater while batches are pending."""
    from .. import engine
    from ..source import resolve

    options = options or TestOptions()
    started = time.monotonic()
    last = pipeline.stage(options.stage) if options.stage else pipeline.stages[-1]
    checked = pipeline.stages[: pipeline.stages.index(last) + 1]
    files = resolve(cases)
    has_judges = validate(files, pipeline, checked, options.limit)  # before any request
    baseline = Baseline(options.baseline) if options.baseline is not None else None
    stem = Path(cases).name.removesuffix(".zst").removesuffix(".jsonl")
    base = Path(pipeline.workdir) / "tests" / stem
    workdirs = [base] + [base / f".repeat-{k}" for k in range(2, options.repeat + 1)]
    stopped: list[str] = []  # what stopped a run before all its shards were done
    for k, workdir in enumerate(workdirs, 1):
        repeat = _repeat(pipeline, cases, workdir, k, checked)
        runs = [engine.RunOptions(limit=options.limit, wait=options.wait, again=options.again)]
        if options.retry_errors:
            runs += [dataclasses.replace(runs[0], rerun=spec.name, rerun_failed=True)
                     for spec in checked if spec.kind == "llm" and _has_errors(workdir, spec)]
        for run_options in runs:
            ran = engine.run(repeat, run_options, progress)
            if ran.exit_code == engine.EXIT_LATER:
                raise ComeBackLater(f"{workdir}: provider batches are still running; run "
                                    "`chunbot test` again later (or with --wait)")
            stopped += ran.errors
        if has_judges:
            _judge(repeat, files, options.limit, last.name, workdir, k, progress)
    runs = [_RunOutputs(w, pipeline, checked, last.name, stopped) for w in workdirs]
    tally = Tally()
    results = base / "results.jsonl"
    render = _renderer()
    from ..store import atomic_file

    try:
        with atomic_file(results, sync=False) as out:
            for shard_index, shard_cases in _cases(files, pipeline, options.limit):
                records = [run.shard(shard_index) for run in runs]
                for item in shard_cases:
                    checked_runs = [run.check(item, shard_records, render)
                                    for run, shard_records in zip(runs, records)]
                    result = _combine(item.case_id, checked_runs)
                    tally.add(result, [outcomes for _, outcomes, _, _ in checked_runs])
                    if baseline is not None:
                        tally.compare(item.case_id, result.status, baseline.status(item.case_id))
                    out.write(orjson.dumps(result.to_json(), default=str) + b"\n")
    finally:
        if baseline is not None:
            baseline.close()
    usage, judged, latencies = Usage(), Usage(), array("f")
    for run in runs:
        run.usage(usage, judged, latencies)
    return Report(pipeline.name, last.name, tally, results, workdirs, options.repeat, usage,
                  judged, percentiles(latencies), options.baseline,
                  time.monotonic() - started)


def _repeat(pipeline: Any, cases: str, workdir: Path, k: int, checked: list[Any]) -> Any:
    """The pipeline as repeat k runs it: up to the checked stage, its LLM stages in a cache
    namespace of their own after the first, so a repeat is a fresh sample."""
    stages = checked
    if k > 1:
        stages = [dataclasses.replace(s, cache_namespace=f"{s.cache_namespace or ''}repeat-{k}")
                  if s.kind == "llm" else s for s in stages]
    return dataclasses.replace(pipeline, input=cases, workdir=workdir, output=None,
                               stages=stages)


def _has_errors(workdir: Path, spec: Any) -> bool:
    from ..store import Workdir

    path = Workdir(workdir).errors_path(spec.name)
    return path.exists() and path.stat().st_size > 0


def _judge(repeat: Any, files: list[str], limit: int | None, last: str, workdir: Path,
           k: int, progress: Any) -> None:
    """Write this run's judge tasks, then have them judged: one more resumable run."""
    from .. import engine

    outputs = _RunOutputs(workdir, repeat, [], last, [])
    render = _renderer()
    tasks = judges.Tasks(workdir / judges.FOLDER / "tasks.jsonl")
    try:
        for shard_index, shard_cases in _cases(files, repeat, limit):
            records = outputs.shard(shard_index) or {}
            for item in shard_cases:
                record = records.get(item.case_id)
                if record is None or item.case is None:
                    continue
                for n, assertion in enumerate(item.checks):
                    if assertion.kind == "judge":
                        rubric = assertion.value.rubric
                        tasks.add(item.position, n, assertion, record, item.case,
                                  render(rubric, item.case) if "{" in rubric else rubric)
    finally:
        tasks.close()
    if tasks.count:
        judging = judges.pipeline(repeat, tasks, workdir / judges.FOLDER,
                                  f"repeat-{k}" if k > 1 else None)
        engine.run(judging, engine.RunOptions(), progress)


class _RunOutputs:
    """One repeat's outputs, a shard at a time, with its failed records and its judges."""

    def __init__(self, workdir: Path, pipeline: Any, stages: list[Any], last: str,
                 stopped: list[str]):
        from ..store import Workdir

        self.workdir = workdir
        self.store = Workdir(workdir, pipeline.compress)
        self.stages = stages
        self.last = last
        self.stopped = stopped[0] if stopped else "the run stopped before it"
        self.failed: dict[Any, str] = {}
        for spec in stages:
            for record_id, why in self.store.errors_by_id(spec.name).items():
                self.failed.setdefault(record_id, f"{spec.name}: {why}")
        self.verdicts = judges.Verdicts(workdir / judges.FOLDER, pipeline.compress)

    def shard(self, index: int) -> dict[Any, dict[str, Any]] | None:
        """The checked stage's records of one shard by _id; None when it was not done."""
        path = self.store.part_path(self.last, index)
        try:
            data = self.store.read_bytes(path)
        except FileNotFoundError:
            return None
        records: dict[Any, dict[str, Any]] = {}
        for line in data.splitlines():
            record = orjson.loads(line)
            records.setdefault(record.get("_id"), record)  # a fan-out's first record
        return records

    def check(self, item: _Case, records: dict[Any, dict[str, Any]] | None,
              render: Callable[[str, dict[str, Any]], Any]
              ) -> tuple[str, list[Outcome], str | None, list[tuple[str, bool, str]]]:
        """(status, outcomes, why it is an error, judges' verdicts) of one case."""
        if item.case is None:
            return "error", [], item.why_not, []
        if item.case_id in self.failed:  # the pipeline's errors.jsonl says why
            return "error", [], self.failed[item.case_id], []
        if records is None:
            return "error", [], f"not run: {self.stopped}", []
        record = records.get(item.case_id)
        outcomes, judged = [], []
        for n, assertion in enumerate(item.checks):
            verdict = None
            if assertion.kind == "judge" and record is not None:
                task = judges.task_id(item.position, n)
                verdict = self.verdicts.get(task)
                if verdict is None:
                    why = self.verdicts.error(task) or "it gave no verdict (its run stopped)"
                    return "error", [], f"judge of {assertion.label}: {why}", judged
                judged.append((assertion.label, verdict[0], verdict[1]))
            outcomes.append(check(assertion, record, item.case, render, verdict))
        return ("passed" if all(o.passed for o in outcomes) else "failed"), outcomes, None, \
            judged

    def usage(self, pipeline: Usage, judging: Usage, latencies: array) -> None:
        """Add what this repeat spent (state.json's counts) and its request latencies."""
        for store, names, into in ((self.store, [s.name for s in self.stages], pipeline),
                                   (self.verdicts.store, ["judge"], judging)):
            state = store.load_state()
            for name in names:
                saved = state.stages.get(name)
                if saved is None:
                    continue
                counts = saved.totals()
                into.tokens_in += counts.tokens_in
                into.tokens_out += counts.tokens_out
                into.cost += counts.cost
                into.cache_hits += counts.cache_hits
                into.requests += sum(m.requests for m in counts.models.values())
        for spec in self.stages:
            if spec.kind != "llm":
                continue
            for path in sorted(self.store.stage_dir(spec.name).glob("trace-*.jsonl*")):
                for line in self.store.read_bytes(path).splitlines():
                    latency = orjson.loads(line).get("latency_ms")
                    if latency is not None:  # none for a cache hit
                        latencies.append(latency)


def _combine(case_id: Any, runs: list[tuple[str, list[Outcome], str | None, list[Any]]]
             ) -> CaseResult:
    """One case over its repeats: passed (every time), failed, error (every time) or flaky."""
    passes = sum(1 for status, *_ in runs if status == "passed")
    if passes == len(runs):
        status = "passed"
    elif passes:
        status = "flaky"
    elif all(s == "error" for s, *_ in runs):
        status = "error"
    else:
        status = "failed"
    first = next((r for r in runs if r[0] == "failed"), None) or \
        next((r for r in runs if r[0] != "passed"), runs[0])
    return CaseResult(case_id, status, len(runs), passes,
                      first[1] if first[0] != "passed" else [], first[2], runs[0][3])


def _renderer() -> Callable[[str, dict[str, Any]], Any]:
    """Fill a `tests:` template from a case; each template compiled once."""
    from .. import templates

    compiled: dict[str, Any] = {}

    def render(template: str, case: dict[str, Any]) -> Any:
        if template not in compiled:
            compiled[template] = templates.compile_template(template)
        return compiled[template].render(case)

    return render


def _cases(files: list[str], pipeline: Any, limit: int | None
           ) -> Iterator[tuple[int, list[_Case]]]:
    """Per input shard: its index and its cases with their assertions, in order; a bad
    `expect` raises ConfigError naming the file, line and key."""
    from ..config import ConfigError
    from ..source import read_shards

    folder = Path(pipeline.path).parent
    for shard in read_shards(files, pipeline.shard_size, limit, pipeline.max_line_bytes):
        found = []
        for i, line in enumerate(shard.lines):
            position = shard.start + i
            try:
                case = orjson.loads(line)
            except orjson.JSONDecodeError:
                case = None
            if not isinstance(case, dict):
                name, lineno = shard.origin(i)
                found.append(_Case(position, position, None, [],
                                   f"{name}:{lineno} is not a JSON object"))
                continue
            case_id = case.get(pipeline.id_field, position) if pipeline.id_field else position
            try:
                checks = [*pipeline.tests,
                          *case_assertions(case.get("expect"), folder, pipeline.models)]
            except AssertionSpecError as e:
                name, lineno = shard.origin(i)
                raise ConfigError(f"{name}:{lineno}: case {case_id!r}: key 'expect': {e}") \
                    from None
            found.append(_Case(position, case_id, case, checks))
        yield shard.index, found
