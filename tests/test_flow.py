"""flow.py: a shard job's records flow stage to stage; shards still commit whole, in order."""

from __future__ import annotations

import asyncio
import signal

import orjson

from chunbot_cli.config import ModelSpec, StageSpec
from chunbot_cli.flow import Lines, ShardJob, StageWork, run_job
from chunbot_cli.llm.client import ModelClient
from chunbot_cli.stages import FilterStage, LLMStage

from conftest import chunbot, read_jsonl, read_stage, write_jsonl
from test_cli import logged_keys, recorded_keys, start, wait_for


class Log:
    """JobEvents that write down what happened, in order."""

    def __init__(self):
        self.events, self.outputs = [], {}

    def fed(self, stage, count):
        pass

    def entry(self, stage, shard, entry, new):
        pass

    def passed(self, stage, shard, batch, data, counts):
        self.events += [("passed", stage, record["_id"]) for record in batch.records]

    def done(self, job, position, output):
        stage = job.stages[position].stage
        self.events.append(("done", stage))
        self.outputs[stage] = [orjson.loads(line) for line in output.data.splitlines()]

    def pending(self, stage, shard):
        pass


def test_a_record_enters_the_next_stage_before_its_shard_is_whole():
    model = ModelSpec(alias="m", provider="sim", model="sim-small", latency_ms=20,
                      max_concurrency=2)
    llm = StageSpec(name="label", kind="llm", fingerprint="f", models=("m",),
                    prompt="Label the sentiment of: {{ text }}", output="label", retries=0)
    keep = StageSpec(name="negatives", kind="filter", fingerprint="g",
                     filter="label == 'negative'")
    stages = {"label": LLMStage(llm, {"m": ModelClient(model)}), "negatives": FilterStage(keep)}
    texts = ["it broke, terrible", "great, I love it"] * 5
    lines = [orjson.dumps({"text": t}) for t in texts]
    job = ShardJob(0, Lines(lines, 0, [("d.jsonl", 1, len(lines))], None),
                   [StageWork("label", "digest", "t1"), StageWork("negatives", "t1", "t2")])
    log = Log()
    asyncio.run(run_job(job, stages, log))
    first_out = log.events.index(("passed", "negatives", 0))
    assert first_out < log.events.index(("done", "label"))
    assert log.events.index(("done", "label")) < log.events.index(("done", "negatives"))
    assert [r["_id"] for r in log.outputs["negatives"]] == [0, 2, 4, 6, 8]  # input order


FANOUT = """
name: fan
input: data.jsonl
id_field: id
shard_size: 20
models:
  small: {provider: sim, model: sim-small, latency_ms: 20, max_concurrency: 4,
          request_log: requests.log}
stages:
  - name: split
    python: "splitter:split"
  - name: label
    model: small
    prompt: "Label the sentiment of: {{ text }}"
"""

SPLITTER = """
def split(record):
    n = int(record["id"][1:])
    if n % 5 == 4:
        return None
    return [{"id": f"{record['id']}-{k}", "text": f"{record['text']} ({k})"} for k in (1, 2)]
"""


def test_kill_9_while_a_stage_works_on_records_an_upstream_fanned_out(project):
    """The python stage commits its shards at once while the LLM stage still works on
    them: the LLM stage's journal knows its records by their keys in the fan-out, and a
    resume must find them again (a keys file beside the journal), not send them twice."""
    texts = ["great, I love it", "it broke, terrible", "okay I guess"]
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:03d}", "text": f"{texts[i % 3]} #{i}"} for i in range(100)])
    (project / "splitter.py").write_text(SPLITTER)
    (project / "fan.yaml").write_text(FANOUT)
    process = start(project, "run", "fan.yaml", "-q")
    wait_for(lambda: len(logged_keys(project)) >= 60)
    process.send_signal(signal.SIGKILL)
    process.wait()
    workdir = project / "runs/fan"
    durable = recorded_keys(workdir)
    sent_before = logged_keys(project)
    assert len(sent_before) < 160, "the kill should land mid-run"
    assert list(workdir.glob("label/part-*.keys")), "no shard was committed upstream mid-flow"

    result = chunbot("run", "fan.yaml", "-q", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    sent_after = logged_keys(project)[len(sent_before):]
    assert not durable & set(sent_after), "a finished request was sent again"
    kept = [i for i in range(100) if i % 5 != 4]
    labelled = read_stage(workdir, "label")
    assert [r["id"] for r in labelled] == [f"r{i:03d}-{k}" for i in kept for k in (1, 2)]
    assert [r["_id"] for r in labelled] == [f"r{i:03d}-{j}" for i in kept for j in (0, 1)]
    assert all(r["text"].endswith(f"({r['id'][-1]})") for r in labelled)
    assert all(r["label"] in ("positive", "negative", "neutral") for r in labelled)
    assert not list(workdir.glob("*/part-*.journal")) and not list(workdir.glob("*/*.keys"))
    assert read_jsonl(workdir / "label/trace-00000.jsonl")[0]["_id"] == "r000-0"


def test_a_shard_job_is_plain_data_an_executor_can_ship():
    import pickle

    from chunbot_cli.flow import Part
    from chunbot_cli.store import Entry

    job = ShardJob(3, Part("runs/x/a/part-00003.jsonl", None, [0, 2, 5 << 32]),
                   [StageWork("b", "t-a", "t-b", {2: Entry(2, {"_id": "r2"}, out="ok")}, "batch")])
    assert pickle.loads(pickle.dumps(job)) == job
