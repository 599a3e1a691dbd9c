"""`chunbot diff A B`: two outputs joined on a key, in bounded memory, whatever their size.

This module owns what A and B may be, the join and the report:

- A side is a JSONL file (`.jsonl`, `.jsonl.zst`), a stage or shard folder (its
  `part-NNNNN.jsonl[.zst]` files in name order; traces, journals, errors.jsonl and temp
  files are not records), or a workdir `runs/<name>/` (it has `state.json`): its last stage
  with part files, in the pipeline's order; two workdirs are compared at the last stage
  they have in common.
- The join is an external sort-merge. Each side is read once (B in a forked child while
  this process reads A, when B is bigger than a run), in runs of at most `RUN_RECORDS`
  records / `RUN_BYTES` bytes sorted in memory by the key's canonical JSON
  (`orjson.dumps(key)`, so 10 sorts before 9) and spilled to a temp folder; the runs are
  merged (`FAN_IN` at a time, in several passes when there are more) and the two sorted
  streams walked side by side. Memory is about one run per process, whatever the input
  size; the temp folder needs about the size of both inputs, uncompressed.
- Per key: same, changed, only in A, only in B. A key repeated within one side (a
  duplicate id) is not hidden: a key's records are paired in their order of appearance,
  1st with 1st, 2nd with 2nd, and those one side has more of are only in that side; the
  report notes how many keys were duplicated on each side, and the JSON lines of a later
  record carry `occurrence`. Fields are the top-level fields
  except the key (or `fields`); a field missing on one side is a change; values compare
  as JSON (1 and 1.0, or 1 and true, differ). Per field: counts, a few examples and, for
  categorical fields (short strings, null or booleans, at most `MAX_CATEGORIES` distinct
  values), the agreement rate and the top confusions.
- Output: `render_table` (a plain-text report) or `Difference.to_json` lines, one per
  differing record, handed to `diff(on_difference=…)` as found. Exit codes are diff(1)'s:
  0 equal, 1 different, 2 error (`DiffError`: a missing path, a folder without part files,
  a line that is not a JSON object or lacks the key, named by file and line). Printing
  them is the `chunbot diff` command's job (cli.py).
"""

from __future__ import annotations

import heapq
import io
import os
import re
import shutil
import signal
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import orjson

RUN_RECORDS = 200_000        # records per sorted run (monkeypatched small in the tests)
RUN_BYTES = 48 << 20         # …or this many bytes of lines and keys, whichever comes first
FAN_IN = 64                  # runs merged at once; more runs are merged in several passes
PARALLEL = True              # sort B in a forked child while A is sorted (when B > a run)
EXAMPLES = 3                 # examples kept per changed field
TOP_CONFUSIONS = 5           # confusions shown per categorical field
MAX_CATEGORIES = 50          # distinct values a categorical field may have (both sides)
MAX_CATEGORY_LEN = 40        # longest string that counts as a category
WIDTH = 80                   # values in examples are cut to this many characters

_PART = re.compile(r"^part-\d+\.jsonl(\.zst)?$")
_ITEM_OVERHEAD = 50          # bytes of Python object and list slot per buffered item
_READ_BUFFER = 1 << 20
_RUN_BUFFER = 128 << 10


class DiffError(Exception):
    """A side cannot be read: the message names the path (and line) and what is wrong."""


class _Missing:
    """A field the record does not have."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "(missing)"


MISSING: Any = _Missing()


# ---------------------------------------------------------------------------------------
# what A and B are

@dataclass
class Side:
    """One side of the diff: what was given, what it turned out to be, the files read."""

    path: Path
    kind: str                       # "file" | "folder" | "workdir"
    files: list[Path]
    stage: str | None = None        # for a workdir: the stage compared
    records: int = 0                # lines read (blank lines aside)

    def describe(self) -> str:
        parts = []
        if self.stage is not None:
            parts.append(f"stage {self.stage!r}")
        if self.kind != "file":
            n = len(self.files)
            parts.append(f"{n} part file{'s' if n != 1 else ''}")
        parts.append(f"{self.records:,} records")
        return f"{self.path}  ({', '.join(parts)})"


def _part_files(folder: Path) -> list[Path]:
    try:
        names = sorted(p.name for p in folder.iterdir() if _PART.match(p.name))
    except OSError as e:
        raise DiffError(f"{folder}: {e.strerror or e}") from None
    return [folder / name for name in names]


def _workdir_stages(path: Path) -> list[str]:
    """The stages of a workdir that have part files, in the pipeline's order."""
    try:
        state = orjson.loads((path / "state.json").read_bytes())
        stages = list(state["stages"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise DiffError(f"{path / 'state.json'}: not a chunbot state file ({e})") from None
    return [s for s in stages if isinstance(s, str) and (path / s).is_dir()
            and _part_files(path / s)]


def _resolve(path: str | Path, stage: str | None = None) -> Side:
    path = Path(path)
    if not path.exists():
        raise DiffError(f"{path}: no such file or folder")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DiffError(f"{path}: permission denied")
        return Side(path, "file", [path])
    if not path.is_dir():
        raise DiffError(f"{path}: not a file or folder")
    if (path / "state.json").is_file():
        stages = _workdir_stages(path)
        if not stages:
            raise DiffError(f"{path}: a workdir whose stages have no part files yet")
        chosen = stage if stage is not None else stages[-1]
        return Side(path, "workdir", _part_files(path / chosen), chosen)
    files = _part_files(path)
    if not files:
        raise DiffError(f"{path}: no part-*.jsonl or part-*.jsonl.zst files "
                        "(not a stage folder nor a workdir)")
    return Side(path, "folder", files)


def resolve(a: str | Path, b: str | Path) -> tuple[Side, Side]:
    """What A and B are; two workdirs are compared at their last common stage."""
    side_a, side_b = _resolve(a), _resolve(b)
    if side_a.kind == side_b.kind == "workdir":
        in_b = set(_workdir_stages(side_b.path))
        common = [s for s in _workdir_stages(side_a.path) if s in in_b]
        if common and (side_a.stage != common[-1] or side_b.stage != common[-1]):
            side_a, side_b = _resolve(a, common[-1]), _resolve(b, common[-1])
    return side_a, side_b


# ---------------------------------------------------------------------------------------
# reading and sorting one side

def _open(path: Path) -> IO[bytes]:
    try:
        raw = open(path, "rb", buffering=_READ_BUFFER)
    except OSError as e:
        raise DiffError(f"{path}: {e.strerror or e}") from None
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DiffError(f"{path}: reading .zst needs pip install 'chunbot[zstd]'") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader, buffer_size=_READ_BUFFER)  # type: ignore[arg-type]
    return raw


# A side's records become sort items, single bytes objects that sort by key, then by input
# order: b'<canonical key JSON>\t<10-digit ordinal><line>\n'. The tab sorts below any
# character of canonical JSON (orjson escapes control characters), so key order is that of
# the canonical keys; the fixed-width ordinal keeps repeated keys in input order through
# the in-memory sort and the merges, which then compare plain bytes, in C.
_SEQ = 10


def _items(side: Side, key: str) -> Iterator[bytes]:
    """The sort items of a side, in file order; counts its records."""
    loads, dumps, sort_keys = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS
    seq = 0
    for path in side.files:
        handle = _open(path)
        lineno = 0
        try:
            with handle:
                for lineno, line in enumerate(handle, 1):
                    line = line.rstrip()
                    if not line:
                        continue
                    try:
                        record = loads(line)
                    except orjson.JSONDecodeError as e:
                        raise DiffError(f"{path}:{lineno}: not valid JSON ({e})") from None
                    if type(record) is not dict:
                        raise DiffError(f"{path}:{lineno}: not a JSON object")
                    try:
                        value = record[key]
                    except KeyError:
                        raise DiffError(f"{path}:{lineno}: record has no {key!r} field "
                                        "(the join key; see --key)") from None
                    seq += 1
                    # (formatting also copies orjson's result, which would otherwise keep
                    # a ~4 KB block alive per object)
                    yield b"%b\t%010d%b\n" % (dumps(value, option=sort_keys), seq, line)
        except DiffError:
            raise
        except Exception as e:  # a truncated or corrupt .zst, an I/O error
            raise DiffError(f"{path}:{lineno + 1}: cannot read ({e})") from None
        finally:
            side.records = seq


class _Spill:
    """Sorted runs on disk in one temp folder, removed by `close`."""

    def __init__(self, tmpdir: str | Path | None):
        self._parent = tmpdir
        self._folder: str | None = None
        self._count = 0
        self.prefix = "run"

    def open(self) -> None:
        if self._folder is None:
            try:
                self._folder = tempfile.mkdtemp(prefix="chunbot-diff-", dir=self._parent)
            except OSError as e:
                raise DiffError(f"temp folder in {self._parent or tempfile.gettempdir()}: "
                                f"{e.strerror or e}") from None

    def write(self, items: Iterable[bytes]) -> str:
        self.open()
        self._count += 1
        path = os.path.join(self._folder, f"{self.prefix}-{self._count:06d}")  # type: ignore
        try:
            with open(path, "wb", buffering=_READ_BUFFER) as f:
                f.writelines(items)
        except OSError as e:
            raise DiffError(f"temp folder {self._folder}: {e.strerror or e} "
                            "(set TMPDIR to a folder with room for both inputs)") from None
        return path

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _read_run(path: str) -> IO[bytes]:
    """A run's items; the file is gone from the folder once open (its space with it, when
    it is read and closed)."""
    f = open(path, "rb", buffering=_RUN_BUFFER)
    os.unlink(path)
    return f


def _spill_side(side: Side, key: str, spill: _Spill,
                keep: bool = True) -> list[str] | list[bytes]:
    """Read a side, spilling sorted runs; return the run files, merged down to at most
    FAN_IN, or, when `keep` and the side fits in one run, its sorted items."""
    runs: list[str] = []
    buffer: list[bytes] = []
    size = 0
    max_records, max_bytes = RUN_RECORDS, RUN_BYTES
    for item in _items(side, key):
        buffer.append(item)
        size += len(item) + _ITEM_OVERHEAD
        if size >= max_bytes or len(buffer) >= max_records:
            buffer.sort()
            runs.append(spill.write(buffer))
            buffer, size = [], 0
    buffer.sort()
    if not runs and keep:
        return buffer
    if buffer:
        runs.append(spill.write(buffer))
    del buffer
    while len(runs) > FAN_IN:  # several passes, FAN_IN runs at a time
        runs = [spill.write(heapq.merge(*map(_read_run, runs[i:i + FAN_IN])))
                if len(runs) - i > 1 else runs[i]
                for i in range(0, len(runs), FAN_IN)]
    return runs


def _merged(runs: list[str] | list[bytes]) -> Iterator[bytes]:
    if not runs or isinstance(runs[0], bytes):
        return iter(runs)  # type: ignore[arg-type]
    if len(runs) == 1:
        return iter(_read_run(runs[0]))  # type: ignore[arg-type]
    return heapq.merge(*map(_read_run, runs))  # type: ignore[arg-type]


def _sorted_side(side: Side, key: str, spill: _Spill) -> Iterator[bytes]:
    """A side's sort items in order. Read to the end before returning, so that only one
    side's buffer is alive at a time; a side that fits in one run stays in memory."""
    return _merged(_spill_side(side, key, spill))


class _Background:
    """Reads and sorts a side in a forked child while this process does the other side:
    the two reads are CPU-bound and independent. The child writes its runs to the shared
    temp folder and sends their names (or its error) through a pipe."""

    def __init__(self, side: Side, key: str, spill: _Spill):
        self.side = side
        spill.open()
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into the caller's code
            code = 0
            try:
                os.close(read)
                spill.prefix = "bg"
                try:
                    message: dict[str, Any] = {"runs": _spill_side(side, key, spill, False),
                                               "records": side.records}
                except DiffError as e:
                    message = {"error": str(e)}
                except BaseException as e:  # noqa: BLE001 - reported by the parent
                    message = {"error": f"{side.path}: {type(e).__name__}: {e}"}
                data = orjson.dumps(message)
                while data:
                    data = data[os.write(write, data):]
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)  # no atexit handlers, no flushing of the parent's buffers
        os.close(write)
        self.pipe = read

    def result(self) -> Iterator[bytes]:
        chunks = []
        with os.fdopen(self.pipe, "rb") as f:
            self.pipe = -1
            chunks.append(f.read())
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        try:
            message = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise DiffError(f"{self.side.path}: the process reading it died "
                            f"(status {status})") from None
        if "error" in message:
            raise DiffError(message["error"])
        self.side.records = message["records"]
        return _merged(message["runs"])

    def cancel(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = 0
        if self.pipe >= 0:
            os.close(self.pipe)
            self.pipe = -1


def _on_disk(side: Side) -> int:
    """A guess of a side's uncompressed size."""
    total = 0
    for path in side.files:
        try:
            total += path.stat().st_size * (6 if path.name.endswith(".zst") else 1)
        except OSError:
            pass
    return total


def _keyed(items: Iterator[bytes], result: DiffResult,
           side: str) -> Iterator[tuple[bytes, bytes, int]]:
    """(key, line, n) of every record: n counts the records of its key before it, in input
    order, so that the walk pairs a key's records 1st with 1st, 2nd with 2nd. Repeated keys
    are counted for the report (records beyond the first, keys having them)."""
    previous = None
    keys: list[bytes] = result.duplicate_keys_a if side == "a" else result.duplicate_keys_b
    extra = repeated = n = 0
    start = _SEQ + 1
    for item in items:
        cut = item.index(9)  # the tab
        k = item[:cut]
        if k == previous:
            n += 1
            extra += 1
            if n == 1:
                repeated += 1
                if len(keys) < EXAMPLES:
                    keys.append(k)
        else:
            previous, n = k, 0
        yield k, item[cut + start:-1], n
    if side == "a":
        result.duplicates_a, result.duplicated_keys_a = extra, repeated
    else:
        result.duplicates_b, result.duplicated_keys_b = extra, repeated


# ---------------------------------------------------------------------------------------
# results

@dataclass
class FieldStats:
    """One field over the records found on both sides."""

    name: str
    both: int = 0                   # records having the field in A and in B
    same: int = 0                   # … with equal values
    changed: int = 0                # … with different values
    missing_a: int = 0              # records having it in B only
    missing_b: int = 0              # records having it in A only
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # key, A, B (shown)
    categories: set | None = field(default_factory=set)  # None: not categorical
    confusions: Counter = field(default_factory=Counter)  # (A value, B value) → records

    @property
    def differences(self) -> int:
        return self.changed + self.missing_a + self.missing_b

    @property
    def categorical(self) -> bool:
        return bool(self.categories)

    @property
    def agreement(self) -> float | None:
        """same / present in both, for categorical fields."""
        return self.same / self.both if self.categorical and self.both else None

    def note_category(self, value: Any) -> bool:
        """Note a value of the field; False, and not categorical from now on, once a value
        is no category (a long string, a number, a list) or there are too many."""
        values = self.categories
        if values is None:
            return False
        kind = type(value)
        if (kind is str and len(value) <= MAX_CATEGORY_LEN) or value is None or kind is bool:
            if value not in values:
                values.add(value)
                if len(values) > MAX_CATEGORIES:
                    self.categories, self.confusions = None, Counter()
                    return False
            return True
        self.categories, self.confusions = None, Counter()
        return False

    def compare(self, a: Any, b: Any) -> bool:
        """Count one pair of values found on both sides; True when they are the same."""
        self.both += 1
        categorical = self.note_category(a) & self.note_category(b)
        if _same(a, b):
            self.same += 1
            return True
        self.changed += 1
        if categorical:
            self.confusions[(a, b)] += 1
        return False

    def top_confusions(self, n: int = TOP_CONFUSIONS) -> list[tuple[Any, Any, int]]:
        return [(a, b, count) for (a, b), count in
                sorted(self.confusions.items(), key=lambda item: (-item[1], repr(item[0])))[:n]]


@dataclass
class Difference:
    """A record that is not the same on both sides."""

    key: Any
    status: str                                  # "changed" | "only_a" | "only_b"
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # MISSING if absent
    line: bytes | None = None                    # only_a / only_b: the record's JSON line
    occurrence: int = 0                          # records of the key before it (repeated keys)

    @property
    def record(self) -> dict[str, Any] | None:
        return orjson.loads(self.line) if self.line is not None else None

    def to_json(self) -> bytes:
        """`{"key", "status", "changes": {field: [a, b]}}` (a missing value is null and
        named in `"missing": {field: "a"|"b"}`), or `{"key", "status", "a"|"b": record}`;
        a repeated key's later records add `"occurrence": n` (0 is the first, left out)."""
        head = b'{"key":' + orjson.dumps(self.key)
        if self.occurrence:  # the same key twice in the output: say which record it is
            head += b',"occurrence":%d' % self.occurrence
        head += b',"status":"' + self.status.encode()
        if self.status != "changed":
            side = b"a" if self.status == "only_a" else b"b"
            return head + b'","' + side + b'":' + (self.line or b"null") + b"}"
        body: dict[str, Any] = {"changes": {f: [None if a is MISSING else a,
                                                None if b is MISSING else b]
                                            for f, (a, b) in self.changes.items()}}
        missing = {f: ("a" if a is MISSING else "b") for f, (a, b) in self.changes.items()
                   if a is MISSING or b is MISSING}
        if missing:
            body["missing"] = missing
        return head + b'",' + orjson.dumps(body)[1:]


@dataclass
class DiffResult:
    a: Side
    b: Side
    key: str
    fields: list[str] | None        # None: every field but the key
    same: int = 0
    changed: int = 0
    only_a: int = 0
    only_b: int = 0
    duplicates_a: int = 0           # extra records with an already seen key
    duplicates_b: int = 0
    duplicated_keys_a: int = 0      # keys having more than one record
    duplicated_keys_b: int = 0
    duplicate_keys_a: list[Any] = field(default_factory=list)   # a few, for the report
    duplicate_keys_b: list[Any] = field(default_factory=list)
    field_stats: dict[str, FieldStats] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)  # the first `limit`
    unseen_fields: list[str] = field(default_factory=list)  # --fields no record has

    @property
    def differing(self) -> int:
        return self.changed + self.only_a + self.only_b

    @property
    def equal(self) -> bool:
        return self.differing == 0

    @property
    def exit_code(self) -> int:
        return 0 if self.equal else 1

    def changed_fields(self) -> list[FieldStats]:
        """Fields with at least one difference, most differences first."""
        return sorted((s for s in self.field_stats.values() if s.differences),
                      key=lambda s: (-s.differences, s.name))


# ---------------------------------------------------------------------------------------
# the comparison

def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b) or a != b:
        return False
    if type(a) is dict or type(a) is list:  # nested 1 vs 1.0, true vs 1
        option = orjson.OPT_SORT_KEYS
        return orjson.dumps(a, option=option) == orjson.dumps(b, option=option)
    return True


def _show(value: Any, width: int = WIDTH) -> str:
    if value is MISSING:
        return "(missing)"
    text = orjson.dumps(value).decode()
    return text if len(text) <= width else text[:width - 1] + "…"


def _show_category(value: Any) -> str:
    return value if type(value) is str else orjson.dumps(value).decode()


class _Compare:
    def __init__(self, result: DiffResult, limit: int | None,
                 on_difference: Callable[[Difference], Any]):
        self.r = result
        self.key = result.key
        self.only = set(result.fields) if result.fields is not None else None
        self.stats = result.field_stats
        self.candidates: dict[str, set] = {}   # fields that may still be categorical
        self.watch: tuple[tuple[str, set], ...] = ()  # the same, as a tuple of items
        self.shapes: dict[tuple[str, ...], int] = {}  # field names of identical records
        self.remaining = limit                 # differences still to deliver (None: all)
        self.on_difference = on_difference
        for name in result.fields or ():
            self._field(name)

    def _field(self, name: str) -> FieldStats:
        stats = self.stats[name] = FieldStats(name)
        self.candidates[name] = stats.categories  # type: ignore[assignment]
        self.watch = tuple(self.candidates.items())
        return stats

    def _give_up(self, name: str) -> None:
        stats = self.stats[name]
        stats.categories = None
        stats.confusions = Counter()
        self.candidates.pop(name, None)
        self.watch = tuple(self.candidates.items())

    def _track(self, name: str, value: Any) -> bool:
        """Note a value of a field; False once the field is not categorical."""
        if name not in self.candidates:
            return False
        if self.stats[name].note_category(value):
            return True
        self._give_up(name)
        return False

    def _deliver(self, make: Callable[[], Difference]) -> None:
        if self.remaining is None:
            self.on_difference(make())
        elif self.remaining > 0:
            self.remaining -= 1
            self.on_difference(make())

    # per key
    def identical(self, line: bytes) -> None:
        """Byte-identical lines: every field is the same; note shape and categories."""
        self.r.same += 1
        record = orjson.loads(line)
        shape = tuple(record)
        seen = self.shapes.get(shape)
        if seen is None:
            self.shapes[shape] = 1
            if self.only is None:
                for name in shape:
                    if name != self.key and name not in self.stats:
                        self._field(name)
        else:
            self.shapes[shape] = seen + 1
        for name, values in self.watch:  # fields that may be categorical
            value = record.get(name, MISSING)
            if value is MISSING:
                continue
            try:
                if value in values:
                    continue
            except TypeError:  # a list or an object
                pass
            self._track(name, value)

    def pair(self, k: bytes, line_a: bytes, line_b: bytes, occurrence: int = 0) -> None:
        a, b = orjson.loads(line_a), orjson.loads(line_b)
        if self.only is not None:
            names: Iterable[str] = self.r.fields  # type: ignore[assignment]
        else:
            names = list(a) + [n for n in b if n not in a]
        changes: dict[str, tuple[Any, Any]] = {}
        key_value: Any = MISSING
        for name in names:
            if name == self.key:
                continue
            va, vb = a.get(name, MISSING), b.get(name, MISSING)
            if va is MISSING and vb is MISSING:
                continue
            stats = self.stats.get(name) or self._field(name)
            if va is MISSING or vb is MISSING:
                if va is MISSING:
                    stats.missing_a += 1
                    self._track(name, vb)
                else:
                    stats.missing_b += 1
                    self._track(name, va)
            else:
                same = stats.compare(va, vb)
                if stats.categories is None and name in self.candidates:
                    self._give_up(name)
                if same:
                    continue
            changes[name] = (va, vb)
            if len(stats.examples) < EXAMPLES:
                if key_value is MISSING:
                    key_value = orjson.loads(k)
                stats.examples.append((_show(key_value), _show(va), _show(vb)))
        if not changes:
            self.r.same += 1
            return
        self.r.changed += 1
        if self.remaining is None or self.remaining > 0:
            key = orjson.loads(k) if key_value is MISSING else key_value
            self._deliver(lambda: Difference(key, "changed", changes, occurrence=occurrence))

    def only_in(self, status: str, k: bytes, line: bytes, occurrence: int = 0) -> None:
        if status == "only_a":
            self.r.only_a += 1
        else:
            self.r.only_b += 1
        if self.remaining is None or self.remaining > 0:
            self._deliver(lambda: Difference(orjson.loads(k), status, line=line,
                                             occurrence=occurrence))

    def finish(self) -> None:
        for shape, n in self.shapes.items():
            for name in shape:
                if name == self.key or (self.only is not None and name not in self.only):
                    continue
                stats = self.stats[name]
                stats.both += n
                stats.same += n
        for stats in self.stats.values():
            if not stats.both and not stats.missing_a and not stats.missing_b:
                stats.categories = None  # never seen: nothing to say
        if self.only is not None:
            self.r.unseen_fields = [n for n in self.r.fields or () if
                                    not (self.stats[n].both or self.stats[n].missing_a
                                         or self.stats[n].missing_b)]


def diff(a: str | Path, b: str | Path, key: str = "_id", fields: list[str] | None = None,
         *, limit: int | None = None,
         on_difference: Callable[[Difference], Any] | None = None,
         tmpdir: str | Path | None = None) -> DiffResult:
    """Compare A and B joined on `key`; counts and per-field statistics cover every record.

    Differing records go to `on_difference` as they are found, so a caller can stream them
    in constant memory, or without a callback into `result.differences`; either way at
    most `limit` of them (None: all; pass 0 or a callback for big diffs). Temp runs go
    under `tmpdir` (default: TMPDIR). Raises DiffError when a side cannot be read.
    """
    side_a, side_b = resolve(a, b)
    if fields is not None:
        fields = list(dict.fromkeys(f for f in fields if f != key))
    result = DiffResult(side_a, side_b, key, fields)
    compare = _Compare(result, limit, on_difference or result.differences.append)
    spill = _Spill(tmpdir)
    try:
        background = None
        if PARALLEL and hasattr(os, "fork") and _on_disk(side_b) > RUN_BYTES:
            background = _Background(side_b, key, spill)
        try:
            sorted_a = _sorted_side(side_a, key, spill)
            sorted_b = background.result() if background else _sorted_side(side_b, key, spill)
        finally:
            if background:
                background.cancel()
        _walk(_keyed(sorted_a, result, "a"), _keyed(sorted_b, result, "b"), compare)
    finally:
        spill.close()
    compare.finish()
    for keys in (result.duplicate_keys_a, result.duplicate_keys_b):
        keys[:] = [orjson.loads(k) for k in keys]
    return result


def _walk(stream_a: Iterator[tuple[bytes, bytes, int]],
          stream_b: Iterator[tuple[bytes, bytes, int]], compare: _Compare) -> None:
    """Walk both sorted streams by (key, occurrence): a key's n-th record in A meets its
    n-th in B; the records one side has more of are only in that side."""
    a, b = next(stream_a, None), next(stream_b, None)
    identical, pair, only_in = compare.identical, compare.pair, compare.only_in
    while a is not None and b is not None:
        ka, kb = a[0], b[0]
        if ka == kb and a[2] == b[2]:
            if a[1] == b[1]:
                identical(a[1])
            else:
                pair(ka, a[1], b[1], a[2])
            a, b = next(stream_a, None), next(stream_b, None)
        elif ka < kb or ka == kb and a[2] < b[2]:
            only_in("only_a", *a)
            a = next(stream_a, None)
        else:
            only_in("only_b", *b)
            b = next(stream_b, None)
    for status, rest, first in (("only_a", stream_a, a), ("only_b", stream_b, b)):
        if first is not None:
            only_in(status, *first)
            for item in rest:
                only_in(status, *item)


# ---------------------------------------------------------------------------------------
# output

def _pct(part: int, whole: int) -> str:
    value = 100 * part / whole if whole else 0.0
    text = f"{value:.1f}%"
    if text == "100.0%" and part != whole:
        return ">99.9%"
    if text == "0.0%" and part:
        return "<0.1%"
    return text


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _duplicate_notes(r: DiffResult) -> list[str]:
    """A line per side that repeats keys: how many, and how their records were paired."""
    notes = []
    for side, extra, repeated, keys in (
            ("A", r.duplicates_a, r.duplicated_keys_a, r.duplicate_keys_a),
            ("B", r.duplicates_b, r.duplicated_keys_b, r.duplicate_keys_b)):
        if extra:
            shown = ", ".join(_show(k, 24) for k in keys)
            notes.append(f"note: {side} has {repeated:,} duplicated key{_s(repeated)} "
                         f"({extra:,} extra record{_s(extra)}, e.g. {shown}); a key's "
                         "records are paired in order, 1st with 1st, 2nd with 2nd")
    return notes


def render_table(result: DiffResult) -> str:
    """A plain-text report, lines of at most 100 columns (file paths aside)."""
    r = result
    lines = [f"A  {r.a.describe()}", f"B  {r.b.describe()}"]
    lines.append(f"joined on {r.key!r}; compared: "
                 + (", ".join(r.fields) if r.fields is not None else "every other field"))
    lines.append("")
    rows = [("same", r.same), ("changed", r.changed), ("only in A", r.only_a),
            ("only in B", r.only_b)]
    width = max(len(f"{n:,}") for _, n in rows)
    lines += [f"  {label:<10} {n:>{width},}" for label, n in rows]
    notes = _duplicate_notes(r)
    for name in r.unseen_fields:
        notes.append(f"note: no record found on both sides has the field {name!r}")
    if notes:
        lines.append("")
        lines += notes
    changed = r.changed_fields()
    unchanged = [s.name for s in r.field_stats.values() if s.both and not s.differences]
    if unchanged:
        lines.append("")
        lines += textwrap.wrap("the same in every record found in both: " + ", ".join(unchanged),
                               width=100, subsequent_indent="  ", break_on_hyphens=False)
    if changed:
        lines += ["", "fields that differ (A → B):"]
    for stats in changed:
        lines.append("")
        plural = "s" if stats.differences != 1 else ""
        head = f"  {stats.name}: {stats.differences:,} record{plural}"
        detail = []
        if stats.changed:
            detail.append(f"{stats.changed:,} changed of {stats.both:,} in both")
        if stats.missing_a:
            detail.append(f"{stats.missing_a:,} missing in A")
        if stats.missing_b:
            detail.append(f"{stats.missing_b:,} missing in B")
        lines.append(f"{head} ({'; '.join(detail)})")
        if stats.agreement is not None:
            lines.append(f"    agreement {_pct(stats.same, stats.both)} "
                         f"({stats.same:,} of {stats.both:,})")
            confusions = stats.top_confusions()
            if confusions:
                shown = [(_show_category(a), _show_category(b), n) for a, b, n in confusions]
                left = max(len(a) for a, _, _ in shown)
                right = max(len(b) for _, b, _ in shown)
                lines.append("    top confusions:")
                lines += [f"      {a:<{left}} → {b:<{right}}  {n:>9,}" for a, b, n in shown]
        for key, va, vb in stats.examples:
            lines.append(f"    e.g. {r.key} {key}")
            lines.append(f"      A: {va}")
            lines.append(f"      B: {vb}")
    lines.append("")
    if r.equal:
        lines.append(f"A and B are equal: {r.same:,} records")
    else:
        lines.append(f"A and B differ: {r.differing:,} of {r.same + r.differing:,} keys")
    return "\n".join(lines) + "\n"


__all__ = ["DiffError", "DiffResult", "Difference", "FieldStats", "Side", "diff",
           "render_table", "resolve", "MISSING"]
