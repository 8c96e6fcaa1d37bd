"""The sync app is a facade over the async one: same behaviour, blocking calls."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from qtasks import (
    AsyncQueueTasks,
    QueueConfig,
    QueueTasks,
    Task,
    TaskStatus,
    TaskTimeoutError,
    hookimpl,
)
from qtasks.task import SyncTaskDef

ROOT = Path(__file__).resolve().parents[2]


def test_sync_app_runs_tasks_in_background_worker() -> None:
    app = QueueTasks()

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def hello(name: str) -> str:
        return f"hello {name}"

    assert isinstance(add, SyncTaskDef)
    assert isinstance(app.aio, AsyncQueueTasks)
    try:
        with app:
            assert add.add_task(1, 2, timeout=5).returning == 3
            task = hello.add_task("you")
            assert task.wait_result(timeout=5).returning == "hello you"
            assert app.get(task.uuid).status is TaskStatus.SUCCESS  # type: ignore[union-attr]
    finally:
        app.close()


def test_sync_timeout_raises() -> None:
    app = QueueTasks()

    @app.task
    def job() -> None: ...

    try:
        with pytest.raises(TaskTimeoutError):
            app.add_task("job", timeout=0.05)  # no worker serving
    finally:
        app.close()


def test_quickstart_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "add: 5" in out
    assert "countdown steps: [3, 2, 1]" in out


SERVER = textwrap.dedent(
    """
    import sys, anyio
    from qtasks import AsyncQueueTasks, QueueConfig, QueueTasks, hookimpl

    app = {app_class}(config=QueueConfig(shutdown_grace=10))
    release = anyio.Event()

    @app.task
    async def long_job() -> str:
        print("running", flush=True)
        await anyio.sleep(0.5)  # the job's own work, not a test wait
        return "finished"

    class Kickoff:
        @hookimpl
        async def qtasks_broker_listening(self, app):
            task = await app.add_task("long_job")
            print("uuid", task.uuid, flush=True)

        @hookimpl
        async def qtasks_app_stopped(self, app):
            pass

    class Report:
        @hookimpl
        async def qtasks_task_succeeded(self, record):
            print("result", record.returning, flush=True)

    app.add_plugin(Kickoff())
    app.add_plugin(Report())
    app.run_forever()
    print("stopped cleanly", flush=True)
    """
)


@pytest.mark.parametrize("app_class", ["AsyncQueueTasks", "QueueTasks"])
def test_run_forever_stops_gracefully_on_sigterm(app_class: str, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER.replace("{app_class}", app_class))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("running"):
                proc.terminate()  # SIGTERM while the task runs
                break
        out, err = proc.communicate(timeout=30)
        lines.extend(out.splitlines())
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    # the running task finished within the grace period before the process stopped
    assert "result finished" in lines
    assert lines[-1] == "stopped cleanly"


def _public_async_methods() -> list[str]:
    return sorted(
        name
        for name, value in vars(AsyncQueueTasks).items()
        if not name.startswith("_")
        # Through the decorator that refuses a sync task's thread (qtasks.threads.loop_only).
        and (
            inspect.iscoroutinefunction(inspect.unwrap(value))
            or inspect.isasyncgenfunction(inspect.unwrap(value))
        )
    )


@pytest.mark.parametrize("name", _public_async_methods())
def test_no_async_method_leaks_through_the_sync_app(name: str) -> None:
    """Each coroutine method of the async app has a blocking twin on the sync app, or is
    refused with a pointer to what to use: never an un-awaited coroutine."""
    app = QueueTasks()
    try:
        if name in vars(QueueTasks):
            method = getattr(app, name)
            assert not inspect.iscoroutinefunction(method)
            assert not inspect.isasyncgenfunction(method)
            assert method.__doc__, f"QueueTasks.{name} has no docstring"
        else:
            with pytest.raises(AttributeError, match=rf"AsyncQueueTasks\.{name} is async"):
                getattr(app, name)
    finally:
        app.close()


def test_a_missing_attribute_of_the_sync_app_names_the_sync_app() -> None:
    """``app.AsyncResult(uuid)`` (Celery's) on a ``QueueTasks`` said "'AsyncQueueTasks' object
    has no attribute 'AsyncResult'", naming a class the newcomer never built. The error names
    the sync app, with what it has instead for Celery's names, and keeps Python's own
    suggestion of a close name (its ``name`` and ``obj``)."""
    app = QueueTasks()
    try:
        with pytest.raises(AttributeError) as caught:
            app.AsyncResult("some-uuid")
        assert str(caught.value) == (
            "'QueueTasks' object has no attribute 'AsyncResult' (AsyncResult is Celery's: "
            "app.get(uuid) reads a task's record, app.wait(uuid, timeout) waits for it)"
        )
        with pytest.raises(AttributeError) as caught:
            app.taks  # noqa: B018 - the typo under test
        assert str(caught.value) == "'QueueTasks' object has no attribute 'taks'"
        assert (caught.value.name, caught.value.obj) == ("taks", app)
        assert getattr(app, "no_such_thing", None) is None and not hasattr(app, "send_task")
    finally:
        app.close()


def test_sync_admin_methods_block_and_start_the_app() -> None:
    """inspect, dead_letters, requeue_dead_letters, config_get/config_set return values (not
    coroutines) and start the components on first use, as add_task does."""
    app = QueueTasks()
    rejected = threading.Event()

    class Rejections:
        @hookimpl
        def qtasks_task_rejected(self) -> None:
            rejected.set()

    app.add_plugin(Rejections())
    try:
        assert not app.started
        assert app.config_get("ns", "missing", 7) == 7  # no ComponentNotStartedError
        app.config_set("ns", "key", {"a": 1})
        assert app.config_get("ns", "key") == {"a": 1}
        report = app.inspect()
        assert report["app"] == "QueueTasks"
        assert report["queue"]["dead_letters"] == 0
        with app:
            task = app.add_task("no_such_task", timeout=5)
            assert task.status is TaskStatus.ERROR
            assert rejected.wait(5)
            letters = app.dead_letters()
            assert [letter.id for letter in letters] == [task.uuid]
            assert "unknown task" in letters[0].reason
            assert app.requeue_dead_letters([task.uuid]) == 1
    finally:
        app.close()


def test_sync_app_start_is_blocking() -> None:
    app = QueueTasks()
    try:
        assert app.start() is None  # type: ignore[func-returns-value]  # it blocks, returns None
        assert app.started
    finally:
        app.close()


@pytest.mark.anyio
async def test_async_config_get_and_set_start_the_app() -> None:
    app = AsyncQueueTasks()
    try:
        assert await app.config_get("ns", "missing", "d") == "d"
        await app.config_set("ns", "k", 3)
        assert await app.config_get("ns", "k") == 3
        assert app.started
    finally:
        await app.aclose()


# --- serving from a thread, stop() -------------------------------------------------------


class ServerThread(threading.Thread):
    """Runs ``app.run_forever()`` and keeps what it raised."""

    def __init__(self, app: QueueTasks | AsyncQueueTasks) -> None:
        super().__init__(name="test-server", daemon=True)
        self.app = app
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.app.run_forever()
        except BaseException as exc:
            self.error = exc

    def stopped(self, timeout: float = 20) -> bool:
        self.join(timeout)
        return not self.is_alive()


def graceful_app(app: QueueTasks | AsyncQueueTasks, started: threading.Event) -> None:
    """Register ``slow``: it runs until the worker is asked to stop, then returns, so it
    succeeds only if stopping gives running tasks their grace period."""

    @app.task  # type: ignore[untyped-decorator]  # mypy cannot pick an overload of a union's method
    async def slow() -> str:
        started.set()
        with anyio.fail_after(10):
            await app.worker.stopping.wait()
        return "finished"


def test_sync_app_serves_from_a_thread_and_stop_ends_it_gracefully() -> None:
    app = QueueTasks(config=QueueConfig(shutdown_grace=10))
    started = threading.Event()
    graceful_app(app, started)

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    server = ServerThread(app)
    server.start()
    try:
        assert app.add_task("add", 1, 2, timeout=10).returning == 3  # served meanwhile
        results: list[Task] = []
        producer = threading.Thread(target=lambda: results.append(app.add_task("slow", timeout=15)))
        producer.start()
        assert started.wait(10)
        app.stop()
        app.stop()  # twice: changes nothing, the grace period is not cut short
        assert server.stopped(), "run_forever did not return after stop()"
        assert server.error is None, repr(server.error)
        producer.join(10)
        assert [(r.status, r.returning) for r in results] == [(TaskStatus.SUCCESS, "finished")]
    finally:
        app.stop()
        server.join(20)
        app.close()


def test_async_app_serves_from_a_thread_and_stop_ends_it_gracefully() -> None:
    app = AsyncQueueTasks(config=QueueConfig(shutdown_grace=10))
    started = threading.Event()
    graceful_app(app, started)
    results: list[Any] = []

    class Producer:
        @hookimpl
        async def qtasks_broker_listening(self, app: AsyncQueueTasks) -> None:
            await app.add_task("slow")

        @hookimpl
        def qtasks_task_succeeded(self, record: Any) -> None:
            results.append(record.returning)

    app.add_plugin(Producer())
    server = ServerThread(app)
    server.start()
    try:
        assert started.wait(10), repr(server.error)
        app.stop()  # from the main thread, while the loop runs in the server thread
        assert server.stopped(), "run_forever did not return after stop()"
        assert server.error is None, repr(server.error)
        assert results == ["finished"]
    finally:
        app.stop()
        server.join(20)


@pytest.mark.parametrize("app_class", [AsyncQueueTasks, QueueTasks])
def test_stop_before_run_forever_makes_it_return(app_class: Any) -> None:
    """A stop() racing with a server thread's start is not lost."""
    app = app_class()
    try:
        app.stop()
        app.run_forever()  # returns (after starting and stopping): no hang
    finally:
        if isinstance(app, QueueTasks):
            app.close()


def test_run_forever_consumes_the_stop_request() -> None:
    """After a stopped run_forever, the next one serves until the next stop()."""
    app = QueueTasks()
    started = threading.Event()
    graceful_app(app, started)
    try:
        app.stop()
        app.run_forever()
        later = ServerThread(app)
        later.start()
        app.add_task("slow")
        assert started.wait(10)  # served: the first request did not stop this run
        app.stop()
        assert later.stopped()
        assert later.error is None, repr(later.error)
    finally:
        app.close()


@pytest.mark.anyio
async def test_wait_for_stop_consumes_one_request() -> None:
    """What a Starter awaits: returns for a stop() made before or while it waits, once."""
    app = AsyncQueueTasks()
    app.stop()
    app.stop()
    with anyio.fail_after(5):
        await app.wait_for_stop()  # made before: returns at once
    with anyio.move_on_after(0.05) as idle:
        await app.wait_for_stop()
    assert idle.cancelled_caught  # the two calls above were one request, consumed
    stopper = threading.Thread(target=app.stop)  # from another thread, while it waits
    with anyio.fail_after(5):
        stopper.start()
        await app.wait_for_stop()
    stopper.join()


@pytest.mark.parametrize("to", ["process", "another thread"])
def test_stop_from_a_signal_handler_on_the_main_thread(to: str) -> None:
    """The sync app serving on the main thread: a handler of the user's own calls stop(); the
    SIGINT/SIGTERM handlers run_forever installed are put back when it returns. The signal
    may be delivered to another thread (the kernel picks any thread for a process's signal):
    Python runs the handler on the main thread, which must not sit in a wait that only the
    signal could have interrupted."""
    app = QueueTasks(config=QueueConfig(shutdown_grace=10))
    started = threading.Event()
    graceful_app(app, started)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: app.stop())
    results: list[Task] = []

    def produce() -> None:
        results.append(app.add_task("slow", timeout=15))

    def kick() -> None:
        if started.wait(10):
            if to == "process":
                os.kill(os.getpid(), signal.SIGUSR1)
            else:
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    producer = threading.Thread(target=produce, daemon=True)
    kicker = threading.Thread(target=kick, daemon=True)
    try:
        producer.start()
        kicker.start()
        app.run_forever()  # on the main thread; returns once the handler called stop()
        producer.join(10)
        assert [(r.status, r.returning) for r in results] == [(TaskStatus.SUCCESS, "finished")]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGUSR1, previous)
        app.close()


def test_close_ends_run_forever_in_another_thread() -> None:
    """What the atexit handler does for a script that forgot stop(): no hang."""
    app = QueueTasks()

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    server = ServerThread(app)
    server.start()
    assert app.add_task("add", 2, 2, timeout=10).returning == 4
    app.close()
    assert server.stopped()
    assert server.error is None, repr(server.error)


def test_close_cancels_a_call_still_in_flight_instead_of_waiting_for_it() -> None:
    """A wait that another thread (or a caller left by its Ctrl-C) still has in the portal is
    cancelled by close(), which returns at once: it waited for it, and gave the portal's thread
    up after 10 s."""
    app = QueueTasks()

    @app.task
    def job() -> None: ...

    waiting = threading.Event()
    errors: list[BaseException] = []

    async def wait(uuid: str) -> None:
        waiting.set()  # in the portal now
        await app.aio.wait(uuid, None)

    def waiter() -> None:
        uuid = app.add_task("job").uuid  # no worker serves: it stays queued
        try:
            app.portal.call(wait, uuid)  # what app.wait does
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    assert waiting.wait(10)
    began = time.monotonic()
    app.close()
    took = time.monotonic() - began
    thread.join(10)
    assert took < 5, took
    assert not thread.is_alive()
    assert [type(exc).__name__ for exc in errors] == ["CancelledError"]


SYNC_ADD = """
from qtasks import QueueTasks
app = QueueTasks()
@app.task
def add(a: int, b: int) -> int:
    return a + b
"""
ASYNC_ADD = """
import asyncio
from qtasks import AsyncQueueTasks
app = AsyncQueueTasks()
@app.task
async def add(a: int, b: int) -> int:
    return a + b
"""
FORGOT = {
    "sync app, no with app:": SYNC_ADD
    + """
print(app.add_task("add", 2, 3).status.value)
print(app.add_task("add", 4, 5, delay=60).status.value)
""",
    "async app, no async with app:": ASYNC_ADD
    + """
async def main() -> None:
    print((await app.add_task("add", 2, 3)).status.value)
    print((await app.add_task("add", 4, 5, delay=60)).status.value)
asyncio.run(main())
""",
}
SERVED = {
    "served": SYNC_ADD
    + """
with app:
    print(app.add_task("add", 2, 3, timeout=10).status.value)
    print(app.add_task("add", 4, 5, delay=60).status.value)  # left delayed: it was served
app.close()
""",
    "served by the next event loop": ASYNC_ADD
    + """
async def produce() -> str:
    return (await app.add_task("add", 2, 3)).uuid
async def serve(uuid: str) -> str:
    async with app:
        return (await app.wait(uuid, timeout=10)).status.value
print(asyncio.run(serve(asyncio.run(produce()))))
""",
}


@pytest.mark.parametrize("name", [*FORGOT, *SERVED])
def test_a_script_that_never_served_its_in_memory_broker_says_so_at_exit(
    name: str, tmp_path: Path
) -> None:
    """The quickstart without its ``with app:`` (and without ``timeout=``): ``add_task``
    returned the ``new`` record, the script exited, the task never ran, and nothing said so.
    At the exit, an in-memory broker that no worker ever took from and that still holds
    messages logs a warning saying what to do; a broker that was served says nothing, also
    when a later event loop served what an earlier one enqueued (tasks.md)."""
    script = tmp_path / "script.py"
    script.write_text((FORGOT | SERVED)[name])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    if name in FORGOT:
        assert done.stdout.split() == ["new", "new"]
        assert done.stderr == (
            "the process exits with 2 task message(s) in an in-memory broker that no worker "
            "ever served: they never ran, and in-memory messages live only in this process. "
            "Serve in this process (with app:, async with app:, app.run_forever()), or give "
            "the app a shared broker (Redis, RabbitMQ) and run a worker with qtasks run\n"
        )
    else:
        assert done.stdout.split()[0] == "success"
        assert "never ran" not in done.stderr, done.stderr


def test_apps_in_names_a_modules_apps_of_both_kinds() -> None:
    """``qtasks.sync.apps_in``, which ``qtasks -A`` and the pytest plugin's ``qtasks_app``
    both use to name a module's apps: sync and async ones in the order the module set them,
    and with ``app`` only those of that async app (a sync app counts by the one it wraps)."""
    from types import ModuleType

    from qtasks.sync import apps_in

    module = ModuleType("apps_in_mod")
    shop, billing = QueueTasks("shop"), AsyncQueueTasks("billing")
    module.__dict__.update(shop=shop, billing=billing, again=shop, other=object())
    assert apps_in(module) == ["shop", "billing", "again"]
    assert apps_in(module, shop.aio) == ["shop", "again"]
    assert apps_in(module, billing) == ["billing"]
    assert apps_in(module, AsyncQueueTasks()) == []
