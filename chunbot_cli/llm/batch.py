"""Provider batch APIs: OpenAI's Batch API (a JSONL file of requests, then a batch),
Anthropic's Message Batches and Gemini's Batch Mode. Half the price, far larger quotas,
answers within hours.

One protocol, `BatchAPI`, one class per vendor: submit a list of (custom_id, Request), read
a batch's state, fetch its results as custom_id → Reply or error text, list recent
batches (to reconcile after a crash), cancel. Each request's body is the one the
realtime path sends (openai.body / anthropic.body / gemini.body), and each result is
parsed by the realtime parsers, so a stage gives the same output either way. Deciding
what to submit and when, and remembering batch ids, is the engine's job (batchmode.py).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import aiohttp
import orjson

from ..config import ModelSpec, redact_url
from . import anthropic, gemini, openai
from .http import RETRYABLE_STATUS, api_key, mask, masked_excerpt, ordered, split_credentials
from .types import ProviderError, Reply, Request, excerpt


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
    api = API[spec.provider]
    batches: list[list[tuple[str, Request]]] = [[]]
    size = 0
    for item in items:
        item_size = len(orjson.dumps(api.protocol.body(spec, item[1]))) + 200  # + envelope
        if batches[-1] and (len(batches[-1]) >= api.most or size + item_size > api.most_bytes):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_size
    return [batch for batch in batches if batch]


def batch_api(spec: ModelSpec, session: aiohttp.ClientSession) -> "BatchAPI":
    """The batch API of one model alias."""
    if spec.provider not in API:
        raise ValueError(f"provider {spec.provider!r} has no batch API")
    return API[spec.provider](spec, session)


class BatchAPI:
    """What every vendor's batch API does; the HTTP exchange is shared."""

    protocol: ClassVar[Any]  # the realtime wire format module
    most: ClassVar[int]  # requests in one batch
    most_bytes: ClassVar[int]  # bytes of request bodies in one batch

    def __init__(self, spec: ModelSpec, session: aiohttp.ClientSession):
        self.spec = spec
        self.session = session
        self.key = api_key(spec)
        where = split_credentials(spec.base_url or "")  # user:password@ is Basic auth
        self.headers = where.headers(self.protocol.headers(spec, self.key))
        self.root, self.shown = where.url, where.shown  # sent to, named in texts
        self.secrets = ordered([self.key, *where.secrets])  # what no error text may show

    async def submit(self, items: list[tuple[str, Request]], metadata: dict[str, str]) -> str:
        """Create one batch; returns its id."""
        raise NotImplementedError

    async def state(self, batch_id: str) -> BatchState:
        raise NotImplementedError

    async def results(self, batch_id: str) -> dict[str, Reply | str]:
        """custom_id → the parsed reply, or why that item has none. Items missing from
        the results (a cancelled batch) are simply absent."""
        raise NotImplementedError

    async def recent(self, limit: int = 100) -> list[BatchState]:
        """The newest batches of this account, for reconciling after a crash."""
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> BatchState:
        raise NotImplementedError

    async def _call(self, method: str, path: str, raw: bool = False, **kwargs: Any) -> Any:
        """One API call; the decoded JSON reply, or its bytes when `raw`."""
        data, _ = await self._exchange(method, path, **kwargs)
        return data if raw else orjson.loads(data)

    async def _exchange(self, method: str, path: str, **kwargs: Any) -> tuple[bytes, Any]:
        """One API call: the reply's bytes and headers, or a ProviderError without the key
        or the URL's credentials."""
        url = self._on_root(path) if path.startswith("http") else self.root + path
        shown = self.shown + url[len(self.root):]
        headers = kwargs.pop("headers", self.headers)
        try:
            async with self.session.request(method, url, headers=headers, **kwargs) as response:
                data = await response.read()
                if response.status != 200:
                    raise ProviderError(f"batch API: HTTP {response.status} from {shown}: "
                                        f"{masked_excerpt(data, self.secrets)}",
                                        retryable=response.status in RETRYABLE_STATUS
                                        or response.status >= 500, status=response.status)
                return data, response.headers
        except aiohttp.ClientError as e:
            raise ProviderError(f"batch API: {shown}: {mask(redact_url(str(e)), self.secrets)}",
                                retryable=True) from None

    def _on_root(self, url: str) -> str:
        """A URL the server gave (Anthropic's results_url, Gemini's upload URL), without
        userinfo; refused unless it is on the base URL, as the key and the base URL's
        credentials go nowhere else."""
        url = split_credentials(url).url
        if not url.startswith(self.root + "/"):
            raise ProviderError(f"batch API: the server gave the URL {url}, which "
                                f"is not on {self.shown}: the credentials go to "
                                f"{self.shown} only", retryable=False)
        return url


class OpenAIBatches(BatchAPI):
    protocol = openai
    most, most_bytes = 50_000, 200 * 2**20
    DONE = frozenset({"completed", "failed", "expired", "cancelled"})

    async def submit(self, items: list[tuple[str, Request]], metadata: dict[str, str]) -> str:
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
        return self._state(await self._call("GET", f"/batches/{batch_id}"))

    async def results(self, batch_id: str) -> dict[str, Reply | str]:
        found: dict[str, Reply | str] = {}
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
        data = await self._call("GET", f"/batches?limit={limit}")
        return [self._state(b) for b in data.get("data", [])]

    async def cancel(self, batch_id: str) -> BatchState:
        return self._state(await self._call("POST", f"/batches/{batch_id}/cancel"))

    def _state(self, data: dict[str, Any]) -> BatchState:
        status = data.get("status", "")
        return BatchState(data["id"], status, status in self.DONE,
                          dict(data.get("request_counts") or {}),
                          dict(data.get("metadata") or {}), float(data.get("created_at") or 0))


class AnthropicBatches(BatchAPI):
    protocol = anthropic
    most, most_bytes = 100_000, 256 * 2**20

    async def submit(self, items: list[tuple[str, Request]], metadata: dict[str, str]) -> str:
        requests = [{"custom_id": custom_id, "params": anthropic.body(self.spec, request)}
                    for custom_id, request in items]
        created = await self._call("POST", "/v1/messages/batches",
                                   data=orjson.dumps({"requests": requests}))
        return created["id"]

    async def state(self, batch_id: str) -> BatchState:
        return self._state(await self._call("GET", f"/v1/messages/batches/{batch_id}"))

    async def results(self, batch_id: str) -> dict[str, Reply | str]:
        found: dict[str, Reply | str] = {}
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

    async def recent(self, limit: int = 100) -> list[BatchState]:
        data = await self._call("GET", f"/v1/messages/batches?limit={limit}")
        return [self._state(b) for b in data.get("data", [])]

    async def cancel(self, batch_id: str) -> BatchState:
        return self._state(await self._call("POST",
                                            f"/v1/messages/batches/{batch_id}/cancel"))

    @staticmethod
    def _state(data: dict[str, Any]) -> BatchState:
        status = data.get("processing_status", "")
        return BatchState(data["id"], status, status == "ended",
                          dict(data.get("request_counts") or {}),
                          created=_unix_time(data.get("created_at")))


class GeminiBatches(BatchAPI):
    """Gemini's Batch Mode: the requests inline while they are under 20 MB, else a JSONL
    file through the Files API (resumable upload); a batch is a long-running operation
    `batches/…`. Gemini keeps no metadata on a batch but its display name, so the intent
    and the rest of `metadata` travel in it."""

    protocol = gemini
    most, most_bytes = 1_000_000, 2 * 2**30  # no count limit is documented; files ≤ 2 GB
    INLINE_BYTES = 20 * 2**20
    DONE = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                      "BATCH_STATE_EXPIRED"})
    NAMED = "chunbot:"  # display names chunbot gives: "chunbot:key=value;key=value"

    async def submit(self, items: list[tuple[str, Request]], metadata: dict[str, str]) -> str:
        bodies = [(custom_id, gemini.body(self.spec, request)) for custom_id, request in items]
        lines = [orjson.dumps({"key": key, "request": body}) for key, body in bodies]
        name = self.NAMED + ";".join(f"{k}={urllib.parse.quote(str(v), safe='')}"
                                     for k, v in metadata.items())
        if sum(map(len, lines)) < self.INLINE_BYTES:
            source: dict[str, Any] = {"requests": {"requests": [
                {"request": body, "metadata": {"key": key}} for key, body in bodies]}}
        else:
            source = {"fileName": await self._upload(b"\n".join(lines) + b"\n", name)}
        created = await self._call(
            "POST", gemini.model_path(self.spec, "batchGenerateContent"),
            data=orjson.dumps({"batch": {"displayName": name, "inputConfig": source}}))
        return created["name"]

    async def _upload(self, data: bytes, name: str) -> str:
        """A file through the Files API's resumable upload; its name, `files/…`."""
        _, started = await self._exchange(
            "POST", "/upload/v1beta/files", data=orjson.dumps({"file": {"displayName": name}}),
            headers={**self.headers, "X-Goog-Upload-Protocol": "resumable",
                     "X-Goog-Upload-Command": "start",
                     "X-Goog-Upload-Header-Content-Length": str(len(data)),
                     "X-Goog-Upload-Header-Content-Type": "application/jsonl"})
        target = started.get("X-Goog-Upload-URL")
        if not target:
            raise ProviderError("batch API: the Files API gave no upload URL", retryable=True)
        uploaded = await self._call("POST", target, data=data, headers={
            **{k: v for k, v in self.headers.items() if k != "content-type"},
            "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
        return uploaded["file"]["name"]

    async def state(self, batch_id: str) -> BatchState:
        return self._state(await self._call("GET", f"/v1beta/{batch_id}"))

    async def results(self, batch_id: str) -> dict[str, Reply | str]:
        operation = await self._call("GET", f"/v1beta/{batch_id}")
        output = operation.get("response") or (operation.get("metadata") or {}).get("output") \
            or {}
        found: dict[str, Reply | str] = {}
        inlined = output.get("inlinedResponses") or {}
        for item in inlined.get("inlinedResponses") or ():
            found[(item.get("metadata") or {}).get("key", "")] = self._item(item)
        if output.get("responsesFile"):
            data = await self._call(
                "GET", f"/download/v1beta/{output['responsesFile']}:download?alt=media",
                raw=True)
            for line in data.splitlines():
                if line.strip():
                    item = orjson.loads(line)
                    found[str(item.get("key", ""))] = self._item(item)
        found.pop("", None)  # not an item chunbot sent
        return found

    def _item(self, item: dict[str, Any]) -> Reply | str:
        if "response" in item:
            return _parsed(gemini.reply, item["response"], self.spec.model)
        error = item.get("error") or {}
        return f"batch item failed ({error.get('status') or error.get('code')}): " \
               f"{excerpt(error.get('message') or error)}"

    async def recent(self, limit: int = 100) -> list[BatchState]:
        data = await self._call("GET", f"/v1beta/batches?pageSize={limit}")
        return [self._state(b) for b in data.get("operations") or data.get("batches") or ()]

    async def cancel(self, batch_id: str) -> BatchState:
        await self._call("POST", f"/v1beta/{batch_id}:cancel")
        return await self.state(batch_id)

    def _state(self, operation: dict[str, Any]) -> BatchState:
        about = operation.get("metadata") or {}
        status = about.get("state", "")
        stats = about.get("batchStats") or {}
        counts = {word: int(stats[name]) for word, name in (
            ("total", "requestCount"), ("completed", "successfulRequestCount"),
            ("failed", "failedRequestCount"), ("pending", "pendingRequestCount"))
            if str(stats.get(name, "")).isdigit()}
        return BatchState(operation.get("name") or about.get("name", ""), status,
                          status in self.DONE or bool(operation.get("done")), counts,
                          self._metadata(about.get("displayName") or ""),
                          _unix_time(about.get("createTime")))

    def _metadata(self, display_name: str) -> dict[str, str]:
        if not display_name.startswith(self.NAMED):
            return {}
        pairs = (part.partition("=") for part in display_name[len(self.NAMED):].split(";"))
        return {key: urllib.parse.unquote(value) for key, _, value in pairs if key}


API: dict[str, type[BatchAPI]] = {"openai": OpenAIBatches, "anthropic": AnthropicBatches,
                                  "gemini": GeminiBatches}


def _parsed(parse: Any, body: Any, model: str) -> Reply | str:
    try:
        return parse(body, model)
    except ProviderError as e:
        return str(e)


def _unix_time(stamp: Any) -> float:
    """An RFC 3339 time (Anthropic's, Google's: maybe with nanoseconds) as Unix time."""
    if not isinstance(stamp, str):
        return 0.0
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0
