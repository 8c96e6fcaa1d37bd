"""In-memory Broker, Storage and GlobalConfig: a real backend for one process.

They implement the full contract of :mod:`qtasks.components` (priorities, delays, leases,
redelivery, dead letters, fenced writes, woken waiters) and pass the same contract suites as the
Redis and RabbitMQ backends. All state lives in the event loop that started them: use them from
that loop (the sync app does so through its portal).
"""

from __future__ import annotations

from qtasks.memory.broker import MemoryBroker, MemoryDelivery, _Entry
from qtasks.memory.global_config import MemoryGlobalConfig
from qtasks.memory.signals import EventFactory, _Lifecycle, _Signal
from qtasks.memory.storage import MemoryStorage

__all__ = [
    "EventFactory",
    "MemoryBroker",
    "MemoryDelivery",
    "MemoryGlobalConfig",
    "MemoryStorage",
    "_Entry",
    "_Lifecycle",
    "_Signal",
]
