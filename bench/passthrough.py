"""Passthrough benchmark: chunbot's per-record overhead, disk to disk, beside a plain loop.

A pipeline with one `python` stage that adds a field runs over generated records of about
500 bytes; in the same run a plain Python loop does the same work (read, orjson.loads, add
the field, orjson.dumps, write), the physical limit for this in Python. Each side runs in
its own process, so peak RSS is that process's own.

    python bench/passthrough.py                 # 100,000 and 1,000,000 records
    python bench/passthrough.py --sizes 100000  # quicker
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

PLAIN_LOOP = """
import sys, orjson
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    for line in src:
        record = orjson.loads(line)
        record["seen"] = True
        dst.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
"""

STAGE_MODULE = """
def add_field(record):
    record["seen"] = True
    return record
"""

PIPELINE = """
name: passthrough
input: {input}
id_field: id
stages:
  - name: mark
    python: bench_stage:add_field
"""


def generate(path: Path, count: int) -> None:
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
             for _ in range(2000)]
    with open(path, "wb") as f:
        for i in range(count):
            text = " ".join(rng.choices(words, k=62))[:400]
            record = {"id": f"r{i:08d}", "user": rng.randint(1, 10**6),
                      "rating": rng.randint(1, 5), "lang": "en", "text": text}
            f.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))


def measure(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command} failed: {process.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; best is kept")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="chunbot-passthrough-"))
    try:
        (root / "bench_stage.py").write_text(STAGE_MODULE)
        (root / "plain.py").write_text(PLAIN_LOOP)
        print(f"{'records':>10} {'side':<8} {'seconds':>8} {'records/s':>11} {'peak RSS MB':>12}")
        for count in (int(s) for s in args.sizes.split(",")):
            data = root / f"in-{count}.jsonl"
            generate(data, count)
            size_mb = data.stat().st_size / count
            (root / "p.yaml").write_text(PIPELINE.format(input=data))
            results = {}
            for side, command in (
                ("plain", [sys.executable, "plain.py", str(data), str(root / "plain.jsonl")]),
                ("chunbot", [sys.executable, "-m", "chunbot_cli", "run", "p.yaml", "--quiet"]),
            ):
                best = None
                for _ in range(args.repeat):
                    shutil.rmtree(root / "runs", ignore_errors=True)
                    seconds, rss = measure(command, root)
                    best = min(best or (seconds, rss), (seconds, rss))
                results[side] = best
                seconds, rss = best
                print(f"{count:>10,} {side:<8} {seconds:>8.2f} {count / seconds:>11,.0f} "
                      f"{rss:>12.1f}")
            ratio = results["plain"][0] / results["chunbot"][0]
            print(f"{count:>10,} chunbot/plain speed ratio {ratio:.2f} "
                  f"(records of {size_mb * 1e6 / 1e6:.0f} bytes)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
