"""The contract suites catch broken components, and a failing contract test is reported plainly.

Each case runs a suite through ``pytester`` (in a subprocess, as a component author would run
it) against a deliberately broken subclass of an in-memory component, and asserts that exactly
the test guarding that guarantee fails.
"""

from __future__ import annotations

import re

import pytest

from qtasks_testing.contract import SharedServerContract

pytest_plugins = ["pytester"]

BROKEN = '''
import time

import anyio
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


class FencesOnlyFinalSaves(MemoryStorage):
    """Checks the fence of final saves only: a stale worker's retry replaces the newer attempt."""

    async def save(self, record, *, fence=None):
        return await super().save(record, fence=fence if record.status.final else None)


class BeginReopensFinished(MemoryStorage):
    """begin() over a success, error or expired record starts the task again."""

    async def begin(self, record, *, generation=0):
        stored = self._records.get(record.uuid)
        if stored is not None and stored.status.final and stored.status is not TaskStatus.CANCEL:
            stored.status = TaskStatus.PROCESS
            self._records[record.uuid] = stored  # a final record is read as a new object
            self._index(stored)
        return await super().begin(record, generation=generation)


class ExpiresFromCreation(MemoryStorage):
    """Counts result_ttl from the record's creation, not from its final save."""

    def _expire(self):
        now = self._clock()
        for uuid, stored in list(self._records.items()):
            if stored.status.final and stored.created_at + self._ttl <= now:
                del self._records[uuid]
                self._forget(uuid)
        super()._expire()


class PolledSteps(MemoryStorage):
    """steps() looks for new steps every 0.4 s instead of being woken by add_step."""

    async def steps(self, uuid, start=0):
        index = start
        while True:
            steps = self._steps.get(uuid, [])
            for value in steps[index:]:
                yield value
            index = len(steps)
            stored = self._records.get(uuid)
            if stored is None or stored.status.final:
                if index >= len(self._steps.get(uuid, [])):
                    return
                continue
            await anyio.sleep(0.4)


class PollsForPublishes(MemoryBroker):
    """A publish does not wake a waiting consumer: it looks for messages every 0.4 s."""

    def _wake(self):
        pass

    def _promote(self):
        due = super()._promote()
        return 0.4 if due is None else min(due, 0.4)


class ChecksDueRarely(MemoryBroker):
    """Checks for due delayed messages every 0.4 s, not at their eta."""

    def _promote(self):
        due = super()._promote()
        return 0.4 if self._delayed else due


class DeadLettersAtPriorityZero(MemoryBroker):
    """Puts requeued dead letters back at priority 0, whatever their own priority was."""

    async def requeue_dead_letters(self, ids=None):
        self._prune_dead()  # keeps the retention: only the priority is broken
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


class TestFencesOnlyFinalSaves(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return FencesOnlyFinalSaves.from_config


class TestBeginReopensFinished(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return BeginReopensFinished.from_config


class TestExpiresFromCreation(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return ExpiresFromCreation.from_config


class TestPolledSteps(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return PolledSteps.from_config


class TestPollsForPublishes(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        return PollsForPublishes.from_config


class TestChecksDueRarely(BrokerContract):
    @pytest.fixture
    def broker_factory(self):
        return ChecksDueRarely.from_config
'''


OPTIONS = ("-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function")


def failed_tests(result: pytest.RunResult) -> set[str]:
    return set(re.findall(r"^FAILED \S+::(\w+::\w+)", result.stdout.str(), flags=re.M))


def test_the_suites_catch_broken_components(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken=BROKEN)
    # The broker suite is long (leases, delays): run its dead-letter tests only; and for the
    # later storages, the tests of the guarantees they break (each must fail only its own).
    later = "FencesOnlyFinal or ReopensFinished or FromCreation or PolledSteps"
    tests = "another_token or begin_marks or begin_leaves or result_ttl or follow_live"
    result = pytester.runpytest_subprocess(
        *OPTIONS,
        "-k",
        f"FalsyAsNone or CancelsOnlyNew or ({later}) and ({tests}) or PriorityZero and dead_letter",
    )
    assert failed_tests(result) == {
        "TestCancelsOnlyNew::test_cancel_marks_a_running_record",
        "TestFalsyAsNone::test_falsy_results_are_kept_as_they_are",
        "TestDeadLettersAtPriorityZero::test_requeued_dead_letters_keep_their_priority",
        "TestFencesOnlyFinalSaves::test_fenced_save_refused_for_another_token",
        "TestFencesOnlyFinalSaves::test_begin_marks_the_attempt_and_keeps_other_fields",
        "TestBeginReopensFinished::test_begin_leaves_a_final_record_alone",
        "TestExpiresFromCreation::test_final_records_expire_after_result_ttl",
        "TestPolledSteps::test_steps_follow_live_until_final",
    }, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] >= 2 * 30 + 4 * 3, outcomes  # the rest of those suites holds


def test_the_broker_suite_catches_polling(pytester: pytest.Pytester) -> None:
    """A consumer that polls instead of being woken by a publish, and one that checks for due
    delayed messages every 0.4 s, fail the test of that guarantee; the real broker passes."""
    pytester.makepyfile(test_broken=BROKEN)
    woken, due = "test_consumer_waiting_is_woken_by_publish", "promptly_after"
    result = pytester.runpytest_subprocess(
        *OPTIONS,
        "-k",
        f"PollsForPublishes and {woken} or ChecksDueRarely and {due} "
        f"or DeadLettersAtPriorityZero and ({woken} or {due})",
    )
    assert failed_tests(result) == {
        f"TestPollsForPublishes::{woken}",
        "TestChecksDueRarely::test_delayed_message_not_before_eta_promptly_after",
    }, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] == 2, outcomes  # the real broker's two


POLLING_STORAGES = '''
import time
from functools import partial

import anyio
import pytest

from qtasks.errors import TaskTimeoutError
from qtasks.memory import MemoryStorage
from qtasks_testing.contract import CancelFeedContract, StorageContract


class PollsForFinal(MemoryStorage):
    """wait() looks at the record every ``interval`` s instead of being woken by its save."""

    interval = 0.1

    async def wait(self, uuid, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stored = self._records.get(uuid)
            if stored is not None and stored.status.final:
                return stored.copy()
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeoutError(uuid, timeout)
            await anyio.sleep(self.interval)


class PollsForCancels(MemoryStorage):
    """follow_cancels() passes on the cancels it was told of every ``interval`` s only."""

    interval = 0.1

    async def follow_cancels(
        self, on_cancel, *, on_live=None, task_status=anyio.TASK_STATUS_IGNORED
    ):
        told = []
        follow = super().follow_cancels
        async with anyio.create_task_group() as tg:
            await tg.start(partial(follow, lambda *notice: told.append(notice), on_live=on_live))
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                while told:
                    on_cancel(*told.pop(0))


class PollsForFinalSlowly(PollsForFinal):
    interval = 0.4


class PollsForCancelsSlowly(PollsForCancels):
    interval = 0.4


class OnStorage:
    """Runs its suite on ``component`` (a storage class)."""

    component = MemoryStorage

    @pytest.fixture
    def storage_factory(self):
        return self.component.from_config


# At the suites' default wake_latency (0.03 s) a poller of 0.1 s or more fails, and the real
# storage passes.
class TestPollsForFinal(OnStorage, StorageContract):
    component = PollsForFinal


class TestPollsForFinalSlowly(OnStorage, StorageContract):
    component = PollsForFinalSlowly


class TestPollsForCancels(OnStorage, CancelFeedContract):
    component = PollsForCancels


class TestPollsForCancelsSlowly(OnStorage, CancelFeedContract):
    component = PollsForCancelsSlowly


class TestWokenStorage(OnStorage, StorageContract):
    """The real storage, at the default."""


class TestWokenCancelFeed(OnStorage, CancelFeedContract):
    """The real storage's feed, at the default."""
'''


def test_the_storage_suites_catch_polling(pytester: pytest.Pytester) -> None:
    """A wait that polls for the final save, and a cancel feed that passes cancels on at each
    poll, fail the tests of those guarantees (every 100 ms at a wake_latency of 0.03 s, every
    0.4 s at the default); the real storage passes them at 0.03 s."""
    pytester.makepyfile(test_polling=POLLING_STORAGES)
    heard, every = "test_follow_cancels_reports_cancels_of_running_records", "every_follower"
    woken = "test_wait_is_woken_by_save_not_polled"
    result = pytester.runpytest_subprocess(*OPTIONS, "-k", f"{woken} or {heard} or {every}")
    polling = {
        *(f"{case}::{woken}" for case in ("TestPollsForFinal", "TestPollsForFinalSlowly")),
        *(
            f"{case}::{test}"
            for case in ("TestPollsForCancels", "TestPollsForCancelsSlowly")
            for test in (heard, "test_every_follower_hears_a_cancel")
        ),
    }
    assert failed_tests(result) == polling, result.stdout.str()
    result.stdout.fnmatch_lines(
        ["*median latency * ms, not under 30 ms (polled rather than woken?)*"]
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert outcomes["passed"] == 3, outcomes  # the real storage's three


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


BROKEN_CAPABILITIES = '''
import pytest

from qtasks.memory import MemoryBroker, MemoryStorage
from qtasks.record import TaskStatus
from qtasks_testing.contract import (
    CancelCheckContract,
    CancelFeedContract,
    LeaseBatchContract,
    SharedServerContract,
    StorageContract,
)


class SuccessReplacesCancel(MemoryStorage):
    """save() lets a final status replace another final one: a late success over a cancel."""

    async def save(self, record, *, fence=None):
        stored = self._records.get(record.uuid)
        if (
            stored is not None
            and stored.status.final
            and record.status.final
            and (fence is None or stored.token in (None, fence))
        ):
            self._records[record.uuid] = record.copy()
            self._fire(record.uuid)
            return True
        return await super().save(record, fence=fence)


class AcksThroughTheFence(MemoryBroker):
    """ack_final acks even when the fence refused the save (another attempt owns the task)."""

    async def ack_final(self, delivery, storage, record):
        saved = await storage.save(record, fence=delivery.token)
        await delivery.ack()
        return saved


class LeavesEndedTasksUnacked(MemoryBroker):
    """ack_final acks only an accepted save: a task cancelled while it ran is redelivered."""

    async def ack_final(self, delivery, storage, record):
        saved = await storage.save(record, fence=delivery.token)
        if saved:
            await delivery.ack()
        return saved


class RenewsEveryLease(MemoryBroker):
    """extend_many says True for every delivery, settled or stale ones too."""

    async def extend_many(self, deliveries):
        await super().extend_many(deliveries)
        return [True] * len(deliveries)


class EveryFinalIsCancelled(MemoryStorage):
    """cancelled() reports every final record, not only the cancelled ones."""

    async def cancelled(self, uuids):
        found = {}
        for uuid in uuids:
            stored = self._records.get(uuid)
            if stored is not None and stored.status.final:
                found[uuid] = stored.cancel_reason or "cancelled"
        return found


class FeedsQueuedCancels(MemoryStorage):
    """The cancel feed also tells of cancels of queued (new) records."""

    async def cancel(self, uuid, reason):
        stored = self._records.get(uuid)
        queued = stored is not None and stored.status is TaskStatus.NEW
        cancelled = await super().cancel(uuid, reason)
        if queued:
            for follower in list(self._cancel_followers):
                follower(uuid, reason)
        return cancelled


class NotASharedServer(MemoryBroker):
    """Without the capability: its suite must be skipped, with the reason, not passed."""

    shares_server_with = None


class SharesNothing(MemoryBroker):
    """A SharedServer wired with a storage it does not share a server with: an error."""

    def shares_server_with(self, storage):
        return False


class TestSuccessReplacesCancel(StorageContract):
    @pytest.fixture
    def storage_factory(self):
        return SuccessReplacesCancel.from_config


class Shared(SharedServerContract):
    @pytest.fixture
    def storage_factory(self):
        return MemoryStorage.from_config


class TestAcksThroughTheFence(Shared):
    @pytest.fixture
    def broker_factory(self):
        return AcksThroughTheFence.from_config


class TestLeavesEndedTasksUnacked(Shared):
    @pytest.fixture
    def broker_factory(self):
        return LeavesEndedTasksUnacked.from_config


class TestNotASharedServer(Shared):
    @pytest.fixture
    def broker_factory(self):
        return NotASharedServer.from_config


class TestSharesNothing(Shared):
    @pytest.fixture
    def broker_factory(self):
        return SharesNothing.from_config


class TestRenewsEveryLease(LeaseBatchContract):
    @pytest.fixture
    def broker_factory(self):
        return RenewsEveryLease.from_config


class TestEveryFinalIsCancelled(CancelCheckContract):
    @pytest.fixture
    def storage_factory(self):
        return EveryFinalIsCancelled.from_config


class TestFeedsQueuedCancels(CancelFeedContract):
    @pytest.fixture
    def storage_factory(self):
        return FeedsQueuedCancels.from_config
'''


def test_the_capability_suites_catch_broken_components(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_broken_capabilities=BROKEN_CAPABILITIES)
    result = pytester.runpytest_subprocess(*OPTIONS, "-rfEs")
    output = result.stdout.str()
    assert failed_tests(result) == {
        "TestSuccessReplacesCancel::test_final_record_not_overwritten_by_another_final",
        "TestAcksThroughTheFence::test_ack_final_refused_by_the_fence_acks_nothing",
        "TestAcksThroughTheFence::test_ack_finals_is_ack_final_per_pair_in_order",
        "TestLeavesEndedTasksUnacked::test_ack_final_refused_because_final_acks",
        "TestLeavesEndedTasksUnacked::test_ack_final_over_a_final_record_without_a_token_acks",
        "TestLeavesEndedTasksUnacked::test_ack_finals_is_ack_final_per_pair_in_order",
        "TestRenewsEveryLease::test_extend_many_is_false_for_settled_and_stale_in_order",
        "TestEveryFinalIsCancelled::test_cancelled_returns_the_reasons_of_cancelled_records_only",
        "TestFeedsQueuedCancels::test_follow_cancels_reports_cancels_of_running_records",
    }, output
    shared_tests = {name for name in dir(SharedServerContract) if name.startswith("test_")}
    errors = set(re.findall(r"^ERROR \S+::(\w+::\w+)", output, flags=re.M))
    assert errors == {f"TestSharesNothing::{name}" for name in shared_tests}, output
    result.stdout.fnmatch_lines(["*shares_server_with() is False for the suite's MemoryStorage*"])
    # A component without the capability: every test of the suite skipped, with the reason.
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped") == len(shared_tests), outcomes
    result.stdout.fnmatch_lines(
        ["SKIPPED *NotASharedServer does not implement the optional capability SharedServer*"]
    )
    assert outcomes["passed"] >= 30 + 3 * 3, outcomes  # what the broken parts do not touch


BROKEN_FAILED_MEMBER = '''
import pytest

from qtasks.memory import MemoryStorage
from qtasks_testing.contract import FailedMemberContract


class LastFailureWins(MemoryStorage):
    """failed_member names the last member that failed or was cancelled, whether or not it
    opened the error gate (after the workflow ended too), and keeps it for ever."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last = {}

    async def member_done(self, record):
        if record.status.value in ("error", "cancel"):
            self._last[record.workflow] = record.uuid
        return await super().member_done(record)

    async def failed_member(self, workflow):
        return self._last.get(workflow)


class NoFailedMember(MemoryStorage):
    """A WorkflowStore written before FailedMember: its suite is skipped, not passed."""

    failed_member = None


class TestLastFailureWins(FailedMemberContract):
    @pytest.fixture
    def storage_factory(self):
        return LastFailureWins.from_config


class TestNoFailedMember(FailedMemberContract):
    @pytest.fixture
    def storage_factory(self):
        return NoFailedMember.from_config


class TestMemory(FailedMemberContract):
    @pytest.fixture
    def storage_factory(self):
        return MemoryStorage.from_config
'''


def test_the_failed_member_suite_catches_a_broken_one_and_skips_a_store_without(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_broken_failed_member=BROKEN_FAILED_MEMBER)
    result = pytester.runpytest_subprocess(*OPTIONS, "-rfEs")
    output = result.stdout.str()
    assert failed_tests(result) == {
        "TestLastFailureWins::test_the_member_that_opened_the_error_gate_and_no_other",
        "TestLastFailureWins::test_none_when_no_member_failed_it",  # [cancel]
        "TestLastFailureWins::test_forgotten_with_the_workflow_s_record",
    }, output
    outcomes = result.parseoutcomes()
    assert (outcomes.get("failed"), outcomes.get("skipped"), outcomes.get("passed")) == (
        3,
        6,
        6 + 3,
    ), output
    result.stdout.fnmatch_lines(
        ["SKIPPED *NoFailedMember does not implement the optional capability FailedMember*"]
    )
