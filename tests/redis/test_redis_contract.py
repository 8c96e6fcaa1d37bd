"""The Redis components against the contract suites of ``qtasks_testing.contract``."""

from __future__ import annotations

import pytest

from qtasks.config import QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_testing.contract import (
    BrokerContract,
    BrokerFactory,
    GlobalConfigContract,
    GlobalConfigFactory,
    StorageContract,
    StorageFactory,
)


class TestRedisBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self, redis_url: str, prefix: str) -> BrokerFactory:
        return lambda config: RedisBroker(redis_url, prefix=prefix, queue="contract")


class TestRedisStorage(StorageContract):
    @pytest.fixture
    def storage_factory(self, redis_url: str, prefix: str) -> StorageFactory:
        def make(config: QueueConfig) -> RedisStorage:
            return RedisStorage(redis_url, prefix=prefix)

        return make


class TestRedisGlobalConfig(GlobalConfigContract):
    @pytest.fixture
    def global_config_factory(self, redis_url: str, prefix: str) -> GlobalConfigFactory:
        return lambda config: RedisGlobalConfig(redis_url, prefix=prefix)
