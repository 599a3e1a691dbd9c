"""Credentials in a URL (`http://user:password@host/…`): sent as HTTP Basic auth to that URL
alone, by the realtime and batch paths of every HTTP provider, and never shown — not even
when a server echoes the Authorization header back in an error body.

Against real `chunbot sim serve` processes that require an exact Authorization header
(`--authorization`) and quote it in their error bodies (`--echo-authorization`).
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import pytest

from chunbot_cli.config import ModelSpec
from chunbot_cli.llm import batch
from chunbot_cli.llm.batch import batch_api
from chunbot_cli.llm.http import HTTPProvider, split_credentials
from chunbot_cli.llm.types import ProviderError, Reply, Request
from conftest import SimServer, chunbot, read_jsonl, write_jsonl

ALICE = "Basic YWxpY2U6cHc="  # alice:pw

@pytest.fixture
def sim(sim_server):
    """`chunbot sim serve` with its options as keywords: sim(fail_prompt="X") is
    --fail-prompt X, a True flag is the bare flag."""
    def start(**options) -> SimServer:
        flags: list[str] = []
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            flags += [flag] if value is True else [flag, str(value)]
        return sim_server(*flags)

    return start


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def with_credentials(url: str, userinfo: str) -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


PIPELINE = """
name: t
input: data.jsonl
id_field: id
models:
  m:
    provider: {provider}
    model: sim-small
    {urls}
defaults: {{retries: {retries}, outage_timeout: 30s}}
stages:
  - name: label
    model: m
    prompt: "Label the sentiment: {{{{ text }}}}"
    params: {{max_tokens: 8{stream}}}
"""


def project_for(project: Path, provider: str, urls: str, stream: bool = False,
                retries: int = 2, texts: list[str] | None = None) -> Path:
    texts = texts or [f"great, love it #{i}" for i in range(6)]
    write_jsonl(project / "data.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    stream_params = ", stream: true" if stream else ""
    (project / "p.yaml").write_text(PIPELINE.format(provider=provider, urls=urls,
                                                    retries=retries, stream=stream_params))
    return project / "p.yaml"


def root(provider: str) -> str:
    return "/v1" if provider == "openai" else ""


def written(project: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (project / "runs").rglob("*") if p.is_file())


def test_url_credentials_are_sent_as_basic_auth_by_every_protocol(project, sim):
    server = sim(authorization=ALICE)
    for provider in ("openai", "anthropic", "gemini"):
        for stream in (False, True):
            url = with_credentials(server.url, "alice:pw") + root(provider)
            pipeline = project_for(project, provider, f"base_url: {url}", stream)
            result = chunbot("run", str(pipeline), "--no-cache", cwd=project)
            assert result.returncode == 0, result.stderr.decode()
            assert len(read_jsonl(project / "runs/t/label/part-00000.jsonl")) == 6
            for shown in (result.stderr + result.stdout, written(project)):
                assert b"alice:pw" not in shown and b"YWxpY2U6cHc=" not in shown
            (project / "runs/t/state.json").unlink()
    stats = server.stats()
    assert stats["answered"] == 3 * 2 * 6 and "401" not in stats["by_status"]


def test_credentials_outside_latin_1_are_sent_as_utf_8(project, sim):
    server = sim(authorization=basic("zoë", "pâss€"))  # RFC 7617: UTF-8
    url = with_credentials(server.url, "zo%C3%AB:p%C3%A2ss%E2%82%AC") + "/v1"
    result = chunbot("run", str(project_for(project, "openai", f"base_url: {url}")),
                     "--no-cache", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert server.stats()["answered"] == 6


def test_url_credentials_are_the_authorization_even_beside_a_headers_one(project, sim):
    # aiohttp alone refuses the two ("Cannot combine AUTHORIZATION header with AUTH
    # argument or credentials encoded in URL"), which failed every shard
    server = sim(authorization=ALICE)
    url = with_credentials(server.url, "alice:pw") + "/v1"
    urls = f"base_url: {url}\n    headers: {{Authorization: Bearer stale}}"
    result = chunbot("run", str(project_for(project, "openai", urls)), "--no-cache",
                     cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    assert server.stats()["answered"] == 6


def test_each_endpoint_gets_its_own_credentials_only(project, sim):
    alices, bobs = sim(authorization=ALICE), sim(authorization=basic("bob", "pw2"))
    urls = [with_credentials(alices.url, "alice:pw") + "/v1",
            with_credentials(bobs.url, "bob:pw2") + "/v1"]
    pipeline = project_for(project, "openai", f"endpoints: [{', '.join(urls)}]",
                           texts=[f"okay #{i}" for i in range(40)])
    result = chunbot("run", str(pipeline), "--no-cache", cwd=project)
    assert result.returncode == 0, result.stderr.decode()
    for server in (alices, bobs):
        stats = server.stats()
        assert stats["answered"] > 0 and "401" not in stats["by_status"], stats


def spec(provider: str, url: str) -> ModelSpec:
    return ModelSpec(alias="m", provider=provider, model="sim-small", base_url=url + root(provider))


async def batch_cycle(model: ModelSpec, items: list[tuple[str, Request]]):
    async with aiohttp.ClientSession() as session:
        batches = batch_api(model, session)
        batch_id = await batches.submit(items, {"stage": "label"})
        for _ in range(200):
            if (await batches.state(batch_id)).done:
                break
            await asyncio.sleep(0.05)
        return await batches.results(batch_id)


def test_the_batch_apis_send_url_credentials_to_every_url_on_the_base_url(sim, monkeypatch):
    # Anthropic's results come from the results_url the batch names, Gemini's input from a
    # file (over 20 MB of requests: every batch here) through the upload URL it is given
    monkeypatch.setattr(batch.GeminiBatches, "INLINE_BYTES", 0)
    server = sim(authorization=ALICE, batch_delay_s=0.2)
    items = [(f"r{i}", Request([{"role": "user", "content": f"Label: great #{i}"}],
                               {"max_tokens": 8})) for i in range(5)]
    for provider in ("openai", "anthropic", "gemini"):
        results = asyncio.run(batch_cycle(spec(provider, with_credentials(server.url,
                                                                          "alice:pw")), items))
        assert set(results) == {f"r{i}" for i in range(5)}, (provider, results)
        assert all(isinstance(r, Reply) for r in results.values()), (provider, results)
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["files_uploaded"] == 2  # OpenAI's, Gemini's
    assert "401" not in stats["by_status"]


def test_a_url_a_batch_api_gives_off_the_base_url_gets_no_credentials():
    async def fetch() -> None:
        async with aiohttp.ClientSession() as session:
            api = batch_api(spec("anthropic", "http://alice:pw@127.0.0.1:9"), session)
            await api._call("GET", "http://127.0.0.2:9/v1/messages/batches/b/results")

    with pytest.raises(ProviderError, match=r"is not on http://\*\*\*@127.0.0.1:9: the "):
        asyncio.run(fetch())


def test_every_form_of_the_url_credentials_is_masked():
    where = split_credentials("https://al%40ice:p%C3%A4ss@host:8/v1")
    assert where.url == "https://host:8/v1"
    assert where.auth == {"authorization": basic("al@ice", "päss")}
    model = ModelSpec(alias="m", provider="openai", model="x",
                      endpoints=("https://al%40ice:p%C3%A4ss@host:8/v1",))
    provider = HTTPProvider(model, None)
    text = (f"{basic('al@ice', 'päss')} al%40ice:p%C3%A4ss al@ice:päss p%C3%A4ss päss")
    assert provider._mask(text) == "Basic *** *** *** *** ***"


def test_basic_credentials_a_server_echoes_are_masked_everywhere(project, sim):
    password = "Sesame-42"
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    server = sim(authorization=basic("alice", password), echo_authorization=True,
                 fail_prompt="POISON")
    url = with_credentials(server.url, f"alice:{password}") + "/v1"
    texts = ["great #0", "POISON great #1", "okay #2"]
    pipeline = project_for(project, "openai", f"base_url: {url}", texts=texts)
    result = chunbot("run", str(pipeline), "--no-cache", cwd=project)
    assert result.returncode == 1, result.stderr.decode()
    assert server.stats()["poisoned"] > 1  # tried again, each answer echoing the header
    errors = (project / "runs/t/label/errors.jsonl").read_text()
    assert "Authorization: Basic ***" in errors  # the echo was there, masked
    shown = [result.stderr.decode(), result.stdout.decode(), errors,
             (project / "runs/t/state.json").read_text()]
    shown += [p.read_text() for p in (project / "runs/t/label").glob("trace-*.jsonl")]
    for flags in ((), ("--json",)):
        traced = chunbot("trace", str(pipeline), "r1", *flags, cwd=project)
        assert traced.returncode == 0, traced.stderr.decode()
        assert "Basic ***" in traced.stdout.decode()
        shown += [traced.stdout.decode(), traced.stderr.decode()]
    for text in shown:
        assert token not in text and password not in text and "alice:" not in text
