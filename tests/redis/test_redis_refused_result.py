"""A result (or an error) over the server's ``proto-max-bulk-len`` (a private redis-server set
to 1 MB): the server refuses it with an error reply, which no retry heals. The task ends
``error`` with that reason after one run, and the tasks settled in the same call, or meanwhile,
are stored once each: nothing runs again, nothing is dead-lettered
(:func:`refused_scenarios.refused_result`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from redis_procs import RedisServer, start_server
from refused_scenarios import refused_result, refused_retry

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.components import Delivery, Storage
from qtasks.record import TaskRecord
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio

BIG = 2_000_000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_server(tmp_path, fsync="no", extra=["--proto-max-bulk-len", "1mb"])
    yield started
    started.close()


class HeldBroker(RedisBroker):
    """A Redis broker whose batched settle calls wait for ``gate`` when it is set, the
    finals of each recorded (see :class:`refused_scenarios.HeldBroker`)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate: anyio.Event | None = None
        self.entered = anyio.Event()
        self.batches: list[list[str]] = []

    async def ack_finals(
        self,
        storage: Storage,
        finals: Sequence[tuple[Delivery, TaskRecord]],
        *,
        enqueued: list[str] | None = None,
    ) -> list[bool]:
        self.batches.append([record.uuid for _, record in finals])
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return await super().ack_finals(storage, finals, enqueued=enqueued)


def app_for(broker: RedisBroker, storage: RedisStorage, url: str) -> AsyncQueueTasks:
    config = QueueConfig(
        max_tasks_process=6,
        lease=2.0,
        max_deliveries=2,
        retry_backoff=0.05,
        shutdown_grace=1.0,
        plugins_disabled=["*"],
    )
    return AsyncQueueTasks(
        broker=broker,
        storage=storage,
        global_config=RedisGlobalConfig(url, prefix=storage.prefix),
        config=config,
    )


async def test_a_refused_result_fails_only_its_own_task_in_a_batched_settle(
    server: RedisServer,
) -> None:
    """Broker and storage on the server: the results go in one ``ack_finals`` call, which
    the server refuses whole; then each is stored alone."""
    broker = HeldBroker(server.url)
    app = app_for(broker, RedisStorage(server.url), server.url)
    await refused_result(app, broker, size=BIG, refusal="ResponseError: .+")


async def test_a_refused_result_ends_its_task_with_the_reason_when_settled_alone(
    server: RedisServer, redis_url: str, prefix: str
) -> None:
    """The broker on the shared server, the storage on the private one: each task's runner
    stores its record itself."""
    broker = RedisBroker(redis_url, prefix=prefix)
    app = app_for(broker, RedisStorage(server.url, prefix=prefix), server.url)
    assert not broker.shares_server_with(app.storage)
    await refused_result(app, None, size=BIG, refusal="ResponseError: .+")


async def test_a_refused_retry_record_ends_its_task_without_retrying_it(
    server: RedisServer,
) -> None:
    """See :func:`refused_scenarios.refused_retry`."""
    app = app_for(RedisBroker(server.url), RedisStorage(server.url), server.url)
    await refused_retry(app, size=BIG, refusal="ResponseError: .+")
