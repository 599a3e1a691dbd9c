"""Providers `openai`, `anthropic` and `gemini` over HTTP: one aiohttp session per run, one
request per call, every failure turned into a ProviderError that says whether to retry.

aiohttp rather than httpx: on this project's machines httpx spent 10–40× more CPU per
request and collapsed at a thousand requests in flight. The wire formats live in
`openai.py`, `anthropic.py` and `gemini.py` (each: path, headers, body, reply, Stream,
error_hints); this module owns the exchange: headers, timeouts, status codes,
`retry-after`, SSE. The API key goes into headers only: error texts have it
masked, and nothing here logs headers. Credentials in a URL (`http://user:password@host`)
are sent as HTTP Basic auth to that URL alone, which requests then go to without them;
error texts have them masked too, raw, percent-decoded and base64 (what a server echoing
the Authorization header shows).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import Any, Iterable, Mapping

import aiohttp
import orjson

from ..config import ModelSpec, redact_url
from . import anthropic, gemini, openai
from .types import ProviderError, RateLimits, Reply, Request, excerpt

AUTHORIZATION = "authorization"

PROTOCOLS: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic,
                                    "gemini": gemini}
RETRYABLE_STATUS = {408, 409, 429}
CONNECT_TIMEOUT_S = 30.0


def open_session(connections: int) -> aiohttp.ClientSession:
    """The run's one HTTP session; its pool holds as many connections as requests may be
    in flight, and keeps them alive between requests."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, ttl_dns_cache=300,
                                     keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector)


def api_key(spec: ModelSpec) -> str | None:
    return os.environ.get(spec.api_key_env) or None if spec.api_key_env else None


@dataclass(frozen=True)
class Target:
    """A URL as requests go to it: without the userinfo it may carry, the HTTP Basic
    `authorization` header that userinfo makes, and the forms of it no text may show."""

    url: str
    shown: str  # the URL as texts name it: `http://***@host/…`, as its endpoint is named
    auth: dict[str, str]
    secrets: tuple[str, ...] = ()

    def headers(self, sent: dict[str, str]) -> dict[str, str]:
        """`sent` with this URL's credentials, which replace any other authorization:
        aiohttp refuses both, and the URL's own credentials are meant for it."""
        if not self.auth:
            return sent
        return {**{k: v for k, v in sent.items() if k.lower() != AUTHORIZATION}, **self.auth}


def split_credentials(url: str) -> Target:
    """The URL without its `user:password@`, and the Basic auth that stood for. Built here
    rather than left to aiohttp, which refuses the URL's credentials beside an
    authorization header and encodes them in latin-1 (RFC 7617 says UTF-8)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return Target(url, url, {})
    raw_user, _, raw_password = userinfo.partition(":")
    user, password = urllib.parse.unquote(raw_user), urllib.parse.unquote(raw_password)
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    secrets = {userinfo, f"{user}:{password}", raw_password, password, token}
    return Target(urllib.parse.urlunsplit(parts._replace(netloc=host)), redact_url(url),
                  {AUTHORIZATION: f"Basic {token}"}, ordered(secrets))


def ordered(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """The non-empty secrets, longest first: masking a password inside `user:password`
    first would leave the user name beside the mask, and the base64 of both unmasked."""
    return tuple(sorted({s for s in secrets if s}, key=len, reverse=True))


def mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def masked_excerpt(data: bytes, secrets: tuple[str, ...]) -> str:
    """The start of a body, with the secrets masked before it is cut: a secret cut in
    half by the excerpt would no longer be found."""
    if not secrets:
        return excerpt(data)
    return excerpt(mask(data.decode("utf-8", "replace"), secrets))


class HTTPProvider:
    def __init__(self, spec: ModelSpec, session: aiohttp.ClientSession):
        self.spec = spec
        self.session = session
        self.protocol = PROTOCOLS[spec.provider]
        self.key = api_key(spec)
        self.headers = self.protocol.headers(spec, self.key)
        # each endpoint's own credentials, sent to it alone
        self.targets = {url: split_credentials(url) for url in spec.urls}
        # what no error text may show: the key, and every endpoint's credentials
        self.secrets = ordered([self.key, *(secret for t in self.targets.values()
                                            for secret in t.secrets)])
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout,
                                             sock_connect=min(CONNECT_TIMEOUT_S, spec.timeout))

    async def complete(self, request: Request, url: str) -> Reply:
        streaming = bool(request.params.get("stream"))
        where = self.targets.get(url) or split_credentials(url)
        path = self.protocol.path(self.spec, streaming)
        # sent to the URL without userinfo, named in texts as its endpoint is
        address, shown = where.url + path, where.shown + path
        headers = where.headers(self.headers)
        payload = orjson.dumps(self.protocol.body(self.spec, request))
        try:
            async with self.session.post(address, data=payload, headers=headers,
                                         timeout=self.timeout) as response:
                limits = rate_limits(response.headers, self.protocol.LIMIT_HEADERS)
                if response.status != 200:
                    raise self._status_error(response, await response.read(), shown, limits)
                if streaming and response.content_type == "text/event-stream":
                    reply = await self._read_stream(response)
                else:
                    reply = self._parse(await response.read(), response, shown)
                return reply if limits is None else dataclasses.replace(reply, limits=limits)
        except ProviderError as e:
            raise self._masked(e) from None
        except aiohttp.ClientConnectorError as e:
            raise self._masked(ProviderError(f"cannot connect to {where.shown}: {_reason(e)}",
                                             retryable=True, unreachable=True)) from None
        except aiohttp.ConnectionTimeoutError:
            raise self._masked(ProviderError(
                f"cannot connect to {where.shown}: no answer within "
                f"{self.timeout.sock_connect:g}s",
                retryable=True, unreachable=True)) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise self._masked(ProviderError(
                f"{shown}: no complete reply within {self.spec.timeout:g}s (the alias's "
                "timeout)", retryable=True, timed_out=True)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise self._masked(ProviderError(f"{shown}: connection lost: {_reason(e)}",
                                             retryable=True)) from None

    def _masked(self, error: ProviderError) -> ProviderError:
        """The error with no secret in its text (the key, credentials in the URL)."""
        if self.secrets:
            error.args = (self._mask(str(error)),)
        return error

    def _parse(self, data: bytes, response: aiohttp.ClientResponse, target: str) -> Reply:
        try:
            decoded = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderError(f"reply from {target} is not JSON (HTTP 200, "
                                f"{response.content_type}): "
                                f"{masked_excerpt(data, self.secrets)!r}",
                                retryable=False) from None
        return self.protocol.reply(decoded, self.spec.model)

    async def _read_stream(self, response: aiohttp.ClientResponse) -> Reply:
        stream = self.protocol.Stream(self.spec.model)
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue  # `event:` names are repeated in the data's "type"
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            try:
                stream.feed(orjson.loads(data))
            except orjson.JSONDecodeError:
                raise ProviderError(f"a stream event is not JSON: {excerpt(data)!r}",
                                    retryable=True) from None
        return stream.reply()

    def _status_error(self, response: aiohttp.ClientResponse, data: bytes, target: str,
                      limits: RateLimits | None) -> ProviderError:
        """The failure an HTTP error status means; with the limits and the pause the
        server asked for, from its headers or (Gemini) its error body."""
        status = response.status
        delay, named = self.protocol.error_hints(data) if status == 429 else (None, None)
        body = masked_excerpt(data, self.secrets)
        if status == 401:
            return ProviderError(f"authentication failed (HTTP 401 from {target}; check "
                                 f"{self._credentials()}): {body}",
                                 retryable=False, status=status)
        hint = ""
        if status == 404 and self.spec.provider == "openai" and not target.endswith(
                "/v1" + openai.PATH):
            hint = " (an OpenAI-compatible base_url usually ends in /v1)"
        return ProviderError(f"HTTP {status} from {target}{hint}: {body}",
                             retryable=status in RETRYABLE_STATUS or status >= 500,
                             status=status, limits=limits or named,
                             retry_after=retry_after(response.headers) or delay)

    def _mask(self, text: str) -> str:
        return mask(text, self.secrets)

    def _credentials(self) -> str:
        """What a 401 says to check: the key's variable, or the URLs' user:password."""
        if self.spec.api_key_env:
            return self.spec.api_key_env
        if any(t.auth for t in self.targets.values()):
            return "the user:password in the URL"
        return "api_key_env"

    async def close(self) -> None:
        pass  # the session belongs to the run


def rate_limits(headers: Mapping[str, str], names: tuple[str, str] | None
                ) -> RateLimits | None:
    """The per-minute request and token limits a response announces, if any (`names`:
    None for a protocol that says them elsewhere)."""
    if names is None:
        return None
    requests, tokens = headers.get(names[0]), headers.get(names[1])
    if requests is None and tokens is None:
        return None
    return RateLimits(_number(requests), _number(tokens))


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def retry_after(headers: Any) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `retry-after` in seconds
    or as an HTTP date."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _reason(error: BaseException) -> str:
    cause = getattr(error, "os_error", None) or error
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
