"""What a test adds to the app under test, taken off again when its harness closes.

A test (or a fixture) that declares a task, adds a plugin, a middleware or a QTasks event
handler on the app would otherwise leave it there for every later test of the same app, and a
test run twice (parametrized) would fail declaring its task again. The harness notes what the
app holds when it is installed and :meth:`Additions.undo` removes what the test added since.
What a module does when it is imported during the test (lazily, by the code under test) is the
module's, not the test's: it stays, as the module stays imported and will not do it again.

* tasks registered on the app, and ``@shared_task`` declarations, whose function was defined
  inside a function (a test, a fixture, a helper); a module declares module-level functions;
* plugins (except qtasks' own models plugin, which module-level tasks may rely on),
  middlewares and ``app.events`` handlers, unless added while a module was being imported
  (:func:`qtasks.importing.importing`). The app's ``hooks.register``, ``add_middleware`` and
  its events' ``add`` note those while the harness is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qtasks.app import AsyncQueueTasks
from qtasks.compat.events import Events
from qtasks.importing import importing
from qtasks.models import PLUGIN_NAME as MODELS_PLUGIN
from qtasks.routers import shared_tasks

if TYPE_CHECKING:
    from qtasks.executor import Middleware

EVENTS = "_events"
"""Where ``app.events`` keeps QTasks' event handlers once used (``app.__dict__``)."""


def declared_in_a_function(func: Callable[..., Any]) -> bool:
    """Whether ``func`` was defined in a function body (``<locals>`` in its qualified name)."""
    return "<locals>" in getattr(func, "__qualname__", "")


class Additions:
    """What ``app`` holds now; :meth:`undo` takes off what was added since (see the module)."""

    def __init__(self, app: AsyncQueueTasks) -> None:
        self.app = app
        self.tasks = set(app.tasks)
        self.shared = set(shared_tasks.tasks)
        self.plugins = set(app.hooks.pm.get_plugins())
        self.middlewares = list(app.middlewares)
        events = app.__dict__.get(EVENTS)
        self.events = events
        self.handlers = None if events is None else {k: list(v) for k, v in events.handlers.items()}
        # Added while a module was imported: the module's, kept.
        self.imported_plugins: list[object] = []
        self.imported_middlewares: list[Any] = []
        self.imported_handlers: list[tuple[str, Callable[..., Any]]] = []
        self._note_imports(app, events)

    def _note_imports(self, app: AsyncQueueTasks, events: Events | None) -> None:
        register = app.hooks.register

        def noting_register(plugin: object, name: str | None = None) -> str:
            label = register(plugin, name)
            if importing():
                self.imported_plugins.append(plugin)
            if isinstance(plugin, Events):  # app.events, first used during the test
                self._note_handlers(plugin)
            return label

        add_middleware = app.add_middleware

        def noting_add_middleware(middleware: Middleware, position: str | None = None) -> None:
            add_middleware(middleware, position)
            if importing():
                self.imported_middlewares.append(app.middlewares[-1])

        app.hooks.register = noting_register  # type: ignore[method-assign]
        app.add_middleware = noting_add_middleware  # type: ignore[method-assign]
        if events is not None:
            self._note_handlers(events)

    def _note_handlers(self, events: Events) -> None:
        add = events.add

        def noting_add(event: str, func: Callable[..., Any]) -> Callable[..., Any]:
            added = add(event, func)
            if importing():
                self.imported_handlers.append((event, func))
            return added

        events.add = noting_add  # type: ignore[method-assign]

    def undo(self) -> None:
        app = self.app
        vars(app.hooks).pop("register", None)
        vars(app).pop("add_middleware", None)
        events = app.__dict__.get(EVENTS)
        if events is not None:
            vars(events).pop("add", None)
        for name, task in list(app.tasks.items()):
            if name not in self.tasks and declared_in_a_function(task.func):
                del app.tasks[name]
        for name, declared in list(shared_tasks.tasks.items()):
            if name not in self.shared and declared_in_a_function(declared.func):
                del shared_tasks.tasks[name]
        kept = self._kept_events(events)
        for plugin in app.hooks.pm.get_plugins() - self.plugins:
            if plugin is kept or any(plugin is other for other in self.imported_plugins):
                continue
            if app.hooks.pm.get_name(plugin) != MODELS_PLUGIN:
                app.hooks.unregister(plugin)
        app.middlewares[:] = [
            *self.middlewares,
            *(m for m in app.middlewares if any(m is other for other in self.imported_middlewares)),
        ]

    def _kept_events(self, events: Events | None) -> Events | None:
        """Put ``app.events`` back with its handlers from before the test and those a module
        added when imported; returns it if it must stay (created during the test for such a
        handler, or by a module imported then)."""
        if events is None:
            return None
        handlers = {k: list(v) for k, v in (self.handlers or {}).items()}
        for event, func in self.imported_handlers:
            handlers.setdefault(event, []).append(func)
        events.handlers.clear()
        events.handlers.update(handlers)
        if self.events is not None:
            return events
        if handlers or any(events is other for other in self.imported_plugins):
            return events
        self.app.__dict__.pop(EVENTS, None)  # its plugin is unregistered with the test's
        return None
