"""The entries of several storage index keys (ZSETs uuid -> ms), merged newest first: what
:meth:`RedisStorage.query <qtasks_redis.storage.RedisStorage.query>` scans.

Each key is read ``batch`` entries at a time and what was read but not given yet is kept for
the next call, so a scan of ``n`` entries over ``k`` keys reads about ``n + k * batch`` index
entries (reading ``batch`` from every key for each ``batch`` given read ``k * n``).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from qtasks.components import RecordQuery
from qtasks_redis.connection import Client

Entry = tuple[float, str]
"""An index entry: its score (ms) and uuid. Entries are ordered newest first: by score, then
by uuid, both descending (as ``ZREVRANGEBYSCORE`` gives ties)."""


class IndexUnion:
    """The entries of ``keys`` within ``query``'s time range that come after the position
    ``after`` (``None``: from the newest), newest first, a part at a time (:meth:`take`)."""

    def __init__(
        self,
        client: Client,
        guard: Callable[[Awaitable[Any]], Awaitable[Any]],
        keys: list[str],
        query: RecordQuery,
        after: Entry | None,
        batch: int,
    ) -> None:
        self._client = client
        self._guard = guard
        self._batch = batch
        self._high = math.inf if query.until is None else query.until * 1000
        self._low = "-inf" if query.since is None else repr(query.since * 1000)
        self._since = None if query.since is None else query.since * 1000
        self._read: dict[str, list[Entry]] = {key: [] for key in keys}
        """Per key, what was read and not given yet, newest first."""
        self._at: dict[str, Entry | None] = dict.fromkeys(keys, after)
        """Per key, the last entry read from it: the next read starts after it."""
        self._open = set(keys)
        """The keys that may hold entries not read yet."""

    async def take(self, most: int) -> list[tuple[float, str, str]]:
        """The next entries ``(score, uuid, key)``, newest first: at least one unless none is
        left, and at most ``most``."""
        await self._fill([key for key in self._open if not self._read[key]])
        # An entry can be given once no key holds an unread entry before it: the unread
        # entries of an open key come after the last one read from it.
        ends = [self._read[key][-1] for key in self._open if self._read[key]]
        floor = max(ends) if ends else None
        ready: list[tuple[float, str, str]] = []
        for key, read in self._read.items():
            if not read:
                continue
            count = len(read)
            if floor is not None and read[-1] < floor:
                count = 0
                while read[count] >= floor:
                    count += 1
            ready.extend([(score, uuid, key) for score, uuid in read[:count]])
            del read[:count]
        ready.sort(reverse=True)
        back: dict[str, list[Entry]] = {}
        for score, uuid, key in ready[most:]:  # put back, in order
            back.setdefault(key, []).append((score, uuid))
        for key, entries in back.items():
            self._read[key][:0] = entries
        return ready[:most]

    async def _fill(self, keys: list[str]) -> None:
        """Read the next batch of each of ``keys`` (one round trip)."""
        if not keys:
            return
        high, since = self._high, self._since
        pipe = self._client.pipeline(transaction=False)
        ties: dict[str, bool] = {}
        for key in keys:
            at = self._at[key]
            top = "+inf" if high == math.inf else f"({high!r}"
            # The entries of the last score read that come after it (ties, by uuid).
            ties[key] = at is not None and at[0] < high and (since is None or at[0] >= since)
            if at is not None and at[0] <= high:
                top = f"({at[0]!r}"
            # Raw commands: redis-py's parsing of scores cost more than the rest of a scan.
            if ties[key]:
                assert at is not None
                pipe.execute_command("ZRANGEBYSCORE", key, at[0], at[0], "WITHSCORES")
            pipe.execute_command(
                "ZREVRANGEBYSCORE", key, top, self._low, "LIMIT", 0, self._batch, "WITHSCORES"
            )
        replies: list[Any] = await self._guard(pipe.execute())
        position = 0
        for key in keys:
            read = self._read[key]
            at = self._at[key]
            if ties[key]:
                assert at is not None
                same = _entries(replies[position])
                read.extend(sorted((e for e in same if e[1] < at[1]), reverse=True))
                position += 1
            ranged = _entries(replies[position])
            position += 1
            read.extend(ranged)
            if len(ranged) < self._batch:
                self._open.discard(key)
            if read:
                self._at[key] = read[-1]


def _entries(reply: list[Any]) -> list[Entry]:
    """The entries of a raw ``WITHSCORES`` reply: ``[member, score]`` pairs (RESP3) or a
    flat list alternating them (RESP2, scores as text)."""
    if reply and isinstance(reply[0], list | tuple):
        return [(float(score), member.decode()) for member, score in reply]
    return [(float(reply[i + 1]), reply[i].decode()) for i in range(0, len(reply), 2)]
