"""stages.py: what each stage kind does to the records of one shard."""

from __future__ import annotations

import asyncio

import orjson

from chunbot_cli.config import ModelSpec, StageSpec
from chunbot_cli.llm.client import ModelClient
from chunbot_cli.llm.types import ProviderError, Reply
from chunbot_cli.stages import Batch, FilterStage, LLMStage, Outlet, PythonStage
from chunbot_cli.store import Entry


def records(*texts: str) -> list[dict]:
    return [{"_id": i, "text": t} for i, t in enumerate(texts)]


class Shard:
    """A stage's shard fed all its records at once, as a job does from a part file."""

    def __init__(self, stage, rows, done=None):
        self.passed, self.entries = [], []
        outlet = Outlet(lambda batch, data, counts: self.passed.extend(batch.records),
                        lambda entry, new: new and self.entries.append(entry))

        async def run():
            shard = stage.open(0, "source", outlet, done)
            await shard.feed(Batch(list(range(len(rows))), rows))
            return await shard.finish()

        self.out = asyncio.run(run())
        self.records = [orjson.loads(line) for line in self.out.data.splitlines()]
        self.errors, self.trace, self.counts = self.out.errors, self.out.trace, self.out.counts


def test_filter_keeps_drops_and_fails_per_record():
    stage = FilterStage(StageSpec(name="neg", kind="filter", fingerprint="f",
                                  filter="label == 'negative'"))
    out = Shard(stage, [{"_id": 0, "label": "negative"}, {"_id": 1, "label": "positive"},
                        {"_id": 2}])
    assert [r["_id"] for r in out.records] == [0]
    assert out.counts.filtered == 1 and out.counts.failed == 1
    assert out.errors[0]["_id"] == 2 and "label" in out.errors[0]["error"]


def test_python_stage_returns_drops_fans_out_and_fails(project):
    (project / "kinds_module.py").write_text(
        "def f(r):\n"
        "    if r['text'] == 'drop':\n        return None\n"
        "    if r['text'] == 'fan':\n        return [{'k': 1}, {'k': 2}]\n"
        "    if r['text'] == 'bad':\n        return 42\n"
        "    if r['text'] == 'boom':\n        raise ValueError('no')\n"
        "    r['seen'] = True\n    return r\n")
    stage = PythonStage(StageSpec(name="py", kind="python", fingerprint="f",
                                  python="kinds_module:f"), [str(project)])
    out = Shard(stage, records("keep", "drop", "fan", "bad", "boom"))
    assert out.records == [{"_id": 0, "text": "keep", "seen": True},
                           {"k": 1, "_id": "2-0"}, {"k": 2, "_id": "2-1"}]
    assert out.counts.filtered == 1 and out.counts.failed == 2
    assert "returned int" in out.errors[0]["error"]
    assert "ValueError: no" in out.errors[1]["error"] and "kinds_module.py:" in out.errors[1]["error"]


def llm_stage(spec_changes: dict | None = None, providers: dict | None = None) -> LLMStage:
    fields = {"name": "label", "kind": "llm", "fingerprint": "f", "models": ("a",),
              "prompt": "Label the sentiment: {{ text }}", "output": "label", "retries": 0}
    spec = StageSpec(**{**fields, **(spec_changes or {})})
    clients = {}
    for alias in spec.models:
        model = ModelSpec(alias=alias, provider="sim", model="sim-small")
        clients[alias] = ModelClient(model, (providers or {}).get(alias))
    return LLMStage(spec, clients)


def test_llm_stage_labels_in_input_order_and_traces_each_record():
    stage = llm_stage()
    out = Shard(stage, records("great, love it", "terrible, broke", "okay"))
    assert [r["label"] for r in out.records] == ["positive", "negative", "neutral"]
    assert sorted(e.key for e in out.entries) == [0, 1, 2]
    trace = out.trace[1]
    assert trace["request"]["messages"] == [{"role": "user",
                                             "content": "Label the sentiment: terrible, broke"}]
    assert trace["response"] == "negative" and trace["model"] == "a"
    assert trace["tokens"]["in"] > 0 and len(trace["attempts"]) == 1


def test_llm_stage_does_not_resend_journaled_records():
    stage = llm_stage()
    done = {0: Entry(0, {"_id": 0}, out="from the journal")}
    out = Shard(stage, records("great", "awful"), done)
    assert [r["label"] for r in out.records] == ["from the journal", "negative"]
    assert [e.key for e in out.entries] == [1]
    assert stage.clients[0].requests == 1


def test_a_missing_field_fails_the_record_without_a_request():
    stage = llm_stage()
    out = Shard(stage, [{"_id": 7, "title": "no text"}])
    assert out.records == [] and "text" in out.errors[0]["error"]
    assert stage.clients[0].requests == 0


class Scripted:
    """A provider that answers from a script, for cascade and retry behaviour."""

    def __init__(self, *answers):
        self.answers = list(answers)

    async def complete(self, request, url):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return Reply(text=answer, model="scripted", input_tokens=3, output_tokens=2)

    async def close(self):
        pass


def test_a_cascade_asks_the_next_model_when_the_reply_does_not_parse():
    stage = llm_stage({"models": ("a", "b"), "parse": "json"},
                      {"a": Scripted("not json"), "b": Scripted('{"label": "negative"}')})
    out = Shard(stage, records("x"))
    assert out.records[0]["label"] == {"label": "negative"}
    assert out.trace[0]["model"] == "b"


def test_retryable_errors_are_retried_and_each_attempt_is_traced():
    flaky = Scripted(ProviderError("HTTP 503", retryable=True, status=503,
                                   retry_after=0), "positive")
    stage = llm_stage({"retries": 2}, {"a": flaky})
    out = Shard(stage, records("x"))
    assert out.records[0]["label"] == "positive"
    assert [a["status"] if a["error"] else "ok" for a in out.trace[0]["attempts"]] == [503, "ok"]


def test_other_errors_fail_the_record_at_once():
    stage = llm_stage({"retries": 5}, {"a": Scripted(ProviderError("HTTP 400", retryable=False,
                                                                   status=400))})
    out = Shard(stage, records("x"))
    assert out.errors[0]["error"] == "model 'a': HTTP 400"
    assert len(out.trace[0]["attempts"]) == 1


def test_a_record_whose_journal_write_fails_fails_the_shard_rather_than_vanishing():
    """A worker that raises (a full disk under the journal) before the shard is finished
    makes finish() raise: its shard is never committed without that record."""
    stage = llm_stage()
    written = []

    def entry(done, new):
        if len(written) == 1:
            raise OSError(28, "No space left on device")
        written.append(done)

    async def run():
        shard = stage.open(0, "source", Outlet(lambda batch, data, counts: None, entry))
        await shard.feed(Batch([0, 1, 2], records("great", "terrible", "okay")))
        await asyncio.sleep(0.05)  # the workers are done before finish() is called
        return await shard.finish()

    try:
        asyncio.run(run())
    except OSError as e:
        assert e.errno == 28
    else:
        raise AssertionError("the shard finished without a record")
