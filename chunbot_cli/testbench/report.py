"""The report of a `chunbot test`: per-case results, their tally, and what is made of them.

Each case's result is one line of `<tests workdir>/results.jsonl`, written as the cases are
checked, so a test set of any size is checked in constant memory; the `Tally` keeps counts
and the first few failures only. The JSON report and the JUnit XML are streamed from that
file; a baseline is a copy of it, compared case by case in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator
from xml.sax.saxutils import escape, quoteattr

import orjson

from ..lookback.diff import FieldStats
from ..store import atomic_file, write_atomic
from .assertions import Outcome

SHOWN = 10  # failures, errors and flaky cases kept for the summary


@dataclass
class CaseResult:
    """One case over all its repeats."""

    case_id: Any
    status: str  # "passed", "failed", "flaky" (passed and failed) or "error"
    runs: int = 1
    passes: int = 0
    outcomes: list[Outcome] = field(default_factory=list)  # of its first run that did not pass
    error: str | None = None  # why its pipeline run failed
    judged: list[tuple[str, bool, str]] = field(default_factory=list)  # label, passed, reason

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.case_id, "status": self.status}
        if self.runs > 1:
            data.update(runs=self.runs, passes=self.passes)
        if self.error is not None:
            data["error"] = self.error
        failures = [_failure(o) for o in self.outcomes if not o.passed]
        if failures:
            data["failures"] = failures
        if self.judged:
            data["judges"] = [{"assertion": label, "verdict": "pass" if passed else "fail",
                               "reason": reason} for label, passed, reason in self.judged]
        return data


def _failure(outcome: Outcome) -> dict[str, Any]:
    data = {"assertion": outcome.assertion.label, "expected": outcome.expected,
            "got": outcome.got}
    if outcome.reason is not None:
        data["reason"] = outcome.reason
    return data


@dataclass
class Usage:
    """What the runs of a test spent: pipeline stages and judges apart."""

    requests: int = 0  # sent to a model
    cache_hits: int = 0  # answered by the local cache instead
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "cost": round(self.cost, 6)}


@dataclass
class Tally:
    """Counts over the checked cases, and the first few of each kind of trouble."""

    cases: int = 0
    passed: int = 0
    failed: int = 0
    flaky: int = 0
    errors: int = 0
    runs: int = 0  # case runs: cases × repeats
    run_passes: int = 0
    assertions: dict[str, list[int]] = field(default_factory=dict)  # label: [passed, checked]
    categorical: dict[str, FieldStats] = field(default_factory=dict)  # `equals`: expected, got
    failures: list[tuple[Any, Outcome]] = field(default_factory=list)
    error_cases: list[tuple[Any, str | None]] = field(default_factory=list)
    flaky_cases: list[tuple[Any, int, int]] = field(default_factory=list)  # id, passes, runs
    regressions: int = 0  # against the baseline: passed then, not now
    improvements: int = 0
    new_cases: int = 0  # not in the baseline
    regressed: list[Any] = field(default_factory=list)  # the first 100 ids of each
    improved: list[Any] = field(default_factory=list)

    def add(self, result: CaseResult, outcomes_by_run: list[list[Outcome]]) -> None:
        self.cases += 1
        self.runs += result.runs
        self.run_passes += result.passes
        if result.status == "passed":
            self.passed += 1
        elif result.status == "failed":
            self.failed += 1
        elif result.status == "flaky":
            self.flaky += 1
            if len(self.flaky_cases) < SHOWN * 2:
                self.flaky_cases.append((result.case_id, result.passes, result.runs))
        else:
            self.errors += 1
            if len(self.error_cases) < SHOWN:
                self.error_cases.append((result.case_id, result.error))
        for outcomes in outcomes_by_run:
            for outcome in outcomes:
                label = outcome.assertion.label
                counts = self.assertions.setdefault(label, [0, 0])
                counts[0] += outcome.passed
                counts[1] += 1
                if outcome.assertion.kind == "equals":
                    stats = self.categorical.get(label) or self.categorical.setdefault(
                        label, FieldStats(label))
                    stats.compare(_hashable(outcome.expected), _hashable(outcome.got))
        for outcome in result.outcomes:
            if not outcome.passed and len(self.failures) < SHOWN:
                self.failures.append((result.case_id, outcome))

    def compare(self, case_id: Any, now: str, then: str | None) -> None:
        """One case against its baseline status (None: not in the baseline)."""
        if then is None:
            self.new_cases += 1
        elif then == "passed" and now != "passed":
            self.regressions += 1
            if len(self.regressed) < 100:
                self.regressed.append(case_id)
        elif then != "passed" and now == "passed":
            self.improvements += 1
            if len(self.improved) < 100:
                self.improved.append(case_id)

    @property
    def pass_rate(self) -> float:
        """Of case runs: with --repeat, each repeat of each case counts once."""
        return self.run_passes / self.runs if self.runs else 0.0


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else \
        orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def wilson(passes: int, runs: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a pass rate: honest at small counts and near 0 or 1,
    where the plain ± of the normal approximation leaves [0, 1]."""
    if runs == 0:
        return 0.0, 0.0
    p = passes / runs
    middle = p + z * z / (2 * runs)
    spread = z * math.sqrt(p * (1 - p) / runs + z * z / (4 * runs * runs))
    scale = 1 + z * z / runs
    return max(0.0, (middle - spread) / scale), min(1.0, (middle + spread) / scale)


@dataclass
class Report:
    """A finished `chunbot test`: the tally, what it spent, where its results are."""

    pipeline: str
    stage: str
    tally: Tally
    results: Path  # results.jsonl: one line per case
    workdirs: list[Path]  # one per repeat: where `chunbot trace` finds the records
    repeat: int = 1
    usage: Usage = field(default_factory=Usage)
    judges: Usage = field(default_factory=Usage)
    latency_ms: tuple[float, float] | None = None  # p50, p95 of the pipeline's requests
    baseline: Path | None = None
    seconds: float = 0.0

    def ok(self, fail_under: float | None = None) -> bool:
        """Exit 0 or 1: no regression when there is a baseline, a pass rate of at least
        `fail_under` when given, and otherwise every case passed."""
        t = self.tally
        if self.baseline is not None or fail_under is not None:
            return (t.regressions == 0 if self.baseline is not None else True) and \
                (t.pass_rate >= fail_under if fail_under is not None else True)
        return t.cases > 0 and t.passed == t.cases

    def trace_command(self, pipeline_path: Path | str, case_id: Any) -> str:
        return (f"chunbot trace {pipeline_path} {case_id} --workdir {self.workdirs[0]}")

    def summary(self) -> dict[str, Any]:
        """The report without its per-case results: what --json writes before them."""
        t = self.tally
        low, high = wilson(t.run_passes, t.runs)
        data: dict[str, Any] = {
            "pipeline": self.pipeline, "stage": self.stage, "cases": t.cases,
            "passed": t.passed, "failed": t.failed, "errors": t.errors, "flaky": t.flaky,
            "pass_rate": round(t.pass_rate, 6), "pass_rate_95": [round(low, 6), round(high, 6)],
            "repeat": self.repeat, "runs": t.runs,
            "assertions": {label: {"passed": p, "checked": c}
                           for label, (p, c) in t.assertions.items()},
            "agreement": {label: {"agreement": round(s.agreement or 0.0, 6), "checked": s.both,
                                  "top_confusions": [{"expected": a, "got": b, "count": n}
                                                     for a, b, n in s.top_confusions()]}
                          for label, s in t.categorical.items() if s.categorical},
            **self.usage.to_json(),
            "latency_ms": ({"p50": self.latency_ms[0], "p95": self.latency_ms[1]}
                           if self.latency_ms else None),
            "seconds": round(self.seconds, 3),
            "workdir": str(self.workdirs[0]), "results_file": str(self.results)}
        if self.judges.requests or self.judges.tokens_in:
            data["judges"] = self.judges.to_json()
        if self.baseline is not None:
            data["baseline"] = {"dir": str(self.baseline), "regressions": t.regressions,
                                "improvements": t.improvements, "new": t.new_cases,
                                "regressed": t.regressed, "improved": t.improved}
        return data

    def results_lines(self) -> Iterator[bytes]:
        with open(self.results, "rb") as f:
            for line in f:
                yield line.rstrip(b"\n")

    def write_json(self, path: Path) -> None:
        """The summary and every case's result, streamed: `{..., "results": [...]}`."""
        with atomic_file(path) as out:
            out.write(orjson.dumps(self.summary())[:-1] + b',"results":[')
            for n, line in enumerate(self.results_lines()):
                out.write(b"," + line if n else line)
            out.write(b"]}\n")

    def write_junit(self, path: Path) -> None:
        """JUnit XML: a <testcase> per case, <failure> for failed assertions (and flaky
        cases), <error> for cases whose pipeline run failed."""
        t = self.tally
        name = quoteattr(f"{self.pipeline}: {self.stage}")
        counts = (f'tests="{t.cases}" failures="{t.failed + t.flaky}" errors="{t.errors}" '
                  f'time="{self.seconds:.3f}"')
        with atomic_file(path) as out:
            out.write(b'<?xml version="1.0" encoding="UTF-8"?>\n')
            out.write(f"<testsuites name={name} {counts}>\n<testsuite name={name} {counts} "
                      f'skipped="0">\n'.encode())
            classname = quoteattr(f"{self.pipeline}.{self.stage}")
            for line in self.results_lines():
                _junit_case(out, orjson.loads(line), classname)
            out.write(b"</testsuite>\n</testsuites>\n")

    def save_baseline(self, folder: Path) -> None:
        """Keep each case's status (results.jsonl) and the summary, for a later --baseline."""
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "results.jsonl") as out:
            for line in self.results_lines():
                result = orjson.loads(line)
                out.write(orjson.dumps({"id": result["id"], "status": result["status"]})
                          + b"\n")
        write_atomic(folder / "summary.json",
                     orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2))


def _junit_case(out: IO[bytes], result: dict[str, Any], classname: str) -> None:
    head = f"<testcase classname={classname} name={quoteattr(str(result['id']))}"
    status = result["status"]
    if status == "passed":
        out.write(f"{head}/>\n".encode())
        return
    if status == "error":
        body = (f"<error message={quoteattr(str(result.get('error'))[:500])} "
                f'type="pipeline"/>')
    else:
        lines = [f"{f['assertion']}: expected {f['expected']!r}, got {f['got']!r}"
                 + (f" ({f['reason']})" if f.get("reason") else "")
                 for f in result.get("failures", ())]
        message = lines[0] if lines else "failed"
        if status == "flaky":
            message = f"flaky: passed {result.get('passes')} of {result.get('runs')}: {message}"
        body = (f"<failure message={quoteattr(message[:500])} type=\"assertion\">"
                f"{escape(chr(10).join(lines))}</failure>")
    out.write(f"{head}>{body}</testcase>\n".encode())


class Baseline:
    """The statuses of a saved baseline, read along with the cases: in the same order, so
    only the few read ahead of a mismatch are held."""

    def __init__(self, folder: Path):
        self.folder = folder
        path = folder / "results.jsonl"
        try:
            self.file: IO[bytes] | None = open(path, "rb")
        except OSError as e:
            from ..config import ConfigError

            raise ConfigError(f"--baseline {folder}: cannot read {path}: "
                              f"{e.strerror or e}") from None
        self.ahead: dict[Any, str] = {}

    def status(self, case_id: Any) -> str | None:
        if case_id in self.ahead:
            return self.ahead.pop(case_id)
        while self.file is not None:
            line = self.file.readline()
            if not line:
                self.file.close()
                self.file = None
                break
            entry = orjson.loads(line)
            if entry.get("id") == case_id:
                return entry.get("status")
            self.ahead[entry.get("id")] = entry.get("status")
        return None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def percentiles(values: list[float] | Any) -> tuple[float, float] | None:
    """p50 and p95 (nearest rank) of latencies."""
    if not len(values):
        return None
    ordered = sorted(values)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return round(rank(0.5), 2), round(rank(0.95), 2)
