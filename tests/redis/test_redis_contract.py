"""The Redis components against the contract suites of ``qtasks_testing.contract``."""

from __future__ import annotations

import pytest

from qtasks.config import QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_testing.contract import (
    AttemptLogContract,
    BadInputContract,
    BeginManyContract,
    BeginOnClaimContract,
    BringForwardContract,
    BrokerContract,
    BrokerFactory,
    BulkAddContract,
    BulkPublishContract,
    BulkPublishNewContract,
    BuryNoticeContract,
    CancelCheckContract,
    CancelFeedContract,
    ConsumeHealthContract,
    DeliveryLimitContract,
    FailedMemberContract,
    FlowControlContract,
    FreshWaitContract,
    GlobalConfigContract,
    GlobalConfigFactory,
    LeaseBatchContract,
    LeasedBrokerFactory,
    LeaseDeadlineContract,
    LeaseLengthContract,
    LimitedBrokerFactory,
    RetryContract,
    SettleBeginContract,
    SharedServerContract,
    StorageContract,
    StorageFactory,
    StorageQueryContract,
    WorkflowSettleContract,
    WorkflowStoreContract,
)


@pytest.fixture
def broker_factory(redis_url: str, prefix: str) -> BrokerFactory:
    """Every suite here (they declare no factories of their own)."""
    return lambda config: RedisBroker(redis_url, prefix=prefix, queue="contract")


@pytest.fixture
def storage_factory(redis_url: str, prefix: str) -> StorageFactory:
    """Every suite here; one URL and prefix, so the broker shares a server with it."""

    def make(config: QueueConfig) -> RedisStorage:
        return RedisStorage(redis_url, prefix=prefix)

    return make


class TestRedisBroker(BrokerContract):
    """Runs with the module's factories. A delayed message is woken at its eta by the client
    (``CLIENT UNBLOCK``), not by Redis's ``hz`` tick (up to 100 ms late): hence a
    ``due_latency`` well under a tick."""

    due_latency = 0.02


class TestRedisStorage(StorageContract):
    """Runs with the module's factories."""


class TestRedisGlobalConfig(GlobalConfigContract):
    @pytest.fixture
    def global_config_factory(self, redis_url: str, prefix: str) -> GlobalConfigFactory:
        return lambda config: RedisGlobalConfig(redis_url, prefix=prefix)


class TestRedisFlowControl(FlowControlContract):
    @pytest.fixture
    def global_config_factory(self, redis_url: str, prefix: str) -> GlobalConfigFactory:
        return lambda config: RedisGlobalConfig(redis_url, prefix=prefix)


class TestRedisSharedServer(SharedServerContract):
    """A RedisBroker and a RedisStorage on the same server (same URL and prefix)."""


class TestRedisSettleBegin(SettleBeginContract):
    """Runs with the module's factories (the pair SharedServerContract uses)."""


class TestRedisBringForward(BringForwardContract):
    """Runs with the module's factories."""


class TestRedisLeaseBatch(LeaseBatchContract):
    """Runs with the module's factories."""


class TestRedisBuryNotice(BuryNoticeContract):
    """Runs with the module's factories."""


class TestRedisCancelCheck(CancelCheckContract):
    """Runs with the module's factories."""


class TestRedisCancelFeed(CancelFeedContract):
    """Runs with the module's factories."""


class TestRedisStorageQuery(StorageQueryContract):
    """Runs with the module's factories."""


class TestRedisBeginOnClaim(BeginOnClaimContract):
    """Runs with the module's factories."""


class TestRedisBeginMany(BeginManyContract):
    """Runs with the module's factories."""


class TestRedisAttemptLog(AttemptLogContract):
    """Runs with the module's factories."""


class TestRedisFreshWait(FreshWaitContract):
    """Runs with the module's factories."""


class TestRedisBulkPublish(BulkPublishContract):
    """Runs with the module's factories."""


class TestRedisBulkPublishNew(BulkPublishNewContract):
    """Runs with the module's factories."""


class TestRedisBulkAdd(BulkAddContract):
    """Runs with the module's factories."""


class TestRedisWorkflowStore(WorkflowStoreContract):
    """Runs with the module's factories."""


class TestRedisFailedMember(FailedMemberContract):
    """Runs with the module's factories."""


class TestRedisWorkflowSettle(WorkflowSettleContract):
    """Runs with the module's factories."""


class TestRedisLeaseLength(LeaseLengthContract):
    @pytest.fixture
    def leased_broker_factory(self, redis_url: str, prefix: str) -> LeasedBrokerFactory:
        return lambda lease: RedisBroker(redis_url, prefix=prefix, queue="contract", lease=lease)


class TestRedisDeliveryLimit(DeliveryLimitContract):
    @pytest.fixture
    def limited_broker_factory(self, redis_url: str, prefix: str) -> LimitedBrokerFactory:
        return lambda limit: RedisBroker(
            redis_url, prefix=prefix, queue="contract", max_deliveries=limit
        )


class TestRedisConsumeHealth(ConsumeHealthContract):
    """Runs with the module's factories."""


class TestRedisLeaseDeadline(LeaseDeadlineContract):
    """Runs with the module's factories."""


class TestRedisBadInput(BadInputContract):
    """Runs with the module's factories: the raw bodies go into Redis's keys through
    ``RedisBroker.publish``, as a producer of another program would write them."""


class TestRedisRetry(RetryContract):
    """Runs with the module's factories."""
