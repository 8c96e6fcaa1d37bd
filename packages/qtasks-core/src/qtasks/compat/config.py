"""QTasks 1.7's configuration names, accepted by :class:`~qtasks.config.QueueConfig`.

QTasks apps set config fields on their first lines (``app.config.delete_finished_tasks =
True``) and deploy with ``QTASKS_<FIELD>`` variables. A name with a qtasks meaning is mapped to
it (:data:`RENAMED`); a name whose behaviour qtasks has built in is accepted and ignored with a
:class:`QTasksCompatWarning` (:data:`BUILT_IN`, each with the reason). Python shows a warning
once per place in the code that causes it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any


class QTasksCompatWarning(UserWarning):
    """A QTasks 1.7 name was accepted, but it means something else (or nothing) in qtasks."""


def _level_name(value: Any) -> str:
    """A logging level (``logging.INFO``, ``20``, ``"info"``) as qtasks' ``log_level`` name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return logging.getLevelName(value)
    text = str(value).strip()
    return logging.getLevelName(int(text)) if text.isdigit() else text.upper()


def _int(value: Any) -> int:
    return int(value)


def _float(value: Any) -> float:
    return float(value)


RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "task_default_priority": ("default_priority", _int),
    "logs_default_level_server": ("log_level", _level_name),
    "logs_default_level_client": ("log_level", _level_name),
    "global_config_status_set_periodic": ("heartbeat_interval", _float),
}
"""QTasks name -> (qtasks field, conversion of the value)."""

BUILT_IN: dict[str, tuple[Any, str]] = {
    "running_older_tasks": (
        False,
        "recovery is built in: a task whose worker died is delivered again when its lease "
        "runs out (lease, max_deliveries), by one worker only",
    ),
    "delete_finished_tasks": (
        False,
        "finished records expire by themselves after result_ttl seconds (None keeps them)",
    ),
    "result_time_interval": (
        1.0,
        "waiting for a result is woken when the record is written, not polled",
    ),
    "result_statuses_end": (
        ["success", "error", "cancel"],
        "the final statuses are fixed: success, error, cancel",
    ),
    "global_config_status_ttl": (
        20,
        "a worker's heartbeat expires after a few heartbeat_interval periods",
    ),
    "task_default_decode": (
        None,
        "QTasks never read it either; pass decode= to @app.task",
    ),
    "logs_format": (
        None,
        "qtasks logs through the logging module (logger 'qtasks'): set your handler's format",
    ),
    "environ_prefix": ("QTASKS_", "the variables' prefix is always QTASKS_"),
}
"""QTasks name -> (its QTasks default, why qtasks ignores it)."""


def warn_ignored(name: str, source: str, stacklevel: int = 3) -> None:
    """Warn that QTasks' ``name`` (set by ``source``) has no effect, and why."""
    reason = BUILT_IN[name][1]
    warnings.warn(
        f"{source}: QTasks' {name!r} is accepted and ignored by qtasks: {reason}",
        QTasksCompatWarning,
        stacklevel=stacklevel,
    )


class QTasksConfigNames:
    """Base of :class:`~qtasks.config.QueueConfig`: QTasks' field names as attributes.

    A renamed field reads and writes its qtasks field; an ignored one warns when set and
    reads back what was set (QTasks' default otherwise)."""

    __slots__ = ("_qtasks17",)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in RENAMED:
            target, convert = RENAMED[name]
            setattr(self, target, convert(value))  # checked as the qtasks name is
        elif name in BUILT_IN:
            warn_ignored(name, f"config.{name}")
            self._ignored()[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: a QTasks name, or a real AttributeError.
        if name in RENAMED:
            return getattr(self, RENAMED[name][0])
        if name in BUILT_IN:
            return self._ignored().get(name, BUILT_IN[name][0])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _ignored(self) -> dict[str, Any]:
        try:
            values: dict[str, Any] = object.__getattribute__(self, "_qtasks17")
        except AttributeError:
            values = {}
            object.__setattr__(self, "_qtasks17", values)
        return values


RUN_FOREVER_OPTIONS: dict[str, str] = {
    "num_workers": "concurrency is max_tasks_process (QTasks' num_workers only moved tasks from "
    "its in-process heap to the semaphore)",
    "reset_config": "components read the app's config when they start",
    "loop": "the app runs its own event loop; use `async with app:` or `await app.serve()` to "
    "serve in an existing one",
}
"""QTasks' ``run_forever`` options, accepted and ignored (warned), with the reason."""


def warn_run_forever_options(options: dict[str, Any]) -> None:
    """Warn about QTasks' ``run_forever`` options; raise ``TypeError`` for unknown ones."""
    for name in options:
        if name not in RUN_FOREVER_OPTIONS:
            raise TypeError(f"run_forever() got an unexpected keyword argument {name!r}")
        warnings.warn(
            f"run_forever({name}=...) is QTasks' and ignored by qtasks: "
            f"{RUN_FOREVER_OPTIONS[name]}",
            QTasksCompatWarning,
            stacklevel=3,
        )
