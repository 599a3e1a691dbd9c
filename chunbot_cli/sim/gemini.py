"""Gemini's native protocol (v1beta) in `chunbot sim serve`: `POST
/v1beta/models/{model}:generateContent` and `:streamGenerateContent?alt=sse`, Google's error
bodies (429s name the quota hit and the delay in the body: Gemini sends no rate-limit
headers), the key in `x-goog-api-key` (or `?key=`), implicit prefix caching reported as
`cachedContentTokenCount`, and Batch Mode (`:batchGenerateContent`, `/v1beta/batches`) with
the Files API's resumable uploads (`/upload/v1beta/files`), as the google-genai SDK speaks
them. Bodies are protobuf JSON: lowerCamelCase names, snake_case ones accepted too.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from . import model as sim_model
from .batches import EXPIRED, EXPIRED_MESSAGE, ID, INVALID, SUCCEEDED, Batch, BatchRoutes, \
    Handler, Item, iso, jsonl_lines
from .cache import CacheUse, automatic_use
from .wire import BLOCKED, BLOCKED_PROMPT, JSON, MODELS, Call, Dialect, Refused, \
    answer_object, json_object, no_headers, respond, split_words

# The error kinds as Google spells them: kind -> (status, its google.rpc.Code)
STATUSES = {
    "invalid_request": ("INVALID_ARGUMENT", 3),
    "auth": ("INVALID_ARGUMENT", 3),
    "permission": ("PERMISSION_DENIED", 7),
    "precondition": ("FAILED_PRECONDITION", 9),
    "rate_limit_requests": ("RESOURCE_EXHAUSTED", 8),
    "rate_limit_tokens": ("RESOURCE_EXHAUSTED", 8),
    "server": ("INTERNAL", 13),
    "overloaded": ("UNAVAILABLE", 14),
    "not_found": ("NOT_FOUND", 5),
}
OVERLOADED = "The model is overloaded. Please try again later."
BAD_KEY = "API key not valid. Please pass a valid API key."
# the quota a --rpm / --tpm 429 names, as the free tier's are named
QUOTAS = {
    "rate_limit_requests": ("generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
    "rate_limit_tokens": ("generativelanguage.googleapis.com/generate_content_free_tier_input_"
                          "token_count", "GenerateContentInputTokensPerModelPerMinute-FreeTier"),
}
RPC = "type.googleapis.com/google.rpc."
HELP = {"@type": RPC + "Help", "links": [{"description": "Learn more about Gemini API quotas",
                                         "url": "https://ai.google.dev/gemini-api/docs/"
                                                "rate-limits"}]}
KEY_INFO = [{"@type": RPC + "ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
             "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": RPC + "LocalizedMessage", "locale": "en-US", "message": BAD_KEY}]
# v1beta, as chunbot and Google's docs use it, and v1, google-genai's default since 3.x
VERSIONS = ("v1beta", "v1")
RATINGS = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
            "blocked": True}]  # what --block-prompt's refusals are rated
METHODS = frozenset({"generateContent", "streamGenerateContent"})
# a generationConfig field under the name the sim model and the other protocols know it by
PARAMS = {"maxOutputTokens": "max_tokens", "topP": "top_p", "topK": "top_k",
          "stopSequences": "stop", "candidateCount": "n", "presencePenalty": "presence_penalty",
          "frequencyPenalty": "frequency_penalty"}
OWN_FIELDS = frozenset({"contents", "systemInstruction", "generationConfig", "model"})

BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = BATCH_TYPE + "Output"
INLINE_BYTES = 20 * 2**20  # the most an inline batch request takes
MAX_FILE = 2 * 2**30  # the largest file the Files API takes
FILE_DAYS = 2  # files are kept 48 hours
FILE_NAME = re.compile(r"[a-z0-9-]{1,40}")
LIST_SIZE = 50  # a list's page when pageSize does not say
EXPIRED_STATUS = orjson.dumps({"code": 4, "message": EXPIRED_MESSAGE,
                               "status": "DEADLINE_EXCEEDED"})
CANCELLED_STATUS = orjson.dumps({"code": 1, "message": "The batch was cancelled before this "
                                 "request ran.", "status": "CANCELLED"})


@functools.lru_cache(maxsize=256)
def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


@functools.lru_cache(maxsize=256)
def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def field_of(obj: dict[str, Any], name: str) -> Any:
    """A field of a protobuf JSON object, named in lowerCamelCase or in the proto's own
    snake_case, as Google's servers take either."""
    value = obj.get(name)
    return obj.get(_snake(name)) if value is None else value


def _text(content: Any, what: str) -> str:
    """The text of a Content (its parts' texts, joined), or of a plain string."""
    if isinstance(content, str):
        return content
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        raise Refused(400, "invalid_request", f"* GenerateContentRequest.{what}.parts: "
                      "must be a list of parts")
    return "".join(part["text"] for part in parts
                   if isinstance(part, dict) and isinstance(part.get("text"), str))


def check_model(model: str, method: str) -> None:
    if model not in MODELS:
        raise Refused(404, "not_found", f"models/{model} is not found for API version v1beta, "
                      f"or is not supported for {method}. Call ListModels to see the list "
                      "of available models and their supported methods.")


def parse(body: dict[str, Any], where: Mapping[str, str]) -> Call:
    model, method = where["model"], where["method"]
    if method not in METHODS:
        raise Refused(404, "not_found", f"Method not found: models/{model}:{method}.")
    check_model(model, method)
    contents = field_of(body, "contents")
    if not isinstance(contents, list) or not contents:
        raise Refused(400, "invalid_request",
                      "* GenerateContentRequest.contents: contents is not specified")
    messages = []
    system = field_of(body, "systemInstruction")
    if system is not None:
        messages.append({"role": "system", "content": _text(system, "system_instruction")})
    for i, content in enumerate(contents):
        role = content.get("role") or "user" if isinstance(content, dict) else None
        if role not in ("user", "model"):
            raise Refused(400, "invalid_request", f"* GenerateContentRequest.contents[{i}]"
                          ".role: Please use a valid role: user, model.")
        messages.append({"role": "assistant" if role == "model" else "user",
                         "content": _text(content, f"contents[{i}]")})
    params = {}
    for name, value in body.items():
        name = _camel(name) if "_" in name else name
        if name not in OWN_FIELDS:  # safetySettings, tools…: as they would be OpenAI params
            params[name] = value
    config = field_of(body, "generationConfig")
    if config is not None:
        if not isinstance(config, dict):
            raise Refused(400, "invalid_request", "* GenerateContentRequest.generation_config: "
                          "must be an object")
        for name, value in config.items():
            name = _camel(name) if "_" in name else name
            params[PARAMS.get(name, name)] = value
    return Call(model, messages, params, method == "streamGenerateContent", False)


def authorize(request: web.Request, key: str | None) -> None:
    if key is None:
        return
    sent = request.headers.get("x-goog-api-key") or request.query.get("key")
    if sent is None:
        raise Refused(403, "permission", "Method doesn't allow unregistered callers (callers "
                      "without established identity). Please use API Key or other form of "
                      "API consumer identity to call this API.")
    if sent != key:  # never echoed: it may be a real one sent by mistake
        raise Refused(400, "auth", BAD_KEY)


def status_of(refused: Refused) -> dict[str, Any]:
    """The error as a google.rpc.Status, with the HTTP status as its code (as Google's
    JSON errors have it) and the details Google adds for the kind."""
    status = {"code": refused.status, "message": refused.message,
              "status": STATUSES[refused.kind][0]}
    if refused.kind == "overloaded":
        status["message"] = OVERLOADED
    elif refused.kind == "auth":
        status["details"] = KEY_INFO
    elif refused.retry_after is not None:
        details: list[dict[str, Any]] = []
        quota = QUOTAS.get(refused.kind)
        if quota is not None and refused.limit is not None:
            metric, quota_id = quota
            status["message"] = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, head to: https://ai.google.dev/gemini-api"
                f"/docs/rate-limits.\n* Quota exceeded for metric: {metric}, limit: "
                f"{refused.limit}, model: {refused.model}\nPlease retry in {refused.wait:.6f}s.")
            details.append({"@type": RPC + "QuotaFailure", "violations": [{
                "quotaMetric": metric, "quotaId": quota_id,
                "quotaDimensions": {"location": "global", "model": refused.model},
                "quotaValue": str(refused.limit)}]})
        details += [HELP, {"@type": RPC + "RetryInfo", "retryDelay": f"{refused.retry_after}s"}]
        status["details"] = details
    return status


def error(refused: Refused) -> bytes:
    return orjson.dumps({"error": status_of(refused)})


def _json_mode(call: Call) -> bool:
    return call.params.get("responseMimeType") == "application/json"


def reply_text(call: Call, answer: sim_model.SimReply) -> str:
    """The answer's text; a JSON object when the request asks for JSON, as a forced tool's
    input is on the Anthropic route."""
    if _json_mode(call):
        return orjson.dumps(answer_object(answer)).decode()
    return answer.text


def usage(answer: sim_model.SimReply, cache: CacheUse) -> dict[str, Any]:
    prompt, output = answer.input_tokens, answer.output_tokens
    counts: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": output,
                              "totalTokenCount": prompt + output}
    if cache.read:
        counts["cachedContentTokenCount"] = cache.read
    counts["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if cache.read:
        counts["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": cache.read}]
    return counts


def _finish(answer: sim_model.SimReply) -> str:
    return "MAX_TOKENS" if answer.finish_reason == "length" else "STOP"


def _candidate(text: str, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    return candidate


def _blocked(reply_id: str, call: Call, answer: sim_model.SimReply) -> bytes:
    """What the safety filter answers: the prompt blocked (the text in the system
    instruction) or its candidate stopped, with no content."""
    body: dict[str, Any] = {}
    if answer.finish_reason == BLOCKED_PROMPT:
        body["promptFeedback"] = {"blockReason": "SAFETY", "safetyRatings": RATINGS}
    else:
        body["candidates"] = [{"finishReason": "SAFETY", "index": 0, "safetyRatings": RATINGS}]
    prompt = answer.input_tokens
    body.update(usageMetadata={"promptTokenCount": prompt, "totalTokenCount": prompt,
                               "promptTokensDetails": [{"modality": "TEXT",
                                                        "tokenCount": prompt}]},
                modelVersion=call.model, responseId=reply_id)
    return orjson.dumps(body)


def json_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
               malformed: bool) -> bytes:
    if answer.finish_reason in BLOCKED and not malformed:
        return _blocked(reply_id, call, answer)
    body: dict[str, Any] = {}
    if not malformed:
        body["candidates"] = [_candidate(reply_text(call, answer), _finish(answer))]
    body.update(usageMetadata=usage(answer, cache), modelVersion=call.model,
                responseId=reply_id)
    return orjson.dumps(body)


def sse_reply(reply_id: str, call: Call, answer: sim_model.SimReply, cache: CacheUse,
              seed: int) -> bytes:
    def chunk(candidate: dict[str, Any], counts: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"candidates": [candidate], "usageMetadata": counts,
                                         "modelVersion": call.model,
                                         "responseId": reply_id}) + b"\r\n\r\n"

    if answer.finish_reason in BLOCKED:
        return b"data: " + _blocked(reply_id, call, answer) + b"\r\n\r\n"
    pieces = split_words(reply_text(call, answer), seed)
    prompt = {"promptTokenCount": answer.input_tokens, "totalTokenCount": answer.input_tokens}
    parts = [chunk(_candidate(piece), prompt) for piece in pieces[:-1]]
    parts.append(chunk(_candidate(pieces[-1], _finish(answer)), usage(answer, cache)))
    return b"".join(parts)


def structured(call: Call) -> bool:
    return _json_mode(call) and ("responseSchema" in call.params
                                 or "responseJsonSchema" in call.params)


GEMINI = Dialect("gemini", "", parse, authorize, error, no_headers, no_headers, json_reply,
                 sse_reply, automatic_use, structured)


@dataclass(eq=False)
class File:
    id: str
    display_name: str | None
    mime_type: str
    created: float
    data: bytes
    source: str  # UPLOADED, or GENERATED: a batch's responses
    sha256: str = ""

    def __post_init__(self) -> None:
        # Google's sha256Hash: the base64 of the hex digest
        self.sha256 = base64.b64encode(hashlib.sha256(self.data).hexdigest().encode()).decode()

    def as_json(self, origin: str) -> dict[str, Any]:
        shown: dict[str, Any] = {"name": f"files/{self.id}"}
        if self.display_name:
            shown["displayName"] = self.display_name
        shown.update(mimeType=self.mime_type, sizeBytes=str(len(self.data)),
                     createTime=iso(self.created), updateTime=iso(self.created),
                     expirationTime=iso(self.created + FILE_DAYS * 86_400),
                     sha256Hash=self.sha256, uri=f"{origin}/v1beta/files/{self.id}")
        if self.source == "GENERATED":
            shown["downloadUri"] = f"{origin}/download/v1beta/files/{self.id}:download?alt=media"
        shown.update(state="ACTIVE", source=self.source)
        return shown


@dataclass(eq=False)
class Upload:
    """A resumable upload under way."""

    display_name: str | None
    mime_type: str
    size: int
    name: str | None  # the one asked for, without files/
    data: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class GeminiBatch(Batch):
    model: str = ""
    display_name: str = ""
    metadata: list[bytes] | None = None  # inline: each request's metadata, as JSON
    from_file: bool = False  # its responses go to a file, as its requests came
    inlined: bytes = b""  # the output's inlinedResponses, as JSON
    responses_file: str | None = None


class Results:
    """A batch's responses in input order: inline, each with its request's metadata, or a
    JSONL file of lines keyed as its input's."""

    def __init__(self, routes: Routes, batch: GeminiBatch):
        self.routes, self.batch = routes, batch
        self.entries: list[bytes | None] = [None] * len(batch.custom_ids)

    def add(self, i: int, fate: int, reply: bytes) -> None:
        if fate == SUCCEEDED:
            self.entries[i] = b'"response":' + reply
        else:
            self.entries[i] = b'"error":' + (EXPIRED_STATUS if fate == EXPIRED else reply)

    def close(self) -> None:
        batch = self.batch
        entries = [b'"error":' + CANCELLED_STATUS if entry is None else entry
                   for entry in self.entries]
        if batch.from_file:
            lines = [b'{"key":' + orjson.dumps(key) + b"," + entry + b"}\n"
                     for key, entry in zip(batch.custom_ids, entries)]
            batch.responses_file = self.routes.add_file(
                b"".join(lines), f"batch-{batch.id}-responses", "application/jsonl",
                "GENERATED").id
        else:
            metadata = batch.metadata or []
            items = [b"{" + entry + (b',"metadata":' + meta if meta else b"") + b"}"
                     for entry, meta in zip(entries, metadata)]
            batch.inlined = b'{"inlinedResponses":[' + b",".join(items) + b"]}"


class Routes(BatchRoutes):
    """Gemini's model routes, Batch Mode and Files, in memory."""

    dialect = GEMINI
    missing = "Batch batches/{} not found."

    def __init__(self, server: Any):
        super().__init__(server)
        self.files: dict[str, File] = {}
        self.uploads: dict[str, Upload] = {}

    def routes(self) -> list[tuple[str, str, Handler]]:
        guarded = self.guarded
        create = guarded(self.create_batch)

        async def model_method(request: web.Request) -> web.StreamResponse:
            if request.match_info["method"] == "batchGenerateContent":
                return await create(request)
            return await self.server.handle(request, GEMINI)

        routes = []
        for version in VERSIONS:
            routes += [
                ("POST", f"/{version}/models/{{model}}:{{method}}", model_method),
                ("GET", f"/{version}/batches", guarded(self.list_batches)),
                ("GET", f"/{version}/batches/{ID}", guarded(self.get_batch)),
                ("POST", f"/{version}/batches/{ID}:cancel", guarded(self.cancel_batch)),
                ("DELETE", f"/{version}/batches/{ID}", guarded(self.delete_batch)),
                ("POST", f"/upload/{version}/files", self.upload),
                ("GET", f"/{version}/files", guarded(self.list_files)),
                ("GET", f"/{version}/files/{ID}", guarded(self.get_file)),
                ("DELETE", f"/{version}/files/{ID}", guarded(self.delete_file)),
                ("GET", f"/{version}/files/{ID}:download", guarded(self.download_file)),
                ("GET", f"/download/{version}/files/{ID}:download", guarded(self.download_file))]
        return routes

    def claims(self, request: web.Request) -> bool:
        # /v1/batches and /v1/files are OpenAI's too: Google's SDK and keys say whose it is
        headers = request.headers
        return "x-goog-api-client" in headers or "x-goog-api-key" in headers \
            or "key" in request.query

    # -- files --

    def add_file(self, data: bytes, display_name: str | None, mime_type: str,
                 source: str, name: str | None = None) -> File:
        file = File(name or self.server.new_id(""), display_name, mime_type, time.time(), data,
                    source)
        self.files[file.id] = file
        return file

    def file(self, file_id: str) -> File:
        file = self.files.get(file_id)
        if file is None:
            raise Refused(404, "not_found", f"File files/{file_id} not found.")
        return file

    async def upload(self, request: web.Request) -> web.Response:
        """The Files API's resumable upload: a start (the key checked) gives the URL of the
        session, whose id is then the credential for the bytes, in one request or chunks."""
        upload_id = request.query.get("upload_id")
        if upload_id is None:
            return await self.guarded(self.start_upload)(request)
        try:
            return await self.upload_bytes(request, upload_id)
        except Refused as e:
            refused = self.server.error(GEMINI, e)
            refused.headers["X-Goog-Upload-Status"] = "final"  # else the SDK asks again
            return refused

    async def start_upload(self, request: web.Request) -> web.Response:
        headers = request.headers
        if headers.get("X-Goog-Upload-Protocol") != "resumable" or \
                headers.get("X-Goog-Upload-Command") != "start":
            raise Refused(400, "invalid_request", "chunbot sim serves resumable uploads only: "
                          "X-Goog-Upload-Protocol: resumable, X-Goog-Upload-Command: start")
        try:
            size = int(headers.get("X-Goog-Upload-Header-Content-Length", ""))
        except ValueError:
            raise Refused(400, "invalid_request", "X-Goog-Upload-Header-Content-Length: "
                          "the file's size in bytes is required") from None
        if size > MAX_FILE:
            raise Refused(400, "invalid_request", f"The file is {size} bytes: files of up to "
                          f"{MAX_FILE} bytes (2 GB) are taken.")
        raw = await request.read()
        about = field_of(json_object(raw), "file") if raw else None
        about = about if isinstance(about, dict) else {}
        name = about.get("name")
        if name is not None:
            name = name.removeprefix("files/") if isinstance(name, str) else ""
            if not FILE_NAME.fullmatch(name) or name in self.files:
                raise Refused(400, "invalid_request", f"file.name: files/{name} is not a free "
                              "name of 1 to 40 characters a-z, 0-9 and -")
        mime = field_of(about, "mimeType") or headers.get("X-Goog-Upload-Header-Content-Type")
        upload_id = self.server.new_id("")
        self.uploads[upload_id] = Upload(field_of(about, "displayName"),
                                         mime or "application/octet-stream", size, name)
        url = f"{request.url.origin()}{request.path}?upload_id={upload_id}" \
              "&upload_protocol=resumable"
        return web.Response(headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active",
                                     "X-Goog-Upload-Chunk-Granularity": str(8 * 2**20)})

    async def upload_bytes(self, request: web.Request, upload_id: str) -> web.Response:
        upload = self.uploads.get(upload_id)
        if upload is None:
            raise Refused(404, "not_found", "No upload session with this upload_id.")
        commands = {c.strip() for c in request.headers.get("X-Goog-Upload-Command", "")
                    .split(",")}
        received = len(upload.data)
        if "query" in commands:
            return web.Response(headers={"X-Goog-Upload-Status": "active",
                                         "X-Goog-Upload-Size-Received": str(received)})
        if "upload" not in commands:
            raise Refused(400, "invalid_request", "X-Goog-Upload-Command: upload, "
                          "'upload, finalize' or query")
        offset = request.headers.get("X-Goog-Upload-Offset", str(received))
        if offset != str(received):
            raise Refused(400, "invalid_request", f"X-Goog-Upload-Offset: {received} bytes "
                          f"were received, not {offset}")
        upload.data += await request.read()
        if len(upload.data) > upload.size:
            del self.uploads[upload_id]
            raise Refused(400, "invalid_request", f"More than the {upload.size} bytes the "
                          "upload announced were sent.")
        if "finalize" not in commands:
            return web.Response(headers={"X-Goog-Upload-Status": "active",
                                         "X-Goog-Upload-Size-Received": str(len(upload.data))})
        del self.uploads[upload_id]
        if len(upload.data) != upload.size:
            raise Refused(400, "invalid_request", f"The upload announced {upload.size} bytes; "
                          f"{len(upload.data)} were sent.")
        file = self.add_file(bytes(upload.data), upload.display_name, upload.mime_type,
                             "UPLOADED", upload.name)
        self.server.stats.files_uploaded += 1
        return web.Response(body=orjson.dumps({"file": file.as_json(str(request.url.origin()))}),
                            content_type=JSON, headers={"X-Goog-Upload-Status": "final"})

    async def get_file(self, request: web.Request) -> web.Response:
        return respond(self.file(request.match_info["id"]).as_json(str(request.url.origin())))

    async def list_files(self, request: web.Request) -> web.Response:
        files = list(reversed(self.files.values()))  # newest first
        page, more = self.after(files, request.query.get("pageToken"), page_size(request))
        origin = str(request.url.origin())
        return respond({"files": [file.as_json(origin) for file in page],
                        **({"nextPageToken": page[-1].id} if more else {})})

    async def delete_file(self, request: web.Request) -> web.Response:
        del self.files[self.file(request.match_info["id"]).id]
        return respond({})

    async def download_file(self, request: web.Request) -> web.Response:
        file = self.file(request.match_info["id"])
        return web.Response(body=file.data, content_type=file.mime_type)

    # -- batches --

    def results(self, batch: GeminiBatch) -> Results:
        return Results(self, batch)

    def item_error(self, refused: Refused) -> bytes:
        # an item's error is a google.rpc.Status with its canonical code
        status, code = STATUSES[refused.kind]
        return orjson.dumps({"code": code, "message": refused.message, "status": status})

    def state(self, batch: GeminiBatch, now: float) -> str:
        if batch.ended(now):
            if batch.cancel_at is not None:
                return "BATCH_STATE_CANCELLED"
            if batch.tally[SUCCEEDED] or not batch.custom_ids:
                return "BATCH_STATE_SUCCEEDED"
            # no item succeeded: the whole batch expired, or failed
            expired = batch.tally[EXPIRED] == len(batch.custom_ids)
            return "BATCH_STATE_EXPIRED" if expired else "BATCH_STATE_FAILED"
        return "BATCH_STATE_RUNNING" if batch.reached(now, 0.1) else "BATCH_STATE_PENDING"

    def show(self, batch: GeminiBatch, now: float, request: web.Request) -> dict[str, Any]:
        """The batch as a long-running Operation, its GenerateContentBatch in `metadata`;
        once done, its output both there and in `response`."""
        state = self.state(batch, now)
        n = len(batch.custom_ids)
        done = batch.ended(now)
        if done:
            succeeded, failed = batch.tally[SUCCEEDED], n - batch.tally[SUCCEEDED]
            updated = batch.ended_wall()
        else:
            succeeded, failed = batch.running_counts(now)
            updated = batch.cancel_wall or (batch.created + 0.1 * batch.delay
                                            if state == "BATCH_STATE_RUNNING" else batch.created)
        name = f"batches/{batch.id}"
        about: dict[str, Any] = {
            "@type": BATCH_TYPE, "model": f"models/{batch.model}",
            "displayName": batch.display_name, "createTime": iso(batch.created),
            "updateTime": iso(updated),
            "batchStats": {"requestCount": str(n),
                           "pendingRequestCount": str(n - succeeded - failed),
                           "successfulRequestCount": str(succeeded),
                           "failedRequestCount": str(failed)},
            "state": state, "name": name}
        operation: dict[str, Any] = {"name": name, "metadata": about}
        if done:
            output = ({"responsesFile": f"files/{batch.responses_file}"} if batch.from_file
                      else {"inlinedResponses": orjson.Fragment(batch.inlined)})
            about.update(endTime=iso(updated), output=output)
            operation.update(done=True, response={"@type": OUTPUT_TYPE, **output})
        return operation

    def check_cancel(self, batch: GeminiBatch, now: float) -> None:
        if batch.ended(now):
            raise Refused(400, "precondition", f"Batch batches/{batch.id} has ended "
                          f"({self.state(batch, now)}): it cannot be cancelled.")

    async def cancel_batch(self, request: web.Request) -> web.Response:
        self.cancelled(request)
        return respond({})

    async def delete_batch(self, request: web.Request) -> web.Response:
        batch = self.find(request)
        self.stop(batch)
        del self.batches[batch.id]
        return respond({})

    async def list_batches(self, request: web.Request) -> web.Response:
        page, more = self.after(self.newest_first(), request.query.get("pageToken"),
                                page_size(request))
        now = time.monotonic()
        return respond({"operations": [self.show(b, now, request) for b in page],
                        **({"nextPageToken": page[-1].id} if more else {})})

    async def create_batch(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if len(raw) > INLINE_BYTES:
            raise Refused(400, "invalid_request", "Request payload size exceeds the limit: "
                          f"{INLINE_BYTES} bytes.")
        model = request.match_info["model"]
        check_model(model, "batchGenerateContent")
        where = {"model": model, "method": "generateContent"}
        batch = field_of(json_object(raw), "batch")
        config = field_of(batch, "inputConfig") if isinstance(batch, dict) else None
        if not isinstance(config, dict):
            raise Refused(400, "invalid_request", "* BatchGenerateContentRequest.batch."
                          "input_config: input_config is required")
        display = field_of(batch, "displayName")
        inline, file_name = field_of(config, "requests"), field_of(config, "fileName")
        if (inline is None) == (file_name is None):
            raise Refused(400, "invalid_request", "* BatchGenerateContentRequest.batch."
                          "input_config: exactly one of requests and file_name is required")
        if inline is not None:
            custom_ids, items, metadata = self.inline_items(inline, where)
        else:
            if not isinstance(file_name, str):
                raise Refused(400, "invalid_request", "input_config.file_name: must be a "
                              "string, files/…")
            data = self.file(file_name.removeprefix("files/")).data
            custom_ids, items, metadata = *self.file_items(data, where), None
        created = self.new_batch(GeminiBatch, "", custom_ids, items, where=where, model=model,
                                 display_name=display if isinstance(display, str) else "",
                                 metadata=metadata, from_file=inline is None)
        return self.shown(request, created)

    def inline_items(self, inline: Any, where: Mapping[str, str]) -> tuple[
            list[str], list[Item], list[bytes]]:
        requests = field_of(inline, "requests") if isinstance(inline, dict) else None
        if not isinstance(requests, list) or not requests:
            raise Refused(400, "invalid_request", "* BatchGenerateContentRequest.batch."
                          "input_config.requests.requests: must be a non-empty list")
        custom_ids: list[str] = []
        items: list[Item] = []
        metadata: list[bytes] = []
        for i, item in enumerate(requests):
            body = item.get("request") if isinstance(item, dict) else None
            if not isinstance(body, dict):
                raise Refused(400, "invalid_request", f"* BatchGenerateContentRequest.batch."
                              f"input_config.requests.requests[{i}].request: field required")
            meta = item.get("metadata")
            key = meta.get("key") if isinstance(meta, dict) else None
            custom_ids.append(key if isinstance(key, str) else str(i))
            items.append(self.prepare(custom_ids[-1], body, where))
            metadata.append(orjson.dumps(meta) if meta is not None else b"")
        return custom_ids, items, metadata

    def file_items(self, data: bytes, where: Mapping[str, str]) -> tuple[
            list[str], list[Item]]:
        """An input file's lines, `{"key": …, "request": …}`: a line that is not one is an
        item refused as a bad request."""
        custom_ids: list[str] = []
        items: list[Item] = []
        for number, line in jsonl_lines(data):
            key = line.get("key") if isinstance(line, dict) else None
            custom_ids.append(str(number) if key is None else str(key))
            body = line.get("request") if isinstance(line, dict) else None
            if isinstance(body, dict):
                items.append(self.prepare(custom_ids[-1], body, where))
            else:
                items.append((b"", INVALID, f"line {number}: not a JSON object with a "
                              "request"))
        if not custom_ids:
            raise Refused(400, "invalid_request", "The input file has no requests.")
        return custom_ids, items


def page_size(request: web.Request) -> int:
    raw = request.query.get("pageSize", "0")
    if not raw.isdigit():
        raise Refused(400, "invalid_request", "pageSize: must be a whole number")
    return int(raw) or LIST_SIZE
