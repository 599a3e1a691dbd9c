"""The `chunbot` command: a thin typer layer over config, engine and progress.

It maps outcomes to the exit codes of DESIGN.md: 0 done, 1 some records failed,
2 usage or configuration error (nothing run), 75 try again later (lock held).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, TextIO

import typer

from . import __version__, config, engine
from .progress import make_progress
from .sinks import JsonLinesOut
from .store import CorruptState, Workdir

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stream JSONL records through LLM stages described in YAML.")
sim_app = typer.Typer(no_args_is_help=True, help="The simulated model, as a server.")
app.add_typer(sim_app, name="sim")
cache_app = typer.Typer(no_args_is_help=True, help="The local response cache.")
app.add_typer(cache_app, name="cache")


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class Mode(str, Enum):
    realtime = "realtime"
    batch = "batch"


class Order(str, Enum):
    completion = "completion"
    input = "input"


class Storage(str, Enum):
    disk = "disk"
    memory = "memory"


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class Malformed(str, Enum):
    not_json = "not-json"
    no_choices = "no-choices"


def _fail(message: str, code: int) -> typer.Exit:
    print(f"chunbot: {message}", file=sys.stderr)
    return typer.Exit(code)


def _usage_error(error: Exception, pipeline: config.Pipeline | None) -> typer.Exit:
    """Exit 2 with the error's message. A corrupt state.json's advice says the cache keeps
    the replies only when the pipeline has a response cache: without one, starting afresh
    asks every model again."""
    if isinstance(error, CorruptState):
        cached = pipeline is not None and pipeline.cache.enabled and any(
            s.kind == "llm" and s.cache for s in pipeline.stages)
        return _fail(error.advice(cached), engine.EXIT_USAGE)
    return _fail(str(error), engine.EXIT_USAGE)


def _check_rerun(pipeline: config.Pipeline, options: engine.RunOptions) -> None:
    """Refuse to rerun a stage that has not run: there is nothing to redo or to keep in
    `<stage>.prev/`, and `--failed` would send every record, not the failed ones."""
    engine.selected_stages(pipeline, options)  # an unknown stage, --failed on a filter: first
    if options.rerun not in Workdir(pipeline.workdir, pipeline.compress).load_state().stages:
        raise config.ConfigError(f"stage {options.rerun!r} has not run yet: there is nothing "
                                 f"to rerun; `chunbot run {pipeline.path}` runs it")


def _announce_stdin(pipeline: config.Pipeline) -> None:
    """Reading stdin from a terminal looks like a hang: say once what is awaited."""
    if pipeline.input == "-" and sys.stdin is not None and os.isatty(0):
        print("chunbot: reading JSONL records from stdin (Ctrl-D to end)…", file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        print(f"chunbot {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    pass


def _keep_freed_memory() -> None:
    """Tell glibc's malloc to keep freed memory instead of returning it to the kernel.

    Each shard allocates and frees buffers of megabytes; by default glibc unmaps them
    each time and the next shard pays ~10,000 page faults for them again (measured: 235k
    faults and 0.57 s of system time for 200k records, 35k and 0.21 s with this).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def _collect_garbage_rarely() -> None:
    """Run the cycle collector far less often than Python's default.

    A run keeps whole shards of records and traces alive, and the default thresholds
    make the collector walk them over and over: measured on 20,000 HTTP requests, 30% of
    the client's CPU went to it. chunbot's own data holds no reference cycles."""
    gc.freeze()  # what was loaded at start-up lives as long as the process
    gc.set_threshold(100_000, 50, 1000)


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
    stage: Optional[str] = typer.Option(None, help="Run only this stage (its upstream must be done)."),
    until: Optional[str] = typer.Option(None, help="Run the stages up to and including this one."),
    limit: Optional[int] = typer.Option(None, min=0, help="Only the first N input lines."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of the live display."),
    log_format: LogFormat = typer.Option(LogFormat.text, help="text, or json for log shippers."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the response cache."),
    refresh_cache: bool = typer.Option(False, "--refresh-cache",
                                       help="Send every request again and store the new replies."),
    mode: Optional[Mode] = typer.Option(None, help="realtime or batch for every LLM stage, "
                                                   "whatever the YAML says."),
    wait: bool = typer.Option(False, "--wait", help="Batch mode: poll until every batch is "
                                                    "done instead of exiting 75."),
    input: Optional[str] = typer.Option(None, "--input", help="Read this file, glob, folder "
                                        "or - (stdin) instead of the pipeline's input."),
    workdir: Optional[Path] = typer.Option(None, help="Keep the run here instead of the "
                                           "pipeline's workdir."),
    stream: bool = typer.Option(False, "--stream", help="Write the last stage's records to "
                                "stdout as JSON lines as they finish (all of them: those "
                                "done before too); logs and progress go to stderr."),
    order: Order = typer.Option(Order.completion, help="--stream: as they finish "
                                "(completion), or held back into input order."),
    storage: Storage = typer.Option(Storage.disk, help="memory: keep nothing under the "
                                    "workdir and compute every stage (the cache still "
                                    "answers); implies --stream."),
    errors: Optional[Path] = typer.Option(None, "--errors", help="--storage memory: write "
                                          "failed records here as JSON lines (default: "
                                          "stderr)."),
    executor: Optional[Executor] = typer.Option(None, help="Where shard jobs run: local, or "
                                                "ray (pip install 'chunbot[ray]'); default: "
                                                "the pipeline's `executor:`."),
    ray_address: Optional[str] = typer.Option(None, help="--executor ray: join this cluster "
                                              "(auto or HOST:PORT); without it a local Ray "
                                              "is started."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", min=0, metavar="USD",
                                             help="Send no request that would take what "
                                             "the output has cost past USD; exit 75 there "
                                             "(a run with a higher cap goes on)."),
) -> None:
    """Run the pipeline, or resume it: only stale stages and unfinished shards are computed."""
    if no_cache and refresh_cache:
        raise _fail("use --no-cache or --refresh-cache, not both", engine.EXIT_USAGE)
    if errors is not None and storage is not Storage.memory:
        raise _fail("--errors is for --storage memory; a run on disk keeps failed records "
                    "in <workdir>/<stage>/errors.jsonl", engine.EXIT_USAGE)
    _execute(pipeline, engine.RunOptions(stage=stage, until=until, limit=limit,
                                         cache="off" if no_cache else "refresh" if refresh_cache
                                         else "use", mode=mode.value if mode else None,
                                         wait=wait, storage=storage.value, order=order.value,
                                         executor=executor.value if executor else
                                         "ray" if ray_address else None,
                                         ray_address=ray_address, max_cost=max_cost),
             quiet, log_format, input, workdir, stream or storage is Storage.memory, errors)


def _execute(pipeline: Path, options: engine.RunOptions, quiet: bool,
             log_format: LogFormat, input: str | None = None,
             workdir: Path | None = None, stream: bool = False,
             errors: Path | None = None) -> None:
    """Run or rerun, and leave with the exit code DESIGN.md gives."""
    _keep_freed_memory()
    _collect_garbage_rarely()
    output = error_file = loaded = None
    try:
        loaded = config.load(pipeline)
        if input is not None or workdir is not None:  # paths given here are the shell's
            loaded = dataclasses.replace(loaded, input=loaded.input if input is None else input,
                                         workdir=loaded.workdir if workdir is None else workdir)
        if options.rerun:
            _check_rerun(loaded, options)
        _announce_stdin(loaded)
        if stream:
            output = JsonLinesOut(sys.stdout.buffer)
        failed = None
        if options.storage == "memory":
            try:
                error_file = open(errors, "wb") if errors is not None else None
            except OSError as e:
                raise _fail(f"--errors {errors}: {e.strerror or e}", engine.EXIT_USAGE) from None
            failed = _error_lines(error_file or sys.stderr.buffer)
        try:
            report = engine.run(loaded, options, make_progress(quiet, log_format.value),
                                output, failed)
        finally:  # the run has said how it ended: a late signal must not end it otherwise
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
    except (config.ConfigError, engine.InputError, engine.StoreError) as e:
        raise _usage_error(e, loaded) from None
    except engine.Locked as e:
        raise _fail(str(e), engine.EXIT_LATER) from None
    except engine.Interrupted as e:
        if e.signum == signal.SIGPIPE:  # what stdout still buffers goes nowhere, instead
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # of failing at exit
            # the reader chose to stop (`| head`): leave without a word, as `yes | head`
            # does; state.json says how the run ended and the next run resumes anyway
            raise typer.Exit(e.exit_code) from None
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:  # before the run had started
        raise _fail("interrupted; nothing was run", 130) from None
    finally:
        if error_file is not None:
            error_file.close()
    raise typer.Exit(report.exit_code)


def _error_lines(stream: BinaryIO) -> Callable[[dict], None]:
    """Failed records as JSON lines (what errors.jsonl would hold), flushed one by one."""
    import orjson

    from .store import printable

    def write(error: dict) -> None:
        try:
            line = orjson.dumps(error)
        except TypeError:
            line = orjson.dumps(printable(error))
        stream.write(line + b"\n")
        stream.flush()

    return write


@app.command()
def rerun(
    pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
    stage: str = typer.Option(..., help="The stage to recompute."),
    only: bool = typer.Option(False, "--only", help="Not the stages downstream of it."),
    failed: bool = typer.Option(False, "--failed", help="Only the records in its errors.jsonl."),
    ids: Optional[Path] = typer.Option(None, help="Only the records whose ids this file lists, "
                                                  "one per line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of the live display."),
    log_format: LogFormat = typer.Option(LogFormat.text, help="text, or json for log shippers."),
) -> None:
    """Recompute a stage (asking its models again) and what follows it; the previous output
    stays in <stage>.prev/ for `chunbot diff`."""
    if failed and ids is not None:
        raise _fail("use --failed or --ids, not both", engine.EXIT_USAGE)
    wanted = None
    if ids is not None:
        try:
            wanted = frozenset(line.strip() for line in ids.read_text().splitlines()
                               if line.strip())
        except OSError as e:
            raise _fail(f"--ids {ids}: {e.strerror or e}", engine.EXIT_USAGE) from None
    _execute(pipeline, engine.RunOptions(rerun=stage, rerun_only=only, rerun_failed=failed,
                                         rerun_ids=wanted), quiet, log_format)


@app.command()
def test(
    pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
    cases: Path = typer.Option(..., help="The test cases: JSONL records, each with an "
                                         "optional `expect` object."),
    stage: Optional[str] = typer.Option(None, help="Check this stage's output (default: the "
                                                   "last stage's)."),
    limit: Optional[int] = typer.Option(None, min=0, help="Only the first N cases."),
    repeat: int = typer.Option(1, min=1, max=1000, help="Run every case N times, with fresh "
                               "samples; cases that pass and fail are listed as flaky."),
    baseline: Optional[Path] = typer.Option(None, help="Compare with the results saved by "
                                            "--save-baseline: exit 1 on any regression."),
    save_baseline: Optional[Path] = typer.Option(None, help="Keep each case's result in "
                                                 "this folder, for a later --baseline."),
    fail_under: Optional[float] = typer.Option(None, min=0, max=1, help="Exit 1 only when "
                                               "the pass rate is below R (0 to 1)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the whole report "
                                                                  "here as JSON."),
    junit: Optional[Path] = typer.Option(None, help="Write JUnit XML here, for CI systems."),
    wait: bool = typer.Option(False, help="Batch-mode stages: wait for their batches "
                                          "instead of exiting 75."),
    retry_errors: bool = typer.Option(False, help="Send the records that failed in earlier "
                                                  "test runs (errors) again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of the live display."),
) -> None:
    """Run the pipeline over test cases in its own workdir (<workdir>/tests/<cases>/) and
    check each case's output against the pipeline's `tests:` and the case's `expect`."""
    from . import testbench

    _keep_freed_memory()
    _collect_garbage_rarely()
    again = f"chunbot test {pipeline} --cases {cases}" + (f" --stage {stage}" if stage else "")
    options = testbench.TestOptions(stage=stage, limit=limit, repeat=repeat, baseline=baseline,
                                    wait=wait, retry_errors=retry_errors,
                                    again=f"{again} --retry-errors")
    try:
        report = testbench.run_tests(config.load(pipeline), str(cases), options,
                                     make_progress(quiet, "text"))
    except (config.ConfigError, engine.InputError, engine.StoreError) as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None
    except (engine.Locked, testbench.ComeBackLater) as e:
        raise _fail(str(e), engine.EXIT_LATER) from None
    except engine.Interrupted as e:
        raise _fail(str(e), e.exit_code) from None
    try:
        if json_file is not None:
            report.write_json(json_file)
        if junit is not None:
            report.write_junit(junit)
        if save_baseline is not None:
            report.save_baseline(save_baseline)
    except OSError as e:
        raise _fail(f"{e.filename}: {e.strerror or e}", engine.EXIT_USAGE) from None
    print(_test_summary(report, pipeline), file=sys.stderr)
    raise typer.Exit(engine.EXIT_OK if report.ok(fail_under) else engine.EXIT_FAILED)


def _test_summary(report: "testbench.Report", pipeline: Path) -> str:  # noqa: F821
    from .testbench.report import wilson

    t = report.tally
    low, high = wilson(t.run_passes, t.runs)
    runs = f" over {t.runs:,} runs" if report.repeat > 1 else ""
    flaky = f", flaky {t.flaky:,}" if report.repeat > 1 else ""
    lines = [f"cases {t.cases:,}: passed {t.passed:,}, failed {t.failed:,}{flaky}, errors "
             f"{t.errors:,}; pass rate {100 * t.pass_rate:.1f}%{runs} (95% {100 * low:.1f}–"
             f"{100 * high:.1f}%)"]
    for label, (passed, checked) in t.assertions.items():
        lines.append(f"  {label}: {passed:,} of {checked:,} ({100 * passed / checked:.1f}%)")
        stats = t.categorical.get(label)
        if stats is not None and stats.categorical and stats.top_confusions():
            shown = ", ".join(f"{a} → {b} {n:,}" for a, b, n in stats.top_confusions(3))
            lines.append(f"    top confusions (expected → got): {shown}")
    u = report.usage
    spent = (f"requests {u.requests:,} (and {u.cache_hits:,} from the cache), tokens "
             f"{u.tokens_in:,} in + {u.tokens_out:,} out")
    if u.cost:
        spent += f", ${u.cost:,.4f}"
    if report.latency_ms:
        spent += f"; latency p50 {report.latency_ms[0]:,.0f} ms, p95 {report.latency_ms[1]:,.0f} ms"
    lines.append(f"  {spent}")
    if report.judges.requests or report.judges.tokens_in:
        j = report.judges
        lines.append(f"  judges: requests {j.requests:,}, tokens {j.tokens_in:,} in + "
                     f"{j.tokens_out:,} out" + (f", ${j.cost:,.4f}" if j.cost else ""))
    for n, (case_id, outcome) in enumerate(t.failures):
        why = f" ({outcome.reason})" if outcome.reason else ""
        lines.append(f"  FAIL {case_id}: {outcome.assertion.label}: expected "
                     f"{_clip(outcome.expected)}, got {_clip(outcome.got)}{why}")
        if n + 1 == len(t.failures) or t.failures[n + 1][0] != case_id:
            lines.append(f"       {report.trace_command(pipeline, case_id)}")
    lines += [f"  ERROR {case_id}: {error}" for case_id, error in t.error_cases]
    lines += [f"  FLAKY {case_id}: passed {passes} of {runs}"
              for case_id, passes, runs in t.flaky_cases]
    if report.baseline is not None:
        lines.append(f"  against {report.baseline}: {t.regressions:,} regressions, "
                     f"{t.improvements:,} improvements, {t.new_cases:,} new cases")
        lines += [f"  REGRESSED {case_id}" for case_id in t.regressed[:20]]
        lines += [f"  IMPROVED {case_id}" for case_id in t.improved[:20]]
    lines.append(f"  results: {report.results}")
    return "\n".join(lines)


def _clip(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command()
def estimate(pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
             limit: Optional[int] = typer.Option(None, min=0, help="Only the first N input "
                                                 "lines, as `run --limit N`."),
             as_json: bool = typer.Option(False, "--json", help="One JSON object, for scripts.")
             ) -> None:
    """Tokens and cost per stage and model that a run would spend now; sends nothing."""
    from . import estimator

    try:
        result = estimator.estimate(config.load(pipeline), limit)
    except (config.ConfigError, engine.InputError, engine.StoreError) as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None
    if as_json:
        import orjson

        print(orjson.dumps(result.to_json()).decode())
    else:
        print(estimator.render(result))


@app.command()
def cancel(pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
           stage: Optional[str] = typer.Option(None, help="Only this stage's batches.")) -> None:
    """Cancel the provider batches a pipeline waits for (batch mode). A later `run` collects
    what they finished and sends the rest again."""
    try:
        rows = engine.pending_batches(config.load(pipeline), stage, cancel=True)
    except config.ConfigError as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None
    except engine.Locked as e:
        raise _fail(str(e), engine.EXIT_LATER) from None
    for row in rows:
        print(f"{row['stage']} shard {row['shard']}: {row['batch']}: {row['status']}"
              + (f" ({row['error']})" if "error" in row else ""))
    if not rows:
        print("no pending batches")


@app.command()
def status(pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
           as_json: bool = typer.Option(False, "--json", help="One JSON object, for scripts.")
           ) -> None:
    """Per stage: fresh or stale and why, shards, records, tokens, cost; the last run."""
    from .lookback import status as lookback

    loaded = None
    try:
        loaded = config.load(pipeline)
        report = lookback.status(loaded)
        report["batches"] = engine.pending_batches(loaded)
    except (config.ConfigError, engine.StoreError) as e:
        raise _usage_error(e, loaded) from None
    if as_json:
        import orjson

        print(orjson.dumps(report).decode())
    else:
        print(lookback.render(report))


@app.command()
def trace(pipeline: Path = typer.Argument(..., help="The pipeline YAML file."),
          record_id: str = typer.Argument(..., help="The record's _id."),
          as_json: bool = typer.Option(False, "--json", help="One JSON object, for scripts."),
          workdir: Optional[Path] = typer.Option(None, help="Look in this workdir instead of "
                                                 "the pipeline's (a `chunbot test` one).")
          ) -> None:
    """One record through every stage: what went in, each request and reply, where it ended."""
    from .lookback import trace as lookback

    try:
        loaded = config.load(pipeline)
        if workdir is not None:
            loaded = dataclasses.replace(loaded, workdir=workdir)
        found = lookback.find(loaded, record_id)
    except (config.ConfigError, engine.StoreError) as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None
    if found is None:
        raise _fail(f"no record with _id {record_id!r} in {pipeline}'s runs", 1)
    if as_json or not sys.stdout.isatty():
        import orjson

        option = orjson.OPT_INDENT_2 if not as_json else 0
        print(orjson.dumps(found, option=option).decode())
        return
    lookback.show(found)


@app.command()
def diff(a: Path = typer.Argument(..., help="A JSONL file, shard or stage folder, or workdir."),
         b: Path = typer.Argument(..., help="The same kinds of thing as A."),
         key: str = typer.Option("_id", help="The field records are joined on."),
         fields: Optional[str] = typer.Option(None, help="Compare only these fields: a,b."),
         format: str = typer.Option("table", "--format", help="table, or jsonl: one line per "
                                                              "differing record."),
         limit: Optional[int] = typer.Option(None, help="At most N jsonl lines.")) -> None:
    """Compare two outputs joined on a key; exit 0 equal, 1 different, 2 error."""
    raise typer.Exit(show_diff(a, b, key, fields, format, limit))


def show_diff(a: str | Path, b: str | Path, key: str = "_id",
              fields: list[str] | str | None = None, format: str = "table",
              limit: int | None = None, out: TextIO | None = None) -> int:
    """Print the diff of A and B to `out`; return the exit code (0 equal, 1 different,
    2 error, with `chunbot: diff: <message>` on stderr).

    `fields`: names or "a,b"; `format`: "table" or "jsonl" (one line per differing record,
    at most `limit` lines; the counts and the exit code still cover every record).
    """
    from .lookback import diff as lookback

    def error(message: str) -> int:
        print(f"chunbot: diff: {message}", file=sys.stderr)
        return engine.EXIT_USAGE

    out = out if out is not None else sys.stdout
    if isinstance(fields, str):
        fields = [f.strip() for f in fields.split(",") if f.strip()]
        if not fields:
            return error("--fields: give field names separated by commas")
    if format not in ("table", "jsonl"):
        return error(f"--format {format!r}: use table or jsonl")
    if limit is not None and limit < 0:
        return error(f"--limit {limit}: must be 0 or more")
    broken = False
    result = None

    def write(difference: "lookback.Difference") -> None:
        nonlocal broken
        if broken:
            return
        try:
            out.write(difference.to_json().decode() + "\n")
        except BrokenPipeError:
            broken = True
            if out is sys.stdout:
                _silence_stdout()

    try:
        if format == "jsonl":
            result = lookback.diff(a, b, key, fields, limit=limit, on_difference=write)
            if not broken:
                out.flush()
            if limit is not None and result.differing > limit:
                print(f"chunbot: diff: {limit:,} of {result.differing:,} differing records "
                      "printed (--limit)", file=sys.stderr)
        else:
            result = lookback.diff(a, b, key, fields, limit=0)
            out.write(lookback.render_table(result))
            out.flush()
    except lookback.DiffError as e:
        return error(str(e))
    except BrokenPipeError:
        if out is sys.stdout:
            _silence_stdout()
        return result.exit_code if result is not None else 1
    return result.exit_code


def _silence_stdout() -> None:
    """After a broken pipe (`| head`), send the rest to /dev/null so exit is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@app.command()
def validate(pipeline: Path = typer.Argument(..., help="The pipeline YAML file.")) -> None:
    """Check a pipeline file without running anything (exit 2 when it has a mistake)."""
    try:
        loaded = config.load(pipeline)
    except config.ConfigError as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None
    from .check import field_warnings

    for warning in field_warnings(loaded):
        print(warning, file=sys.stderr)
    chain = " → ".join(f"{s.name} ({s.kind})" for s in loaded.stages)
    print(f"{pipeline}: ok: {chain}")


def _cache_spec(pipeline: Optional[Path]) -> config.CacheSpec:
    if pipeline is None:
        return config.CacheSpec()
    try:
        return config.load(pipeline).cache
    except config.ConfigError as e:
        raise _fail(str(e), engine.EXIT_USAGE) from None


_CACHE_OF = typer.Argument(None, help="Use this pipeline's cache settings (default: the "
                                      "SQLite cache in the user's cache folder).")


@cache_app.command("stats")
def cache_stats(pipeline: Optional[Path] = _CACHE_OF) -> None:
    """Entries and size of the cache, and the hits and misses of the last run that used it."""
    from .llm import cache

    try:
        found = cache.stats(_cache_spec(pipeline))
    except Exception as e:  # an unreachable Redis, an unreadable file
        raise _fail(f"cache: {type(e).__name__}: {e}", engine.EXIT_USAGE) from None
    print(f"cache:    {found.where}")
    print(f"entries:  {found.entries:,}")
    whole = " (the whole Redis server's memory)" if found.where.startswith("redis") else ""
    print(f"size:     {found.bytes / 1e6:,.1f} MB{whole}")
    last = found.last_run
    if last:
        asked = last["hits"] + last["misses"]
        share = f" ({100 * last['hits'] / asked:.1f}%)" if asked else ""
        print(f"last run: {last['hits']:,} hits{share}, {last['misses']:,} misses")


@cache_app.command("clear")
def cache_clear(pipeline: Optional[Path] = _CACHE_OF,
                older_than: Optional[str] = typer.Option(
                    None, help="Only replies older than this, e.g. 30d, 12h.")) -> None:
    """Remove cached replies (all of them, or those older than --older-than)."""
    from .llm import cache

    seconds = None
    if older_than is not None:
        seconds = config.parse_duration(older_than)
        if not seconds:
            raise _fail(f"--older-than {older_than!r}: give a duration such as 30d or 12h",
                        engine.EXIT_USAGE)
    try:
        removed = cache.clear(_cache_spec(pipeline), seconds)
    except Exception as e:  # an unreachable Redis, an unwritable file
        raise _fail(f"cache: {type(e).__name__}: {e}", engine.EXIT_USAGE) from None
    print(f"removed {removed:,} cached replies")


@sim_app.command()
def gen(records: int = typer.Option(..., min=1, help="How many cases."),
        hard: float = typer.Option(0.0, min=0, max=1, help="Share of cases the simulator "
                                   "labels wrongly (sarcasm, negations): a test of a sim "
                                   "pipeline passes 1 - HARD of them."),
        words: int = typer.Option(0, min=0, help="Pad each text to about this many words."),
        seed: int = typer.Option(0, help="The same seed gives the same cases.")) -> None:
    """Write synthetic review cases with a gold `label` to stdout, as JSON lines."""
    import orjson

    from .sim.cases import cases

    out = sys.stdout.buffer
    try:
        for case in cases(records, hard, seed, words):
            out.write(orjson.dumps(case, option=orjson.OPT_APPEND_NEWLINE))
        out.flush()
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@sim_app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8765, min=0, max=65535, help="Port; 0 picks a free one."),
    latency_ms: float = typer.Option(0.0, min=0, help="Delay before each answer."),
    jitter_ms: float = typer.Option(0.0, min=0, help="Uniform ± jitter on the delay."),
    error_rate: float = typer.Option(0.0, min=0, max=1, help="Share of requests answered 500/503."),
    wrong_rate: float = typer.Option(0.0, min=0, max=1, help="Share of --wrong-model's first "
                                     "answers that are wrong (a label that is not the right "
                                     "one, a JSON object missing a key); right when asked "
                                     "again after its own reply."),
    wrong_model: str = typer.Option("sim-small", help="The model --wrong-rate applies to."),
    flaky_rate: float = typer.Option(0.0, min=0, max=1, help="Share of answers that are "
                                     "wrong at random, a fresh draw each time (as sampling "
                                     "makes them): what `chunbot test --repeat` finds flaky."),
    rpm: Optional[int] = typer.Option(None, min=1, help="Requests per minute, then 429."),
    tpm: Optional[int] = typer.Option(None, min=1,
                                      help="Tokens per minute (prompt + max_tokens), then 429."),
    api_key: Optional[str] = typer.Option(None, help="Require this key, else 401."),
    malformed: Optional[Malformed] = typer.Option(None, help="Answer 200s with broken bodies."),
    seed: Optional[int] = typer.Option(None, help="Seed of the injected errors and jitter, "
                                       "and of which batch items error or expire."),
    batch_delay_s: float = typer.Option(2.0, min=0, help="Seconds from a batch's creation "
                                        "to its end (every vendor's batch API)."),
    batch_error_rate: float = typer.Option(0.0, min=0, max=1,
                                           help="Share of batch items that come back errored."),
    batch_expire_rate: float = typer.Option(0.0, min=0, max=1,
                                            help="Share of batch items that expire."),
    hang_rate: float = typer.Option(0.0, min=0, max=1,
                                    help="Share of requests accepted and never answered: held "
                                    "until the client gives up (an hour at most), then the "
                                    "connection is dropped; drawn with --seed; 'hung' in "
                                    "/stats."),
    fail_prompt: Optional[str] = typer.Option(None, help="Answer 500 (the vendor's error body) "
                                              "to every request whose messages contain this "
                                              "text, every time: a poisoned record; "
                                              "'poisoned' in /stats."),
    storm_s: float = typer.Option(0.0, min=0, help="A rate-limit storm: for this many seconds "
                                  "from the first chat/messages request, answer every one 429 "
                                  "with retry-after."),
    storm_retry_after: int = typer.Option(1, min=0, help="The retry-after (seconds) of the "
                                          "storm's 429s; retry-after-ms says the same."),
    block_prompt: Optional[str] = typer.Option(None, help="Refuse every request whose "
                                               "messages contain this text as the vendor's "
                                               "safety filter does (200: Gemini's SAFETY, "
                                               "OpenAI's content_filter, Anthropic's refusal); "
                                               "'blocked' in /stats."),
    authorization: Optional[str] = typer.Option(None, help="Require this exact "
                                                "Authorization header on every model and "
                                                "batch request (e.g. 'Basic YWxpY2U6cHc=', "
                                                "what http://alice:pw@… sends), else 401."),
    echo_authorization: bool = typer.Option(False, help="Quote the Authorization header a "
                                            "request carried in its error bodies, as a "
                                            "misconfigured proxy does: to check a client "
                                            "masks it."),
) -> None:
    """Serve the sim model over HTTP: OpenAI, Anthropic and Gemini routes, plus /stats."""
    from .sim import server  # aiohttp.web is only needed here: keep the other commands' start fast
    from .sim.faults import Options

    for hint, text in (("--fail-prompt", fail_prompt), ("--block-prompt", block_prompt)):
        if text == "":
            raise typer.BadParameter("must not be empty", param_hint=hint)
    server.serve(Options(host=host, port=port, latency_ms=latency_ms, jitter_ms=jitter_ms,
                         error_rate=error_rate, wrong_rate=wrong_rate,
                         wrong_model=wrong_model, flaky_rate=flaky_rate, rpm=rpm, tpm=tpm, api_key=api_key,
                         malformed=malformed.value if malformed else None, seed=seed,
                         batch_delay_s=batch_delay_s, batch_error_rate=batch_error_rate,
                         batch_expire_rate=batch_expire_rate, hang_rate=hang_rate,
                         fail_prompt=fail_prompt, storm_s=storm_s,
                         storm_retry_after=storm_retry_after, block_prompt=block_prompt,
                         authorization=authorization, echo_authorization=echo_authorization))


def main() -> None:
    app()
