"""The provider batch APIs of `chunbot sim serve`: what every vendor's batches share.

A batch lives in memory and moves on a clock of --batch-delay-s seconds from its creation:
its items are processed evenly from 10% to 90% of the delay (which the request counts
show while it runs), then it finalizes: the replies of every item are computed then, in
chunks that let realtime requests through, by the same code as realtime requests, and it
ends at the delay (or when they are computed, if later). A cancel keeps the items done by
then and ends the batch a tenth of the delay later. What becomes of each item (succeeded,
errored, expired) is decided by a hash of --seed and its custom_id (Gemini: its key).

Each vendor's module has a subclass of BatchRoutes: how its batches are created, shown
and listed, and how their results are kept (its `Results`). Here: the clock, the fates,
computing the items, cancelling, finding a batch by id, and the key checked and refusals
answered on every batch route as on the vendor's model route.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import orjson
from aiohttp import web

from .faults import SERVER_ERROR
from .wire import Dialect, Refused, respond

if TYPE_CHECKING:
    from .server import SimServer

BATCH_CHUNK = 512  # items computed between two yields to the event loop
BATCH_WINDOW = 86_400  # 24h: OpenAI's and Anthropic's expires_at
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."

# An item's fate, decided when it is submitted; INVALID: its body is a bad request (400)
SUCCEEDED, ERRORED, EXPIRED, INVALID = 0, 1, 2, 3
FATES = ("succeeded", "errored", "expired", "invalid")

Item = tuple[bytes, int, "str | None"]  # a submitted item: its body as JSON, fate, problem
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ID = "{id:[^/:]+}"  # a batch's or a file's id in a path; Gemini's methods follow a colon
NOWHERE: Mapping[str, str] = MappingProxyType({})  # the URL variables of OpenAI and Anthropic items


def _fate(seed: int | None, custom_id: str, error_rate: float, expire_rate: float) -> int:
    if not error_rate and not expire_rate:
        return SUCCEEDED
    digest = hashlib.blake2b(f"{seed or 0}\x00{custom_id}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2 ** 64
    if draw < error_rate:
        return ERRORED
    return EXPIRED if draw < error_rate + expire_rate else SUCCEEDED


def item_fate(seed: int | None, custom_id: str, error_rate: float, expire_rate: float) -> str:
    """"succeeded", "errored" or "expired": what becomes of a (valid) batch item with this
    custom_id under `--seed`, `--batch-error-rate` and `--batch-expire-rate`."""
    return FATES[_fate(seed, custom_id, error_rate, expire_rate)]


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def jsonl_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    """An input file's lines that are not blank: (line number, its JSON, or None)."""
    for number, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            try:
                yield number, orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield number, None


def limit_of(request: web.Request, default: int, most: int) -> int:
    """The `limit` query parameter of OpenAI's and Anthropic's batch lists."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise Refused(400, "invalid_request", f"limit: must be an integer from 1 to {most}")
    return limit


@dataclass(eq=False)
class Batch:
    """One batch; its status follows from the clock and these fields. Vendors subclass it
    with the fields of their own."""

    id: str
    created: float  # time.time()
    started: float  # time.monotonic() at the same moment
    delay: float
    custom_ids: list[str]
    bodies: list[bytes]  # each item's request, as JSON
    fates: bytes
    problems: dict[int, str]  # why each INVALID item is a bad request
    where: Mapping[str, str] = field(default_factory=lambda: NOWHERE)  # its items are parsed with
    cancel_at: float | None = None  # monotonic
    cancel_wall: float | None = None
    todo: int = 0  # items answered: all of them, or those done before the cancel
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = None
    ready_wall: float | None = None  # when its results were computed
    tally: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # answered, per fate

    def done_by(self, now: float) -> int:
        """Items processed by `now` (or by the cancel): evenly from 10% to 90% of the delay."""
        if self.cancel_at is not None:
            now = min(now, self.cancel_at)
        n = len(self.custom_ids)
        if self.delay <= 0:
            return n
        share = (now - self.started - 0.1 * self.delay) / (0.8 * self.delay)
        return n if share >= 1 else max(0, int(n * share))

    def running_counts(self, now: float) -> tuple[int, int]:
        """(succeeded, failed) among the items processed so far; expiry shows at the end."""
        done = self.fates[:self.done_by(now)]
        return done.count(SUCCEEDED), done.count(ERRORED) + done.count(INVALID)

    def failed(self) -> int:
        """The items that came back errored or invalid, once ended."""
        return self.tally[ERRORED] + self.tally[INVALID]

    def end(self) -> float:
        if self.cancel_at is not None:
            return self.cancel_at + 0.1 * self.delay
        return self.started + self.delay

    def ended(self, now: float) -> bool:
        return self.ready_wall is not None and now >= self.end()

    def ended_wall(self) -> float:
        return max(self.created + self.end() - self.started, self.ready_wall or 0.0)

    def reached(self, now: float, fraction: float) -> bool:
        """Whether the batch got to this share of its delay before now (and any cancel)."""
        stop = now if self.cancel_at is None else min(now, self.cancel_at)
        return stop - self.started >= fraction * self.delay


class Results(Protocol):
    """A batch's results as its vendor serves them, item by item in order, then closed."""

    def add(self, i: int, fate: int, reply: bytes) -> None:
        """Item i: its JSON reply (SUCCEEDED), its error (ERRORED, INVALID: what
        BatchRoutes.item_error made) or b"" (EXPIRED)."""

    def close(self) -> None:
        """After the last item: what is left of the items that were not answered."""


class BatchRoutes:
    """One vendor's batch API: its batches by id, oldest first, on the shared clock."""

    dialect: Dialect
    missing = "No batch found with id '{}'."  # the 404 of an unknown id

    def __init__(self, server: SimServer):
        self.server = server
        self.batches: dict[str, Batch] = {}

    def routes(self) -> list[tuple[str, str, Handler]]:
        """Its routes: (method, path, handler)."""
        raise NotImplementedError

    def claims(self, request: web.Request) -> bool:
        """Whether a request to a path another vendor serves too is this vendor's."""
        return False

    def results(self, batch: Any) -> Results:
        raise NotImplementedError

    def show(self, batch: Any, now: float, request: web.Request) -> dict[str, Any]:
        """The batch's object, as the vendor's routes answer it."""
        raise NotImplementedError

    def check_cancel(self, batch: Any, now: float) -> None:
        """Refused when the batch cannot be cancelled."""
        raise NotImplementedError

    def item_error(self, refused: Refused) -> bytes:
        return self.dialect.error(refused)

    def guarded(self, handler: Handler) -> Handler:
        """The route with the key checked as on the vendor's model route, and refusals
        answered with the vendor's error body."""
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                self.server.authorize(request, self.dialect)
                return await handler(request)
            except Refused as e:
                return self.server.error(self.dialect, e, request)
        return run

    def find(self, request: web.Request) -> Any:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            raise Refused(404, "not_found", self.missing.format(request.match_info["id"]))
        return batch

    def shown(self, request: web.Request, batch: Batch) -> web.Response:
        return respond(self.show(batch, time.monotonic(), request))

    async def get_batch(self, request: web.Request) -> web.Response:
        return self.shown(request, self.find(request))

    def cancelled(self, request: web.Request) -> Any:
        """The batch of the request's id, cancelled unless it was already."""
        batch = self.find(request)
        self.check_cancel(batch, time.monotonic())
        if batch.cancel_at is None:
            self.cancel(batch)
        return batch

    async def cancel_batch(self, request: web.Request) -> web.Response:
        return self.shown(request, self.cancelled(request))

    def newest_first(self) -> list[Any]:
        return list(reversed(self.batches.values()))

    @staticmethod
    def after(batches: list[Any], cursor: str | None,
              limit: int) -> tuple[list[Any], bool]:
        """The page of up to `limit` batches after the one with id `cursor` (from the first
        without one; none when there is no such batch), and whether more follow."""
        if cursor is None:
            return batches[:limit], len(batches) > limit
        at = next((i for i, b in enumerate(batches) if b.id == cursor), None)
        if at is None:
            return [], False
        return batches[at + 1:at + 1 + limit], len(batches) > at + 1 + limit

    def prepare(self, custom_id: str, body: dict[str, Any],
                where: Mapping[str, str] = NOWHERE) -> Item:
        """A submitted item as the batch keeps it: its body as JSON, its fate, and why it is
        a bad request if it is one."""
        options = self.server.options
        # a copy: orjson's bytes keep their spare buffer, five times the JSON for small bodies
        packed = bytes(memoryview(orjson.dumps(body)))
        try:
            self.dialect.parse(body, where)
        except Refused as e:
            return packed, INVALID, e.message
        return packed, _fate(options.seed, custom_id, options.batch_error_rate,
                             options.batch_expire_rate), None

    def new_batch(self, kind: type[Batch], prefix: str, custom_ids: list[str],
                  items: list[Item], **fields: Any) -> Any:
        """A batch of prepared items, kept; the computation of their replies is scheduled
        for when it finalizes."""
        problems = {i: problem for i, (_, _, problem) in enumerate(items) if problem}
        delay = self.server.options.batch_delay_s
        batch = kind(self.server.new_id(prefix), time.time(), time.monotonic(), delay,
                     custom_ids, [packed for packed, _, _ in items],
                     bytes(fate for _, fate, _ in items), problems, **fields)
        stats = self.server.stats
        stats.batches_created += 1
        stats.batch_items += len(custom_ids)
        batch.timer = asyncio.get_running_loop().call_later(0.9 * delay, self.finalize, batch)
        self.batches[batch.id] = batch
        return batch

    def finalize(self, batch: Batch) -> None:
        batch.timer = None
        if batch.task is None and batch.cancel_at is None and batch.ready_wall is None:
            batch.todo = len(batch.custom_ids)
            batch.task = asyncio.get_running_loop().create_task(self.compute(batch))

    def cancel(self, batch: Batch) -> None:
        now = time.monotonic()
        batch.cancel_at, batch.cancel_wall = now, time.time()
        if batch.task is None and batch.ready_wall is None:
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
            batch.todo = batch.done_by(now)
            batch.task = asyncio.get_running_loop().create_task(self.compute(batch))

    def stop(self, batch: Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.task is not None:
            batch.task.cancel()

    def close(self) -> None:
        for batch in self.batches.values():
            self.stop(batch)

    async def compute(self, batch: Batch) -> None:
        """Answer the batch's items as realtime requests are answered, then keep the results
        as the vendor serves them."""
        server, dialect = self.server, self.dialect
        cancelled = batch.cancel_at is not None
        tally = batch.tally
        results = self.results(batch)
        bodies, fates = batch.bodies, batch.fates
        for start in range(0, batch.todo, BATCH_CHUNK):
            stats = server.stats  # a /stats/reset may replace it meanwhile
            for i in range(start, min(start + BATCH_CHUNK, batch.todo)):
                fate = fates[i]
                if fate == EXPIRED and cancelled:
                    continue  # the cancel came before it would have expired
                tally[fate] += 1
                if fate == SUCCEEDED:
                    call = dialect.parse(orjson.loads(bodies[i]), batch.where)  # checked before
                    answer, cache, reply_id = server.model_reply(dialect, call)
                    stats.batch_answered += 1
                    stats.batch_tokens_in += answer.input_tokens
                    stats.batch_tokens_out += answer.output_tokens
                    reply = dialect.json_reply(reply_id, call, answer, cache, False)
                elif fate == EXPIRED:
                    stats.batch_expired += 1
                    reply = b""
                else:
                    stats.batch_errored += 1
                    reply = self.item_error(SERVER_ERROR if fate == ERRORED else
                                            Refused(400, "invalid_request", batch.problems[i]))
                results.add(i, fate, reply)
            await asyncio.sleep(0)
        results.close()
        batch.bodies = []  # answered: only the results are needed now
        batch.ready_wall = time.time()
