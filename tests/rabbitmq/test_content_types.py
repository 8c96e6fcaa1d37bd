"""What a worker does with an AMQP message's content type: nothing; the body is read as JSON.

The plan's B2 asks for a pickle content type to be refused. qtasks reads no content type: it
never unpickles, so a body is JSON or undecodable whatever its label says.
"""

from __future__ import annotations

import pickle
from typing import Any

import aio_pika
import pytest

from qtasks import AsyncQueueTasks, MemoryStorage, TaskStatus
from qtasks.messages import Message
from qtasks_testing.contract.bad_input import Outcomes

from .conftest import URL, BrokerFactory

pytestmark = pytest.mark.anyio

PICKLE = "application/x-python-serialize"
"""Celery's (kombu's) content type for pickle."""


async def test_a_pickle_content_type_is_never_unpickled(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pickled message labelled as pickle is dead-lettered as undecodable on its first
    delivery, and ``pickle.loads`` is never called; a JSON message labelled as pickle (or
    anything else) runs, since the label is not read."""
    unpickled: list[Any] = []

    def refused(*args: Any, **kwargs: Any) -> Any:
        unpickled.append(args)
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr(pickle, "loads", refused)
    broker = await make_broker()
    app = AsyncQueueTasks("content-types", broker=broker, storage=MemoryStorage())

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    seen = Outcomes()
    app.add_plugin(seen)
    wire = Message(uuid="labelled-json", task_name="add", args=[2, 3]).to_wire()
    pickled = pickle.dumps({**wire, "uuid": "pickled"})
    async with app:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            for id, body, content_type in (
                ("pickled", pickled, PICKLE),
                ("labelled-json", app.codec.serializer.dumps(wire), PICKLE),
            ):
                await channel.default_exchange.publish(
                    aio_pika.Message(body, message_id=id, content_type=content_type),
                    broker.topology.queue,
                )
        await seen.wait({"pickled", "labelled-json"}, timeout=10)
        ran = await app.wait("labelled-json", timeout=10)
        letters = {d.id: d for d in await app.dead_letters()}
    assert (ran.status, ran.returning) == (TaskStatus.SUCCESS, 5)
    assert seen.rejected["pickled"].startswith("undecodable message: cannot decode JSON message")
    assert (letters["pickled"].body, letters["pickled"].deliveries) == (pickled, 1)
    assert unpickled == []
