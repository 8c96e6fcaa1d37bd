"""A failed task's traceback as a person reads it: from the task's own code, not from the
worker, executor and thread machinery that called it.

An exception a task raises passes through qtasks' worker and executor (and, for sync code,
anyio's worker thread) on its way out: ten frames of machinery before the first line the user
wrote. :func:`task_traceback` leaves out those leading frames, so the record's traceback (what
``qtasks get``, the dashboard and ``record.traceback`` show) starts where the task's code does.
A frame of the user's (a middleware, the task) ends the trimming: what it called is kept, qtasks'
frames included. An exception raised by qtasks itself (every frame is machinery) keeps its whole
traceback. Chained exceptions (``raise ... from``) are formatted as Python formats them.
"""

from __future__ import annotations

import os
import traceback
from types import TracebackType

import anyio

import qtasks
from qtasks.masking import text_of

_MACHINERY = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (qtasks, anyio)
    if module.__file__ is not None
)
"""The packages whose frames lead into a task's code."""


def error_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, as a record's ``error`` holds it (see :func:`text_of`)."""
    return f"{type(exc).__name__}: {text_of(exc)}"


def _from_task_code(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from its first frame outside :data:`_MACHINERY`; ``None`` when there is none."""
    node = tb
    while node is not None and node.tb_frame.f_code.co_filename.startswith(_MACHINERY):
        node = node.tb_next
    return node


def task_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as :func:`traceback.format_exception` writes it, its leading
    frames of qtasks' and anyio's machinery left out (see the module docstring)."""
    tb = exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, _from_task_code(tb) or tb))


def task_frames(exc: BaseException) -> str:
    """The frames of :func:`task_traceback` alone, without the ``Traceback (most recent call
    last):`` line, the exception's own line and its chained exceptions: for a log line that
    names the error already (``task X failed: ValueError: ...``). Empty for an exception
    qtasks raised itself (``TaskMaxTimeError``): its message says it all."""
    return "".join(traceback.format_tb(_from_task_code(exc.__traceback__)))


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions at the leaves of an exception group (``exc`` itself if it is none)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def failure_summary(exc: BaseException) -> tuple[str, str]:
    """What a log line says of a task's failure beyond its error: the errors that explain it
    (the leaves of an exception group, an explicit ``raise ... from`` cause), as ``"; "``
    separated ``Type: message`` text, and the frames of the task's own code where the first
    of them was raised (:func:`task_frames`; of ``exc`` itself when there is no group)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = _leaves(exc)
        text = "; ".join(error_line(leaf) for leaf in leaves)
        return f" [{text}]", task_frames(leaves[0]) or task_frames(exc)
    cause = exc.__cause__
    text = f" (from {error_line(cause)})" if cause is not None else ""
    return text, task_frames(exc)
