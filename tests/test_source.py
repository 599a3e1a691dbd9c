"""source.py: input files, globs, folders and .zst, cut into shards of raw lines."""

from __future__ import annotations

import pytest
import zstandard

from chunbot_cli.source import InputError, parse_line, read_shards, resolve


def lines(n: int, start: int = 0) -> str:
    return "".join(f'{{"n": {i}}}\n' for i in range(start, start + n))


def test_resolve_file_folder_and_glob(project):
    (project / "a.jsonl").write_text(lines(1))
    (project / "dir/sub").mkdir(parents=True)
    (project / "dir/b.jsonl").write_text(lines(1))
    (project / "dir/sub/c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    (project / "dir/notes.txt").write_text("not input")
    assert resolve("a.jsonl") == ["a.jsonl"]
    assert resolve("dir") == ["dir/b.jsonl", "dir/sub/c.jsonl.zst"]
    assert resolve("dir/**/*.jsonl*") == ["dir/b.jsonl", "dir/sub/c.jsonl.zst"]
    assert resolve("-") == ["-"]


def test_resolve_refuses_what_is_not_there(project):
    with pytest.raises(InputError, match="'missing.jsonl': no such file"):
        resolve("missing.jsonl")
    with pytest.raises(InputError, match="no .jsonl or .jsonl.zst file matches"):
        resolve("nothing/*.jsonl")


def test_shards_cut_across_files_and_remember_line_origins(project):
    (project / "a.jsonl").write_text(lines(7))
    (project / "b.jsonl").write_text(lines(6, start=7))
    shards = list(read_shards(["a.jsonl", "b.jsonl"], shard_size=5))
    assert [len(s.lines) for s in shards] == [5, 5, 3]
    assert [s.start for s in shards] == [0, 5, 10]
    assert shards[1].lines[0] == b'{"n": 5}'
    assert shards[1].origin(1) == ("a.jsonl", 7)
    assert shards[1].origin(2) == ("b.jsonl", 1)
    assert shards[2].origin(2) == ("b.jsonl", 6)


def test_blank_lines_and_a_missing_final_newline_keep_positions(project):
    (project / "a.jsonl").write_text('{"n": 0}\n\n{"n": 2}')
    [shard] = read_shards(["a.jsonl"], shard_size=10)
    assert shard.lines == [b'{"n": 0}', b"", b'{"n": 2}']


def test_digest_is_stable_and_changes_with_one_line(project):
    (project / "a.jsonl").write_text(lines(10))
    first = [s.digest for s in read_shards(["a.jsonl"], 4)]
    assert first == [s.digest for s in read_shards(["a.jsonl"], 4)]
    (project / "a.jsonl").write_text(lines(10).replace('"n": 5', '"n": 55'))
    second = [s.digest for s in read_shards(["a.jsonl"], 4)]
    assert first[0] == second[0] and first[1] != second[1] and first[2] == second[2]


def test_limit_stops_reading(project):
    (project / "a.jsonl").write_text(lines(10))
    (project / "b.jsonl").write_text(lines(10))
    shards = list(read_shards(["a.jsonl", "b.jsonl"], 4, limit=6))
    assert [len(s.lines) for s in shards] == [4, 2]


def test_zst_input_is_read_streaming(project):
    (project / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(9).encode()))
    shards = list(read_shards(["a.jsonl.zst"], 4))
    assert [len(s.lines) for s in shards] == [4, 4, 1]
    assert shards[2].lines == [b'{"n": 8}']


def test_parse_line_says_what_is_wrong():
    assert parse_line(b'{"a": 1}') == ({"a": 1}, None)
    assert parse_line(b"   ") == (None, None)
    assert parse_line(b"{oops")[1].startswith("not valid JSON")
    assert parse_line(b"[1]") == (None, "not a JSON object but list")
    assert parse_line(b'"\xff"')[1] == "not valid UTF-8 (byte 1)"
