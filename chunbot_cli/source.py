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
                                 buffer_size=1 << 20)
    return raw


def read_shards(files: list[str], shard_size: int, limit: int | None = None) -> Iterator[Shard]:
    """Cut the input into shards of `shard_size` lines (the last may be shorter).

    Blank lines count as positions, so record ids and line numbers stay stable.
    """
    index, position = 0, 0
    shard = Shard(index=0, start=0, lines=[])
    crc, size = 0, 0
    for name in files:
        if limit is not None and position >= limit:
            break
        handle = _open(name)
        try:
            lineno, first = 0, 1
            for line in handle:
                if limit is not None and position >= limit:
                    break
                lineno += 1
                if line.endswith(b"\n"):
                    line = line[:-1]
                shard.lines.append(line)
                crc = zlib.crc32(line, zlib.crc32(b"\n", crc))
                size += len(line)
                position += 1
                if len(shard.lines) == shard_size:
                    shard.origins.append((name, first, lineno - first + 1))
                    shard.digest, shard.size = f"{crc:08x}-{len(shard.lines)}-{size}", size
                    yield shard
                    index += 1
                    shard = Shard(index=index, start=position, lines=[])
                    crc, size, first = 0, 0, lineno + 1
            if lineno >= first:
                shard.origins.append((name, first, lineno - first + 1))
        except OSError as e:
            raise InputError(f"input {name!r}: {e}") from None
        finally:
            if handle is not sys.stdin.buffer:
                handle.close()
    if shard.lines:
        shard.digest, shard.size = f"{crc:08x}-{len(shard.lines)}-{size}", size
        yield shard


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
