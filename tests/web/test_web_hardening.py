"""What a hostile web page or a crafted message can try against the dashboard: DNS rebinding
(a foreign ``Host`` on loopback), a planted CSRF cookie, ``Origin: null``, text of its own in
the status banner, a crafted session cookie, a carriage return in an event's data, and dead
letters that hold secrets positionally or nest too deep to parse."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
import pytest
from starlette.applications import Starlette
from web_helpers import Client

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus
from qtasks.messages import Envelope, Message
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
from qtasks_web import Auth, create_app
from qtasks_web.data import MASK
from qtasks_web.live import sse
from qtasks_web.security import CSRF_KEY_NAME, CSRF_KEY_NAMESPACE, csrf_field

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    the_app = AsyncQueueTasks("shop", config=QueueConfig(plugins_disabled=["*"]))

    @the_app.task
    async def login(user: str, password: str) -> None: ...

    async with the_app:
        yield the_app


async def test_without_auth_a_foreign_host_is_refused_even_on_loopback(
    app: AsyncQueueTasks,
) -> None:
    """A page at attacker.example whose name now resolves to 127.0.0.1 reaches the dashboard's
    socket, with its own name in ``Host``: refused, for pages, the API and actions alike."""
    web = create_app(app)
    task = await app.add_task("login", "alice", "hunter2")
    for host in ("attacker.example:8000", "attacker.example", "127.0.0.1.evil.example"):
        client = Client(web)
        for path in ("/", "/api/overview", f"/tasks/{task.uuid}", "/events/overview"):
            refused = await client.get(path, headers={"host": host})
            assert refused.status == 403, (host, path)
            assert "addressed to localhost" in refused.text
        posted = await client.post(
            f"/tasks/{task.uuid}/cancel", form={"csrf": "x"}, headers={"host": host}
        )
        assert posted.status == 403
    stored = await app.get(task.uuid)
    assert stored is not None and stored.status is not TaskStatus.CANCEL
    for host in ("localhost:8000", "LOCALHOST", "127.0.0.1", "127.1.2.3:80", "[::1]:8000"):
        assert (await Client(web).get("/", headers={"host": host})).status == 200, host
    # With credentials the name does not matter: the credentials are the check.
    guarded = Client(create_app(app, auth=Auth(token="t0k-abc")))
    page = await guarded.get(
        "/", headers={"host": "queue.example", "authorization": "Bearer t0k-abc"}
    )
    assert page.status == 200


def test_loopback_names() -> None:
    from qtasks_web.security import loopback_name

    for host in ("localhost", "a.localhost:9", "localhost.", "127.0.0.1:1", "[::1]", "::1"):
        assert loopback_name(host), host
    for host in ("", "example.com", "localhost.example", "[::2]:80", "10.0.0.1:8000", "[::1"):
        assert not loopback_name(host), host


async def test_a_planted_csrf_cookie_or_a_null_origin_is_refused(app: AsyncQueueTasks) -> None:
    """A sibling site can set the CSRF cookie (cookies ignore ports and subdomains share
    them): a form carrying the cookie's own value is refused, only the dashboard's signature of
    it passes; ``Origin: null`` (a sandboxed frame, a cross-site redirect) is refused."""
    client = Client(create_app(app))
    # Delayed, so the worker cannot finish it before the dashboard cancels it.
    task = await app.add_task("login", "alice", "pw", delay=3600)
    path = f"/tasks/{task.uuid}"
    planted = "p" * 43
    client.cookies["qtasks_web_csrf"] = planted
    shown = await client.get(path)
    assert shown.csrf() != planted  # the form carries a signature, not the cookie
    refused = await client.post(f"{path}/cancel", form={"csrf": planted})
    assert refused.status == 403 and "does not match" in refused.text
    null = await client.post(
        f"{path}/cancel", form={"csrf": shown.csrf()}, headers={"origin": "null"}
    )
    assert null.status == 403 and "opaque origin" in null.text
    stored = await app.get(task.uuid)
    assert stored is not None and not stored.status.final
    done = await client.post(f"{path}/cancel", form={"csrf": shown.csrf()})
    assert done.status == 303
    assert (await app.wait(task.uuid, timeout=5)).status is TaskStatus.CANCEL


@dataclass
class Shown:
    """A task page rendered by one dashboard, seen by one browser."""

    client: Client
    path: str
    uuid: str
    csrf: str


async def _show(web: Starlette, app: AsyncQueueTasks) -> Shown:
    task = await app.add_task("login", "alice", "pw", delay=3600)  # pending until cancelled
    client = Client(web)
    shown = await client.get(f"/tasks/{task.uuid}")
    assert shown.status == 200
    return Shown(client, f"/tasks/{task.uuid}", task.uuid, shown.csrf())


async def _accepted(shown: Shown, web: Starlette, app: AsyncQueueTasks) -> None:
    """``web`` (over ``app``) accepts the form of ``shown`` and refuses a forged signature of
    the same cookie; its signed status message shows on the page of the redirect."""
    client = Client(web, cookies=dict(shown.client.cookies))
    forged = csrf_field(secrets.token_bytes(32), client.cookies["qtasks_web_csrf"])
    refused = await client.post(f"{shown.path}/cancel", form={"csrf": forged})
    assert refused.status == 403 and "does not match" in refused.text
    done = await client.post(f"{shown.path}/cancel", form={"csrf": shown.csrf})
    assert done.status == 303, done.text
    assert (await app.wait(shown.uuid, timeout=5)).status is TaskStatus.CANCEL
    banner = await shown.client.get(done.headers["location"])
    assert '<p class="message" role="status">cancelled</p>' in banner.text


async def test_dashboards_without_auth_share_the_csrf_key_of_their_global_config(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    """Several dashboards behind one address accept each other's forms (and status messages):
    the key is the cluster's, kept in the global config, and never logged."""
    caplog.set_level(logging.DEBUG)
    await _accepted(await _show(create_app(app), app), create_app(app), app)
    kept = await app.global_config.get(CSRF_KEY_NAMESPACE, CSRF_KEY_NAME)
    assert isinstance(kept, str) and kept not in caplog.text


async def test_dashboards_on_redis_share_the_csrf_key_across_processes_and_restarts(
    redis_url: str, redis_prefix: str
) -> None:
    def make() -> AsyncQueueTasks:
        made = AsyncQueueTasks(
            "shop",
            broker=RedisBroker(redis_url, prefix=redis_prefix),
            storage=RedisStorage(redis_url, prefix=redis_prefix),
            global_config=RedisGlobalConfig(redis_url, prefix=redis_prefix),
            config=QueueConfig(plugins_disabled=["*"]),
        )
        made.task(name="login")(_login)
        return made

    first, second = make(), make()
    async with first, second:
        await _accepted(await _show(create_app(first), first), create_app(second), second)
        before_restart = await _show(create_app(first), first)
    restarted = make()
    async with restarted:
        await _accepted(before_restart, create_app(restarted), restarted)


async def _login(user: str, password: str) -> None: ...


async def test_a_kept_csrf_key_that_is_not_a_key_is_a_clear_error(app: AsyncQueueTasks) -> None:
    await app.global_config.set(CSRF_KEY_NAMESPACE, CSRF_KEY_NAME, "short-secret")
    page = await Client(create_app(app)).get("/")
    assert page.status == 503 and "delete it" in page.text and "short-secret" not in page.text


async def test_the_status_banner_shows_only_the_dashboards_own_messages(
    app: AsyncQueueTasks,
) -> None:
    client = Client(create_app(app, auth=Auth(token="t0k-abc")))
    phishing = "The token was rotated, sign in at https://evil.example"
    login = await client.get("/login?msg=" + phishing.replace(" ", "+"))
    assert login.status == 200 and "evil.example" not in login.text
    # A message the dashboard wrote itself (signed in its redirect) is shown.
    client = Client(create_app(app))
    task = await app.add_task("login", "alice", "pw")
    done = await client.act(f"/tasks/{task.uuid}", f"/tasks/{task.uuid}/cancel")
    assert done.status == 303
    after = await client.get(done.headers["location"])
    assert "cancelled" in after.text
    location = unquote(done.headers["location"])
    forged = location.replace("msg=cancelled", "msg=hacked")
    assert "hacked" not in (await client.get(forged)).text


async def test_a_crafted_session_cookie_is_refused_not_a_crash(app: AsyncQueueTasks) -> None:
    client = Client(create_app(app, auth=Auth(token="t0k-abc")))
    for value in ("\u00b2.x", "\u0663\u0663.x", "12.x", ".", "x" * 300):
        client.cookies["qtasks_web_session"] = value
        reply = await client.get("/api/overview", headers={"accept": "*/*"})
        assert reply.status == 401, value


def test_event_data_splits_lines_as_a_browser_does() -> None:
    """A browser ends an event's line at CR, LF or CRLF: a CR inside the data (a task name
    from a producer) must not start a field of its own (``event:``, ``retry:``)."""
    sent = sse("rows", "a\revent: end\r\nretry: 99\nb").decode()
    assert sent == "event: rows\ndata: a\ndata: event: end\ndata: retry: 99\ndata: b\n\n"


async def test_dead_letters_mask_positional_secrets_and_survive_any_body(
    app: AsyncQueueTasks,
) -> None:
    client = Client(create_app(app))
    # One argument too many: rejected, its arguments shown, the password masked.
    secret = Message(uuid="dl-secret", task_name="login", args=["alice", "hunter2-SECRET", 3])
    await app.broker.publish(app.codec.encode(secret))
    deep = b"[" * 200_000 + b"]" * 200_000  # under max_message_size, deeper than any parser
    await app.broker.publish(Envelope(id="dl-deep", body=deep))
    raw = b"password=hunter2-RAW not a message"
    await app.broker.publish(Envelope(id="dl-raw", body=raw))
    ids = {"dl-secret", "dl-deep", "dl-raw"}
    with anyio.fail_after(5):
        while {d.id for d in await app.dead_letters()} != ids:  # noqa: ASYNC110 - the worker nacks them
            await anyio.sleep(0.01)
    # The deep one was refused as undecodable (not retried as a worker failure).
    reasons = {d.id: d.reason for d in await app.dead_letters()}
    assert reasons["dl-deep"].startswith("undecodable message")
    page = await client.get("/dead-letters")
    assert page.status == 200
    assert "hunter2" not in page.text
    assert MASK in page.text and "alice" in page.text
    assert f"({len(raw)} bytes, not a readable message)" in page.text
