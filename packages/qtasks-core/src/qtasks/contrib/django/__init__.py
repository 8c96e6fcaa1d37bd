"""Django: find the task modules of the project's installed apps.

``autodiscover_tasks(app)`` imports ``<app>.tasks`` for every Django app in ``INSTALLED_APPS``
(QTasks' function, same call shape), so their ``@app.task`` / ``@shared_task`` /
router declarations run; shared tasks are then adopted by ``app``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from qtasks.errors import ConfigError

log = logging.getLogger("qtasks.contrib.django")


def _installed_apps() -> list[str]:
    try:
        from django.apps import apps  # type: ignore[import-not-found]  # optional
        from django.conf import settings  # type: ignore[import-not-found]  # optional
    except ImportError as exc:
        raise ConfigError(
            "autodiscover_tasks reads Django's INSTALLED_APPS: install Django, or pass "
            "installed_apps=[...]"
        ) from exc
    if apps.ready:
        return [config.name for config in apps.get_app_configs()]
    return list(settings.INSTALLED_APPS)


def _package_of(entry: str) -> str:
    """An ``INSTALLED_APPS`` entry as a package name (an ``AppConfig`` path gives its ``name``)."""
    try:
        if importlib.util.find_spec(entry) is not None:
            return entry
    except ModuleNotFoundError:  # "pkg.apps.Config": the parent is a module, not a package
        pass
    module_name, _, attribute = entry.rpartition(".")
    config = getattr(importlib.import_module(module_name), attribute, None)
    name = getattr(config, "name", None)
    if not isinstance(name, str):
        raise ConfigError(f"INSTALLED_APPS entry {entry!r} is neither a package nor an AppConfig")
    return name


def autodiscover_tasks(
    app: Any,
    modules: Sequence[str] | None = None,
    installed_apps: Iterable[str] | None = None,
) -> list[str]:
    """Import ``<django app>.<module>`` for each installed app and each of ``modules``
    (default ``["tasks"]``) that exists, then let ``app`` adopt the shared tasks they declared.
    Returns the names of the modules imported.

    ``installed_apps`` defaults to Django's (the app registry when ready, else
    ``settings.INSTALLED_APPS``). A task module that fails to import raises its error: a
    half-registered set of tasks would fail later and further from the cause."""
    from qtasks.routers import shared_tasks

    found: list[str] = []
    for entry in _installed_apps() if installed_apps is None else installed_apps:
        package = _package_of(entry)
        for module in modules or ["tasks"]:
            name = f"{package}.{module}"
            try:
                spec = importlib.util.find_spec(name)
            except ModuleNotFoundError:
                spec = None
            if spec is None:
                continue
            importlib.import_module(name)
            log.debug("imported task module %s", name)
            found.append(name)
    shared_tasks.adopt(app)
    return found


__all__ = ["autodiscover_tasks"]
