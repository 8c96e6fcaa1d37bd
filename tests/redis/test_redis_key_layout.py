"""Every key a serving app writes on Redis has a row in the "Key layout" table of
docs/redis.md (the table had no row for the workflow gates, the flow-control keys or a
consumer's claim key)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from qtasks import AsyncQueueTasks, QueueConfig, chord, group, hookimpl
from qtasks.messages import Envelope
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

pytestmark = pytest.mark.anyio

DOC = Path(__file__).parents[2] / "docs" / "redis.md"


def documented(prefix: str) -> list[re.Pattern[str]]:
    """The key patterns of the table's first column: a full pattern (``{p:q}:body``), then
    ``/ `:meta``` for one with another last segment, ``(and `:starts`)`` for one with a segment
    more; ``<...>`` and the queue name ``q`` stand for any name, ``p`` for ``prefix``."""
    section = DOC.read_text().split("## Key layout", 1)[1].split("\n## ", 1)[0]
    keys = []
    for row in (line for line in section.splitlines() if line.startswith("| `{")):
        cell, full, since = row.split(" | ")[0], "", 0
        for item in re.finditer(r"`([^`]+)`", cell):
            name = item.group(1)
            if name.startswith("{"):
                full, since = name, item.end()
                keys.append(name)
            elif "(and" in cell[since : item.start()]:
                keys.append(full + name)
            else:
                keys.append(full.rsplit(":", 1)[0] + name)
    return [re.compile("".join(_regex(part, prefix) for part in _PARTS.split(key))) for key in keys]


_PARTS = re.compile(r"(<[^>]+>|^\{p:q\}|^\{p:)")


def _regex(part: str, prefix: str) -> str:
    """The regex of one part of a documented key (see :func:`documented`)."""
    if part.startswith("<"):
        return ".+"
    if part == "{p:q}":
        return re.escape("{" + prefix + ":") + "[^}]+" + re.escape("}")
    if part == "{p:":
        return re.escape("{" + prefix + ":")
    return re.escape(part)


async def test_every_key_written_is_in_the_table(redis_url: str, prefix: str) -> None:
    broker = RedisBroker(redis_url, queue="jobs", prefix=prefix)
    app = AsyncQueueTasks(
        broker=broker,
        storage=RedisStorage(redis_url, prefix=prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=prefix),
        config=QueueConfig(max_deliveries=2),
    )

    rejected = anyio.Event()

    class Rejected:
        @hookimpl
        def qtasks_task_rejected(self) -> None:
            rejected.set()

    app.add_plugin(Rejected())

    @app.task(rate_limit="100/s", concurrency_key="who", max_concurrency=2)
    async def add(a: int, b: int, who: str = "x") -> int:
        return a + b

    @app.task
    async def total(xs: list[int]) -> int:
        return sum(xs)

    @app.task
    async def steps(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async with app:
        await add.add_task(1, 2, timeout=5)
        await add.add_task(1, 2, delay=600, unique_key="held")  # delayed; its key held
        flow = await app.run_workflow(chord(group(add.s(1, 1), add.s(2, 2)), total.s()))
        await flow.wait_result(5)
        await steps.add_task(2, timeout=5)
        await broker.publish(Envelope("poison", b"not a message"))
        with anyio.fail_after(5):
            await rejected.wait()  # dead-lettered (the hook fires after the nack)
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key.decode() async for key in client.scan_iter(match=f"*{prefix}*")]
        finally:
            await client.aclose()
    patterns = documented(prefix)
    assert keys
    assert not [key for key in keys if not any(p.fullmatch(key) for p in patterns)]
