"""The in-memory global config: namespaced keys with TTLs, and heartbeats."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any, Self

import anyio
import anyio.abc

from qtasks.config import QueueConfig
from qtasks.memory.signals import _Lifecycle


class MemoryGlobalConfig(_Lifecycle):
    """Namespaced keys with TTLs and heartbeats, in process memory."""

    local = True

    def __init__(self) -> None:
        self._data: dict[str, dict[str, tuple[Any, float | None]]] = {}
        self._lock = anyio.Lock()

    @classmethod
    def from_config(cls, config: QueueConfig) -> Self:
        return cls()

    async def flush(self) -> int:
        """Drop every namespace; return how many keys (for ``app.flush_all``)."""
        async with self._lock:
            count = sum(len(values) for values in self._data.values())
            self._data.clear()
        return count

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        self._begin(stack)

    def _ns(self, namespace: str) -> dict[str, tuple[Any, float | None]]:
        space = self._data.setdefault(namespace, {})
        now = time.monotonic()
        for key in [k for k, (_, exp) in space.items() if exp is not None and exp <= now]:
            del space[key]
        return space

    @staticmethod
    def _exp(ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    async def get(self, namespace: str, key: str, default: Any = None) -> Any:
        self._check()
        item = self._ns(namespace).get(key)
        return default if item is None else item[0]

    async def set(self, namespace: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        self._check()
        self._ns(namespace)[key] = (value, self._exp(ttl))

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        self._check()
        space = self._ns(namespace)
        if key in space:
            return False
        space[key] = (value, self._exp(ttl))
        return True

    async def delete(self, namespace: str, key: str) -> bool:
        self._check()
        return self._ns(namespace).pop(key, None) is not None

    async def get_all(self, namespace: str) -> dict[str, Any]:
        self._check()
        return {k: v for k, (v, _) in self._ns(namespace).items()}

    async def clear(self, namespace: str) -> None:
        self._check()
        self._data.pop(namespace, None)

    async def increment(self, namespace: str, key: str, amount: float = 1) -> float:
        self._check()
        space = self._ns(namespace)
        value, exp = space.get(key, (0, None))
        new = value + amount
        space[key] = (new, exp)
        return float(new)

    async def heartbeat(self, worker_id: str, info: dict[str, Any], ttl: float) -> None:
        await self.set("workers", worker_id, dict(info), ttl=ttl)

    async def workers(self) -> dict[str, dict[str, Any]]:
        return await self.get_all("workers")
