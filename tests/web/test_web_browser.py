"""The dashboard in a real browser: Debian's Chromium driven by Playwright (no browser
download) against a real uvicorn server started by the test on a free loopback port, in the
same event loop as the app and its worker (memory components)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from web_helpers import CHROMIUM

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks_web import Auth, create_app
from qtasks_web.server import running
from qtasks_web.settings import WebSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM)
        yield launched
        await launched.close()


class Gates:
    """Events a test opens one by one to let a task go on."""

    def __init__(self, n: int) -> None:
        self.events = [anyio.Event() for _ in range(n)]
        self.started = anyio.Event()


def make_app(gates: Gates) -> AsyncQueueTasks:
    app = AsyncQueueTasks("shop", config=QueueConfig(plugins_disabled=["*"]))
    calls: dict[str, int] = {}

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def fail(note: str) -> None:
        raise ValueError(note)

    @app.task
    async def hold() -> None:
        gates.started.set()
        await anyio.sleep_forever()

    @app.task
    async def flaky(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        if calls[key] == 1:
            raise RuntimeError("first call fails")
        return "second call works"

    @app.task
    async def export(n: int) -> AsyncIterator[dict[str, int]]:
        for i in range(n):
            await gates.events[i].wait()
            yield {"row": i}

    return app


async def live(page: Page) -> None:
    """Wait until the page's event stream is open."""
    await expect(page.locator("#live.on")).to_have_count(1, timeout=5000)


async def test_the_overview_shows_real_numbers_and_follows_them(browser: Browser) -> None:
    app = make_app(Gates(0))
    async with app, running(create_app(app)) as url:
        for i in range(3):
            await app.add_task("add", i, i, timeout=5)
        await app.add_task("fail", "boom", timeout=5)
        page = await browser.new_page()
        await page.goto(url + "/")
        success = page.locator('[data-figure="records_by_status.success"]')
        await expect(success).to_have_text("3")
        await expect(page.locator('[data-figure="records_by_status.error"]')).to_have_text("1")
        await expect(page.locator('[data-figure="workers"]')).to_have_text("1")
        await expect(page.locator("#chart-rate path.line")).to_have_count(2)
        await live(page)
        for i in range(2):
            await app.add_task("add", i, 1, timeout=5)
        await expect(success).to_have_text("5", timeout=3000)  # no reload: pushed
        rate = page.locator("#chart-rate circle.finished")
        assert await rate.count() >= 1


async def test_an_enqueued_task_appears_within_a_second(browser: Browser) -> None:
    gates = Gates(0)
    app = make_app(gates)
    async with app, running(create_app(app)) as url:
        page = await browser.new_page()
        await page.goto(url + "/tasks")
        await live(page)
        task = await app.add_task("hold")
        row = page.locator(f'tr[data-uuid="{task.uuid}"]')
        await expect(row).to_have_count(1, timeout=1000)
        await expect(row.locator(".status")).to_have_text("process", timeout=2000)
        await app.cancel(task.uuid)
        await expect(row.locator(".status")).to_have_text("cancel", timeout=2000)


async def test_generator_steps_stream_live(browser: Browser) -> None:
    gates = Gates(3)
    app = make_app(gates)
    async with app, running(create_app(app)) as url:
        task = await app.add_task("export", 3)
        page = await browser.new_page()
        await page.goto(f"{url}/tasks/{task.uuid}")
        await live(page)
        steps = page.locator("#steps li")
        await expect(steps).to_have_count(0)
        for i in range(3):
            gates.events[i].set()
            await expect(steps).to_have_count(i + 1, timeout=2000)
            await expect(steps.nth(i)).to_have_text(f'{{"row":{i}}}')
        await expect(page.locator("#task-status")).to_have_text("success", timeout=2000)


async def test_cancel_from_the_page(browser: Browser) -> None:
    gates = Gates(0)
    app = make_app(gates)
    async with app, running(create_app(app)) as url:
        task = await app.add_task("hold")
        with anyio.fail_after(5):
            await gates.started.wait()
        page = await browser.new_page()
        await page.goto(f"{url}/tasks/{task.uuid}")
        await page.click("#cancel")
        await expect(page.locator(".message")).to_have_text("cancelled")
        done = await app.wait(task.uuid, timeout=5)
        assert done.status is TaskStatus.CANCEL
        await expect(page.locator("#task-status")).to_have_text("cancel")
        await expect(page.locator("#cancel")).to_have_count(0)


async def test_retry_from_the_page(browser: Browser) -> None:
    app = make_app(Gates(0))
    async with app, running(create_app(app)) as url:
        failed = await app.add_task("flaky", "k", timeout=5)
        assert failed.status is TaskStatus.ERROR
        page = await browser.new_page()
        await page.goto(f"{url}/tasks/{failed.uuid}")
        await page.click("#retry")
        await expect(page.locator("#parent")).to_have_text(failed.uuid)
        new_uuid = page.url.rsplit("/tasks/", 1)[1].split("?", 1)[0]
        assert new_uuid != failed.uuid
        retried = await app.wait(new_uuid, timeout=5)
        assert (retried.status, retried.returning, retried.parent_uuid) == (
            TaskStatus.SUCCESS,
            "second call works",
            failed.uuid,
        )
        await expect(page.locator("#task-status")).to_have_text("success", timeout=3000)


async def test_dead_letters_requeued_from_the_page(browser: Browser) -> None:
    app = make_app(Gates(0))
    async with app, running(create_app(app)) as url:
        first = await app.add_task("later", 1)
        second = await app.add_task("later", 2)
        with anyio.fail_after(5):
            while len(await app.dead_letters()) < 2:  # noqa: ASYNC110 - the worker nacks them
                await anyio.sleep(0.02)

        @app.task
        async def later(i: int) -> int:
            return i * 10

        page = await browser.new_page()
        await page.goto(f"{url}/dead-letters")
        await expect(page.locator("#dead-letters tbody tr")).to_have_count(2)
        await page.click(f'tr[data-id="{first.uuid}"] button.requeue')
        await expect(page.locator(".message")).to_have_text("1 dead letter(s) requeued")
        assert (await app.wait(first.uuid, timeout=5)).returning == 10
        await page.click("#requeue-all")
        await expect(page.locator(".message")).to_have_text("1 dead letter(s) requeued")
        assert (await app.wait(second.uuid, timeout=5)).returning == 20
        await expect(page.locator("#dead-letters tbody tr")).to_have_text("no dead letter")


async def signed_in_as_ops(browser: Browser, url: str, heading: str) -> None:
    """A browser that answers the Basic challenge as user ``ops`` opens ``url``."""
    context = await browser.new_context(http_credentials={"username": "ops", "password": "s3cret"})
    page = await context.new_page()
    response = await page.goto(url)
    assert response is not None and response.status == 200
    await expect(page.locator("h1")).to_have_text(heading)
    await context.close()


async def test_auth_is_enforced_in_the_browser(browser: Browser) -> None:
    app = make_app(Gates(0))
    token = "browser-token-77"
    async with app, running(create_app(app, auth=Auth(token=token))) as url:
        page = await browser.new_page()
        await page.goto(url + "/tasks")
        assert page.url.endswith("/login")
        await page.fill("input[name=token]", "wrong")
        await page.click("button[type=submit]")
        await expect(page.locator("#problem")).to_have_text("That token is not right.")
        await page.fill("input[name=token]", token)
        await page.click("button[type=submit]")
        await expect(page.locator("h1")).to_have_text("Overview")
        await page.goto(url + "/tasks")
        await expect(page.locator("h1")).to_have_text("Tasks")
    users = Auth(users={"ops": "s3cret"})
    async with app, running(create_app(app, auth=users)) as url:
        anonymous = await browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            await anonymous.goto(url + "/")  # 401 with a Basic challenge nobody answers
        asked = await anonymous.request.get(url + "/")
        assert asked.status == 401
        await signed_in_as_ops(browser, url + "/", "Overview")


async def test_a_forged_csrf_token_is_rejected(browser: Browser) -> None:
    gates = Gates(0)
    app = make_app(gates)
    async with app, running(create_app(app)) as url:
        task = await app.add_task("hold")
        page = await browser.new_page()
        await page.goto(f"{url}/tasks/{task.uuid}")
        await page.evaluate("document.querySelector('input[name=csrf]').value = 'forged'")
        await page.click("#cancel")
        await expect(page.locator("#problem")).to_contain_text("CSRF token does not match")
        stored = await app.get(task.uuid)
        assert stored is not None and not stored.status.final
        await app.cancel(task.uuid)


async def test_users_sign_in_from_a_browser_when_a_token_is_configured_too(
    browser: Browser,
) -> None:
    """docs/web.md's [extra.web] has a token and users: the browser of a user gets the Basic
    challenge (not a redirect to the token form, which would leave it no way in), and the
    token still signs in through the form."""
    app = make_app(Gates(0))
    auth = Auth(token="both-token-42", users={"ops": "s3cret"})
    async with app, running(create_app(app, auth=auth)) as url:
        await signed_in_as_ops(browser, url + "/tasks", "Tasks")
        page = await browser.new_page()
        await page.goto(url + "/login")
        await page.fill("input[name=token]", "both-token-42")
        await page.click("button[type=submit]")
        await expect(page.locator("h1")).to_have_text("Overview")


async def test_ready_messages_by_priority_are_listed_lowest_first(browser: Browser) -> None:
    """The overview lists the ready messages by priority in the order they run, lowest first:
    a negative priority too (a JavaScript object puts "-2" after "0" and "3")."""
    app = make_app(Gates(0))
    await app.start()  # no worker: the messages stay ready
    try:
        for priority in (3, 0, -2, 0):
            await app.add_task("add", 1, 1, priority=priority)
        async with running(create_app(app)) as url:
            page = await browser.new_page()
            await page.goto(url + "/")
            cells = page.locator("#priorities tbody tr td:first-child")
            await expect(cells).to_have_text(["-2", "0", "3"])
    finally:
        await app.aclose()


async def test_the_failure_rate_axis_ends_at_100_percent(browser: Browser) -> None:
    """Every task failed: the chart's top is 100 %, not the 110 % the 10 % headroom of the
    other charts made of it."""
    app = make_app(Gates(0))
    settings = WebSettings(window=30.0)  # intervals of 1 s: the failures' one closes soon
    async with app, running(create_app(app, settings=settings)) as url:
        for note in ("a", "b"):
            await app.add_task("fail", note, timeout=5)
        page = await browser.new_page()
        await page.goto(url + "/")
        chart = page.locator("#chart-failures")
        await expect(chart.locator("circle.failed").first).to_be_attached(timeout=5000)
        await expect(chart.locator("text").first).to_have_text("100")


async def test_every_page_has_a_favicon_the_browser_loads(browser: Browser) -> None:
    """No 404 for the icon in the browser's console: each page names one, served as SVG."""
    app = make_app(Gates(0))
    async with app, running(create_app(app)) as url:
        page = await browser.new_page()
        failed: list[str] = []
        page.on("console", lambda m: failed.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
        for path in ("/", "/tasks", "/workers", "/timers", "/dead-letters"):
            await page.goto(url + path)
            icon = page.locator('link[rel="icon"]')
            await expect(icon).to_have_count(1)
            href = await icon.get_attribute("href")
            assert href is not None
            loaded = await page.request.get(url + href)
            assert loaded.status == 200
            assert loaded.headers["content-type"].startswith("image/svg+xml")
            assert (await loaded.text()).lstrip().startswith("<svg")
        assert failed == []
