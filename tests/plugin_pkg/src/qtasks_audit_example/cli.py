"""``qtasks audit``: a command contributed through the ``qtasks.cli`` entry-point group."""

from __future__ import annotations

import typer

app = typer.Typer(help="Audit plugin commands (from qtasks-audit-example).", no_args_is_help=True)


@app.command()
def hello(name: str = typer.Argument("world", help="Who to greet.")) -> None:
    """Print a greeting (proves the command was discovered)."""
    typer.echo(f"audit says hello to {name}")


@app.command()
def version() -> None:
    """Print the plugin's version."""
    typer.echo("qtasks-audit-example 0.3.1")
