"""The global-config contract suite: :class:`GlobalConfigContract`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import anyio
import pytest

from qtasks.components import CompareDelete, GlobalConfig, HeartbeatEnd
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError
from qtasks_testing.contract._base import ContractSuite, wait_until
from qtasks_testing.contract.capabilities import lacks

GlobalConfigFactory = Callable[[QueueConfig], GlobalConfig]


class GlobalConfigContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.GlobalConfig`, as tests.

    Subclass it (``class TestMyConfig(GlobalConfigContract)``) and provide a
    ``global_config_factory`` fixture returning a callable that takes the
    :class:`~qtasks.config.QueueConfig` and returns an **unstarted** global config. Each test
    uses namespaces and worker ids of its own, so a shared server is fine.
    """

    @pytest.fixture
    async def global_config(
        self, global_config_factory: GlobalConfigFactory, contract_config: QueueConfig
    ) -> AsyncIterator[GlobalConfig]:
        """A started global config from ``global_config_factory``, stopped after the test."""
        async with AsyncExitStack() as stack:
            component = global_config_factory(contract_config)
            await component.start(stack, contract_config)
            yield component

    @pytest.fixture
    def ns(self) -> str:
        """A namespace no other test uses."""
        return f"contract-{uuid.uuid4().hex}"

    # --- lifecycle ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_satisfies_the_protocol(
        self, global_config_factory: GlobalConfigFactory, contract_config: QueueConfig
    ) -> None:
        assert isinstance(global_config_factory(contract_config), GlobalConfig)

    @pytest.mark.anyio
    async def test_use_before_start_raises(
        self, global_config_factory: GlobalConfigFactory, contract_config: QueueConfig
    ) -> None:
        component = global_config_factory(contract_config)
        with pytest.raises(ComponentNotStartedError):
            await component.get("ns", "key")

    @pytest.mark.anyio
    async def test_shared_start_is_reference_counted(
        self, global_config_factory: GlobalConfigFactory, contract_config: QueueConfig
    ) -> None:
        """Several apps in one process may share a component: it stops with the last stack."""
        component = global_config_factory(contract_config)
        first, second = AsyncExitStack(), AsyncExitStack()
        await component.start(first, contract_config)
        await component.start(second, contract_config)
        await second.aclose()
        await component.get("ns", "key")  # still started: the first stack holds it
        await first.aclose()
        with pytest.raises(ComponentNotStartedError):
            await component.get("ns", "key")

    # --- keys -----------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_get_set_round_trip(self, global_config: GlobalConfig, ns: str) -> None:
        assert await global_config.get(ns, "missing") is None
        assert await global_config.get(ns, "missing", default=7) == 7
        values = {"int": 3, "float": 2.5, "str": "ünïcode ✓", "list": [1, [2]], "dict": {"a": {}}}
        for key, value in values.items():
            await global_config.set(ns, key, value)
        for key, value in values.items():
            assert await global_config.get(ns, key) == value
        await global_config.set(ns, "int", 4)
        assert await global_config.get(ns, "int") == 4
        assert await global_config.get_all(ns) == {**values, "int": 4}

    @pytest.mark.anyio
    async def test_namespaces_are_separate(self, global_config: GlobalConfig, ns: str) -> None:
        other = ns + "-other"
        await global_config.set(ns, "key", "mine")
        await global_config.set(other, "key", "theirs")
        assert await global_config.get(ns, "key") == "mine"
        assert await global_config.get(other, "key") == "theirs"
        await global_config.clear(other)
        assert await global_config.get_all(other) == {}
        assert await global_config.get_all(ns) == {"key": "mine"}

    @pytest.mark.anyio
    async def test_delete(self, global_config: GlobalConfig, ns: str) -> None:
        await global_config.set(ns, "a", 1)
        await global_config.set(ns, "b", 2)
        assert await global_config.delete(ns, "a") is True
        assert await global_config.delete(ns, "a") is False
        assert await global_config.get_all(ns) == {"b": 2}

    @pytest.mark.anyio
    async def test_keys_with_ttl_vanish(self, global_config: GlobalConfig, ns: str) -> None:
        await global_config.set(ns, "short", "x", ttl=0.3)
        await global_config.set(ns, "long", "y", ttl=60)
        await global_config.set(ns, "forever", "z")
        assert await global_config.get(ns, "short") == "x"
        set_at = time.monotonic()

        async def expired() -> bool:
            return await global_config.get(ns, "short") is None

        await wait_until(expired, timeout=0.3 + 1.0, what="the key to expire")
        assert time.monotonic() - set_at >= 0.2
        assert await global_config.get_all(ns) == {"long": "y", "forever": "z"}

    @pytest.mark.anyio
    async def test_set_replaces_a_ttl(self, global_config: GlobalConfig, ns: str) -> None:
        await global_config.set(ns, "key", 1, ttl=0.2)
        await global_config.set(ns, "key", 2)
        await anyio.sleep(0.4)  # past the first ttl, which the second set dropped
        assert await global_config.get(ns, "key") == 2

    @pytest.mark.anyio
    async def test_set_if_absent(self, global_config: GlobalConfig, ns: str) -> None:
        assert await global_config.set_if_absent(ns, "lock", "first") is True
        assert await global_config.set_if_absent(ns, "lock", "second") is False
        assert await global_config.get(ns, "lock") == "first"
        assert await global_config.set_if_absent(ns, "lease", "a", ttl=0.3) is True

        async def free() -> bool:
            return await global_config.set_if_absent(ns, "lease", "b", ttl=0.3)

        await wait_until(free, timeout=0.3 + 1.0, what="the expired key to be settable again")
        assert await global_config.get(ns, "lease") == "b"

    @pytest.mark.anyio
    async def test_set_if_absent_is_atomic_under_concurrency(
        self, global_config: GlobalConfig, ns: str
    ) -> None:
        winners: list[int] = []

        async def contend(i: int) -> None:
            if await global_config.set_if_absent(ns, "leader", i):
                winners.append(i)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(contend, i)
        assert len(winners) == 1
        assert await global_config.get(ns, "leader") == winners[0]

    @pytest.mark.anyio
    async def test_increment(self, global_config: GlobalConfig, ns: str) -> None:
        assert await global_config.increment(ns, "n") == 1
        assert await global_config.increment(ns, "n", 2.5) == 3.5
        assert await global_config.increment(ns, "n", -4) == -0.5
        assert await global_config.get(ns, "n") == -0.5

    @pytest.mark.anyio
    async def test_increment_is_atomic_under_concurrency(
        self, global_config: GlobalConfig, ns: str
    ) -> None:
        results: list[float] = []

        async def bump() -> None:
            for _ in range(10):
                results.append(await global_config.increment(ns, "hits"))

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(bump)
        assert sorted(results) == [float(n) for n in range(1, 101)], "lost or repeated updates"
        assert await global_config.get(ns, "hits") == 100

    # --- heartbeats -----------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_heartbeats_list_live_workers(self, global_config: GlobalConfig) -> None:
        short, long = f"worker-{uuid.uuid4().hex}", f"worker-{uuid.uuid4().hex}"
        await global_config.heartbeat(short, {"pid": 1, "running": 2}, ttl=0.3)
        await global_config.heartbeat(long, {"pid": 2, "running": 0}, ttl=60)
        workers = await global_config.workers()
        assert workers[short] == {"pid": 1, "running": 2}
        assert workers[long] == {"pid": 2, "running": 0}

        async def short_gone() -> bool:
            return short not in await global_config.workers()

        await wait_until(short_gone, timeout=0.3 + 1.0, what="the silent worker to expire")
        assert long in await global_config.workers()
        # A new heartbeat renews and replaces the info.
        await global_config.heartbeat(long, {"pid": 2, "running": 5}, ttl=60)
        assert (await global_config.workers())[long] == {"pid": 2, "running": 5}

    @pytest.mark.anyio
    async def test_an_ended_heartbeat_is_gone_at_once(self, global_config: GlobalConfig) -> None:
        """The optional :class:`~qtasks.components.HeartbeatEnd` (skipped without it)."""
        if not isinstance(global_config, HeartbeatEnd):
            pytest.skip(lacks(global_config, HeartbeatEnd))
        ended, other = f"worker-{uuid.uuid4().hex}", f"worker-{uuid.uuid4().hex}"
        await global_config.heartbeat(ended, {"pid": 1}, ttl=60)
        await global_config.heartbeat(other, {"pid": 2}, ttl=60)
        await global_config.end_heartbeat(ended)
        workers = await global_config.workers()
        assert ended not in workers
        assert workers[other] == {"pid": 2}
        await global_config.end_heartbeat(ended)  # not there any more: nothing happens
        await global_config.end_heartbeat(other)
        assert other not in await global_config.workers()

    @pytest.mark.anyio
    async def test_delete_if_equal_deletes_only_what_holds_the_value(
        self, global_config: GlobalConfig, ns: str
    ) -> None:
        """The optional :class:`~qtasks.components.CompareDelete` (skipped without it)."""
        if not isinstance(global_config, CompareDelete):
            pytest.skip(lacks(global_config, CompareDelete))
        await global_config.set(ns, "lock", "mine", ttl=60)
        await global_config.set(ns, "other", "mine")
        assert await global_config.delete_if_equal(ns, "lock", "theirs") is False
        assert await global_config.get(ns, "lock") == "mine"
        assert await global_config.delete_if_equal(ns, "lock", "mine") is True
        assert await global_config.delete_if_equal(ns, "lock", "mine") is False  # gone
        assert await global_config.delete_if_equal(ns, "missing", "mine") is False
        await global_config.set(ns, "n", 3)
        assert await global_config.delete_if_equal(ns, "n", 3) is True
        assert await global_config.get_all(ns) == {"other": "mine"}
