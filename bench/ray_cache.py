"""Should Ray workers look replies up in the driver's SQLite cache through an actor?

Measures, on this machine: a lookup in a local SQLite cache file (chunbot's SQLiteStore)
against the same lookup through a Ray actor that holds the file — one key at a time (how
records reach a downstream stage: a few at a time) and 1,000 keys at a time (a first
stage's shard). Prints µs per key and the ratio. No target: it decides a design (README,
"Many machines": each worker opens the pipeline's cache itself).

    .venv/bin/python bench/ray_cache.py            # ~15 s, most of it Ray's start
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# bench/ray.py sits beside this script: `import ray` must find Ray, not it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

for name, value in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}.items():
    os.environ.setdefault(name, value)

from chunbot_cli.llm.cache import SQLiteStore  # noqa: E402


class CacheActor:
    def __init__(self, path: str):
        self.store = SQLiteStore(Path(path), None)

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        return self.store.get_many(keys)


def per_key(lookup, keys: list[bytes], size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(keys), size):
        lookup(keys[i:i + size])
    return (time.perf_counter() - started) / len(keys) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    args = parser.parse_args()
    import ray

    folder = Path(tempfile.mkdtemp(prefix="chunbot-raycache-"))
    try:
        store = SQLiteStore(folder / "cache.sqlite3", None)
        items = [(os.urandom(32), b"x" * 300) for _ in range(args.keys)]
        store.put_many(items)
        keys = [key for key, _ in items]
        ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=int(1e8),
                 _temp_dir="/tmp/chunbot-raycache")
        actor = ray.remote(num_cpus=0)(CacheActor).remote(str(folder / "cache.sqlite3"))
        ray.get(actor.get_many.remote(keys[:1]))

        def remote(chunk: list[bytes]) -> None:
            actor.get_many.remote(chunk).future().result(timeout=60)  # no ray.get: see below

        one = keys[: min(len(keys), 2_000)]
        rows = [("1 key a lookup", per_key(store.get_many, one, 1), per_key(remote, one, 1)),
                ("1,000 keys a lookup", per_key(store.get_many, keys, 1000),
                 per_key(remote, keys, 1000))]
        print(f"{'':22} {'local file':>12} {'through an actor':>18} {'ratio':>7}")
        for label, local, through in rows:
            print(f"{label:22} {local:9.1f} µs {through:15.1f} µs {through / local:6.1f}x")
        print("(a blocking ray.get inside a task lends its CPU to another task meanwhile, "
              "so a worker would wait on a future instead, as here)")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
