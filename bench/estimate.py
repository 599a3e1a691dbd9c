"""`chunbot estimate` against what the run that follows it costs, and how long it takes.

A. Estimate vs actual. Three pipelines whose models speak the OpenAI protocol to a real
   `chunbot sim serve` process (one server per model, so its /stats bill that model alone):
     demo     configs/demo.yaml's stages: sentiment (max_tokens 4) → keep the negatives →
              a reply to each (max_tokens 80);
     json     one `parse: json` stage with a schema (max_tokens 100);
     cascade  that JSON stage with `model: [small, big]`; the small model's server runs with
              `--wrong-rate 0.3 --wrong-model sim-small`, so three in ten first answers miss
              a key, fail the schema and escalate to big.
   Each in two scenarios, each in a fresh folder, with fresh servers (their prompt caches
   empty) and a response cache of its own (XDG_CACHE_HOME):
     cold   `chunbot estimate` with no run before, then the full run;
     pilot  `chunbot run --limit 200`, then `chunbot estimate`, then the full run.
   Actual = what the servers billed during the full run (the /stats difference, priced as
   OpenAI bills: cached prompt tokens at half the input price). The estimate must send no
   request (every server's `requests` unchanged across it). `status $` (cold only) is what
   chunbot's own accounting (status --json) says the full run cost, beside the servers'
   bill: a check of the pricing here. After a pilot the full run redoes the pilot's partial
   shard (the response cache answers its records), so status's difference is not the run's.

B. Speed over `--big-records` lines (~300 bytes each): wall clock, side by side in one run,
   twice each: (a) `chunbot estimate` of the demo pipeline (cold), (b) a passthrough run of
   the same input (one `filter: "true"` stage: read, parse, write part files, the least a run
   does); then (c) the demo run on the in-process simulator (latency 0, no HTTP), on the
   whole input if 100k records take under 18 s (1M under ~3 min), else extrapolated from 100k.

    .venv/bin/python bench/estimate.py                    # 20,000 and 1,000,000 records
    .venv/bin/python bench/estimate.py --records 2000 --big-records 50000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNBOT = [sys.executable, "-m", "chunbot_cli"]
PRICES = {"small": {"input": 0.15, "output": 0.60}, "big": {"input": 2.50, "output": 10.00}}
CACHED_SHARE = 0.5  # OpenAI bills prompt-cache reads at half the input price
PILOT = 200
TOLERANCE = 0.15


# ----------------------------------------------------------------------------- processes
def chunbot(*args: str, cwd: Path, env: dict[str, str], timeout: float = 900
            ) -> tuple[subprocess.CompletedProcess, float]:
    """Run the real command; its result and wall seconds. A failure stops the bench."""
    started = time.perf_counter()
    result = subprocess.run([*CHUNBOT, *args], cwd=cwd, capture_output=True, timeout=timeout,
                            env={**os.environ, **env})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"chunbot {' '.join(args)} exited {result.returncode}:\n"
                         f"{result.stderr.decode()[-3000:]}")
    return result, seconds


class Server:
    """A `chunbot sim serve` process on 127.0.0.1, port 0; `url` from its first line."""

    def __init__(self, folder: Path, name: str, *flags: str):
        self.log = open(folder / f"server-{name}.log", "wb")
        self.process = subprocess.Popen(
            [*CHUNBOT, "sim", "serve", "--host", "127.0.0.1", "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=self.log)
        line = b""
        deadline = time.monotonic() + 30
        while b"\n" not in line and time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    break
                line += chunk
        text = line.decode()
        if "listening on " not in text:
            self.stop()
            raise SystemExit(f"sim serve did not start: {text!r}")
        self.url = text.split("listening on ", 1)[1].split()[0].strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process.stdout.close()
        self.log.close()


def billed(before: dict, after: dict, price: dict[str, float]) -> float:
    """USD for the tokens a server answered between two /stats."""
    tokens_in = after["tokens_in"] - before["tokens_in"]
    cached = after["cached_tokens"] - before["cached_tokens"]
    tokens_out = after["tokens_out"] - before["tokens_out"]
    return ((tokens_in - cached) * price["input"] + cached * price["input"] * CACHED_SHARE
            + tokens_out * price["output"]) / 1e6


# ----------------------------------------------------------------------------- data
def sim_cases(count: int, seed: int, cwd: Path, words: int = 0) -> list[dict]:
    args = ["sim", "gen", "--records", str(count), "--seed", str(seed)]
    if words:
        args += ["--words", str(words)]
    result, _ = chunbot(*args, cwd=cwd, env={}, timeout=300)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def write_reviews(path: Path, count: int, cwd: Path) -> None:
    """`sim gen --records N --seed 1`, each text prefixed by its number: every prompt its
    own, so the response cache does not answer duplicates."""
    with open(path, "w") as out:
        for n, case in enumerate(sim_cases(count, 1, cwd)):
            case["text"] = f"{n}. {case['text']}"
            out.write(json.dumps(case) + "\n")


def write_big(path: Path, count: int, cwd: Path) -> float:
    """`count` lines of ~300 bytes from a few hundred sim cases, each with its own id and
    number; returns the mean line length."""
    import orjson

    base = sim_cases(500, 2, cwd, words=40)
    dumps, size = orjson.dumps, 0
    with open(path, "wb", buffering=1 << 22) as out:
        for n in range(count):
            case = base[n % len(base)]
            line = dumps({"id": f"b{n:08d}", "product": case["product"],
                          "text": f"{n}. {case['text']}", "label": case["label"]}) + b"\n"
            size += len(line)
            out.write(line)
    return size / max(1, count)


# ----------------------------------------------------------------------------- pipelines
def http_model(url: str, model: str, alias: str) -> dict:
    return {"provider": "openai", "model": model, "base_url": f"{url}/v1",
            "api_key_env": "SIM_KEY", "price": PRICES[alias]}


def sim_model(model: str, alias: str, **extra) -> dict:
    return {"provider": "sim", "model": model, "latency_ms": 0, "price": PRICES[alias],
            **extra}


DEMO_STAGES = [  # configs/demo.yaml's
    {"name": "sentiment", "model": "small", "system": "You are a precise annotator.",
     "prompt": "Label the sentiment (positive/negative/neutral) of this review: {{ text }}",
     "output": "sentiment", "params": {"temperature": 0, "max_tokens": 4}},
    {"name": "negatives", "filter": "sentiment == 'negative'"},
    {"name": "reply", "model": "small",
     "prompt": "Write a two-line apology to the customer who wrote this {{ product }} "
               "review: {{ text }}",
     "output": "reply", "params": {"temperature": 0.2, "max_tokens": 80}},
]


def json_stage(models) -> dict:
    return {"name": "facts", "model": models, "parse": "json",
            "prompt": "Extract the sentiment, a summary and keywords as JSON: {{ text }}",
            "schema": {"type": "object", "required": ["sentiment", "summary", "keywords"]},
            "params": {"max_tokens": 100}}


def pipeline(name: str, input: Path, workdir: Path, models: dict, stages: list) -> dict:
    return {"name": name, "input": str(input), "workdir": str(workdir), "id_field": "id",
            "shard_size": 500, "models": models, "stages": stages}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2))  # JSON is YAML
    return path


# ----------------------------------------------------------------------------- A
PIPELINES = {
    # name: (models: alias → (model name, sim serve flags), stages)
    "demo": ({"small": ("sim-small", ())}, DEMO_STAGES),
    "json": ({"small": ("sim-small", ())}, [json_stage("small")]),
    "cascade": ({"small": ("sim-small", ("--wrong-rate", "0.3", "--wrong-model", "sim-small")),
                 "big": ("sim-large", ())}, [json_stage(["small", "big"])]),
}


def status_cost(path: Path, folder: Path, env: dict[str, str]) -> float:
    result, _ = chunbot("status", str(path), "--json", cwd=folder, env=env, timeout=300)
    report = json.loads(result.stdout)
    return sum(stage.get("cost") or 0.0 for stage in report.get("stages", []))


def scenario(root: Path, data: Path, name: str, kind: str) -> dict:
    folder = root / f"{name}-{kind}"
    folder.mkdir()
    env = {"SIM_KEY": "k", "XDG_CACHE_HOME": str(folder / ".cache"),
           "CHUNBOT_LOG_INTERVAL": "5"}
    specs, stages = PIPELINES[name]
    servers = {}
    try:
        for alias, (model, flags) in specs.items():
            servers[alias] = Server(folder, alias, *flags)
        models = {alias: http_model(servers[alias].url, specs[alias][0], alias)
                  for alias in specs}
        path = write_yaml(folder / "p.yaml",
                          pipeline(name, data, folder / "runs", models, stages))
        snap = lambda: {alias: s.stats() for alias, s in servers.items()}  # noqa: E731
        if kind == "pilot":
            chunbot("run", str(path), "--limit", str(PILOT), "-q", cwd=folder, env=env)
        before = snap()
        result, estimate_seconds = chunbot("estimate", str(path), "--json", cwd=folder,
                                           env=env)
        after_estimate = snap()
        sent = {alias: after_estimate[alias]["requests"] - before[alias]["requests"]
                for alias in servers}
        estimate = json.loads(result.stdout)
        own_before = status_cost(path, folder, env)
        _, run_seconds = chunbot("run", str(path), "-q", cwd=folder, env=env)
        after = snap()
        own = status_cost(path, folder, env) - own_before
        actual = {alias: billed(after_estimate[alias], after[alias], PRICES[alias])
                  for alias in servers}
        requests = {alias: after[alias]["requests"] - after_estimate[alias]["requests"]
                    for alias in servers}
        tokens = {alias: (after[alias]["tokens_in"] - after_estimate[alias]["tokens_in"],
                          after[alias]["cached_tokens"] - after_estimate[alias]["cached_tokens"],
                          after[alias]["tokens_out"] - after_estimate[alias]["tokens_out"])
                  for alias in servers}
    finally:
        for server in servers.values():
            server.stop()
    return {"pipeline": name, "scenario": kind, "estimate": estimate, "sent": sent,
            "actual": sum(actual.values()), "actual_by_model": actual, "requests": requests,
            "tokens": tokens, "own": own, "estimate_seconds": estimate_seconds,
            "run_seconds": run_seconds}


def part_a(root: Path, records: int) -> bool:
    """The table; False when an estimate sent a request."""
    data = root / "reviews.jsonl"
    write_reviews(data, records, root)
    print(f"A. estimate vs actual: {records:,} records (sim gen --seed 1, numbered texts), "
          f"models over HTTP (provider: openai) to chunbot sim serve; the cascade's small "
          f"model answers wrongly via sim serve --wrong-rate 0.3 (no in-process fallback "
          f"needed); pilot = run --limit {PILOT} first", flush=True)
    rows = []
    for name in PIPELINES:
        for kind in ("cold", "pilot"):
            rows.append(scenario(root, data, name, kind))
            row = rows[-1]
            print(f"  … {name}/{kind}: estimate {row['estimate_seconds']:.1f} s, "
                  f"run {row['run_seconds']:.1f} s", flush=True)
    header = ("pipeline", "scenario", "estimate $", "actual $", "error %", "±15%",
              "status $", "requests during estimate")
    table = [header]
    for row in rows:
        estimate, actual = row["estimate"]["cost"], row["actual"]
        error = (estimate - actual) / actual * 100 if actual else float("nan")
        table.append((row["pipeline"], row["scenario"], f"{estimate:.4f}", f"{actual:.4f}",
                      f"{error:+.1f}", "yes" if abs(error) <= TOLERANCE * 100 else "no",
                      f"{row['own']:.4f}" if row["scenario"] == "cold" else "–",
                      ", ".join(f"{a} {n}" for a, n in row["sent"].items())))
    print_table(table)
    for row in rows:
        if any(row["sent"].values()):
            print(f"  FAIL: the estimate of {row['pipeline']}/{row['scenario']} sent "
                  f"requests: {row['sent']}")
    sent = any(any(row["sent"].values()) for row in rows)
    if not sent:
        print("  every estimate sent 0 requests (each server's /stats `requests` unchanged)")
    print("  per stage and model (estimate → server's bill of the run that followed):")
    for row in rows:
        billed_models = row["actual_by_model"]
        parts = []
        for stage in row["estimate"]["stages"]:
            if stage.get("kind") != "llm":
                parts.append(f"{stage['stage']}: {stage.get('records', 0):,} records")
                continue
            for alias, m in stage.get("models", {}).items():
                parts.append(f"{stage['stage']}/{alias}: {m['requests']:,} req "
                             f"{m['tokens_in']:,}/{m['tokens_out']:,} tok ${m['cost']:.4f} "
                             f"[{stage.get('output_tokens_from', '')}]")
        served = "; ".join(
            f"{alias}: {row['requests'][alias]:,} req {t[0]:,} in ({t[1]:,} cached)/"
            f"{t[2]:,} out tok ${billed_models[alias]:.4f}"
            for alias, t in row["tokens"].items())
        print(f"  {row['pipeline']}/{row['scenario']}: est {'; '.join(parts)}")
        print(f"  {' ' * len(row['pipeline'] + row['scenario'])}   run {served}")
        for note in row["estimate"].get("notes", []):
            print(f"  {' ' * len(row['pipeline'] + row['scenario'])}   note: {note}")
    return not sent


# ----------------------------------------------------------------------------- B
def part_b(root: Path, count: int) -> None:
    folder = root / "big"
    folder.mkdir()
    data = folder / "big.jsonl"
    started = time.perf_counter()
    mean = write_big(data, count, root)
    print(f"\nB. speed over {count:,} records ({mean:.0f} bytes a line, "
          f"{data.stat().st_size / 1e6:,.0f} MB, written in "
          f"{time.perf_counter() - started:.1f} s)", flush=True)
    demo_models = {"small": sim_model("sim-small", "small")}

    def demo(tag: str, input: Path) -> tuple[Path, dict[str, str]]:
        sub = folder / tag
        sub.mkdir()
        path = write_yaml(sub / "p.yaml",
                          pipeline("demo", input, sub / "runs", demo_models, DEMO_STAGES))
        return path, {"XDG_CACHE_HOME": str(sub / ".cache"), "CHUNBOT_LOG_INTERVAL": "5"}

    def passthrough(tag: str) -> tuple[Path, dict[str, str]]:
        sub = folder / tag
        sub.mkdir()
        path = write_yaml(sub / "p.yaml", {
            "name": "passthrough", "input": str(data), "workdir": str(sub / "runs"),
            "id_field": "id", "shard_size": 500,
            "stages": [{"name": "all", "filter": "true"}]})
        return path, {"XDG_CACHE_HOME": str(sub / ".cache"), "CHUNBOT_LOG_INTERVAL": "5"}

    timings = []
    for repeat in (1, 2):
        path, env = demo(f"estimate-{repeat}", data)
        result, est_wall = chunbot("estimate", str(path), "--json", cwd=path.parent, env=env,
                                   timeout=1800)
        estimate = json.loads(result.stdout)
        shutil.rmtree(path.parent / "runs", ignore_errors=True)
        path, env = passthrough(f"passthrough-{repeat}")
        _, pass_wall = chunbot("run", str(path), "-q", cwd=path.parent, env=env, timeout=1800)
        shutil.rmtree(path.parent / "runs", ignore_errors=True)  # free the disk
        timings.append((est_wall, estimate, pass_wall))
        print(f"  … repeat {repeat}: estimate {est_wall:.1f} s, passthrough {pass_wall:.1f} s",
              flush=True)
    table = [("repeat", "estimate s", "(its own seconds)", "passthrough s", "ratio",
              "≤ 10%", "estimate records/s", "sampled")]
    for n, (est_wall, estimate, pass_wall) in enumerate(timings, 1):
        ratio = est_wall / pass_wall
        table.append((str(n), f"{est_wall:.2f}", f"{estimate['seconds']:.2f}",
                      f"{pass_wall:.2f}", f"{ratio * 100:.1f}%",
                      "yes" if ratio <= 0.10 else "no", f"{count / est_wall:,.0f}",
                      f"{estimate['sampled']:,} of {estimate['stale']:,}"))
    print_table(table)
    print(f"  estimate of the demo over it: ${timings[0][1]['cost']:.2f} "
          f"(in-process sim-small at small's price)")

    # (c) the demo run itself, in-process simulator, latency 0
    small = min(count, 100_000)
    head = folder / "head.jsonl"
    with open(data, "rb") as src, open(head, "wb") as dst:
        for n, line in enumerate(src):
            if n >= small:
                break
            dst.write(line)
    path, env = demo("run-head", head)
    _, head_wall = chunbot("run", str(path), "-q", cwd=path.parent, env=env, timeout=1800)
    shutil.rmtree(path.parent / "runs", ignore_errors=True)
    projected = head_wall * count / small
    if small == count:
        run_wall, how = head_wall, "measured"
    elif projected <= 180:
        path, env = demo("run-all", data)
        _, run_wall = chunbot("run", str(path), "-q", cwd=path.parent, env=env, timeout=1800)
        shutil.rmtree(path.parent / "runs", ignore_errors=True)
        how = "measured"
    else:
        run_wall, how = projected, f"EXTRAPOLATED from {small:,} records in {head_wall:.1f} s"
    print(f"  (c) the demo run, in-process sim (latency 0): {small:,} records {head_wall:.1f} s "
          f"({small / head_wall:,.0f} records/s); {count:,} records {run_wall:.1f} s ({how})")
    mean_estimate = sum(t[0] for t in timings) / len(timings)
    print(f"  the estimate (mean of 2: {mean_estimate:.2f} s) is "
          f"{mean_estimate / run_wall * 100:.1f}% of that run")


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  " + "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def revision() -> str:
    """The commit measured, and whether the estimator's files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    dirty = git("status", "--porcelain", "--", "chunbot_cli/estimator.py",
                "chunbot_cli/llm/tokens.py", "chunbot_cli/llm/price.py")
    return git("rev-parse", "--short", "HEAD") + (" (estimator files changed: "
                                                  + " ".join(dirty.split()) + ")"
                                                  if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="records of part A")
    parser.add_argument("--big-records", type=int, default=1_000_000, help="records of part B")
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-estimate-", dir="/tmp"))
    print(f"chunbot estimate benchmark at {revision()}; scratch {root}; "
          f"{os.cpu_count()} cores", flush=True)
    started, ok = time.perf_counter(), True
    try:
        if not args.skip_a:
            ok = part_a(root, args.records)
        if not args.skip_b:
            part_b(root, args.big_records)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all; at the end: {revision()}")
    if not ok:
        raise SystemExit("an estimate sent requests")


if __name__ == "__main__":
    main()
