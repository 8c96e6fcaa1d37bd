"""The contract suites catch broken components, and a failing contract test is reported plainly.

Each case runs a suite through ``pytester`` (in a subprocess, as a component author would run
it) against a deliberately broken subclass of an in-memory component, and asserts that exactly
the test guarding that guarantee fails.
"""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

BROKEN = '''
import time

import pytest

from qtasks.memory import MemoryBroker, MemoryStorage, _Entry
from qtasks.record import TaskStatus
from qtasks_testing.contract import BrokerContract, StorageContract


class CancelsOnlyNew(MemoryStorage):
    """cancel() works on a new record only: a running or retrying task cannot be cancelled."""

    async def cancel(self, uuid, reason):
        stored = await self.get(uuid)
        if stored is not None and stored.status is not TaskStatus.NEW:
            return stored
        return await super().cancel(uuid, reason)


class FalsyAsNone(MemoryStorage):
    """Stores a falsy result (0, "", [], False) as None."""

    async def save(self, record, *, fence=None):
        record = record.copy()
        record.returning = record.returning or None
        return await super().save(record, fence=fence)


class DeadLettersAtPriorityZero(MemoryBroker):
    """Puts requeued dead letters back at priority 0, whatever their own priority was."""

    async def requeue_dead_letters(self, ids=None):
        chosen = list(self._dead_letters) if ids is None else ids
        count = 0
        for id in chosen:
            letter = self._dead_letters.pop(id, None)
            if letter is not None:
                self._schedule(_Entry(letter.id, letter.body, 0), None)
                count += 1
        return count


class TestCancelsOnlyNew(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return CancelsOnlyNew.from_config


class TestFalsyAsNone(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return FalsyAsNone.from_config


class TestDeadLettersAtPriorityZero(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        return DeadLettersAtPriorityZero.from_config
'''


OPTIONS = ("-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function")


def failed_tests(result: pytest.RunResult) -> set[str]:
    return set(re.findall(r"^FAILED \S+::(\w+::\w+)", result.stdout.str(), flags=re.M))


def test_the_suites_catch_broken_components(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken=BROKEN)
    # The broker suite is long (leases, delays): run its dead-letter tests only.
    result = pytester.runpytest_subprocess(
        *OPTIONS, "-k", "Storage or FalsyAsNone or CancelsOnlyNew or dead_letter"
    )
    assert failed_tests(result) == {
        "TestCancelsOnlyNew::test_cancel_marks_a_running_record",
        "TestFalsyAsNone::test_falsy_results_are_kept_as_they_are",
        "TestDeadLettersAtPriorityZero::test_requeued_dead_letters_keep_their_priority",
    }, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= 2 * 30, outcomes  # the rest of each storage suite holds


FAILS_INSIDE_CONSUMING = """
from contextlib import AsyncExitStack

import pytest

from qtasks.memory import MemoryBroker
from qtasks_testing.contract import BrokerContract, consuming

CLOSED = []


class TracedBroker(MemoryBroker):
    async def start(self, stack: AsyncExitStack, config) -> None:
        await super().start(stack, config)
        stack.callback(CLOSED.append, self)


class TestTraced(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        return TracedBroker.from_config

    @pytest.mark.anyio
    async def test_a_failure_inside_consuming(self, broker) -> None:
        async with consuming(broker) as consumer:
            await consumer.next(timeout=0.1, what="the message nobody sent")

    @pytest.mark.anyio
    async def test_an_assertion_inside_consuming(self, broker) -> None:
        async with consuming(broker):
            assert 1 + 1 == 3, "arithmetic is broken"

    def test_every_broker_was_closed(self) -> None:
        assert len(CLOSED) == 2
"""


def test_a_failure_inside_consuming_closes_the_broker_and_is_reported_plainly(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_traced=FAILS_INSIDE_CONSUMING)
    result = pytester.runpytest_subprocess(*OPTIONS, "-k", "inside or closed")
    output = result.stdout.str() + result.stderr.str()
    outcomes = result.parseoutcomes()
    assert (outcomes.get("failed"), outcomes.get("passed"), outcomes.get("errors")) == (
        2,
        1,
        None,
    ), output
    assert "never retrieved" not in output
    assert "INTERNALERROR" not in output
    assert "ExceptionGroup" not in output
    result.stdout.fnmatch_lines(
        [
            "*Failed: timed out after 0.1 s waiting for the message nobody sent",
            "*AssertionError: arithmetic is broken",
        ]
    )
