"""Declaring a queue's topology (:mod:`qtasks_rabbitmq.topology`) on a connection: every
queue, exchange and binding, idempotent, at each (re)connect of a
:class:`~qtasks_rabbitmq.link.Link` and when it opens a new publish channel."""

from __future__ import annotations

import logging
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from qtasks_rabbitmq.errors import TopologyError
from qtasks_rabbitmq.topology import LEVELS, Topology, level_pattern

log = logging.getLogger("qtasks.rabbitmq")


async def declare(connection: AbstractConnection, topology: Topology, *, first: bool) -> None:
    """Declare every queue, exchange and binding of ``topology`` (idempotent); ``first``: on
    a link's first connect (see :func:`_declare_dead`)."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        work = await _declare_queue(channel, topology.queue, topology.work_arguments())
        out = await channel.declare_exchange(topology.delay_out, "fanout", durable=True)
        await work.bind(out)
        exchanges = {
            bit: await channel.declare_exchange(topology.level(bit), "topic", durable=True)
            for bit in range(LEVELS)
        }
        for bit in range(LEVELS):
            queue = await _declare_queue(
                channel, topology.level(bit), topology.level_arguments(bit)
            )
            await queue.bind(exchanges[bit], level_pattern(bit, "1"))
            below = exchanges[bit - 1] if bit else out
            await below.bind(exchanges[bit], level_pattern(bit, "0"))
    finally:
        if not channel.is_closed:
            await channel.close()
    await _declare_dead(connection, topology, first)


async def _declare_dead(connection: AbstractConnection, topology: Topology, first: bool) -> None:
    """Declare the dead-letter queue with the arguments every version declares it with
    (:meth:`Topology.dead_arguments`, no cap), so processes of earlier versions, which declare
    it so, are never refused it (``PRECONDITION_FAILED``); ``max_dead_letters`` is kept by
    :meth:`Link.trim_dead` instead. One that exists is declared passively first and kept as
    it is. On the ``first`` connect of a link only, it is checked against those arguments:
    one declared with others (a cap, by the version that added ``max_dead_letters``, or an
    operator) is kept too, with one warning, as earlier versions are refused it; one of
    another type or version raises :class:`TopologyError`."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(topology.dead, passive=True)
        exists = True
    except aiormq.exceptions.ChannelNotFoundEntity:
        exists = False
    finally:
        if not channel.is_closed:
            await channel.close()
    if exists and not first:
        return
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(
            topology.dead, durable=True, arguments=topology.dead_arguments()
        )
        return
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        detail = str(exc)
        if "x-max-length" not in detail and "x-overflow" not in detail:
            raise TopologyError(topology.dead, detail) from None
    finally:
        if not channel.is_closed:
            await channel.close()
    log.warning(
        "RabbitMQ queue %r exists with arguments other than qtasks declares (%s); it is kept "
        "as it is, its own limits hold besides max_dead_letters=%s, and processes of "
        "earlier qtasks versions are refused it: delete it while empty to have it declared "
        "anew (see docs/rabbitmq.md)",
        topology.dead,
        detail,
        topology.max_dead_letters,
    )


async def _declare_queue(channel: AbstractChannel, name: str, arguments: dict[str, Any]) -> Any:
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyError(name, str(exc)) from None
