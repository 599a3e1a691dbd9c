"""Mixing benchmark: a cascade [weak, strong] whose replies are checked against a schema gets
the strong model's accuracy at a fraction of its cost.

N records (2,000 by default, `--records`) of review-like texts of varied length (40% of
10-50 characters, 20% of 30-70 around the route's 60, 40% of 65-260; the split over and
under 60 is printed), `{"id", "text"}`, go through a pipeline with one LLM stage `facts`:
prompt "Extract as JSON: {{ text }}", `parse: json`, `schema: {type: object, required:
[sentiment, summary, keywords]}` (inline), `cache: false`. Two in-process simulated models:

  weak    {provider: sim, model: sim-small, wrong_rate: 0.25, request_log: weak.log,
           price: {input: 0.1, output: 0.1}}   -- a quarter of first answers miss "keywords"
  strong  {provider: sim, model: sim-large, request_log: strong.log,
           price: {input: 1.0, output: 1.0}}   -- ten times the price, never wrong

Four pipelines, each in its own folder (pipeline, request logs, workdir runs/<name>/):

  weak     model: weak
  strong   model: strong
  cascade  model: [weak, strong]     (strong is asked when weak's reply fails the schema)
  route    route: [{when: "text | length > 60", model: strong}, {model: [weak, strong]}]

The gold answer of a record is the strong-alone run's `facts` object. For every run: exit
code and wall seconds of `chunbot run p.yaml --quiet` (start to exit); accuracy = records
whose `facts` equals gold's / N (a failed or missing record counts as wrong; with weak alone
the wrong ones fail the schema and go to errors.jsonl); records out and failed; requests per
model (lines of weak.log / strong.log); escalations (trace entries with `escalations`);
tokens and cost in USD from `chunbot status p.yaml --json` (the stage's `tokens_in`,
`tokens_out`, `cost`); the cost as a share of strong alone's; and the exit of `chunbot diff
<strong's facts> <this run's facts> --key _id --fields facts` (0 equal, 1 different).

Cross-checks, each printed with "!" when it does not hold: the requests and the cost expected
from the data alone — the set W of records weak gets wrong (taken from the weak-alone
trace: its reply differs from gold), per request ceil(chars/4) + 4 input tokens for the
prompt and ceil(chars/4) output tokens for the reply (gold's compact JSON, or gold without
"keywords" for weak's wrong first answers), as the simulator counts them, times the
alias's price: weak alone sends N to weak; strong alone N to strong; the cascade N to weak
and |W| to strong; the route every long record to strong, every short one to weak and
the short ones in W to strong. Also: the failed ids of weak alone, the escalated ids of the
cascade and of the route are W (resp. W among the short records); the route taken per
record (trace `route`) follows the text's length; the status cost equals the sum of the
trace costs; strong alone is complete (N records, every one with the three keys).

Targets (PASS/FAIL): cascade accuracy == strong alone's; cascade cost <= 40% of strong
alone's. The route's figures are reported beside them, with no target.

    .venv/bin/python bench/mixing.py                   # 2,000 records, a few seconds
    .venv/bin/python bench/mixing.py --records 20000   # more

The script itself uses the standard library only; chunbot runs as `.venv/bin/python -m
chunbot_cli` (this interpreter when there is no .venv). Everything it writes goes under
bench/out/mixing/ (gitignored): data, one folder per pipeline, and logs/ (chunbot's stderr,
status JSON and diff output per run). The models are in-process: no network at all. Every
process it starts is waited for; a run still going after 120 s is killed (TIMEOUT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "out" / "mixing"
LOGS = WORK / "logs"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
CHUNBOT = [str(VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)), "-m",
           "chunbot_cli"]
RUN_TIMEOUT_S = 120  # a chunbot run still going after this is killed: TIMEOUT
TOOL_TIMEOUT_S = 60  # status, diff
STAGE = "facts"
PROMPT_PREFIX = "Extract as JSON: "
KEYS = ("sentiment", "summary", "keywords")
LONG_CHARS = 60  # the route's `text | length > 60`
WRONG_RATE = 0.25
PRICE = {"weak": 0.1, "strong": 1.0}  # USD per million tokens, input and output alike
TARGET_COST_SHARE = 0.40  # cascade cost / strong alone's
COST_TOLERANCE = 2e-6  # USD: status rounds cost to 6 decimals

PIPELINE = """\
name: {name}
input: {input}
id_field: id
models:
  weak: {{provider: sim, model: sim-small, wrong_rate: {wrong}, request_log: weak.log,
          price: {{input: {pw}, output: {pw}}}}}
  strong: {{provider: sim, model: sim-large, request_log: strong.log,
            price: {{input: {ps}, output: {ps}}}}}
stages:
  - name: {stage}
{model}
    prompt: "{prefix}{{{{ text }}}}"
    parse: json
    schema: {{type: object, required: [{keys}]}}
    cache: false
"""

VARIANTS = {
    "weak": "    model: weak",
    "strong": "    model: strong",
    "cascade": "    model: [weak, strong]",
    "route": f'    route: [{{when: "text | length > {LONG_CHARS}", model: strong}}, '
             '{model: [weak, strong]}]',
}
NOTES = {
    "weak": "model: weak",
    "strong": "model: strong",
    "cascade": "model: [weak, strong]",
    "route": f"text | length > {LONG_CHARS} -> strong, else [weak, strong]",
}

PRODUCTS = ["kettle", "blender", "desk lamp", "backpack", "headphones", "coffee grinder",
            "office chair", "rice cooker", "water bottle", "air fryer", "toaster", "monitor",
            "keyboard", "tent", "vacuum cleaner", "hair dryer", "electric toothbrush"]
SHORT = ["great, love it", "it broke, terrible", "okay I guess", "works perfectly",
         "flimsy and cheap", "decent for the price", "arrived damaged", "excellent value",
         "not bad, not great", "useless, returned it", "solid and reliable", "fine"]
SENTENCES = [
    "Solid build, does what the box promises.",
    "The lid is stiff and the handle gets warm.",
    "Confusing instructions and a damaged box.",
    "Support answered quickly and offered a discount.",
    "Louder than I expected.",
    "Fair price, long enough cord.",
    "It broke after a month and the refund took weeks.",
    "Easy to clean, love it.",
    "Terrible smell out of the box.",
    "Great value, works perfectly.",
    "The color differs from the photos, which is disappointing.",
    "Shipping was slow but the packaging was excellent.",
    "Average quality overall, nothing special.",
    "My partner uses it every morning and is delighted.",
]


def generate(path: Path, count: int) -> list[dict[str, str]]:
    """Write `count` records `{"id", "text"}`: 40% short, 20% around 60 characters, 40% long."""
    rng = random.Random(23)
    records = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            product = rng.choice(PRODUCTS)
            kind = rng.random()
            if kind < 0.4:
                text = f"{product.capitalize()} {i}: {rng.choice(SHORT)}"
            elif kind < 0.6:  # around the route's 60 characters, on both sides
                first, second = rng.sample(SHORT, 2)
                text = f"{product.capitalize()} {i}: {first}; {second}"
            else:
                text = (f"Order {i}: I bought this {product} {rng.randint(2, 30)} days ago. "
                        + " ".join(rng.sample(SENTENCES, rng.randint(1, 4))))
            record = {"id": f"r{i:06d}", "text": text}
            records.append(record)
            f.write(json.dumps(record) + "\n")
    return records


def env() -> dict[str, str]:
    environment = dict(os.environ)
    environment["XDG_CACHE_HOME"] = str(WORK / "xdg-cache")  # unused (cache: false), kept apart
    environment.pop("CHUNBOT_LOG_INTERVAL", None)
    return environment


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the process group (start_new_session) if it is still there, and reap it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def tool(args: list[str], cwd: Path) -> tuple[int | None, str, str]:
    """A short chunbot command (status, diff): exit code (None: killed), stdout, stderr."""
    process = subprocess.Popen([*CHUNBOT, *args], cwd=cwd, env=env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=TOOL_TIMEOUT_S)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        return None, "", f"killed after {TOOL_TIMEOUT_S} s"
    finally:
        kill(process)
        if process.stdout:
            process.stdout.close()
        if process.stderr:
            process.stderr.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    rows.append({"_unreadable": line[:200]})
    return rows


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@dataclass
class Run:
    label: str
    folder: Path
    wall_s: float = 0.0
    code: int | None = None  # None: TIMEOUT
    outputs: dict[str, Any] = field(default_factory=dict)  # _id -> the facts object
    failed_ids: list[str] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # alias -> request_log lines
    status: dict[str, Any] = field(default_factory=dict)  # the stage's entry of status --json
    status_note: str = ""
    accuracy: float | None = None
    correct: int = 0
    diff_code: int | None = None
    expected_requests: dict[str, int] = field(default_factory=dict)
    expected_tokens: tuple[int, int] = (0, 0)
    expected_cost: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.code is None

    @property
    def cost(self) -> float | None:
        value = self.status.get("cost")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def escalated_ids(self) -> list[str]:
        return [str(t.get("_id")) for t in self.traces if t.get("escalations")]


def run_pipeline(label: str, data: Path) -> Run:
    """A fresh folder with p.yaml; `chunbot run p.yaml --quiet`, then `status --json`."""
    folder = WORK / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run = Run(label, folder)
    (folder / "p.yaml").write_text(PIPELINE.format(
        name=label, input=data, wrong=WRONG_RATE, pw=PRICE["weak"], ps=PRICE["strong"],
        stage=STAGE, model=VARIANTS[label], prefix=PROMPT_PREFIX, keys=", ".join(KEYS)))
    print(f"  {label:<8} {NOTES[label]} ...", end="", flush=True)
    with open(LOGS / f"{label}.err", "w") as err:
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
            kill(process)
        run.wall_s = time.perf_counter() - started

    stage = folder / "runs" / label / STAGE
    for part in sorted(stage.glob("part-*.jsonl")):
        if part.name.endswith(".trace.jsonl"):
            continue
        for row in read_jsonl(part):
            run.outputs[str(row.get("_id"))] = row.get(STAGE)
    run.failed_ids = [str(e.get("_id")) for e in read_jsonl(stage / "errors.jsonl")]
    for trace in sorted(stage.glob("trace-*.jsonl")) + sorted(stage.glob("part-*.trace.jsonl")):
        run.traces.extend(read_jsonl(trace))
    run.requests = {alias: count_lines(folder / f"{alias}.log") for alias in PRICE}

    code, out, err = tool(["status", "p.yaml", "--json"], folder)
    (LOGS / f"{label}.status.json").write_text(out + (f"\n--- stderr\n{err}" if err else ""))
    try:
        stages = json.loads(out).get("stages", [])
        run.status = next((s for s in stages if s.get("stage") == STAGE), {})
        if not run.status:
            run.status_note = f"status --json has no stage {STAGE!r}"
    except (ValueError, AttributeError):
        run.status_note = f"status --json exit {code}, not JSON: {(out or err)[:200]!r}"
    if run.status and run.cost is None:
        run.status_note = f"status --json: stage {STAGE!r} has no numeric `cost` " \
                          f"(keys: {', '.join(run.status)})"
    print(f" {run.wall_s:.1f} s, " + ("TIMEOUT" if run.timed_out else f"exit {run.code}")
          + f", {len(run.outputs):,} out, {len(run.failed_ids):,} failed, requests weak "
          f"{run.requests['weak']:,} strong {run.requests['strong']:,}", flush=True)
    return run


def tokens(text: str) -> int:
    """The simulator's count: about one token per four characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def expect(run: Run, records: list[dict[str, str]], gold: dict[str, Any],
           wrong: set[str]) -> None:
    """Requests, tokens and cost the run should have, from the data, gold and W alone."""
    requests = {"weak": 0, "strong": 0}
    tin = tout = 0
    cost = 0.0
    for record in records:
        rid, text = record["id"], record["text"]
        answer = gold.get(rid)
        if not isinstance(answer, dict):
            continue  # no gold: counted as a problem of the strong run
        t_in = tokens(PROMPT_PREFIX + text) + 4
        t_right = tokens(compact(answer))
        t_wrong = tokens(compact({k: v for k, v in answer.items() if k != "keywords"}))
        asked: list[tuple[str, int]] = []  # (alias, output tokens)
        if run.label == "strong" or (run.label == "route" and len(text) > LONG_CHARS):
            asked.append(("strong", t_right))
        else:
            asked.append(("weak", t_wrong if rid in wrong else t_right))
            if rid in wrong and run.label != "weak":
                asked.append(("strong", t_right))
        for alias, t_out in asked:
            requests[alias] += 1
            tin += t_in
            tout += t_out
            cost += (t_in + t_out) * PRICE[alias] / 1e6
    run.expected_requests = requests
    run.expected_tokens = (tin, tout)
    run.expected_cost = cost


def check(run: Run, records: list[dict[str, str]], gold: dict[str, Any],
          wrong: set[str]) -> None:
    """Accuracy against gold, chunbot diff against strong's output, and the cross-checks."""
    n = len(records)
    run.correct = sum(1 for r in records
                      if r["id"] in run.outputs and run.outputs[r["id"]] == gold.get(r["id"]))
    run.accuracy = run.correct / n if n else None
    p = run.problems
    if run.timed_out:
        p.append(f"TIMEOUT: killed after {RUN_TIMEOUT_S} s")
    elif run.code not in (0, 1):
        p.append(f"exit {run.code} (see {(LOGS / (run.label + '.err')).relative_to(ROOT)})")
    lost = n - len(run.outputs) - len(run.failed_ids)
    if lost:
        p.append(f"{lost:,} records neither in the output nor in errors.jsonl")
    if run.status_note:
        p.append(run.status_note)
    for alias in PRICE:
        got, want = run.requests[alias], run.expected_requests.get(alias)
        if got != want:
            p.append(f"requests to {alias}: {got:,} in {alias}.log, expected {want:,}")
    if run.status:
        tin, tout = run.status.get("tokens_in"), run.status.get("tokens_out")
        if (tin, tout) != run.expected_tokens:
            p.append(f"status tokens in/out {tin}/{tout}, expected "
                     f"{run.expected_tokens[0]}/{run.expected_tokens[1]}")
    if run.cost is not None and run.expected_cost is not None:
        if abs(run.cost - run.expected_cost) > COST_TOLERANCE + 1e-6 * run.expected_cost:
            p.append(f"status cost ${run.cost:.6f}, expected ${run.expected_cost:.6f} "
                     f"(requests x tokens x price)")
        traced = sum(float(t.get("cost") or 0) for t in run.traces)
        if abs(run.cost - traced) > COST_TOLERANCE + 1e-6 * traced:
            p.append(f"status cost ${run.cost:.6f}, the traces' costs sum to ${traced:.6f}")
    if len(run.traces) != n:
        p.append(f"{len(run.traces):,} trace entries for {n:,} records")
    short_wrong = {r["id"] for r in records if len(r["text"]) <= LONG_CHARS} & wrong
    if run.label == "weak" and set(run.failed_ids) != wrong:
        p.append(f"failed ids are not W: {len(set(run.failed_ids) - wrong)} failed not in W, "
                 f"{len(wrong - set(run.failed_ids))} of W not failed")
    if run.label in ("cascade", "route"):
        want = wrong if run.label == "cascade" else short_wrong
        got = set(run.escalated_ids)
        if got != want:
            p.append(f"escalated ids: {len(got - want)} not expected, {len(want - got)} "
                     f"expected but not escalated")
        if run.failed_ids:
            p.append(f"{len(run.failed_ids):,} failed records (a cascade ending on strong "
                     f"should fail none)")
    if run.label == "route":
        texts = {r["id"]: r["text"] for r in records}
        off = [t.get("_id") for t in run.traces
               if (t.get("route") != "default") != (len(texts.get(t.get("_id"), "")) > LONG_CHARS)]
        if off:
            p.append(f"{len(off):,} records took the wrong route (e.g. {off[0]})")
    if run.label != "strong":
        code, out, err = tool(["diff", f"../strong/runs/strong/{STAGE}",
                               f"runs/{run.label}/{STAGE}", "--key", "_id", "--fields", STAGE],
                              run.folder)
        run.diff_code = code
        (LOGS / f"{run.label}.diff.txt").write_text(out + (f"\n--- stderr\n{err}" if err else ""))
        if code != (0 if run.correct == n else 1):
            p.append(f"chunbot diff against strong exits {code}, accuracy says "
                     f"{'equal' if run.correct == n else 'different'}")


def fmt_cost(value: float | None) -> str:
    return "–" if value is None else f"{value:.6f}"


def print_table(runs: list[Run], n: int, strong_cost: float | None) -> None:
    headers = ["pipeline", "exit", "wall s", "out", "failed", "accuracy", "weak req",
               "strong req", "escalated", "tok in", "tok out", "cost $", "expected $",
               "x strong", "diff exit"]
    table = []
    for r in runs:
        share = (f"{r.cost / strong_cost:.1%}" if r.cost is not None and strong_cost
                 else "–")
        table.append([
            r.label, "TIMEOUT" if r.timed_out else str(r.code), f"{r.wall_s:.1f}",
            f"{len(r.outputs):,}", f"{len(r.failed_ids):,}",
            "–" if r.accuracy is None else f"{r.accuracy:.2%}",
            f"{r.requests['weak']:,}", f"{r.requests['strong']:,}",
            f"{len(r.escalated_ids):,}",
            f"{r.status.get('tokens_in', '–'):,}" if isinstance(r.status.get("tokens_in"), int)
            else "–",
            f"{r.status.get('tokens_out', '–'):,}" if isinstance(r.status.get("tokens_out"), int)
            else "–",
            fmt_cost(r.cost), fmt_cost(r.expected_cost), share,
            "gold" if r.label == "strong" else ("–" if r.diff_code is None
                                                else str(r.diff_code))])
    widths = [max(len(row[i]) for row in [headers, *table]) for i in range(len(headers))]
    for row in [headers, *table]:
        print("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    print("  expected requests (weak/strong): " + "; ".join(
        f"{r.label} {r.expected_requests.get('weak', 0):,}/"
        f"{r.expected_requests.get('strong', 0):,}" for r in runs))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, help="records (default 2,000)")
    args = parser.parse_args()
    if args.records < 10:
        parser.error("--records at least 10")
    began = time.perf_counter()

    shutil.rmtree(WORK, ignore_errors=True)
    LOGS.mkdir(parents=True)
    data = WORK / "data.jsonl"
    records = generate(data, args.records)
    n = len(records)
    lengths = [len(r["text"]) for r in records]
    long_n = sum(length > LONG_CHARS for length in lengths)
    print(f"chunbot mixing benchmark: {n:,} records, texts {min(lengths)}-{max(lengths)} "
          f"characters (mean {sum(lengths) / n:.0f}; {long_n:,} over {LONG_CHARS}, "
          f"{n - long_n:,} not), one LLM stage '{STAGE}' (JSON, schema requires "
          f"{', '.join(KEYS)}, cache: false); weak = sim-small, wrong_rate {WRONG_RATE}, "
          f"${PRICE['weak']}/M tokens; strong = sim-large, ${PRICE['strong']}/M tokens")
    print("runs:")
    runs = {label: run_pipeline(label, data) for label in VARIANTS}

    strong = runs["strong"]
    gold = strong.outputs
    gold_problems = []
    if strong.timed_out or strong.code != 0:
        gold_problems.append("the strong run did not exit 0")
    incomplete = [r["id"] for r in records
                  if not (isinstance(gold.get(r["id"]), dict) and set(KEYS) <= set(gold[r["id"]]))]
    if incomplete:
        gold_problems.append(f"{len(incomplete):,} records without a complete gold answer "
                             f"(e.g. {incomplete[0]})")
    # W: the records weak gets wrong, from what it answered (its trace), not from its failures
    weak_replies = {}
    for t in runs["weak"].traces:
        try:
            weak_replies[str(t.get("_id"))] = json.loads(t.get("response") or "null")
        except ValueError:
            weak_replies[str(t.get("_id"))] = None
    wrong = {r["id"] for r in records if weak_replies.get(r["id"]) != gold.get(r["id"])}
    for run in runs.values():
        expect(run, records, gold, wrong)
        check(run, records, gold, wrong)
    strong.problems[:0] = gold_problems

    print(f"\nResults (accuracy = records whose {STAGE} equals strong alone's / {n:,}, failed "
          f"ones wrong; req = request_log lines; escalated = trace entries with escalations; "
          f"tokens and cost $ from status --json; expected $ = requests x tokens x price; "
          f"x strong = cost / strong alone's; diff exit = chunbot diff against strong's "
          f"{STAGE})")
    print(f"  W (weak's wrong first answers): {len(wrong):,} of {n:,} ({len(wrong) / n:.1%}); "
          f"{len(wrong & {r['id'] for r in records if len(r['text']) <= LONG_CHARS}):,} of "
          f"them short")
    print_table(list(runs.values()), n, strong.cost)
    for run in runs.values():
        for problem in run.problems:
            print(f"  ! {run.label}: {problem}")
    if not any(run.problems for run in runs.values()):
        print("  cross-checks: all hold (requests, tokens, cost, failed/escalated ids, routes, "
              "diff)")

    cascade, route = runs["cascade"], runs["route"]
    print(f"\nTargets ({time.perf_counter() - began:.0f} s in all)")
    same = (cascade.accuracy is not None and strong.accuracy is not None
            and cascade.correct == strong.correct and not gold_problems
            and cascade.code == 0)
    print(f"  cascade accuracy == strong alone's  {verdict(same)}  "
          f"{cascade.correct:,} vs {strong.correct:,} of {n:,} "
          f"({cascade.accuracy or 0:.2%} vs {strong.accuracy or 0:.2%}); weak alone "
          f"{runs['weak'].accuracy or 0:.2%}" + (f" ({'; '.join(gold_problems)})"
                                               if gold_problems else ""))
    if cascade.cost is not None and strong.cost:
        share = cascade.cost / strong.cost
        print(f"  cascade cost <= {TARGET_COST_SHARE:.0%} of strong alone's  "
              f"{verdict(share <= TARGET_COST_SHARE)}  ${cascade.cost:.6f} vs "
              f"${strong.cost:.6f} = {share:.1%}")
    else:
        print(f"  cascade cost <= {TARGET_COST_SHARE:.0%} of strong alone's  FAIL  cost "
              f"missing (cascade {fmt_cost(cascade.cost)}, strong {fmt_cost(strong.cost)})")
    route_share = (f"{route.cost / strong.cost:.1%}" if route.cost is not None and strong.cost
                   else "–")
    print(f"  route (no target): accuracy {route.accuracy or 0:.2%}, cost "
          f"${fmt_cost(route.cost)} = {route_share} of strong alone's, requests weak "
          f"{route.requests['weak']:,} strong {route.requests['strong']:,}, "
          f"{len(route.escalated_ids):,} escalated, exit {route.code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
