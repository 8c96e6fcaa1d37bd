"""The OpenTelemetry plugin: the worker's span is a child of the producer's, through the message
headers, in process (in-memory components), through RabbitMQ, and across a real worker
process on Redis (whose spans reach the test through a test-only exporter)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from amqp_cleanup import delete_topology
from obs_helpers import fails_once, runs_until_cancelled, span_dict, spawn
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from qtasks import AsyncQueueTasks, QueueConfig, TaskStatus, hookimpl
from qtasks.errors import PluginError
from qtasks.messages import Message
from qtasks_web.plugins import Off
from qtasks_web.tracing import TracingPlugin

pytestmark = pytest.mark.anyio

HERE = Path(__file__).parent

Span = dict[str, Any]


class Traces:
    """A tracer provider whose spans the test reads (the SDK's in-memory exporter)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self) -> list[Span]:
        return [span_dict(s) for s in self.exporter.get_finished_spans()]

    async def until(self, done: Callable[[list[Span]], bool], timeout: float = 10) -> list[Span]:
        """The finished spans once ``done(spans)`` (a run span ends after the record a
        producer waits on is stored)."""
        with anyio.fail_after(timeout):
            while not done(self.spans()):  # noqa: ASYNC110 - the exporter offers no event
                await anyio.sleep(0.01)
        return self.spans()


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s["name"] == name]


def one(spans: list[Span], name: str) -> Span:
    found = named(spans, name)
    assert len(found) == 1, (name, spans)
    return found[0]


def assert_child(child: Span, parent: Span) -> None:
    assert (child["trace_id"], child["parent_id"]) == (parent["trace_id"], parent["span_id"])


def send_attributes(task: str, uuid: str) -> dict[str, object]:
    """Every attribute of a recorded enqueue span of ``task`` (priority 0)."""
    return {
        "messaging.system": "qtasks",
        "messaging.operation": "publish",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": task,
        "messaging.message.id": uuid,
        "qtasks.task.priority": 0,
    }


def process_attributes(task: str, uuid: str, worker: str) -> dict[str, object]:
    """Every attribute of a recorded run span of ``task`` that succeeded at its first
    attempt on ``worker``."""
    return {
        "messaging.system": "qtasks",
        "messaging.operation": "process",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": task,
        "messaging.consumer.group.name": worker,
        "messaging.message.id": uuid,
        "qtasks.task.priority": 0,
        "qtasks.task.attempt": 1,
        "qtasks.task.status": "success",
    }


@pytest.fixture
def traces() -> Traces:
    return Traces()


@pytest.fixture
async def app(traces: Traces) -> AsyncIterator[AsyncQueueTasks]:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=traces.provider))
    yield app
    await app.aclose()


async def test_run_span_is_a_child_of_the_enqueue_span_with_messaging_attributes(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    @app.task
    async def ok(x: int) -> int:
        return x

    async with app:
        with traces.tracer.start_as_current_span("request"):
            task = await ok.add_task(2, timeout=5)
        spans = await traces.until(lambda s: bool(named(s, "process ok")))
    request, send, process = one(spans, "request"), one(spans, "send ok"), one(spans, "process ok")
    assert_child(send, request)
    assert_child(process, send)
    assert (send["kind"], process["kind"]) == ("PRODUCER", "CONSUMER")
    common = {
        "messaging.system": "qtasks",
        "messaging.destination.name": "ok",
        "messaging.message.id": task.uuid,
    }
    assert send["attributes"] == {
        **common,
        "messaging.operation": "publish",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "qtasks.task.priority": 0,
    }
    assert {k: process["attributes"][k] for k in common} == common
    assert process["attributes"]["messaging.operation"] == "process"
    assert process["attributes"]["messaging.operation.type"] == "process"
    assert process["attributes"]["qtasks.task.attempt"] == 1
    assert process["attributes"]["qtasks.task.status"] == "success"
    assert process["attributes"]["messaging.consumer.group.name"] == app.worker.id
    assert process["status"] == "UNSET"  # OK is the application's to set


async def test_every_step_of_a_chain_ends_its_send_span_and_runs_under_it(
    traces: Traces,
) -> None:
    from qtasks import MemoryBroker, MemoryStorage, chain

    # The producer and the worker are two apps (as two processes would be) on shared memory
    # components: the waiting steps are published by the worker, never seen by the
    # producer's plugin as enqueued.
    broker, storage = MemoryBroker(), MemoryStorage()
    apps = [
        AsyncQueueTasks(broker=broker, storage=storage, config=QueueConfig(plugins_disabled=["*"]))
        for _ in range(2)
    ]
    producer, worker = apps
    sender = TracingPlugin(tracer_provider=traces.provider)
    producer.add_plugin(sender)
    worker.add_plugin(TracingPlugin(tracer_provider=traces.provider))
    for each in apps:

        @each.task
        async def inc(x: int) -> int:
            return x + 1

    await producer.start()
    try:
        async with worker:
            with traces.tracer.start_as_current_span("request"):
                flow = await producer.run_workflow(
                    chain(*(producer.signature("inc", a) for a in ([1], [], [])))
                )
            done = await flow.wait_result(timeout=5)
            assert done.result == 4
            spans = await traces.until(lambda s: len(named(s, "process inc")) == 3)
    finally:
        await producer.aclose()
    sends = {s["attributes"]["messaging.message.id"]: s for s in named(spans, "send inc")}
    assert len(sends) == 3  # the two waiting steps' spans ended too, when they were stored
    for process in named(spans, "process inc"):
        assert_child(process, sends[process["attributes"]["messaging.message.id"]])
    request = one(spans, "request")
    for send in sends.values():
        assert_child(send, request)
    assert sender._sending == {}


async def test_a_deduplicated_enqueue_ends_its_span_at_once(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    """An add_task whose unique key a pending task holds sends nothing: its send span ends
    there, with an event naming that task, instead of staying open until evicted."""
    gate = anyio.Event()

    @app.task
    async def mail(to: str) -> str:
        await gate.wait()
        return to

    async with app:
        first = await mail.add_task("a@b", unique_key="k")
        again = await mail.add_task("a@b", unique_key="k")
        assert again.uuid == first.uuid
        sends = named(traces.spans(), "send mail")  # both ended, before the task ran
        assert len(sends) == 2
        dropped = next(s for s in sends if s["events"])
        assert dropped["events"] == [
            {"name": "qtasks.deduplicated", "attributes": {"qtasks.task.existing_id": first.uuid}}
        ]
        assert dropped["attributes"]["messaging.message.id"] != first.uuid
        gate.set()
        await app.wait(first.uuid, timeout=5)


async def test_an_error_is_recorded_on_the_run_span(app: AsyncQueueTasks, traces: Traces) -> None:
    @app.task
    async def bad() -> None:
        raise ValueError("nope")

    async with app:
        assert (await bad.add_task(timeout=5)).status is TaskStatus.ERROR
        spans = await traces.until(lambda s: bool(named(s, "process bad")))
    process = one(spans, "process bad")
    assert_child(process, one(spans, "send bad"))
    assert (process["status"], process["description"]) == ("ERROR", "ValueError: nope")
    (event,) = process["events"]
    assert event["name"] == "exception"
    assert event["attributes"]["exception.type"] == "ValueError"
    assert event["attributes"]["exception.message"] == "nope"
    assert "raise ValueError" in event["attributes"]["exception.stacktrace"]


async def test_each_attempt_of_a_retried_task_is_a_child_of_the_one_enqueue(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    flaky = fails_once(app)
    async with app:
        assert (await flaky.add_task(timeout=5)).returning == "ok"
        spans = await traces.until(lambda s: len(named(s, "process flaky")) == 2)
    send = one(spans, "send flaky")
    first, second = named(spans, "process flaky")
    assert_child(first, send)
    assert_child(second, send)
    assert (first["attributes"]["qtasks.task.attempt"], first["status"]) == (1, "ERROR")
    assert [e["name"] for e in first["events"]] == ["exception", "qtasks.retry"]
    assert first["events"][1]["attributes"] == {"qtasks.retry.delay": 0, "qtasks.task.attempt": 1}
    assert first["attributes"]["qtasks.task.status"] == "retry"
    assert (second["attributes"]["qtasks.task.attempt"], second["status"]) == (2, "UNSET")


async def test_a_cancel_is_an_event_of_the_run_span(app: AsyncQueueTasks, traces: Traces) -> None:
    waits, started = runs_until_cancelled(app)
    async with app:
        task = await waits.add_task()
        with anyio.fail_after(5):
            await started.wait()
        await app.cancel(task.uuid, "enough")
        spans = await traces.until(lambda s: bool(named(s, "process waits")))
    process = one(spans, "process waits")
    assert process["events"] == [
        {"name": "qtasks.cancelled", "attributes": {"qtasks.cancel.reason": "enough"}}
    ]
    assert (process["attributes"]["qtasks.task.status"], process["status"]) == ("cancel", "UNSET")


async def test_the_run_span_is_current_in_the_tasks_code_async_sync_and_nested_enqueues(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    def current() -> str:
        return f"{trace.get_current_span().get_span_context().span_id:016x}"

    @app.task
    def in_thread() -> str:
        return current()

    @app.task
    async def parent() -> str:
        await app.add_task("in_thread")
        return current()

    async with app:
        seen_async = (await parent.add_task(timeout=5)).returning
        spans = await traces.until(lambda s: bool(named(s, "process in_thread")))
        child = await app.wait(
            one(spans, "send in_thread")["attributes"]["messaging.message.id"], 5
        )
    outer = one(spans, "process parent")
    assert seen_async == outer["span_id"]
    # The task it enqueued continues the same trace: its enqueue under the parent's run.
    assert_child(one(spans, "send in_thread"), outer)
    assert_child(one(spans, "process in_thread"), one(spans, "send in_thread"))
    assert child.returning == one(spans, "process in_thread")["span_id"]  # a worker thread
    assert len({s["trace_id"] for s in spans}) == 1


async def test_a_rejected_message_gets_an_error_span_in_its_producers_trace(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    async with app:
        await app.enqueue("no_such_task")
        spans = await traces.until(lambda s: bool(named(s, "process no_such_task")))
    process = one(spans, "process no_such_task")
    assert_child(process, one(spans, "send no_such_task"))
    assert process["status"] == "ERROR"
    assert process["description"].startswith("rejected: unknown task 'no_such_task'")
    assert [e["name"] for e in process["events"]] == ["qtasks.rejected"]


def test_the_entry_point_enables_tracing_from_extra_tracing() -> None:
    on = AsyncQueueTasks(config=QueueConfig(extra={"tracing": {"enabled": True}}))
    assert isinstance(on.hooks.pm.get_plugin("tracing"), TracingPlugin)
    off = AsyncQueueTasks(config=QueueConfig(extra={"tracing": {"enabled": False}}))
    assert isinstance(off.hooks.pm.get_plugin("tracing"), Off)
    for bad, message in (
        ({"enabled": "yes"}, "extra.tracing.enabled must be true or false"),
        ({"on": True}, "extra.tracing: unknown key(s) ['on']"),
    ):
        with pytest.raises(PluginError) as caught:
            AsyncQueueTasks(config=QueueConfig(extra={"tracing": bad}))
        assert message in str(caught.value)


# --- RabbitMQ ---------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_the_trace_context_crosses_rabbitmq(rabbitmq_url: str, traces: Traces) -> None:
    from qtasks_rabbitmq import RabbitMQBroker

    broker = RabbitMQBroker(rabbitmq_url, queue=f"qtasks-test-{uuid.uuid4().hex[:10]}")
    app = AsyncQueueTasks(
        broker=broker, config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0)
    )
    app.add_plugin(TracingPlugin(tracer_provider=traces.provider))

    @app.task
    async def ok() -> int:
        return 1

    try:
        async with app:
            with traces.tracer.start_as_current_span("request"):
                assert (await ok.add_task(timeout=10)).returning == 1
            spans = await traces.until(lambda s: bool(named(s, "process ok")))
    finally:
        await app.aclose()
        await delete_topology(broker.topology, rabbitmq_url)
    assert_child(one(spans, "send ok"), one(spans, "request"))
    assert_child(one(spans, "process ok"), one(spans, "send ok"))


# --- a worker process on Redis ----------------------------------------------------------

WORKER = """
import sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from obs_helpers import RedisListExporter
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

url, prefix, key = sys.argv[1:4]
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(RedisListExporter(url, key)))
trace.set_tracer_provider(provider)
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="traces"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    # Through the entry point, as a user enables it; the spans go to the global provider.
    config=QueueConfig(extra={"tracing": {"enabled": True}}, shutdown_grace=1.0),
)


@app.task
async def ok(x: int) -> int:
    return x


@app.task
def bad() -> None:
    raise KeyError("missing")


app.run_forever()
provider.shutdown()
"""


@pytest.mark.redis
@pytest.mark.timeout(90)
async def test_spans_of_a_worker_process_on_redis_are_children_of_the_producers(
    redis_url: str, prefix: str, tmp_path: Path, traces: Traces
) -> None:
    import redis.asyncio

    from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

    key = f"{prefix}:spans"
    (tmp_path / "traced_worker.py").write_text(WORKER)
    worker = spawn([str(tmp_path / "traced_worker.py"), redis_url, prefix, key], HERE)
    producer = AsyncQueueTasks(
        broker=RedisBroker(redis_url, prefix=prefix, queue="traces"),
        storage=RedisStorage(redis_url, prefix=prefix),
        global_config=RedisGlobalConfig(redis_url, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )
    producer.add_plugin(TracingPlugin(tracer_provider=traces.provider))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with traces.tracer.start_as_current_span("request"):
            good = await producer.add_task("ok", 7, timeout=30)
            failed = await producer.add_task("bad", timeout=10)
        assert (good.returning, failed.status) == (7, TaskStatus.ERROR)
        theirs = []
        for _ in range(2):  # the worker's run spans, as its exporter pushes them
            popped = await client.blpop([key], timeout=10)
            assert popped is not None, "the worker exported no span within 10 s"
            theirs.append(json.loads(popped[1]))
    finally:
        await client.aclose()
        await producer.aclose()
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out
    mine = traces.spans()
    request = one(mine, "request")
    for name, task in (("ok", good), ("bad", failed)):
        send, process = one(mine, f"send {name}"), one(theirs, f"process {name}")
        assert_child(send, request)
        assert_child(process, send)
        assert process["kind"] == "CONSUMER"
        assert process["attributes"]["messaging.message.id"] == task.uuid
        assert process["attributes"]["messaging.destination.name"] == name
        assert process["attributes"]["messaging.system"] == "qtasks"
    ok_span, bad_span = one(theirs, "process ok"), one(theirs, "process bad")
    assert (ok_span["status"], ok_span["events"]) == ("UNSET", [])
    assert (bad_span["status"], bad_span["description"]) == ("ERROR", "KeyError: 'missing'")
    assert bad_span["events"][0]["attributes"]["exception.type"] == "KeyError"


# --- opentelemetry-api alone (no SDK) -----------------------------------------------------


class Headers:
    """Records the headers of each message the worker receives."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    def qtasks_worker_task_received(self, message: Message) -> None:
        self.seen.append(dict(message.headers))


async def test_without_an_sdk_nothing_is_written_unless_a_trace_comes_in() -> None:
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=trace.NoOpTracerProvider()))
    headers = Headers()
    app.add_plugin(headers)
    remote = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )

    @app.task
    async def seen() -> str:
        return f"{trace.get_current_span().get_span_context().trace_id:032x}"

    async with app:
        alone = await seen.add_task(timeout=5)
        # A trace continued by this process without an SDK (say, from a request's headers).
        with trace.use_span(trace.NonRecordingSpan(remote)):
            continued = await seen.add_task(timeout=5)
    assert headers.seen[0] == {}
    assert alone.returning == f"{0:032x}"
    assert (
        headers.seen[1]["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    )
    assert continued.returning == "0af7651916cd43dd8448eb211c80319c"


ENDS = {
    "qtasks_storage_added",
    "qtasks_task_enqueue_failed",
    "qtasks_task_deduplicated",
    "qtasks_executor_closed",
    "qtasks_executor_error",
    "qtasks_worker_task_retry",
    "qtasks_task_cancelled",
    "qtasks_task_dead_lettered",
    "qtasks_worker_execute_after",
}
"""The hooks through which the plugin ends what it made (no other plugin in these apps)."""


async def test_the_hooks_that_end_spans_are_registered_when_the_plugin_first_makes_one() -> None:
    """Without an SDK and with no trace coming in the plugin makes nothing, and none of the
    hooks that end what it makes is called for any task (each costs its call per task);
    with an SDK the first spans register them in time to end themselves, in a bulk enqueue
    too."""
    quiet = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    quiet.add_plugin(TracingPlugin(tracer_provider=trace.NoOpTracerProvider()))

    @quiet.task
    async def nothing() -> None: ...

    async with quiet:
        for _ in range(3):
            await nothing.add_task(timeout=5)
        assert not ENDS & quiet.hooks.active
    await quiet.aclose()

    traces = Traces()
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    plugin = TracingPlugin(tracer_provider=traces.provider)
    app.add_plugin(plugin)

    @app.task
    async def ok() -> None: ...

    async with app:
        assert not ENDS & app.hooks.active
        await app.add_tasks([ok.s(), ok.s()])
        spans = await traces.until(lambda s: len(named(s, "process ok")) == 2)
    await app.aclose()
    assert app.hooks.active >= ENDS
    assert len(named(spans, "send ok")) == 2
    assert plugin._sending == {} and plugin._running == {}


async def test_the_hooks_that_end_spans_are_registered_again_if_unregistered(
    app: AsyncQueueTasks, traces: Traces
) -> None:
    plugin = app.hooks.pm.get_plugin(TracingPlugin.name)
    assert isinstance(plugin, TracingPlugin)

    @app.task
    async def ok() -> None: ...

    async with app:
        await ok.add_task(timeout=5)
        for follower in (plugin._sends, plugin._runs, plugin._closes):
            app.hooks.unregister(follower)
        assert not ENDS & app.hooks.active
        await ok.add_task(timeout=5)
        spans = await traces.until(lambda s: len(named(s, "process ok")) == 2)
    assert app.hooks.active >= ENDS
    sends, processes = named(spans, "send ok"), named(spans, "process ok")
    for send, process in zip(sends, processes, strict=True):
        assert_child(process, send)
    assert plugin._sending == {} and plugin._running == {}


async def test_a_tracing_plugin_replacing_another_ends_its_own_spans(traces: Traces) -> None:
    """The hooks that end spans are plugins named after the tracing plugin's
    (``qtasks-web.tracing.sends`` ...): those of a tracing plugin the app had before give
    way to the new one's."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    first, second = (TracingPlugin(tracer_provider=traces.provider) for _ in range(2))
    app.add_plugin(first)

    @app.task
    async def ok() -> None: ...

    async with app:
        await ok.add_task(timeout=5)
        await traces.until(lambda s: len(named(s, "process ok")) == 1)
        app.hooks.unregister(first)
        app.add_plugin(second)
        await ok.add_task(timeout=5)
        spans = await traces.until(lambda s: len(named(s, "process ok")) == 2)
    await app.aclose()
    names = {name for name, _ in app.hooks.pm.list_name_plugin()}
    assert {"qtasks-web.tracing.sends", "qtasks-web.tracing.runs"} <= names
    assert app.hooks.pm.get_plugin("qtasks-web.tracing.runs") is second._runs
    assert app.hooks.pm.get_plugin("qtasks-web.tracing.closes") is second._closes
    assert_child(named(spans, "process ok")[1], named(spans, "send ok")[1])
    assert second._sending == {} and second._running == {}


async def test_an_enqueue_whose_publish_raises_ends_its_span_with_the_error(
    traces: Traces,
) -> None:
    from qtasks import MemoryBroker
    from qtasks.messages import Envelope

    class Down(MemoryBroker):
        async def publish(self, envelope: Envelope) -> None:
            raise ConnectionError("broker down")

        async def publish_many(self, envelopes: Any) -> None:
            raise ConnectionError("broker down")

    app = AsyncQueueTasks(broker=Down(), config=QueueConfig(plugins_disabled=["*"]))
    plugin = TracingPlugin(tracer_provider=traces.provider)
    app.add_plugin(plugin)

    @app.task
    def t() -> None: ...

    with pytest.raises(ConnectionError):
        await app.enqueue("t")
    with pytest.raises(ConnectionError):
        await app.add_tasks([t.s(), t.s()])
    await app.aclose()
    spans = traces.spans()
    assert [s["name"] for s in spans] == ["send t"] * 3
    for span in spans:
        assert (span["status"], span["description"]) == ("ERROR", "ConnectionError: broker down")
        assert [e["name"] for e in span["events"]] == ["exception"]
    assert plugin._sending == {}  # nothing left open


async def test_enqueue_spans_never_confirmed_are_bounded(
    traces: Traces, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qtasks_web import tracing

    class Refuses:
        @hookimpl(trylast=True)  # after the tracing plugin opened the span
        def qtasks_task_enqueue(self, message: Message) -> Message | None:
            raise ValueError("refused")

    monkeypatch.setattr(tracing, "MAX_UNCONFIRMED", 2)
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    app.add_plugin(TracingPlugin(tracer_provider=traces.provider))
    app.add_plugin(Refuses())
    for _ in range(3):
        with pytest.raises(PluginError):
            await app.enqueue("t")
    await app.aclose()
    # The enqueue failed before there was a record to report: the spans stay open, at most
    # 2 of them; the oldest was ended to make room, marked unconfirmed.
    (ended,) = traces.spans()
    assert ended["name"] == "send t"
    assert [e["name"] for e in ended["events"]] == ["qtasks.unconfirmed"]


# --- sampling: who decides, and what goes on in an unsampled trace ------------------------


def traceparent(span_context: trace.SpanContext) -> tuple[int, int, bool]:
    return span_context.trace_id, span_context.span_id, span_context.is_remote


def header_ids(headers: dict[str, Any]) -> tuple[int, int]:
    _, trace_id, span_id, _ = headers["traceparent"].split("-")
    return int(trace_id, 16), int(span_id, 16)


async def run_nested(
    provider: TracerProvider,
) -> tuple[tuple[int, int], Headers, list[tuple[int, int, bool]]]:
    """A request span (unsampled, the sampler is asked) enqueues ``outer``, which enqueues
    ``inner``: the request's trace and span ids, the headers each task arrived with and the
    current span context each task's code saw."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)
    seen: list[tuple[int, int, bool]] = []
    nested = anyio.Event()

    @app.task
    async def outer() -> None:
        seen.append(traceparent(trace.get_current_span().get_span_context()))
        await app.add_task("inner")

    @app.task
    async def inner() -> None:
        seen.append(traceparent(trace.get_current_span().get_span_context()))
        nested.set()

    async with app:
        with provider.get_tracer("tests").start_as_current_span("request") as request:
            ids = traceparent(request.get_span_context())[:2]
            assert not request.get_span_context().trace_flags.sampled
            await app.add_task("outer", timeout=5)
        with anyio.fail_after(5):
            await nested.wait()
    await app.aclose()
    return ids, headers, seen


async def test_under_parent_based_an_unsampled_trace_goes_on_without_the_spans_it_drops() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))  # every root unsampled
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (trace_id, request_id), headers, seen = await run_nested(provider)
    # The request span is local to this process: the sampler decided the send span under it
    # (a non-recording span with an id of its own, not the request's, went into the headers).
    (outer_headers, inner_headers) = headers.seen
    sent_under = header_ids(outer_headers)
    assert sent_under[0] == trace_id
    assert sent_under[1] != request_id
    # Under a remote unsampled parent ParentBased's answer is DROP for any span: the worker
    # made no run span (the code saw the producer's span context, remote, as current) and
    # the task it enqueued passed that same context on.
    assert seen[0] == (*sent_under, True)
    assert header_ids(inner_headers) == sent_under
    assert seen[1] == (*sent_under, True)
    # Unsampled: the sampled bit is off (newer SDKs also set 0x02, a random trace id).
    assert int(outer_headers["traceparent"][-2:], 16) & 0x01 == 0
    assert exporter.get_finished_spans() == ()


async def test_a_sampler_of_the_users_own_decides_every_span() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    class Counting(ParentBased):
        """ParentBased's decisions, counting how often it is asked: a sampler of the user's
        own, which the plugin cannot answer for."""

        asked: list[str] = []

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            Counting.asked.append(str(kwargs["name"] if "name" in kwargs else args[2]))
            return super().should_sample(*args, **kwargs)

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=Counting(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    (trace_id, _), headers, seen = await run_nested(provider)
    assert sorted(Counting.asked) == sorted(
        ["request", "send outer", "process outer", "send inner", "process inner"]
    )
    # Each run span was the SDK's non-recording one (local, an id of its own), and every
    # task and header stayed in the request's trace.
    (outer_headers, inner_headers) = headers.seen
    assert seen[0][0] == seen[1][0] == trace_id
    assert seen[0][2] is False and seen[0][1] != header_ids(outer_headers)[1]
    assert header_ids(inner_headers)[0] == trace_id
    assert header_ids(inner_headers)[1] not in (seen[0][1], header_ids(outer_headers)[1])
    assert exporter.get_finished_spans() == ()


async def test_the_sampler_gets_the_messaging_attributes_and_recorded_spans_get_the_rest() -> None:
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
    )

    class ByDestination(Sampler):
        """Roots of task ``kept`` recorded, others dropped; what it was given kept."""

        given: dict[str, dict[str, Any]] = {}

        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: Any = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            ByDestination.given[name] = dict(attributes or {})
            kept = ByDestination.given[name].get("messaging.destination.name") == "kept"
            # As the SDK's samplers do: a recorded span starts with the attributes given.
            if kept:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "ByDestination"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ByDestination()))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)
    trace_ids: dict[str, int] = {}

    for task_name in ("kept", "dropped"):

        @app.task(name=task_name)
        async def record(name: str) -> None:
            trace_ids[name] = trace.get_current_span().get_span_context().trace_id

    async with app:
        kept = await app.add_task("kept", "kept", timeout=5)
        await app.add_task("dropped", "dropped", timeout=5)
    await app.aclose()
    # Only what a sampler may decide on was built before it decided (the producer's roots:
    # the worker's spans have a parent, which ParentBased decides on).
    for name in ("kept", "dropped"):
        assert ByDestination.given[f"send {name}"] == {
            "messaging.system": "qtasks",
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": name,
        }
    spans = [span_dict(s) for s in exporter.get_finished_spans()]
    assert sorted(s["name"] for s in spans) == ["process kept", "send kept"]
    send, process = one(spans, "send kept"), one(spans, "process kept")
    assert_child(process, send)
    assert send["attributes"] == send_attributes("kept", kept.uuid)
    assert process["attributes"] == process_attributes("kept", kept.uuid, app.worker.id)
    # The dropped trace went on all the same: its id reached the task's code.
    assert trace_ids["dropped"] == header_ids(headers.seen[1])[0] != 0
    assert trace_ids["kept"] == int(send["trace_id"], 16)


# --- the W3C propagator's work done by the plugin --------------------------------------------


def extracted(ctx: Any) -> tuple[trace.SpanContext, bool, dict[str, object]]:
    from opentelemetry import baggage

    span_context = trace.get_current_span(ctx).get_span_context()
    return (span_context, span_context.is_remote, dict(baggage.get_all(ctx)))


TRACE, SPAN = "0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7"

CARRIERS: dict[str, dict[str, Any]] = {
    "sampled": {"traceparent": f"00-{TRACE}-{SPAN}-01"},
    "unsampled": {"traceparent": f"00-{TRACE}-{SPAN}-00"},
    "random-id": {"traceparent": f"00-{TRACE}-{SPAN}-02"},
    "all-flags": {"traceparent": f"00-{TRACE}-{SPAN}-ff"},
    "tracestate": {"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "congo=t61rcWkgMzE"},
    "baggage": {"traceparent": f"00-{TRACE}-{SPAN}-01", "baggage": "user=alice,tier=gold"},
    "zero-trace": {"traceparent": f"00-{'0' * 32}-{SPAN}-01"},
    "zero-span": {"traceparent": f"00-{TRACE}-{'0' * 16}-01"},
    "upper-case": {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"},
    "leading-space": {"traceparent": f" 00-{TRACE}-{SPAN}-01"},
    "trailing-space": {"traceparent": f"00-{TRACE}-{SPAN}-01 "},
    "v00-extra": {"traceparent": f"00-{TRACE}-{SPAN}-01-extra"},
    "v01-extra": {"traceparent": f"01-{TRACE}-{SPAN}-01-extra"},
    "vff": {"traceparent": f"ff-{TRACE}-{SPAN}-01"},
    "underscore": {"traceparent": f"00-{TRACE[:-1]}_-{SPAN}-01"},
    "plus-sign": {"traceparent": f"00-+{TRACE[1:]}-{SPAN}-01"},
    "list-value": {"traceparent": [f"00-{TRACE}-{SPAN}-01"]},
    "empty": {"traceparent": ""},
    "tracestate-alone": {"tracestate": "congo=t61rcWkgMzE"},
    "baggage-alone": {"baggage": "user=alice"},
}


@pytest.mark.parametrize("case", CARRIERS)
def test_the_plugins_extraction_is_the_propagators(case: str) -> None:
    from opentelemetry import propagate

    headers = CARRIERS[case]
    plugin = TracingPlugin(tracer_provider=TracerProvider())
    assert plugin._propagation()  # the API's default: W3C trace context and baggage
    ctx, parent = plugin._parent(dict(headers))
    theirs = propagate.extract(dict(headers))
    assert extracted(ctx) == extracted(theirs)
    assert parent is trace.get_current_span(ctx)
    # A traceparent read by the plugin (its span context built when asked) is the
    # propagator's non-recording span as seen from outside: its type, flags and repr.
    assert isinstance(parent, trace.NonRecordingSpan)
    assert not parent.is_recording()
    assert repr(parent) == repr(trace.get_current_span(theirs))


def test_the_context_the_plugin_makes_for_an_extracted_span_is_the_apis() -> None:
    """The run's parent context, made in one step, is what ``set_span_in_context`` makes of
    an empty context (with this API the key is found: the one-step path is the one taken)."""
    from opentelemetry import context

    from qtasks_web.w3c import SPAN_KEY, in_context

    assert SPAN_KEY is not None
    span = trace.NonRecordingSpan(trace.SpanContext(int(TRACE, 16), int(SPAN, 16), True))
    mine = in_context(span)
    assert type(mine) is context.Context
    assert mine == trace.set_span_in_context(span, context.Context())
    assert trace.get_current_span(mine) is span


@pytest.mark.parametrize("trace_state", [None, "congo=t61rcWkgMzE,rojo=00f067"])
@pytest.mark.parametrize("flags", [0, 1, 2, 3])
@pytest.mark.parametrize("with_baggage", [False, True])
def test_the_plugins_injection_is_the_propagators(
    trace_state: str | None, flags: int, with_baggage: bool
) -> None:
    from opentelemetry import baggage, context, propagate

    plugin = TracingPlugin(tracer_provider=TracerProvider())
    span = trace.NonRecordingSpan(
        trace.SpanContext(
            int(TRACE, 16),
            int(SPAN, 16),
            is_remote=False,
            trace_flags=trace.TraceFlags(flags),
            trace_state=None
            if trace_state is None
            else trace.TraceState.from_header([trace_state]),
        )
    )
    current = baggage.set_baggage("user", "alice") if with_baggage else context.Context()
    mine: dict[str, Any] = {}
    plugin._inject(mine, span, current)
    theirs: dict[str, Any] = {}
    propagate.inject(theirs, context=trace.set_span_in_context(span, current))
    assert mine == theirs


async def ok_under_a_request(app: AsyncQueueTasks, traces: Traces) -> list[Span]:
    """The spans once a task ``ok`` enqueued under a span ``request`` has run."""

    @app.task
    async def ok() -> None: ...

    async with app:
        with traces.tracer.start_as_current_span("request"):
            await ok.add_task(timeout=5)
        return await traces.until(lambda s: bool(named(s, "process ok")))


async def test_a_propagator_of_the_users_own_carries_the_trace(
    monkeypatch: pytest.MonkeyPatch, traces: Traces
) -> None:
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class Renamed(TraceContextTextMapPropagator):
        """W3C trace context under other header names: not the default the plugin reads and
        writes itself."""

        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            inner: dict[str, str] = {}
            super().inject(inner, context)
            carrier.update({f"x-{k}": v for k, v in inner.items()})

        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            inner = {k[2:]: v for k, v in carrier.items() if k.startswith("x-")}
            return super().extract(inner, context)

        @property
        def fields(self) -> set[str]:
            return {"x-traceparent", "x-tracestate"}

    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", CompositePropagator([Renamed()]))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=traces.provider))
    headers = Headers()
    app.add_plugin(headers)

    spans = await ok_under_a_request(app, traces)
    assert set(headers.seen[0]) == {"x-traceparent"}
    assert_child(one(spans, "process ok"), one(spans, "send ok"))


async def test_with_the_default_propagator_the_plugin_reads_and_writes_w3c_itself(
    monkeypatch: pytest.MonkeyPatch, app: AsyncQueueTasks, traces: Traces
) -> None:
    from opentelemetry import propagate

    def not_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the propagator was called")

    monkeypatch.setattr(propagate, "inject", not_called)
    monkeypatch.setattr(propagate, "extract", not_called)

    spans = await ok_under_a_request(app, traces)
    assert_child(one(spans, "send ok"), one(spans, "request"))
    assert_child(one(spans, "process ok"), one(spans, "send ok"))


# --- root spans the plugin samples itself ---------------------------------------------------


def ratio_samplers() -> dict[str, Any]:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ParentBased,
        ParentBasedTraceIdRatio,
        TraceIdRatioBased,
    )

    return {
        "parent-based ratio": ParentBased(TraceIdRatioBased(0.5)),
        "ParentBasedTraceIdRatio": ParentBasedTraceIdRatio(0.3),
        "ratio alone": TraceIdRatioBased(0.7),
        "parent-based off": ParentBased(ALWAYS_OFF),
        "off": ALWAYS_OFF,
    }


@pytest.mark.parametrize("with_baggage", [False, True])
@pytest.mark.parametrize("sampler", list(ratio_samplers()))
def test_a_root_the_plugin_samples_itself_is_what_the_sdk_would_make(
    sampler: str, with_baggage: bool
) -> None:
    """The same draws of ``random`` (the SDK's id generator) give the same headers, span for
    span, whether the SDK starts every root span or the plugin decides them; the roots kept
    are recorded (by the SDK, with the trace id the plugin drew), the others are not."""
    import random

    from opentelemetry import baggage, context, propagate
    from opentelemetry.sdk.trace import TracerProvider

    def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        made = TracerProvider(sampler=ratio_samplers()[sampler])
        made.add_span_processor(SimpleSpanProcessor(exporter))
        return made, exporter

    current = baggage.set_baggage("user", "alice") if with_baggage else context.Context()
    n = 200
    sdk, sdk_spans = provider()
    tracer = sdk.get_tracer("qtasks_web.tracing")
    random.seed(12)
    theirs: list[dict[str, Any]] = []
    for _ in range(n):
        span = tracer.start_span("send t", context=current, kind=trace.SpanKind.PRODUCER)
        headers: dict[str, Any] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span, current))
        theirs.append(headers)
        span.end()

    mine_provider, mine_spans = provider()
    plugin = TracingPlugin(tracer_provider=mine_provider)
    assert plugin._root_sampling() is not None  # answered here (its one probe drawn first)
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))  # never started
    token = context.attach(current)
    try:
        random.seed(12)
        mine: list[dict[str, Any]] = []
        for i in range(n):
            message = Message(
                uuid=f"m{i}", task_name="t", args=[], kwargs={}, priority=0, created_at=0.0
            )
            assert plugin.qtasks_task_enqueue(app, message) is message
            mine.append(message.headers)
            if message.uuid in plugin._sending:  # a kept root: its span ends as stored
                plugin._sending.pop(message.uuid).end()
    finally:
        context.detach(token)
    assert mine == theirs
    kept = [int(h["traceparent"][-2:], 16) & 0x01 for h in theirs]
    recorded = sorted(s.context.trace_id for s in mine_spans.get_finished_spans())
    assert recorded == sorted(s.context.trace_id for s in sdk_spans.get_finished_spans())
    assert len(recorded) == sum(kept)
    if "off" in sampler:
        assert recorded == []
    else:
        assert 0 < len(recorded) < n  # both kinds of root were made


def test_roots_the_plugin_cannot_answer_for_go_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    from qtasks_web.sampling import Roots

    class Mine(TraceIdRatioBased):
        """A ratio sampler of the user's own (a subclass: its decisions may differ)."""

    assert Roots.of(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1))), "t") is not None
    assert Roots.of(TracerProvider(sampler=ParentBased(Mine(0.1))), "t") is None
    assert Roots.of(TracerProvider(sampler=ParentBased(ALWAYS_ON)), "t") is None
    assert Roots.of(TracerProvider(sampler=TraceIdRatioBased(1.0)), "t") is None  # all kept
    assert Roots.of(trace.NoOpTracerProvider(), "t") is None
    # The SDK's own span metrics count the spans it drops: then it makes every one.
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    assert Roots.of(TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1))), "t") is None


def exported(sampler: Any) -> tuple[TracerProvider, InMemorySpanExporter]:
    """An SDK provider with ``sampler`` whose finished spans the test reads."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def flags_of(headers: dict[str, Any]) -> int:
    return int(headers["traceparent"][-2:], 16)


async def test_a_dropped_root_and_the_runs_under_it_build_nothing_for_a_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An enqueue outside any trace whose root the plugin drops itself, and the run under
    it (which ParentBased drops too), never build the attributes a sampler is given: no
    sampler is asked."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    import qtasks_web.tracing as tracing

    built: list[tuple[str, str]] = []
    for_sampler = tracing._for_sampler

    def counted(operation: str, task_name: str) -> dict[str, Any]:
        built.append((operation, task_name))
        return for_sampler(operation, task_name)

    monkeypatch.setattr(tracing, "_for_sampler", counted)
    provider, spans = exported(ParentBased(TraceIdRatioBased(0.0)))  # every root dropped
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)

    @app.task
    async def ok() -> None: ...

    async with app:
        for _ in range(3):
            await ok.add_task(timeout=5)
    await app.aclose()
    assert [flags_of(h) & 0x01 for h in headers.seen] == [0, 0, 0]
    assert built == []
    assert spans.get_finished_spans() == ()


async def parent_then_child(
    app: AsyncQueueTasks, parent: Any, done: anyio.Event, headers: Headers
) -> list[dict[str, Any]]:
    """Run ``parent``, whose child sets ``done``; the headers each of the two arrived with."""
    async with app:
        await parent.add_task(timeout=5)
        with anyio.fail_after(5):
            await done.wait()
    await app.aclose()
    return headers.seen


async def test_an_unsampled_root_keeps_its_trace_and_flags_through_a_child_task() -> None:
    """A root dropped by the recommended sampler (at a rate of 0: every root) goes on as it
    was made: the parent task's code, the child it enqueues, the child's code and a call the
    child makes to another service (the propagator's headers) all carry its trace id, its
    span id (no span is made under it) and its flags, the sampled bit off."""
    from opentelemetry import propagate
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider, spans = exported(ParentBased(TraceIdRatioBased(0.0)))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)
    seen: dict[str, tuple[int, int, bool, int]] = {}
    downstream: dict[str, Any] = {}
    done = anyio.Event()

    def current() -> tuple[int, int, bool, int]:
        span_context = trace.get_current_span().get_span_context()
        return (*traceparent(span_context), int(span_context.trace_flags))

    @app.task
    async def parent() -> None:
        seen["parent"] = current()
        await app.add_task("child")

    @app.task
    async def child() -> None:
        seen["child"] = current()
        propagate.inject(downstream)
        done.set()

    parent_headers, child_headers = await parent_then_child(app, parent, done, headers)
    made = header_ids(parent_headers)
    assert made[0] != 0 and flags_of(parent_headers) & 0x01 == 0
    assert child_headers == parent_headers == {"traceparent": downstream["traceparent"]}
    assert seen["parent"] == seen["child"] == (*made, True, flags_of(parent_headers))
    assert spans.get_finished_spans() == ()


async def test_a_tasks_own_span_under_an_unsampled_trace_stays_in_it_unsampled() -> None:
    """The run under a dropped root makes no span of its own, yet a span the task's code
    starts joins the producer's trace: the same trace id, a span id of its own, the sampled
    bit off, nothing exported; and a task enqueued inside that span carries the trace on."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider, spans = exported(ParentBased(TraceIdRatioBased(0.0)))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)
    seen: dict[str, Any] = {}
    done = anyio.Event()

    @app.task
    async def parent() -> None:
        seen["current"] = trace.get_current_span().get_span_context()
        with provider.get_tracer("user").start_as_current_span("work") as work:
            seen["work"] = work.get_span_context()
            seen["recording"] = work.is_recording()
            await app.add_task("child")

    @app.task
    async def child() -> None:
        done.set()

    parent_headers, child_headers = await parent_then_child(app, parent, done, headers)
    trace_id, span_id = header_ids(parent_headers)
    assert (seen["current"].trace_id, seen["current"].span_id) == (trace_id, span_id)
    work = seen["work"]
    assert work.trace_id == trace_id and work.span_id not in (0, span_id)
    assert not work.trace_flags.sampled and not work.is_remote and not seen["recording"]
    assert header_ids(child_headers)[0] == trace_id
    assert flags_of(child_headers) & 0x01 == 0
    assert spans.get_finished_spans() == ()


def test_a_traceparent_the_plugin_reads_is_parsed_when_asked() -> None:
    """The worker's read of a plain ``traceparent`` keeps its flags and defers the ids: a
    run under an unsampled trace whose code asks nothing parses neither; asked, its span
    context is the propagator's, built once."""
    from opentelemetry import propagate

    from qtasks_web.w3c import RemoteParent, read

    carrier = {"traceparent": f"00-{TRACE}-{SPAN}-02"}
    remote = read(carrier)
    assert type(remote) is RemoteParent
    assert remote.flags == trace.TraceFlags(2) and remote.header == carrier["traceparent"]
    assert remote._made is None  # nothing parsed yet
    made = remote.get_span_context()
    assert made == trace.get_current_span(propagate.extract(carrier)).get_span_context()
    assert remote.get_span_context() is made


async def test_a_dropped_root_goes_through_a_propagator_of_the_users_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plugin writes and reads a root's ``traceparent`` itself only with the API's
    default propagator: with another (here the W3C one, subclassed to count its calls) the
    propagator writes and reads every header, and the trace goes on as it does with the
    default."""
    from opentelemetry import propagate
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    calls: list[str] = []

    class Counted(TraceContextTextMapPropagator):
        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            calls.append("inject")
            super().inject(carrier, context)

        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            calls.append("extract")
            return super().extract(carrier, context)

    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", CompositePropagator([Counted()]))
    provider, spans = exported(ParentBased(TraceIdRatioBased(0.0)))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)
    seen: list[int] = []

    @app.task
    async def ok() -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    async with app:
        await ok.add_task(timeout=5)
    await app.aclose()
    assert calls == ["inject", "extract"]
    assert flags_of(headers.seen[0]) & 0x01 == 0
    assert seen == [header_ids(headers.seen[0])[0]]
    assert spans.get_finished_spans() == ()


async def test_a_root_the_plugin_keeps_is_recorded_with_every_attribute() -> None:
    """Roots decided by the plugin (a ratio of 0.5, enqueued until one was kept and one
    dropped): a kept one is the SDK's recorded span, with every attribute, and the run
    span under it too; a dropped one records nothing."""
    import random

    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider, exporter = exported(ParentBased(TraceIdRatioBased(0.5)))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    headers = Headers()
    app.add_plugin(headers)

    @app.task
    async def ok() -> None: ...

    random.seed(20)  # the SDK's id generator draws from random: the same roots each run
    tasks: dict[int, Any] = {}  # by the sampled bit of their header
    async with app:
        for _ in range(64):  # both kinds at 0.5 long before this
            task = await ok.add_task(timeout=5)
            tasks.setdefault(flags_of(headers.seen[-1]) & 0x01, task)
            if len(tasks) == 2:
                break
    await app.aclose()
    assert set(tasks) == {0, 1}
    spans = [span_dict(s) for s in exporter.get_finished_spans()]
    kept = tasks[1]
    send, process = one(spans, "send ok"), one(spans, "process ok")
    assert len(spans) == 2  # the dropped root's trace recorded nothing
    assert_child(process, send)
    assert send["parent_id"] is None
    assert send["attributes"] == send_attributes("ok", kept.uuid)
    assert process["attributes"] == process_attributes("ok", kept.uuid, app.worker.id)


async def test_with_the_sdks_span_metrics_on_it_is_asked_under_an_unsampled_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    from qtasks_web.sampling import drops_unsampled

    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    assert drops_unsampled(provider)
    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    assert not drops_unsampled(provider)


def test_apps_sharing_a_provider_share_one_id_generator_wrapper_and_threads_do_not_mix() -> None:
    """Newer SDKs hand every caller asking for one instrumentation scope the same tracer: the
    plugins of a thousand apps on one provider wrap its id generator once (before, each
    wrapped the previous one, until the enqueue hook hit the recursion limit), and a trace id
    handed over in one thread is never taken by another."""
    import threading

    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from qtasks_web.sampling import _Preset

    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.01))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))  # never started
    for i in range(1_100):
        plugin = TracingPlugin(tracer_provider=provider)
        message = Message(uuid=f"m{i}", task_name="t", args=[], kwargs={}, priority=0)
        assert plugin.qtasks_task_enqueue(app, message) is message
        assert message.headers["traceparent"].startswith("00-")
        roots = plugin._root_sampling()
        assert roots is not None
        ids = roots._ids  # the tracer's id generator, wrapped once
        assert isinstance(ids, _Preset) and not isinstance(ids.inner, _Preset)

    ids.hand(0xABC)
    elsewhere: list[int] = []
    thread = threading.Thread(target=lambda: elsewhere.append(ids.generate_trace_id()))
    thread.start()
    thread.join()
    assert elsewhere[0] != 0xABC  # the other thread drew its own
    assert ids.generate_trace_id() == 0xABC  # this thread's, once
    assert ids.generate_trace_id() != 0xABC


def test_dropped_roots_take_their_ids_from_the_providers_own_id_generator() -> None:
    """With the SDK's default id generator the plugin draws a dropped root's ids from
    ``random`` itself (as that generator does, see the test above); with an id generator of
    the user's own, the ids in the header are that generator's."""
    import random

    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Counting(IdGenerator):
        def __init__(self) -> None:
            self.trace_ids: list[int] = []
            self.span_ids: list[int] = []

        def generate_trace_id(self) -> int:
            self.trace_ids.append((len(self.trace_ids) + 1) << 70 | 7)
            return self.trace_ids[-1]

        def generate_span_id(self) -> int:
            self.span_ids.append(len(self.span_ids) + 1000)
            return self.span_ids[-1]

    default = TracingPlugin(
        tracer_provider=TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    )
    roots = default._root_sampling()
    assert roots is not None and roots.bits == random.getrandbits

    ids = Counting()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)), id_generator=ids)
    plugin = TracingPlugin(tracer_provider=provider)
    roots = plugin._root_sampling()
    assert roots is not None and roots.bits is None
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"]))  # never started
    written = []
    for i in range(3):
        message = Message(uuid=f"m{i}", task_name="t")
        assert plugin.qtasks_task_enqueue(app, message) is message
        written.append(message.headers["traceparent"])
    assert written == [
        f"00-{trace_id:032x}-{span_id:016x}-{roots.flags:02x}"
        for trace_id, span_id in zip(ids.trace_ids[-3:], ids.span_ids[-3:], strict=True)
    ]


def test_the_context_a_run_attaches_is_the_apis_current_and_a_bad_detach_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The plugin's attach and detach are the API's (with its default runtime context): what
    it attaches is ``context.get_current()``, its detach restores the context before; a
    token of another context is logged, not raised, as the API's detach does."""
    import contextvars

    from opentelemetry import context

    from qtasks_web.w3c import attach, detach, get_current

    before = context.get_current()
    made = context.set_value("k", "v")
    token = attach(made)
    try:
        assert context.get_current() is made and get_current() is made
    finally:
        detach(token)
    assert context.get_current() is before and get_current() is before

    elsewhere = contextvars.copy_context().run(attach, made)
    with caplog.at_level("ERROR", logger="qtasks.web"):
        detach(elsewhere)
    assert "failed to detach" in caplog.text
    assert context.get_current() is before
