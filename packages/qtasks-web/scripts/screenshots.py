"""Screenshots of every dashboard page for docs/web.md, saved under docs/img/web/.

An in-memory app runs a small workload (successes, failures with a secret-looking argument,
a generator still running, a dead letter, a timer), the dashboard is served by uvicorn in the
same event loop, and Debian's Chromium (``/usr/bin/chromium``, no browser download) driven by
Playwright takes the pictures.

Run: ``uv run --all-packages python packages/qtasks-web/scripts/screenshots.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from playwright.async_api import async_playwright

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_web import create_app
from qtasks_web.server import running

OUT = Path(__file__).resolve().parents[3] / "docs" / "img" / "web"
CHROMIUM = os.environ.get("QTASKS_CHROMIUM", "/usr/bin/chromium")

app = AsyncQueueTasks("shop", config=QueueConfig(plugins_disabled=["*"]))


@app.task
async def send_invoice(order: int, api_key: str) -> dict[str, object]:
    await anyio.sleep(0.05 + (order % 5) / 50)
    if order % 7 == 0:
        raise ConnectionError(f"mail server refused order {order}")
    return {"order": order, "sent": True}


@app.task
async def export(rows: int) -> AsyncIterator[dict[str, int]]:
    for done in range(0, rows, 100):
        await anyio.sleep(0.4)
        yield {"exported": done + 100}


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        from qtasks_timer import AsyncTimer

        AsyncTimer(app).add_task("send_invoice", 0, "k", trigger="*/5 * * * *")
    except ImportError:
        pass
    async with app:
        for order in range(1, 60):
            await app.add_task("send_invoice", order, api_key=f"sk-live-{order:04d}")
        failed = await app.add_task("send_invoice", 7, api_key="sk-live-0007")
        running_export = await app.add_task("export", 5000)
        await app.add_task("no_such_task", 1)  # the worker dead-letters it
        await anyio.sleep(2)
        web = create_app(app)
        async with running(web) as url, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            shots = {
                "overview": "/",
                "tasks": "/tasks",
                "task-failed": f"/tasks/{failed.uuid}",
                "task-generator": f"/tasks/{running_export.uuid}",
                "workers": "/workers",
                "timers": "/timers",
                "dead-letters": "/dead-letters",
            }
            for name, path in shots.items():
                await page.goto(url + path)
                await page.wait_for_timeout(1500)
                await page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
                print(f"saved {OUT / (name + '.png')}")
            await browser.close()


if __name__ == "__main__":
    anyio.run(main)
