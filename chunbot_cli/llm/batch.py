"""Provider batch APIs: OpenAI's Batch API (a JSONL file of requests, then a batch) and
Anthropic's Message Batches. Half the price, far larger quotas, answers within hours.

This module speaks the two protocols: submit a list of (custom_id, Request), read a
batch's state, fetch its results as custom_id → Reply or error text, list recent
batches (to reconcile after a crash), cancel. Each request's body is the one the
realtime path sends (openai.body / anthropic.body), and each result is parsed by the
realtime parsers, so a stage gives the same output either way. Deciding what to submit
and when, and remembering batch ids, is the engine's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from ..config import ModelSpec, redact_url
from . import anthropic, openai
from .http import RETRYABLE_STATUS, api_key
from .types import ProviderError, Reply, Request, excerpt

# Per batch: (most requests, most bytes of request bodies)
LIMITS = {"openai": (50_000, 200 * 2**20), "anthropic": (100_000, 256 * 2**20)}
DONE_STATES = {"completed", "failed", "expired", "cancelled", "ended"}


@dataclass
class BatchState:
    id: str
    status: str  # the provider's own word
    done: bool
    counts: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0  # Unix time

    @property
    def items(self) -> int:
        if "total" in self.counts:
            return self.counts["total"]
        return sum(self.counts.values())  # Anthropic: processing + each outcome


def split(items: list[tuple[str, Request]], spec: ModelSpec) -> list[list[tuple[str, Request]]]:
    """Cut a list of requests into batches within the provider's count and size limits."""
    most, most_bytes = LIMITS[spec.provider]
    body = openai.body if spec.provider == "openai" else anthropic.body
    batches: list[list[tuple[str, Request]]] = [[]]
    size = 0
    for item in items:
        item_size = len(orjson.dumps(body(spec, item[1]))) + 200  # + the line's envelope
        if batches[-1] and (len(batches[-1]) >= most or size + item_size > most_bytes):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_size
    return [batch for batch in batches if batch]


class Batches:
    """The batch API of one model alias."""

    def __init__(self, spec: ModelSpec, session: aiohttp.ClientSession):
        if spec.provider not in LIMITS:
            raise ValueError(f"provider {spec.provider!r} has no batch API")
        self.spec = spec
        self.session = session
        self.key = api_key(spec)
        self.protocol = openai if spec.provider == "openai" else anthropic
        self.headers = self.protocol.headers(spec, self.key)
        self.root = spec.base_url or ""

    async def _call(self, method: str, path: str, raw: bool = False, **kwargs: Any) -> Any:
        """One API call; the decoded JSON reply, or its bytes when `raw`."""
        url = path if path.startswith("http") else self.root + path
        headers = kwargs.pop("headers", self.headers)
        try:
            async with self.session.request(method, url, headers=headers, **kwargs) as response:
                data = await response.read()
                if response.status != 200:
                    text = excerpt(data)
                    if self.key:
                        text = text.replace(self.key, "***")
                    raise ProviderError(f"batch API: HTTP {response.status} from "
                                        f"{redact_url(url)}: {text}",
                                        retryable=response.status in RETRYABLE_STATUS
                                        or response.status >= 500, status=response.status)
                return data if raw else orjson.loads(data)
        except aiohttp.ClientError as e:
            raise ProviderError(f"batch API: {redact_url(url)}: {redact_url(str(e))}",
                                retryable=True) from None

    async def submit(self, items: list[tuple[str, Request]], metadata: dict[str, str]) -> str:
        """Create one batch; returns its id."""
        if self.spec.provider == "anthropic":
            requests = [{"custom_id": custom_id, "params": anthropic.body(self.spec, request)}
                        for custom_id, request in items]
            created = await self._call("POST", "/v1/messages/batches",
                                       data=orjson.dumps({"requests": requests}))
            return created["id"]
        lines = b"".join(orjson.dumps({"custom_id": custom_id, "method": "POST",
                                       "url": "/v1/chat/completions",
                                       "body": openai.body(self.spec, request)},
                                      option=orjson.OPT_APPEND_NEWLINE)
                         for custom_id, request in items)
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", lines, filename="chunbot-batch.jsonl",
                       content_type="application/jsonl")
        upload_headers = {k: v for k, v in self.headers.items() if k != "content-type"}
        uploaded = await self._call("POST", "/files", data=form, headers=upload_headers)
        created = await self._call("POST", "/batches", data=orjson.dumps({
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": metadata}))
        return created["id"]

    async def state(self, batch_id: str) -> BatchState:
        if self.spec.provider == "anthropic":
            data = await self._call("GET", f"/v1/messages/batches/{batch_id}")
            return _anthropic_state(data)
        return _openai_state(await self._call("GET", f"/batches/{batch_id}"))

    async def results(self, batch_id: str) -> dict[str, Reply | str]:
        """custom_id → the parsed reply, or why that item has none. Items missing from
        the results (a cancelled batch) are simply absent."""
        found: dict[str, Reply | str] = {}
        if self.spec.provider == "anthropic":
            state = await self._call("GET", f"/v1/messages/batches/{batch_id}")
            data = await self._call("GET", state["results_url"], raw=True)
            for line in data.splitlines():
                item = orjson.loads(line)
                result = item.get("result") or {}
                if result.get("type") == "succeeded":
                    found[item["custom_id"]] = _parsed(anthropic.reply, result["message"],
                                                       self.spec.model)
                else:
                    found[item["custom_id"]] = f"batch item {result.get('type')}: " \
                                               f"{excerpt(result.get('error') or '')}"
            return found
        state = await self._call("GET", f"/batches/{batch_id}")
        for file_key in ("output_file_id", "error_file_id"):
            if state.get(file_key):
                data = await self._call("GET", f"/files/{state[file_key]}/content", raw=True)
                for line in data.splitlines():
                    item = orjson.loads(line)
                    response = item.get("response") or {}
                    if response.get("status_code") == 200:
                        found[item["custom_id"]] = _parsed(openai.reply, response["body"],
                                                           self.spec.model)
                    else:
                        problem = item.get("error") or response.get("body") or {}
                        found[item["custom_id"]] = (f"batch item failed (HTTP "
                                                    f"{response.get('status_code')}): "
                                                    f"{excerpt(problem)}")
        return found

    async def recent(self, limit: int = 100) -> list[BatchState]:
        """The newest batches of this account, for reconciling after a crash."""
        if self.spec.provider == "anthropic":
            data = await self._call("GET", f"/v1/messages/batches?limit={limit}")
            return [_anthropic_state(b) for b in data.get("data", [])]
        data = await self._call("GET", f"/batches?limit={limit}")
        return [_openai_state(b) for b in data.get("data", [])]

    async def cancel(self, batch_id: str) -> BatchState:
        if self.spec.provider == "anthropic":
            return _anthropic_state(await self._call(
                "POST", f"/v1/messages/batches/{batch_id}/cancel"))
        return _openai_state(await self._call("POST", f"/batches/{batch_id}/cancel"))


def _parsed(parse: Any, body: Any, model: str) -> Reply | str:
    try:
        return parse(body, model)
    except ProviderError as e:
        return str(e)


def _openai_state(data: dict[str, Any]) -> BatchState:
    status = data.get("status", "")
    return BatchState(data["id"], status, status in DONE_STATES,
                      dict(data.get("request_counts") or {}), dict(data.get("metadata") or {}),
                      float(data.get("created_at") or 0))


def _anthropic_state(data: dict[str, Any]) -> BatchState:
    status = data.get("processing_status", "")
    created = data.get("created_at") or ""
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        when = 0.0
    return BatchState(data["id"], status, status == "ended",
                      dict(data.get("request_counts") or {}), created=when)
