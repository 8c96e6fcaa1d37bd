"""A chord whose members end further apart than ``result_ttl``, for the tests of how long
workflow members' records live (in memory and on Redis)."""

from __future__ import annotations

import anyio

from qtasks import AsyncQueueTasks, chord, group
from qtasks.workflows import Workflow


def add_late(app: AsyncQueueTasks) -> anyio.Event:
    """Add the task ``late(x)`` to ``app`` (before it starts): it returns ``x`` once the event
    returned is set."""
    release = anyio.Event()

    @app.task
    async def late(x: int) -> int:
        await release.wait()
        return x

    return release


async def chord_ending_late(
    app: AsyncQueueTasks, release: anyio.Event, ttl: float
) -> tuple[Workflow, Workflow]:
    """On ``app``, serving, with the tasks ``double`` and ``total`` and :func:`add_late`'s:
    run ``chord(group(double(1), late(5)), total)``, its ``late`` ending longer than ``ttl``
    after ``double``; return the workflow as started and as it ended (its result 7)."""
    double, late, total = (app.tasks[name] for name in ("double", "late", "total"))
    wf = await app.run_workflow(chord(group(double.s(1), late.s(5)), total.s()))
    assert (await app.wait(wf.members[0], 5)).returning == 2
    await anyio.sleep(ttl + 0.3)  # the first member ended longer than result_ttl ago
    release.set()
    return wf, await wf.wait_result(5)
