"""The storage contract suite: :class:`StorageContract`.

Over ~500 lines: one suite, a test per guarantee of :class:`~qtasks.components.Storage`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest

from qtasks.components import Storage
from qtasks.config import QueueConfig
from qtasks.errors import ComponentNotStartedError, TaskTimeoutError
from qtasks.record import TaskRecord, TaskStatus
from qtasks.steps import StepsRestarted
from qtasks_testing.contract._base import ContractSuite, assert_woken, spread, wait_until

StorageFactory = Callable[[QueueConfig], Storage]


def record(status: TaskStatus = TaskStatus.NEW, **fields: Any) -> TaskRecord:
    """A record with a fresh uuid and JSON-like arguments."""
    values: dict[str, Any] = {
        "uuid": uuid.uuid4().hex,
        "task_name": "contract_task",
        "status": status,
        "args": [1, "two", [3.5, None], {"four": True}],
        "kwargs": {"name": "ünïcode ✓", "n": -7},
    }
    values.update(fields)
    return TaskRecord(**values)


def finished(rec: TaskRecord, status: TaskStatus = TaskStatus.SUCCESS, **fields: Any) -> TaskRecord:
    """A copy of ``rec`` moved to ``status`` (final by default)."""
    done = rec.copy()
    done.status = status
    done.updated_at = time.time()
    for key, value in fields.items():
        setattr(done, key, value)
    return done


class StorageContract(ContractSuite):
    """The guarantees of :class:`qtasks.components.Storage`, as tests.

    Subclass it (``class TestMyStorage(StorageContract)``) and provide a ``storage_factory``
    fixture returning a callable that takes the :class:`~qtasks.config.QueueConfig` and returns an
    **unstarted** storage on an **empty, isolated** namespace (a fresh key prefix per call). The
    suite starts it on an :class:`~contextlib.AsyncExitStack` it closes after the test; the TTL
    test starts a second one from the same factory with ``result_ttl=0.5``.
    """

    @pytest.fixture
    async def storage(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> AsyncIterator[Storage]:
        """A started storage from ``storage_factory``, stopped after the test."""
        async with AsyncExitStack() as stack:
            storage = storage_factory(contract_config)
            await storage.start(stack, contract_config)
            yield storage

    # --- lifecycle ------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_satisfies_the_protocol(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        assert isinstance(storage_factory(contract_config), Storage)

    @pytest.mark.anyio
    async def test_use_before_start_raises(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        storage = storage_factory(contract_config)
        with pytest.raises(ComponentNotStartedError):
            await storage.add(record())

    @pytest.mark.anyio
    async def test_shared_start_is_reference_counted(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        """Several apps in one process may share a component: it stops with the last stack."""
        storage = storage_factory(contract_config)
        first, second = AsyncExitStack(), AsyncExitStack()
        await storage.start(first, contract_config)
        await storage.start(second, contract_config)
        await second.aclose()
        await storage.get("no-such-uuid")  # still started: the first stack holds it
        await first.aclose()
        with pytest.raises(ComponentNotStartedError):
            await storage.get("no-such-uuid")

    @pytest.mark.anyio
    async def test_use_after_stop_raises(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        async with AsyncExitStack() as stack:
            storage = storage_factory(contract_config)
            await storage.start(stack, contract_config)
        with pytest.raises(ComponentNotStartedError):
            await storage.get("anything")

    # --- records --------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_add_get_round_trip(self, storage: Storage) -> None:
        rec = record(priority=-3, parent_uuid="p" * 32, eta=time.time() + 10)
        await storage.add(rec)
        assert await storage.get(rec.uuid) == rec
        assert await storage.get(uuid.uuid4().hex) is None

    @pytest.mark.anyio
    async def test_save_overwrites_the_whole_record(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        running = finished(rec, TaskStatus.PROCESS, attempt=1, worker="w1", token="t1")
        assert await storage.save(running) is True
        assert await storage.get(rec.uuid) == running
        done = finished(running, returning={"answer": [42]}, error=None)
        assert await storage.save(done, fence="t1") is True
        assert await storage.get(rec.uuid) == done

    @pytest.mark.anyio
    async def test_save_of_an_unknown_record_stores_it(self, storage: Storage) -> None:
        rec = record(TaskStatus.PROCESS, token="t1")
        assert await storage.save(rec, fence="t1") is True
        assert await storage.get(rec.uuid) == rec

    @pytest.mark.anyio
    async def test_fenced_save_refused_for_another_token(self, storage: Storage) -> None:
        """The fence holds for every status, not only final ones: a worker that lost its lease
        also writes ``retry`` (its task failed), ``process`` and ``new`` (handing the message
        back), and none of them may replace the newer attempt's record or token."""
        rec = record()
        await storage.add(rec)
        # A stored record without a token accepts any fence.
        newer = finished(rec, TaskStatus.PROCESS, attempt=2, token="new-token")
        assert await storage.save(newer, fence="whatever") is True
        stale_writes = [
            finished(rec, TaskStatus.RETRY, attempt=1, token="old-token", eta=time.time() + 30),
            finished(rec, TaskStatus.PROCESS, attempt=1, token="old-token"),
            finished(rec, TaskStatus.NEW, attempt=1, token="old-token", eta=time.time() + 30),
            finished(rec, TaskStatus.SUCCESS, attempt=1, token="old-token", returning=1),
        ]
        for stale in stale_writes:
            assert await storage.save(stale, fence="old-token") is False, f"stale {stale.status}"
            assert await storage.get(rec.uuid) == newer, f"stale {stale.status} written"
        ok = finished(newer, returning=2)
        assert await storage.save(ok, fence="new-token") is True
        assert await storage.get(rec.uuid) == ok

    @pytest.mark.anyio
    async def test_falsy_results_are_kept_as_they_are(self, storage: Storage) -> None:
        """``0``, ``""``, ``[]``, ``{}`` and ``False`` are results, not "no result"."""
        values: list[Any] = [0, 0.0, "", [], {}, False, None]
        records = [record() for _ in values]
        for rec, value in zip(records, values, strict=True):
            await storage.add(rec)
            claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
            begun = await storage.begin(claim)
            assert await storage.save(finished(begun, returning=value), fence="t1") is True
        for rec, value in zip(records, values, strict=True):
            stored = await storage.get(rec.uuid)
            assert stored is not None
            got = stored.returning
            assert (type(got), got) == (type(value), value), f"stored {value!r}, read {got!r}"
            with anyio.fail_after(2):
                waited = (await storage.wait(rec.uuid, 2)).returning
            assert (type(waited), waited) == (type(value), value)

    @pytest.mark.anyio
    async def test_final_record_not_overwritten_by_non_final(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        done = finished(rec, returning="result")
        assert await storage.save(done) is True
        for status in (TaskStatus.NEW, TaskStatus.PROCESS, TaskStatus.RETRY):
            assert await storage.save(finished(rec, status)) is False
        assert await storage.get(rec.uuid) == done

    @pytest.mark.anyio
    async def test_final_record_not_overwritten_by_another_final(self, storage: Storage) -> None:
        """Final is final between final statuses too, fenced or not: a success that comes in
        after a cancel (made while the task ran) leaves the cancel. The same final status is
        accepted (a repeated final save), and :meth:`add` (a deliberate reset) replaces."""
        finals = (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCEL, TaskStatus.EXPIRED)
        for status in finals:
            rec = record()
            await storage.add(rec)
            claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
            begun = await storage.begin(claim)
            stored = finished(begun, status, returning="first", cancel_reason="first")
            assert await storage.save(stored, fence="t1") is True
            for other in finals:
                if other is status:
                    continue
                late = finished(begun, other, returning="late", cancel_reason="late")
                assert await storage.save(late, fence="t1") is False, f"{other} over {status}"
                assert await storage.save(late) is False, f"unfenced {other} over {status}"
                assert await storage.get(rec.uuid) == stored, f"{other} replaced {status}"
            again = finished(stored, status, returning="again", cancel_reason="again")
            assert await storage.save(again, fence="t1") is True, f"{status} again refused"
            assert await storage.get(rec.uuid) == again
            reset = record(uuid=rec.uuid, priority=2)
            await storage.add(reset)
            assert await storage.get(rec.uuid) == reset
            another = next(final for final in finals if final is not status)
            assert await storage.save(finished(reset, another, returning="new")) is True
        # A cancel through cancel() is final in the same way.
        rec = record()
        await storage.add(rec)
        cancelled = await storage.cancel(rec.uuid, "not wanted")
        assert cancelled is not None
        assert await storage.save(finished(rec, returning="late")) is False
        assert await storage.save(finished(rec, TaskStatus.ERROR, error="late")) is False
        stored_cancel = await storage.get(rec.uuid)
        assert stored_cancel is not None
        assert (stored_cancel.status, stored_cancel.cancel_reason) == (
            TaskStatus.CANCEL,
            "not wanted",
        )

    # --- cancel ---------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_begin_marks_the_attempt_and_keeps_other_fields(self, storage: Storage) -> None:
        rec = record(parent_uuid="parent-1")
        await storage.add(rec)
        claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=2, token="tok-2")
        claim.worker = "worker-a"
        begun = await storage.begin(claim)
        assert begun.status is TaskStatus.PROCESS
        assert (begun.attempt, begun.token, begun.worker) == (2, "tok-2", "worker-a")
        assert begun.parent_uuid == "parent-1"  # kept from the stored record
        assert begun.args == rec.args
        assert begun.updated_at >= rec.updated_at
        stored = await storage.get(rec.uuid)
        assert stored is not None
        assert (stored.status, stored.attempt, stored.token) == (TaskStatus.PROCESS, 2, "tok-2")
        # the begun attempt's token fences writes from then on, whatever their status
        for status in (TaskStatus.RETRY, TaskStatus.PROCESS, TaskStatus.SUCCESS):
            stale = finished(stored, status, attempt=1, token="tok-1", eta=time.time() + 30)
            assert await storage.save(stale, fence="tok-1") is False, f"stale {status}"
            assert await storage.get(rec.uuid) == stored, f"stale {status} written"
        assert await storage.save(finished(stored), fence="tok-2") is True

    @pytest.mark.anyio
    async def test_a_record_begun_again_after_a_retry_says_when_this_run_began(
        self, storage: Storage
    ) -> None:
        rec = record()
        await storage.add(rec)
        first = await storage.begin(
            record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="tok-1")
        )
        retried = finished(first, TaskStatus.RETRY, attempt=1, token="tok-1")
        retried.started_at = first.updated_at - 60.0  # the failed run's, kept by the retry
        assert await storage.save(retried, fence="tok-1") is True
        again = await storage.begin(
            record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=2, token="tok-2")
        )
        stored = await storage.get(rec.uuid)
        assert stored is not None and stored.status is TaskStatus.PROCESS
        # The run under way began when it was begun, not when the failed run did.
        assert again.started_at == again.updated_at
        assert stored.started_at == stored.updated_at == again.updated_at

    @pytest.mark.anyio
    async def test_begin_without_a_stored_record_stores_it(self, storage: Storage) -> None:
        claim = record(status=TaskStatus.PROCESS, attempt=1, token="t1")
        begun = await storage.begin(claim)
        assert (begun.uuid, begun.status, begun.attempt) == (claim.uuid, TaskStatus.PROCESS, 1)
        stored = await storage.get(claim.uuid)
        assert stored is not None
        assert stored.args == claim.args

    @pytest.mark.anyio
    async def test_begin_leaves_a_final_record_alone(self, storage: Storage) -> None:
        """A redelivered message whose record is final (cancelled while queued, or finished
        by an attempt whose ack was lost) must not run again: ``begin`` returns the record
        unchanged and writes nothing, for every final status."""
        rec = record()
        await storage.add(rec)
        cancelled = await storage.cancel(rec.uuid, "not wanted")
        assert cancelled is not None
        claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="late")
        begun = await storage.begin(claim)
        assert begun.status is TaskStatus.CANCEL
        assert begun.cancel_reason == "not wanted"
        stored = await storage.get(rec.uuid)
        assert stored is not None
        assert stored.status is TaskStatus.CANCEL
        assert stored.token != "late"
        ends: dict[TaskStatus, dict[str, Any]] = {
            TaskStatus.SUCCESS: {"returning": {"answer": 42}},
            TaskStatus.ERROR: {"error": "ValueError: x", "traceback": "Traceback..."},
            TaskStatus.EXPIRED: {"error": "expired before it started"},
        }
        for status, fields in ends.items():
            rec = record()
            await storage.add(rec)
            first = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
            done = finished(await storage.begin(first), status, **fields)
            assert await storage.save(done, fence="t1") is True
            again = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=2, token="late")
            again.worker = "worker-b"
            assert await storage.begin(again) == done, f"begin changed a {status} record"
            assert await storage.get(rec.uuid) == done, f"begin wrote over a {status} record"

    @pytest.mark.anyio
    async def test_add_replaces_a_stored_record_by_default(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        await storage.save(finished(rec))
        reset = record(uuid=rec.uuid, priority=4)
        await storage.add(reset)
        assert await storage.get(rec.uuid) == reset

    @pytest.mark.anyio
    async def test_add_without_replace_stores_a_new_record(self, storage: Storage) -> None:
        rec = record(parent_uuid="p" * 32)
        await storage.add(rec, replace=False)
        assert await storage.get(rec.uuid) == rec
        assert _nonzero(await storage.stats()) == {"new": 1}

    @pytest.mark.anyio
    async def test_add_without_replace_never_sets_a_begun_record_back(
        self, storage: Storage
    ) -> None:
        """The producer's add may land after the worker's begin (the message was published
        concurrently): the begun attempt stays, and so does its fence."""
        rec = record()
        claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
        await storage.begin(claim)
        await storage.add(rec, replace=False)
        stored = await storage.get(rec.uuid)
        assert stored is not None
        assert (stored.status, stored.token, stored.attempt) == (TaskStatus.PROCESS, "t1", 1)
        assert _nonzero(await storage.stats()) == {"process": 1}
        assert await storage.save(finished(stored), fence="t1") is True

    @pytest.mark.anyio
    async def test_add_without_replace_never_sets_a_final_record_back(
        self, storage: Storage
    ) -> None:
        rec = record()
        claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
        begun = await storage.begin(claim)
        done = finished(begun, returning=42)
        assert await storage.save(done, fence="t1") is True
        await storage.add(rec, replace=False)
        assert await storage.get(rec.uuid) == done
        with anyio.fail_after(5):  # still final: a waiter returns at once
            assert (await storage.wait(rec.uuid, 5)).status is TaskStatus.SUCCESS

    @pytest.mark.anyio
    async def test_cancel_marks_a_pending_record(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        cancelled = await storage.cancel(rec.uuid, "user asked")
        assert cancelled is not None
        assert (cancelled.status, cancelled.cancel_reason) == (TaskStatus.CANCEL, "user asked")
        stored = await storage.get(rec.uuid)
        assert stored is not None
        assert (stored.status, stored.cancel_reason) == (TaskStatus.CANCEL, "user asked")
        assert (stored.args, stored.kwargs) == (rec.args, rec.kwargs)

    @pytest.mark.anyio
    async def test_cancel_marks_a_running_record(self, storage: Storage) -> None:
        """A task can be cancelled while it runs (``begin`` made it ``process``) and while it
        waits for a retry: both are pending, and the cancel is what ``get`` and waiters see.
        (What the worker does with the running task's own final save is the worker's rule,
        not tested here.)"""
        running, retrying = record(), record()
        for rec in (running, retrying):
            await storage.add(rec)
        claim = record(uuid=running.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
        await storage.begin(claim)
        await storage.save(finished(retrying, TaskStatus.RETRY, attempt=1, eta=time.time() + 60))
        for rec in (running, retrying):
            cancelled = await storage.cancel(rec.uuid, "user asked")
            assert cancelled is not None
            assert (cancelled.status, cancelled.cancel_reason) == (TaskStatus.CANCEL, "user asked")
            stored = await storage.get(rec.uuid)
            assert stored is not None
            assert (stored.status, stored.cancel_reason) == (TaskStatus.CANCEL, "user asked")
            assert (stored.args, stored.kwargs) == (rec.args, rec.kwargs)
            with anyio.fail_after(2):  # final now: a waiter returns at once
                assert (await storage.wait(rec.uuid, 2)).status is TaskStatus.CANCEL
        assert _nonzero(await storage.stats()) == {"cancel": 2}

    @pytest.mark.anyio
    async def test_cancel_leaves_final_records_and_unknown_is_none(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        done = finished(rec, returning=5)
        await storage.save(done)
        assert await storage.cancel(rec.uuid, "too late") == done
        assert await storage.get(rec.uuid) == done
        assert await storage.cancel(uuid.uuid4().hex, "nobody") is None

    @pytest.mark.anyio
    async def test_cancel_wakes_waiters(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        async with anyio.create_task_group() as tg:
            got: list[TaskRecord] = []

            async def waiter() -> None:
                got.append(await storage.wait(rec.uuid, timeout=5))

            tg.start_soon(waiter)
            await anyio.sleep(0.05)  # let the waiter block first (it must work either way)
            await storage.cancel(rec.uuid, "stop")
        assert got[0].status is TaskStatus.CANCEL

    # --- waiting --------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_wait_returns_a_final_record_at_once(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        done = finished(rec, TaskStatus.ERROR, error="ValueError: x", traceback="Traceback...")
        await storage.save(done)
        with anyio.fail_after(1):
            assert await storage.wait(rec.uuid, timeout=1) == done

    @pytest.mark.anyio
    async def test_wait_is_woken_by_save_not_polled(self, storage: Storage) -> None:
        """``wait`` returns for the final save, not for a non-final one, and is woken by it,
        not polled: over several rounds the median time from the save to the return is under
        ``wake_latency`` (no round over ``timing_slack``)."""
        latencies = []
        for idle in spread(0.02, 0.2):
            rec = record()
            await storage.add(rec)
            woken = anyio.Event()
            result: list[TaskRecord] = []

            async def waiter(
                uuid: str = rec.uuid, woken: anyio.Event = woken, result: list[TaskRecord] = result
            ) -> None:
                result.append(await storage.wait(uuid, timeout=5))
                woken.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                # Non-final saves must not end the wait.
                await anyio.sleep(0.05)
                await storage.save(finished(rec, TaskStatus.PROCESS))
                await anyio.sleep(idle)  # the waiter waits on, at another point of any poll
                assert not woken.is_set(), "wait returned for a non-final record"
                saved = time.monotonic()
                await storage.save(finished(rec, returning="done"))
                with anyio.move_on_after(self.timing_slack):
                    await woken.wait()
                latencies.append(time.monotonic() - saved)
                assert woken.is_set(), f"wait did not return within {self.timing_slack} s"
            assert result[0].returning == "done"
        assert_woken(latencies, self.wake_latency, "a Storage.wait waiter, after the final save")

    @pytest.mark.anyio
    async def test_every_waiter_is_woken(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        got: list[TaskRecord] = []

        async def waiter() -> None:
            got.append(await storage.wait(rec.uuid, timeout=5))

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(waiter)
                await anyio.sleep(0.05)
                await storage.save(finished(rec))
        assert len(got) == 10
        assert all(r.status is TaskStatus.SUCCESS for r in got)

    @pytest.mark.anyio
    async def test_wait_timeout_raises(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        started = time.monotonic()
        with pytest.raises(TaskTimeoutError) as caught:
            await storage.wait(rec.uuid, timeout=0.3)
        waited = time.monotonic() - started
        assert caught.value.uuid == rec.uuid
        assert 0.29 <= waited < 0.3 + self.timing_slack

    # --- generator steps ------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_steps_are_indexed_and_read_back_in_order(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        values = [0, "one", {"two": [2]}, None, 4.5]
        assert [await storage.add_step(rec.uuid, v) for v in values] == [0, 1, 2, 3, 4]
        await storage.save(finished(rec, steps=len(values)))
        assert [s async for s in storage.steps(rec.uuid)] == values
        assert [s async for s in storage.steps(rec.uuid, start=3)] == values[3:]
        stored = await storage.get(rec.uuid)
        assert stored is not None
        assert stored.steps == len(values)

    @pytest.mark.anyio
    async def test_steps_follow_live_until_final(self, storage: Storage) -> None:
        """``steps()`` follows a running task live: each step is seen once added (woken, not
        polled: the median over the steps is under ``wake_latency``, none over
        ``timing_slack``), and the iterator ends only once the record is final."""
        rec = record()
        await storage.add(rec)
        seen: list[Any] = []
        step_seen = anyio.Event()
        ended = anyio.Event()

        async def follow() -> None:
            nonlocal step_seen
            async for value in storage.steps(rec.uuid):
                seen.append(value)
                step_seen.set()
            ended.set()

        idles = spread(0.02, 0.2)
        latencies = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                for i, idle in enumerate(idles):
                    await anyio.sleep(idle)  # the follower waits for the next step
                    step_seen = anyio.Event()
                    added = time.monotonic()
                    await storage.add_step(rec.uuid, {"i": i})
                    await step_seen.wait()
                    latencies.append(time.monotonic() - added)
                    assert latencies[-1] < self.timing_slack, f"seen {latencies[-1]:.3f} s late"
                assert not ended.is_set(), "steps() ended before the record was final"
                await storage.save(finished(rec, steps=len(idles)))
                await ended.wait()
        assert seen == [{"i": i} for i in range(len(idles))]
        assert_woken(latencies, self.wake_latency, "a live steps() follower, after add_step")

    @pytest.mark.anyio
    async def test_a_record_replaced_by_add_starts_with_no_steps(self, storage: Storage) -> None:
        """:meth:`Storage.add` replaces a record whole (a reset: the task runs again): the
        steps of the record it replaced are not the new one's, whose steps count from 0."""
        rec = record()
        await storage.add(rec)
        for value in ("old-0", "old-1"):
            await storage.add_step(rec.uuid, value)
        await storage.save(finished(rec, steps=2))
        reset = record(uuid=rec.uuid)
        await storage.add(reset)
        assert await storage.get(rec.uuid) == reset
        assert await storage.add_step(rec.uuid, "new-0") == 0
        await storage.save(finished(reset, steps=1))
        with anyio.fail_after(2):
            assert [s async for s in storage.steps(rec.uuid)] == ["new-0"]
        stored = await storage.get(rec.uuid)
        assert stored is not None and stored.steps == 1

    @pytest.mark.anyio
    async def test_steps_of_a_final_record_end(self, storage: Storage) -> None:
        rec = record()
        await storage.add(rec)
        await storage.save(finished(rec))
        with anyio.fail_after(2):
            assert [s async for s in storage.steps(rec.uuid)] == []

    async def _begun(self, storage: Storage, rec: TaskRecord, token: str) -> TaskRecord:
        """``rec`` begun by the delivery holding ``token`` (as a worker begins it)."""
        claim = rec.copy()
        claim.status, claim.token, claim.worker, claim.attempt = (
            TaskStatus.PROCESS,
            token,
            f"worker-{token}",
            1,
        )
        begun = await storage.begin(claim)
        assert begun.token == token
        return begun

    @pytest.mark.anyio
    async def test_a_step_of_a_stale_run_is_refused(self, storage: Storage) -> None:
        """``add_step`` with ``fence`` is fenced as ``save`` is: once a newer delivery began
        the task, the run whose lease was lost gets ``None`` and its step is not stored
        (readers never see it, the record's step count stays); without a record, too."""
        rec = record()
        await storage.add(rec)
        await self._begun(storage, rec, "run-a")
        assert await storage.add_step(rec.uuid, "a0", fence="run-a") == 0
        await self._begun(storage, rec, "run-b")
        assert await storage.add_step(rec.uuid, "stale", fence="run-a") is None
        assert await storage.add_step(rec.uuid, "b0", fence="run-b") == 1
        assert await storage.add_step(rec.uuid, "stale again", fence="run-a") is None
        stored = await storage.get(rec.uuid)
        assert stored is not None and stored.steps == 2
        await storage.save(finished(stored), fence="run-b")
        with anyio.fail_after(2):
            items = [s async for s in storage.steps(rec.uuid)]
        assert items == ["a0", StepsRestarted(2), "b0"]
        assert await storage.add_step(uuid.uuid4().hex, "orphan", fence="run-a") is None

    @pytest.mark.anyio
    async def test_a_step_after_the_end_is_refused(self, storage: Storage) -> None:
        """Final is final for steps too: once the record is final (its run's own final save,
        or a cancel stored as the generator yielded), a late step of that run, fenced or not,
        gets ``None`` and changes nothing: neither the record's step count nor the stream,
        whether steps were stored before the end or none was. (The final records are
        written with ``save``: ``cancel`` has its own test.)"""
        for end in (TaskStatus.SUCCESS, TaskStatus.ERROR, TaskStatus.CANCEL):
            rec = record()
            await storage.add(rec)
            begun = await self._begun(storage, rec, "run-a")
            assert await storage.add_step(rec.uuid, "a0", fence="run-a") == 0
            assert await storage.save(finished(begun, end, steps=1), fence="run-a")
            assert await storage.add_step(rec.uuid, "late", fence="run-a") is None, end
            assert await storage.add_step(rec.uuid, "late, unfenced") is None, end
            stored = await storage.get(rec.uuid)
            assert stored is not None and stored.steps == 1, end
            with anyio.fail_after(2):
                assert [s async for s in storage.steps(rec.uuid)] == ["a0"], end
        quiet = record()
        await storage.add(quiet)
        begun = await self._begun(storage, quiet, "run-q")
        # Ended before the run's first step.
        assert await storage.save(finished(begun, TaskStatus.CANCEL), fence="run-q")
        assert await storage.add_step(quiet.uuid, "late", fence="run-q") is None
        stored = await storage.get(quiet.uuid)
        assert stored is not None and stored.steps == 0
        with anyio.fail_after(2):
            assert [s async for s in storage.steps(quiet.uuid)] == []

    @pytest.mark.anyio
    async def test_a_step_of_an_unknown_task_is_refused(self, storage: Storage) -> None:
        """Without ``fence`` too, a step of a task with no stored record is refused (``None``)
        and stores nothing: a stream with no record would be read by nobody (``steps()`` of
        an unknown task ends at once) and expired or deleted by nothing. A record added
        afterwards starts with no steps."""
        uid = uuid.uuid4().hex
        assert await storage.add_step(uid, "orphan") is None
        rec = record(uuid=uid)
        await storage.add(rec, replace=False)
        assert await storage.add_step(uid, "first") == 0
        await storage.save(finished(rec, steps=1))
        with anyio.fail_after(2):
            assert [s async for s in storage.steps(uid)] == ["first"]
        stored = await storage.get(uid)
        assert stored is not None and stored.steps == 1

    @pytest.mark.anyio
    async def test_a_run_that_starts_over_is_marked_in_the_stream(self, storage: Storage) -> None:
        """A run's first step after steps of another run is preceded by
        ``StepsRestarted(run)`` (2, then 3: the runs that stored steps), in the same write, so
        a live reader sees the marker before the new run's steps; ``start`` counts markers
        and steps alike; the step indexes and the record's count are of steps only."""
        rec = record()
        await storage.add(rec)
        seen: list[Any] = []
        ended = anyio.Event()

        async def follow() -> None:
            async for item in storage.steps(rec.uuid):
                seen.append(item)
            ended.set()

        async def read(n: int) -> bool:
            return len(seen) >= n

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                await self._begun(storage, rec, "run-a")
                assert await storage.add_step(rec.uuid, "a0", fence="run-a") == 0
                assert await storage.add_step(rec.uuid, "a1", fence="run-a") == 1
                await wait_until(lambda: read(2), timeout=5, what="the first run's steps")
                await self._begun(storage, rec, "run-b")  # run-a's worker was lost
                await self._begun(storage, rec, "run-c")  # run-b stored no step: not counted
                assert await storage.add_step(rec.uuid, "c0", fence="run-c") == 2
                await self._begun(storage, rec, "run-d")
                assert await storage.add_step(rec.uuid, "d0", fence="run-d") == 3
                assert await storage.add_step(rec.uuid, "d1", fence="run-d") == 4
                await wait_until(lambda: read(7), timeout=5, what="every item, live")
                stored = await storage.get(rec.uuid)
                assert stored is not None and stored.steps == 5
                await storage.save(finished(stored), fence="run-d")
                await ended.wait()
        expected = ["a0", "a1", StepsRestarted(2), "c0", StepsRestarted(3), "d0", "d1"]
        assert seen == expected
        assert [s async for s in storage.steps(rec.uuid)] == expected  # a late reader too
        assert [s async for s in storage.steps(rec.uuid, start=2)] == expected[2:]
        assert [s async for s in storage.steps(rec.uuid, start=3)] == expected[3:]

    # --- expiry and stats -----------------------------------------------------------------

    @pytest.mark.anyio
    async def test_final_records_expire_after_result_ttl(
        self, storage_factory: StorageFactory, contract_config: QueueConfig
    ) -> None:
        """``result_ttl`` counts from the save that made the record final, not from its
        creation: a task that waited (a delay, a backlog, a retry) or ran longer than the TTL
        keeps its result for the whole TTL; a cancelled record too, from its cancel. Records
        not final never expire."""
        ttl = 0.5
        config = contract_config.merged(result_ttl=ttl)
        async with AsyncExitStack() as stack:
            storage = storage_factory(config)
            await storage.start(stack, config)
            pending, running, done, cancelled = record(), record(), record(), record()
            for rec in (pending, running, done, cancelled):
                await storage.add(rec)
            for rec in (running, done):
                claim = record(uuid=rec.uuid, status=TaskStatus.PROCESS, attempt=1, token="t1")
                await storage.begin(claim)
            await anyio.sleep(ttl + 0.2)  # the task ran longer than result_ttl
            saved = time.monotonic()
            assert await storage.save(finished(done, returning="late"), fence="t1") is True
            assert await storage.cancel(cancelled.uuid, "not needed") is not None
            stored = await storage.get(done.uuid)
            assert stored is not None, "the final record expired at once (TTL from creation?)"
            assert stored.returning == "late"
            await storage.add(done, replace=False)  # a late producer add keeps the expiry
            assert await storage.get(done.uuid) == stored

            async def gone() -> bool:
                return await storage.get(done.uuid) is None and not await storage.get(
                    cancelled.uuid
                )

            await wait_until(gone, timeout=ttl + 1.0, what="the final records to expire")
            assert time.monotonic() - saved >= ttl - 0.1
            # Only final records expire.
            assert await storage.get(pending.uuid) == pending
            still_running = await storage.get(running.uuid)
            assert still_running is not None
            assert (still_running.status, still_running.token) == (TaskStatus.PROCESS, "t1")

    @pytest.mark.anyio
    async def test_stats_count_records_by_status(self, storage: Storage) -> None:
        assert _nonzero(await storage.stats()) == {}
        records = [record() for _ in range(4)]
        for rec in records:
            await storage.add(rec)
        await storage.save(finished(records[0]))
        await storage.save(finished(records[1], TaskStatus.ERROR))
        await storage.save(finished(records[2], TaskStatus.PROCESS))
        assert _nonzero(await storage.stats()) == {"new": 1, "process": 1, "success": 1, "error": 1}


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    """Statuses with no records may be reported as 0 or left out."""
    return {status: n for status, n in counts.items() if n}
