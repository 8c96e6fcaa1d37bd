"""Pydantic models as task parameters and results (qtasks-core[pydantic])."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pydantic
import pytest

from qtasks import AsyncQueueTasks, QueueTasks
from qtasks.errors import TaskArgumentsError
from qtasks.record import TaskStatus

WAIT = 10
pytestmark = pytest.mark.anyio


class Item(pydantic.BaseModel):
    name: str
    value: int


class Receipt(pydantic.BaseModel):
    text: str
    total: int


async def test_every_call_form_of_a_model_parameter() -> None:
    app = AsyncQueueTasks()

    @app.task(tags=["example"], decode=json.dumps)
    async def example_pydantic(item: Item) -> str:
        assert isinstance(item, Item)
        return f"Hello, {item.name}! {item.value}"

    with anyio.fail_after(WAIT):
        async with app:
            forms = [
                example_pydantic.add_task("Test", value=42, timeout=WAIT),
                example_pydantic.add_task("Test", 42, timeout=WAIT),
                example_pydantic.add_task(name="Test", value=42, timeout=WAIT),
                example_pydantic.add_task(item=Item(name="Test", value=42), timeout=WAIT),
                example_pydantic.add_task({"name": "Test", "value": "42"}, timeout=WAIT),
            ]
            for form in forms:
                record = await form
                assert record.status is TaskStatus.SUCCESS, record.error
                assert record.returning == '"Hello, Test! 42"'
            # What travels is the model's JSON dict, whichever form the caller used.
            stored = await app.get((await example_pydantic.add_task("Test", 1)).uuid)
            assert stored is not None and stored.args == [{"name": "Test", "value": 1}]


async def test_invalid_input_is_refused_at_enqueue() -> None:
    app = AsyncQueueTasks()

    @app.task
    async def take(item: Item, times: int = 1) -> int:
        return item.value * times

    with pytest.raises(TaskArgumentsError, match=r"'item' \(Item\) is invalid: value"):
        await app.add_task("take", name="x", value="not a number")
    with pytest.raises(TaskArgumentsError, match="take"):
        await app.add_task("take", name="x", value=1, colour="red")
    with anyio.fail_after(WAIT):
        async with app:
            record = await app.add_task("take", "x", 2, times=3, timeout=WAIT)
    assert record.returning == 6
    await app.aclose()


async def test_invalid_input_from_a_producer_without_the_task_is_rejected_at_the_worker() -> None:
    worker = AsyncQueueTasks()

    @worker.task
    async def take(item: Item) -> int:
        return item.value

    with anyio.fail_after(WAIT):
        async with worker:
            final = await (await sent_without_the_task(worker, "take")).wait_result(WAIT)
    assert final.status is TaskStatus.ERROR
    assert "wrong arguments" in (final.error or "") and "value" in (final.error or "")


async def sent_without_the_task(worker: AsyncQueueTasks, name: str) -> Any:
    """``name`` sent ``name="x", value="nope"``, which its model refuses, as a producer
    without the task would send it (the worker's own enqueue path would refuse it)."""
    task = worker.tasks.pop(name)
    try:
        return await worker.add_task(name, name="x", value="nope")
    finally:
        worker.tasks[name] = task


def test_a_model_result_is_stored_as_json_and_returned_as_the_model() -> None:
    app = QueueTasks()

    @app.task
    def receipt(item: Item) -> Receipt:
        return Receipt(text=item.name, total=item.value * 2)

    @app.task
    def untyped(item: Item):  # type: ignore[no-untyped-def]
        return Receipt(text=item.name, total=0)

    try:
        with app:
            record = app.add_task("receipt", name="a", value=2, timeout=WAIT)
            assert record.returning == Receipt(text="a", total=4)
            again = app.get(record.uuid)
            assert again is not None and again.returning == Receipt(text="a", total=4)
            plain = app.add_task("untyped", name="b", value=1, timeout=WAIT)
            assert plain.returning == {"text": "b", "total": 0}
    finally:
        app.close()


@pytest.mark.redis
def test_models_over_redis(redis_url: str, prefix: str) -> None:
    from qtasks import QueueConfig

    app = QueueTasks(broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": prefix}))

    @app.task
    def receipt(item: Item) -> Receipt:
        return Receipt(text=item.name, total=item.value)

    try:
        with app:
            record = app.add_task("receipt", "r", 7, timeout=WAIT)
            assert record.returning == Receipt(text="r", total=7)
    finally:
        app.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_value_its_model_refuses_is_dead_lettered_once_even_with_retries(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """The plan's B4 for a declared type: a task with ``retry=3`` and a pydantic-model
    parameter, sent a value the model refuses by a producer without the task: its record ends
    ``error`` naming the task and the parameter, after one delivery, with no retry and no
    run (on Redis too, where the claim begins the stored record)."""
    from qtasks_redis import RedisBroker, RedisStorage

    if backend == "redis":
        url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("prefix")
        worker = AsyncQueueTasks(
            broker=RedisBroker(url, prefix=prefix, queue="q"),
            storage=RedisStorage(url, prefix=prefix),
        )
    else:
        worker = AsyncQueueTasks()
    runs: list[Item] = []

    @worker.task(retry=3, retry_backoff=0)
    async def take(item: Item) -> int:
        runs.append(item)
        return item.value

    with anyio.fail_after(WAIT):
        async with worker:
            record = await sent_without_the_task(worker, "take")
            final = await record.wait_result(timeout=WAIT)
            letters = [d for d in await worker.dead_letters() if d.id == record.uuid]
    assert final.status is TaskStatus.ERROR
    assert (final.error or "").startswith(
        "wrong arguments: task 'take': parameter 'item' (Item) is invalid: value: "
    )
    assert [d.deliveries for d in letters] == [1]
    assert runs == []
