"""Providers `openai`, `anthropic` and `gemini` over HTTP: one aiohttp session per run, one
request per call, every failure turned into a ProviderError that says whether to retry.

aiohttp rather than httpx: on this project's machines httpx spent 10–40× more CPU per
request and collapsed at a thousand requests in flight. The wire formats live in
`openai.py`, `anthropic.py` and `gemini.py` (each: path, headers, body, reply, Stream,
error_hints); this module owns the exchange: headers, timeouts, status codes,
`retry-after`, SSE. The API key goes into headers only: error texts have it
masked, and nothing here logs headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import Any, Mapping

import aiohttp
import orjson

from ..config import ModelSpec
from . import anthropic, gemini, openai
from .types import ProviderError, RateLimits, Reply, Request, excerpt

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


class HTTPProvider:
    def __init__(self, spec: ModelSpec, session: aiohttp.ClientSession):
        self.spec = spec
        self.session = session
        self.protocol = PROTOCOLS[spec.provider]
        self.key = api_key(spec)
        self.headers = self.protocol.headers(spec, self.key)
        # what no error text may show: the key, and credentials in the URLs' userinfo
        self.secrets = [secret for secret in (self.key, *map(_userinfo, spec.urls)) if secret]
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout,
                                             sock_connect=min(CONNECT_TIMEOUT_S, spec.timeout))

    async def complete(self, request: Request, url: str) -> Reply:
        streaming = bool(request.params.get("stream"))
        target = url + self.protocol.path(self.spec, streaming)
        payload = orjson.dumps(self.protocol.body(self.spec, request))
        try:
            async with self.session.post(target, data=payload, headers=self.headers,
                                         timeout=self.timeout) as response:
                limits = rate_limits(response.headers, self.protocol.LIMIT_HEADERS)
                if response.status != 200:
                    raise self._status_error(response, await response.read(), target, limits)
                if streaming and response.content_type == "text/event-stream":
                    reply = await self._read_stream(response)
                else:
                    reply = self._parse(await response.read(), response, target)
                return reply if limits is None else dataclasses.replace(reply, limits=limits)
        except ProviderError as e:
            raise self._masked(e) from None
        except aiohttp.ClientConnectorError as e:
            raise self._masked(ProviderError(f"cannot connect to {url}: {_reason(e)}",
                                             retryable=True, unreachable=True)) from None
        except aiohttp.ConnectionTimeoutError:
            raise self._masked(ProviderError(
                f"cannot connect to {url}: no answer within {self.timeout.sock_connect:g}s",
                retryable=True, unreachable=True)) from None
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            raise self._masked(ProviderError(
                f"{target}: no complete reply within {self.spec.timeout:g}s (the alias's "
                "timeout)", retryable=True, timed_out=True)) from None
        except (aiohttp.ClientError, OSError) as e:
            raise self._masked(ProviderError(f"{target}: connection lost: {_reason(e)}",
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
                                f"{response.content_type}): {self._mask(excerpt(data))!r}",
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
        body = self._mask(excerpt(data))
        if status == 401:
            return ProviderError(f"authentication failed (HTTP 401 from {target}; check "
                                 f"{self.spec.api_key_env or 'api_key_env'}): {body}",
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
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

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


def _userinfo(url: str) -> str | None:
    """The `user:token` part of `https://user:token@host/…`, if any."""
    rest = url.partition("://")[2]
    authority = rest.split("/", 1)[0]
    return authority.rpartition("@")[0] or None


def _reason(error: BaseException) -> str:
    cause = getattr(error, "os_error", None) or error
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
