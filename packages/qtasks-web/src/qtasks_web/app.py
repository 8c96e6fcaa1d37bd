"""The dashboard's ASGI app: :func:`create_app`.

Pages are rendered on the server (Jinja2, autoescaped: task arguments and errors are
untrusted text); a small script draws the charts and applies the live updates that event
streams (:mod:`qtasks_web.live`) push. Every figure comes from the app's components at the
time of the request, so several dashboards agree and a restart loses nothing.

Over ~500 lines: the routes of every page and action, each small; the data each page shows is
read in :mod:`qtasks_web.data`, the live streams in :mod:`qtasks_web.live`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qtasks.app import AsyncQueueTasks
from qtasks.errors import InvalidQueryError, QTasksError
from qtasks.record import TaskRecord, TaskStatus
from qtasks.steps import StepsRestarted
from qtasks.sync import QueueTasks
from qtasks_web import data
from qtasks_web.filters import TaskFilters
from qtasks_web.live import EventStream, Hub, as_json
from qtasks_web.metrics import cluster_metrics_app
from qtasks_web.security import (
    CSRF_FIELD,
    SESSION_AGE,
    SESSION_COOKIE,
    AuthMiddleware,
    cookie_path,
    csrf_field,
    csrf_key,
    csrf_problem,
    csrf_token,
    set_csrf_cookie,
    shared_csrf_key,
    sign_session,
)
from qtasks_web.settings import Auth, WebSettings

log = logging.getLogger("qtasks.web")
_HERE = Path(__file__).parent
_FORM_MAX = 64 * 1024
CANCEL_REASON = "cancelled from the dashboard"


def _when(value: float | None) -> str:
    if value is None:
        return "—"
    try:
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    except (ValueError, OverflowError, OSError):  # past the year 9999: an eta in ms, say
        return f"{value} (unix seconds, past the year 9999)"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(_HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["began"] = data.began
    env.filters["seconds"] = _seconds
    env.filters["pretty"] = data.pretty
    env.filters["shown"] = data.shown_text
    env.filters["json"] = as_json
    return env


class Dashboard:
    """The routes of one dashboard for one app (built by :func:`create_app`)."""

    def __init__(self, app: AsyncQueueTasks, settings: WebSettings) -> None:
        self.app = app
        self.settings = settings
        self.hub = Hub(app, settings.refresh, settings.window)
        self.env = _environment()
        self.env.filters["preview"] = partial(data.body_preview, app)
        self._key = csrf_key(settings.auth)
        """Signs the CSRF tokens of forms, and the status messages of redirects: derived from
        the credentials, or the cluster's (fetched by :meth:`signing_key`)."""
        self.closed = False
        """Set when the server shuts down: open event streams end (see :func:`close`)."""

    # --- helpers --------------------------------------------------------------------------

    async def ready(self) -> None:
        """Start the app's components in this event loop and fetch the signing key
        (idempotent)."""
        await self.app.start()
        await self.signing_key()

    async def signing_key(self) -> bytes:
        """The key of CSRF tokens and status messages: without credentials, the one every
        dashboard over the app's global config shares (fetched once per process)."""
        if self._key is None:
            await self.app.start()
            self._key = await shared_csrf_key(self.app.global_config)
        return self._key

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = self.env.get_template(name).render(
            root=root,
            # No key only when the components failed: an error page, whose forms cannot pass.
            csrf=csrf_field(self._key, csrf_token(request)) if self._key is not None else "",
            csrf_field=CSRF_FIELD,
            read_only=self.settings.read_only,
            app_name=self.app.name,
            message=self._message(request),
            queryable=data.queryable(self.app) is not None,
            storage_name=type(self.app.storage).__name__,
            statuses=data.STATUSES,
            **context,
        )
        response = HTMLResponse(page, status_code=status_code)
        response.headers["content-security-policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "same-origin"
        set_csrf_cookie(request, response)
        return response

    def back(self, request: Request, path: str, message: str = "") -> RedirectResponse:
        """Redirect to ``path`` showing ``message``, signed: a page shows only the messages
        the dashboard wrote (a link cannot put its own text on it)."""
        root = request.scope.get("root_path", "")
        target = f"{root}{path}"
        if message:
            target += ("&" if "?" in target else "?") + "msg=" + quote(message)
            target += "&sig=" + self._signature(message)
        return RedirectResponse(target, status_code=303)

    def _signature(self, message: str) -> str:
        if self._key is None:  # not fetched: the components failed, so no message is shown
            return ""
        return hmac.new(self._key, f"msg\0{message}".encode(), hashlib.sha256).hexdigest()[:32]

    def _message(self, request: Request) -> str:
        """The ``msg`` of the URL when :meth:`back` signed it, else nothing."""
        message = request.query_params.get("msg", "")[:300]
        signature = request.query_params.get("sig", "")
        expected = self._signature(message)
        if message and expected and hmac.compare_digest(expected, signature):
            return message
        return ""

    async def action_form(self, request: Request) -> dict[str, str] | Response:
        """The form of a POST action, or the response refusing it (read-only, CSRF)."""
        if self.settings.read_only:
            return self.render(
                request, "error.html", 403, title="Read-only", problem="this dashboard is read-only"
            )
        form = await _read_form(request)
        if form is None:
            return self.render(
                request, "error.html", 413, title="Too large", problem="form too large"
            )
        problem = csrf_problem(request, form, await self.signing_key())
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.url.path, problem)
            return self.render(request, "error.html", 403, title="Refused", problem=problem)
        return form

    async def record_or_404(self, request: Request, uuid: str) -> TaskRecord | Response:
        record = await self.app.storage.get(uuid) if len(uuid) <= 200 else None
        return self.not_found(request, uuid) if record is None else record

    def not_found(self, request: Request, uuid: str) -> Response:
        return self.render(
            request,
            "error.html",
            404,
            title="Unknown task",
            problem=f"no task record for uuid {uuid[:200]!r} (never stored, or expired)",
        )

    async def failed(self, request: Request, exc: Exception) -> Response:
        """A component failed (unreachable server, bad stored data): a page that says so,
        instead of a bare 500."""
        log.warning("dashboard page %s failed: %s", request.url.path, exc)
        return self.render(
            request,
            "error.html",
            503,
            title="Unavailable",
            problem=f"the app's components did not answer: {exc}",
        )

    # --- pages ----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        await self.ready()
        figures = await self.hub.overview()
        return self.render(request, "overview.html", page="overview", figures=figures)

    async def overview_json(self, request: Request) -> Response:
        await self.ready()
        return JSONResponse(await self.hub.overview())

    async def tasks(self, request: Request) -> Response:
        await self.ready()
        filters = TaskFilters.parse(request.query_params)
        storage = data.queryable(self.app)
        records: list[TaskRecord] = []
        next_cursor = None
        if storage is not None and not filters.errors:
            try:
                query = filters.query()
                # A first page opens a live stream next (not one with a cursor): the hub
                # keeps its rows for it.
                page = await (storage.query(query) if filters.cursor else self.hub.opened(query))
            except InvalidQueryError as exc:
                filters.errors.append(exc.problem)
            else:
                records, next_cursor = page.records, page.cursor
        return self.render(
            request,
            "tasks.html",
            400 if filters.errors else 200,
            page="tasks",
            filters=filters,
            records=records,
            next_cursor=next_cursor,
            counts=dict(sorted((await self.app.storage.stats()).items())),
        )

    async def task(self, request: Request) -> Response:
        await self.ready()
        found = await self.record_or_404(request, request.path_params["uuid"])
        if isinstance(found, Response):
            return found
        kids, complete = await data.children(self.app, found)
        return self.render(
            request,
            "task.html",
            page="tasks",
            children=kids,
            children_complete=complete,
            args=data.masked_args(self.app, found.task_name, found.args),
            **_state(found, await data.attempts(self.app, found)),
        )

    async def workers(self, request: Request) -> Response:
        await self.ready()
        rows = await data.workers(self.app)
        return self.render(request, "workers.html", page="workers", workers=rows)

    async def timers(self, request: Request) -> Response:
        await self.ready()
        rows = await data.timers(self.app)
        return self.render(request, "timers.html", page="timers", timers=rows)

    async def dead_letters(self, request: Request) -> Response:
        await self.ready()
        letters = await data.dead_letters(self.app)
        stats = await self.app.broker.stats()
        return self.render(
            request,
            "dead_letters.html",
            page="dead",
            letters=letters,
            total=stats.dead_letters,
            can_purge=callable(getattr(self.app.broker, "purge_dead_letters", None)),
        )

    # --- actions --------------------------------------------------------------------------

    async def task_action(self, request: Request) -> TaskRecord | Response:
        """The record a POST action on ``/tasks/{uuid}/...`` is about, or the response that
        refuses the action (read-only, CSRF, unknown uuid)."""
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        await self.ready()
        return await self.record_or_404(request, request.path_params["uuid"])

    async def cancel(self, request: Request) -> Response:
        found = await self.task_action(request)
        if isinstance(found, Response):
            return found
        uuid = found.uuid
        if found.status.final:
            return self.back(request, f"/tasks/{uuid}", f"not cancelled: it is {found.status}")
        await self.app.cancel(uuid, CANCEL_REASON)
        log.info("task %s cancelled from the dashboard", uuid)
        return self.back(request, f"/tasks/{uuid}", "cancelled")

    async def retry(self, request: Request) -> Response:
        found = await self.task_action(request)
        if isinstance(found, Response):
            return found
        uuid = found.uuid
        if found.status not in (TaskStatus.ERROR, TaskStatus.CANCEL):
            return self.back(
                request,
                f"/tasks/{uuid}",
                f"only a failed or cancelled task is retried, not {found.status}",
            )
        task = await self.app.enqueue(
            found.task_name,
            found.args,
            found.kwargs,
            priority=found.priority,
            _parent_uuid=found.uuid,
        )
        log.info("task %s retried from the dashboard as %s", uuid, task.uuid)
        return self.back(request, f"/tasks/{task.uuid}", f"retry of {uuid}")

    async def requeue(self, request: Request) -> Response:
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        await self.ready()
        one = form.get("id")
        count = await self.app.requeue_dead_letters([one] if one else None)
        return self.back(request, "/dead-letters", f"{count} dead letter(s) requeued")

    async def purge(self, request: Request) -> Response:
        form = await self.action_form(request)
        if isinstance(form, Response):
            return form
        await self.ready()
        if form.get("confirm") != "purge":
            return self.back(request, "/dead-letters", "not purged: type purge to confirm")
        purge = getattr(self.app.broker, "purge_dead_letters", None)
        if not callable(purge):
            return self.back(
                request,
                "/dead-letters",
                f"{type(self.app.broker).__name__} cannot purge dead letters",
            )
        one = form.get("id")
        count = int(await purge([one] if one else None))
        log.info("%d dead letter(s) purged from the dashboard", count)
        return self.back(request, "/dead-letters", f"{count} dead letter(s) purged")

    # --- login ----------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        await self.signing_key()
        return self.render(request, "login.html", page="login", failed=False)

    async def login(self, request: Request) -> Response:
        form = await _read_form(request) or {}
        problem = csrf_problem(request, form, await self.signing_key())
        token = self.settings.auth.token
        if problem is not None or not token or not _same(form.get("token", ""), token):
            log.warning("dashboard login refused")  # never the token typed
            return self.render(request, "login.html", 403, page="login", failed=True)
        response = self.back(request, "/")
        response.set_cookie(
            SESSION_COOKIE,
            sign_session(token),
            max_age=SESSION_AGE,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=cookie_path(request),
        )
        return response

    # --- event streams --------------------------------------------------------------------

    async def overview_events(self, request: Request) -> Response:
        await self.ready()
        hub = self.hub

        async def produce(emit: Any) -> None:
            last = None
            while True:
                figures = await hub.overview()
                if figures["at"] != last:
                    last = figures["at"]
                    await emit("overview", as_json(figures))
                await anyio.sleep(hub.refresh)

        return _stream(produce, self)

    async def tasks_events(self, request: Request) -> Response:
        await self.ready()
        filters = TaskFilters.parse(request.query_params)
        storage = data.queryable(self.app)
        rows = self.env.get_template("_task_rows.html")
        hub = self.hub

        async def produce(emit: Any) -> None:
            if storage is None or filters.errors or filters.cursor:
                return  # nothing live to show: the page says why
            query = filters.query()
            async with hub.listing(query):
                last = None
                while True:
                    page = await hub.rows(query)  # shared, read again when the head changed
                    if page is not last:
                        last = page
                        root = request.scope.get("root_path", "")
                        shown = rows.render(
                            records=page.records, root=root, next_cursor=page.cursor
                        )
                        await emit("rows", shown)
                    await anyio.sleep(hub.refresh)

        return _stream(produce, self)

    async def task_events(self, request: Request) -> Response:
        await self.ready()
        uuid = request.path_params["uuid"]
        app, hub = self.app, self.hub
        if len(uuid) > 200:
            return self.not_found(request, uuid)
        async with hub.follow(uuid):  # a page opened while others follow the task reads nothing
            found, _ = await hub.task(uuid)
        if found is None:
            return self.not_found(request, uuid)
        details = self.env.get_template("_task_state.html")

        async def produce(emit: Any) -> None:
            async with hub.follow(uuid), anyio.create_task_group() as tg:

                async def steps() -> None:
                    index = 0
                    async for step in app.storage.steps(uuid):
                        if isinstance(step, StepsRestarted):  # a new run starts over
                            await emit("step", as_json({"i": index, "restart": step.run}))
                        else:
                            await emit("step", as_json({"i": index, "value": data.masked(step)}))
                        index += 1

                async def state() -> None:
                    last = None
                    while True:
                        record, earlier = await hub.task(uuid)
                        if record is None:
                            return
                        seen = (record.status, record.updated_at, record.steps, record.worker)
                        if seen != last:
                            last = seen
                            html = details.render(**_state(record, earlier))
                            await emit(
                                "state", as_json({"status": record.status.value, "html": html})
                            )
                        if record.status.final:
                            return
                        await anyio.sleep(hub.refresh)

                tg.start_soon(steps)
                tg.start_soon(state)

        return _stream(produce, self)


async def _read_form(request: Request) -> dict[str, str] | None:
    """A urlencoded form body (the last value of each field), or ``None`` past
    ``_FORM_MAX`` bytes (read no further)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _FORM_MAX:
            return None
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}


class _Asgi:
    """A plain ASGI callable as a route endpoint (Starlette wraps bare functions as
    request/response handlers)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def _state(record: TaskRecord, earlier: list[TaskRecord]) -> dict[str, Any]:
    """What ``_task_state.html`` shows of ``record`` and its ``earlier`` attempts."""
    return {
        "record": record,
        "earlier": earlier,
        "began": data.began(record),
        "wait": data.queue_wait(record),
        "ran": data.run_time(record),
        "runs": data.runs(record, earlier),
    }


def _stream(producer: Any, board: Dashboard) -> Response:
    """An :class:`EventStream` as a Starlette response, ended when ``board`` closes."""
    stream = EventStream(producer, lambda: board.closed)

    class _Response(Response):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await stream(scope, receive, send)

    return _Response()


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


def create_app(
    app: AsyncQueueTasks | QueueTasks,
    *,
    auth: Auth | None = None,
    read_only: bool | None = None,
    settings: WebSettings | None = None,
) -> Starlette:
    """The dashboard of ``app`` as an ASGI app (Starlette), to serve with uvicorn or mount
    in a Starlette/FastAPI service (``Mount("/queue", create_app(app))``).

    ``settings`` default to ``[extra.web]`` of the app's configuration
    (:class:`~qtasks_web.settings.WebSettings`); ``auth`` and ``read_only`` override theirs.
    Without credentials it serves loopback clients only (see
    :class:`~qtasks_web.security.AuthMiddleware`)."""
    aio = app.aio if isinstance(app, QueueTasks) else app
    if not isinstance(aio, AsyncQueueTasks):
        raise QTasksError(f"create_app() needs a qtasks app, not {type(app).__name__}")
    chosen = settings if settings is not None else WebSettings.from_config(aio.config)
    if auth is not None or read_only is not None:
        chosen = WebSettings(
            host=chosen.host,
            port=chosen.port,
            auth=auth if auth is not None else chosen.auth,
            read_only=read_only if read_only is not None else chosen.read_only,
            refresh=chosen.refresh,
            window=chosen.window,
        )
    board = Dashboard(aio, chosen.checked())
    routes = [
        Route("/", board.overview, name="overview"),
        Route("/api/overview", board.overview_json),
        Route("/tasks", board.tasks, name="tasks"),
        Route("/tasks/{uuid}", board.task, name="task"),
        Route("/tasks/{uuid}/cancel", board.cancel, methods=["POST"]),
        Route("/tasks/{uuid}/retry", board.retry, methods=["POST"]),
        Route("/workers", board.workers, name="workers"),
        Route("/timers", board.timers, name="timers"),
        Route("/dead-letters", board.dead_letters, name="dead_letters"),
        Route("/dead-letters/requeue", board.requeue, methods=["POST"]),
        Route("/dead-letters/purge", board.purge, methods=["POST"]),
        Route("/login", board.login_page),
        Route("/login", board.login, methods=["POST"]),
        Route("/events/overview", board.overview_events),
        Route("/events/tasks", board.tasks_events),
        Route("/events/tasks/{uuid}", board.task_events),
        # The cluster-wide Prometheus gauges (qtasks_web.metrics), behind the same auth.
        Route("/metrics", _Asgi(cluster_metrics_app(aio)), methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    web = Starlette(routes=routes, exception_handlers={QTasksError: board.failed})
    web.add_middleware(AuthMiddleware, auth=chosen.auth)
    web.state.dashboard = board
    return web


def close(web: object) -> None:
    """End the open event streams of a dashboard made by :func:`create_app` (call it when
    the server begins to shut down, so it need not wait for them); anything else is left
    alone."""
    board = getattr(getattr(web, "state", None), "dashboard", None)
    if isinstance(board, Dashboard):
        board.closed = True
