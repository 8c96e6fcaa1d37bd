"""QTasks 1.7's modules that qtasks does not have: importing one says what to write instead.

QTasks' docs build apps from component classes (``from qtasks.brokers import
AsyncRabbitMQBroker``, ``from qtasks.storages import AsyncRedisStorage``...). qtasks' components
are other classes in other distributions, so those imports cannot work; a bare
``ModuleNotFoundError`` would not say so. :func:`install` adds, at the end of
``sys.meta_path`` (real modules are always found first), a finder for those names whose import
raises :class:`~qtasks.errors.QTasksModuleNotProvidedError` naming the qtasks form.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

from qtasks.errors import QTasksModuleNotProvidedError

REDIS = "qtasks_redis.RedisBroker(url) (or QueueTasks(broker_url='redis://...'))"
STORAGE = "storage=qtasks_redis.RedisStorage('redis://HOST:6379/0')"
TESTING = (
    "QTasks' stub components ran no task; for tests without servers use qtasks_testing's "
    "in-memory components (docs/testing.md)"
)
DEPENDS = (
    "Depends is built in, no plugin to add: 'from qtasks import Depends' (or "
    "qtasks.plugins.depends), Depends(func, scope=...)"
)
STATES = (
    "State is built in, no plugin to add: annotate a parameter with a subclass of AsyncState "
    "or SyncState (qtasks.plugins.states)"
)

INSTEAD: dict[str, str] = {
    "qtasks.brokers": (
        f"QTasks' brokers are qtasks_rabbitmq.RabbitMQBroker(url) with {STORAGE} (QTasks "
        f"kept a broker's records in Redis), and {REDIS}; the Kafka and Socket brokers are "
        "not provided"
    ),
    "qtasks.storages": f"pass {STORAGE} to QueueTasks (QueueTasks(broker_url=...) builds it)",
    "qtasks.configs": (
        "QueueConfig is 'from qtasks import QueueConfig'; the Redis global config is "
        "global_config=qtasks_redis.RedisGlobalConfig(url)"
    ),
    "qtasks.workers": (
        "the worker is built in; set its concurrency with QueueConfig(max_tasks_process=...)"
    ),
    "qtasks.starters": (
        "serve with app.run_forever() or 'qtasks -A module:app run'; a starter of your own "
        "is a qtasks.starter.Starter given to run_forever(starter=...)"
    ),
    "qtasks.executors": (
        "only qtasks.executors.base.BaseTaskExecutor is (what a QTasks TaskMiddleware gets); "
        "executor= of @app.task takes a qtasks executor (an object with execute(run)), and "
        "wrapping a task is a middleware (docs/plugins.md)"
    ),
    "qtasks.results": (
        "add_task(..., timeout=...) returns the finished record; record.wait_result(timeout=...)"
    ),
    "qtasks.events": "events are app.events.on.<event>() on the app",
    "qtasks.contexts": "an echo task's self.ctx (qtasks.context.TaskContext)",
    "qtasks.mixins": "a QTasks plugin subclasses qtasks.plugins.base.BasePlugin",
    "qtasks.stats": "app.inspect() or 'qtasks -A module:app inspect'",
    "qtasks.utils": (
        "shared_task is 'from qtasks import shared_task'; a chain is qtasks.chain(...) "
        "(docs/workflows.md)"
    ),
    "qtasks.logs": "qtasks logs through logging (logger 'qtasks')",
    "qtasks.base": "the apps are qtasks.QueueTasks and qtasks.AsyncQueueTasks",
    "qtasks.contrib.redis": f"use the Redis components: {REDIS}",
    "qtasks.plugins.retries": "retries are built in: @app.task(retry=..., retry_on_exc=...)",
    "qtasks.plugins.pydantic": "pydantic models are built in (pip install qtasks-core[pydantic])",
    "qtasks.plugins.grpc": "the gRPC plugin is not provided",
    "qtasks.plugins.testing": "test=True on @app.task is kept in self.extra; see docs/testing.md",
    "qtasks.schemas.task": "records are qtasks.Task (qtasks.record.TaskRecord)",
    "qtasks.schemas.task_exec": "a task is qtasks.TaskDef (app.tasks[name])",
    "qtasks.schemas.task_status": "records are qtasks.Task; statuses qtasks.TaskStatus",
    "qtasks.schemas.task_cls": (
        "calling a task runs the function; enqueue with task.add_task(...), chain with "
        "qtasks.chain(...) (docs/workflows.md)"
    ),
    "qtasks.schemas.inits": "app.events.on.<event>() returns the function itself",
    "qtasks.schemas.global_config": "global config values are app.global_config's",
    "qtasks.middlewares.base": (
        "a QTasks middleware subclasses TaskMiddleware (qtasks.middlewares or "
        "qtasks.middlewares.task); qtasks' own are functions async def mw(run, call_next) "
        "(docs/plugins.md)"
    ),
    "qtasks.timers.base": (
        "the timers are AsyncTimer and SyncTimer (qtasks.timers, or the qtasks-timer "
        "distribution's qtasks_timer)"
    ),
    "qtasks.tests.base": (
        "the test cases are qtasks.tests.SyncTestCase and AsyncTestCase, with no shared base"
    ),
    "qtasks.tests.async_classes": TESTING,
    "qtasks.tests.sync_classes": TESTING,
    "qtasks.plugins.depends.contexts": DEPENDS,
    "qtasks.plugins.states.registry": STATES,
    "qtasks.registries.task_registry": (
        "shared tasks are declared with 'from qtasks import shared_task' and adopted by every app"
    ),
    "qtasks.types": "an echo task's self is typed qtasks.registries.AsyncTask or SyncTask",
    "qtasks.version": "the version is qtasks.__version__",
    "qtasks._state": "there is no global app: each task and router knows the app it belongs to",
}
"""QTasks module -> what to write in qtasks. Its submodules are covered too."""


def instead(fullname: str) -> str | None:
    """What to write instead of importing ``fullname``, if it is a QTasks module qtasks lacks."""
    name = fullname
    while name:
        if name in INSTEAD:
            return INSTEAD[name]
        name = name.rpartition(".")[0]
    return None


class _Refuse(importlib.abc.Loader):
    def __init__(self, fullname: str, advice: str) -> None:
        self.fullname, self.advice = fullname, advice

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        raise QTasksModuleNotProvidedError(
            f"{self.fullname} is QTasks 1.7's module; qtasks has no such module: "
            f"{self.advice} (see docs/coming-from-qtasks.md)",
            name=self.fullname,
        )


class QTasks17Modules(importlib.abc.MetaPathFinder):
    """Finds QTasks' modules that no other finder found, to refuse them clearly."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        advice = instead(fullname)
        if advice is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Refuse(fullname, advice))


def install() -> None:
    """Add the finder at the end of ``sys.meta_path`` (once)."""
    if not any(isinstance(f, QTasks17Modules) for f in sys.meta_path):
        sys.meta_path.append(QTasks17Modules())
