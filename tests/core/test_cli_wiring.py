"""How the ``qtasks`` command is put together (issue 15): ``-c`` reaches an app module's
``from_config()`` without the CLI writing ``os.environ``, and the commands of installed
distributions are loaded when a command line needs them, not when ``qtasks.cli`` is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from qtasks import QueueTasks
from qtasks.config import load_config


def test_config_flag_reaches_from_config_without_writing_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks.cli import resolve_app

    name = f"wired_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from qtasks import QueueTasks\napp = QueueTasks.from_config()\n"
    )
    file = tmp_path / "elsewhere.toml"
    file.write_text('plugins_disabled = ["*"]\nlease = 9\n')
    monkeypatch.chdir(tmp_path)  # no qtasks.toml here: only -c names the file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("QTASKS_CONFIG", raising=False)
    before = dict(os.environ)
    try:
        app = resolve_app(f"{name}:app", str(file), {}, need_tasks=True)
        assert isinstance(app, QueueTasks)
        assert app.aio.config.lease == 9.0
        assert dict(os.environ) == before
        assert load_config().config.lease != 9.0  # the file applied to that import only
    finally:
        sys.modules.pop(name, None)


def test_extension_commands_load_when_a_command_line_needs_them() -> None:
    code = (
        "import sys, qtasks.cli\n"
        "assert 'qtasks_audit_example.cli' not in sys.modules, 'loaded at import'\n"
        "qtasks.cli.main(['--help'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "audit" in done.stdout  # still listed by `qtasks --help`
