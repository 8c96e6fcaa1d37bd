"""The dashboard's pages and actions over HTTP (the ASGI app called in process, memory
components): what they show, bad input, actions with and without CSRF, read-only."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from urllib.parse import unquote
from uuid import uuid4

import anyio
import pytest
from web_helpers import Client, PlainStorage

from qtasks import AsyncQueueTasks, AsyncTask, QueueConfig, TaskStatus
from qtasks.memory import storage as memory_storage
from qtasks.record import TaskRecord
from qtasks_web import create_app
from qtasks_web.data import MASK

pytestmark = pytest.mark.anyio


def make_app(**kwargs: object) -> AsyncQueueTasks:
    app = AsyncQueueTasks("shop", config=QueueConfig(plugins_disabled=["*"]), **kwargs)  # type: ignore[arg-type]  # storage only

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def fail(password: str, note: str = "") -> None:
        raise ValueError(f"refused {note}")

    failed_once: set[str] = set()

    @app.task(retry=1, retry_backoff=0)
    async def flaky(key: str) -> str:
        if key not in failed_once:
            failed_once.add(key)
            raise ValueError(f"first try of {key}")
        return key

    @app.task
    async def hold(gate: str) -> str:
        await anyio.sleep_forever()
        return gate

    @app.task(retry=1, retry_backoff=0.05)
    async def flaky_hold(key: str) -> str:
        """Fails its first attempt, then (50 ms on: its runs begin at other times) runs until
        cancelled."""
        if key not in failed_once:
            failed_once.add(key)
            raise ValueError(f"first try of {key}")
        await anyio.sleep_forever()
        return key

    return app


def listed(text: str, tasks: list[AsyncTask]) -> list[str]:
    """The uuids of ``tasks`` in the order the page lists them."""
    return sorted((t.uuid for t in tasks if t.uuid in text), key=text.index)


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    the_app = make_app()
    async with the_app:  # serves: the worker runs the tasks
        yield the_app


@pytest.fixture
def client(app: AsyncQueueTasks) -> Client:
    return Client(create_app(app))


async def test_overview_shows_the_components_figures(app: AsyncQueueTasks, client: Client) -> None:
    for i in range(3):
        await app.add_task("add", i, i, timeout=5)
    failed = await app.add_task("fail", "hunter2", timeout=5)
    assert failed.status is TaskStatus.ERROR
    page = await client.get("/")
    assert page.status == 200
    assert 'data-figure="records_by_status.success">3<' in page.text
    assert 'data-figure="records_by_status.error">1<' in page.text
    assert 'data-figure="workers">1<' in page.text
    figures = await client.get("/api/overview")
    assert figures.status == 200
    data = json.loads(figures.text)
    assert data["records_by_status"] == {"error": 1, "success": 3}
    finished = sum(point["finished"] for point in data["series"]) * data["interval"]
    assert finished == pytest.approx(4, abs=0.01) or finished > 3.9  # the last interval is partial
    assert any(point["run_p50"] is not None for point in data["series"])
    assert any(point["failure_rate"] for point in data["series"])


async def test_tasks_list_filters_and_pages(app: AsyncQueueTasks, client: Client) -> None:
    done = [await app.add_task("add", i, 1, timeout=5) for i in range(5)]
    failed = await app.add_task("fail", "x", timeout=5)
    page = await client.get("/tasks")
    assert page.status == 200
    assert all(t.uuid in page.text for t in [*done, failed])
    errors = await client.get("/tasks?status=error")
    assert failed.uuid in errors.text and not any(t.uuid in errors.text for t in done)
    named = await client.get("/tasks?name=add")
    assert failed.uuid not in named.text and all(t.uuid in named.text for t in done)
    one = await client.get(f"/tasks?uuid={done[2].uuid[:12]}")
    assert done[2].uuid in one.text and done[1].uuid not in one.text
    first = await client.get("/tasks?name=add&limit=2")
    assert listed(first.text, done) == [done[4].uuid, done[3].uuid]
    next_link = first.text.split('id="next" href="', 1)[1].split('"', 1)[0]
    second = await client.get(next_link.replace("&amp;", "&"))
    assert listed(second.text, done) == [done[2].uuid, done[1].uuid]
    since = await client.get(f"/tasks?since={time.time() + 60:.0f}")
    assert "no task matches" in since.text


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("status=bogus", "unknown status"),
        ("limit=100000000", "limit must be between 1 and 500"),
        ("limit=abc", "is not a whole number"),
        ("since=yesterday-ish", "is not a time"),
        ("until=nan", "is not a time"),
        ("since=100&until=50", "ends before it starts"),
        ("cursor=not-a-cursor", "was not made by a MemoryStorage"),
        ("cursor=m:%C2%B2", "was not made by a MemoryStorage"),  # a digit int() refuses
        ("cursor=m:" + "9" * 4301, "was not made by a MemoryStorage"),  # int(): 4,300 at most
        ("uuid=%3Cscript%3E", "a uuid (prefix) has letters"),
    ],
)
async def test_malformed_filters_say_what_is_wrong(
    client: Client, query: str, problem: str
) -> None:
    page = await client.get(f"/tasks?{query}")
    assert page.status == 400
    assert problem in page.text.replace("&#39;", "'")
    assert "<script>" not in page.text


async def test_unknown_and_absurd_uuids_are_not_found(client: Client) -> None:
    for uuid in ("0" * 32, "nope", "x" * 5000):
        page = await client.get(f"/tasks/{uuid}")
        assert page.status == 404
        assert "no task record for uuid" in page.text
    page = await client.get("/events/tasks/unknown")
    assert page.status == 404


async def test_a_task_due_past_the_year_9999_has_its_page(
    app: AsyncQueueTasks, client: Client
) -> None:
    """An ``eta`` given in milliseconds (``time.time() * 1000``): the task page failed (500,
    ``year 58903 is out of range``) where it shows the eta. ``add_task`` refuses one now; a
    record stored by another client (an older qtasks) still holds it."""
    eta = time.time() * 1000
    record = TaskRecord(uuid=uuid4().hex, task_name="add", args=[1, 2], eta=eta)
    await app.storage.add(record)
    page = await client.get(f"/tasks/{record.uuid}")
    assert page.status == 200
    assert f"{eta} (unix seconds, past the year 9999)" in page.text


async def test_secrets_are_masked_and_text_is_escaped(app: AsyncQueueTasks, client: Client) -> None:
    task = await app.add_task("fail", "hunter2", note="<script>alert(1)</script>", timeout=5)
    page = await client.get(f"/tasks/{task.uuid}")
    assert page.status == 200
    assert "hunter2" not in page.text
    assert MASK in page.text
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "ValueError: refused" in page.text


async def test_a_storage_without_the_query_capability_is_said_so() -> None:
    app = make_app(storage=PlainStorage())
    async with app:
        task = await app.add_task("add", 1, 2, timeout=5)
        client = Client(create_app(app))
        tasks = await client.get("/tasks")
        assert tasks.status == 200
        assert "cannot list tasks" in tasks.text and "StorageQuery" in tasks.text
        overview = await client.get("/")
        assert overview.status == 200
        assert "cannot list or count tasks" in overview.text
        assert 'data-figure="records_by_status.success">1<' in overview.text
        assert (await client.get(f"/tasks/{task.uuid}")).status == 200
        assert (await client.get("/workers")).status == 200


async def test_cancel_needs_the_csrf_token(app: AsyncQueueTasks, client: Client) -> None:
    task = await app.add_task("hold", "g")
    path = f"/tasks/{task.uuid}"
    for form, problem in (
        ({}, "CSRF token is missing"),
        ({"csrf": "forged"}, "does not match"),
    ):
        await client.get(path)  # the browser has its cookie
        refused = await client.post(f"{path}/cancel", form=form)
        assert refused.status == 403
        assert problem in refused.text
    token = (await client.get(path)).csrf()
    foreign = await client.post(
        f"{path}/cancel", form={"csrf": token}, headers={"origin": "http://evil.example"}
    )
    assert foreign.status == 403 and "another site" in foreign.text
    stored = await app.get(task.uuid)
    assert stored is not None and not stored.status.final
    done = await client.post(f"{path}/cancel", form={"csrf": token})
    assert done.status == 303 and done.headers["location"].startswith(path)
    cancelled = await app.wait(task.uuid, timeout=5)
    assert cancelled.status is TaskStatus.CANCEL
    assert cancelled.cancel_reason == "cancelled from the dashboard"


async def test_retry_makes_a_linked_task(app: AsyncQueueTasks, client: Client) -> None:
    failed = await app.add_task("fail", "pw", note="n", timeout=5)
    reply = await client.act(f"/tasks/{failed.uuid}", f"/tasks/{failed.uuid}/retry")
    assert reply.status == 303
    new_uuid = reply.headers["location"].split("/tasks/", 1)[1].split("?", 1)[0]
    assert new_uuid != failed.uuid
    retried = await app.wait(new_uuid, timeout=5)
    assert (retried.task_name, retried.args, retried.kwargs) == ("fail", ["pw"], {"note": "n"})
    assert retried.parent_uuid == failed.uuid
    parent_page = await client.get(f"/tasks/{failed.uuid}")
    assert f'href="/tasks/{new_uuid}"' in parent_page.text
    done = await app.add_task("add", 1, 1, timeout=5)
    refused = await client.act(f"/tasks/{done.uuid}", f"/tasks/{done.uuid}/retry")
    assert refused.status == 303
    assert "only a failed or cancelled task" in unquote(refused.headers["location"])


async def test_children_are_found_however_many_records_came_after(
    app: AsyncQueueTasks, client: Client
) -> None:
    failed = await app.add_task("fail", "pw", timeout=5)
    kids = []
    for round in range(3):
        if round:  # records stored between the parent and its next child
            for i in range(1500):
                await app.add_task("add", i, round)
        reply = await client.act(f"/tasks/{failed.uuid}", f"/tasks/{failed.uuid}/retry")
        kids.append(reply.headers["location"].split("/tasks/", 1)[1].split("?", 1)[0])
    page = await client.get(f"/tasks/{failed.uuid}")
    assert [uuid for uuid in kids if f'href="/tasks/{uuid}"' in page.text] == kids
    assert "there are more" not in page.text
    lone = await client.get(f"/tasks/{kids[0]}")
    assert f'href="/tasks/{failed.uuid}"' in lone.text  # the parent link
    assert "no parent, no child task" not in lone.text


async def test_a_retried_task_shows_each_attempt(app: AsyncQueueTasks, client: Client) -> None:
    done = await app.add_task("flaky", "k1", timeout=5)
    assert (done.status, done.attempt) == (TaskStatus.SUCCESS, 2)
    page = await client.get(f"/tasks/{done.uuid}")
    assert page.status == 200
    earlier = [line for line in page.text.splitlines() if 'class="attempt"' in line]
    assert len(earlier) == 1
    assert "attempt 1 began" in earlier[0]
    assert "retry" in earlier[0] and "ValueError: first try of k1" in earlier[0]
    once = await app.add_task("add", 1, 2, timeout=5)
    assert 'class="attempt"' not in (await client.get(f"/tasks/{once.uuid}")).text


async def test_a_retried_task_that_runs_shows_when_its_run_began(
    app: AsyncQueueTasks, client: Client
) -> None:
    """The record of a task running its second attempt still carries the ``started_at`` its
    failed first run was stored with: the page shows when the running one began (the
    record's ``updated_at`` as begun), not that."""
    from qtasks_web.app import _when

    task = await app.add_task("flaky_hold", "k2")
    with anyio.fail_after(5):
        while True:
            running = await app.get(task.uuid)
            assert running is not None
            if running.status is TaskStatus.PROCESS and running.attempt == 2:
                break
            await anyio.sleep(0.01)
    # (The stored record's started_at is still the failed run's, set by its retry save.)
    page = await client.get(f"/tasks/{task.uuid}")
    history = page.text.split('<ol class="history">', 1)[1].split("</ol>", 1)[0]
    [line] = [line for line in history.split("<li") if "attempt 2 began" in line]
    assert _when(running.updated_at) in line, line
    assert f"<dt>Started</dt><dd>{_when(running.updated_at)}</dd>" in page.text
    await app.cancel(task.uuid)


async def test_an_earlier_run_lost_after_a_retry_shows_when_it_began(
    app: AsyncQueueTasks, client: Client
) -> None:
    """An attempt log as the worker leaves it (written here through the storage): attempt 1
    failed and was retried (its save stored its run's started_at), attempt 2 began on
    worker-b and was lost with it, attempt 2 runs again on worker-c. The page shows when
    worker-b's kept run began (its updated_at as begun), not attempt 1's started_at."""
    from qtasks_web.app import _when

    storage = app.storage
    rec = TaskRecord(uuid=uuid4().hex, task_name="add", args=[1, 2])
    await storage.add(rec)

    def claim(attempt: int, token: str, worker: str) -> TaskRecord:
        out = rec.copy()
        out.status, out.attempt, out.token, out.worker = TaskStatus.PROCESS, attempt, token, worker
        return out

    first = await storage.begin(claim(1, "t1", "worker-a"))
    first.status, first.token, first.started_at = TaskStatus.RETRY, None, 1_000_000.0
    assert await storage.save(first, fence="t1")
    lost = await storage.begin(claim(2, "t2", "worker-b"))
    # The storage says when this run began (it used to keep the retried run's started_at).
    assert lost.started_at == lost.updated_at
    await storage.begin(claim(2, "t3", "worker-c"))
    page = await client.get(f"/tasks/{rec.uuid}")
    history = page.text.split('<ol class="history">', 1)[1].split("</ol>", 1)[0]
    [line] = [line for line in history.split("<li") if "attempt 2 began on worker-b" in line]
    assert _when(lost.updated_at) in line, line
    assert _when(1_000_000.0) in history  # attempt 1's own line
    assert "attempt 2 began again on worker-c" in history
    await app.cancel(rec.uuid)


async def test_dead_letters_requeue_and_purge(app: AsyncQueueTasks, client: Client) -> None:
    first = await app.add_task("later", 1)
    second = await app.add_task("later", 2)

    async def dead() -> set[str]:
        return {d.id for d in await app.dead_letters()}

    with anyio.fail_after(5):
        while await dead() != {first.uuid, second.uuid}:  # noqa: ASYNC110 - the worker nacks them
            await anyio.sleep(0.02)
    page = await client.get("/dead-letters")
    assert "unknown task" in page.text and first.uuid in page.text

    @app.task
    async def later(i: int) -> int:
        return i

    requeued = await client.act("/dead-letters", "/dead-letters/requeue", id=first.uuid)
    assert requeued.status == 303
    assert (await app.wait(first.uuid, timeout=5)).returning == 1
    unconfirmed = await client.act("/dead-letters", "/dead-letters/purge", confirm="yes")
    assert "not purged" in unquote(unconfirmed.headers["location"])
    assert await dead() == {second.uuid}
    purged = await client.act("/dead-letters", "/dead-letters/purge", confirm="purge")
    assert "1 dead letter(s) purged" in unquote(purged.headers["location"])
    assert await dead() == set()


async def test_read_only_shows_no_action_and_refuses_them(app: AsyncQueueTasks) -> None:
    client = Client(create_app(app, read_only=True))
    task = await app.add_task("hold", "g")
    page = await client.get(f"/tasks/{task.uuid}")
    assert "read-only" in page.text and 'id="cancel"' not in page.text
    refused = await client.post(f"/tasks/{task.uuid}/cancel", form={"csrf": "x"})
    assert refused.status == 403 and "read-only" in refused.text
    stored = await app.get(task.uuid)
    assert stored is not None and not stored.status.final
    await app.cancel(task.uuid)


async def test_an_oversized_form_is_refused(app: AsyncQueueTasks, client: Client) -> None:
    task = await app.add_task("hold", "g")
    await client.get(f"/tasks/{task.uuid}")
    reply = await client.post(f"/tasks/{task.uuid}/cancel", body=b"x" * 100_000)
    assert reply.status == 413
    await app.cancel(task.uuid)


async def test_timers_page_with_and_without_timers(app: AsyncQueueTasks, client: Client) -> None:
    page = await client.get("/timers")
    assert page.status == 200 and "No timers" in page.text
    from qtasks_timer import AsyncTimer

    other = make_app()
    AsyncTimer(other).add_task("add", 1, 2, trigger="*/5 * * * *", timer_id="every-five")
    async with other:
        listed = await Client(create_app(other)).get("/timers")
    row = listed.text.split("<tbody>", 1)[1]
    assert "every-five" in row and "add" in row, row


async def test_unreachable_components_give_a_page_that_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

    nowhere = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    app = AsyncQueueTasks(
        broker=RedisBroker(nowhere),
        storage=RedisStorage(nowhere),
        global_config=RedisGlobalConfig(nowhere),
        config=QueueConfig(plugins_disabled=["*"]),
    )
    client = Client(create_app(app))
    with anyio.fail_after(30):
        page = await client.get("/")
        tasks = await client.get("/tasks")
    for reply in (page, tasks):
        assert reply.status == 503
        assert "did not answer" in reply.text
    await app.aclose()


async def test_arguments_and_headers_named_like_secrets_are_masked() -> None:
    """The dashboard's masking follows :func:`qtasks.masking.is_secret_key`, which fails safe:
    plurals, compounds and suffixes other than plain ones (``_url``, ``_name``...) are masked."""
    from qtasks_web.data import masked, masked_args

    app = make_app()

    @app.task
    async def call_api(url: str, auth_key: str, api_keys: list[str], token_url: str) -> None: ...

    args = masked_args(app, "call_api", ["https://api", "s3cr3t", ["k1"], "https://t"])
    assert args == ["https://api", MASK, MASK, "https://t"]
    kwargs = {
        "auth_header": "Bearer eyJ",
        "api_keys": ["k1", "k2"],
        "dbpass": "hunter2",
        "private_key_pem": "-----BEGIN PRIVATE KEY-----",
        "nested": [{"session_cookies": {"sid": "c"}, "cookie_name": "sid"}],
        "author": "ann",
    }
    assert masked(kwargs) == {
        "auth_header": MASK,
        "api_keys": MASK,
        "dbpass": MASK,
        "private_key_pem": MASK,
        "nested": [{"session_cookies": MASK, "cookie_name": "sid"}],
        "author": "ann",
    }
    assert masked({"X-Auth-Key": "cf", "Accept": "*/*"}) == {"X-Auth-Key": MASK, "Accept": "*/*"}


async def test_what_is_nested_too_deep_to_check_is_masked() -> None:
    from qtasks_web.data import masked

    deep: object = {"password": "hunter2"}
    for _ in range(30):
        deep = [deep]
    assert "hunter2" not in repr(masked(deep))
    assert masked([[{"password": "x", "user": "u"}]]) == [[{"password": MASK, "user": "u"}]]


async def test_credentials_inside_plain_named_values_are_masked() -> None:
    """A value under a plain name is still text that may hold a URL with a password or a
    ``token=...`` (the rule of :func:`qtasks.masking.mask_text`, whose mark is the core's)."""
    from qtasks.masking import MASK as INLINE
    from qtasks_web.data import masked, masked_args

    app = make_app()

    @app.task
    async def connect(dsn: str, note: str) -> None: ...

    args = masked_args(app, "connect", ["redis://u:hunter2@h/0", "retry with token=s3cr3t"])
    assert args == [f"redis://u:{INLINE}@h/0", f"retry with token={INLINE}"]
    shown = masked({"sentry": "https://k3y@o1.ingest.sentry.io/42", "n": 3, "plain": "hello"})
    assert shown == {
        "sentry": f"https://{INLINE}@o1.ingest.sentry.io/42",
        "n": 3,
        "plain": "hello",
    }


async def test_an_error_quoting_a_credential_is_shown_masked(
    app: AsyncQueueTasks, client: Client
) -> None:
    """A task's error and traceback are shown through the masking rule too: a connection
    error quoting its DSN, or a cancel reason with a token, keep the secret out of the page."""
    task = await app.add_task("fail", "x", note="connecting to redis://u:hunter2@db:6379/0")
    final = await task.wait_result(5)
    assert "hunter2" in (final.error or "")  # stored as raised
    page = await client.get(f"/tasks/{task.uuid}")
    assert page.status == 200
    assert "ValueError: refused connecting to redis://u:" in page.text
    assert "hunter2" not in page.text


async def test_values_that_are_not_json_are_shown_masked() -> None:
    """Where a value is not JSON (a key that is a tuple, bytes, a set), its ``repr`` is shown:
    masked as text, never as the raw value."""
    from qtasks_web.data import pretty

    shown = pretty({"password": "hunter2", "dsn": "redis://u:pw1@h", (1, 2): "x"})
    assert "hunter2" not in shown and "pw1" not in shown
    shown = pretty({"dsn": b"redis://u:pw2@h", "hosts": {"redis://u:pw3@h"}})
    assert "pw2" not in shown and "pw3" not in shown


async def test_the_timers_page_leaves_the_app_alone() -> None:
    """Declared timers are shown without making them the app's timer: no plugin is added
    (plugins disabled, read-only), and the app's own code can still make its timer."""
    from qtasks_timer import AsyncTimer, TimerPlugin

    timers = [{"task": "add", "interval": 30, "args": [1, 2]}]
    config = QueueConfig(plugins_disabled=["*"], extra={"timers": timers})
    app = AsyncQueueTasks("timed", config=config)

    @app.task
    async def add(a: int, b: int) -> int:
        return a + b

    def plugins() -> list[object]:
        return list(app.hooks.pm.get_plugins())

    before = plugins()
    async with app:
        for read_only in (True, False):
            page = await Client(create_app(app, read_only=read_only)).get("/timers")
            assert page.status == 200
            assert "add" in page.text.split("<tbody>", 1)[1]
    assert plugins() == before
    assert not any(isinstance(p, TimerPlugin) for p in plugins())
    AsyncTimer(app)  # raised "app already has a timer" when the page had made one


async def test_a_uuid_is_found_under_many_newer_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole uuid, or a prefix, finds its task on the first page past the first 10,000
    records; a page that searched without finding anything says so, not 'no task matches'."""
    app = make_app()
    async with app:
        oldest = TaskRecord(uuid=uuid4().hex, task_name="add")
        await app.storage.add(oldest)
        for i in range(12_000):
            await app.storage.add(TaskRecord(uuid=f"n{i:07d}", task_name="add"))
        client = Client(create_app(app))
        for typed in (oldest.uuid, oldest.uuid[:8]):
            page = await client.get(f"/tasks?uuid={typed}")
            assert page.status == 200
            assert f'data-uuid="{oldest.uuid}"' in page.text, typed
        monkeypatch.setattr(memory_storage, "SCAN_BUDGET", 0.0)  # no time to search on
        page = await client.get(f"/tasks?uuid={oldest.uuid[:8]}")
        assert page.status == 200
        assert "no task matches" not in page.text
        assert "none of the records searched so far matches" in page.text
        assert 'id="next"' in page.text


async def test_a_worker_that_stopped_consuming_is_shown_so(
    app: AsyncQueueTasks, client: Client
) -> None:
    """Its heartbeat says its consumer has gone unanswered past its limit (qtasks.health):
    the Workers page says "not consuming", not "live"; a worker within its limit is live."""
    beat = {"host": "h", "pid": 1, "running": 0, "concurrency": 4, "beat_at": time.time()}
    gc = app.global_config
    await gc.heartbeat("stuck", {**beat, "consume_stalled": 75.4, "stall_limit": 60.0}, ttl=30)
    await gc.heartbeat("fine", {**beat, "consume_stalled": 4.0, "stall_limit": 60.0}, ttl=30)
    page = await client.get("/workers")
    assert page.status == 200
    rows = {
        row.split('class="mono">', 1)[1].split("<", 1)[0]: row
        for row in page.text.split("<tr")[1:]
        if 'class="mono">' in row
    }
    assert "not consuming (75 s)" in rows["stuck"]
    assert "not consuming" not in rows["fine"] and ">live<" in rows["fine"]
