"""Test code that uses qtasks without servers or a worker process, and prove that a component
honours the contract.

* :class:`SyncTestCase` / :class:`AsyncTestCase`: unittest cases around your app.
* :class:`SyncHarness` / :class:`Harness`: the same machinery for any test framework.
* The pytest plugin (``qtasks_testing.pytest_plugin``, loaded automatically): fixtures.
* :mod:`qtasks_testing.contract`: contract suites for brokers, storages and global configs.
"""

from qtasks_testing.cases import AsyncTestCase, SyncTestCase
from qtasks_testing.clock import FakeClock
from qtasks_testing.harness import Harness, HarnessError, HarnessTimeoutError
from qtasks_testing.records import EnqueuedTask
from qtasks_testing.sync_harness import SyncHarness

__all__ = [
    "AsyncTestCase",
    "EnqueuedTask",
    "FakeClock",
    "Harness",
    "HarnessError",
    "HarnessTimeoutError",
    "SyncHarness",
    "SyncTestCase",
]
