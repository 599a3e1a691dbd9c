"""`provider: gemini` end to end: `chunbot run` against `chunbot sim serve`'s Gemini routes
(generateContent, streamGenerateContent?alt=sse) on 127.0.0.1 — the pipelines users write
for Gemini, with only the base URL pointing at the simulator."""

from __future__ import annotations

from pathlib import Path

from conftest import chunbot, read_jsonl, read_stage, write_jsonl
from test_http import TEXTS  # the reviews the other protocols' tests label

PIPELINE = """
name: g
input: data.jsonl
id_field: id
shard_size: 40
models:
  flash: {{provider: gemini, model: sim-small, base_url: "{url}", api_key_env: SIM_GEMINI_KEY,
           price: {{input: 0.30, output: 2.50}}{extra}}}
defaults: {{retries: {retries}, outage_timeout: 60s}}
stages:
  - name: sentiment
    model: flash
    system: You are a precise annotator.
    prompt: "Label the sentiment (positive/negative/neutral): {{{{ text }}}}"
    params: {{temperature: 0, max_tokens: 8{stream}}}
"""
KEY = "AIza-sim-secret-key"


def gemini_project(project: Path, url: str, stream: bool = False, retries: int = 6,
                   extra: str = "", n: int = 120, texts: list[str] = TEXTS) -> Path:
    write_jsonl(project / "data.jsonl",
                [{"id": f"r{i:04d}", "text": f"{texts[i % len(texts)]} #{i}"} for i in range(n)])
    (project / "p.yaml").write_text(PIPELINE.format(
        url=url, retries=retries, extra=extra, stream=", stream: true" if stream else ""))
    return project / "p.yaml"


def run(project: Path, *args: str):
    return chunbot("run", "p.yaml", "-q", "--no-cache", *args, cwd=project,
                   env={"SIM_GEMINI_KEY": KEY})


def everything(project: Path, result) -> bytes:
    return result.stderr + result.stdout + b"".join(
        p.read_bytes() for p in (project / "runs").rglob("*") if p.is_file())


def test_json_and_sse_label_like_openai_with_the_key_in_the_header_only(project, sim_server):
    server = sim_server("--api-key", KEY)
    outputs = []
    for stream in (False, True):
        gemini_project(project, server.url, stream)
        result = run(project)
        assert result.returncode == 0, result.stderr.decode()
        outputs.append(read_stage(project / "runs/g", "sentiment"))
        assert KEY.encode() not in everything(project, result)
        (project / "runs/g/state.json").unlink()
    assert outputs[0] == outputs[1] and len(outputs[0]) == 120
    assert {r["sentiment"] for r in outputs[0]} == {"positive", "negative", "neutral"}
    # the same prompts through the OpenAI protocol get the same labels
    openai = gemini_project(project, server.url)
    openai.write_text(openai.read_text().replace("provider: gemini", "provider: openai")
                      .replace(f'"{server.url}"', f'"{server.url}/v1"'))
    assert run(project).returncode == 0
    assert read_stage(project / "runs/g", "sentiment") == outputs[0]
    trace = read_jsonl(next((project / "runs/g/sentiment").glob("trace-*.jsonl")))[0]
    assert trace["tokens"]["in"] > 0 and trace["cost"] > 0


def test_a_wrong_key_fails_every_record_saying_so_without_the_key(project, sim_server):
    server = sim_server("--api-key", "the-right-one")
    gemini_project(project, server.url, extra=", max_concurrency: 4", n=20)
    result = run(project)
    assert result.returncode == 1
    errors = read_jsonl(project / "runs/g/sentiment/errors.jsonl")
    assert len(errors) == 20 and all("HTTP 400" in e["error"] or "authentication" in e["error"]
                                     for e in errors), errors[0]
    assert KEY.encode() not in everything(project, result)


def test_429s_with_retry_info_and_503s_are_waited_out_and_nothing_is_lost(project, sim_server):
    server = sim_server("--rpm", "3000", "--error-rate", "0.1", "--storm-s", "0.5",
                        "--seed", "5")
    gemini_project(project, server.url, retries=10, n=200)
    result = run(project)
    assert result.returncode == 0, result.stderr.decode()
    assert [r["_id"] for r in read_stage(project / "runs/g", "sentiment")] == \
        [f"r{i:04d}" for i in range(200)]
    stats = server.stats()
    assert stats["answered"] == 200 and stats["repeated"] == 0
    assert stats["by_status"].get("429", 0) > 0 and stats["by_status"].get("503", 0) + \
        stats["by_status"].get("500", 0) > 0
    # after the first 429s the budget is the quota their bodies named (3,000 a minute)
    assert stats["by_status"].get("429", 0) < 200


def test_a_prompt_the_safety_filter_blocks_is_a_record_failure_that_says_so(project,
                                                                          sim_server):
    server = sim_server("--block-prompt", "forbidden")
    gemini_project(project, server.url, n=10, texts=["great", "forbidden words here"])
    result = run(project)
    assert result.returncode == 1
    errors = read_jsonl(project / "runs/g/sentiment/errors.jsonl")
    assert len(errors) == 5 and all("finishReason SAFETY" in e["error"] for e in errors), errors
    assert len(read_stage(project / "runs/g", "sentiment")) == 5
    assert server.stats()["answered"] == 10  # not retried


def test_the_other_vendors_refusals_are_record_failures_too(project, sim_server):
    server = sim_server("--block-prompt", "forbidden")
    for provider, said in (("openai", "finish_reason content_filter"),
                           ("anthropic", "stop_reason refusal")):
        pipeline = gemini_project(project, server.url, n=10,
                                  texts=["great", "forbidden words here"])
        url = f"{server.url}/v1" if provider == "openai" else server.url
        text = pipeline.read_text().replace("provider: gemini", f"provider: {provider}")
        pipeline.write_text(text.replace(f'"{server.url}"', f'"{url}"'))
        result = run(project)
        assert result.returncode == 1
        errors = read_jsonl(project / "runs/g/sentiment/errors.jsonl")
        assert len(errors) == 5 and all(said in e["error"] for e in errors), errors[0]
        (project / "runs/g/state.json").unlink()
        (project / "runs/g/sentiment/errors.jsonl").unlink()
