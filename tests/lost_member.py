"""A workflow check both backends run (in memory and on Redis): ``get_workflow_records``
gives ``None`` in the place of a member whose record is gone (expired, evicted, deleted)
while the workflow's own record remains, and every other member's record as before."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from qtasks import AsyncQueueTasks, chain


async def check_a_lost_member_reads_none(
    app: AsyncQueueTasks, lose: Callable[[str], Awaitable[None]]
) -> None:
    """On ``app`` (not started; it has the tasks ``add(a, b)`` and ``double(x)``): serve,
    run ``chain(add(1, 2), double, double)`` to its end, ``lose`` the record of its middle
    step (given its uuid: remove it from the storage) and read the members' records."""
    add, double = app.tasks["add"], app.tasks["double"]
    async with app:
        done = await (
            await app.run_workflow(chain(add.s(1, 2), double.s(), double.s()))
        ).wait_result(timeout=10)
        lost = done.members[1]
        await lose(lost)
        assert await app.get(lost) is None, "the member's record is still stored"
        assert await app.get(done.id) is not None, "the workflow's own record is gone too"
        records = await app.get_workflow_records(done.id)
    assert (done.status, done.result) == ("success", 12)
    assert records is not None
    assert list(records) == done.members
    assert [(r.task_name, r.returning) if r else None for r in records.values()] == [
        ("add", 3),
        None,
        ("double", 12),
    ]
