"""Helpers of the dashboard tests: an in-process ASGI client (no network, no extra
dependency), a storage without the query capability, and forms with their CSRF token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message

from qtasks.config import QueueConfig
from qtasks.memory import MemoryStorage
from qtasks.record import TaskRecord

CHROMIUM = "/usr/bin/chromium"


@dataclass
class Reply:
    """One response: status, headers (lower-case names), body text."""

    status: int
    headers: dict[str, str]
    text: str
    cookies: dict[str, str] = field(default_factory=dict)

    def csrf(self) -> str:
        """The CSRF token of the page's first form."""
        found = re.search(r'name="csrf" value="([^"]+)"', self.text)
        assert found is not None, "no CSRF field on the page"
        return found.group(1)


@dataclass
class Client:
    """Calls an ASGI app in process, keeping cookies like a browser. ``server`` is the
    address the app sees it is reached through."""

    app: ASGIApp
    server: tuple[str, int] = ("127.0.0.1", 8000)
    cookies: dict[str, str] = field(default_factory=dict)

    async def request(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        raw_path, _, query = path.partition("?")
        sent = dict(headers or {})
        where = self.server[0]
        where = f"[{where}]" if ":" in where else where  # an IPv6 address, as HTTP writes it
        sent.setdefault("host", f"{where}:{self.server[1]}")
        sent.setdefault("accept", "text/html")
        if form is not None:
            body = urlencode(form).encode()
            sent["content-type"] = "application/x-www-form-urlencoded"
        if self.cookies:
            sent["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
            "client": ("127.0.0.1", 50000),
            "server": self.server,
        }
        chunks = [body or b""]
        status = 0
        reply_headers: list[tuple[bytes, bytes]] = []
        parts: list[bytes] = []

        async def receive() -> Message:
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, reply_headers
            if message["type"] == "http.response.start":
                status = message["status"]
                reply_headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.app(scope, receive, send)
        named = {k.decode().lower(): v.decode() for k, v in reply_headers}
        set_cookies: dict[str, str] = {}
        for name, value in reply_headers:
            if name.lower() == b"set-cookie":
                jar: SimpleCookie = SimpleCookie()
                jar.load(value.decode())
                for key, morsel in jar.items():
                    set_cookies[key] = morsel.value
        self.cookies.update(set_cookies)
        return Reply(status, named, b"".join(parts).decode(), set_cookies)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("POST", path, **kwargs)

    async def act(self, page: str, action: str, **fields: str) -> Reply:
        """Open ``page`` and post ``fields`` to ``action`` with the page's CSRF token, as its
        form would."""
        shown = await self.get(page)
        if 'name="csrf"' not in shown.text:  # a page without forms: the login page's token
            shown = await self.get("/login")
        return await self.post(action, form={"csrf": shown.csrf(), **fields})


class PlainStorage:
    """A storage with the basic protocol only (no StorageQuery): every call goes to a
    MemoryStorage, but ``query`` and ``count`` do not exist."""

    local = True

    def __init__(self) -> None:
        self.inner = MemoryStorage()

    async def start(self, stack: AsyncExitStack, config: QueueConfig) -> None:
        await self.inner.start(stack, config)

    async def add(self, record: TaskRecord, *, replace: bool = True) -> None:
        await self.inner.add(record, replace=replace)

    async def get(self, uuid: str) -> TaskRecord | None:
        return await self.inner.get(uuid)

    async def begin(self, record: TaskRecord, *, generation: int = 0) -> TaskRecord:
        return await self.inner.begin(record, generation=generation)

    async def save(self, record: TaskRecord, *, fence: str | None = None) -> bool:
        return await self.inner.save(record, fence=fence)

    async def cancel(self, uuid: str, reason: str) -> TaskRecord | None:
        return await self.inner.cancel(uuid, reason)

    async def wait(self, uuid: str, timeout: float | None) -> TaskRecord:
        return await self.inner.wait(uuid, timeout)

    async def add_step(self, uuid: str, value: Any, *, fence: str | None = None) -> int | None:
        return await self.inner.add_step(uuid, value, fence=fence)

    def steps(self, uuid: str, start: int = 0) -> AsyncIterator[Any]:
        return self.inner.steps(uuid, start)

    async def stats(self) -> dict[str, int]:
        return await self.inner.stats()
