"""The ``qtasks`` command line (also ``python -m qtasks``).

Every command finds the app the same way: ``-A/--app module:attribute`` (the attribute may be
an app or a factory returning one; ``module`` alone means ``module:app``), else the ``app`` key
of the configuration, else, for commands that only talk to the components (``add``, ``get``,
``cancel``, ``inspect``, ``dlq``), an app built from configuration alone. The working directory
is put on ``sys.path`` first, so ``-A tasks:app`` finds ``./tasks.py``. ``-A`` and
``-c/--config`` go before the command (``qtasks -A tasks:app run``, as with QTasks and Celery)
or after it.

Flags given on the command line override the app's configuration (files and ``QTASKS_*``
variables), except values the code set as keyword arguments of ``from_config``.
Commands contributed by installed distributions (entry-point group ``qtasks.cli``) are added
under their entry-point name when a command line is parsed, not when this package is imported.

The modules, by job: :mod:`~qtasks.cli.group` (the typer app, how a command is registered,
extensions), :mod:`~qtasks.cli.options` (the shared options, declared once),
:mod:`~qtasks.cli.resolve` (finding and configuring the app, running against it),
:mod:`~qtasks.cli.output` (JSON, tables, records); the commands: :mod:`~qtasks.cli.serve`
(``run``), :mod:`~qtasks.cli.tasks` (``add``, ``get``, ``cancel``),
:mod:`~qtasks.cli.inspecting` (``inspect``, ``dlq``), :mod:`~qtasks.cli.info` (``plugins``,
``config``).
"""

from __future__ import annotations

import importlib

from qtasks.cli.group import cli, dlq
from qtasks.cli.options import Before, Components, Place
from qtasks.cli.resolve import AnyApp, apply_flags, import_app, resolve_app, run_on

# Each command module registers its commands on `cli` when imported: this order is the order
# of `qtasks --help`.
for _module in ("serve", "tasks", "inspecting", "info"):
    importlib.import_module(f"qtasks.cli.{_module}")

__all__ = [
    "AnyApp",
    "Before",
    "Components",
    "Place",
    "apply_flags",
    "cli",
    "dlq",
    "import_app",
    "main",
    "resolve_app",
    "run_on",
]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qtasks`` script."""
    cli(args=argv, prog_name="qtasks")
