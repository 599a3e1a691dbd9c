"""Input: a file, glob or folder of .jsonl / .jsonl.zst, or stdin, cut into shards of lines.

Reading is streaming: only the shard being cut is in memory. Lines stay raw bytes here;
parsing happens in the first stage's shard job, so a bad line becomes that stage's record
failure (with its file and line number) instead of stopping the run. A shard's digest
(CRC-32, line and byte counts) tells the engine whether its input changed since last run.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import orjson


BLOCK_SIZE = 1 << 22
MAX_LINE_BYTES = 16 << 20  # a longer input line is a bad record (`max_line_bytes:`)


class InputError(Exception):
    """The input cannot be read at all (missing file, unreadable folder, not JSON Lines)."""

    midway = False  # a file that broke off after its start was read: see InputBrokeOff


class InputBrokeOff(InputError):
    """A file that breaks off after its start was read (a truncated .zst, corrupt data
    further on): the records before it count, and the run ends with exit 1 even when no
    whole record came before, so the exit code does not depend on where the cut fell."""

    midway = True


@dataclass
class Shard:
    """`lines[i]` is the input line whose global 0-based position is `start + i`."""

    index: int
    start: int
    lines: list[bytes]
    origins: list[tuple[str, int, int]] = field(default_factory=list)  # (file, first line, count)
    digest: str = ""
    size: int = 0  # bytes, without newlines

    def origin(self, i: int) -> tuple[str, int]:
        """The file and 1-based line number of `lines[i]`."""
        return line_origin(self.origins, i)


def line_origin(origins: list[tuple[str, int, int]], i: int) -> tuple[str, int]:
    """The file and 1-based line number of a shard's i-th line, from its origins."""
    for name, first, count in origins:
        if i < count:
            return name, first + i
        i -= count
    raise IndexError(i)


def resolve(spec: str | None) -> list[str]:
    """The input files a spec names, in order; '-' is stdin. Raises InputError."""
    if spec is None:
        raise InputError("no input: give the pipeline an `input:` (a file, glob, folder or "
                         "- for stdin) or run it with --input")
    if spec == "-":
        return ["-"]
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if _is_jsonl(p))
        if not files:
            raise InputError(f"input {spec!r}: no .jsonl or .jsonl.zst file matches")
        return files
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_jsonl(p.name))
        if not files:
            raise InputError(f"input {spec!r}: the folder holds no .jsonl, .jsonl.zst or "
                             ".ndjson file")
        return files
    if not path.exists():
        raise InputError(f"input {spec!r}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"input {spec!r}: permission denied")
    return [spec]


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.zst", ".ndjson"))


def _blocks(name: str) -> Iterator[bytes]:
    """The decompressed bytes of one input file, block by block; raises InputError when
    it cannot be read or is a .zst file that is not zstd, InputBrokeOff when it ends
    mid-frame (a truncated copy would otherwise pass for a shorter input) or its zstd data
    breaks further on."""
    if name == "-":
        yield from iter(lambda: sys.stdin.buffer.read1(BLOCK_SIZE), b"")
        return
    with open(name, "rb", buffering=0) as raw:
        blocks = iter(lambda: raw.read(BLOCK_SIZE), b"")
        if not name.endswith(".zst"):
            yield from blocks
            return
        try:
            import zstandard
        except ImportError:
            raise InputError(f"input {name!r}: reading .zst needs pip install 'chunbot[zstd]'") \
                from None
        frame, open_frame = zstandard.ZstdDecompressor().decompressobj(), False
        decoded = False  # some of it was zstd: an error from here on is a break, not a misnomer
        for block in blocks:
            while block:  # a file may hold several frames one after the other
                try:
                    data = frame.decompress(block)
                except zstandard.ZstdError as e:
                    error = InputBrokeOff if decoded else InputError
                    raise error(f"input {name!r}: not valid zstd data ({e})") from None
                open_frame = decoded = True
                if data:
                    yield data
                block = b""
                if frame.eof:
                    block, open_frame = frame.unused_data, False
                    frame = zstandard.ZstdDecompressor().decompressobj()
        if open_frame:
            raise InputBrokeOff(f"input {name!r}: the file ends in the middle of a zstd frame "
                                "(truncated?)")


BOM = b"\xef\xbb\xbf"
HEAD_LINES = 8  # non-blank lines of a file's first block looked at before it is refused
MAGIC = [  # what a file that starts so is, and what to do
    (b"\x1f\x8b", "is gzip-compressed, which chunbot does not read: decompress it "
                  "(gunzip -c) or recompress it with zstd as .jsonl.zst"),
    (b"\x28\xb5\x2f\xfd", "is zstd-compressed: name it .jsonl.zst"),
    (b"BZh", "is bzip2-compressed: decompress it (bunzip2 -c)"),
    (b"\xfd7zXZ\x00", "is xz-compressed: decompress it (unxz -c)"),
    (b"PK\x03\x04", "is a zip archive: unzip it"),
    (b"\xff\xfe", "is UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "is UTF-16 text: convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
]


def _checked(name: str, blocks: Iterator[bytes]) -> Iterator[bytes]:
    """A file's blocks, the first one looked at: a UTF-8 BOM is dropped (so the first
    record parses), and a file that plainly is not JSON Lines raises InputError. Otherwise
    each of its lines would fail alike, and `rerun --failed` would fail again."""
    first = next(blocks, b"")
    while 0 < len(first) < 8:  # a pipe may hand over a few bytes first: the magic needs more
        more = next(blocks, b"")
        if not more:
            break
        first += more
    if first.startswith(BOM):
        first = first[len(BOM):]
    problem = _not_jsonl(first)
    if problem:
        raise InputError(f"input {name!r} is not read: it {problem}")
    if first:
        yield first
    yield from blocks


def _not_jsonl(head: bytes) -> str | None:
    """What a file's first block looks like when none of its first non-blank lines is a
    JSON object, else None. Only whole lines are parsed (a valid file stops at the first);
    a file with bad lines later is read, its bad lines failing one by one."""
    seen: list[tuple[int, bytes, str]] = []  # (line number, line, why it is no record)
    start = number = 0
    while len(seen) < HEAD_LINES:
        end = head.find(b"\n", start)
        if end < 0:
            break
        line, start, number = head[start:end], end + 1, number + 1
        if line.strip():
            record, why = parse_line(line)
            if record is not None:
                return None
            seen.append((number, line, why or ""))
    for magic, what in MAGIC:  # after the lines: a record first is JSONL whatever follows
        if head.startswith(magic):
            return what
    if not seen:  # no whole line in the first block: only bytes can tell
        return "is binary, not UTF-8 text" if _binary(head[:1 << 16]) else None
    if any(_binary(line) for _, line, _ in seen):
        return "is binary, not UTF-8 text"
    number, line, why = seen[0]
    text = line.decode().strip()
    if "," in text and text[:1] not in "{[":
        return (f"looks like CSV (line {number}: {text[:60]!r}), not JSON Lines: convert it "
                "to one JSON object a line first (e.g. mlr --icsv --ojsonl cat)")
    if text in ("{", "["):
        return ("looks like one JSON document over many lines, not one JSON object a line: "
                "convert it first (e.g. jq -c '.[]')")
    return (f"is not JSON Lines: none of its first {len(seen)} non-blank lines is a JSON "
            f"object (line {number}: {why})")


def _binary(data: bytes) -> bool:
    """NUL bytes or invalid UTF-8 (a sequence cut at the end of `data` is no sign)."""
    if b"\0" in data:
        return True
    try:
        codecs.utf_8_decode(data, "strict", False)
    except UnicodeDecodeError:
        return True
    return False


def read_shards(files: list[str], shard_size: int, limit: int | None = None,
                max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Shard]:
    """Cut the input into shards of `shard_size` lines (the last may be shorter).

    Blank lines count as positions, so record ids and line numbers stay stable. Input is
    read in large blocks and split in C: a per-line Python loop here would cost more than
    everything else a passthrough stage does. A line over `max_line_bytes` is never held
    whole: it stands as an `Oversized` mark, which parsing turns into a bad record.
    """
    shard = Shard(index=0, start=0, lines=[])
    position = 0
    for name in files:
        pieces = _lines(_checked(name, _blocks(name)), max_line_bytes)
        consumed, first = 0, 1
        try:
            while limit is None or position < limit:
                try:
                    lines = next(pieces, None)
                except InputError as e:  # the file breaks off: what came before it counts,
                    if consumed >= first:  # but a file refused before any shard went out
                        shard.origins.append((name, first, consumed - first + 1))
                    if shard.lines and (e.midway or shard.index > 0):  # leaves nothing run
                        yield _sealed(shard)
                    raise
                if lines is None:
                    break
                taken = 0
                while taken < len(lines) and (limit is None or position < limit):
                    room = shard_size - len(shard.lines)
                    if limit is not None:
                        room = min(room, limit - position)
                    chunk = lines[taken: taken + room]
                    shard.lines += chunk
                    taken += len(chunk)
                    position += len(chunk)
                    consumed += len(chunk)
                    if len(shard.lines) == shard_size:
                        shard.origins.append((name, first, consumed - first + 1))
                        yield _sealed(shard)
                        shard = Shard(index=shard.index + 1, start=position, lines=[])
                        first = consumed + 1
        except OSError as e:
            raise InputError(f"input {name!r}: {e.strerror or e}") from None
        finally:
            pieces.close()
        if consumed >= first:
            shard.origins.append((name, first, consumed - first + 1))
    if shard.lines:
        yield _sealed(shard)


class Oversized(bytes):
    """In place of an input line longer than `max_line_bytes`, which is not kept: its
    size (part of the shard's digest, as the line's bytes would be) and the limit."""

    def __new__(cls, size: int, limit: int) -> "Oversized":
        line = super().__new__(cls, f"<a line of {size:,} bytes, not read>".encode())
        line.size, line.limit = size, limit
        return line

    def __reduce__(self) -> Any:  # pickled (for Ray) as what it is
        return Oversized, (self.size, self.limit)


def _lines(blocks: Iterator[bytes], limit: int) -> Iterator[list[bytes]]:
    """The lines of a file's blocks, a list per block; a line over `limit` bytes is
    skipped to its end as it streams by, so memory stays bounded by the limit."""
    tail, skipped = b"", None  # skipped: the bytes so far of an oversized line
    try:
        for block in blocks:
            lines: list[bytes] = []
            if skipped is not None:
                end = block.find(b"\n")
                if end < 0:
                    skipped += len(block)
                    continue
                lines.append(Oversized(skipped + end, limit))
                block, skipped = block[end + 1:], None
            parts = (tail + block).split(b"\n")
            tail = parts.pop()
            if len(block) > limit:  # a whole line this long fits in one block
                parts = [Oversized(len(p), limit) if len(p) > limit else p for p in parts]
            if len(tail) > limit:
                tail, skipped = b"", len(tail)
            yield lines + parts
        if skipped is not None:
            yield [Oversized(skipped, limit)]
        elif tail:
            yield [tail]
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()


def _sealed(shard: Shard) -> Shard:
    data = b"\n".join(shard.lines)
    shard.size = len(data) - len(shard.lines) + 1
    shard.digest = f"{zlib.crc32(data):08x}-{len(shard.lines)}-{len(data)}"
    return shard


def parse_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) for a blank line, or (None, why it is not a record)."""
    if isinstance(line, Oversized):
        return None, (f"the line is {line.size:,} bytes, over max_line_bytes "
                      f"({line.limit:,}): it was not read")
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        if not line.strip():
            return None, None
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as u:
            return None, f"not valid UTF-8 (byte {u.start})"
        return None, f"not valid JSON: {e}"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    return record, None


def row_shards(rows: Iterable[dict[str, Any]], size: int,
               limit: int | None = None) -> Iterator[tuple[Shard, list[dict[str, Any]]]]:
    """Records handed over in memory (the library's), cut into shards as lines are."""
    it = iter(rows) if limit is None else itertools.islice(rows, limit)
    start = 0
    for index in itertools.count():
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield Shard(index, start, []), chunk
        start += len(chunk)
