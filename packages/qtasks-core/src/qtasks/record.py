"""The stored task record (:class:`Task`) and its statuses."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from qtasks.errors import SerializationError

if TYPE_CHECKING:
    from qtasks.messages import Message


class TaskStatus(StrEnum):
    """Where a task is in its life. ``success``, ``error``, ``cancel`` and ``expired`` (not
    started before its ``expires`` time, see :mod:`qtasks.flow`) are final."""

    NEW = "new"
    PROCESS = "process"
    SUCCESS = "success"
    ERROR = "error"
    CANCEL = "cancel"
    RETRY = "retry"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        """True for the statuses a task never leaves."""
        return self in _FINAL


_FINAL = frozenset({TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCEL, TaskStatus.EXPIRED})


@dataclass(slots=True)
class TaskRecord:
    """A task's stored record, as kept by a Storage.

    ``returning`` holds the (encoded) result, ``traceback`` the last error's traceback, ``error``
    a one-line description of it. ``attempt`` counts attempts (``attempt - 1`` retries made): a
    run lost with its worker is delivered again and runs as the same attempt (the delivery
    limit counts those; an :class:`~qtasks.components.AttemptLog` storage keeps each such run);
    ``retries`` is a field of the record's layout that qtasks' worker does not keep (it
    stays 0): read ``attempt``. ``token`` fences writes: only the delivery that
    holds it may finish the record.
    """

    uuid: str
    task_name: str
    status: TaskStatus = TaskStatus.NEW
    priority: int = 0
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    returning: Any = None
    traceback: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    attempt: int = 0
    retries: int = 0
    eta: float | None = None
    parent_uuid: str | None = None
    cancel_reason: str | None = None
    worker: str | None = None
    token: str | None = None
    steps: int = 0
    """How many generator steps have been stored for this task."""
    started_at: float | None = None
    """When the record's run began (its ``updated_at`` as begun): of the run under way for a
    ``process`` record (not the earlier run a retry ended); of the run that ended it for a
    record the worker settles, and for one dead-lettered past its delivery limit whose last
    run was lost with its worker (status ``process`` until then); ``None`` before any run.
    Queue wait and run time derive from it."""
    workflow: str | None = None
    """The id of the workflow this task is a member of (see :mod:`qtasks.workflows`)."""

    @property
    def name(self) -> str:
        """The task's name, :attr:`task_name`: what QTasks 1.7 called it on the record its
        plugins and event handlers got as ``task_broker`` (``task_broker.name``, as its own
        retry plugin read it). Not a field: not stored, not in :meth:`to_dict`."""
        return self.task_name

    def to_dict(self) -> dict[str, Any]:
        """A JSON-like dict of every record field (status as its string); a bound task's
        client is not part of it."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in _RECORD_FIELDS}
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskRecord:
        """Rebuild a record from :meth:`to_dict` output; unknown keys are ignored."""
        try:
            known = {f.name for f in fields(cls)}
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["status"] = TaskStatus(kwargs.get("status", "new"))
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"bad task record: {exc}") from exc

    def copy(self) -> TaskRecord:
        """A copy whose ``args``/``kwargs`` containers are copied too (hot path: explicit)."""
        return TaskRecord(*self.values())

    def packed(self) -> tuple[Any, ...]:
        """Every field in declaration order as plain values (``args`` a tuple, ``kwargs`` a
        tuple of pairs, ``status`` its string): what a storage keeps of a record it will not
        change, which Python's cycle collector stops tracking once every value is atomic.
        :meth:`unpacked` rebuilds it.

        It lists the fields as :meth:`values` does, written out rather than derived (a
        getter and slices cost twice as much on this path); the round trip is pinned by
        ``tests/core/test_memory_records.py``."""
        return (
            self.uuid,
            self.task_name,
            self.status.value,
            self.priority,
            tuple(self.args),
            tuple(self.kwargs.items()),  # a dict would keep the tuple tracked
            self.returning,
            self.traceback,
            self.error,
            self.created_at,
            self.updated_at,
            self.attempt,
            self.retries,
            self.eta,
            self.parent_uuid,
            self.cancel_reason,
            self.worker,
            self.token,
            self.steps,
            self.started_at,
            self.workflow,
        )

    @classmethod
    def unpacked(cls, values: tuple[Any, ...]) -> TaskRecord:
        """A new record from :meth:`packed` output (its containers copied)."""
        return cls(
            values[0],
            values[1],
            _STATUSES[values[2]],
            values[3],
            list(values[4]),
            dict(values[5]),
            *values[6:],
        )

    def values(self) -> tuple[Any, ...]:
        """Every field in declaration order (containers copied), to build a copy or subclass."""
        return (
            self.uuid,
            self.task_name,
            self.status,
            self.priority,
            list(self.args),
            dict(self.kwargs),
            self.returning,
            self.traceback,
            self.error,
            self.created_at,
            self.updated_at,
            self.attempt,
            self.retries,
            self.eta,
            self.parent_uuid,
            self.cancel_reason,
            self.worker,
            self.token,
            self.steps,
            self.started_at,
            self.workflow,
        )


_RECORD_FIELDS = fields(TaskRecord)
_STATUSES = {status.value: status for status in TaskStatus}


def record_of(message: Message) -> TaskRecord:
    """A record built from the message alone (when the producer stored none)."""
    return TaskRecord(
        uuid=message.uuid,
        task_name=message.task_name,
        priority=message.priority,
        args=message.args,
        kwargs=message.kwargs,
        created_at=message.created_at,
        parent_uuid=message.headers.get("parent_uuid"),
    )
