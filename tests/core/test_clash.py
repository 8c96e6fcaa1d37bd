"""The unrelated ``qtasks`` distribution (QTasks 1.7) in the same environment as qtasks-core.

What pip leaves when both are installed, reproduced in a temporary directory put first on
``PYTHONPATH``: qtasks-core's files, QTasks' own ``qtasks/plugins/__init__.py`` written over
qtasks-core's (both ship that package), and QTasks' ``qtasks-1.7.3.dist-info``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import qtasks


def mixed_site(tmp_path: Path, *, leftovers: bool) -> dict[str, str]:
    site = tmp_path / "site"
    shutil.copytree(
        Path(qtasks.__file__).parent, site / "qtasks", ignore=shutil.ignore_patterns("__pycache__")
    )
    if leftovers:
        (site / "qtasks" / "plugins").mkdir(exist_ok=True)
        (site / "qtasks" / "plugins" / "__init__.py").write_text("import redis  # noqa\n")
    info = site / "qtasks-1.7.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qtasks\nVersion: 1.7.3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    env["PYTHONPATH"] = str(site)
    return env


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_broken_mix_names_the_other_distribution(tmp_path: Path) -> None:
    env = mixed_site(tmp_path, leftovers=True)
    # A stand-in for QTasks' plugins package that fails on import (the real one needs redis).
    (tmp_path / "site" / "qtasks" / "plugins" / "__init__.py").write_text(
        "raise ImportError('QTasks 1.7 plugins package')\n"
    )
    done = run("import qtasks", env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qtasks-core cannot be imported: the distribution 'qtasks'")
    assert "pip uninstall -y qtasks qtasks-core && pip install qtasks-core" in last
    assert "QTasks 1.7 plugins package" in done.stderr  # the cause is kept


def test_a_working_mix_still_warns_in_qtasks_plugins(tmp_path: Path) -> None:
    env = mixed_site(tmp_path, leftovers=False)
    done = run("from qtasks.cli import main; main(['plugins'])", env)
    assert "warning: the distribution 'qtasks' 1.7.3 (the unrelated QTasks project)" in done.stderr


def test_without_the_other_distribution_errors_are_unchanged(tmp_path: Path) -> None:
    env = mixed_site(tmp_path, leftovers=True)
    shutil.rmtree(tmp_path / "site" / "qtasks-1.7.3.dist-info")
    (tmp_path / "site" / "qtasks" / "plugins" / "__init__.py").write_text(
        "raise ImportError('something else')\n"
    )
    done = run("import qtasks", env)
    assert done.stderr.strip().splitlines()[-1] == "ImportError: something else"
