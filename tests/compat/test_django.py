"""``qtasks.contrib.django.autodiscover_tasks``: the task modules of installed apps."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from qtasks import QueueTasks
from qtasks.contrib.django import autodiscover_tasks
from qtasks.errors import ConfigError

WAIT = 10


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two Django-style apps: ``shop`` (tasks.py with a shared task, plus jobs.py) and
    ``blog`` (listed by its AppConfig; no tasks module)."""
    tag = tmp_path.name.replace("-", "_")
    shop, blog = tmp_path / f"shop_{tag}", tmp_path / f"blog_{tag}"
    for package in (shop, blog):
        package.mkdir()
        (package / "__init__.py").write_text("")
    (shop / "tasks.py").write_text(
        "from qtasks import shared_task\n\n@shared_task(name='ship')\n"
        "def ship(order: int) -> str:\n    return f'shipped {order}'\n"
    )
    (shop / "jobs.py").write_text("LOADED = True\n")
    (blog / "apps.py").write_text(f"class BlogConfig:\n    name = 'blog_{tag}'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_tasks_of_installed_apps_are_found_and_adopted(project: Path) -> None:
    tag = project.name.replace("-", "_")
    app = QueueTasks()
    found = autodiscover_tasks(app, installed_apps=[f"shop_{tag}", f"blog_{tag}.apps.BlogConfig"])
    assert found == [f"shop_{tag}.tasks"]
    assert "ship" in app.tasks
    try:
        with app:
            assert app.add_task("ship", 7, timeout=WAIT).returning == "shipped 7"
    finally:
        app.close()
    more = autodiscover_tasks(app, ["tasks", "jobs"], installed_apps=[f"shop_{tag}"])
    assert more == [f"shop_{tag}.tasks", f"shop_{tag}.jobs"]


def test_installed_apps_come_from_django_settings(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = project.name.replace("-", "_")
    django = types.ModuleType("django")
    conf = types.ModuleType("django.conf")
    apps_module = types.ModuleType("django.apps")
    conf.settings = types.SimpleNamespace(INSTALLED_APPS=[f"shop_{tag}"])  # type: ignore[attr-defined]
    apps_module.apps = types.SimpleNamespace(ready=False)  # type: ignore[attr-defined]
    for name, module in (("django", django), ("django.conf", conf), ("django.apps", apps_module)):
        monkeypatch.setitem(sys.modules, name, module)
    app = QueueTasks()
    assert autodiscover_tasks(app) == [f"shop_{tag}.tasks"]
    app.close()


def test_without_django_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "django", None)
    with pytest.raises(ConfigError, match="install Django"):
        autodiscover_tasks(QueueTasks())
