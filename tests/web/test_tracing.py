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


async def test_an_unsampled_trace_goes_on_without_spans_the_sampler_would_drop() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    class Counting(ParentBased):
        """The SDK's default kind of sampler (never sampling a root here), counting how
        often it is asked."""

        asked = 0

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            Counting.asked += 1
            return super().should_sample(*args, **kwargs)

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=Counting(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0))
    app.add_plugin(TracingPlugin(tracer_provider=provider))
    seen: list[tuple[int, str | None]] = []
    nested = anyio.Event()

    @app.task
    async def outer() -> None:
        seen.append((trace.get_current_span().get_span_context().trace_id, None))
        await app.add_task("inner")

    @app.task
    async def inner() -> None:
        seen.append((trace.get_current_span().get_span_context().trace_id, "inner"))
        nested.set()

    async with app:
        with provider.get_tracer("tests").start_as_current_span("request") as request:
            trace_id = request.get_span_context().trace_id
            assert not request.get_span_context().trace_flags.sampled
            await app.add_task("outer", timeout=5)
        with anyio.fail_after(5):
            await nested.wait()
    await app.aclose()
    # Only the request's root span asked the sampler: send and process spans under an
    # unsampled trace would be dropped, so none was made; the trace went on all the same.
    assert Counting.asked == 1
    assert seen == [(trace_id, None), (trace_id, "inner")]
    assert exporter.get_finished_spans() == ()
