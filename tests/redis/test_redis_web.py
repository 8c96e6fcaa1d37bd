"""The dashboard on Redis with a real worker process: Chromium (Playwright) against the
dashboard served by uvicorn in the test, reading the components a worker subprocess uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from playwright.async_api import Browser, async_playwright, expect
from redis_procs import Worker
from redis_worker_app import build

from qtasks import TaskStatus
from qtasks_web import create_app
from qtasks_web.server import running

pytestmark = pytest.mark.anyio


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path="/usr/bin/chromium")
        yield launched
        await launched.close()


async def test_dashboard_follows_a_real_worker_on_redis(
    redis_url: str, prefix: str, tmp_path: Path, browser: Browser
) -> None:
    app = build(redis_url, prefix)
    await app.start()
    worker = Worker(redis_url, prefix, tmp_path, lease=5.0, concurrency=4)
    try:
        with anyio.fail_after(15):
            while not await app.global_config.workers():
                assert worker.proc.poll() is None, worker.output()
                await anyio.sleep(0.05)
        async with running(create_app(app)) as url:
            page = await browser.new_page()
            await page.goto(url + "/")
            await expect(page.locator('[data-figure="workers"]')).to_have_text("1")
            # A task enqueued now shows up in the open Tasks page without a reload.
            await page.goto(url + "/tasks")
            await expect(page.locator("#live.on")).to_have_count(1, timeout=5000)
            task = await app.add_task("cancellable", 1, 60.0)
            row = page.locator(f'tr[data-uuid="{task.uuid}"]')
            await expect(row).to_have_count(1, timeout=1000)
            await expect(row.locator(".status")).to_have_text("process", timeout=5000)
            # Cancelled from its page: the worker process stops it (cancel feed).
            await page.goto(f"{url}/tasks/{task.uuid}")
            await page.click("#cancel")
            done = await app.wait(task.uuid, timeout=10)
            assert done.status is TaskStatus.CANCEL
            await expect(page.locator("#task-status")).to_have_text("cancel", timeout=5000)
            with anyio.fail_after(10):
                while "cancelled 1" not in worker.ledger.read_text():  # noqa: ASYNC110 - a file
                    await anyio.sleep(0.05)
            # A generator's steps, stored by the worker, are on its page.
            steps = await app.add_task("steps", 3, timeout=10)
            await page.goto(f"{url}/tasks/{steps.uuid}")
            await expect(page.locator("#steps li")).to_have_count(3)
            await expect(page.locator("#steps li").nth(2)).to_have_text('{"step":2}')
            # The worker on the Workers page, with its process id.
            await page.goto(url + "/workers")
            live_row = page.locator("#workers tr.live")
            await expect(live_row).to_have_count(1)
            await expect(live_row).to_contain_text(str(worker.pid))
            # A message the worker rejects is a dead letter; purged after confirmation.
            bad = await app.add_task("no_such_task", 1)
            with anyio.fail_after(10):
                while not await app.dead_letters():  # noqa: ASYNC110 - the worker nacks it
                    await anyio.sleep(0.05)
            await page.goto(url + "/dead-letters")
            await expect(page.locator(f'tr[data-id="{bad.uuid}"]')).to_contain_text("unknown task")
            await page.fill("#purge-confirm", "purge")
            await page.click("#purge-all")
            await expect(page.locator(".message")).to_have_text("1 dead letter(s) purged")
            assert await app.dead_letters() == []
            # Listing by name and status on Redis: the finished tasks are there.
            await page.goto(url + "/tasks?status=success&name=steps")
            await expect(page.locator("#task-rows tr")).to_have_count(1)
        assert worker.problems() == []
    finally:
        assert worker.stop() == 0, worker.output()
        await app.aclose()
