"""Contract suites for qtasks components: subclass one and provide a factory fixture.

The optional capabilities have suites of their own (:mod:`qtasks_testing.contract.capabilities`),
which skip, with the reason shown, every test for a component without the capability.

Every backend in the qtasks repository (in-memory, Redis, RabbitMQ) runs these same suites; they
are the executable form of the docstrings in :mod:`qtasks.components`. See ``docs/testing.md``.
"""

from qtasks_testing.contract._base import ContractSuite, wait_until
from qtasks_testing.contract.bad_input import BadInputContract
from qtasks_testing.contract.broker import (
    BrokerContract,
    BrokerFactory,
    Consumer,
    consuming,
    consuming_from,
    envelope,
)
from qtasks_testing.contract.bulk import (
    BulkAddContract,
    BulkPublishContract,
    BulkPublishNewContract,
    FailedMemberContract,
    WorkflowSettleContract,
    WorkflowStoreContract,
)
from qtasks_testing.contract.capabilities import (
    AttemptLogContract,
    BeginManyContract,
    BeginOnClaimContract,
    BuryNoticeContract,
    CancelCheckContract,
    CancelFeedContract,
    ConsumeHealthContract,
    FreshWaitContract,
    LeaseBatchContract,
    LeaseDeadlineContract,
    SettleBeginContract,
    SharedServerContract,
)
from qtasks_testing.contract.flow import BringForwardContract, FlowControlContract
from qtasks_testing.contract.global_config import GlobalConfigContract, GlobalConfigFactory
from qtasks_testing.contract.lease import (
    DeliveryLimitContract,
    LeasedBrokerFactory,
    LeaseLengthContract,
    LimitedBrokerFactory,
)
from qtasks_testing.contract.query import StorageQueryContract
from qtasks_testing.contract.retry import RetryContract
from qtasks_testing.contract.storage import StorageContract, StorageFactory, finished, record

__all__ = [
    "AttemptLogContract",
    "BadInputContract",
    "BeginManyContract",
    "BeginOnClaimContract",
    "BringForwardContract",
    "BrokerContract",
    "BrokerFactory",
    "BulkAddContract",
    "BulkPublishContract",
    "BulkPublishNewContract",
    "BuryNoticeContract",
    "CancelCheckContract",
    "CancelFeedContract",
    "ConsumeHealthContract",
    "Consumer",
    "ContractSuite",
    "DeliveryLimitContract",
    "FailedMemberContract",
    "FlowControlContract",
    "FreshWaitContract",
    "GlobalConfigContract",
    "GlobalConfigFactory",
    "LeaseBatchContract",
    "LeaseDeadlineContract",
    "LeaseLengthContract",
    "LeasedBrokerFactory",
    "LimitedBrokerFactory",
    "RetryContract",
    "SettleBeginContract",
    "SharedServerContract",
    "StorageContract",
    "StorageFactory",
    "StorageQueryContract",
    "WorkflowSettleContract",
    "WorkflowStoreContract",
    "consuming",
    "consuming_from",
    "envelope",
    "finished",
    "record",
    "wait_until",
]
