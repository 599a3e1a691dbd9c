"""config.py: a pipeline file becomes a typed Pipeline, or one clear line saying what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunbot_cli.config import ConfigError, check_api_keys, load

GOOD = """
name: reviews
input: data.jsonl
id_field: id
shard_size: 500
models:
  small: {provider: sim, model: sim-small, max_concurrency: 8}
defaults: {retries: 2, params: {temperature: 0}}
stages:
  - name: label
    model: small
    system: You label things.
    prompt: "Label: {{ text }}"
    params: {max_tokens: 4}
  - name: keep
    filter: "label == 'negative'"
  - name: draft
    model: [small, sim]
    prompt: "Reply to: {{ text }}"
    output: reply
    parse: json
"""


def write(project: Path, text: str) -> Path:
    (project / "p.yaml").write_text(text)
    return project / "p.yaml"


def refused(project: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(write(project, text))
    return str(caught.value)


def test_a_good_pipeline_is_typed(project):
    pipeline = load(write(project, GOOD))
    assert pipeline.name == "reviews" and pipeline.workdir == project / "runs/reviews"
    assert [s.kind for s in pipeline.stages] == ["llm", "filter", "llm"]
    label, keep, draft = pipeline.stages
    assert label.output == "label"  # defaults to the stage name
    assert label.params == {"temperature": 0, "max_tokens": 4}
    assert label.retries == 2
    assert draft.models == ("small", "sim") and draft.output == "reply"
    assert "sim" in pipeline.models  # the built-in alias is always there
    assert pipeline.models["small"].max_concurrency == 8


def test_a_stage_without_model_uses_the_builtin_sim(project):
    pipeline = load(write(project, "name: t\ninput: d.jsonl\nstages:\n"
                                   "  - name: s\n    prompt: '{{ text }}'\n"))
    assert pipeline.stages[0].models == ("sim",)


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("    output: reply", "    ouput: reply"),
     "p.yaml:20: stage 'draft': key 'ouput': unknown key (did you mean 'output'?)"),
    (GOOD.replace("name: reviews\n", ""), "p.yaml:2: key 'name': is required"),
    (GOOD.replace("model: small\n    system", "model: big\n    system"),
     "stage 'label': key 'model': unknown model alias 'big'"),
    (GOOD.replace("name: draft", "name: label"), "stage 'label': key 'name': duplicate stage name"),
    (GOOD.replace("Label: {{ text }}", "Label: {{ text }"),
     "stage 'label': key 'prompt': template does not compile"),
    (GOOD.replace("label == 'negative'", "label == = 'negative'"),
     "stage 'keep': key 'filter': does not compile"),
    (GOOD.replace("    parse: json", "    mode: batch"),
     "stage 'draft': key 'mode': model 'small' has no batch API"),
    (GOOD.replace("shard_size: 500", "shard_size: many"),
     "key 'shard_size': must be an integer, not str 'many'"),
    (GOOD.replace("shard_size: 500", "shard_size: 500\nshard_size: 600"),
     "duplicate key 'shard_size'"),
    (GOOD.replace("provider: sim, model", "provider: mystery, model"),
     "model 'small': key 'provider': unknown provider 'mystery'"),
    (GOOD.replace("    filter: \"label == 'negative'\"", "    filter: x\n    prompt: y"),
     "stage 'keep': needs exactly one of 'prompt' (LLM stage), 'filter' or 'python'"),
    ("name: t\ninput: [d.jsonl\n", "invalid YAML"),
    (GOOD.replace("provider: sim, model: sim-small", "provider: anthropic, model: c, "
                  "base_url: 'http://x/v1'"),
     "model 'small': key 'base_url': 'http://x/v1': an anthropic URL is the server's root"),
    (GOOD.replace("provider: sim, model: sim-small", "provider: gemini, model: g, "
                  "base_url: 'http://x/v1beta'"),
     "'http://x/v1beta': a gemini URL is the server's root, without /v1beta (requests go "
     "to http://x/v1beta/models/MODEL:generateContent)"),
    (GOOD.replace("provider: sim, model: sim-small", "provider: openai, model: c, "
                  "endpoints: [gpu-a:8000]"),
     "model 'small': key 'endpoints': 'gpu-a:8000' is not an http:// or https:// URL"),
    (GOOD.replace("max_concurrency: 8", "base_url: 'http://x'"),
     "model 'small': key 'base_url': is only for the HTTP providers (openai, anthropic, gemini)"),
    (GOOD.replace("defaults: {", "defaults: {outage_timeout: soon, "),
     "defaults: key 'outage_timeout': must be a duration such as 30s, 10m or 2h, not 'soon'"),
    (GOOD.replace("defaults: {", "defaults: {max_cost: -1, "),
     "defaults: key 'max_cost': must be 0 or more (USD)"),
    (GOOD.replace("defaults: {", "defaults: {max_cost: lots, "),
     "defaults: key 'max_cost': must be"),
])
def test_mistakes_name_file_stage_and_key(project, text, expected):
    message = refused(project, text)
    assert "p.yaml" in message
    assert expected in message


def test_python_targets_are_imported_when_loading(project):
    (project / "tidy_ok.py").write_text("def clean(record):\n    return record\n")
    text = "name: t\ninput: d.jsonl\nstages:\n  - name: tidy\n    python: {}\n"
    assert load(write(project, text.format("tidy_ok:clean"))).stages[0].kind == "python"
    assert "cannot import 'no_such_module'" in refused(project, text.format("no_such_module:f"))
    assert "has no attribute 'missing'" in refused(project, text.format("tidy_ok:missing"))
    assert "must look like 'module:function'" in refused(project, text.format("tidy_ok"))


def test_editing_a_stage_changes_its_fingerprint_and_downstream_only(project):
    before = [s.fingerprint for s in load(write(project, GOOD)).stages]
    after = [s.fingerprint for s in
             load(write(project, GOOD.replace("keep\n    filter: \"label == 'negative'\"",
                                               "keep\n    filter: \"label != 'positive'\""))).stages]
    assert before[0] == after[0]
    assert before[1] != after[1] and before[2] != after[2]


def test_concurrency_settings_do_not_change_fingerprints(project):
    before = [s.fingerprint for s in load(write(project, GOOD)).stages]
    after = [s.fingerprint for s in
             load(write(project, GOOD.replace("max_concurrency: 8", "max_concurrency: 64"))).stages]
    assert before == after


def test_editing_a_python_stage_module_makes_it_stale(project):
    module = project / "tidy_edit.py"
    module.write_text("def clean(record):\n    return record\n")
    text = "name: t\ninput: d.jsonl\nstages:\n  - name: tidy\n    python: tidy_edit:clean\n"
    before = load(write(project, text)).stages[0].fingerprint
    module.write_text("def clean(record):\n    record['x'] = 1\n    return record\n")
    import sys
    del sys.modules["tidy_edit"]
    assert load(write(project, text)).stages[0].fingerprint != before


def test_missing_pipeline_file(project):
    with pytest.raises(ConfigError, match="nope.yaml: no such pipeline file"):
        load(project / "nope.yaml")


HTTP_MODELS = """
name: t
input: d.jsonl
models:
  gpt: {provider: openai, model: gpt-4o-mini}
  local: {provider: openai, model: qwen, base_url: "http://gpu-a:8000/v1/",
          endpoints: ["http://gpu-a:8000/v1", "http://gpu-b:8000/v1"], timeout: 2m}
  claude: {provider: anthropic, model: claude-haiku-4-5, max_tokens: 512}
defaults: {outage_timeout: 15m}
stages:
  - name: a
    model: [local, gpt]
    prompt: "{{ text }}"
  - name: b
    model: claude
    prompt: "{{ text }}"
    outage_timeout: 90s
"""


def test_http_models_get_vendor_urls_and_key_variables_unless_set(project):
    pipeline = load(write(project, HTTP_MODELS))
    gpt, local, claude = (pipeline.models[a] for a in ("gpt", "local", "claude"))
    assert (gpt.base_url, gpt.api_key_env) == ("https://api.openai.com/v1", "OPENAI_API_KEY")
    assert (claude.base_url, claude.api_key_env) == ("https://api.anthropic.com",
                                                     "ANTHROPIC_API_KEY")
    assert (local.base_url, local.api_key_env) == ("http://gpu-a:8000/v1", None)
    assert local.urls == ("http://gpu-a:8000/v1", "http://gpu-b:8000/v1")
    assert gpt.urls == ("https://api.openai.com/v1",)
    assert local.timeout == 120 and claude.max_tokens == 512
    assert [s.outage_timeout for s in pipeline.stages] == [900, 90]


def test_a_missing_api_key_is_refused_before_running(project, monkeypatch):
    pipeline = load(write(project, HTTP_MODELS))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    with pytest.raises(ConfigError) as caught:
        check_api_keys(pipeline, pipeline.stages)
    assert "stage 'a': model 'gpt': environment variable OPENAI_API_KEY is not set" in \
        str(caught.value)
    check_api_keys(pipeline, pipeline.stages[1:])  # stage b's key is there


def test_endpoints_timeouts_and_outage_waits_do_not_change_fingerprints(project):
    before = [s.fingerprint for s in load(write(project, HTTP_MODELS)).stages]
    edited = HTTP_MODELS.replace(', "http://gpu-b:8000/v1"]', "]").replace("2m", "5m")
    after = [s.fingerprint for s in load(write(project, edited.replace("90s", "1h"))).stages]
    assert before == after


def test_every_shipped_example_pipeline_is_valid():
    examples = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(examples) >= 6
    for example in examples:
        assert load(example).stages


def test_relative_paths_are_the_pipeline_files_wherever_chunbot_runs(project, monkeypatch):
    (project / "jobs").mkdir()
    (project / "jobs/p.yaml").write_text(
        "name: t\ninput: data/*.jsonl\noutput: out/results.jsonl.zst\n"
        "cache: {path: cache.sqlite3}\nstages: [{name: s, prompt: '{{ text }}'}]\n")
    (project / "elsewhere").mkdir()
    monkeypatch.chdir(project / "elsewhere")
    pipeline = load("../jobs/p.yaml")
    folder = (project / "jobs").resolve()
    assert Path(pipeline.input).resolve() == folder / "data/*.jsonl"
    assert pipeline.workdir.resolve() == folder / "runs/t"
    assert pipeline.output.resolve() == folder / "out/results.jsonl.zst"
    assert Path(pipeline.cache.path).resolve() == folder / "cache.sqlite3"
    monkeypatch.chdir(project)
    assert load("jobs/p.yaml").workdir == Path("jobs/runs/t")  # as the file's path is given


def test_environment_variables_in_values(project, monkeypatch):
    monkeypatch.setenv("DATA", "reviews.jsonl")
    monkeypatch.delenv("WORK", raising=False)
    pipeline = load(write(project, "name: t\ninput: ${DATA}\nworkdir: ${WORK:-runs/x}\n"
                                   "stages: [{name: s, prompt: 'costs $$5: {{ text }}'}]\n"))
    assert pipeline.input == str(project / "reviews.jsonl")
    assert pipeline.workdir == project / "runs/x"
    assert pipeline.stages[0].prompt == "costs $5: {{ text }}"
    message = refused(project, "name: t\ninput: data.jsonl\nworkdir: ${WORK}\n"
                               "stages: [{name: s, prompt: '{{ text }}'}]\n")
    assert message.endswith("p.yaml:3: ${WORK}: environment variable WORK is not set "
                            "(give a default with ${WORK:-…})")


def test_id_field_is_id_unless_turned_off(project):
    text = "name: t\ninput: d.jsonl\nstages: [{name: s, prompt: '{{ text }}'}]\n"
    assert load(write(project, text)).id_field == "id"
    assert load(write(project, "id_field: null\n" + text)).id_field is None
    assert "must name a .jsonl" in refused(project, "output: out.csv\n" + text)


def test_a_pipeline_can_be_a_mapping_for_notebooks(project):
    import chunbot_cli as chunbot

    pipeline = chunbot.load({"name": "t", "input": "data.jsonl", "shard_size": 5,
                             "stages": [{"name": "s", "prompt": "Label: {{ text }}"},
                                        {"name": "keep", "filter": "s != ''"}]})
    assert pipeline.workdir == Path("runs/t") and pipeline.input == "data.jsonl"
    assert [s.kind for s in pipeline.stages] == ["llm", "filter"]
    assert pipeline.stages[1].fingerprint == load(write(project, """
name: t
input: data.jsonl
shard_size: 5
stages:
  - {name: s, prompt: "Label: {{ text }}"}
  - {name: keep, filter: "s != ''"}
""")).stages[1].fingerprint  # the same pipeline either way
    with pytest.raises(chunbot.ConfigError, match="<pipeline>: stage 's': key 'promt'"):
        chunbot.load({"name": "t", "input": "d.jsonl", "stages": [{"name": "s", "promt": "x"}]})


def test_the_executor_key_names_ray_and_its_address_or_is_refused(project):
    base = "name: e\nstages:\n  - {name: a, prompt: 'x {{ t }}'}\n"
    assert load(write(project, base)).executor == "local"
    ray = load(write(project, base + "executor: ray\n"))
    assert (ray.executor, ray.ray_address) == ("ray", None)
    joined = load(write(project, base + "executor: {ray: '127.0.0.1:6380'}\n"))
    assert (joined.executor, joined.ray_address) == ("ray", "127.0.0.1:6380")
    message = refused(project, base + "executor: kubernetes\n")
    assert "key 'executor'" in message and "local, ray or {ray: ADDRESS}" in message
