"""Authentication and CSRF protection of the dashboard.

Authentication (when :class:`~qtasks_web.settings.Auth` has credentials): a request passes
with ``Authorization: Bearer <token>``, ``Authorization: Basic`` of a configured user, or the
session cookie that ``POST /login`` (the token typed into a form) sets: a timestamp signed
with HMAC-SHA256 keyed by the token, valid for :data:`SESSION_AGE`. Tokens are never accepted
in a URL (URLs end up in access logs and browser history). A browser that is not signed in is sent
to the login form with a token alone, and challenged for a user (Basic) when there are users.

CSRF: every page sets a random per-browser token in a ``SameSite=Strict`` cookie and puts in
each form that token signed with the dashboard's key (HMAC-SHA256), so a cookie planted by a
sibling site is worth nothing without the key. The key is the same in every dashboard process
of a cluster, and across restarts: derived from the credentials, or without any, made once and
kept in the app's global config (:func:`shared_csrf_key`). A ``POST`` whose form field is not
the cookie's signature (compared in constant time), whose ``Origin`` is another site, or whose
``Origin`` is ``null`` (a sandboxed frame, a cross-site redirect) is refused with 403.

Without credentials the dashboard serves loopback connections only, and only requests
addressed to a loopback name (``Host: localhost``, ``127.0.0.1``, ``[::1]``, with any port): a
web page whose own name was made to resolve to 127.0.0.1 (DNS rebinding) is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from qtasks.components import GlobalConfig
from qtasks.errors import ConfigError
from qtasks_web.settings import Auth, is_loopback

SESSION_COOKIE = "qtasks_web_session"
CSRF_COOKIE = "qtasks_web_csrf"
CSRF_FIELD = "csrf"
SESSION_AGE = 12 * 3600
_OPEN_PATH = "/login"
"""The one page served without credentials (the sign-in form), matched exactly: a prefix
would open every later route whose path starts with it."""
_OPEN_PREFIX = "/static/"
"""The static files (script, styles), served to anybody."""


def sign_session(token: str, now: float | None = None) -> str:
    """A session cookie value for a browser that presented ``token``."""
    stamp = str(int(now if now is not None else time.time()))
    mac = hmac.new(token.encode(), f"qtasks-web:{stamp}".encode(), hashlib.sha256).hexdigest()
    return f"{stamp}.{mac}"


def session_ok(token: str, value: str, now: float | None = None) -> bool:
    """Whether ``value`` is a session cookie signed with ``token`` and not older than
    :data:`SESSION_AGE`."""
    stamp, _, _mac = value.partition(".")
    if not (stamp.isascii() and stamp.isdigit()):  # "²".isdigit() is true, int() refuses it
        return False
    current = now if now is not None else time.time()
    if not 0 <= current - int(stamp) <= SESSION_AGE:
        return False
    return hmac.compare_digest(sign_session(token, int(stamp)), value)


def _basic_ok(auth: Auth, header: str) -> bool:
    try:
        decoded = base64.b64decode(header, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    expected = auth.users.get(user)
    # Compare against something even for an unknown user, so timing does not tell.
    ok = hmac.compare_digest(password.encode(), (expected or secrets.token_hex(8)).encode())
    return bool(sep) and expected is not None and ok


def authenticated(auth: Auth, request: Request) -> bool:
    """Whether ``request`` carries a valid credential of ``auth`` (always, without one)."""
    if not auth.enabled:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if auth.token and scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), auth.token.encode())
    if auth.users and scheme.lower() == "basic":
        return _basic_ok(auth, value.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    return bool(auth.token and cookie and session_ok(auth.token, cookie))


class AuthMiddleware:
    """Refuses unauthenticated requests (pure ASGI, so live event streams are not buffered).

    Also refuses to serve at all, with a clear 503, when it is reached through a
    non-loopback address while no credential is configured: a dashboard mounted in a public
    service must not be open."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if not self.auth.enabled:
            server = scope.get("server")
            if server and not is_loopback(str(server[0])):
                response: Response = PlainTextResponse(
                    "qtasks-web refuses to serve without authentication on a non-loopback "
                    "address: configure a token or users ([extra.web] or create_app(auth=...))",
                    status_code=503,
                )
                await response(scope, receive, send)
                return
            host = request.headers.get("host")
            if host is not None and not loopback_name(host):
                response = PlainTextResponse(
                    "qtasks-web without authentication answers only requests addressed to "
                    "localhost or a loopback address, not to "
                    f"{host[:100]!r}: configure a token or users to serve other names",
                    status_code=403,
                )
                await response(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        local = path[len(root) :] if root and path.startswith(root) else path
        open_path = local == _OPEN_PATH or local.startswith(_OPEN_PREFIX)
        if open_path or authenticated(self.auth, request):
            await self.app(scope, receive, send)
            return
        response = self._challenge(request, root)
        await response(scope, receive, send)

    def _challenge(self, request: Request, root: str) -> Response:
        browser = "text/html" in request.headers.get("accept", "") and request.method == "GET"
        if self.auth.users:
            # A Basic challenge, browsers included (they ask for a user and password in a
            # dialog of their own): a redirect to the token form would leave the users no way
            # in. With a token too, the page behind the dialog links to that form.
            headers = {"WWW-Authenticate": 'Basic realm="qtasks"'}
            if browser and self.auth.token:
                login = html.escape(f"{root}/login", quote=True)
                page = (
                    "<!doctype html><title>Sign in · qtasks</title><h1>Sign in</h1><p>Sign in "
                    f'with a user and password, or <a id="token-login" href="{login}">with the '
                    "token</a>.</p>"
                )
                return HTMLResponse(page, status_code=401, headers=headers)
            return PlainTextResponse("authentication required", status_code=401, headers=headers)
        if self.auth.token and browser:
            return RedirectResponse(f"{root}/login", status_code=303)
        return PlainTextResponse("authentication required", status_code=401)


def loopback_name(host: str) -> bool:
    """Whether a ``Host`` header names this machine: ``localhost`` (or a name under it, which
    browsers resolve to loopback themselves), a 127.0.0.0/8 address or ``[::1]``, with or
    without a port."""
    name = host.strip().lower()
    if name.startswith("["):
        if "]" not in name:
            return False
        name = name[1 : name.find("]")]
    else:
        name = name.rpartition(":")[0] if name.count(":") == 1 else name
    name = name.rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


CSRF_KEY_NAMESPACE = "qtasks_web"
CSRF_KEY_NAME = "csrf_key"
"""Where a dashboard without credentials keeps its CSRF key in the app's global config."""


def csrf_key(auth: Auth) -> bytes | None:
    """The key that signs CSRF tokens, derived from the credentials when there are some (so
    every replica of one dashboard agrees); ``None`` without credentials: then the key is the
    cluster's, :func:`shared_csrf_key`."""
    if not auth.enabled:
        return None
    material = "\0".join([auth.token or "", *sorted(f"{u}:{p}" for u, p in auth.users.items())])
    return hashlib.sha256(f"qtasks-web-csrf\0{material}".encode()).digest()


async def shared_csrf_key(config: GlobalConfig) -> bytes:
    """The CSRF key of every dashboard without credentials over ``config``: made once (the
    first dashboard to ask wins, atomically) and kept with no expiry, so a form rendered by one
    dashboard process is accepted by another, and after a restart. A kept value that is not a
    key is a :class:`~qtasks.errors.ConfigError` (naming where it is, never its value)."""
    kept = await config.get(CSRF_KEY_NAMESPACE, CSRF_KEY_NAME)
    if kept is None:
        made = secrets.token_urlsafe(32)
        if await config.set_if_absent(CSRF_KEY_NAMESPACE, CSRF_KEY_NAME, made):
            return _decoded_key(made)
        kept = await config.get(CSRF_KEY_NAMESPACE, CSRF_KEY_NAME)
    return _decoded_key(kept)


def _decoded_key(value: Any) -> bytes:
    try:
        key = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (TypeError, ValueError, binascii.Error):
        key = b""
    if len(key) < 32:
        raise ConfigError(
            f"the dashboard's CSRF key kept in the global config (namespace "
            f"{CSRF_KEY_NAMESPACE!r}, key {CSRF_KEY_NAME!r}) is not a key of 32 or more "
            "url-safe base64 bytes: delete it and the next dashboard makes a new one"
        )
    return key


def csrf_field(key: bytes, token: str) -> str:
    """The value a form carries for the CSRF cookie ``token``: its signature with ``key``."""
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()


def csrf_token(request: Request) -> str:
    """This browser's CSRF cookie value (made on its first page; :func:`set_csrf_cookie`
    stores it); forms carry :func:`csrf_field` of it."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and len(existing) == 43:
        return existing
    made: str | None = getattr(request.state, "csrf", None)
    if made is None:
        made = secrets.token_urlsafe(32)
        request.state.csrf = made
    return made


def cookie_path(request: Request) -> str:
    """The path of the dashboard's cookies: where it is mounted (``/`` when it is served on
    its own), so that two dashboards mounted on one host (``/billing``, ``/mail``) each keep
    their own session and CSRF cookies instead of overwriting each other's."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/") or "/"


def set_csrf_cookie(request: Request, response: Response) -> None:
    """Store the token :func:`csrf_token` made for this request, if it made one."""
    made = getattr(request.state, "csrf", None)
    if made is not None:
        response.set_cookie(
            CSRF_COOKIE,
            made,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=cookie_path(request),
        )


def csrf_problem(request: Request, form: Any, key: bytes) -> str | None:
    """Why a POST with ``form`` must be refused, or ``None`` when it may proceed."""
    origin = request.headers.get("origin")
    if origin == "null":
        return "the request comes from an opaque origin (a sandboxed frame or a redirect)"
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        return "the request comes from another site"
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD, "")
    if not cookie or not isinstance(sent, str) or not sent:
        return "the CSRF token is missing: reload the page and try again"
    if not hmac.compare_digest(csrf_field(key, cookie).encode(), sent.encode()):
        return "the CSRF token does not match: reload the page and try again"
    return None
