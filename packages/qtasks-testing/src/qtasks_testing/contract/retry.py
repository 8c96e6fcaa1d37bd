"""The retry contract suite: :class:`RetryContract`.

A worker of any backend running a task that raises: it is run again as its ``retry`` says,
through the broker's delayed delivery, and no more; then its record ends ``error`` with the
exception, and nothing of it is left in the broker.
"""

from __future__ import annotations

import uuid

import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.config import QueueConfig
from qtasks.record import TaskStatus
from qtasks_testing.contract._base import ContractSuite, wait_until
from qtasks_testing.contract.broker import BrokerFactory
from qtasks_testing.contract.storage import StorageFactory


class RetryContract(ContractSuite):
    """Retries of a task that raises, on a serving app (the plan's F5).

    Provide ``broker_factory`` and ``storage_factory`` fixtures, as for
    :class:`~qtasks_testing.contract.BadInputContract`.
    """

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.mark.anyio
    async def test_a_task_that_always_raises_runs_its_retries_then_ends_error(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
    ) -> None:
        """``retry=3`` with a backoff of 10 ms doubling (10, 20, 40 ms) on a task that raises
        every time: it runs exactly 4 times, its record ends ``error`` at attempt 4 with the
        exception's type and message (in ``error`` and the traceback), it is not
        dead-lettered, and the broker is left with nothing ready, delayed or in flight, so no
        fifth run can come."""
        app = AsyncQueueTasks(
            f"contract-retry-{uuid.uuid4().hex[:8]}",
            broker=broker_factory(contract_config),
            storage=storage_factory(contract_config),
            config=contract_config,
        )
        runs: list[int] = []

        @app.task(retry=3, retry_backoff=0.01)
        async def always_fails(n: int) -> None:
            runs.append(n)
            raise ValueError(f"always fails, run {len(runs)} of {n}")

        async with app:
            task = await app.add_task("always_fails", 7)
            final = await app.wait(task.uuid, timeout=30)

            async def drained() -> bool:
                stats = await app.broker.stats()
                return (stats.in_flight, sum(stats.ready_by_priority.values()), stats.delayed) == (
                    0,
                    0,
                    0,
                )

            await wait_until(drained, timeout=10, what="the broker to hold nothing")
            letters = await app.broker.dead_letters(limit=1000)
            after = await app.get(task.uuid)
        assert runs == [7] * 4
        assert final is not None and after is not None
        assert (final.status, final.attempt, final.error) == (
            TaskStatus.ERROR,
            4,
            "ValueError: always fails, run 4 of 7",
        )
        assert "ValueError: always fails, run 4 of 7" in (final.traceback or "")
        assert (after.status, after.attempt) == (TaskStatus.ERROR, 4)
        assert [letter.id for letter in letters if letter.id == task.uuid] == []
