"""source.py: input files, globs, folders and .zst, cut into shards of raw lines."""

from __future__ import annotations

import re

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


def test_a_bom_is_dropped_even_when_a_pipe_hands_it_over_byte_by_byte():
    from chunbot_cli.source import _checked

    data = b'\xef\xbb\xbf{"n": 0}\n{"n": 1}\n'
    out = b"".join(_checked("-", iter(data[i:i + 1] for i in range(len(data)))))
    assert out == b'{"n": 0}\n{"n": 1}\n'


def test_one_record_among_the_first_lines_is_enough_to_read_the_file(project):
    (project / "a.jsonl").write_bytes(b"id,text\n\n" + lines(3).encode())
    [shard] = read_shards(["a.jsonl"], 10)
    assert shard.lines[0] == b"id,text" and len(shard.lines) == 5


@pytest.mark.parametrize("content, said", [
    (b"id,text\n1,a\n", "looks like CSV (line 1: 'id,text')"),
    (b"\n\n[1, 2]\n[3]\n", "none of its first 2 non-blank lines is a JSON object (line 3: "
                           "not a JSON object but list)"),
    (zstandard.ZstdCompressor().compress(lines(3).encode()), "name it .jsonl.zst"),
    (b"\x00\x01\x02" * 10, "binary"),  # no newline at all: judged by its bytes
    (b"caf\xe9 au lait\n", "binary"),
])
def test_a_file_whose_first_lines_hold_no_record_is_refused(project, content, said):
    (project / "a.jsonl").write_bytes(content)
    with pytest.raises(InputError, match=re.escape(said)) as e:
        list(read_shards(["a.jsonl"], 10))
    assert not e.value.midway and "'a.jsonl' is not read" in str(e.value)


def test_a_refused_file_after_a_full_shard_hands_on_what_came_before(project):
    (project / "a.jsonl").write_text(lines(7))
    (project / "b.jsonl").write_text("id,text\n")
    shards = read_shards(["a.jsonl", "b.jsonl"], 5)
    assert len(next(shards).lines) == 5
    assert len(next(shards).lines) == 2  # the records before it are processed (exit 1)
    with pytest.raises(InputError, match="b.jsonl"):
        next(shards)


def test_a_refused_file_before_any_shard_leaves_nothing_to_run(project):
    (project / "a.jsonl").write_text(lines(3))
    (project / "b.jsonl").write_text("id,text\n")
    shards = read_shards(["a.jsonl", "b.jsonl"], 5)
    with pytest.raises(InputError, match="b.jsonl"):
        next(shards)  # exit 2: the 3 records of a.jsonl were not handed on


def test_a_truncated_zst_breaks_off_midway_and_a_fake_one_does_not(project):
    whole = zstandard.ZstdCompressor().compress(lines(9).encode())
    (project / "cut.jsonl.zst").write_bytes(whole[:-5])
    (project / "fake.jsonl.zst").write_text(lines(3))
    with pytest.raises(InputError, match="middle of a zstd frame") as cut:
        list(read_shards(["cut.jsonl.zst"], 4))
    with pytest.raises(InputError, match="not valid zstd") as fake:
        list(read_shards(["fake.jsonl.zst"], 4))
    assert cut.value.midway and not fake.value.midway
