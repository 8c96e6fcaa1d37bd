"""Issue 14 on real processes: a worker subprocess reaches a private redis-server through the
fault proxy (tests/faultproxy.py, the ``rig`` fixture), the test's producer reaches it directly."""

from __future__ import annotations

import anyio
import pytest
from fault_fixtures import FaultRig, wait_until

from qtasks import TaskStatus

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_idle_worker_survives_a_reset_without_unretrieved_errors(rig: FaultRig) -> None:
    """Issue 14 item 3: a reset under an idle worker's block-then-claim must leave no exception
    unretrieved, only the documented warnings; the worker serves again once Redis is back."""
    worker = rig.worker(concurrency=2, lease=2.0)
    async with rig.producer() as app:
        await rig.wait_serving(app, worker)
        before = rig.proxy.stats.connections
        rig.proxy.reset()
        await wait_until(
            lambda: "unreachable" in worker.output(),
            timeout=10,
            what="the worker to notice",
            workers=[worker],
        )
        # Stay reset through a few reconnection attempts (each is reset at once).
        await wait_until(
            lambda: rig.proxy.stats.connections >= before + 3,
            timeout=10,
            what="reconnection attempts",
            workers=[worker],
        )
        rig.proxy.passthrough()
        await wait_until(
            lambda: "is back" in worker.output(),
            timeout=15,
            what="the worker to reconnect",
            workers=[worker],
        )
        with anyio.fail_after(15):
            done = await app.add_task("noop", 7, timeout=15)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, 14)
    assert worker.stop() == 0, worker.output()
    assert not worker.problems(), worker.output()
