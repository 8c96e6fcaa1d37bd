"""Every distribution logs under the logger ``qtasks``, through the loggers that
docs/configuration.md lists (before, qtasks-redis logged under both ``qtasks.redis`` and
``qtasks_redis``, qtasks-rabbitmq and qtasks-web under ``qtasks_rabbitmq`` and ``qtasks_web``:
a handler set on ``qtasks``, as the docs say, missed them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(ROOT.glob("packages/*/src/**/*.py"))


def _name_of(arg: ast.expr) -> set[str]:
    """The logger names ``arg`` can give: string constants, and an f-string as its constant
    head followed by ``*``; ``name or f"..."`` gives each part's."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return {arg.value}
    if isinstance(arg, ast.JoinedStr):
        head = arg.values[0].value if arg.values and isinstance(arg.values[0], ast.Constant) else ""
        prefix = head if isinstance(head, str) else ""
        return {f"{prefix}*"}
    if isinstance(arg, ast.BoolOp):
        return set().union(*(_name_of(value) for value in arg.values))
    return {"<computed>"}


def used_loggers() -> dict[str, set[str]]:
    """Logger name -> the source files (relative paths) that ask for it by ``getLogger``; a
    parameter with a default (``name or ...``) counts as its default only."""
    found: dict[str, set[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue  # getLogger() is the root logger: configured, never logged to
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name != "getLogger":
                continue
            arg = node.args[0]
            if isinstance(arg, ast.BoolOp):  # ``name or default``: the caller's name first
                arg = ast.BoolOp(op=arg.op, values=arg.values[1:])
            for logger in _name_of(arg):
                found.setdefault(logger, set()).add(str(path.relative_to(ROOT)))
    return found


def documented_loggers() -> set[str]:
    """The loggers in the first column of the table under docs/configuration.md's
    ``## Logging``; ``<...>`` is ``*``."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    section = text.split("\n## Logging\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names.update(re.sub(r"<[^>]*>", "*", name) for name in re.findall(r"`([^`]+)`", first))
    return names


def test_every_logger_is_under_qtasks() -> None:
    stray = {
        name: sorted(files)
        for name, files in used_loggers().items()
        if name != "qtasks" and not name.startswith("qtasks.")
    }
    assert stray == {}, "loggers outside `qtasks` (a handler set on `qtasks` misses them)"


def test_the_loggers_used_are_the_documented_ones() -> None:
    used = used_loggers()
    assert "qtasks.redis" in used and "qtasks.task.*" in used  # the scan finds them
    assert set(used) == documented_loggers(), (
        "add the new logger to docs/configuration.md's Logging table (or use a listed one)"
    )
