"""``State.update_with``'s lock against a holder that outlived its TTL: the scenario, on any
global config (tests/core, tests/redis)."""

from __future__ import annotations

from typing import Any, cast

import anyio
import pytest

from qtasks import state
from qtasks.components import GlobalConfig
from qtasks.state import GlobalStore

WAIT = 10


class HeldReplies:
    """A global config whose replies the scenario holds back, as a slow link would: the call
    is made (the server answered), its answer reaches the caller once ``held`` is set."""

    def __init__(self, inner: Any, locks: str, values: str) -> None:
        self.inner, self.locks, self.values = inner, locks, values
        self.unlocking: anyio.Event | None = None
        """Set (then cleared) to hold the answer of the next unlock call until it is set."""
        self.reading: anyio.Event | None = None
        """Set (then cleared) to hold the answer of the next value read until it is set."""
        self.locked: list[bool] = []
        """The answers of the lock takes, in order."""
        self.lock_answered = anyio.Event()
        self.unlock_held = anyio.Event()

    async def _hold(self, which: str) -> None:
        event = getattr(self, which)
        if event is not None:
            setattr(self, which, None)
            if which == "unlocking":
                self.unlock_held.set()
            with anyio.fail_after(WAIT):
                await event.wait()

    async def get(self, namespace: str, key: str, default: Any = None) -> Any:
        value = await self.inner.get(namespace, key, default)
        await self._hold("unlocking" if namespace == self.locks else "reading")
        return value

    async def set(self, namespace: str, key: str, value: Any, *, ttl: float | None = None) -> None:
        await self.inner.set(namespace, key, value, ttl=ttl)

    async def set_if_absent(
        self, namespace: str, key: str, value: Any, *, ttl: float | None = None
    ) -> bool:
        done: bool = await self.inner.set_if_absent(namespace, key, value, ttl=ttl)
        self.locked.append(done)
        self.lock_answered.set()
        return done

    async def delete(self, namespace: str, key: str) -> bool:
        done: bool = await self.inner.delete(namespace, key)
        return done

    async def delete_if_equal(self, namespace: str, key: str, value: Any) -> bool:
        done: bool = await self.inner.delete_if_equal(namespace, key, value)
        await self._hold("unlocking")
        return done


async def a_late_unlock_spares_the_next_holder(
    config: GlobalConfig, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holder A's lock runs out (a short TTL) while the answer of its unlock is on its way;
    B takes the lock meanwhile and is still reading. A's unlock must not delete B's lock: C
    then waits for B, and no update is lost (three ``+1``, the count is 3)."""
    monkeypatch.setattr(state, "_LOCK_TTL", 0.3)
    held = HeldReplies(config, f"qtasks.state-lock:{name}", f"qtasks.state:{name}")
    store = GlobalStore(cast(GlobalConfig, held), name)
    b_locked, b_reads = anyio.Event(), anyio.Event()

    def plus_one(n: int) -> int:
        return n + 1

    async def update(done: anyio.Event | None = None) -> None:
        await store.update_with("n", plus_one, 0)
        if done is not None:
            done.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            held.unlocking = b_locked  # A's unlock is answered once B holds the lock
            a_done = anyio.Event()
            tg.start_soon(update, a_done)
            await held.unlock_held.wait()  # A wrote; the answer of its unlock is on its way
            assert held.locked == [True]
            held.reading = b_reads  # B, once it holds the lock, is held reading
            tg.start_soon(update)
            while held.locked[-1] is not True or len(held.locked) < 2:
                await held.lock_answered.wait()
                held.lock_answered = anyio.Event()
            b_locked.set()  # B holds the lock (A's ran out); A's unlock answer arrives
            await a_done.wait()
            token = await config.get(f"qtasks.state-lock:{name}", "n")
            count = len(held.locked)
            c_done = anyio.Event()
            tg.start_soon(update, c_done)
            while len(held.locked) == count:
                await held.lock_answered.wait()
                held.lock_answered = anyio.Event()
            if held.locked[count]:
                await c_done.wait()  # C took the lock while B still held it: C ends first
            b_reads.set()
    # Without a compare-and-delete: A deleted B's lock, C took it, B wrote over C's count.
    count = await config.get(f"qtasks.state:{name}", "n")
    assert (token is not None, count) == (True, 3), f"B's lock {token!r}, count {count}"
    assert await config.get_all(f"qtasks.state-lock:{name}") == {}
