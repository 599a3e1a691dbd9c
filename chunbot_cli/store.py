"""The on-disk workdir: shard files, state.json, the lock and the per-shard journal.

Commit order for one stage of one shard, so a `kill -9` anywhere leaves a state the next
run can continue from without losing or repeating a record:
  0. when the next stage is already at work on the shard's records and they are not just
     its input's in order (some were dropped or fanned out), the keys its journal knows
     them by (`<next>/part-NNNNN.keys`);
  1. part file and trace file, each written to a temp file, fsynced, renamed;
  2. errors.jsonl cut back to the length state.json knows, then the shard's errors appended;
  3. state.json rewritten atomically with the shard marked done (this is the commit point);
  4. the shard's journal (and its own keys file) removed.
Until step 3 the shard is not done; an LLM stage's journal keeps every finished reply so
the retry of the shard sends no request twice.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import zlib
from array import array
from bisect import bisect_left
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import orjson

from .state import STATE_VERSION, Counters, ShardEntry, State

_DUMP = orjson.OPT_APPEND_NEWLINE


class StoreError(Exception):
    """The workdir cannot be read or written (a corrupt state.json, a read-only or full
    disk); the message names the file and says why, for the user as is."""


class CorruptState(StoreError):
    """A state.json chunbot cannot read. Moving it away starts the workdir afresh, which
    the response cache answers only if the pipeline has one: the workdir does not know,
    so `advice(cached)` says it for whoever does; str() leaves the cache out."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(self.advice(cached=False))

    def advice(self, cached: bool) -> str:
        advice = f"{self.problem}; move it away to start this workdir afresh"
        return advice + " (the cache keeps the replies)" if cached else advice


def describe(error: OSError) -> str:
    """An OSError as one line: what could not be done to which file."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


class Locked(Exception):
    """Another live process holds the workdir's lock."""

    def __init__(self, path: Path, pid: str):
        super().__init__(f"another chunbot run (pid {pid or '?'}) holds {path}; "
                         "try again when it has finished")
        self.pid = pid


def dumps_lines(records: Iterable[Any]) -> bytes:
    """JSON lines, joined a few hundred at a time: each bytes object orjson returns carries
    a buffer well beyond its length (4 KB and up), so one alive per record of a shard, as a
    single join of them all keeps, cost 19 KB a record for 2 KB traces."""
    items = iter(records)
    parts = []
    while chunk := list(itertools.islice(items, 256)):
        parts.append(b"\n".join(map(orjson.dumps, chunk)))
    data = b"\n".join(parts)
    return data + b"\n" if data else data


def encode_lines(items: list[Any]) -> tuple[bytes, list[tuple[int, str]]]:
    """JSON lines of `items`, and the positions of those JSON cannot hold (left out) with
    why: a set, a key that is not a string, nesting deeper than orjson writes (254)."""
    try:
        return dumps_lines(items), []
    except TypeError:  # orjson.JSONEncodeError is one
        pass
    lines, bad = [], []
    for i, item in enumerate(items):
        try:
            lines.append(orjson.dumps(item))
        except TypeError as e:
            bad.append((i, str(e)))
    data = b"\n".join(lines)
    return (data + b"\n" if data else data), bad


def printable(value: Any) -> Any:
    """`value` as JSON can hold it, for an error line about a value that JSON cannot."""
    try:
        return orjson.loads(orjson.dumps(value, default=repr, option=orjson.OPT_NON_STR_KEYS))
    except TypeError:
        return repr(value)[:2000]


TEMP_MARK = ".tmp"


def failpoint(name: str) -> None:
    """Die by SIGKILL here when CHUNBOT_FAILPOINT names this point: tests use it to crash
    a real run exactly where a crash costs the most (documented in the README)."""
    if os.environ.get("CHUNBOT_FAILPOINT") == name:
        os.kill(os.getpid(), 9)


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Write a file so readers see either the old or the whole new content, even after a
    crash (`sync` False: after a crash, maybe neither, for files that are rebuilt)."""
    with atomic_file(path, sync) as f:
        f.write(data)


@contextmanager
def atomic_file(path: Path, sync: bool = True) -> Iterator[IO[bytes]]:
    """A file to write that appears at `path` whole when the block ends (a temp file,
    fsynced unless `sync` is False, then renamed), or not at all when it fails."""
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # a full disk must not keep what it could not finish
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write(2) names no file: say which
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Workdir:
    """`runs/<name>/`: one folder per stage with its shards, plus state.json and lock."""

    def __init__(self, path: Path, compress: str | None = None):
        self.path = Path(path)
        self.compress = compress
        self.suffix = ".jsonl.zst" if compress == "zstd" else ".jsonl"

    # layout
    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def part_path(self, stage: str, shard: int) -> Path:
        return self.path / stage / f"part-{shard:05d}{self.suffix}"

    def trace_path(self, stage: str, shard: int) -> Path:
        """Where a shard's trace is written: `trace-NNNNN`, so that `part-*.jsonl` is
        the records and nothing else."""
        return self.path / stage / f"trace-{shard:05d}{self.suffix}"

    def _old_trace_path(self, stage: str, shard: int) -> Path:
        return self.path / stage / f"part-{shard:05d}.trace{self.suffix}"  # before 2026-12

    def find_trace(self, stage: str, shard: int) -> Path:
        """The shard's trace file, under today's name or the one older workdirs have."""
        path = self.trace_path(stage, shard)
        old = self._old_trace_path(stage, shard)
        return old if not path.exists() and old.exists() else path

    def index_path(self, stage: str, shard: int) -> Path:
        return self.path / stage / f"part-{shard:05d}.ids"

    def journal_path(self, stage: str, shard: int) -> Path:
        return self.path / stage / f"part-{shard:05d}.journal"

    def keys_path(self, stage: str, shard: int) -> Path:
        return self.path / stage / f"part-{shard:05d}.keys"

    def write_keys(self, stage: str, shard: int, source: str, keys: list[Key]) -> None:
        """The keys the stage's journal knows the records of its upstream part by, when
        they are not their places in it (the upstream dropped or fanned out records while
        this stage was already at work): written before the upstream's commit, removed
        with this stage's journal."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.keys_path(stage, shard), orjson.dumps({"src": source, "keys": keys}))

    def read_keys(self, stage: str, shard: int, source: str) -> list[Key] | None:
        """The keys `write_keys` left for the shard read from `source`, if any."""
        try:
            data = orjson.loads(self.keys_path(stage, shard).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("src") != source:
            return None
        return data["keys"]

    def load_batches(self, stage: str) -> dict[str, Any]:
        """<stage>/batches.json: per shard, the provider batches it waits for."""
        path = self.stage_dir(stage) / "batches.json"
        try:
            ledgers = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as e:
            raise StoreError(f"{path}: cannot read it ({e}); the batches it names can be "
                             "found in the provider's console") from None
        if not isinstance(ledgers, dict) or not all(isinstance(v, dict)
                                                    for v in ledgers.values()):
            raise StoreError(f"{path}: not a chunbot batches file")
        return ledgers

    def save_batches(self, stage: str, ledgers: dict[str, Any]) -> None:
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        write_atomic(self.stage_dir(stage) / "batches.json", orjson.dumps(ledgers))

    def errors_path(self, stage: str) -> Path:
        return self.path / stage / "errors.jsonl"

    # state
    def errors_by_id(self, stage: str) -> dict[Any, str]:
        """Why each record in a stage's errors.jsonl failed, by its _id (the first reason)."""
        found: dict[Any, str] = {}
        try:
            lines = self.errors_path(stage).read_bytes().splitlines()
        except FileNotFoundError:
            return found
        for line in lines:
            error = orjson.loads(line)
            found.setdefault(error.get("_id"), str(error.get("error")))
        return found

    def load_state(self) -> State:
        path = self.path / "state.json"
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return State()
        except OSError as e:
            raise StoreError(f"cannot read {describe(e)}") from None
        except orjson.JSONDecodeError as e:
            raise CorruptState(f"{path}: not a state file chunbot can read ({e})") from None
        state = State.from_json(data)
        if state is None:
            raise CorruptState(f"{path}: not a chunbot state file")
        if data.get("version") != STATE_VERSION:
            raise StoreError(f"{path}: unknown state version {data.get('version')!r}")
        return state

    def save_state(self, state: State) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / "state.json", orjson.dumps(state.to_json()))

    def remove_temp_files(self) -> None:
        """Remove what writes killed half-way left behind; only the lock holder writes
        here, so every temp file is an orphan."""
        for path in (*self.path.glob(f".*{TEMP_MARK}*"), *self.path.glob(f"*/.*{TEMP_MARK}*")):
            path.unlink(missing_ok=True)

    def remove_committed_journals(self, state: State) -> None:
        """Remove journals (and keys files) of shards committed from them: a run killed
        between a commit and the journal's removal leaves them, and nothing would again.
        A journal for a committed shard made since (`rerun --failed`) has another token."""
        for path in self.path.glob("*/part-*.journal"):
            stage = state.stages.get(path.parent.name)
            entry = stage and stage.shards.get(int(path.name[5:10]))
            if entry is not None and _journal_token(path) == entry.token:
                path.unlink(missing_ok=True)
        for path in self.path.glob("*/part-*.keys"):
            stage = state.stages.get(path.parent.name)
            entry = stage and stage.shards.get(int(path.name[5:10]))
            if entry is not None and self.read_keys(path.parent.name, int(path.name[5:10]),
                                                    entry.src) is not None:
                path.unlink(missing_ok=True)  # it served the journal of that commit

    def journaled(self, stage: str, fingerprint: str, state: State) -> tuple[Counters, int]:
        """What the journals of a stage's uncommitted shards hold (records a stopped or
        killed run finished, which the next run takes up), and how many shards they are."""
        counts, shards = Counters(), 0
        for _, header, lines in self._open_journals(stage, state):
            if header.get("fingerprint") != fingerprint:
                continue  # made for another definition of the stage
            found = [e for e in map(_entry, lines[1:]) if e is not None]
            for done in found:
                counts.count(done)
            shards += bool(found)
        return counts, shards

    def _open_journals(self, stage: str, state: State
                       ) -> Iterator[tuple[Path, dict[str, Any], list[bytes]]]:
        """The journals of a stage's shards that were not committed from them: each one's
        path, header and lines (the header's first)."""
        saved = state.stages.get(stage)
        for path in sorted(self.stage_dir(stage).glob("part-*.journal")):
            try:
                lines = path.read_bytes().split(b"\n")
                header = orjson.loads(lines[0])
            except (OSError, orjson.JSONDecodeError):
                continue  # gone meanwhile, or no journal a load would take
            entry = saved.shards.get(int(path.name[5:10])) if saved is not None else None
            if isinstance(header, dict) and not (entry is not None
                                                 and header.get("token") == entry.token):
                yield path, header, lines

    def forget_failures(self, stage: str, state: State, committed: list[int]) -> None:
        """Forget the failed records of a stage that failed as a whole, so the next run asks
        for them again: drop them from the journals of its uncommitted shards, and undo
        this run's commits of shards whose every record failed (made before it stopped)."""
        stage_state = state.stages[stage]
        for path, _, lines in self._open_journals(stage, state):
            kept = [line for line in lines[1:]
                    if (entry := _entry(line)) is not None and not entry.failed]
            write_atomic(path, b"\n".join([lines[0], *kept]) + b"\n")
        shards = stage_state.shards
        undone = {k for k in committed
                  if k in shards and shards[k].counts.failed == shards[k].counts.records_in}
        if undone:
            stage_state.errors_bytes = self.drop_errors(stage, undone)
            for k in undone:
                del stage_state.shards[k]
                self.remove_shard(stage, k)
            self.save_state(state)

    # lock
    @contextmanager
    def lock(self) -> Iterator[str | None]:
        """Hold the workdir lock; yields the pid of a dead previous holder, if any.

        flock is released by the kernel when its holder dies, so a lock left by a killed
        run is taken over without asking.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Locked(path, os.pread(fd, 32, 0).decode(errors="replace").strip()) from None
            previous = os.pread(fd, 32, 0).decode(errors="replace").strip() or None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield previous
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # stage folders
    def reset_stage(self, stage: str) -> None:
        """Set a stage's old output aside as `<stage>.prev/` (one generation) and start empty."""
        folder = self.stage_dir(stage)
        if folder.exists():
            previous = self.path / f"{stage}.prev"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(folder, previous)
        folder.mkdir(parents=True)

    def snapshot_stage(self, stage: str) -> None:
        """Keep the stage's current output as `<stage>.prev/` while it is partly redone.

        Part and trace files are hard links (a commit replaces them by rename, so the links
        keep the old content); errors.jsonl, which is rewritten in place, is copied."""
        folder, previous = self.stage_dir(stage), self.path / f"{stage}.prev"
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        for path in folder.iterdir():
            if path.name == "errors.jsonl":
                shutil.copy2(path, previous / path.name)
            elif path.name.startswith(("part-", "trace-")) and not path.name.endswith((".journal", ".keys")):
                os.link(path, previous / path.name)

    def write_id_index(self, stage: str, shard: int, ids: "list[Any] | array") -> None:
        """The first stage's shards carry the sorted CRC-32s of their records' ids, so
        `chunbot trace` finds a record's shard among millions without reading them. It is
        a look-up aid, rebuilt with the shard: no fsync. `ids` may be that index already
        (an array, from duplicates.DuplicateIds.add, which needs the same CRCs)."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        crcs = ids if isinstance(ids, array) else array("I", sorted(id_crc(i) for i in ids))
        write_atomic(self.index_path(stage, shard), crcs.tobytes(), sync=False)

    def shards_holding(self, stage: str, record_id: Any) -> list[int]:
        """The shards whose id index has `record_id` (a CRC-32 match: check the records)."""
        crc, found = id_crc(record_id), []
        for path in sorted(self.stage_dir(stage).glob("part-*.ids")):
            crcs = array("I")
            crcs.frombytes(path.read_bytes())
            at = bisect_left(crcs, crc)
            if at < len(crcs) and crcs[at] == crc:
                found.append(int(path.name[5:10]))
        return found

    def read_trace(self, stage: str, shard: int) -> list[dict[str, Any]]:
        try:
            return self._read_lines(self.find_trace(stage, shard))
        except FileNotFoundError:
            return []

    def remove_shard(self, stage: str, shard: int) -> None:
        for path in (self.part_path(stage, shard), self.trace_path(stage, shard),
                     self._old_trace_path(stage, shard),
                     self.journal_path(stage, shard), self.keys_path(stage, shard),
                     self.index_path(stage, shard)):
            path.unlink(missing_ok=True)

    # shard files
    def write_shard(self, stage: str, shard: int, records: bytes, trace: bytes | None) -> int:
        """Write a shard's part and trace files; returns the part's size on disk."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        encoded = self._encode(records)
        write_atomic(self.part_path(stage, shard), encoded)
        if trace is not None:
            write_atomic(self.trace_path(stage, shard), self._encode(trace))
            self._old_trace_path(stage, shard).unlink(missing_ok=True)  # now out of date
        _fsync_dir(folder)
        return len(encoded)

    def part_damage(self, stage: str, shard: int, entry: ShardEntry) -> str | None:
        """Why a committed shard's part file cannot be trusted (gone, or not the size its
        commit wrote: cut short, emptied, appended to), or None; one stat, no read."""
        path = self.part_path(stage, shard)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        if entry.part_bytes is not None and size != entry.part_bytes:
            return (f"{path} is damaged: {size:,} bytes where its commit wrote "
                    f"{entry.part_bytes:,}")
        return None

    def read_part(self, stage: str, shard: int, entry: ShardEntry | None) -> bytes:
        """A committed part's JSONL, checked against what its commit wrote; raises
        StoreError naming the file when it is not that."""
        path = self.part_path(stage, shard)
        why = self.part_damage(stage, shard, entry) if entry is not None else None
        data = b"" if why else self.read_bytes(path)
        records = data.count(b"\n")
        if why is None and entry is not None and entry.part_records not in (None, records):
            why = (f"{path} is damaged: {records:,} records where its commit wrote "
                   f"{entry.part_records:,}")
        if why:
            raise StoreError(f"{why}; run again to recompute that shard")
        return data

    def export(self, stage: str, shards: dict[int, ShardEntry], path: Path) -> int:
        """Write the stage's records of `shards`, in order, to one JSONL file (zstd when it
        ends in .zst), atomically; returns how many records it holds. Raises StoreError
        when a part is not what its commit wrote (the output is left as it was)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with atomic_file(path) as raw:
            sink: Any = raw
            if path.name.endswith(".zst"):
                import zstandard
                sink = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
            for shard in sorted(shards):
                data = self.read_part(stage, shard, shards[shard])
                count += data.count(b"\n")
                sink.write(data)
            if sink is not raw:
                sink.close()
            failpoint("export-written")
        return count

    def read_shard(self, stage: str, shard: int) -> list[dict[str, Any]]:
        return self._read_lines(self.part_path(stage, shard))

    def _read_lines(self, path: Path) -> list[dict[str, Any]]:
        return read_lines(path, self.compress)

    def read_bytes(self, path: Path) -> bytes:
        """A part or trace file's JSONL, decompressed."""
        return read_bytes(path, self.compress)

    def _encode(self, data: bytes) -> bytes:
        if self.compress == "zstd":
            import zstandard
            return zstandard.ZstdCompressor(level=3).compress(data)
        return data

    def append_errors(self, stage: str, committed: int, lines: bytes) -> int:
        """Append a shard's error lines after the last committed length; returns the new one.

        Cutting back to `committed` first drops lines of a commit that crashed before
        state.json recorded it, so a retried shard never lists an error twice.
        """
        path = self.errors_path(stage)
        if not lines and not path.exists():
            return committed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            committed = min(committed, os.fstat(fd).st_size)
            os.ftruncate(fd, committed)
            if lines:
                os.pwrite(fd, lines, committed)
                os.fsync(fd)
        except OSError as e:
            e.filename = str(path)
            raise
        finally:
            os.close(fd)
        return committed + len(lines)

    def failure_reasons(self, stage: str, scan: int = 100_000) -> tuple[Counter[str], int]:
        """Why the records in the stage's errors.jsonl failed: a count per reason (record
        details such as a file's line number left out, so alike failures add up) over
        its first `scan` lines, and how many lines were read."""
        reasons: Counter[str] = Counter()
        read = 0
        try:
            with open(self.errors_path(stage), "rb") as f:
                for line in itertools.islice(f, scan):
                    read += 1
                    try:
                        error = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(error, dict):
                        reasons[reason_of(error)] += 1
        except FileNotFoundError:
            pass
        return reasons, read

    def drop_errors(self, stage: str, shards: set[int]) -> int:
        """Rewrite errors.jsonl without the lines of `shards` (being redone); returns its length."""
        path = self.errors_path(stage)
        try:
            lines = path.read_bytes().splitlines(keepends=True)
        except FileNotFoundError:
            return 0
        kept = b"".join(line for line in lines if _shard_of(line) not in shards)
        write_atomic(path, kept)
        return len(kept)


def _entry(line: bytes) -> Entry | None:
    """The entry a journal line holds; None for a torn line or one chunbot did not write."""
    try:
        return Entry.from_json(orjson.loads(line))
    except orjson.JSONDecodeError:
        return None


def _journal_token(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            header = orjson.loads(f.readline())
    except (OSError, orjson.JSONDecodeError):
        return None
    return header.get("token") if isinstance(header, dict) else None


def read_bytes(path: Path | str, compress: str | None) -> bytes:
    """A part or trace file's JSONL, decompressed."""
    data = Path(path).read_bytes()
    if compress == "zstd":
        import zstandard
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def read_lines(path: Path | str, compress: str | None) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in read_bytes(path, compress).splitlines()]


def id_crc(record_id: Any) -> int:
    return zlib.crc32(str(record_id).encode())


def reason_of(error: dict[str, Any]) -> str:
    """An error line's reason, without what is particular to its record."""
    reason = str(error.get("error", "?"))
    if error.get("file") and error.get("line"):
        reason = reason.removeprefix(f"{error['file']}:{error['line']}: ")
    reason = _ATTEMPTS.sub("", reason)
    return reason if len(reason) <= 160 else reason[:159] + "…"


_ATTEMPTS = re.compile(r" \(after \d+ attempts\)")


def _shard_of(line: bytes) -> int | None:
    try:
        return orjson.loads(line).get("shard")
    except (orjson.JSONDecodeError, AttributeError):
        return None


Key = int  # a record's place in a shard (see stages.py)


@dataclass(slots=True)
class Entry:
    """A finished record of an LLM stage: its output, or why it failed, and its trace
    (what `chunbot trace` shows); one line of the journal."""

    key: Key
    trace: dict[str, Any]
    out: Any = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"i": self.key, "error": self.error, "trace": self.trace}
        return {"i": self.key, "out": self.out, "trace": self.trace}

    @classmethod
    def from_json(cls, data: Any) -> "Entry | None":
        """The entry a journal line holds; None for a line chunbot did not write."""
        if not isinstance(data, dict) or not isinstance(data.get("trace"), dict):
            return None
        key = data.get("i")
        if type(key) is not int or key < 0:
            return None
        if isinstance(data.get("error"), str):
            return cls(key, data["trace"], error=data["error"])
        if "out" in data:
            return cls(key, data["trace"], out=data["out"])
        return None


class Journal:
    """Append-only log of finished records of one LLM stage shard, for exactly-once resume.

    The first line names the stage fingerprint and the shard's source, and the token the
    shard will be committed with (downstream stages read it as their source while the
    shard is still in the making); a journal written for other inputs is discarded. Each
    later line is one finished record, written with a single write(2) as soon as its reply
    is in, so a killed run loses at most the replies still in flight.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.token = os.urandom(8).hex()  # a fresh journal's; an earlier one's if reused
        self._fd: int | None = None

    def load(self) -> dict[Key, Entry]:
        """Entries by key from an earlier, interrupted attempt."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        lines = data.split(b"\n")
        try:
            header = orjson.loads(lines[0])
        except orjson.JSONDecodeError:
            return {}
        if not isinstance(header, dict) or {k: v for k, v in header.items()
                                            if k != "token"} != self.header:
            return {}
        if isinstance(header.get("token"), str):
            self.token = header["token"]
        entries = {}
        for entry in map(_entry, lines[1:]):
            if entry is not None:  # a torn last line, the empty tail or a line chunbot did
                entries[entry.key] = entry  # not write is ignored
        return entries

    def open(self, keep: dict[Key, Entry]) -> None:
        """Start appending, after rewriting the file as the header plus `keep`.

        The rewrite drops a torn last line and entries of a journal written for other inputs.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = (keep[k].to_json() for k in sorted(keep))
        header = {**self.header, "token": self.token}
        write_atomic(self.path, orjson.dumps(header, option=_DUMP) + dumps_lines(entries))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, entry: Entry) -> None:
        try:
            line = orjson.dumps(entry.to_json(), option=_DUMP)
        except TypeError:
            return  # not journalled: after a crash this record is simply asked again
        try:
            os.write(self._fd, line)
        except OSError as e:
            e.filename = str(self.path)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
