"""`chunbot diff` benchmark: two shard folders of N records each, joined in bounded memory.

A is N records of about 500 bytes in part files of 100,000 (ids in random order, as a
pipeline's output keyed by record id would be); B holds the same records in another
random order, with ~5% of them changed (a categorical `label`, a free-text `reply`, or
both), 100 records left out (only in A) and 100 new ones (only in B). The diff runs in its
own process (`chunbot_cli.cli.show_diff`, table output); we measure its wall time
and peak RSS (its own and that of the child it forks to read B, added up, as if both peaks
were at the same moment) and check the counts it reports.

    python bench/diff.py                      # 2 × 2,000,000 records (data in bench/out/)
    python bench/diff.py --records 200000     # quicker
    python bench/diff.py --sequential         # B read after A, in the same process
"""

from __future__ import annotations

import argparse
import os
import random
import re
import string
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
PART = 100_000
LABELS = ["positive", "negative", "neutral", "mixed"]
RSS_LIMIT_MB = 300
CHILD = """
import resource, sys
from chunbot_cli.cli import show_diff
from chunbot_cli.lookback import diff
diff.PARALLEL = sys.argv[4] == "parallel"
with open(sys.argv[3], "w") as out:
    code = show_diff(sys.argv[1], sys.argv[2], out=out)
peaks = [resource.getrusage(who).ru_maxrss for who in
         (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print(*peaks, file=sys.stderr)
sys.exit(code)
"""


def _texts(rng: random.Random, count: int, length: int) -> list[str]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
             for _ in range(3000)]
    return [" ".join(rng.choices(words, k=length // 4))[:length] for _ in range(count)]


def _write_parts(folder: Path, records: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(records), PART):
        (folder / f"part-{start // PART:05d}.jsonl").write_bytes(
            b"".join(records[start:start + PART]))


def generate(folder: Path, count: int) -> dict[str, int]:
    """Write A/ and B/ under folder; return the counts the diff must report.

    The lines are `orjson.dumps(…) + b"\\n"`: the concatenation is a right-sized copy,
    where orjson's own result would keep a block of ~4 KB alive per line held.
    """
    rng = random.Random(11)
    texts, replies = _texts(rng, 5000, 300), _texts(rng, 5000, 90)
    order = list(range(count))
    rng.shuffle(order)
    a_lines: list[bytes] = []
    b_lines: list[bytes] = []
    changed = 0
    dropped = set(rng.sample(range(count), 100))
    for i in order:
        record = {"_id": f"r{i:09d}", "user": (i * 7919) % 1_000_003, "rating": i % 5 + 1,
                  "lang": "en", "text": texts[i % 5000], "label": LABELS[(i // 7) % 4],
                  "reply": replies[(i * 13) % 5000], "model": "sim-small"}
        a_lines.append(orjson.dumps(record) + b"\n")  # (a right-sized copy: see generate)
        if i in dropped:
            continue
        roll = rng.random()
        if roll < 0.05:
            changed += 1
            if roll < 0.03:
                record["label"] = LABELS[((i // 7) + 1 + (roll < 0.01)) % 4]
            if roll > 0.02:
                record["reply"] = record["reply"][:60] + " — rewritten by the bigger model"
        b_lines.append(orjson.dumps(record) + b"\n")
    for j in range(100):
        b_lines.append(orjson.dumps({"_id": f"n{j:09d}", "label": "neutral", "reply": "new"})
                       + b"\n")
    rng.shuffle(b_lines)
    _write_parts(folder / "A", a_lines)
    del a_lines
    _write_parts(folder / "B", b_lines)
    expected = {"same": count - 100 - changed, "changed": changed, "only in A": 100,
                "only in B": 100}
    (folder / "expected.json").write_bytes(orjson.dumps(expected))
    return expected


def measure(command: list[str]) -> tuple[int, float, float, str]:
    """Exit code, wall seconds, peak RSS in MB (os.wait4: the largest process of the
    child's tree) and stderr of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    error = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.stderr.close()
    return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 1024, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2_000_000, help="records per side")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/diff")
    parser.add_argument("--sequential", action="store_true",
                        help="read B after A in the same process (no forked reader)")
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.out / str(args.records)
    if args.generate:
        generate(folder, args.records)
        return
    if (folder / "expected.json").exists():
        expected = orjson.loads((folder / "expected.json").read_bytes())
    else:
        # in a child process: a process forked by a big parent inherits its peak RSS
        print(f"generating 2 × {args.records:,} records in {folder} …", flush=True)
        subprocess.run([sys.executable, __file__, "--generate", "--records", str(args.records),
                        "--out", str(args.out)], check=True)
        expected = orjson.loads((folder / "expected.json").read_bytes())
    size = sum(p.stat().st_size for p in (folder / "A").iterdir())
    report = folder / "report.txt"
    code, seconds, largest, error = measure(
        [sys.executable, "-c", CHILD, str(folder / "A"), str(folder / "B"), str(report),
         "sequential" if args.sequential else "parallel"])
    text = report.read_text()
    # the diff reads B in a forked child while it reads A: count both processes' peaks
    *error_lines, peaks = error.strip().splitlines() or ["0 0"]
    error = "\n".join(error_lines)
    own, reader = (int(n) / 1024 for n in peaks.split())
    rss = own + reader
    got = {label: int(n.replace(",", "")) for label, n in
           re.findall(r"^  (same|changed|only in A|only in B) +([\d,]+)$", text, re.M)}
    total = 2 * args.records
    print(text[:text.find("fields that differ")].rstrip())
    print(f"\nrecords per side {args.records:,} (avg {size / args.records:.0f} bytes), "
          f"exit {code}{' ' + error.strip() if error.strip() else ''}")
    print(f"wall {seconds:.1f} s, {total / seconds:,.0f} records/s (both sides), "
          f"peak RSS {own:.0f} MB + {reader:.0f} MB (the child reading B) = {rss:.0f} MB "
          f"(os.wait4: {largest:.0f} MB)")
    print(f"counts {'PASS' if got == expected and code == 1 else 'FAIL'}: expected {expected}")
    print(f"peak RSS < {RSS_LIMIT_MB} MB: {'PASS' if rss < RSS_LIMIT_MB else 'FAIL'}")


if __name__ == "__main__":
    main()
