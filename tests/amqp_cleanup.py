"""Deleting a RabbitMQ queue's topology after a test (its queues and exchanges), shared by the
tests that run on RabbitMQ, wherever they live."""

from __future__ import annotations

import os

import aio_pika

from qtasks_rabbitmq import Topology

URL = os.environ.get("QTASKS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
"""The test server (``QTASKS_TEST_RABBITMQ_URL``, default guest on 127.0.0.1:5672)."""


async def delete_topology(topology: Topology | str, url: str = URL) -> None:
    """Delete every queue and exchange of ``topology`` (or of the queue so named); one channel
    per deletion, as a deletion that fails closes its channel."""
    if isinstance(topology, str):
        topology = Topology(topology)
    connection = await aio_pika.connect(url)
    try:
        for name in topology.all_queues():
            channel = await connection.channel()
            await channel.queue_delete(name)
            await channel.close()
        for name in topology.all_exchanges():
            channel = await connection.channel()
            await channel.exchange_delete(name)
            await channel.close()
    finally:
        await connection.close()
