"""pytest plugin for qtasks (loaded through the ``pytest11`` entry point): fixtures for testing
code that uses a qtasks app with in-memory components.

Fixtures:

``qtasks_app``
    The app under test: the one named by the ini option ``qtasks_app = "package.module:app"``,
    else a fresh in-memory :class:`~qtasks.QueueTasks`. Override it in a ``conftest.py`` to
    return your app.
``qtasks_async_app``
    The same for async code: the ini app, else a fresh :class:`~qtasks.AsyncQueueTasks`.
``qtasks`` / ``qtasks_worker``
    A started :class:`~qtasks_testing.sync_harness.SyncHarness` around ``qtasks_app``: inline mode
    (each task runs when added), or with a worker in the background. For sync tests; plain
    pytest is enough.
``aqtasks`` / ``aqtasks_worker``
    A started :class:`~qtasks_testing.harness.Harness` around ``qtasks_async_app``, for
    ``async def`` tests under anyio's plugin (``@pytest.mark.anyio``) or pytest-asyncio
    (``@pytest.mark.asyncio``, strict or auto mode).

The marker ``@pytest.mark.qtasks(keep=["storage"], raise_task_errors=False, timeout=5)`` sets
harness options for one test (``mode`` too, for ``qtasks``/``aqtasks``).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.routers import TaskDeclaration
from qtasks.sync import QueueTasks, apps_in
from qtasks.task import TaskDef
from qtasks_testing.harness import Harness, HarnessError
from qtasks_testing.sync_harness import SyncHarness

_ASYNC_FIXTURES = ("aqtasks", "aqtasks_worker")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "qtasks_app",
        "module:attribute of the qtasks app (or a factory returning it) that the qtasks "
        "fixtures test; default: a fresh in-memory app per test",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "qtasks(mode=..., keep=(), raise_task_errors=True, timeout=10.0): options of the "
        "qtasks/aqtasks fixtures for this test",
    )


def load_app(spec: str) -> QueueTasks | AsyncQueueTasks:
    """Import ``module:attribute`` (dots allowed in the attribute); call it if it is a factory.
    An attribute the module lacks, and a task (callable, but calling it would run the task's
    code), are refused naming the module's apps."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise HarnessError(f"qtasks_app must look like 'package.module:app', not {spec!r}")
    module = importlib.import_module(module_name)
    target: Any = module
    apps = apps_in(module)
    its_apps = f" (its apps: {', '.join(f'{module_name}:{name}' for name in apps)})" if apps else ""
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise HarnessError(
                f"qtasks_app {spec!r}: module {module_name!r} has no {attribute!r}{its_apps}"
            )
        target = getattr(target, part)
    if isinstance(target, TaskDef | TaskDeclaration):  # callable: calling it runs the task
        raise HarnessError(
            f"qtasks_app {spec!r} is a task, not an app: name the app it belongs to{its_apps}"
        )
    if not isinstance(target, QueueTasks | AsyncQueueTasks) and callable(target):
        target = target()
    if not isinstance(target, QueueTasks | AsyncQueueTasks):
        raise HarnessError(f"qtasks_app {spec!r} is a {type(target).__name__}, not a qtasks app")
    return target


def _configured_app(request: pytest.FixtureRequest) -> QueueTasks | AsyncQueueTasks | None:
    spec = str(request.config.getini("qtasks_app") or "")
    return load_app(spec) if spec else None


def _options(request: pytest.FixtureRequest, **fixed: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("qtasks"))):
        options.update(marker.kwargs)
    options.update(fixed)
    return options


@pytest.fixture
def qtasks_app(request: pytest.FixtureRequest) -> QueueTasks | AsyncQueueTasks:
    """The app under test (see the module docstring)."""
    return _configured_app(request) or QueueTasks()


@pytest.fixture
def qtasks_async_app(request: pytest.FixtureRequest) -> AsyncQueueTasks:
    """The async app under test (see the module docstring)."""
    app = _configured_app(request)
    if app is None:
        return AsyncQueueTasks()
    if isinstance(app, QueueTasks):
        raise HarnessError(
            "the qtasks_app ini option names a QueueTasks (sync) app: use the qtasks fixture, "
            "or override qtasks_async_app"
        )
    return app


@pytest.fixture
def qtasks(
    qtasks_app: QueueTasks | AsyncQueueTasks, request: pytest.FixtureRequest
) -> Iterator[SyncHarness]:
    """The app's harness in inline mode: a task added runs at once, with its real plugins."""
    with SyncHarness(qtasks_app, **_options(request)) as harness:
        yield harness


@pytest.fixture
def qtasks_worker(
    qtasks_app: QueueTasks | AsyncQueueTasks, request: pytest.FixtureRequest
) -> Iterator[SyncHarness]:
    """The app's harness with a worker running in the background."""
    with SyncHarness(qtasks_app, **_options(request, mode="worker")) as harness:
        yield harness


@pytest.fixture
async def aqtasks(
    qtasks_async_app: AsyncQueueTasks, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    """The async app's harness in inline mode, in the test's event loop."""
    async with Harness(qtasks_async_app, **_options(request)) as harness:
        yield harness


@pytest.fixture
async def aqtasks_worker(
    qtasks_async_app: AsyncQueueTasks, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    """The async app's harness with a worker running in the test's event loop."""
    async with Harness(qtasks_async_app, **_options(request, mode="worker")) as harness:
        yield harness


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: Any) -> Any:
    """Let pytest-asyncio run the async fixtures for ``@pytest.mark.asyncio`` tests in its strict
    mode too (it only runs fixtures marked for it there). An anyio test is left to anyio, which
    runs async fixtures of tests that use its ``anyio_backend``."""
    if (
        fixturedef.argname in _ASYNC_FIXTURES
        and fixturedef.func.__module__ == __name__
        and "anyio_backend" not in request.fixturenames
        and request.node.get_closest_marker("asyncio") is not None
    ):
        original = fixturedef.func
        marked = types.FunctionType(
            original.__code__,
            original.__globals__,
            original.__name__,
            original.__defaults__,
            original.__closure__,
        )
        marked._force_asyncio_fixture = True  # type: ignore[attr-defined]  # pytest-asyncio's mark
        # Kept until the test is torn down: pytest-asyncio looks at it again when it calls the
        # test. The fixture definition is shared, so the original is put back afterwards.
        fixturedef.func = marked  # type: ignore[misc]  # Final in pytest; plugins patch it
        request.node.addfinalizer(lambda: setattr(fixturedef, "func", original))
    return (yield)
