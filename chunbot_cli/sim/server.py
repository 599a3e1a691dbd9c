"""`chunbot sim serve`: the deterministic sim model over HTTP, speaking OpenAI, Anthropic and
Gemini.

This module owns the routes and the one request path every vendor's model route takes
(the key, the body, the injected faults, the model's answer, the reply in the vendor's
shape), and the /stats counters that tests read to check what a client sent. What differs
between vendors is each one's Dialect and routes (`openai`, `anthropic`, `gemini`); the
faults are `faults`, the prompt-cache model `cache`, the batch lifecycle `batches`. The
replies come from `sim.model`, called exactly as the in-process `sim` provider calls it, so
one request gets one text whether it is asked in-process or over any protocol, streamed or
not.

It is also the server of chunbot's throughput benchmarks, so the request path is kept lean:
orjson, whole replies (SSE too) built in one buffer and sent in one response, no access log,
no per-request logging; see bench/sim_server.py.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from . import anthropic, gemini, openai
from . import model as sim_model
from .batches import BatchRoutes, Handler
from .cache import NO_CACHE, CacheUse, PrefixCache
from .faults import HTML_BODY, POISONED, Faults, Options
from .wire import JSON, MODELS, SSE, Call, Dialect, Refused, json_object

MAX_BODY = 256 * 1024 * 1024  # OpenAI takes batch input files of up to 200 MB


@dataclass
class Stats:
    requests: int = 0
    by_route: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    answered: int = 0
    keys: set = field(default_factory=set)
    tokens_in: int = 0
    tokens_out: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    streamed: int = 0
    structured: int = 0  # asking for a schema: OpenAI json_schema, a forced tool, responseSchema
    cached_tokens: int = 0  # OpenAI cached_tokens + Anthropic cache reads + Gemini's
    cache_creation_tokens: int = 0
    hung: int = 0  # --hang-rate: requests held without an answer
    poisoned: int = 0  # --fail-prompt: requests answered 500 for containing the text
    blocked: int = 0  # --block-prompt: requests and batch items the safety filter refused
    # the batch APIs; their items count here, not in answered / unique / tokens_*
    batches_created: int = 0  # every vendor's
    batch_items: int = 0  # items submitted
    files_uploaded: int = 0
    batch_answered: int = 0
    batch_errored: int = 0
    batch_expired: int = 0
    batch_tokens_in: int = 0
    batch_tokens_out: int = 0

    def as_json(self) -> dict[str, Any]:
        unique = len(self.keys)
        return {"requests": self.requests,
                "by_route": {"chat": 0, "messages": 0, **self.by_route},
                "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
                "answered": self.answered, "unique": unique, "repeated": self.answered - unique,
                "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "streamed": self.streamed, "structured": self.structured,
                "cached_tokens": self.cached_tokens,
                "cache_creation_tokens": self.cache_creation_tokens,
                "hung": self.hung, "poisoned": self.poisoned, "blocked": self.blocked,
                "batches_created": self.batches_created, "batch_items": self.batch_items,
                "files_uploaded": self.files_uploaded, "batch_answered": self.batch_answered,
                "batch_errored": self.batch_errored, "batch_expired": self.batch_expired,
                "batch_tokens_in": self.batch_tokens_in,
                "batch_tokens_out": self.batch_tokens_out}


class SimServer:
    """The state behind the routes: options, faults, prompt caches, stats, the vendors."""

    def __init__(self, options: Options):
        self.options = options
        self.faults = Faults(options)
        self.stats = Stats()
        self.ids = itertools.count(1)
        # ids are unique across restarts too: a client may compare them
        self.boot = f"{random.getrandbits(32):08x}"
        self.vendors = [openai.Routes(self), anthropic.Routes(self), gemini.Routes(self)]
        self.caches = {vendor.dialect.route: PrefixCache() for vendor in self.vendors}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        served: dict[tuple[str, str], list[tuple[BatchRoutes, Handler]]] = {}
        for vendor in self.vendors:
            for method, path, handler in vendor.routes():
                served.setdefault((method, path), []).append((vendor, handler))
        for (method, path), owners in served.items():
            app.router.add_route(method, path, owners[0][1] if len(owners) == 1
                                 else shared(owners))
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        return app

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self.boot}{next(self.ids):016x}"

    async def handle(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.by_route[dialect.route] += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            response = await self.answer(request, dialect)
        finally:
            # self.stats again: /stats/reset may have replaced it meanwhile
            self.stats.in_flight -= 1
        if response is None:  # hung: its connection is closed, there is no answer to count
            return web.Response(status=504)  # what aiohttp wants; it cannot be sent
        self.stats.by_status[response.status] += 1
        return response

    async def answer(self, request: web.Request, dialect: Dialect) -> web.Response | None:
        """The response to a model request; None when it hung and its connection is gone."""
        options, faults = self.options, self.faults
        try:
            self.authorize(request, dialect)
            call = dialect.parse(json_object(await request.read()), request.match_info)
            if options.storm_s:
                faults.storm()
            if faults.limited:
                faults.admit(call)
        except Refused as e:
            return self.error(dialect, e, request)
        poisoned = options.fail_prompt is not None and faults.poisoned(call)
        if options.hang_rate and not poisoned and faults.hangs():
            self.stats.hung += 1
            await faults.hang(request)
            return None
        if options.latency_ms or options.jitter_ms:
            await faults.delay()
        if poisoned:
            self.stats.poisoned += 1
            return self.error(dialect, POISONED, request)
        if options.error_rate:
            injected = faults.injected()
            if injected is not None:
                return self.error(dialect, injected, request)

        seed = sim_model.request_seed(call.model, call.messages, call.params)
        answer, cache, reply_id = self.model_reply(dialect, call)
        stats = self.stats
        stats.answered += 1
        stats.structured += dialect.structured(call)
        stats.keys.add(seed)
        stats.tokens_in += answer.input_tokens
        stats.tokens_out += answer.output_tokens
        stats.cached_tokens += cache.read
        stats.cache_creation_tokens += cache.created
        if options.malformed == "not-json":
            body, content_type = HTML_BODY, "text/html"
        elif call.stream and options.malformed is None:  # a broken server ignores `stream`
            stats.streamed += 1
            body, content_type = dialect.sse_reply(reply_id, call, answer, cache, seed), SSE
        else:
            body = dialect.json_reply(reply_id, call, answer, cache,
                                      options.malformed == "no-choices")
            content_type = JSON
        headers = {"Content-Type": content_type}
        if faults.limited:
            faults.refill()
            headers.update(dialect.limit_headers(faults.requests, faults.tokens))
        return web.Response(body=body, headers=headers)

    def model_reply(self, dialect: Dialect,
                    call: Call) -> tuple[sim_model.SimReply, CacheUse, str]:
        """The model's answer to a request, its provider-cache use and its reply id: the one
        path of realtime requests and batch items, so both get the same text and usage."""
        options = self.options
        if options.block_prompt is not None:
            blocked = self.faults.blocked(call)
            if blocked is not None:
                self.stats.blocked += 1
                answer = sim_model.SimReply("", sim_model.prompt_tokens(call.messages), 0, blocked)
                return answer, NO_CACHE, self.new_id(dialect.id_prefix)
        wrong = options.wrong_rate if call.model == options.wrong_model else 0.0
        answer = sim_model.reply(call.model, call.messages, call.params, wrong,
                                 options.flaky_rate)
        cache = dialect.cache_use(self.caches[dialect.route], call, answer)
        return answer, cache, self.new_id(dialect.id_prefix)

    def authorize(self, request: web.Request, dialect: Dialect) -> None:
        """The checks of every model and batch request: --authorization, then the vendor's
        key (--api-key); or Refused."""
        expected = self.options.authorization
        if expected is not None and request.headers.get("Authorization") != expected:
            # never echoed (unless --echo-authorization): it may be a real one sent by mistake
            raise Refused(401, "auth", "The Authorization header is not the one this server "
                          "requires (--authorization).")
        dialect.authorize(request, self.options.api_key)

    def error(self, dialect: Dialect, refused: Refused,
              request: web.Request | None = None) -> web.Response:
        if request is not None and self.options.echo_authorization:
            refused = echoed(refused, request)
        headers = {"Content-Type": JSON, **dialect.retry_headers(refused)}
        faults = self.faults
        if faults.limited:
            faults.refill()
            headers.update(dialect.limit_headers(faults.requests, faults.tokens))
        return web.Response(status=refused.status, body=dialect.error(refused), headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        # the fields of both vendors' model lists, so either SDK can read it
        data = [{"id": name, "object": "model", "type": "model", "created": 0,
                 "created_at": "2026-01-01T00:00:00Z", "owned_by": "chunbot",
                 "display_name": name} for name in MODELS]
        body = {"object": "list", "data": data, "has_more": False,
                "first_id": MODELS[0], "last_id": MODELS[-1]}
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=JSON)

    async def reset_stats(self, request: web.Request) -> web.Response:
        in_flight = self.stats.in_flight  # requests still running will decrement it
        self.stats = Stats(in_flight=in_flight, max_in_flight=in_flight)
        for cache in self.caches.values():
            cache.clear()
        return web.Response(body=orjson.dumps(self.stats.as_json()), content_type=JSON)


def echoed(refused: Refused, request: web.Request) -> Refused:
    """--echo-authorization: the refusal with the request's Authorization header in its
    message, as a proxy dumping the request it could not pass on shows it."""
    sent = request.headers.get("Authorization", "(none)")
    return Refused(refused.status, refused.kind, f"{refused.message} Request headers: "
                   f"Authorization: {sent}", refused.retry_after, refused.wait, refused.limit,
                   refused.model)


def shared(owners: list[tuple[BatchRoutes, Handler]]) -> Handler:
    """The handler of a path several vendors serve: the first vendor after the first that
    claims the request answers it, else the first."""
    first, others = owners[0][1], owners[1:]

    async def pick(request: web.Request) -> web.StreamResponse:
        for vendor, handler in others:
            if vendor.claims(request):
                return await handler(request)
        return await first(request)
    return pick


async def _serve(options: Options) -> None:
    server = SimServer(options)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    # a large backlog so that benchmarks opening 1,000+ connections at once are not refused
    site = web.TCPSite(runner, options.host, options.port, backlog=4096, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"chunbot sim: listening on http://{host}:{port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for vendor in server.vendors:
        vendor.close()
    await runner.cleanup()


def serve(options: Options) -> None:
    """Serve until SIGINT or SIGTERM; then exit cleanly."""
    try:
        asyncio.run(_serve(options))
    except OSError as e:
        print(f"chunbot sim: cannot listen on {options.host}:{options.port}: {e.strerror}",
              file=sys.stderr)
        raise SystemExit(2) from None
