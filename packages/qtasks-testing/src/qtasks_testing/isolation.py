"""What a test adds to the app under test, taken off again when its harness closes.

A test (or a fixture) that declares a task, adds a plugin, a middleware or a QTasks event
handler on the app would otherwise leave it there for every later test of the same app, and a
test run twice (parametrized) would fail declaring its task again. The harness notes what the
app holds when it is installed and :meth:`Additions.undo` removes what was added since:

* tasks registered on the app, and ``@shared_task`` declarations, whose function was defined
  inside a function (a test, a fixture, a helper). A module imported during the test declares
  module-level functions: those stay, as the module stays imported;
* plugins (except qtasks' own models plugin, which module-level tasks may rely on),
  middlewares and ``app.events`` handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtasks.app import AsyncQueueTasks
from qtasks.models import PLUGIN_NAME as MODELS_PLUGIN
from qtasks.routers import shared_tasks

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

    def undo(self) -> None:
        app = self.app
        for name, task in list(app.tasks.items()):
            if name not in self.tasks and declared_in_a_function(task.func):
                del app.tasks[name]
        for name, declared in list(shared_tasks.tasks.items()):
            if name not in self.shared and declared_in_a_function(declared.func):
                del shared_tasks.tasks[name]
        for plugin in app.hooks.pm.get_plugins() - self.plugins:
            if app.hooks.pm.get_name(plugin) != MODELS_PLUGIN:
                app.hooks.unregister(plugin)
        app.middlewares[:] = self.middlewares
        if self.events is None:
            app.__dict__.pop(EVENTS, None)  # its plugin was unregistered above
        elif self.handlers is not None:
            self.events.handlers.clear()
            self.events.handlers.update(self.handlers)
