"""A task that kills its worker on every delivery, on Redis with real worker processes: its
dead-lettered record and the dashboard's task page tell every run it had (each began on a
worker that was then lost), not one fewer."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import anyio
import pytest
from redis_procs import Workers, counts, wait_workers
from redis_worker_app import build

from qtasks import TaskStatus
from qtasks.components import AttemptLog
from qtasks_web import create_app
from qtasks_web.server import running

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def page(url: str) -> str:
    """The dashboard page at ``url`` (served on loopback: no credentials needed)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


async def test_every_lost_run_of_a_dead_lettered_task_is_on_record_and_page(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    limit = 3
    app = build(redis_url, prefix, lease=1.0, max_deliveries=limit)
    await app.start()
    workers = Workers(
        redis_url, prefix, tmp_path, lease=1.0, concurrency=1, config={"max_deliveries": limit}
    )
    live = [workers.start()]
    try:
        await wait_workers(app, 1, *live)
        task = await app.add_task("suicide", 7)
        with anyio.fail_after(60):
            while True:
                record = await app.storage.get(task.uuid)
                assert record is not None
                if record.status.final:
                    break
                workers.replace_dead(live)  # killed by the task: a new worker
                await anyio.sleep(0.05)
        assert counts(tmp_path / "ledger.txt", "start")[7] == limit  # it ran 3 times
        assert record.status is TaskStatus.ERROR
        assert record.error is not None and record.error.startswith("dead-lettered: delivery")
        storage = app.storage
        assert isinstance(storage, AttemptLog)
        kept = await storage.attempts(task.uuid)
        assert [k.status for k in kept] == [TaskStatus.PROCESS] * (limit - 1)
        # The last run is on the record: it began (after the kept ones) on the last worker
        # that ran it, and that worker was lost before the record was dead-lettered.
        assert record.worker is not None and record.worker not in {k.worker for k in kept}
        assert record.started_at is not None, record
        assert kept[-1].updated_at <= record.started_at <= record.updated_at
        async with running(create_app(app)) as url:
            text = await anyio.to_thread.run_sync(page, f"{url}/tasks/{task.uuid}")
        history = text.split('<ol class="history">', 1)[1].split("</ol>", 1)[0]
        assert history.count(" began") == limit, history
        assert history.count(" began again") == limit - 1, history
        assert record.worker in history.rsplit(" began", 1)[1], history  # the last run's
        assert f"1 started, {limit} runs started" in text, text
    finally:
        for proc in workers.started:
            proc.stop()
        await app.aclose()
    for proc in workers.started:
        assert not proc.problems(), proc.output()
