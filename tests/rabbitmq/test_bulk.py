"""Bulk publishing on RabbitMQ (``publish_many``, ``add_tasks``): a batch's frames go out in one
write and its confirms are awaited together; nothing of that may weaken a guarantee.

Real RabbitMQ: nacks come from a ``reject-publish`` length limit set by a policy, returns from a
deleted queue, and lost connections from the fault proxy (tests/faultproxy.py) between the broker
and the server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

import aio_pika
import anyio
import pytest
from faultproxy import FaultProxy
from yarl import URL as ParsedURL

from qtasks import AsyncQueueTasks, QueueConfig, hookimpl
from qtasks.errors import BrokerConnectionError, TaskArgumentsError
from qtasks.messages import Envelope
from qtasks.record import TaskRecord
from qtasks_rabbitmq import PublishRejectedError, RabbitMQBroker
from qtasks_rabbitmq.topology import LEVELS
from qtasks_rabbitmq.wire import H_ID, H_PRIORITY
from qtasks_redis import RedisStorage

from .conftest import URL, BrokerFactory, delete_topology, drop_work_queue, poll, rabbitmqctl
from .test_broker import take

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]


def envelope(
    body: bytes = b"x", *, id: str | None = None, priority: int = 0, eta: float | None = None
) -> Envelope:
    return Envelope(id=id or uuid.uuid4().hex, body=body, priority=priority, eta=eta)


async def received(broker: RabbitMQBroker, count: int, timeout: float = 20) -> list[str]:
    """The ids of the next ``count`` deliveries, each acked, in delivery order."""
    ids = []
    async with broker.consume(prefetch=200) as deliveries:
        with anyio.fail_after(timeout):
            for _ in range(count):
                delivery = await anext(deliveries)
                ids.append(delivery.id)
                assert await delivery.ack()
    return ids


async def raw_properties(queue: str, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The next ``count`` messages of ``queue`` as they are on the server (got and requeued)."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        with anyio.fail_after(10):
            while len(got) < count:
                message = await source.get(no_ack=False, fail=False)
                if message is None:
                    await anyio.sleep(0.02)
                    continue
                got.append(message)
        for message in got:
            await message.nack(requeue=True)
        return got


@contextmanager
def length_limit(queue: str, most: int) -> Iterator[None]:
    """A policy on ``queue``: at most ``most`` messages, RabbitMQ nacks the publishes beyond."""
    policy = _policy(queue)
    limit = {"max-length": most, "overflow": "reject-publish"}
    rabbitmqctl("set_policy", policy, f"^{queue}$", json.dumps(limit), "--apply-to", "queues")
    try:
        yield
    finally:
        rabbitmqctl("clear_policy", policy)


def _policy(queue: str) -> str:
    return f"qtasks-test-limit-{queue}"


def limited(queue: str) -> Callable[[], Awaitable[bool]]:
    """Whether the policy of :func:`length_limit` applies to ``queue`` yet (it is applied in
    the background)."""

    async def check() -> bool:
        listing = await anyio.to_thread.run_sync(
            lambda: rabbitmqctl("list_queues", "-q", "name", "policy")
        )
        return any(line.split() == [queue, _policy(queue)] for line in listing.splitlines())

    return check


async def test_a_batch_carries_the_properties_a_single_publish_does(
    make_broker: BrokerFactory,
) -> None:
    """Each message of a batch has the properties and headers ``publish`` gives it: the
    consumer reads the id, priority and delivery count from them."""
    broker = await make_broker()
    long_id = "é" + "x" * 300  # not a message-id: travels in a header
    plain, urgent, odd = envelope(), envelope(priority=-3), envelope(id=long_id)
    await broker.publish(plain)
    await broker.publish(urgent)
    await broker.publish(odd)
    await broker.publish_many([plain, urgent, odd])
    messages = await raw_properties(broker.topology.queue, 6)
    copies: dict[str, list[aio_pika.abc.AbstractIncomingMessage]] = {}
    for message in messages:
        id = message.headers.get(H_ID) or message.message_id
        assert isinstance(id, str)
        copies.setdefault(id, []).append(message)
    assert sorted(copies) == sorted([plain.id, urgent.id, long_id])
    for one, many in copies.values():  # the single publish, then the batch's (FIFO)
        assert many.headers == one.headers
        assert (many.priority, many.delivery_mode) == (one.priority, one.delivery_mode)
        if H_ID not in one.headers:
            assert many.message_id == one.message_id
    assert copies[plain.id][1].headers == {}
    assert copies[urgent.id][1].headers == {H_PRIORITY: -3}
    assert copies[long_id][1].headers == {H_ID: long_id}


async def test_a_batch_keeps_its_order_ids_priorities_and_delays(
    make_broker: BrokerFactory,
) -> None:
    broker = await make_broker()
    eta = time.time() + 0.8
    sent = [envelope(str(i).encode()) for i in range(2500)]  # over two publish chunks
    odd = envelope(id="ü" * 300)
    later = envelope(b"later", eta=eta)
    first = envelope(b"first", priority=-5)
    await broker.publish_many([*sent, odd, later, first])
    ids = await received(broker, len(sent) + 3)
    assert ids[0] == first.id  # the highest priority overtakes the queue
    assert ids[1:-1] == [e.id for e in sent] + [odd.id]
    assert ids[-1] == later.id
    assert time.time() >= eta - 0.05  # came out of the delay chain, not at once


async def test_a_nack_in_the_middle_of_a_batch_raises_and_names_the_first_nacked(
    make_broker: BrokerFactory, queue_name: str
) -> None:
    """A length limit with ``reject-publish``: RabbitMQ nacks every publish over it."""
    broker = await make_broker()
    sent = [envelope(str(i).encode()) for i in range(12)]
    with length_limit(queue_name, 5):
        await poll(limited(queue_name), timeout=20, every=0.2)
        with anyio.fail_after(20), pytest.raises(PublishRejectedError, match="nacked") as caught:
            await broker.publish_many(sent)
    assert sent[5].id in str(caught.value)  # the first one over the limit, in batch order
    assert await received(broker, 5) == [e.id for e in sent[:5]]


async def test_an_unroutable_message_in_a_batch_raises(
    make_broker: BrokerFactory,
) -> None:
    """The work queue is gone: the delayed message still routes into the delay chain, the
    others come back (returned) and the batch raises naming the first of them."""
    broker = await make_broker()
    await drop_work_queue(broker)
    delayed, lost, also_lost = envelope(eta=time.time() + 60), envelope(), envelope()
    with anyio.fail_after(20), pytest.raises(PublishRejectedError, match="unroutable") as caught:
        await broker.publish_many([delayed, lost, also_lost])
    assert lost.id in str(caught.value)
    assert delayed.id not in str(caught.value)


@asynccontextmanager
async def proxied(
    queue: str, publish_timeout: float
) -> AsyncIterator[tuple[RabbitMQBroker, FaultProxy]]:
    """A started broker on ``queue`` whose connection goes through a fault proxy."""
    parsed = ParsedURL(URL)
    with FaultProxy((parsed.host or "127.0.0.1", parsed.port or 5672)) as proxy:
        url = str(parsed.with_host("127.0.0.1").with_port(proxy.port))
        broker = RabbitMQBroker(url, queue=queue, publish_timeout=publish_timeout)
        try:
            async with AsyncExitStack() as stack:
                await broker.start(stack, QueueConfig(broker="rabbitmq", broker_url=url))
                yield broker, proxy
                proxy.passthrough()  # the link closes in order
        finally:
            await delete_topology(broker.topology)


async def test_a_connection_lost_in_the_middle_of_a_batch_publishes_again_what_was_not_confirmed(
    queue_name: str,
) -> None:
    async with proxied(queue_name, publish_timeout=20) as (broker, proxy):
        await publish_across_a_lost_connection(broker, proxy)


async def publish_across_a_lost_connection(broker: RabbitMQBroker, proxy: FaultProxy) -> None:
    """``publish_many`` while the connection is held, then cut, then back: it returns only
    after the reconnect, and every message arrives (at least once, first copies in order)."""
    sent = [envelope(str(i).encode()) for i in range(3000)]
    await broker.publish_many(sent[:1000])  # the first chunk is confirmed before the fault
    proxy.blackhole()
    with anyio.fail_after(40):
        async with anyio.create_task_group() as tg:
            done = anyio.Event()

            async def publish() -> None:
                await broker.publish_many(sent[1000:])
                done.set()

            tg.start_soon(publish)

            async def written() -> bool:
                return proxy.stats.held > 0

            await poll(written, timeout=10)
            assert not done.is_set(), "publish_many returned without the broker's confirms"
            proxy.reset()

            async def cut() -> bool:
                return proxy.stats.resets > 0

            await poll(cut, timeout=10)
            assert not done.is_set()
            proxy.passthrough()
        assert done.is_set()
    assert broker.reconnects >= 1
    # At least once, and in order for each message's first delivery.
    ids = await received_at_least(broker, {e.id for e in sent})
    firsts = list(dict.fromkeys(ids))
    assert firsts == [e.id for e in sent]


async def received_at_least(broker: RabbitMQBroker, wanted: set[str]) -> list[str]:
    """Delivery ids until every id of ``wanted`` came (copies included, in order)."""
    ids: list[str] = []
    async with broker.consume(prefetch=200) as deliveries:
        with anyio.fail_after(30):
            while not wanted <= set(ids):
                delivery = await take(deliveries, timeout=30)
                ids.append(delivery.id)
                assert await delivery.ack()
    return ids


async def test_a_batch_that_cannot_be_confirmed_raises_once_the_publish_timeout_passes(
    queue_name: str,
) -> None:
    async with proxied(queue_name, publish_timeout=2) as (broker, proxy):
        proxy.reset()
        started = time.monotonic()
        with anyio.fail_after(20), pytest.raises(BrokerConnectionError):
            await broker.publish_many([envelope() for _ in range(50)])
        assert time.monotonic() - started >= 1.5


async def waiting(broker: RabbitMQBroker) -> int:
    """Messages in the delay chain's wait queues."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        total = 0
        for bit in range(LEVELS):
            queue = await channel.declare_queue(broker.topology.level(bit), passive=True)
            total += queue.declaration_result.message_count or 0
        return total


class Notified:
    """The producer's per-task notifications, in order."""

    name = "bulk-notified"

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.failed: list[str] = []

    @hookimpl
    def qtasks_task_enqueued(self, record: TaskRecord) -> None:
        self.enqueued.append(record.uuid)

    @hookimpl
    def qtasks_task_enqueue_failed(self, record: TaskRecord) -> None:
        self.failed.append(record.uuid)


@pytest.fixture
async def bulk_app(
    make_broker: BrokerFactory, queue_name: str, prefix: str, redis_url: str
) -> AsyncIterator[tuple[RabbitMQBroker, AsyncQueueTasks, Notified]]:
    """A started app on this test's queue (Redis storage), with a task ``echo``."""
    broker = await make_broker()
    app = AsyncQueueTasks(
        broker=RabbitMQBroker(URL, queue=queue_name),
        storage=RedisStorage(redis_url, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )
    notified = Notified()
    app.add_plugin(notified)

    @app.task
    async def echo(x: int) -> int:
        return x

    try:
        await app.start()
        yield broker, app, notified
    finally:
        await app.aclose()


async def test_add_tasks_publishes_batches_in_order_and_stops_at_a_failed_one(
    bulk_app: tuple[RabbitMQBroker, AsyncQueueTasks, Notified], queue_name: str
) -> None:
    """Two batches are in flight at once (one stored while the other's confirms come): the
    messages and notifications still follow the tasks' order; a nack stops the call."""
    broker, app, notified = bulk_app
    echo = app.tasks["echo"]
    tasks = await echo.add_tasks(range(3500))
    assert app.enqueue_path == "overlapped"
    assert notified.enqueued == [t.uuid for t in tasks]
    assert await received(broker, len(tasks)) == [t.uuid for t in tasks]

    # A length limit nacks the second batch's last 500: the third and fourth batches are
    # not published (the third's records may be stored): they notify an enqueue failure.
    notified.enqueued.clear()
    with length_limit(queue_name, 1500):
        await poll(limited(queue_name), timeout=20, every=0.2)
        with anyio.fail_after(30), pytest.raises(PublishRejectedError, match="nacked"):
            await echo.add_tasks(range(4000))
    # Batch 1 enqueued; batch 2 failed whole (its last 500 nacked); batches 3 and 4 were
    # prepared (every item is, before the first batch is stored) and are reported failed,
    # whether begun or not.
    assert len(notified.enqueued) == 1000
    assert len(notified.failed) == 3000
    assert not set(notified.failed) & set(notified.enqueued)
    delivered = await received(broker, 1500)
    assert delivered == notified.enqueued + notified.failed[:500]
    assert (await broker.stats()).ready_by_priority == {}


async def test_a_bad_add_tasks_item_after_a_full_batch_stores_nothing(
    bulk_app: tuple[RabbitMQBroker, AsyncQueueTasks, Notified],
) -> None:
    """The first batch was stored and published while item 1500 was prepared; now every item
    is checked first and nothing is stored or published. The 1,500 items prepared before it
    are reported not enqueued."""
    broker, app, notified = bulk_app
    echo = app.tasks["echo"]
    items = [echo.s(i) for i in range(2500)]
    items[1500] = echo.s(1, 2)
    with pytest.raises(TaskArgumentsError, match=r"^add_tasks item 1500: "):
        await app.add_tasks(items)
    assert app.enqueue_path == "overlapped"
    assert notified.enqueued == []
    assert len(notified.failed) == 1500
    assert await app.storage.stats() == {}
    assert (await broker.stats()).ready_by_priority == {}


async def test_add_tasks_does_not_publish_a_batch_behind_a_failed_one(
    bulk_app: tuple[RabbitMQBroker, AsyncQueueTasks, Notified],
) -> None:
    """The first batch is unroutable (its work queue is gone), the second, delayed, would route
    into the delay chain: it is stored while the first waits for its confirms, but never
    published, and its tasks are reported as not enqueued."""
    broker, app, notified = bulk_app
    echo = app.tasks["echo"]
    await drop_work_queue(broker)
    now = [echo.s(i) for i in range(1000)]
    later = [echo.s(i).set(delay=60) for i in range(1000)]
    with anyio.fail_after(30), pytest.raises(PublishRejectedError, match="unroutable"):
        await app.add_tasks([*now, *later])
    assert notified.enqueued == []
    assert len(notified.failed) == 2000  # both batches were stored, neither enqueued
    assert await waiting(broker) == 0
