"""What a serving process logs: the "serving ..." line once its worker listens, and, for
``run_forever()`` in a process that set up no logging, logging to stderr as ``qtasks run`` sets
it up (at ``config.log_level``)."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from qtasks.errors import ConfigError
from qtasks.plugins import hookimpl
from qtasks.report import components_line

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(qtasks_task)s: %(message)s"
"""The format of the lines ``qtasks run`` (and an unconfigured ``run_forever()``) writes.
``qtasks_task`` is `` [<task name> <task uuid>]`` on a record of a task's ``ctx.get_logger()``
(see :meth:`qtasks.context.TaskContext.get_logger`), empty on any other record."""


def log_to_stderr(level: str) -> None:
    """``logging.basicConfig`` at ``level`` to stderr in :data:`LOG_FORMAT` (a no-op when the
    root logger has a handler already, as ``basicConfig`` is)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, defaults={"qtasks_task": ""}))
    logging.basicConfig(level=level, handlers=[handler])


PLUGIN_NAME = "qtasks.serving"


class ServingLog:
    """Logs "serving ..." once the worker listens, so a component that cannot start (Redis
    unreachable) is never preceded by a claim that the app serves."""

    @hookimpl
    def qtasks_broker_listening(self, app: AsyncQueueTasks) -> None:
        count = len(app.tasks)
        logging.getLogger("qtasks.serving").info(
            "serving %r: %d task%s, concurrency %d; %s",
            app.name,
            count,
            "" if count == 1 else "s",
            app.config.max_tasks_process,
            components_line(app),
        )


def checked_level(name: str) -> str:
    """``name`` as a level of :mod:`logging` (upper case); :class:`ConfigError` otherwise."""
    level = name.upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(f"log_level: unknown level {name!r}")
    return level


def say_serving(app: AsyncQueueTasks) -> None:
    """Log the "serving ..." line when ``app``'s worker listens (once per app)."""
    if app.hooks.pm.get_plugin(PLUGIN_NAME) is None:
        app.add_plugin(ServingLog(), PLUGIN_NAME)


def log_when_unconfigured(app: AsyncQueueTasks) -> None:
    """For ``run_forever()``: when nothing set logging up in this process (the root logger has
    no handler), log to stderr at ``app.config.log_level`` in ``qtasks run``'s format, with
    its "serving" line; a process served silently otherwise (only warnings reached stderr,
    through Python's last-resort handler). Logging set up by the program, or by ``qtasks
    run`` before it calls ``run_forever()``, is left as it is."""
    if logging.getLogger().handlers:
        return
    level = checked_level(app.config.log_level)
    log_to_stderr(level)
    say_serving(app)
