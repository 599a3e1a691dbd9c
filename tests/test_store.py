"""store.py: atomic files, state.json, the lock, errors.jsonl and the shard journal."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from chunbot_cli.state import Counters, ShardEntry, StageState, State
from chunbot_cli.store import Entry, Journal, Locked, Workdir, dumps_lines, write_atomic


def test_write_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_state_round_trip(tmp_path):
    workdir = Workdir(tmp_path / "run")
    assert workdir.load_state() == State()
    state = State(stages={"s": StageState("f", shards={0: ShardEntry("d", "t", Counters(
        records_out=3, cost=0.25))})})
    workdir.save_state(state)
    assert workdir.load_state() == state
    saved = json.loads((tmp_path / "run/state.json").read_text())  # the format of old
    assert saved["version"] == 1 and saved["stages"]["s"]["shards"]["0"]["out"] == 3


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_shards_round_trip(tmp_path, compress):
    workdir = Workdir(tmp_path, compress)
    records = [{"_id": 1, "x": "é"}, {"_id": 2, "x": None}]
    workdir.write_shard("s", 3, dumps_lines(records), dumps_lines([{"_id": 1}]))
    assert workdir.read_shard("s", 3) == records
    suffix = ".jsonl.zst" if compress else ".jsonl"
    assert (tmp_path / f"s/part-00003{suffix}").exists()
    assert (tmp_path / f"s/trace-00003{suffix}").exists()


def test_errors_are_cut_back_to_the_committed_length(tmp_path):
    workdir = Workdir(tmp_path)
    (tmp_path / "s").mkdir()
    size = workdir.append_errors("s", 0, dumps_lines([{"shard": 0, "e": 1}]))
    # a commit that crashed after appending but before state.json recorded it
    with open(workdir.errors_path("s"), "ab") as f:
        f.write(b'{"shard": 1, "e": "half-committed"}\n')
    size = workdir.append_errors("s", size, dumps_lines([{"shard": 1, "e": 2}]))
    assert workdir.errors_path("s").read_bytes() == b'{"shard":0,"e":1}\n{"shard":1,"e":2}\n'
    assert size == workdir.errors_path("s").stat().st_size
    assert workdir.drop_errors("s", {0}) == len(b'{"shard":1,"e":2}\n')


def test_reset_stage_keeps_one_previous_generation(tmp_path):
    workdir = Workdir(tmp_path)
    workdir.write_shard("s", 0, b'{"v":1}\n', None)
    workdir.reset_stage("s")
    workdir.write_shard("s", 0, b'{"v":2}\n', None)
    workdir.reset_stage("s")
    assert (tmp_path / "s.prev/part-00000.jsonl").read_bytes() == b'{"v":2}\n'
    assert list((tmp_path / "s").iterdir()) == []


def test_journal_keeps_finished_entries_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "s/part-00000.journal"
    journal = Journal(path, {"stage": "s", "fingerprint": "f1", "src": "a"})
    journal.open({})
    journal.append(Entry(0, {}, out="x"))
    journal.append(Entry(2 << 32 | 1, {}, out="y"))  # a record a python stage fanned out
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "ou')  # killed mid-write
    again = Journal(path, {"stage": "s", "fingerprint": "f1", "src": "a"})
    done = again.load()
    assert sorted(done) == [0, 2 << 32 | 1]
    assert again.token == journal.token  # what downstream journals name as their source
    again.open(done)
    again.append(Entry(3, {}, out="z"))
    again.close()
    assert sorted(again.load()) == [0, 3, 2 << 32 | 1]


def test_a_journal_for_other_inputs_is_discarded(tmp_path):
    path = tmp_path / "part-00000.journal"
    journal = Journal(path, {"fingerprint": "f1", "src": "a"})
    journal.open({})
    journal.append(Entry(0, {}, out="x"))
    journal.close()
    other = Journal(path, {"fingerprint": "f2", "src": "a"})
    assert other.load() == {} and other.token != journal.token


def test_lock_held_by_another_process_names_its_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom chunbot_cli.store import Workdir\n"
         f"with Workdir({str(tmp_path)!r}).lock():\n"
         "    print('held', flush=True)\n    time.sleep(30)\n"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(Locked, match=f"pid {holder.pid}"):
            with Workdir(tmp_path).lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: it is taken over, naming the old pid
    with Workdir(tmp_path).lock() as previous:
        assert previous == str(holder.pid)
    with Workdir(tmp_path).lock() as previous:
        assert previous is None  # a clean exit leaves no pid behind


def test_lock_waits_for_nobody_when_free(tmp_path):
    start = time.monotonic()
    with Workdir(tmp_path).lock():
        assert (tmp_path / "lock").read_text().strip().isdigit()
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("cache", ["", "cache: false\n", "defaults: {cache: false}\n"],
                         ids=["cached", "no-cache", "no-stage-cached"])
def test_a_corrupt_state_json_mentions_the_cache_only_when_there_is_one(project, cache):
    from conftest import chunbot, write_jsonl

    write_jsonl(project / "data.jsonl", [{"id": "a", "text": "great"}])
    (project / "p.yaml").write_text(f"name: t\ninput: data.jsonl\n{cache}stages:\n"
                                    "  - name: s\n    prompt: 'sentiment: {{ text }}'\n")
    assert chunbot("run", "p.yaml", "-q", cwd=project).returncode == 0
    (project / "runs/t/state.json").write_bytes(b'{"ver')
    for command in ("run", "status"):
        result = chunbot(command, "p.yaml", cwd=project)
        message = result.stderr.decode()
        assert result.returncode == 2 and "state.json" in message and "move it away" in message
        assert ("the cache keeps the replies" in message) == (cache == ""), (command, message)
