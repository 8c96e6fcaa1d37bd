"""A workflow check both backends run (in memory and on Redis): a step fed by the steps
before it is stored before their results exist, with ``None`` in its input's place; its
record shows the input it is called with once it started."""

from __future__ import annotations

from typing import Any

from qtasks import AsyncQueueTasks, chain, chord
from qtasks.workflows import Node


async def check_step_inputs(app: AsyncQueueTasks) -> None:
    """On ``app`` (not started; it has the task ``add(a, b)``): add the task ``seen``, which
    returns the ``args`` of its own record as it reads it while it runs, serve, run a chain and
    a chord ending in it, and check the members' records (stored input in place of ``None``)
    and what ``seen`` read."""

    @app.task(echo=True)
    async def seen(self: Any, xs: Any, note: str) -> list[Any]:
        record = await self.ctx.get_metadata()
        return list(record.args)

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
    # What the step read of its own record while it ran.
    assert [r.returning for r in records if r and r.task_name == "seen"] == [
        [3, "chained"],
        [[2, 4], "c"],
    ]
