"""The in-memory components of the core against the contract suites."""

from __future__ import annotations

import pytest

from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
from qtasks_testing.contract import (
    BrokerContract,
    BrokerFactory,
    GlobalConfigContract,
    GlobalConfigFactory,
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
