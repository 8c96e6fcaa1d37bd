"""The examples in docs/plugins.md, docs/configuration.md and docs/cli.md run as written.

``python`` blocks run in order in one namespace per page, in a temporary working directory;
a block (``python`` or ``toml``) whose first line is ``# file: NAME`` is written to that file
instead. In ``console`` blocks each ``$ command`` runs as a real process; the lines after it
must appear in its output, and it must exit 0 (1 when the expected output starts with
``error:``). ``qtasks run`` blocks serve forever and are covered by ``test_cli_run.py``; blocks
whose first line is ``# with Redis`` run in ``tests/redis/test_redis_cli.py``. Blocks marked
``<!-- fragment -->`` do not run (tests/test_docs_site.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qtasks import QueueConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^(<!-- fragment[^\n]*-->\n)?```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: str) -> list[tuple[str, str]]:
    """The blocks of ``page`` that run: all but those marked ``<!-- fragment -->``."""
    found = BLOCK.finditer((DOCS / page).read_text())
    return [(m.group(2), m.group(3)) for m in found if not m.group(1)]


def run_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict[str, object] = {"__name__": f"docs_{page.replace('.', '_')}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ran = 0
    for lang, code in blocks(page):
        first = code.splitlines()[0] if code else ""
        if first.startswith("# file: "):
            (tmp_path / first.removeprefix("# file: ").strip()).write_text(code)
            continue
        if lang == "python":
            exec(compile(code, f"{page}:block{ran}", "exec"), namespace)
            ran += 1
        elif lang == "console" and not first.startswith("# with Redis"):
            ran += run_console(code, tmp_path, env)
    return ran


def run_console(code: str, cwd: Path, env: dict[str, str]) -> int:
    commands: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands and line.strip():
            commands[-1][1].append(line.strip())
    ran = 0
    for command, expected in commands:
        argv = shlex.split(command)
        if argv[0] == "qtasks" and _command_of(argv[1:]) == "run":
            continue
        if argv[0] == "python":
            argv[0] = sys.executable
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        output = proc.stdout + proc.stderr
        wanted_code = 1 if expected and expected[0].startswith("error:") else 0
        assert proc.returncode == wanted_code, f"$ {command}\n{output}"
        for text in expected:
            assert text in output, f"$ {command}: {text!r} not in\n{output}"
        ran += 1
    return ran


def _command_of(args: list[str]) -> str | None:
    """The command of ``qtasks`` arguments, past the options that may precede it."""
    rest = list(args)
    while rest and rest[0] in ("-A", "--app", "-c", "--config"):
        del rest[:2]
    return rest[0] if rest else None


@pytest.mark.parametrize("page", ["plugins.md", "configuration.md", "cli.md"])
def test_doc_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_page(page, tmp_path, monkeypatch) >= 2


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = text.split("\n## Keys\n", 1)[1].split("\n## ", 1)[0]  # not the other tables
    documented = set(re.findall(r"^\| `(\w+)` \|", keys, re.MULTILINE))
    assert documented == {f.name for f in dataclasses.fields(QueueConfig)}


def test_every_cli_command_is_documented() -> None:
    import typer

    from qtasks.cli import cli

    text = (DOCS / "cli.md").read_text()
    group = typer.main.get_group(cli)
    names = set(group.commands) - {"audit"}  # audit comes from the test plugin distribution
    assert names >= {"run", "add", "get", "cancel", "inspect", "dlq", "plugins", "config"}
    for name in names:
        assert f"`qtasks {name}" in text
