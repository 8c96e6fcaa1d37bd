"""The in-memory components of the core against the contract suites."""

from __future__ import annotations

import pytest

from qtasks.memory import MemoryBroker, MemoryGlobalConfig, MemoryStorage
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
def broker_factory() -> BrokerFactory:
    """Every suite here (they declare no factories of their own)."""
    return MemoryBroker.from_config


@pytest.fixture
def storage_factory() -> StorageFactory:
    """Every suite here."""
    return MemoryStorage.from_config


class TestMemoryBroker(BrokerContract):
    """Runs with the module's factories."""


class TestMemoryStorage(StorageContract):
    """Runs with the module's factories."""


class TestMemoryGlobalConfig(GlobalConfigContract):
    @pytest.fixture
    def global_config_factory(self) -> GlobalConfigFactory:
        return MemoryGlobalConfig.from_config


class TestMemoryFlowControl(FlowControlContract):
    @pytest.fixture
    def global_config_factory(self) -> GlobalConfigFactory:
        return MemoryGlobalConfig.from_config


class TestMemorySharedServer(SharedServerContract):
    """The in-memory broker shares its "server", the process, with every MemoryStorage."""


class TestMemorySettleBegin(SettleBeginContract):
    """Runs with the module's factories (the pair SharedServerContract uses)."""


class TestMemoryBringForward(BringForwardContract):
    """Runs with the module's factories."""


class TestMemoryLeaseBatch(LeaseBatchContract):
    """Runs with the module's factories."""


class TestMemoryBuryNotice(BuryNoticeContract):
    """Runs with the module's factories."""


class TestMemoryCancelCheck(CancelCheckContract):
    """Runs with the module's factories."""


class TestMemoryCancelFeed(CancelFeedContract):
    """Runs with the module's factories."""


class TestMemoryStorageQuery(StorageQueryContract):
    """Runs with the module's factories."""


class TestMemoryBeginOnClaim(BeginOnClaimContract):
    pass


class TestMemoryBeginMany(BeginManyContract):
    pass


class TestMemoryAttemptLog(AttemptLogContract):
    """Runs with the module's factories."""


class TestMemoryBulkPublish(BulkPublishContract):
    """Runs with the module's factories."""


class TestMemoryBulkPublishNew(BulkPublishNewContract):
    """Runs with the module's factories."""


class TestMemoryBulkAdd(BulkAddContract):
    """Runs with the module's factories."""


class TestMemoryWorkflowStore(WorkflowStoreContract):
    """Runs with the module's factories."""


class TestMemoryFailedMember(FailedMemberContract):
    """Runs with the module's factories."""


class TestMemoryWorkflowSettle(WorkflowSettleContract):
    """Runs with the module's factories."""


class TestMemoryLeaseLength(LeaseLengthContract):
    @pytest.fixture
    def leased_broker_factory(self) -> LeasedBrokerFactory:
        return lambda lease: MemoryBroker(lease=lease)


class TestMemoryDeliveryLimit(DeliveryLimitContract):
    @pytest.fixture
    def limited_broker_factory(self) -> LimitedBrokerFactory:
        return lambda limit: MemoryBroker(max_deliveries=limit)


class TestMemoryConsumeHealth(ConsumeHealthContract):
    """Runs with the module's factories."""


class TestMemoryLeaseDeadline(LeaseDeadlineContract):
    """Runs with the module's factories."""


class TestMemoryBadInput(BadInputContract):
    """Runs with the module's factories."""


class TestMemoryRetry(RetryContract):
    """Runs with the module's factories."""
