"""Trace benchmark: how long `chunbot trace` takes to find one record among millions.

Generates N records (default 10,000,000 of ~120 bytes), runs them through a pipeline with
one `python` stage (shards of 10,000), then times `chunbot trace PIPELINE ID --json` as a
user runs it (a whole process, start-up included) for ids at the start, middle and end of
the input and for an id that does not exist. Target: under a second each.

    python bench/trace.py                      # 10M records: ~1 minute to set up
    python bench/trace.py --records 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

STAGE_MODULE = """
def mark(record):
    record["seen"] = True
    return record
"""

PIPELINE = """
name: trace-bench
input: data.jsonl
id_field: id
shard_size: 10000
stages:
  - name: mark
    python: bench_stage:mark
"""


def generate(path: Path, count: int) -> None:
    with open(path, "wb") as f:
        for start in range(0, count, 100_000):
            f.write(b"".join(
                orjson.dumps({"id": f"r{i:09d}", "rating": i % 5 + 1,
                              "text": f"review number {i} of a kettle that works well enough"},
                             option=orjson.OPT_APPEND_NEWLINE)
                for i in range(start, min(count, start + 100_000))))


def timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, timeout=600)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chunbot-trace-"))
    chunbot = [sys.executable, "-m", "chunbot_cli"]
    try:
        (root / "bench_stage.py").write_text(STAGE_MODULE)
        (root / "p.yaml").write_text(PIPELINE)
        started = time.perf_counter()
        generate(root / "data.jsonl", args.records)
        print(f"generated {args.records:,} records in {time.perf_counter() - started:.1f}s")
        seconds, result = timed(chunbot + ["run", "p.yaml", "--quiet"], root)
        if result.returncode != 0:
            raise SystemExit(result.stderr.decode())
        print(f"chunbot run: {seconds:.1f}s ({args.records / seconds:,.0f} records/s)")
        n = args.records
        ids = [f"r{0:09d}", f"r{n // 2:09d}", f"r{n - 1:09d}", "r-missing"]
        worst = 0.0
        print(f"{'id':<12} {'seconds':>8}  found")
        for record_id in ids:
            seconds, result = timed(chunbot + ["trace", "p.yaml", record_id, "--json"], root)
            found = result.returncode == 0 and orjson.loads(result.stdout)["id"] == record_id
            print(f"{record_id:<12} {seconds:>8.3f}  {found}")
            if record_id != "r-missing":
                assert found, result.stderr.decode()
            worst = max(worst, seconds)
        print(f"slowest trace among {n:,} records: {worst:.3f}s "
              f"({'PASS' if worst < 1.0 else 'FAIL'}: target under 1 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("CHUNBOT_LOG_INTERVAL", "60")
    main()
