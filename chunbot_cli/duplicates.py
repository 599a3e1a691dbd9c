"""Duplicate record ids in a run's input, named in one note of the run summary.

The rule: records that share an id are kept, each its own record, processed and written
like any other; nothing is merged or dropped. Ids compare as text (`str(_id)`), as
`chunbot trace` and `rerun --ids` address them: `trace ID` shows the first record with
the id, `rerun --ids` redoes every record with it. The note counts the records that share
an id with an earlier one (in input order) and names the first few.

Cost, for inputs of millions of records: the engine hands `add` each first-stage shard's
ids once; `add` computes the shard's sorted CRC-32s, which are also its id index
(store.Workdir.write_id_index, so they are computed once), finds exact duplicates within
the shard (only when two CRCs are equal), keeps the CRC array (4 bytes a record) and
appends the ids as one JSON array to an unlinked temp file. `note` finds the CRCs held by
more than one shard, partition by partition (a slice of CRC space at a time, in sets),
and confirms those candidates exactly by reading back only the shards that hold them.
Only the shards one run computes are seen: a resumed run notes what it read anew.
"""

from __future__ import annotations

import tempfile
import zlib
from array import array
from bisect import bisect_left
from typing import IO, Any

import orjson

EXAMPLES = 3              # ids named in the note
PARTITION = 1 << 18       # CRCs put in one set at a time when looking across shards


class DuplicateIds:
    """The ids of a run's first-stage shards, as they are committed (any order)."""

    def __init__(self) -> None:
        self.crcs: dict[int, array] = {}                 # shard → its sorted CRC-32s
        self.blocks: dict[int, tuple[int, int]] = {}     # shard → (offset, size) in spill
        self.within = 0                                  # extras found inside one shard
        self.first: list[tuple[int, int, str]] = []      # (shard, position, id) examples
        self._spill: IO[bytes] | None = None
        self._size = 0

    def add(self, shard: int, ids: list[Any]) -> array:
        """Take a shard's ids (in record order); returns its id index, the sorted CRC-32s."""
        texts = [str(i) for i in ids]
        crc32 = zlib.crc32
        crcs = array("I", sorted([crc32(t.encode()) for t in texts]))
        if len(set(crcs)) < len(crcs):  # equal CRCs: maybe equal ids (checked exactly)
            self._within(shard, texts)
        self.crcs[shard] = crcs
        self._store(shard, orjson.dumps(texts))
        return crcs

    def _within(self, shard: int, texts: list[str]) -> None:
        seen: set[str] = set()
        examples = 0
        for position, text in enumerate(texts):
            if text in seen:
                self.within += 1
                if examples < EXAMPLES:
                    examples += 1
                    self.first.append((shard, position, text))
            else:
                seen.add(text)

    def _store(self, shard: int, block: bytes) -> None:
        """The shard's ids on disk, not in memory: read back only if a CRC says so."""
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(prefix="chunbot-ids-")
        self._spill.write(block)
        self.blocks[shard] = (self._size, len(block))
        self._size += len(block)

    def note(self) -> str | None:
        """The summary's line about duplicate ids, or None when there are none; ends the
        collection (the temp file is closed)."""
        try:
            candidates, holders = self._across()
            across, more = self._confirm(candidates, holders) if candidates else (0, [])
        finally:
            self.close()
        count = self.within + across
        if not count:
            return None
        shown = ", ".join(text if len(text) <= 24 else text[:23] + "…"
                          for _, _, text in sorted(self.first + more)[:EXAMPLES])
        plural = "s share an id" if count != 1 else " shares an id"
        return (f"input: {count:,} record{plural} with an earlier one (first: {shown}); "
                "they are kept, each its own record; trace shows the first, rerun --ids "
                "redoes them all")

    def _across(self) -> tuple[set[int], set[int]]:
        """CRCs held by more than one shard, and the shards holding them."""
        total = sum(len(c) for c in self.crcs.values())
        parts = max(1, -(-total // PARTITION))
        step = -(-(1 << 32) // parts)
        shards = sorted(self.crcs)
        bounds = {s: [bisect_left(self.crcs[s], p * step) for p in range(parts)]
                  + [len(self.crcs[s])] for s in shards}
        candidates: set[int] = set()
        holders: set[int] = set()
        for p in range(parts):
            seen: set[int] = set()
            slices = []
            for s in shards:
                lo, hi = bounds[s][p], bounds[s][p + 1]
                if lo == hi:
                    continue
                values = set(self.crcs[s][lo:hi])
                candidates |= seen & values
                seen |= values
                slices.append((s, values))
            if candidates:
                holders.update(s for s, values in slices if not candidates.isdisjoint(values))
        return candidates, holders

    def _confirm(self, candidates: set[int],
                 holders: set[int]) -> tuple[int, list[tuple[int, int, str]]]:
        """Read back the ids of the shards holding candidate CRCs: the records that share
        an id with one of an earlier shard (a shard's own repeats are counted already)."""
        assert self._spill is not None
        crc32 = zlib.crc32
        where: dict[str, list[tuple[int, int]]] = {}  # id → (shard, first position there)
        for shard in sorted(holders):
            offset, size = self.blocks[shard]
            self._spill.seek(offset)
            found: set[str] = set()
            for position, text in enumerate(orjson.loads(self._spill.read(size))):
                if text not in found and crc32(text.encode()) in candidates:
                    found.add(text)
                    where.setdefault(text, []).append((shard, position))
        count, examples = 0, []
        for text, places in where.items():
            for shard, position in places[1:]:  # the shards after the first holding it
                count += 1
                examples.append((shard, position, text))
        return count, sorted(examples)[:EXAMPLES]

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self.crcs.clear()
        self.blocks.clear()
