"""Schema validators: which one checks `schema:` replies, measured on 100,000 replies.

The schema is a `facts` stage's (an object with required `product` and `defect` strings and
an optional `severity` enum, no other keys); 100,000 parsed replies (orjson round trip), a
quarter of them missing `defect` and a tenth with a `severity` outside the enum. Each
validator checks all of them and reports why each invalid one was refused:

  fastjsonschema   fastjsonschema.compile(schema), then the compiled function per reply
                   (it raises on the first problem)
  jsonschema       jsonschema.Draft202012Validator(schema).iter_errors(reply) per reply
                   (every problem)

Printed: seconds for the 100k, microseconds per reply, invalid replies found (both must
agree), the first error message, and each package's import time (`python -X importtime`).
The validators run in a venv of their own under bench/out/validators/ (created on first
use with pip; neither is installed into chunbot's venv by this script).

    .venv/bin/python bench/validators.py            # about 10 s once the venv exists
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / "out" / "validators"
PYTHON = VENV / "bin" / "python"

MEASURE = r'''
import random, sys, time
import orjson, fastjsonschema, jsonschema

schema = {"type": "object", "required": ["product", "defect"], "additionalProperties": False,
          "properties": {"product": {"type": "string", "minLength": 1},
                         "defect": {"type": "string"},
                         "severity": {"enum": ["low", "medium", "high"]}}}
rng = random.Random(1)
replies = []
for i in range(100_000):
    reply = {"product": f"kettle {i}", "defect": "leaks",
             "severity": rng.choice(["low", "medium", "high"])}
    if i % 4 == 0:
        del reply["defect"]
    if i % 10 == 0:
        reply["severity"] = "awful"
    replies.append(orjson.loads(orjson.dumps(reply)))

start = time.perf_counter()
check = fastjsonschema.compile(schema)
compiled = time.perf_counter() - start
start, bad, first = time.perf_counter(), 0, None
for reply in replies:
    try:
        check(reply)
    except fastjsonschema.JsonSchemaValueException as e:
        bad, first = bad + 1, first or e.message
fast = time.perf_counter() - start
print(f"fastjsonschema  {fast:6.3f} s  {fast * 10:5.1f} us/reply  invalid {bad:,}  "
      f"(compile {compiled * 1e3:.1f} ms)  first error: {first!r}")

validator = jsonschema.Draft202012Validator(schema)
start, bad2, first = time.perf_counter(), 0, None
for reply in replies:
    errors = list(validator.iter_errors(reply))
    if errors:
        bad2, first = bad2 + 1, first or "; ".join(e.message for e in errors)
slow = time.perf_counter() - start
print(f"jsonschema      {slow:6.3f} s  {slow * 10:5.1f} us/reply  invalid {bad2:,}  "
      f"first error: {first!r}")
print(f"fastjsonschema is {slow / fast:.1f}x faster; both found the same invalid replies: "
      f"{'PASS' if bad == bad2 else 'FAIL'}")
'''


def import_ms(module: str) -> float:
    out = subprocess.run([str(PYTHON), "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, timeout=60).stderr
    last = [line for line in out.splitlines() if line.rstrip().endswith(f"| {module}")]
    return int(last[-1].split("|")[1]) / 1000 if last else float("nan")


def main() -> None:
    if not PYTHON.exists():
        venv.create(VENV, with_pip=True)
        subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "fastjsonschema",
                        "jsonschema", "orjson"], check=True, timeout=600)
    subprocess.run([str(PYTHON), "-c", MEASURE], check=True, timeout=300)
    print(f"import: fastjsonschema {import_ms('fastjsonschema'):.0f} ms, "
          f"jsonschema {import_ms('jsonschema'):.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
