"""The in-memory storage's records: final ones kept packed, out of the cycle collector's way.

A storage keeps every final record for ``result_ttl`` (a day by default): hundreds of
thousands of objects that Python's cycle collector would walk at each full collection, which
cost the in-memory worker about 8 % of its time at 20,000 stored results. A final record is
therefore kept as :meth:`~qtasks.record.TaskRecord.packed` values (a tuple the collector stops
tracking once its values are atomic) and rebuilt when read; a record still in flight stays a
:class:`~qtasks.record.TaskRecord` that the storage changes in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from qtasks.messages import json_decoder, strict_json_encoder
from qtasks.record import _STATUSES, TaskRecord, TaskStatus

_FIELD = {f.name: i for i, f in enumerate(fields(TaskRecord))}
"""Where :meth:`~qtasks.record.TaskRecord.packed` puts each field (declaration order)."""
_NAME, _STATUS, _UPDATED, _PARENT, _RETURNING = (
    _FIELD[name] for name in ("task_name", "status", "updated_at", "parent_uuid", "returning")
)

_encode, _decode = strict_json_encoder(), json_decoder()
_AS_IS = frozenset({type(None), str, int, float, bool})
"""Types that JSON gives back as they are (a float JSON refuses, NaN, stays as it is too)."""


def as_stored(value: Any) -> Any:
    """``value`` as a storage that keeps JSON (Redis) gives it back: a tuple becomes a list,
    a dict's int keys strings, and it is a new object, not the one the task still holds.
    Results and steps read from the in-memory storage are then what they are in production,
    so a test that passes in memory does not fail on Redis. A value JSON cannot hold (an app
    serializer that can) is kept as it is."""
    if type(value) in _AS_IS:
        return value
    try:
        return _decode(_encode(value))
    except (TypeError, ValueError, RecursionError):
        return value


class Records:
    """Records by uuid, a dict to the storage: :meth:`get` of a final record returns a new
    object each time, so a change to it is kept only once it is stored again (``[uuid] =``).
    """

    __slots__ = ("_final", "_live")

    def __init__(self) -> None:
        self._live: dict[str, TaskRecord] = {}
        self._final: dict[str, tuple[Any, ...]] = {}

    def get(self, uuid: str) -> TaskRecord | None:
        """The record of ``uuid``: the stored object while it is in flight, a new one once
        final."""
        record = self._live.get(uuid)
        if record is not None:
            return record
        values = self._final.get(uuid)
        return None if values is None else TaskRecord.unpacked(values)

    def copy_of(self, uuid: str) -> TaskRecord | None:
        """A record of ``uuid`` the caller owns (a copy, or a final one rebuilt)."""
        record = self._live.get(uuid)
        if record is not None:
            return record.copy()
        values = self._final.get(uuid)
        return None if values is None else TaskRecord.unpacked(values)

    def final(self, uuid: str) -> TaskRecord | None:
        """A record of ``uuid`` the caller owns if it is final, else ``None``."""
        values = self._final.get(uuid)
        if values is not None:
            return TaskRecord.unpacked(values)
        record = self._live.get(uuid)
        return record.copy() if record is not None and record.status.final else None

    def facts(self, uuid: str) -> tuple[TaskStatus, str, str | None, float] | None:
        """What the indexes and the expiry read of ``uuid``'s record, without rebuilding it:
        its status, task name, parent uuid and last update time."""
        record = self._live.get(uuid)
        if record is not None:
            return record.status, record.task_name, record.parent_uuid, record.updated_at
        values = self._final.get(uuid)
        if values is None:
            return None
        return _STATUSES[values[_STATUS]], values[_NAME], values[_PARENT], values[_UPDATED]

    def statuses(self) -> Iterator[TaskStatus]:
        """The status of every record."""
        for record in self._live.values():
            yield record.status
        for values in self._final.values():
            yield _STATUSES[values[_STATUS]]

    def __setitem__(self, uuid: str, record: TaskRecord) -> None:
        """Store ``record`` (owned from now on while in flight; packed once final)."""
        if record.status.final:
            values = record.packed()
            if type(values[_RETURNING]) not in _AS_IS:
                values = (
                    *values[:_RETURNING],
                    as_stored(values[_RETURNING]),
                    *values[_RETURNING + 1 :],
                )
            self._final[uuid] = values
            self._live.pop(uuid, None)
        else:
            self._live[uuid] = record
            self._final.pop(uuid, None)

    def __delitem__(self, uuid: str) -> None:
        if self._live.pop(uuid, None) is None:
            del self._final[uuid]

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._live or uuid in self._final

    def __len__(self) -> int:
        return len(self._live) + len(self._final)

    def __iter__(self) -> Iterator[str]:
        yield from self._live
        yield from self._final

    def values(self) -> Iterator[TaskRecord]:
        """Every record (final ones rebuilt)."""
        yield from self._live.values()
        for values in self._final.values():
            yield TaskRecord.unpacked(values)

    def items(self) -> Iterator[tuple[str, TaskRecord]]:
        """Every (uuid, record) pair (final records rebuilt)."""
        yield from self._live.items()
        for uuid, values in self._final.items():
            yield uuid, TaskRecord.unpacked(values)

    def clear(self) -> None:
        self._live.clear()
        self._final.clear()
