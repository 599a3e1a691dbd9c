"""The response cache: a finished reply per request, in SQLite (default) or Redis (shared).

A request's key is the SHA-256 of the canonical JSON (sorted keys) of what decides its
reply: the provider kind, the alias's `base_url` (a local server and a vendor serving the
same model name never share replies), the model name, the messages and every parameter,
and the stage's cache namespace. Not in it: the API key, the streaming flags, and which of
the alias's endpoints answers.

Only replies the stage accepted are stored. Reads are batched (a shard's keys in a few
queries) and writes are buffered and flushed in batches, both on one I/O thread, so the
cache never holds up the event loop. A batch is written when it has WRITE_BATCH replies or
when its first is FLUSH_SECONDS old, whichever comes first, so a run killed with -9 loses at
most about a second of replies however slow it is (the rest at the end of a run, SIGINT and
SIGTERM included). SQLite runs in WAL mode with a busy timeout, so
several chunbot processes can share one file; Redis (redis-py, `pip install
'chunbot[redis]'`) is for teams and runs on many machines.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import orjson

from ..config import CacheSpec, ModelSpec
from .types import Reply, Request

WRITE_BATCH = 500
FLUSH_SECONDS = 1.0  # the longest a reply waits in the buffer: what a kill -9 may lose
READ_BATCH = 500
STREAM_FLAGS = ("stream", "stream_options")


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chunbot" / "cache.sqlite3"


def request_key(spec: ModelSpec, request: Request, namespace: str | None = None) -> bytes:
    return KeyMaker(spec, request.params, namespace)(request)


class KeyMaker:
    """Request keys for one model and one set of parameters (a stage's): the part that is
    the same for every record is serialised once, the messages for each."""

    def __init__(self, spec: ModelSpec, params: dict[str, Any], namespace: str | None):
        params = {k: v for k, v in params.items() if k not in STREAM_FLAGS}
        if spec.provider == "anthropic":
            params.setdefault("max_tokens", spec.max_tokens)  # sent either way: it shapes replies
        identity = {**spec.identity(), "params": params, "namespace": namespace}
        self.prefix = orjson.dumps(identity, option=orjson.OPT_SORT_KEYS) + b"\n"

    def __call__(self, request: Request) -> bytes:
        messages = orjson.dumps(request.messages, option=orjson.OPT_SORT_KEYS)
        if request.schema is not None:  # a structured request is another request
            messages += orjson.dumps(request.schema, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(self.prefix + messages).digest()


def encode(reply: Reply) -> bytes:
    return orjson.dumps({"text": reply.text, "model": reply.model, "in": reply.input_tokens,
                         "out": reply.output_tokens, "finish": reply.finish_reason})


def decode(data: bytes) -> Reply:
    value = orjson.loads(data)
    return Reply(text=value["text"], model=value["model"], input_tokens=value["in"],
                 output_tokens=value["out"], finish_reason=value["finish"])


@dataclass
class CacheStats:
    entries: int
    bytes: int
    where: str
    last_run: dict[str, Any]


class SQLiteStore:
    def __init__(self, path: Path, ttl: float | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.ttl = ttl
        self.db = sqlite3.connect(path, timeout=60, check_same_thread=False,
                                  isolation_level=None)
        self._setup()

    def _setup(self) -> None:
        """Switch to WAL and create the tables. Two processes opening a new file at once
        can get 'database is locked' here without SQLite's busy wait: try again."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("CREATE TABLE IF NOT EXISTS replies (key BLOB PRIMARY KEY, "
                                "value BLOB NOT NULL, created REAL NOT NULL)")
                self.db.execute("CREATE TABLE IF NOT EXISTS meta "
                                "(name TEXT PRIMARY KEY, value BLOB)")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        since = time.time() - self.ttl if self.ttl else 0.0
        found = {}
        for start in range(0, len(keys), READ_BATCH):
            chunk = keys[start: start + READ_BATCH]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(
                f"SELECT key, value FROM replies WHERE key IN ({marks}) AND created >= ?",
                (*chunk, since)).fetchall())
        return found

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)",
                                [(key, value, now) for key, value in items])

    def set_meta(self, name: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def get_meta(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def stats(self) -> tuple[int, int]:
        entries = self.db.execute("SELECT count(*) FROM replies").fetchone()[0]
        size = sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))
        return entries, size

    def clear(self, older_than: float | None) -> int:
        cutoff = time.time() - older_than if older_than else float("inf")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            removed = self.db.execute("DELETE FROM replies WHERE created < ?",
                                      (cutoff,)).rowcount
        if older_than is None:
            self.db.execute("VACUUM")
        return removed

    def close(self) -> None:
        self.db.close()

    def __str__(self) -> str:
        return str(self.path)


class RedisStore:
    PREFIX = b"chunbot:reply:"

    def __init__(self, url: str, ttl: float | None):
        try:
            import redis
        except ImportError:
            raise RuntimeError("the redis cache needs redis-py: pip install 'chunbot[redis]'") \
                from None
        self.url = url
        self.ttl = ttl
        self.client = redis.Redis.from_url(url)

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        found = {}
        for start in range(0, len(keys), READ_BATCH):
            chunk = keys[start: start + READ_BATCH]
            for key, value in zip(chunk, self.client.mget([self.PREFIX + k for k in chunk])):
                if value is not None:
                    found[key] = value[8:]
        return found

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        stamp = int(time.time()).to_bytes(8, "big")  # kept in front for clear --older-than
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self.PREFIX + key, stamp + value, ex=int(self.ttl) if self.ttl else None)
        pipe.execute()

    def set_meta(self, name: str, value: bytes) -> None:
        self.client.set(b"chunbot:meta:" + name.encode(), value)

    def get_meta(self, name: str) -> bytes | None:
        return self.client.get(b"chunbot:meta:" + name.encode())

    def _keys(self) -> Iterable[bytes]:
        return self.client.scan_iter(match=self.PREFIX + b"*", count=1000)

    def stats(self) -> tuple[int, int]:
        entries = sum(1 for _ in self._keys())
        return entries, int(self.client.info("memory").get("used_memory", 0))

    def clear(self, older_than: float | None) -> int:
        cutoff = time.time() - older_than if older_than else float("inf")
        removed = 0
        batch: list[bytes] = []
        for key in self._keys():
            batch.append(key)
            if len(batch) >= 1000:
                removed += self._drop(batch, cutoff)
                batch = []
        return removed + (self._drop(batch, cutoff) if batch else 0)

    def _drop(self, keys: list[bytes], cutoff: float) -> int:
        values = self.client.mget(keys)
        old = [k for k, v in zip(keys, values)
               if v is not None and int.from_bytes(v[:8], "big") < cutoff]
        return self.client.delete(*old) if old else 0

    def close(self) -> None:
        self.client.close()

    def __str__(self) -> str:
        return self.url


def open_store(spec: CacheSpec) -> SQLiteStore | RedisStore:
    if spec.backend == "redis":
        return RedisStore(spec.url or "redis://127.0.0.1:6379/0", spec.ttl)
    return SQLiteStore(Path(spec.path) if spec.path else default_path(), spec.ttl)


class Cache:
    """The run's cache: batched lookups, buffered writes, hit and miss counts."""

    def __init__(self, spec: CacheSpec, read: bool = True, write: bool = True):
        self.store = open_store(spec)
        self.read, self.write = read, write
        self.hits = self.misses = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache")
        self._pending: list[tuple[bytes, bytes]] = []
        self._due: asyncio.TimerHandle | None = None  # the time-bound flush of _pending
        self._flushes: list[asyncio.Future[None]] = []
        self._failed: BaseException | None = None  # the first write that failed

    async def get_many(self, keys: list[bytes]) -> dict[bytes, Reply]:
        if not self.read or not keys:
            return {}
        found = await asyncio.get_running_loop().run_in_executor(
            self._io, self.store.get_many, keys)
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return {key: decode(value) for key, value in found.items()}

    def put(self, key: bytes, reply: Reply) -> None:
        if not self.write:
            return
        self._pending.append((key, encode(reply)))
        if len(self._pending) >= WRITE_BATCH:
            self._flush()
        elif self._due is None:  # one timer per batch, not per reply: cheap under load
            self._due = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._due is not None:
            self._due.cancel()  # harmless when it is the timer that called
            self._due = None
        items, self._pending = self._pending, []
        for flush in self._flushes:
            if flush.done() and flush.exception() is not None:
                self._failed = self._failed or flush.exception()
        self._flushes = [f for f in self._flushes if not f.done()]
        self._flushes.append(asyncio.get_running_loop().run_in_executor(
            self._io, self.store.put_many, items))

    async def flush(self) -> None:
        """Write what is buffered now (a Ray worker, whose cache outlives each job); raises
        the first write that failed since the last flush."""
        if self._pending:
            self._flush()
        for outcome in await asyncio.gather(*self._flushes, return_exceptions=True):
            if isinstance(outcome, BaseException):
                self._failed = self._failed or outcome
        self._flushes = []
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    async def close(self) -> None:
        """Write what is buffered, note this run's hits and misses, let go of the store;
        raises the first write that failed (the replies are in the run's output all the
        same: only later runs miss them)."""
        if self._pending:
            self._flush()
        self.write = False  # a reply that comes in after this has no store to go to
        loop = asyncio.get_running_loop()
        try:
            for outcome in await asyncio.gather(*self._flushes, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    self._failed = self._failed or outcome
            last_run = orjson.dumps({"hits": self.hits, "misses": self.misses,
                                     "ended": time.time()})
            await loop.run_in_executor(self._io, self.store.set_meta, "last_run", last_run)
        finally:
            await loop.run_in_executor(self._io, self.store.close)
            self._io.shutdown()
        if self._failed is not None:
            raise self._failed


def stats(spec: CacheSpec) -> CacheStats:
    store = open_store(spec)
    try:
        entries, size = store.stats()
        last = store.get_meta("last_run")
        return CacheStats(entries, size, str(store), orjson.loads(last) if last else {})
    finally:
        store.close()


def clear(spec: CacheSpec, older_than: float | None = None) -> int:
    store = open_store(spec)
    try:
        return store.clear(older_than)
    finally:
        store.close()
