"""The test bench (DESIGN.md, "Test bench"): `chunbot test` runs a pipeline over test cases
in a workdir of their own and checks each case's output record.

- assertions.py: the assertion kinds, read from `tests:` and each case's `expect`, and the
  check of one against an output record;
- validate.py: one cheap pass over the cases before any request, refusing a test that
  checks nothing (no assertion, a bad `expect`, a field no output record has);
- judges.py: `judge` assertions, asked of an LLM as one more resumable, cached run;
- report.py: per-case results, their tally, the JSON report, JUnit XML and baselines;
- bench.py: all of it in order — the pipeline once per repeat, the judges, and the walk
  that checks every case shard by shard, in constant memory.
"""

from .assertions import (Assertion, AssertionSpecError, Outcome, case_assertions, check,
                         parse_assertion)
from .bench import ComeBackLater, TestOptions, run_tests
from .report import Report

__all__ = ["Assertion", "AssertionSpecError", "ComeBackLater", "Outcome", "Report",
           "TestOptions", "case_assertions", "check", "parse_assertion", "run_tests"]
