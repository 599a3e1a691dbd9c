"""Input: a file, glob or folder of .jsonl / .jsonl.zst, or stdin, cut into shards of lines.

Reading is streaming: only the shard being cut is in memory. Lines stay raw bytes here;
parsing happens in the first stage's shard job, so a bad line becomes that stage's record
failure (with its file and line number) instead of stopping the run. A shard's digest
(CRC-32, line and byte counts) tells the engine whether its input changed since last run.
"""

from __future__ import annotations

import glob
import io
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import orjson


BLOCK_SIZE = 1 << 22


class InputError(Exception):
    """The input cannot be read at all (missing file, unreadable folder)."""


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
        for name, first, count in self.origins:
            if i < count:
                return name, first + i
            i -= count
        raise IndexError(i)


def resolve(spec: str) -> list[str]:
    """The input files a spec names, in order; '-' is stdin. Raises InputError."""
    if spec == "-":
        return ["-"]
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if _is_jsonl(p))
        if not files:
            raise InputError(f"input {spec!r}: no .jsonl or .jsonl.zst file matches")
        return files
    path = Path(spec)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and _is_jsonl(p.name))
    if not path.exists():
        raise InputError(f"input {spec!r}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"input {spec!r}: permission denied")
    return [spec]


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.zst", ".ndjson"))


def _open(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    raw = open(name, "rb", buffering=1 << 20)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise InputError(f"input {name!r}: reading .zst needs pip install 'chunbot[zstd]'") \
                from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True),
                                 buffer_size=BLOCK_SIZE)
    return raw


def read_shards(files: list[str], shard_size: int, limit: int | None = None) -> Iterator[Shard]:
    """Cut the input into shards of `shard_size` lines (the last may be shorter).

    Blank lines count as positions, so record ids and line numbers stay stable. Input is
    read in large blocks and split in C: a per-line Python loop here would cost more than
    everything else a passthrough stage does.
    """
    shard = Shard(index=0, start=0, lines=[])
    position = 0
    for name in files:
        handle = _open(name)
        consumed, first, tail = 0, 1, b""
        try:
            while limit is None or position < limit:
                block = handle.read1(BLOCK_SIZE)
                if block:
                    lines = (tail + block).split(b"\n")
                    tail = lines.pop()
                elif tail:
                    lines, tail = [tail], b""
                else:
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
            raise InputError(f"input {name!r}: {e}") from None
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()
        if consumed >= first:
            shard.origins.append((name, first, consumed - first + 1))
    if shard.lines:
        yield _sealed(shard)


def _sealed(shard: Shard) -> Shard:
    data = b"\n".join(shard.lines)
    shard.size = len(data) - len(shard.lines) + 1
    shard.digest = f"{zlib.crc32(data):08x}-{len(shard.lines)}-{len(data)}"
    return shard


def parse_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) for a blank line, or (None, why it is not a record)."""
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
