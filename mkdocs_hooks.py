"""mkdocs hooks: reference tables generated from the code, so they cannot drift from it.

``<!-- qtasks:cli-reference -->`` in a page becomes every built-in ``qtasks`` command with its
usage, help and options, read from the typer app; ``<!-- qtasks:hooks-table -->`` becomes one row
per hook of ``qtasks.hookspecs`` with its kind and parameters. tests/test_docs_site.py checks
both against the code too.
"""

from __future__ import annotations

import inspect
from typing import Any

CLI_MARKER = "<!-- qtasks:cli-reference -->"
HOOKS_MARKER = "<!-- qtasks:hooks-table -->"
KINDS = ("Notification", "Transform", "Decide")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def hook_rows() -> list[tuple[str, str, list[str]]]:
    """``(name, kind, parameters)`` of every hook, in the order of ``qtasks.hookspecs``."""
    from qtasks import hookspecs

    rows = []
    for name, func in vars(hookspecs).items():
        if not (name.startswith("qtasks_") and inspect.isfunction(func)):
            continue
        doc = inspect.getdoc(func) or ""
        kind = next((k for k in KINDS if doc.startswith(k)), "?")
        rows.append((name, kind.lower(), list(inspect.signature(func).parameters)))
    return rows


def hooks_table() -> str:
    """The hook table in Markdown."""
    lines = ["| hook | kind | parameters |", "|---|---|---|"]
    for name, kind, params in hook_rows():
        shown = ", ".join(f"`{p}`" for p in params)
        lines.append(f"| [`{name}`](#qtasks.hookspecs.{name}) | {kind} | {shown} |")
    return "\n".join(lines)


def cli_commands() -> list[tuple[str, Any, Any]]:
    """``(path, command, context)`` of every built-in command, groups before their commands.

    Commands that installed distributions add (entry-point group ``qtasks.cli``) are left out:
    what is installed where the docs are built is not what a reader has.
    """
    import typer

    from qtasks.cli import cli
    from qtasks.discovery import load_cli_extensions

    extensions = {name for name, _ in load_cli_extensions()}
    root = typer.main.get_group(cli)
    root_ctx = root.make_context("qtasks", [], resilient_parsing=True)
    found: list[tuple[str, Any, Any]] = [("qtasks", root, root_ctx)]

    def walk(group: Any, ctx: Any, path: str) -> None:
        for name, command in group.commands.items():
            if group is root and name in extensions:
                continue
            sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
            found.append((f"{path} {name}", command, sub))
            if hasattr(command, "commands"):
                walk(command, sub, f"{path} {name}")

    walk(root, root_ctx, "qtasks")
    return found


def cli_reference() -> str:
    """Every built-in command in Markdown: usage, help text, options."""
    out: list[str] = []
    for path, command, ctx in cli_commands():
        out.append(f"## `{path}`\n")
        usage = command.get_usage(ctx).removeprefix("Usage: ").strip()
        out.append(f"`{' '.join(usage.split())}`\n")
        help_text = inspect.cleandoc(command.help or "")
        out.append(help_text.replace("\n\n", "\n\n") + "\n")
        records = [p.get_help_record(ctx) for p in command.get_params(ctx)]
        records = [r for r in records if r]
        if records:
            out.append("| option | meaning |\n|---|---|")
            out += [f"| `{_cell(opts)}` | {_cell(text)} |" for opts, text in records]
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """mkdocs event: fill in the markers of a page."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if HOOKS_MARKER in markdown:
        markdown = markdown.replace(HOOKS_MARKER, hooks_table())
    return markdown
