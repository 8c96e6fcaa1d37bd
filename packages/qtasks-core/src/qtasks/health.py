"""The worker's health probe: ``/livez`` and ``/readyz`` over HTTP, served by a worker whose
configuration sets ``health_port`` (``qtasks run --health-port 8081``), for Kubernetes'
probes, a load balancer or a supervisor.

- ``GET /livez``: 200 while the worker's consumer hears from the broker; 503 once it has been
  trying to receive for more than ``health_stall_limit`` seconds without an answer: the
  worker is alive but no longer consuming (a connection that hangs, a consumer the server
  dropped), and restarting it is the cure. A worker whose slots are all busy is not
  stalled: it asks for nothing.
- ``GET /readyz``: 200 while the worker serves and is not stalled; 503 while it starts or
  stops, or is stalled.

``run_forever``, ``serve`` and ``qtasks run`` listen before the components start
(:class:`~qtasks.components.EarlyProbe`): while the worker waits for its servers
(``start_timeout``, :mod:`qtasks.waiting`) ``/livez`` answers 200 and ``/readyz`` 503, the
state ``starting``.

Both answer a small JSON object::

    {"status": "ok", "state": "serving", "consume_stalled": 0.0, "stall_limit": 60.0,
     "running": 2, "waiting": 0, "worker": "host:1234:ab12cd34"}

``consume_stalled`` is ``null`` when the broker cannot tell (it lacks the
:class:`~qtasks.components.ConsumeHealth` capability; the in-memory, Redis and RabbitMQ
brokers have it): ``/livez`` then answers for the event loop alone. The probe answers from
the worker's event loop, so a loop blocked by a task's code does not answer either (a
probe's timeout sees it). It shows no task data, and reads at most 8 KiB of a request within
5 s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.stapled import MultiListener

from qtasks.errors import ConfigError

log = logging.getLogger("qtasks.health")

READ_TIMEOUT = 5.0
"""Seconds a client has to send its request's head."""

MAX_HEAD = 8192
"""Largest request head read, in bytes; a longer one is answered 431."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def stalled_past(stalled: object, limit: object) -> float | None:
    """``stalled`` (seconds, as :class:`Health` and a worker's heartbeat carry it) when it is
    past ``limit``: the worker is alive but not consuming; else ``None`` (within the limit,
    or either unknown). The one rule the probe, ``qtasks inspect`` and the dashboard apply."""
    numbers = (int, float)
    if isinstance(stalled, numbers) and isinstance(limit, numbers) and stalled > limit:
        return float(stalled)
    return None


@dataclass(frozen=True, slots=True)
class Health:
    """What the probe answers: the worker's ``state`` (``starting``, ``serving`` or
    ``stopping``), how long its consumer has been stalled (``None``: the broker cannot
    tell), the limit, and its counts."""

    state: str
    consume_stalled: float | None
    stall_limit: float
    running: int
    waiting: int
    worker: str

    @property
    def live(self) -> bool:
        """Whether ``/livez`` answers 200: the consumer is not stalled past the limit."""
        return stalled_past(self.consume_stalled, self.stall_limit) is None

    @property
    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200: live, and serving (not starting nor stopping)."""
        return self.live and self.state == "serving"

    def status(self) -> str:
        """``ok``, ``stalled`` or the state that keeps the worker from being ready."""
        if not self.live:
            return "stalled"
        return "ok" if self.state == "serving" else self.state

    def as_dict(self) -> dict[str, object]:
        return {
            "status": self.status(),
            "state": self.state,
            "consume_stalled": self.consume_stalled,
            "stall_limit": self.stall_limit,
            "running": self.running,
            "waiting": self.waiting,
            "worker": self.worker,
        }


@asynccontextmanager
async def listening(host: str, port: int) -> AsyncIterator[MultiListener[SocketStream]]:
    """The probe's listener on ``host:port`` (``port`` 0 picks a free one), closed at the
    exit; a port that cannot be listened on raises :class:`~qtasks.errors.ConfigError`."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigError(
            f"health_port: cannot listen on {host}:{port} for the health probe "
            f"({exc.strerror or exc})"
        ) from None
    async with listener:
        log.info("health probe on http://%s:%d (/livez, /readyz)", host, bound_port(listener))
        yield listener


def bound_port(listener: MultiListener[SocketStream]) -> int:
    """The port ``listener`` listens on."""
    return int(listener.extra(SocketAttribute.local_port))


async def serve(probe: Callable[[], Health], listener: MultiListener[SocketStream]) -> None:
    """Answer ``/livez`` and ``/readyz`` from ``probe()`` on ``listener`` until cancelled."""
    await listener.serve(partial(_answer, probe))


async def _answer(probe: Callable[[], Health], stream: SocketStream) -> None:
    """One request, one answer, then the connection closes. Nothing a client sends (or does
    not send) ends the probe: each connection's failure ends that connection only."""
    async with stream:
        try:
            code, body, head_only, extra = _respond(probe, await _read_head(stream))
        except _Refused as refused:
            code, body, head_only, extra = refused.code, {"error": refused.why}, False, ""
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return  # the client went away
        except Exception as exc:  # a component's bug: said, and the probe goes on
            log.error("the health probe failed: %r", exc, exc_info=exc)
            code, body, head_only, extra = 500, {"error": "the probe failed (logged)"}, False, ""
        try:
            await stream.send(_encode(code, body, head_only, extra))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


class _Refused(Exception):
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why


async def _read_head(stream: SocketStream) -> bytes:
    head = b""
    with anyio.move_on_after(READ_TIMEOUT) as scope:
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            head += await stream.receive(4096)
            if len(head) > MAX_HEAD:
                raise _Refused(431, f"request head over {MAX_HEAD} bytes")
    if scope.cancelled_caught:
        raise _Refused(408, f"no complete request within {READ_TIMEOUT:g} s")
    return head


def _respond(probe: Callable[[], Health], head: bytes) -> tuple[int, dict[str, object], bool, str]:
    """``(status code, JSON body, whether to leave the body out, extra header lines)``."""
    parts = head.split(b"\n", 1)[0].strip().split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _Refused(400, "not an HTTP/1.x request line")
    method = parts[0].decode("latin-1")
    path = parts[1].decode("latin-1").split("?", 1)[0]
    if path not in ("/livez", "/readyz"):
        return 404, {"error": "not found; the probe answers /livez and /readyz"}, False, ""
    if method not in ("GET", "HEAD"):
        return 405, {"error": f"method {method} not allowed"}, False, "Allow: GET, HEAD\r\n"
    health = probe()
    ok = health.live if path == "/livez" else health.ready
    return (200 if ok else 503), health.as_dict(), method == "HEAD", ""


def _encode(code: int, body: dict[str, object], head_only: bool, extra: str) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Cache-Control: no-store\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + payload
