"""The fencing token across the ways a task goes back to the queue, run on every backend that
begins on claim and shares its storage's server (memory, Redis): an older holder of the
task, whose lease ran out while its loop was stalled, settles late with its old delivery. Its
result must be refused and the task run again, as while a newer delivery holds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from qtasks import AsyncQueueTasks, TaskRecord, TaskStatus, hookimpl
from qtasks.components import BeginOnClaim, Delivery
from qtasks.task import AsyncTask


@asynccontextmanager
async def stalled_holder(app: AsyncQueueTasks, task: AsyncTask) -> AsyncIterator[Delivery]:
    """A consumer that claims ``task``'s message (its record begun with the claim, as a
    worker's is) and then stalls: it never renews, so the lease runs out and the message is
    delivered again. Yields that first delivery; closed at exit."""
    broker = app.broker
    assert isinstance(broker, BeginOnClaim)
    async with broker.consume_begun(
        prefetch=1, storage=app.storage, worker="stalled", starts=lambda: 1
    ) as deliveries:
        with anyio.fail_after(5):
            held = await anext(deliveries)
        assert held.id == task.uuid
        begun: TaskRecord | None = getattr(held, "begun", None)
        assert begun is not None and (begun.status, begun.token) == (
            TaskStatus.PROCESS,
            held.token,
        )
        yield held


async def settles_late(app: AsyncQueueTasks, old: Delivery) -> None:
    """The stalled holder of ``old`` wakes up and settles, as its worker would: a success
    (saved and acked in one call), and a retry (a plain fenced save). Both must be refused
    and the record left as it is."""
    shared = app.shared_server
    assert shared is not None
    before = await app.get(old.id)
    assert before is not None
    late = before.copy()
    late.status, late.returning, late.token = TaskStatus.SUCCESS, "stale", old.token
    assert not await shared.ack_final(old, app.storage, late), "a stale result was stored"
    late.status, late.returning, late.error = TaskStatus.RETRY, None, "ValueError: stale"
    assert not await app.storage.save(late, fence=old.token), "a stale retry was stored"
    assert await app.get(old.id) == before


async def serve_until(app: AsyncQueueTasks, event: anyio.Event, task: AsyncTask) -> TaskRecord:
    """Serve with ``app``'s worker until ``event`` is set, then stop it; ``task``'s record as
    it was when ``event`` was set."""
    async with anyio.create_task_group() as tg:
        await tg.start(app.worker.run, app)
        with anyio.fail_after(10):
            await event.wait()
        seen = await app.get(task.uuid)
        app.worker.stop()
    assert seen is not None
    return seen


async def run_until_done(app: AsyncQueueTasks, task: AsyncTask) -> TaskRecord:
    """Serve with ``app``'s worker until ``task`` is final; its final record."""
    async with anyio.create_task_group() as tg:
        await tg.start(app.worker.run, app)
        done = await app.wait(task.uuid, timeout=10)
        app.worker.stop()
    return done


async def late_result_after_a_shutdown_hand_back(app: AsyncQueueTasks) -> None:
    """``app`` (not started; a lease under a second, a short ``shutdown_grace``, one runner):
    a stalled holder loses the task to the worker, whose shutdown then hands the running task
    back. The record is ``new`` again with the worker's token kept (it was cleared, and an
    empty token lets any fenced write through): the stalled holder's late result is refused,
    and the next worker runs the task again (before, the stale result was stored and the
    requeued message acked unrun). ``app`` is started here and closed."""
    runs: list[str] = []
    started = anyio.Event()

    @app.task
    async def job() -> str:
        runs.append("run")
        started.set()
        if len(runs) == 1:
            await anyio.sleep_forever()  # running when its worker stops: handed back
        return "fresh"

    await app.start()
    try:
        task = await app.add_task("job")
        async with stalled_holder(app, task) as old:
            # Started after the stalled holder's lease ran out; the worker stops while the
            # task runs, which outlasts shutdown_grace: handed back.
            running = await serve_until(app, started, task)
            assert running.status is TaskStatus.PROCESS
            taken = running.token  # the worker's delivery's
            assert taken not in (None, old.token)
            handed = await app.get(task.uuid)
            assert handed is not None
            assert (handed.status, handed.token) == (TaskStatus.NEW, taken)
            await settles_late(app, old)
        done = await run_until_done(app, task)
    finally:
        await app.aclose()
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, "fresh")
    assert runs == ["run", "run"]


async def late_result_after_a_dead_letter_is_requeued(app: AsyncQueueTasks) -> None:
    """``app`` (not started; ``max_deliveries=1``, a lease under a second): a stalled holder
    loses its only allowed delivery, a worker's claim dead-letters the message, and the dead
    letter is requeued. The reset record keeps the dead letter's token (it was cleared): the
    stalled holder's late result is refused, and the next worker runs the task (before, the
    stale result was stored over the reset record and the requeued message acked unrun).
    The reset record holds nothing of the lost run (its ``worker`` and ``started_at`` were
    kept: a queued task that looked started). ``app`` is started here and closed."""
    runs: list[str] = []
    buried = anyio.Event()

    @app.task
    async def job() -> str:
        runs.append("run")
        return "fresh"

    class Watch:
        @hookimpl
        def qtasks_task_dead_lettered(self, record: TaskRecord, reason: str) -> None:
            buried.set()

    app.add_plugin(Watch())
    await app.start()
    try:
        task = await app.add_task("job")
        async with stalled_holder(app, task) as old:
            ended = await serve_until(app, buried, task)  # its claim, after the lease
            assert ended.status is TaskStatus.ERROR
            assert await app.requeue_dead_letters([task.uuid]) == 1
            reset = await app.get(task.uuid)
            assert reset is not None
            assert (reset.status, reset.error, reset.token) == (
                TaskStatus.NEW,
                None,
                ended.token,
            )
            # Queued again: nothing of the lost run is left to make it look started.
            assert (ended.worker, ended.started_at is None) == ("stalled", False)
            assert (reset.worker, reset.started_at, reset.traceback) == (None, None, None)
            await settles_late(app, old)
        done = await run_until_done(app, task)
    finally:
        await app.aclose()
    assert (done.status, done.returning) == (TaskStatus.SUCCESS, "fresh")
    assert runs == ["run"]
