"""The run's spending account on a Ray cluster (`--max-cost` with `--executor ray`).

The board actor keeps the `Account`: what the driver counts as used itself, what the
workers spent and the room each holds. A worker's model clients reserve from its
`Allowance`, which takes room from the board a few requests' worth at a time and reports
what they spent; the driver's own Spending follows the account (`Mirror`), so the engine
stops at the cap and says what was spent exactly as in a local run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

from .llm.price import CostCap, Spending

BOARD_TIMEOUT_S = 10.0  # a board call that takes longer is given up (the board is gone)
# A worker asks the board for room for this many requests like the one at hand, so it asks
# seldom; the board gives each worker at most its share of what is left, so near the cap
# the last of it is not held by one worker while another is refused
ROOM_REQUESTS = 16


@dataclasses.dataclass
class Account:
    """The run's spending on a cluster (`--max-cost`), kept by the board, in USD. The
    driver says what it counts as used itself: the output's cost before this run, its own
    jobs' replies and reservations. Each worker holds room it was given and not yet said
    it used; what it used, it reports with what that cost. Room is given only while all of
    it stays within the cap, so the cluster's requests together stay within it as one
    process's do; once a worker is refused (or the driver was), every one is: the run winds
    down and keeps what finished. Room a lost worker held stays counted: the run may stop
    that much short of the cap, never past it."""

    cap: float
    driver: float = 0.0
    spent: float = 0.0  # by the workers' replies, as reported
    held: dict[str, float] = dataclasses.field(default_factory=dict)  # per worker
    reached: bool = False

    def take(self, worker: str, spent: float, used: float, returned: float, want: float,
             need: float, workers: int) -> tuple[float, bool]:
        """A worker reports what its requests `spent` since it last did, the room they
        had `used` and the room it gives back; and asks for up to `want`, at least `need`
        (nothing: a report only). Returns the room given, and whether the cap is reached."""
        self.spent += spent
        left = self.held.get(worker, 0.0) - used - returned
        given = 0.0
        if want > 0 and not self.reached:
            free = self.cap - self.driver - self.spent - sum(self.held.values()) \
                + self.held.get(worker, 0.0) - left
            if free < need:
                self.reached = True
            else:
                given = min(want, max(need, free / max(1, workers)))
        if left + given > 1e-12:
            self.held[worker] = left + given
        else:
            self.held.pop(worker, None)
        return given, self.reached

    def sync(self, driver: float, reached: bool) -> tuple[float, float, bool]:
        """The driver says what it counts as used itself, and whether its own jobs were
        refused; it hears what the workers spent and hold, and whether one was refused."""
        self.driver = driver
        self.reached = self.reached or reached
        return self.spent, sum(self.held.values()), self.reached


class Mirror:
    """The driver's Spending, which the engine and the driver's own jobs use, following
    the board's account: what the workers spent is in its `spent`, the room they hold in
    its `in_flight` (so the driver's own requests leave it to them), and what the driver
    counts as its own goes to the board."""

    def __init__(self, spending: Spending):
        self.spending = spending
        self.spent = self.held = 0.0  # the workers', as added to `spending`

    def own(self) -> float:
        s = self.spending
        return s.before + (s.spent - self.spent) + (s.in_flight - self.held)

    async def sync(self, board: Any) -> None:
        s = self.spending
        spent, held, reached = await board.sync.remote(self.own(), s.reached)
        s.spent += spent - self.spent
        s.in_flight += held - self.held
        self.spent, self.held = spent, held
        s.reached = s.reached or reached


ASKS = 8  # times a request waits for room; after that, others took it: the cap is near


class Allowance(Spending):
    """A worker's part of the run's spending account (Account), for one job: the Spending
    its model clients reserve from, on the worker's loop. Room comes from the board in
    ROOM_REQUESTS requests' worth, asked for again before it runs out; each call says what
    the requests since the last one used and cost; the room left at the job's end goes
    back. A request that finds no room is refused only when the board has none either."""

    def __init__(self, board: Any, worker: str):
        super().__init__(cap=math.inf)  # the board's account has the cap
        self.board, self.worker = board, worker
        self.room = 0.0  # given by the board, not reserved yet
        self.waiting = 0.0  # what the requests waiting for room need together
        self.used = self.unreported = 0.0  # reservations settled since the last call, cost
        self.asking: asyncio.Future[None] | None = None  # one call to the board at a time

    async def ready(self, estimate: float) -> None:
        self.waiting += estimate
        try:
            for _ in range(ASKS):
                if self.reached or self.room >= estimate:
                    return
                if self.asking is None:
                    self.asking = asyncio.ensure_future(
                        self._call(self.waiting + ROOM_REQUESTS * estimate, estimate))
                await asyncio.shield(self.asking)
        finally:
            self.waiting -= estimate

    def reserve(self, estimate: float) -> float:
        if self.reached or estimate > self.room:
            self.reached = True
            raise CostCap("--max-cost: the run's account on the board has no room left")
        self.room -= estimate
        self.in_flight += estimate
        if self.asking is None and self.room < ROOM_REQUESTS * estimate / 2:  # ahead of need
            self.asking = asyncio.ensure_future(self._call(ROOM_REQUESTS * estimate, 0.0))
        return estimate

    def settle(self, reserved: float, cost: float) -> None:
        super().settle(reserved, cost)
        self.used += reserved
        self.unreported += cost

    def report(self) -> None:
        """What was used and spent since the last call, for the board (every share_s)."""
        if self.asking is None and (self.used or self.unreported):
            self.asking = asyncio.ensure_future(self._call(0.0, 0.0))

    async def close(self) -> None:
        """The job has ended: the last report, and the room left goes back."""
        if self.asking is not None:
            await asyncio.shield(self.asking)
        await self._call(0.0, 0.0, returned=self.room)

    async def _call(self, want: float, need: float, returned: float = 0.0) -> None:
        spent, used = self.unreported, self.used
        self.unreported = self.used = 0.0
        self.room -= returned
        try:
            given, reached = await asyncio.wait_for(self.board.take.remote(
                self.worker, spent, used, returned, want, need), BOARD_TIMEOUT_S)
        except Exception:  # the board is gone or does not answer: no more room is the
            given, reached = 0.0, True  # safe side of the cap (run again to go on)
        finally:
            self.asking = None
        self.room += given
        self.reached = self.reached or reached
