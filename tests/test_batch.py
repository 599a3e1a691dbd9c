"""llm/batch.py: the OpenAI Batch, Anthropic Message Batches and Gemini Batch Mode clients,
against `chunbot sim serve` speaking all three."""

from __future__ import annotations

import asyncio

import aiohttp

from chunbot_cli.config import ModelSpec
from chunbot_cli.llm.batch import batch_api, split
from chunbot_cli.llm.http import HTTPProvider
from chunbot_cli.llm.types import Reply, Request

TEXTS = ["great, love it", "it broke, terrible", "okay I guess", "the lid leaks, awful"]


def requests(n: int) -> list[tuple[str, Request]]:
    return [(f"r{i}", Request([{"role": "system", "content": "You label reviews."},
                               {"role": "user", "content": f"Label the sentiment: {TEXTS[i % 4]} #{i}"}],
                              {"max_tokens": 8, "temperature": 0}))
            for i in range(n)]


def spec(provider: str, url: str) -> ModelSpec:
    return ModelSpec(alias="m", provider=provider, model="sim-small",
                     base_url=url + ("/v1" if provider == "openai" else ""))


async def cycle(model: ModelSpec, items: list[tuple[str, Request]]):
    async with aiohttp.ClientSession() as session:
        batches = batch_api(model, session)
        batch_id = await batches.submit(items, {"pipeline": "t", "stage": "label", "shard": "0"})
        for _ in range(200):
            state = await batches.state(batch_id)
            if state.done:
                break
            await asyncio.sleep(0.05)
        results = await batches.results(batch_id)
        recent = await batches.recent()
        realtime = HTTPProvider(model, session)
        direct = [await realtime.complete(r, model.base_url) for _, r in items[:3]]
        return batch_id, state, results, recent, direct


def test_every_provider_gives_the_realtime_replies_by_custom_id(sim_server):
    server = sim_server("--batch-delay-s", "0.2")
    for provider in ("openai", "anthropic", "gemini"):
        batch_id, state, results, recent, direct = asyncio.run(
            cycle(spec(provider, server.url), requests(30)))
        assert state.done and set(results) == {f"r{i}" for i in range(30)}
        assert all(isinstance(r, Reply) for r in results.values())
        assert [results[f"r{i}"].text for i in range(3)] == [d.text for d in direct]
        assert results["r1"].text == "negative" and results["r1"].input_tokens > 0
        assert batch_id in [b.id for b in recent]
        if provider != "anthropic":  # Gemini's in the display name
            assert next(b for b in recent if b.id == batch_id).metadata["stage"] == "label"
    assert server.stats()["batches_created"] == 3


def test_failed_and_expired_items_come_back_as_reasons(sim_server):
    server = sim_server("--batch-delay-s", "0.2", "--batch-error-rate", "0.2",
                        "--batch-expire-rate", "0.1", "--seed", "3")
    for provider in ("openai", "anthropic", "gemini"):
        _, _, results, _, _ = asyncio.run(cycle(spec(provider, server.url), requests(100)))
        reasons = [r for r in results.values() if isinstance(r, str)]
        assert len(results) == 100 and 10 < len(reasons) < 50
        assert any("expired" in r for r in reasons)


def test_split_keeps_within_the_providers_limits():
    model = ModelSpec(alias="m", provider="openai", model="x", base_url="http://x/v1")
    batches = split(requests(120_000), model)
    assert [len(b) for b in batches] == [50_000, 50_000, 20_000]
    claude = ModelSpec(alias="c", provider="anthropic", model="x", base_url="http://x")
    assert [len(b) for b in split(requests(120_000), claude)] == [100_000, 20_000]


def test_a_gemini_batch_over_20_mb_goes_as_a_file(sim_server):
    server = sim_server("--batch-delay-s", "0.2")
    big = [(f"r{i}", Request([{"role": "user", "content": f"Label the sentiment: "
                                                           f"{'great ' * 1_200_000} #{i}"}],
                             {"max_tokens": 8})) for i in range(3)]  # 7.2 MB each
    batch_id, state, results, _, _ = asyncio.run(cycle(spec("gemini", server.url), big))
    assert state.done and set(results) == {"r0", "r1", "r2"}
    assert all(isinstance(r, Reply) and r.text == "positive" for r in results.values())
    assert server.stats()["files_uploaded"] == 1
