"""The Redis components against the contract suites of ``qtasks_testing.contract``."""

from __future__ import annotations

import pytest

from qtasks.config import QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_testing.contract import (
    BeginOnClaimContract,
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


@pytest.fixture
def redis_broker_factory(redis_url: str, prefix: str) -> BrokerFactory:
    return lambda config: RedisBroker(redis_url, prefix=prefix, queue="contract")


@pytest.fixture
def redis_storage_factory(redis_url: str, prefix: str) -> StorageFactory:
    def make(config: QueueConfig) -> RedisStorage:
        return RedisStorage(redis_url, prefix=prefix)

    return make


class TestRedisBroker(BrokerContract):
    @pytest.fixture
    def broker_factory(self, redis_broker_factory: BrokerFactory) -> BrokerFactory:
        return redis_broker_factory


class TestRedisStorage(StorageContract):
    @pytest.fixture
    def storage_factory(self, redis_storage_factory: StorageFactory) -> StorageFactory:
        return redis_storage_factory


class TestRedisGlobalConfig(GlobalConfigContract):
    @pytest.fixture
    def global_config_factory(self, redis_url: str, prefix: str) -> GlobalConfigFactory:
        return lambda config: RedisGlobalConfig(redis_url, prefix=prefix)


class TestRedisSharedServer(SharedServerContract):
    """A RedisBroker and a RedisStorage on the same server (same URL and prefix)."""

    @pytest.fixture
    def broker_factory(self, redis_broker_factory: BrokerFactory) -> BrokerFactory:
        return redis_broker_factory

    @pytest.fixture
    def storage_factory(self, redis_storage_factory: StorageFactory) -> StorageFactory:
        return redis_storage_factory


class TestRedisLeaseBatch(LeaseBatchContract):
    @pytest.fixture
    def broker_factory(self, redis_broker_factory: BrokerFactory) -> BrokerFactory:
        return redis_broker_factory


class TestRedisCancelCheck(CancelCheckContract):
    @pytest.fixture
    def storage_factory(self, redis_storage_factory: StorageFactory) -> StorageFactory:
        return redis_storage_factory


class TestRedisCancelFeed(CancelFeedContract):
    @pytest.fixture
    def storage_factory(self, redis_storage_factory: StorageFactory) -> StorageFactory:
        return redis_storage_factory


class TestRedisBeginOnClaim(BeginOnClaimContract):
    @pytest.fixture
    def broker_factory(self, redis_broker_factory: BrokerFactory) -> BrokerFactory:
        return redis_broker_factory

    @pytest.fixture
    def storage_factory(self, redis_storage_factory: StorageFactory) -> StorageFactory:
        return redis_storage_factory
