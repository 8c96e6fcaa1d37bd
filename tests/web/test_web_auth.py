"""Authentication of the dashboard (token, basic-auth users, the login form), the refusal to
serve a non-loopback address without it, its settings from ``[extra.web]``, and credentials
kept out of the logs."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from web_helpers import Client

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.errors import ConfigError
from qtasks_web import Auth, WebSettings, create_app
from qtasks_web.security import SESSION_AGE, session_ok, sign_session
from qtasks_web.server import check_bind
from qtasks_web.settings import is_loopback

pytestmark = pytest.mark.anyio
TOKEN = "tok-3f9a1c0e5b7d"
PASSWORD = "pw-8c2e4a6b"


@pytest.fixture
async def app() -> AsyncIterator[AsyncQueueTasks]:
    the_app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    await the_app.start()
    yield the_app
    await the_app.aclose()


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_a_token_is_required_and_accepted_three_ways(
    app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = Client(create_app(app, auth=Auth(token=TOKEN)))
    page = await client.get("/")
    assert page.status == 303 and page.headers["location"] == "/login"
    assert (await client.get("/api/overview", headers={"accept": "*/*"})).status == 401
    assert (await client.get("/events/overview", headers={"accept": "*/*"})).status == 401
    wrong = await client.get("/", headers={"authorization": "Bearer nope"})
    assert wrong.status == 303
    bearer = await client.get("/api/overview", headers={"authorization": f"Bearer {TOKEN}"})
    assert bearer.status == 200
    # The cluster metrics are served by the dashboard too, behind the same auth.
    assert (await client.get("/metrics", headers={"accept": "*/*"})).status == 401
    scraped = await client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert scraped.status == 200 and "# TYPE qtasks_" in scraped.text
    # The login form: a wrong token is refused, the right one gives a session cookie.
    form = await client.get("/login")
    assert form.status == 200
    refused = await client.post("/login", form={"csrf": form.csrf(), "token": "guess"})
    assert refused.status == 403 and "not right" in refused.text
    no_csrf = await client.post("/login", form={"token": TOKEN})
    assert no_csrf.status == 403
    signed_in = await client.post("/login", form={"csrf": form.csrf(), "token": TOKEN})
    assert signed_in.status == 303
    assert (await client.get("/")).status == 200  # with the session cookie now
    assert TOKEN not in caplog.text
    assert "guess" not in caplog.text


async def test_only_the_login_page_itself_is_open(app: AsyncQueueTasks) -> None:
    # A path that merely starts with /login is behind the auth like every other one: a route
    # added later under such a name must not be open to anybody.
    client = Client(create_app(app, auth=Auth(token=TOKEN)))
    assert (await client.get("/login")).status == 200
    assert (await client.get("/static/app.js")).status == 200
    for path in ("/loginx", "/login-something", "/login/../api/overview"):
        response = await client.get(path, headers={"accept": "*/*"})
        assert response.status == 401, path


async def test_dashboards_mounted_side_by_side_keep_their_own_cookies(
    app: AsyncQueueTasks,
) -> None:
    # Cookies were set with Path=/: a second dashboard on the same host (another app, another
    # token) overwrote the first one's session, and signing in to one signed out of the other.
    site = Starlette(
        routes=[
            Mount("/billing", app=create_app(app, auth=Auth(token=TOKEN))),
            Mount("/mail/", app=create_app(app, auth=Auth(token=TOKEN + "-mail"))),
        ]
    )
    for root, token in (("/billing", TOKEN), ("/mail", TOKEN + "-mail")):
        client = Client(site)  # a browser sends a cookie only under its path: none here yet
        form = await client.get(f"{root}/login")
        assert "path=" + root in form.headers["set-cookie"].lower()  # the CSRF cookie
        signed_in = await client.post(f"{root}/login", form={"csrf": form.csrf(), "token": token})
        assert signed_in.status == 303
        assert "path=" + root in signed_in.headers["set-cookie"].lower()  # the session
    # On its own, a dashboard's cookies are the whole site's.
    alone = await Client(create_app(app, auth=Auth(token=TOKEN))).get("/login")
    assert "path=/;" in alone.headers["set-cookie"].lower()


async def test_basic_auth_users(app: AsyncQueueTasks, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = Client(create_app(app, auth=Auth(users={"ops": PASSWORD})))
    anonymous = await client.get("/")
    assert anonymous.status == 401
    assert anonymous.headers["www-authenticate"] == 'Basic realm="qtasks"'
    assert (await client.get("/", headers=basic("ops", "wrong"))).status == 401
    assert (await client.get("/", headers=basic("root", PASSWORD))).status == 401
    assert (await client.get("/", headers={"authorization": "Basic !!!"})).status == 401
    assert (await client.get("/", headers=basic("ops", PASSWORD))).status == 200
    assert PASSWORD not in caplog.text


async def test_with_a_token_and_users_a_browser_is_challenged_for_a_user(
    app: AsyncQueueTasks,
) -> None:
    """Both configured: a page asked for by a browser answers 401 with the Basic challenge (a
    redirect to the token form would shut the users out) and links to that form."""
    client = Client(create_app(app, auth=Auth(token=TOKEN, users={"ops": PASSWORD})))
    page = await client.get("/tasks")
    assert page.status == 401
    assert page.headers["www-authenticate"] == 'Basic realm="qtasks"'
    assert 'href="/login"' in page.text
    assert (await client.get("/tasks", headers=basic("ops", PASSWORD))).status == 200
    assert (await client.get("/login")).status == 200


async def test_no_auth_serves_loopback_only(app: AsyncQueueTasks) -> None:
    web = create_app(app)
    assert (await Client(web, server=("127.0.0.1", 8000)).get("/")).status == 200
    assert (await Client(web, server=("::1", 8000)).get("/")).status == 200
    exposed = await Client(web, server=("10.1.2.3", 8000)).get("/")
    assert exposed.status == 503
    assert "refuses to serve without authentication" in exposed.text
    guarded = create_app(app, auth=Auth(token=TOKEN))
    public = Client(guarded, server=("10.1.2.3", 8000))
    assert (await public.get("/", headers={"authorization": f"Bearer {TOKEN}"})).status == 200


def test_the_cli_bind_check() -> None:
    check_bind(WebSettings(host="127.0.0.1"))
    check_bind(WebSettings(host="0.0.0.0", auth=Auth(token=TOKEN)))
    with pytest.raises(ConfigError, match="not a loopback address, needs authentication"):
        check_bind(WebSettings(host="0.0.0.0"))
    assert [is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "[::1]")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "example.com", "10.0.0.1")] == [False] * 4


def test_a_mistyped_qtasks_web_variable_is_named_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``QTASKS_WEB_TOKNE`` for ``env:QTASKS_WEB_TOKEN``: every command loading the
    configuration warns, and the dashboard's error names the variable it found, never the
    value."""
    from qtasks.config import load_config

    file = tmp_path / "qtasks.toml"
    file.write_text('[extra.web]\ntoken = "env:QTASKS_WEB_TOKEN"\n')
    monkeypatch.delenv("QTASKS_WEB_TOKEN", raising=False)
    monkeypatch.setenv("QTASKS_WEB_TOKNE", TOKEN)
    with caplog.at_level(logging.WARNING, logger="qtasks.config"):
        config = load_config(file).config
    assert "env QTASKS_WEB_TOKNE is set but nothing reads it" in caplog.text
    assert "a typo of QTASKS_WEB_TOKEN?" in caplog.text and TOKEN not in caplog.text
    with pytest.raises(ConfigError) as caught:
        WebSettings.from_config(config)
    assert str(caught.value) == (
        "extra.web.token: the environment variable 'QTASKS_WEB_TOKEN' is not set "
        "(set: QTASKS_WEB_TOKNE; a typo?)"
    )


def test_sessions_expire_and_are_bound_to_the_token() -> None:
    cookie = sign_session(TOKEN, now=1_000_000)
    assert session_ok(TOKEN, cookie, now=1_000_000 + 60)
    assert not session_ok(TOKEN, cookie, now=1_000_000 + SESSION_AGE + 1)
    assert not session_ok("another-token", cookie, now=1_000_000 + 60)
    assert not session_ok(TOKEN, "garbage", now=1_000_000)


def test_settings_from_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_TOKEN_FOR_TEST", TOKEN)
    config = QueueConfig(
        extra={
            "web": {
                "host": "0.0.0.0",
                "port": 9000,
                "token": "env:WEB_TOKEN_FOR_TEST",
                "users": {"ops": PASSWORD},
                "read_only": True,
                "refresh": 2,
            }
        }
    )
    settings = WebSettings.from_config(config)
    assert (settings.host, settings.port, settings.read_only, settings.refresh) == (
        "0.0.0.0",
        9000,
        True,
        2.0,
    )
    assert settings.auth.token == TOKEN and dict(settings.auth.users) == {"ops": PASSWORD}
    assert TOKEN not in repr(settings) and PASSWORD not in repr(settings)
    assert WebSettings.from_config(QueueConfig()) == WebSettings()
    for table, problem in (
        ({"tokn": "x"}, "unknown key"),
        ({"port": "80"}, "expected int"),
        ({"read_only": "yes"}, "expected bool"),
        ({"refresh": 0}, "refresh"),
        ({"token": "env:NOT_SET_ANYWHERE_42"}, "NOT_SET_ANYWHERE_42"),
        ({"token": ""}, "non-empty string"),
        ({"users": ["ops"]}, "table of user = password"),
        ("web", "must be a table"),
    ):
        with pytest.raises(ConfigError, match=problem):
            WebSettings.from_config(QueueConfig(extra={"web": table}))
    # A value of the wrong type is quoted masked: a URL given as the host keeps its password.
    with pytest.raises(ConfigError) as caught:
        WebSettings.from_config(QueueConfig(extra={"web": {"host": b"https://u:hunter2@h"}}))
    assert "https://u:***@h" in str(caught.value) and "hunter2" not in str(caught.value)
