"""How the commands print: JSON, plain tables and task records; and how a positional
argument given on the command line is read."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from qtasks.masking import mask_text, masked_args, masked_value
from qtasks.record import TaskRecord

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def record_dict(record: TaskRecord) -> dict[str, Any]:
    data = {f.name: getattr(record, f.name) for f in fields(TaskRecord)}
    data["status"] = record.status.value
    data.pop("token", None)
    return data


def _local_time(timestamp: float) -> str:
    """A unix timestamp as ISO 8601 in local time, with its UTC offset; past what a date can
    hold (year 9999: an ``eta`` given in milliseconds), the number, said so."""
    try:
        return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return f"{timestamp} (unix seconds, past the year 9999)"


def _is_time(key: str) -> bool:
    """Whether the record field ``key`` is a time: ``eta`` and the ``*_at`` ones."""
    return key == "eta" or key.endswith("_at")


def shown_record(record: TaskRecord, app: AsyncQueueTasks, show_secrets: bool) -> dict[str, Any]:
    """:func:`record_dict` as the CLI prints it: unless ``show_secrets``, masked as the
    dashboard and ``qtasks config`` mask (:mod:`qtasks.masking`): values of secret-named
    arguments (positional ones by the task's parameter names in ``app``), and credentials in
    any text (a result, an error quoting its DSN). What is printed ends up in issues and CI
    logs."""
    data = record_dict(record)
    if show_secrets:
        return data
    task = app.tasks.get(record.task_name)
    signature = task.caller_signature if task is not None else None
    return {
        key: masked_args(value, signature) if key == "args" else masked_value(value)
        for key, value in data.items()
    }


def shown_body(body: bytes, app: AsyncQueueTasks) -> str:
    """A dead letter's body as ``qtasks dlq list --json`` prints it: its text, a JSON message
    masked as :func:`shown_record` masks a record's arguments (positional ones by the task's
    parameter names), any other text through :func:`~qtasks.masking.mask_text`."""
    text = body.decode("utf-8", "replace")
    try:
        wire = json.loads(text)
    except (ValueError, RecursionError):
        return mask_text(text)
    if not isinstance(wire, dict):
        return mask_text(text)
    shown = masked_value(wire)
    if isinstance(wire.get("args"), list):
        task = app.tasks.get(str(wire.get("task")))
        shown["args"] = masked_args(wire["args"], task.caller_signature if task else None)
    return json.dumps(shown, ensure_ascii=False, separators=(",", ":"))


def warn_secrets_shown(show_secrets: bool) -> None:
    """Say on stderr that ``--show-secrets`` shows what is otherwise masked."""
    if show_secrets:
        typer.echo("warning: --show-secrets: passwords and secrets are shown", err=True)


def print_record(
    record: TaskRecord,
    as_json: bool,
    app: AsyncQueueTasks,
    show_secrets: bool,
    earlier: Sequence[TaskRecord] | None = None,
) -> None:
    """``key: value`` lines (times in local ISO 8601), or JSON (times as unix seconds);
    secrets masked unless ``show_secrets`` (:func:`shown_record`). ``earlier``: the records
    of its earlier attempts (:class:`~qtasks.components.AttemptLog`), one line each after
    the record (JSON: ``earlier_attempts``); ``None`` when the storage keeps none."""
    data = shown_record(record, app, show_secrets)
    if as_json:
        if earlier is not None:
            data["earlier_attempts"] = [shown_record(r, app, show_secrets) for r in earlier]
        typer.echo(to_json(data))
        return
    for key, value in data.items():
        if value in (None, [], {}) and key not in ("returning",):
            continue
        if _is_time(key) and isinstance(value, int | float):
            shown: Any = _local_time(value)
        elif isinstance(value, list | dict):
            shown = json.dumps(value, default=str)
        else:
            shown = value
        typer.echo(f"{key}: {shown}")
    for kept in earlier or ():
        typer.echo(_attempt_line(shown_record(kept, app, show_secrets)))


def _attempt_line(data: dict[str, Any]) -> str:
    """One earlier attempt as ``qtasks get`` lists it: how it ended, where and when it began,
    and its error."""
    began = data.get("started_at") or data.get("updated_at")
    status = data["status"]
    ended = "lost with its worker" if status == "process" else status
    where = f" on {data['worker']}" if data.get("worker") else ""
    when = f", began {_local_time(began)}" if isinstance(began, int | float) else ""
    error = f": {data['error']}" if data.get("error") and status != "process" else ""
    return f"earlier attempt {data['attempt']}: {ended}{where}{when}{error}"


def workflows_table(workflows: Sequence[dict[str, Any]]) -> str:
    """A count by status, then one row per workflow (``qtasks.workflows.runtime.summary``)."""
    counts: dict[str, int] = {}
    for w in workflows:
        counts[w["status"]] = counts.get(w["status"], 0) + 1
    head = ", ".join(f"{status}={n}" for status, n in sorted(counts.items())) or "none"
    if not workflows:
        return head
    rows = [
        [w["id"], w["status"], w["size"], _local_time(w["created_at"]), w["error"]]
        for w in workflows
    ]
    return head + "\n" + table(["id", "status", "size", "created", "error"], rows)


def strict_json(raw: str) -> Any:
    """``raw`` as standard JSON: ``ValueError`` for what only Python's reader accepts
    (``NaN``, ``Infinity``, a number too large for a float), which no message can carry."""
    return json.loads(raw, parse_constant=_not_json, parse_float=_finite)


def _not_json(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def parse_arg(raw: str) -> Any:
    """A positional CLI argument: JSON when it parses (``5``, ``"x"``, ``[1,2]``), else text
    (``NaN`` too: it is not JSON)."""
    try:
        return strict_json(raw)
    except ValueError:
        return raw
