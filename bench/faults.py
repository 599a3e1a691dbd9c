"""Fault benchmark: how long chunbot takes, and whether it loses records, when the server
misbehaves (random 5xx, a storm of 429s, requests that never come back, a poisoned record).

N records (3,000 by default, `--records`) of short review texts (~150 characters, each
different) go through a pipeline with one LLM stage: provider `openai`, `model: sim-small`,
`base_url` the URL of a `chunbot sim serve --port 0` + "/v1", prompt "Label the sentiment
(positive/negative/neutral): {{ text }}", `params: {max_tokens: 16}`, `cache: false` (every
run really sends its requests), nothing about concurrency, retries or limits. Every scenario
gets a fresh sim (`--latency-ms 50 --seed 1` plus its faults) and a fresh workdir:

  clean     no faults: the reference
  err10     --error-rate 0.1   (10% of requests answered 500 or 503 at random)
  err30     --error-rate 0.3
  storm20   --storm-s 20       (for 20 s from the first request, every one gets 429 with
                                retry-after: 1)
  hang5     --hang-rate 0.05   (5% of requests are never answered); the model alias has
                                `timeout: 5s` in this scenario only
  poison    --fail-prompt TEXT, TEXT the text of exactly one record among 800 records
                                (that record gets 500 every time it is sent)

For each run: wall seconds of `chunbot run p.yaml --quiet` (start to exit), its exit code,
the records in the output (the stage's part-*.jsonl files, not *.trace.jsonl) and in its
errors.jsonl, what the sim saw (GET /stats after the run: requests, by status, hung,
poisoned), requests per record, and the wall time over the clean run's (the median of the
clean runs with --repeat). A run still going after 180 s is killed and reported as TIMEOUT.

Targets (PASS/FAIL): err10 <= 1.5 x clean; err30 <= 2.5 x clean; nothing lost (every
record in the output) in every scenario but poison; poison: exactly one record fails (in
errors.jsonl, every other one in the output) and the run takes under 30 s.

    .venv/bin/python bench/faults.py                          # all scenarios, ~2-4 minutes
    .venv/bin/python bench/faults.py --scenarios clean,err10  # some of them
    .venv/bin/python bench/faults.py --repeat 3               # each scenario 3 times

The script itself uses the standard library only; chunbot and the sim run as
`.venv/bin/python -m chunbot_cli` (this interpreter when there is no .venv). Everything it
writes goes under bench/out/faults/ (gitignored): data, one folder per run with its
pipeline and workdir, and logs/ (chunbot's and the sim's stderr, the sim's /stats as JSON).
Only loopback addresses are used; every process it starts is killed before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "faults"
LOGS = WORK / "logs"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CHUNBOT = [str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)), "-m",
           "chunbot_cli"]
RUN_TIMEOUT_S = 180  # a chunbot run still going after this is killed: TIMEOUT
START_TIMEOUT_S = 30  # for the sim to listen
LATENCY_MS = 50
SEED = 1
POISON_RECORDS = 800
HANG_TIMEOUT = "5s"
STAGE = "sentiment"
NAME = "faults"
TARGET_ERR10 = 1.5  # x clean
TARGET_ERR30 = 2.5
TARGET_POISON_S = 30.0

PIPELINE = """\
name: {name}
input: {input}
id_field: id
cache: false
models:
  simhttp: {{provider: openai, model: sim-small, base_url: "{base_url}"{extra}}}
stages:
  - name: {stage}
    model: simhttp
    prompt: "Label the sentiment (positive/negative/neutral): {{{{ text }}}}"
    params: {{max_tokens: 16}}
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    flags: tuple[str, ...]  # the sim's, beyond --latency-ms and --seed
    note: str
    timeout: str | None = None  # the model alias's `timeout`
    poison: bool = False


SCENARIOS = {s.name: s for s in [
    Scenario("clean", (), "no faults"),
    Scenario("err10", ("--error-rate", "0.1"), "10% random 500/503"),
    Scenario("err30", ("--error-rate", "0.3"), "30% random 500/503"),
    Scenario("storm20", ("--storm-s", "20"), "429 + retry-after: 1 for 20 s from the first "
             "request"),
    Scenario("hang5", ("--hang-rate", "0.05"), "5% of requests never answered; model alias "
             f"timeout: {HANG_TIMEOUT}", timeout=HANG_TIMEOUT),
    Scenario("poison", (), "--fail-prompt = the text of one record: 500 every time",
             poison=True),
]}

PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor",
            "keyboard", "tent", "vacuum cleaner", "hair dryer", "electric toothbrush"]
SENTENCES = [
    "Solid build, does what the box promises.",
    "The lid is stiff and the handle gets warm.",
    "Confusing instructions and a damaged box.",
    "Support answered quickly and offered a discount.",
    "Louder than I expected.",
    "Fair price, long enough cord.",
    "It broke after a month.",
    "Easy to clean, love it.",
    "Terrible smell out of the box.",
    "Great value, works perfectly.",
    "The color differs from the photos.",
    "Shipping was slow.",
]


def generate(path: Path, count: int) -> list[str]:
    """Write `count` records (id, rating, a short review text); returns their texts."""
    rng = random.Random(17)
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            product = rng.choice(PRODUCTS)
            text = (f"Order {i}: I bought this {product} {rng.randint(2, 30)} days ago. "
                    + " ".join(rng.sample(SENTENCES, 2)))
            texts.append(text)
            f.write(json.dumps({"id": f"r{i:06d}", "rating": rng.randint(1, 5),
                                "text": text}) + "\n")
    return texts


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["XDG_CACHE_HOME"] = str(WORK / "xdg-cache")  # unused (cache: false), kept apart
    environment.pop("CHUNBOT_LOG_INTERVAL", None)
    return environment


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; the process group (start_new_session) as a whole."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


@contextmanager
def sim_server(flags: list[str], log: Path) -> Iterator[str]:
    """`chunbot sim serve --port 0 FLAGS`; yields its base URL (http://127.0.0.1:PORT)."""
    with open(log, "w") as err:
        process = subprocess.Popen([*CHUNBOT, "sim", "serve", "--host", "127.0.0.1",
                                    "--port", "0", *flags], cwd=WORK, env=env(),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=err, text=True, start_new_session=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            raise RuntimeError(f"the sim did not start ({line.strip()!r}; see {log})")
        yield match.group(1)
    finally:
        stop(process)
        process.stdout.close()


def sim_stats(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/stats", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError) as e:
        return {"error": str(e)}


@dataclass
class Run:
    scenario: Scenario
    label: str
    records: int
    wall_s: float = 0.0
    code: int | None = None  # None: TIMEOUT
    output: int = 0
    errors: int = 0
    failed_ids: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    log: Path | None = None

    @property
    def timed_out(self) -> bool:
        return self.code is None

    @property
    def requests(self) -> int | None:
        value = self.stats.get("requests")
        return value if isinstance(value, int) else None

    @property
    def lost(self) -> int:
        return self.records - self.output


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_output(workdir: Path, run: Run) -> None:
    stage = workdir / STAGE
    run.output = sum(count_lines(part) for part in sorted(stage.glob("part-*.jsonl"))
                     if not part.name.endswith(".trace.jsonl"))
    errors = stage / "errors.jsonl"
    if errors.exists():
        for line in errors.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            run.errors += 1
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            record = entry.get("record") if isinstance(entry.get("record"), dict) else {}
            found = entry.get("_id", entry.get("id", record.get("_id", record.get("id"))))
            if found is not None:
                run.failed_ids.append(str(found))


def run_scenario(scenario: Scenario, label: str, data: Path, records: int,
                 fail_prompt: str | None) -> Run:
    """A fresh sim and a fresh folder; `chunbot run p.yaml --quiet` against them."""
    run = Run(scenario, label, records)
    folder = WORK / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    flags = ["--latency-ms", str(LATENCY_MS), "--seed", str(SEED), *scenario.flags]
    if fail_prompt is not None:
        flags += ["--fail-prompt", fail_prompt]
    run.log = LOGS / f"{label}.err"
    print(f"  {label:<10} {records:,} records, sim {' '.join(scenario.flags) or '(no faults)'}"
          + (" --fail-prompt '…'" if fail_prompt else "")
          + (f", model timeout {scenario.timeout}" if scenario.timeout else "")
          + " ...", end="", flush=True)
    with sim_server(flags, LOGS / f"{label}.sim.err") as url:
        extra = f", timeout: {scenario.timeout}" if scenario.timeout else ""
        (folder / "p.yaml").write_text(PIPELINE.format(name=NAME, input=data, stage=STAGE,
                                                       base_url=url + "/v1", extra=extra))
        with open(run.log, "w") as err:
            started = time.perf_counter()
            process = subprocess.Popen([*CHUNBOT, "run", "p.yaml", "--quiet"], cwd=folder,
                                       env=env(), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True)
            try:
                run.code = process.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                run.code = None
            finally:  # too slow, or Ctrl-C: never leave chunbot running
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait(timeout=30)
            run.wall_s = time.perf_counter() - started
        run.stats = sim_stats(url)
    (LOGS / f"{label}.stats.json").write_text(json.dumps(run.stats, indent=1))
    read_output(folder / "runs" / NAME, run)
    print(f" {run.wall_s:.1f} s, " + ("TIMEOUT" if run.timed_out else f"exit {run.code}")
          + f", {run.output:,} out, {run.errors:,} errors", flush=True)
    return run


def fmt(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def by_status(stats: dict[str, Any]) -> str:
    statuses = stats.get("by_status")
    if not isinstance(statuses, dict):
        return "–"
    return " ".join(f"{status}:{n}" for status, n in statuses.items()) or "none"


def print_table(runs: list[Run], clean_s: float | None) -> None:
    headers = ["scenario", "records", "wall s", "exit", "output", "errors", "sim requests",
               "by status", "hung", "poisoned", "req/record", "x clean"]
    table = []
    for r in runs:
        requests = r.requests
        table.append([r.label, fmt(r.records), fmt(r.wall_s, 1),
                      "TIMEOUT" if r.timed_out else str(r.code), fmt(r.output),
                      fmt(r.errors), fmt(requests), by_status(r.stats),
                      fmt(r.stats.get("hung")), fmt(r.stats.get("poisoned")),
                      f"{requests / r.records:.2f}" if requests is not None else "–",
                      f"{r.wall_s / clean_s:.2f}" if clean_s else "–"])
    widths = [max(len(row[i]) for row in [headers, *table]) for i in range(len(headers))]
    left = {0, 7}
    for row in [headers, *table]:
        print("  " + "  ".join(v.ljust(w) if i in left else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_targets(runs: list[Run], clean_s: float | None, poisoned_id: str | None) -> None:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.scenario.name, []).append(r)

    def median_wall(group: list[Run]) -> float:
        return statistics.median(r.wall_s for r in group)

    for name, limit in (("err10", TARGET_ERR10), ("err30", TARGET_ERR30)):
        group = groups.get(name)
        if group is None:
            continue
        line = f"  {name}: wall <= {limit} x clean"
        if not clean_s:
            print(f"{line}  –  no clean run to compare with")
            continue
        ratio = median_wall(group) / clean_s
        timeouts = sum(r.timed_out for r in group)
        print(f"{line}  {verdict(ratio <= limit and not timeouts)}  {ratio:.2f} x "
              f"({median_wall(group):.1f} s vs {clean_s:.1f} s)"
              + (f"; {timeouts} TIMEOUT" if timeouts else ""))

    for name, group in groups.items():
        if name == "poison":
            continue
        lost = [r for r in group if r.output != r.records or r.timed_out]
        detail = "; ".join(
            f"{r.label}: {r.output:,} of {r.records:,} in the output, {r.errors:,} in "
            f"errors.jsonl" + (", TIMEOUT" if r.timed_out else f", exit {r.code}")
            for r in (lost or group[:1]))
        print(f"  {name}: nothing lost  {verdict(not lost)}  {detail}")

    for r in groups.get("poison", []):
        one = r.errors == 1 and r.output == r.records - 1 and not r.timed_out
        which = (f", the poisoned record {poisoned_id}" if r.failed_ids == [poisoned_id]
                 else f", failed: {', '.join(r.failed_ids[:5]) or 'none'}"
                 + (" …" if len(r.failed_ids) > 5 else ""))
        one = one and r.failed_ids in ([], [poisoned_id])
        print(f"  {r.label}: exactly one record fails  {verdict(one)}"
              f"  {r.errors:,} in errors.jsonl, {r.output:,} of {r.records:,} in the output"
              + which + (", TIMEOUT" if r.timed_out else f", exit {r.code}"))
        fast = r.wall_s < TARGET_POISON_S and not r.timed_out
        print(f"  {r.label}: under {TARGET_POISON_S:.0f} s  {verdict(fast)}  "
              f"{r.wall_s:.1f} s" + (" (TIMEOUT)" if r.timed_out else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000,
                        help="records per scenario (poison: 800, or fewer if this is less)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario")
    args = parser.parse_args()
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if args.records < 2 or args.repeat < 1 or not names or unknown:
        parser.error(f"--records at least 2, --repeat at least 1; --scenarios from "
                     f"{', '.join(SCENARIOS)}" + (f" (unknown: {', '.join(unknown)})"
                                                 if unknown else ""))
    added = ""
    if {"err10", "err30"} & set(names) and "clean" not in names:
        names.insert(0, "clean")
        added = " (clean added: the reference of the x clean targets)"
    names = list(dict.fromkeys(names))
    began = time.perf_counter()

    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True)
    data = WORK / "data.jsonl"
    texts = generate(data, args.records)
    poison_n = min(POISON_RECORDS, args.records)
    poison_data = WORK / f"data-{poison_n}.jsonl"
    generate(poison_data, poison_n)  # the first poison_n of the same records
    poisoned_index = poison_n // 2
    fail_prompt = texts[poisoned_index]
    poisoned_id = f"r{poisoned_index:06d}"
    matching = sum(fail_prompt in text for text in texts[:poison_n])
    if matching != 1:
        raise SystemExit(f"the poisoned text matches {matching} records, not 1")

    print(f"chunbot fault benchmark: {args.records:,} records of ~"
          f"{sum(map(len, texts)) / len(texts):.0f}-character reviews, one LLM stage (openai "
          f"provider -> chunbot sim serve --latency-ms {LATENCY_MS} --seed {SEED}, "
          f"max_tokens 16, cache: false, nothing about concurrency); a fresh sim and workdir "
          f"per run; runs killed after {RUN_TIMEOUT_S} s (TIMEOUT); {os.cpu_count()} cores")
    print(f"scenarios{added}:")
    for name in names:
        scenario = SCENARIOS[name]
        print(f"  {name:<8} {' '.join(scenario.flags) or '-':<18} {scenario.note}")
    print(f"  (poison: record {poisoned_id} of {poison_n}, text {fail_prompt!r})")
    print("runs:")

    runs: list[Run] = []
    for name in names:
        scenario = SCENARIOS[name]
        for k in range(args.repeat):
            label = name if args.repeat == 1 else f"{name}#{k + 1}"
            if scenario.poison:
                runs.append(run_scenario(scenario, label, poison_data, poison_n, fail_prompt))
            else:
                runs.append(run_scenario(scenario, label, data, args.records, None))

    clean = [r.wall_s for r in runs if r.scenario.name == "clean" and not r.timed_out]
    clean_s = statistics.median(clean) if clean else None
    print(f"\nResults (x clean = wall / the clean run's"
          + (f" median of {len(clean)}" if len(clean) > 1 else "")
          + f"; req/record = requests the sim saw / records; hang5 ran with the model alias's "
            f"timeout: {HANG_TIMEOUT})")
    print_table(runs, clean_s)
    for r in runs:
        if r.timed_out or (r.code not in (0, 1)):
            print(f"  ! {r.label}: " + (f"TIMEOUT: killed after {RUN_TIMEOUT_S} s"
                                        if r.timed_out else f"exit {r.code}")
                  + f" (see {r.log.relative_to(ROOT) if r.log else 'logs'})")
        if "error" in r.stats:
            print(f"  ! {r.label}: /stats: {r.stats['error']}")

    print(f"\nTargets ({time.perf_counter() - began:.0f} s in all)")
    print_targets(runs, clean_s, poisoned_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
