"""The in-memory components of the core against the contract suites."""

from __future__ import annotations

import pytest

from qtasks.components import BeginOnClaim
from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
from qtasks_testing.contract import (
    BrokerContract,
    BrokerFactory,
    CancelCheckContract,
    CancelFeedContract,
    GlobalConfigContract,
    GlobalConfigFactory,
    LeaseBatchContract,
    SharedServerContract,
    StorageContract,
    StorageFactory,
)


class TestMemoryBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        return MemoryBroker.from_config


class TestMemoryStorage(StorageContract):
    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config


class TestMemoryGlobalConfig(GlobalConfigContract):
    @pytest.fixture
    def global_config_factory(self) -> GlobalConfigFactory:
        return MemoryGlobalConfig.from_config


class TestMemorySharedServer(SharedServerContract):
    """The in-memory broker shares its "server", the process, with every MemoryStorage."""

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        return MemoryBroker.from_config

    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config


class TestMemoryLeaseBatch(LeaseBatchContract):
    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        return MemoryBroker.from_config


class TestMemoryCancelCheck(CancelCheckContract):
    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config


class TestMemoryCancelFeed(CancelFeedContract):
    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        return MemoryStorage.from_config


def test_the_memory_broker_does_not_begin_on_claim() -> None:
    """The BeginOnClaim suite does not apply (and is not run): the in-memory broker does not
    begin records on claim, the worker calls ``Storage.begin``. Implement it, then wire the
    suite here."""
    assert not isinstance(MemoryBroker(), BeginOnClaim)
