"""The harness with workflows: steps a worker publishes later (with a ``delay``), and
``wait(workflow)``."""

import anyio
import pytest

from qtasks import AsyncQueueTasks, QueueTasks, TaskStatus, chain, chord
from qtasks.errors import TaskFailedError, TaskTimeoutError
from qtasks.workflows import SyncWorkflow
from qtasks_testing.harness import Harness, HarnessError, Mode
from qtasks_testing.sync_harness import SyncHarness


def make_app() -> AsyncQueueTasks:
    app = AsyncQueueTasks()

    @app.task
    async def double(n: int) -> int:
        return n * 2

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["inline", "worker"])
async def test_a_later_step_with_a_delay_waits_for_the_clock(mode: Mode) -> None:
    # The second step is published by the worker that finished the first, due 60 s later:
    # its record has no eta, the broker's message has.
    app = make_app()
    double = app.tasks["double"]
    async with Harness(app, mode=mode, timeout=5) as qt:
        qt.freeze_time()
        start = qt.clock.time()
        state = await app.run_workflow(chain(double.s(1), double.s().set(delay=60)))
        with anyio.fail_after(3):
            done = await qt.run_pending()  # the first step only: the second is not due
        # Inline, run_workflow ran (and handed out) the first step already.
        first = [] if mode == "inline" else [(state.members[0], TaskStatus.SUCCESS)]
        assert [(d.uuid, d.status) for d in done] == first
        assert qt.clock.time() == start
        if mode == "inline":
            with pytest.raises(HarnessError, match="is delayed: inline, it runs only when"):
                await qt.wait(state.members[1])
        with anyio.fail_after(3):
            (second,) = await qt.run_pending(include_delayed=True)
        assert (second.uuid, second.returning) == (state.members[1], 4)
        assert qt.clock.time() == start + 60
        ended = await app.get_workflow(state.id)
        assert ended is not None
        assert (ended.status, ended.result) == ("success", 4)


def make_retrying_app() -> AsyncQueueTasks:
    app = make_app()
    tries: list[int] = []

    @app.task(retry=1, retry_backoff=30)
    async def flaky(n: int) -> int:
        tries.append(n)
        if len(tries) == 1:
            raise ConnectionError("down")
        return n + 1

    @app.task
    async def boom(n: int) -> int:
        raise ValueError(f"boom {n}")

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["inline", "worker"])
async def test_wait_takes_a_workflow_and_returns_its_state(mode: Mode) -> None:
    app = make_retrying_app()
    flaky, double = app.tasks["flaky"], app.tasks["double"]
    async with Harness(app, mode=mode, timeout=5) as qt:
        qt.freeze_time()
        state = await app.run_workflow(chain(flaky.s(1), double.s()))
        with anyio.fail_after(3):  # worker: the clock is moved through the 30 s backoff
            ended = await qt.wait(state)
        assert (ended.id, ended.status, ended.result) == (state.id, "success", 4)


@pytest.mark.anyio
async def test_wait_for_a_workflow_raises_its_failure() -> None:
    app = make_retrying_app()
    boom, double = app.tasks["boom"], app.tasks["double"]
    async with Harness(app, mode="worker", timeout=5) as qt:
        state = await app.run_workflow(chain(double.s(1), boom.s()))
        with pytest.raises(TaskFailedError) as raised:
            await qt.wait(state)
        # The member's failure, with its traceback, not the workflow record's summary.
        message = str(raised.value)
        # Called with the first step's result, which its record shows (it showed None).
        assert message.startswith(f"task boom(2) [{state.members[1]}] failed: ValueError")
        assert 'raise ValueError(f"boom {n}")' in message
        assert f"It failed workflow {state.id}" in message
        assert f"It is a member of workflow {state.id}" in message
    async with Harness(app, timeout=5) as qt:  # inline: run_workflow raises it
        with pytest.raises(TaskFailedError) as raised:
            await app.run_workflow(chain(double.s(1), boom.s()))
        assert "It is a member of workflow " in str(raised.value)
        assert "shows None in that argument's place until it ended" in str(raised.value)
    async with Harness(app, mode="worker", timeout=5, raise_task_errors=False) as qt:
        state = await app.run_workflow(chain(boom.s(2), double.s()))
        ended = await qt.wait(state)
        assert ended.status == "error"
        assert "boom 2" in (ended.error or "")


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["inline", "worker"])
async def test_enqueued_shows_a_step_s_input_once_it_started(mode: Mode) -> None:
    # A step fed by the one before is recorded (stored) before that one's result exists:
    # enqueued() and assert_enqueued saw None in its place, even after it ran.
    app = make_app()
    double = app.tasks["double"]

    @app.task
    async def total(xs: list[int], extra: int) -> int:
        return sum(xs) + extra

    async with Harness(app, mode=mode, timeout=5) as qt:
        state = await app.run_workflow(chain(double.s(1), double.s(), double.s()))
        flow = await qt.wait(state)
        chord_state = await app.run_workflow(chord([double.s(1), double.s(2)], total.s(10)))
        ended = await qt.wait(chord_state)
        assert (flow.result, ended.result) == (8, 16)
        assert [(e.uuid, e.args) for e in qt.enqueued(double)][:3] == [
            (state.members[0], [1]),
            (state.members[1], [2]),
            (state.members[2], [4]),
        ]
        qt.assert_enqueued(double, 4)
        qt.assert_enqueued(total, [2, 4], 10)
        qt.assert_not_enqueued(total, None, 10)


def test_the_sync_harness_waits_for_a_workflow_of_the_sync_app() -> None:
    app = QueueTasks()

    @app.task
    def double(n: int) -> int:
        return n * 2

    with SyncHarness(app, mode="worker", timeout=5) as qt:
        state = app.run_workflow(chain(double.s(1), double.s()))
        ended = qt.wait(state)
        assert isinstance(ended, SyncWorkflow)
        assert (ended.status, ended.result) == ("success", 4)


@pytest.mark.anyio
async def test_worker_run_pending_moves_the_clock_through_a_chain_steps_backoff() -> None:
    # The second step waits in its gate (no message yet) while the first is in its 30 s
    # backoff: it is not the worker's to finish, so the clock moves to the retry.
    app = make_retrying_app()
    flaky, double = app.tasks["flaky"], app.tasks["double"]
    async with Harness(app, mode="worker", timeout=5) as qt:
        qt.freeze_time()
        start = qt.clock.time()
        state = await app.run_workflow(chain(flaky.s(1), double.s()))
        with anyio.fail_after(3):
            done = await qt.run_pending()
        assert [(d.task_name, d.status) for d in done] == [
            ("flaky", TaskStatus.SUCCESS),
            ("double", TaskStatus.SUCCESS),
        ]
        assert start < qt.clock.time() <= start + 30  # the backoff, jittered
        ended = await app.get_workflow(state.id)
        assert ended is not None
        assert ended.result == 4


@pytest.mark.anyio
async def test_inline_wait_result_without_a_timeout_on_what_is_delayed_raises() -> None:
    # Nothing runs a delayed task inline until the clock moves: the wait could only hang.
    app = make_app()
    double = app.tasks["double"]
    async with Harness(app, timeout=5) as qt:
        qt.freeze_time()
        task = await double.add_task(1, delay=60)
        state = await app.run_workflow(chain(double.s(1), double.s().set(delay=60)))
        with anyio.fail_after(3):
            with pytest.raises(HarnessError, match=r"task double\(1\) \[.*\] is delayed"):
                await task.wait_result()
            with pytest.raises(HarnessError, match="waits for its step double"):
                await state.wait_result()
            with pytest.raises(HarnessError, match="which is delayed: inline"):
                await qt.wait(state)
            # With a timeout, the wait times out, as in production without a worker.
            with pytest.raises(TaskTimeoutError):
                await task.wait_result(0.05)
        await qt.advance_time(60)
        assert (await task.wait_result()).returning == 2
        ended = await state.wait_result()
        assert ended.result == (await qt.wait(state)).result == 4


def test_the_sync_apps_wait_result_is_refused_the_same() -> None:
    app = QueueTasks()

    @app.task
    def double(n: int) -> int:
        return n * 2

    with SyncHarness(app, timeout=5) as qt:
        qt.freeze_time()
        task = double.add_task(1, delay=60)
        with pytest.raises(HarnessError, match="is delayed"):
            task.wait_result()
        qt.advance_time(60)
        assert task.wait_result().returning == 2
