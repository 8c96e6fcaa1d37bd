"""An app whose Redis broker dead-letters on its own and whose Redis storage is on another
server (the worker ends those records from the broker's notices: ``BuryNotice``), for
tests/redis/test_redis_pending_notices.py, in process or as a worker subprocess.

Run as ``python bury_worker.py <broker url> <storage url> <prefix> <uuid>`` to serve until
killed, with a storage that, asked for the record of ``<uuid>``, prints ``reading <uuid>``
and blocks for ever: the worker is then inside ``buried()`` for that message, after its
claim's reply and before the record is ended.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.record import TaskRecord
from qtasks_redis import RedisBroker, RedisStorage

LEASE = 2.0


def build(
    broker_url: str,
    storage_url: str,
    prefix: str,
    storage: RedisStorage | None = None,
    *,
    lane: bool = True,
    broker: type[RedisBroker] = RedisBroker,
    **config: Any,
) -> AsyncQueueTasks:
    """The app (``max_deliveries=1``: a message whose one delivery was lost is dead-lettered
    by the next claim); ``storage``, else a :class:`RedisStorage` at ``storage_url``;
    ``lane``: whether the broker talks through its fast lane (else through redis-py, as on
    TLS or Redis Cluster); ``broker``: the broker's class; ``config``: more settings of its
    :class:`QueueConfig`."""
    app = AsyncQueueTasks(
        "bury",
        broker=broker(broker_url, prefix=prefix, queue="q", options={"redis_fast_lane": lane}),
        storage=storage or RedisStorage(storage_url, prefix=prefix),
        config=QueueConfig(
            lease=LEASE, max_deliveries=1, shutdown_grace=1.0, plugins_disabled=["*"], **config
        ),
    )

    @app.task
    async def noop(i: int) -> int:
        return i

    return app


class Stuck(RedisStorage):
    """Reading the record of ``stuck`` says so on stdout, then blocks for ever."""

    def __init__(self, url: str, *, prefix: str, stuck: str) -> None:
        super().__init__(url, prefix=prefix)
        self.stuck = stuck

    async def get(self, uuid: str) -> TaskRecord | None:
        if uuid == self.stuck:
            print(f"reading {uuid}", flush=True)
            await anyio.sleep_forever()
        return await super().get(uuid)


def main() -> None:
    broker_url, storage_url, prefix, stuck = sys.argv[1:5]
    app = build(broker_url, storage_url, prefix, Stuck(storage_url, prefix=prefix, stuck=stuck))
    app.run_forever()


if __name__ == "__main__":
    main()
