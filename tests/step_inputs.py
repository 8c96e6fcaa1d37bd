"""A workflow check both backends run (in memory and on Redis): a step fed by the steps
before it is stored before their results exist, with ``None`` in its input's place; its
record shows the input it was called with once it ended (not saved at once while it runs:
a round trip per step)."""

from __future__ import annotations

from typing import Any

from qtasks import AsyncQueueTasks, chain, chord
from qtasks.workflows import Node


async def check_step_inputs(app: AsyncQueueTasks) -> None:
    """On ``app`` (not started; it has the task ``add(a, b)``): add the task ``seen``, serve,
    run a chain and a chord ending in it, and check the members' records (stored input in
    place of ``None``)."""

    @app.task
    async def seen(xs: Any, note: str) -> str:
        return note

    add = app.tasks["add"]
    flows: list[Node] = [
        chain(add.s(1, 2), seen.s("chained")),
        chord([add.s(1, 1), add.s(2, 2)], seen.s("c")),
    ]
    async with app:
        done = [await (await app.run_workflow(f)).wait_result(timeout=10) for f in flows]
        records = [await app.get(u) for d in done for u in d.members]
    assert [(d.status, d.error) for d in done] == [("success", None)] * 2
    assert [r.args if r else None for r in records] == [
        [1, 2],
        [3, "chained"],
        [1, 1],
        [2, 2],
        [[2, 4], "c"],
    ]
