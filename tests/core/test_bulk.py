"""Bulk enqueue (``qtasks.bulk``) with third-party components and under cancellation."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import pytest

from qtasks import AsyncQueueTasks, MemoryBroker
from qtasks import bulk as bulk_module
from qtasks.components import Storage
from qtasks.messages import Envelope
from qtasks.record import TaskRecord

pytestmark = pytest.mark.anyio


class OlderBulkBroker(MemoryBroker):
    """A third-party broker written to ``BulkPublishNew`` before ``after`` was added to it:
    ``publish_new_many(storage, tasks)``. Each call notes how many records the storage held
    when it came, and how many tasks it got."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    async def publish_new_many(  # type: ignore[override]  # the older signature: the point
        self, storage: Storage, tasks: Sequence[tuple[TaskRecord, Envelope]]
    ) -> None:
        held = sum((await storage.stats()).values())
        self.calls.append((held, len(tasks)))
        for record, envelope in tasks:
            await self.publish_new(envelope, storage, record)


def app_on(broker: MemoryBroker) -> AsyncQueueTasks:
    app = AsyncQueueTasks("bulk", broker=broker)

    @app.task
    def double(x: int) -> int:
        return 2 * x

    return app


async def test_a_broker_with_the_older_publish_new_many_still_adds_tasks() -> None:
    """``after`` came into BulkPublishNew.publish_new_many later: a broker written before
    got it as a keyword anyway, and ``add_tasks`` raised TypeError. The core awaits ``after``
    itself for it (each batch's call comes once the batch before is stored), then calls the
    older signature."""
    broker = OlderBulkBroker()
    app = app_on(broker)
    records = await app.tasks["double"].add_tasks(range(2500))
    assert app.enqueue_path == "shared"  # the path that passes ``after`` on asyncio
    assert broker.calls == [(0, 1000), (1000, 1000), (2000, 500)]
    assert await app.storage.stats() == {"new": 2500}
    async with app:
        assert (await records[-1].wait_result(5)).returning == 4998
    await app.aclose()


async def test_the_core_awaits_after_before_an_older_publish_new_many() -> None:
    """Once, before the broker's call; when ``after`` raises, the broker is not called."""
    broker = OlderBulkBroker()
    app = app_on(broker)
    await app.start()
    try:
        tasks = [await _prepared(app, x) for x in range(3)]
        events: list[str] = []

        async def after() -> None:
            events.append(f"after, {sum((await app.storage.stats()).values())} stored")

        await bulk_module.store_and_publish_many(app, tasks, after)
        assert events == ["after, 0 stored"]
        assert broker.calls == [(0, 3)]

        class Refused(Exception):
            pass

        async def refuses() -> None:
            raise Refused

        with pytest.raises(Refused):
            await bulk_module.store_and_publish_many(app, [await _prepared(app, 9)], refuses)
        assert broker.calls == [(0, 3)]
        assert await app.storage.stats() == {"new": 3}
    finally:
        await app.aclose()


async def test_whether_publish_new_many_takes_after_is_read_once_per_broker_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path has a budget: the signature is read at the first batch of a class, not
    at every batch. A ``**kwargs`` is not taken for ``after`` (it may drop it unawaited)."""

    class Older(OlderBulkBroker):
        pass

    class Forwarding(MemoryBroker):
        async def publish_new_many(
            self, storage: Storage, tasks: Sequence[tuple[TaskRecord, Envelope]], **kw: Any
        ) -> None:
            assert "after" not in kw
            await super().publish_new_many(storage, tasks, **kw)

    class Newer(MemoryBroker):
        pass

    read: list[type] = []
    signature = inspect.signature

    def counted(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
        if isinstance(getattr(obj, "__self__", None), MemoryBroker):
            read.append(type(obj.__self__))
        return signature(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counted)
    for kind in (Older, Older, Forwarding, Newer, Newer):
        app = app_on(kind())
        await app.tasks["double"].add_tasks(range(2100))  # three batches each
        assert await app.storage.stats() == {"new": 2100}
        await app.aclose()
    assert read == [Older, Forwarding, Newer]
    assert [bulk_module._TAKES_AFTER[kind] for kind in (Older, Forwarding, Newer)] == [
        False,
        False,
        True,
    ]


async def _prepared(app: AsyncQueueTasks, x: int) -> tuple[TaskRecord, Envelope]:
    (pair,) = await bulk_module.prepare_all(app, [app.tasks["double"].s(x)])
    return pair
