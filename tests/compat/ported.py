"""Helpers for the ported QTasks apps (qtasks_apps/): load one afresh, serve one in a worker
process."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

APPS = Path(__file__).with_name("qtasks_apps")
LOCAL = ("_backend", "router_tasks", "shared_tasks", "task_middleware")
WAIT = 20


def load(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``qtasks_apps/<name>.py`` afresh (its shared tasks declared again)."""
    monkeypatch.syspath_prepend(str(APPS))
    for module_name in (*LOCAL, name):
        sys.modules.pop(module_name, None)
    with warnings.catch_warnings():
        # The apps set QTasks' built-in behaviours (running_older_tasks...): warned, ignored.
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    for module_name in (*LOCAL, name):
        monkeypatch.delitem(sys.modules, module_name, raising=False)
    return module


def serve(module: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Run ``qtasks -A <module>:app run`` (the seed's command) as the worker."""
    return subprocess.Popen(
        [sys.executable, "-m", "qtasks", "-A", f"{module}:app", "run"],
        cwd=APPS,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hung worker
        proc.kill()
        proc.communicate()


def wait_alive(ping: Any, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while not ping():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the worker exited: {err}")
        if time.monotonic() > deadline:
            pytest.fail("the worker did not start")
        time.sleep(0.1)
