"""The bad-input contract suite: :class:`BadInputContract`.

A worker of any backend fed what no retry can mend (undecodable or oversized bytes, fuzzed
messages, wrong arguments) or a plugin that raises: every message is settled as it should be,
nothing is unpickled, and the worker keeps serving.

Over ~500 lines: a contract suite is a list of tests, one per guarantee, and the fuzz test's
message maker (:class:`Fuzz`) lives beside the one test that uses it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar

import anyio
import pytest

from qtasks.app import AsyncQueueTasks
from qtasks.components import DeadLetter, Delivery
from qtasks.config import QueueConfig
from qtasks.messages import Codec, Envelope, Message
from qtasks.plugins import hookimpl
from qtasks.record import TaskRecord, TaskStatus, record_of
from qtasks_testing.contract._base import ContractSuite
from qtasks_testing.contract.broker import BrokerFactory
from qtasks_testing.contract.storage import StorageFactory


class Outcomes:
    """A plugin recording how each message was settled, by id, and waking waiters."""

    def __init__(self) -> None:
        self.rejected: dict[str, str] = {}
        self.succeeded: dict[str, Any] = {}
        self.failed: dict[str, str] = {}
        self._changed = anyio.Event()

    def _note(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @hookimpl
    def qtasks_task_rejected(self, delivery: Delivery, reason: str) -> None:
        self.rejected[delivery.id] = reason
        self._note()

    @hookimpl
    def qtasks_task_succeeded(self, record: TaskRecord) -> None:
        self.succeeded[record.uuid] = record.returning
        self._note()

    @hookimpl
    def qtasks_task_failed(self, record: TaskRecord) -> None:
        self.failed[record.uuid] = record.error or ""
        self._note()

    def settled(self) -> set[str]:
        return {*self.rejected, *self.succeeded, *self.failed}

    async def wait(self, ids: set[str], *, timeout: float) -> None:
        """Wait until every message of ``ids`` is settled; fail after ``timeout``."""
        with anyio.move_on_after(timeout):
            while not ids <= self.settled():
                await self._changed.wait()
            return
        missing = sorted(ids - self.settled())
        pytest.fail(
            f"{len(missing)} of {len(ids)} messages not settled in {timeout} s: {missing[:5]}"
        )


class PickleCalls:
    """Replaces ``pickle.loads``/``load``/``Unpickler`` (and ``_pickle``'s): each call is
    recorded and raises."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        modules: list[Any] = [pickle]
        try:
            import _pickle

            modules.append(_pickle)
        except ImportError:  # pragma: no cover - another interpreter
            pass
        for module in modules:
            for name in ("loads", "load", "Unpickler"):
                monkeypatch.setattr(module, name, self._refuse(f"{module.__name__}.{name}"))

    def _refuse(self, name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            raise AssertionError(f"{name} called on bad input")

        return refused


def raw(id: str, task: str, *args: Any, **kwargs: Any) -> Envelope:
    """A message put into a broker as a producer without the task would (no record, no
    check of the arguments)."""
    message = Message(uuid=id, task_name=task, args=list(args), kwargs=kwargs)
    return Codec(max_size=1 << 30).encode(message)


def fresh(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


UNDECODABLE_REASON = "undecodable message: "
"""How the reason of a message the codec cannot read starts."""


class BadInputContract(ContractSuite):
    """Bad input reaching a worker, as tests (the plan's B2 to B5 and F18).

    Provide ``broker_factory`` and ``storage_factory`` fixtures, as for
    :class:`~qtasks_testing.contract.LeaseLengthContract`: each test runs a worker app on them
    and puts bad bodies straight into the broker (``Broker.publish``). ``fuzz_bad`` and
    ``fuzz_valid`` size the fuzz test; its seed is printed, and ``QTASKS_FUZZ_SEED`` replays
    one.
    """

    fuzz_bad: ClassVar[int] = 2000
    fuzz_valid: ClassVar[int] = 200
    settle_timeout: ClassVar[float] = 60.0

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def pickle_calls(self, monkeypatch: pytest.MonkeyPatch) -> PickleCalls:
        return PickleCalls(monkeypatch)

    @asynccontextmanager
    async def worker(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        config: QueueConfig,
    ) -> AsyncIterator[tuple[AsyncQueueTasks, Outcomes]]:
        """A serving app with the tasks ``add``, ``echo`` and ``add_retried`` (retry=3)."""
        app = AsyncQueueTasks(
            f"contract-bad-input-{uuid.uuid4().hex[:8]}",
            broker=broker_factory(config),
            storage=storage_factory(config),
            config=config,
        )
        app.runs = []  # type: ignore[attr-defined]  # add_retried's runs, for the test

        @app.task
        async def add(a: int, b: int) -> int:
            return a + b

        @app.task
        async def echo(value: Any) -> Any:
            return value

        @app.task(retry=3, retry_backoff=0)
        async def add_retried(a: int, b: int) -> int:
            app.runs.append((a, b))  # type: ignore[attr-defined]
            return a + b

        outcomes = Outcomes()
        app.add_plugin(outcomes, name="outcomes")
        async with app:
            yield app, outcomes

    async def serving(self, app: AsyncQueueTasks) -> None:
        """The worker still runs a task it is given."""
        done = await app.add_task("add", 20, 22, timeout=10)
        assert (done.status, done.returning) == (TaskStatus.SUCCESS, 42)

    async def letters(self, app: AsyncQueueTasks, ids: set[str]) -> dict[str, DeadLetter]:
        found = await app.broker.dead_letters(limit=len(ids) + 1000)
        return {letter.id: letter for letter in found if letter.id in ids}

    # --- B2 / S1: undecodable bodies, never unpickled --------------------------------------

    @pytest.mark.anyio
    async def test_undecodable_bodies_are_dead_lettered_and_never_unpickled(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        pickle_calls: PickleCalls,
    ) -> None:
        """Random bytes, cut JSON and pickles (of a message's mapping, and of a ``Message``)
        put straight into the queue: each is dead-lettered on its first delivery, with the
        decode error, body intact; ``pickle`` is never called; the valid tasks between them
        run."""
        rng = random.Random(7)
        valid = raw("x", "add", 1, 2).body
        wire = Message(uuid="p", task_name="add", args=[1, 2]).to_wire()
        bodies = {
            "random": bytes(rng.randrange(256) for _ in range(64)),
            "random-long": os.urandom(4096),
            "cut-json": valid[: len(valid) // 2],
            "cut-json-1": valid[:-1],
            "pickle-wire": pickle.dumps(wire),
            "pickle-wire-0": pickle.dumps(wire, protocol=0),
            "pickle-message": pickle.dumps(Message(uuid="p", task_name="add", args=[1, 2])),
        }
        async with self.worker(broker_factory, storage_factory, contract_config) as (app, seen):
            bad: dict[str, bytes] = {}
            good: dict[str, int] = {}
            for i, (kind, body) in enumerate(bodies.items()):
                id = fresh(kind)
                bad[id] = body
                await app.broker.publish(Envelope(id=id, body=body))
                ok = fresh("valid")
                good[ok] = i
                await app.broker.publish(raw(ok, "add", i, 1))
            await seen.wait({*bad, *good}, timeout=self.settle_timeout)
            succeeded = dict(seen.succeeded)
            letters = await self.letters(app, set(bad))
            await self.serving(app)
        assert pickle_calls.calls == []
        assert {id: seen.rejected.get(id, "")[: len(UNDECODABLE_REASON)] for id in bad} == {
            id: UNDECODABLE_REASON for id in bad
        }
        assert {id: (letter.body, letter.deliveries) for id, letter in letters.items()} == {
            id: (body, 1) for id, body in bad.items()
        }
        assert succeeded == {id: i + 1 for id, i in good.items()}

    # --- B3: fuzzed messages into a live queue ----------------------------------------------

    @pytest.mark.anyio
    async def test_fuzzed_messages_are_dead_lettered_and_valid_ones_run(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        pickle_calls: PickleCalls,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """``fuzz_bad`` random or mutated messages (see :class:`Fuzz`), each made so that it
        cannot run, interleaved with ``fuzz_valid`` valid ones (some with huge numbers or
        deep nesting in their arguments): every bad one is dead-lettered, every valid one
        runs once and succeeds, the worker never fails (no "worker failed", no traceback)
        and serves on."""
        seed = int(os.environ.get("QTASKS_FUZZ_SEED") or random.randrange(2**32))
        print(f"fuzz seed: {seed} (QTASKS_FUZZ_SEED={seed} replays it)")
        fuzz = Fuzz(random.Random(seed))
        bad: dict[str, tuple[str, bytes]] = {}
        good: dict[str, Any] = {}
        plan: list[Envelope] = []
        recorded: list[TaskRecord] = []  # as a producer with the task stores them
        every = max(1, self.fuzz_bad // max(1, self.fuzz_valid))
        for i in range(self.fuzz_bad):
            id = f"fuzz-{seed}-{i}"
            kind, body = fuzz.bad(id)
            bad[id] = (kind, body)
            plan.append(Envelope(id=id, body=body))
            if i % 3 == 0:
                recorded.append(record_of(Message(uuid=id, task_name="add", args=[1, 2])))
            if i % every == 0 and len(good) < self.fuzz_valid:
                ok = f"fuzz-{seed}-valid-{len(good)}"
                value = fuzz.valid_value()
                good[ok] = value
                plan.append(raw(ok, "echo", value))
        config = replace(contract_config, max_message_size=1 << 22)
        with caplog.at_level(logging.ERROR, logger="qtasks"):
            async with self.worker(broker_factory, storage_factory, config) as (app, seen):
                for record in recorded:
                    await app.storage.add(record)
                for item in plan:
                    await app.broker.publish(item)
                await seen.wait({*bad, *good}, timeout=self.settle_timeout)
                succeeded, failed = dict(seen.succeeded), dict(seen.failed)
                ended = [await app.get(record.uuid) for record in recorded]
                await self.serving(app)
        assert pickle_calls.calls == []
        kinds: dict[str, int] = {}
        for kind, _ in bad.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        print(f"fuzz: {len(bad)} bad messages by kind: {kinds}; {len(good)} valid")
        wrongly = {id: bad[id][0] for id in bad if id not in seen.rejected}
        assert wrongly == {}, "bad messages that were not dead-lettered"
        assert len([id for id in seen.rejected if id in bad]) == self.fuzz_bad
        assert failed == {}
        assert succeeded == good
        assert [r.status if r else None for r in ended] == [TaskStatus.ERROR] * len(recorded)
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
        assert tracebacks == []
        assert not [r for r in caplog.records if "worker failed" in r.getMessage()]

    # --- B4: wrong arguments ------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_wrong_arguments_fail_after_one_delivery_without_a_retry(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
    ) -> None:
        """A task with ``retry=3`` sent arguments that do not fit its signature (by a producer
        that does not have it): its record ends ``error`` naming the task and the parameter,
        its message is dead-lettered after one delivery, and the task never ran."""
        calls = {
            "missing": ((1,), {}, "task 'add_retried': missing a required argument: 'b'"),
            "extra": ((1, 2, 3), {}, "task 'add_retried': too many positional arguments"),
            "unknown-keyword": (
                (1, 2),
                {"c": 3},
                "task 'add_retried': got an unexpected keyword argument 'c'",
            ),
            "twice": ((1, 2), {"a": 3}, "task 'add_retried': multiple values for argument 'a'"),
        }
        async with self.worker(broker_factory, storage_factory, contract_config) as (app, seen):
            ids = {fresh(name): call for name, call in calls.items()}
            for id, (args, kwargs, _) in ids.items():
                await app.broker.publish(raw(id, "add_retried", *args, **kwargs))
            await seen.wait(set(ids), timeout=self.settle_timeout)
            records = {id: await app.wait(id, timeout=10) for id in ids}
            letters = await self.letters(app, set(ids))
            await self.serving(app)
            assert app.runs == []  # type: ignore[attr-defined]
        expected = {id: f"wrong arguments: {says}" for id, (_, _, says) in ids.items()}
        assert {id: seen.rejected[id] for id in ids} == expected
        assert {id: (r.status, r.error) for id, r in records.items()} == {
            id: (TaskStatus.ERROR, says) for id, says in expected.items()
        }
        # Never run: no attempt started (attempt 0), one delivery, then the dead letter.
        assert {id: r.attempt for id, r in records.items()} == dict.fromkeys(ids, 0)
        assert {id: letter.deliveries for id, letter in letters.items()} == dict.fromkeys(ids, 1)

    # --- B1: what a rejection logs --------------------------------------------------------

    @pytest.mark.anyio
    async def test_a_rejection_logs_the_task_and_the_id_never_the_arguments(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Messages that cannot run, whose arguments hold a secret-looking value: an unknown
        task, wrong arguments for a known one, and bodies whose JSON reads but whose fields
        do not (so they are undecodable with the arguments in plain view). Each is
        dead-lettered with an ERROR line naming its id (and the task, when the message was
        read), and the secret appears in no log record (qtasks's at any level, the others'
        from INFO): not in its message, its arguments, nor its exception's text. Arguments
        may carry secrets."""
        secret = f"hunter2-{uuid.uuid4().hex}"
        named = {
            fresh("unknown"): ("no_such_task", raw("", "no_such_task", secret, token=secret)),
            fresh("wrong-args"): ("add_retried", raw("", "add_retried", secret, 1, 2)),
            fresh("wrong-kwargs"): ("add_retried", raw("", "add_retried", 1, 2, token=secret)),
        }
        wire = Message(uuid="", task_name="add", args=[secret], kwargs={"token": secret})
        partly: dict[str, dict[str, Any]] = {
            fresh("bad-priority"): {"priority": "high"},
            fresh("bad-version"): {"v": 99},
            fresh("bad-headers"): {"headers": [secret]},
            fresh("bad-created-at"): {"created_at": "yesterday"},
        }
        bodies: dict[str, bytes] = {}
        for id, (_, envelope) in named.items():
            data = json.loads(envelope.body)
            bodies[id] = json.dumps({**data, "uuid": id}).encode()
        for id, change in partly.items():
            bodies[id] = json.dumps({**wire.to_wire(), "uuid": id, **change}).encode()
        assert all(secret.encode() in body for body in bodies.values())
        # qtasks's loggers at DEBUG, every other at INFO: aiormq's DEBUG dumps each frame it
        # sends, bodies included (what an operator turning on a client's wire log asks for).
        with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, logger="qtasks"):
            async with self.worker(broker_factory, storage_factory, contract_config) as (
                app,
                seen,
            ):
                for id, body in bodies.items():
                    await app.broker.publish(Envelope(id=id, body=body))
                await seen.wait(set(bodies), timeout=self.settle_timeout)
                await self.serving(app)
        assert set(seen.rejected) >= set(bodies)
        assert not any(secret in reason for reason in seen.rejected.values())
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        lines = {id: [line for line in errors if id in line] for id in bodies}
        assert {id: len(found) >= 1 for id, found in lines.items()} == dict.fromkeys(bodies, True)
        assert {
            id: any(repr(task) in line for line in lines[id]) for id, (task, _) in named.items()
        } == dict.fromkeys(named, True)
        formatter = logging.Formatter()
        leaks = [
            record.name
            for record in caplog.records
            if secret in formatter.format(record)
            or secret in str(record.msg)
            or secret in repr(record.args)
        ]
        assert leaks == [], "log records holding a task's arguments"

    # --- B5: an oversized message, consumer side ----------------------------------------------

    @pytest.mark.anyio
    async def test_an_oversized_message_is_dead_lettered_unread(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
    ) -> None:
        """A message over ``max_message_size`` put straight into the broker (a producer with
        a higher limit): dead-lettered with "message too large" on its first delivery, its
        body intact and never handed to the serializer; the task never runs."""
        limit = 2000
        config = replace(contract_config, max_message_size=limit)
        async with self.worker(broker_factory, storage_factory, config) as (app, seen):
            decoded: list[int] = []
            loads = app.codec.serializer.loads

            def recording(data: bytes) -> Any:
                decoded.append(len(data))
                return loads(data)

            app.codec.serializer.loads = recording  # type: ignore[method-assign]
            big = raw(fresh("big"), "echo", "x" * (limit * 3))
            await app.broker.publish(big)
            small = raw(fresh("small"), "echo", "fits")
            await app.broker.publish(small)
            await seen.wait({big.id, small.id}, timeout=self.settle_timeout)
            letters = await self.letters(app, {big.id})
            await self.serving(app)
        size = len(big.body)
        assert seen.rejected == {
            big.id: f"message too large: encoded message is {size} bytes, above "
            f"max_message_size={limit}"
        }
        assert (letters[big.id].body, letters[big.id].deliveries) == (big.body, 1)
        assert seen.succeeded[small.id] == "fits"
        assert decoded and max(decoded) <= limit

    # --- a stored record, and an attempt no count holds ------------------------------------

    @pytest.mark.anyio
    async def test_an_attempt_too_large_for_a_double_is_settled_as_any_other(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
    ) -> None:
        """Messages whose record a producer stored, with an ``attempt`` beyond a double's
        exact integers (or a fraction, or one that reads as infinity): the whole numbers run
        and count one more attempt, exactly; the others are dead-lettered as undecodable. On
        Redis the claim that begins the record wrote ``1e+30`` as its attempt, which the
        claim's reply could not be read with: the worker's consumer died."""
        ids = {fresh(str(n)): n for n in (10**30, 2**53 + 1, 2**64)}
        odd = {fresh("fraction"): b"1.5", fresh("infinite"): b"1e400"}
        async with self.worker(broker_factory, storage_factory, contract_config) as (app, seen):
            for id, attempt in ids.items():
                message = Message(uuid=id, task_name="add", args=[attempt, 1], attempt=attempt)
                await app.storage.add(record_of(message))
                await app.broker.publish(Codec(max_size=1 << 20).encode(message))
            for id, attempt_text in odd.items():
                message = Message(uuid=id, task_name="add", args=[1, 2])
                await app.storage.add(record_of(message))
                body = (
                    Codec()
                    .encode(message)
                    .body.replace(b'"attempt":0', b'"attempt":' + attempt_text)
                )
                await app.broker.publish(Envelope(id=id, body=body))
            await seen.wait({*ids, *odd}, timeout=self.settle_timeout)
            records = {id: await app.wait(id, timeout=10) for id in {*ids, *odd}}
            await self.serving(app)
        assert {
            id: (records[id].status, records[id].returning, records[id].attempt) for id in ids
        } == {id: (TaskStatus.SUCCESS, n + 1, n + 1) for id, n in ids.items()}
        assert {id: seen.rejected.get(id) for id in odd} == dict.fromkeys(
            odd, "undecodable message: message fields 'priority'/'attempt' must be integers"
        )
        assert {id: records[id].status for id in odd} == dict.fromkeys(odd, TaskStatus.ERROR)

    # --- F18: plugin hooks that raise ------------------------------------------------------

    @pytest.mark.anyio
    async def test_plugin_hooks_that_raise_lose_no_task(
        self,
        broker_factory: BrokerFactory,
        storage_factory: StorageFactory,
        contract_config: QueueConfig,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A plugin raising in every before and after hook of execution: each task still
        settles as it would without it (success with its result, or ``error``), none is lost
        or retried, the broker is left with nothing in flight, and each raise is logged as
        an ERROR naming the plugin and the hook (one line per raise: every event, not once
        per hook)."""
        hooks = (
            "qtasks_worker_execute_before",
            "qtasks_executor_execute_before",
            "qtasks_executor_execute_after",
            "qtasks_worker_execute_after",
        )
        count = 30
        async with self.worker(broker_factory, storage_factory, contract_config) as (app, seen):
            app.add_plugin(Raising(), name="raising")
            with caplog.at_level(logging.ERROR, logger="qtasks.plugins"):
                sent = [await app.add_task("add", i, 1) for i in range(count)]
                failing = [await app.add_task("add", "a", 1) for _ in range(count // 3)]
                ids = {t.uuid for t in sent} | {t.uuid for t in failing}
                await seen.wait(ids, timeout=self.settle_timeout)
                records = [await app.wait(t.uuid, timeout=10) for t in sent + failing]
            stats = await app.broker.stats()
        assert [(r.status, r.returning, r.attempt) for r in records[:count]] == [
            (TaskStatus.SUCCESS, i + 1, 1) for i in range(count)
        ]
        assert [(r.status, r.attempt) for r in records[count:]] == [(TaskStatus.ERROR, 1)] * (
            count // 3
        )
        assert (stats.in_flight, sum(stats.ready_by_priority.values()), stats.delayed) == (0, 0, 0)
        lines = [r.getMessage() for r in caplog.records if r.name == "qtasks.plugins"]
        per_hook = {
            hook: sum(line.startswith(f"plugin 'raising' failed in hook {hook} ") for line in lines)
            for hook in hooks
        }
        # execute_after of the executor fires only for a task that returned.
        ran = count + count // 3
        assert per_hook == {
            "qtasks_worker_execute_before": ran,
            "qtasks_executor_execute_before": ran,
            "qtasks_executor_execute_after": count,
            "qtasks_worker_execute_after": ran,
        }
        assert all("RuntimeError: plugin bug" in line for line in lines), lines[:3]


class Raising:
    """A plugin whose execution hooks all raise."""

    @hookimpl
    def qtasks_worker_execute_before(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    async def qtasks_executor_execute_before(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def qtasks_executor_execute_after(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    async def qtasks_worker_execute_after(self) -> None:
        raise RuntimeError("plugin bug")


class Fuzz:
    """Random and mutated message bodies, each made so that no worker can run it: the kinds
    are the plan's (random bytes, flipped bytes, cut bodies, fields of the wrong type, huge
    numbers, deep nesting, unknown task names, headers of the wrong type)."""

    WRONG: ClassVar[dict[str, list[Any]]] = {
        # Per field, values a worker must refuse (a missing or falsy "headers" is no headers,
        # a missing "created_at" is now: not wrong).
        "uuid": [None, 1, 1.5, True, [], {}, ["a"], {"a": 1}],
        "task": [None, 1, 1.5, True, [], {}, ["add"], {"add": 1}],
        "args": [None, 1, "ab", True, {}, {"a": 1}],
        "kwargs": [None, 1, "ab", True, [], [1, 2]],
        "priority": [None, 1.5, "1", True, [], {}],
        "attempt": [None, 1.5, "0", False, [], {}],
        "created_at": ["now", [], {}, [1.0], "1e9"],
        "headers": [1, "h", True, [1], 2.5],
        "v": [0, 2, "1", 1.0, True, None, [], 10**30],
    }
    HEADERS: ClassVar[dict[str, list[Any]]] = {
        "expires": ["soon", [], {}, True],
        "unique": [5, "k", ["a"], ["k", 1, 0], [1, 2, 3]],
        "retry": ["many", -1, 1.5, -(10**30), None],
        "parent_uuid": [5, [], {}, 1.5],
        "qtasks.input": [5, [["a"], 5], [{"members": [5, 2, 1]}], {"members": 1}],
    }

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def bad(self, id: str) -> tuple[str, bytes]:
        """A body (its kind, the bytes) that a worker must dead-letter."""
        kind = self.rng.choice(
            ["random", "flipped", "cut", "field", "huge", "deep", "unknown", "header"]
        )
        make: Callable[[str], bytes] = getattr(self, f"_{kind}")
        return kind, make(id)

    def valid_value(self) -> Any:
        """An argument a valid message may carry: odd but fine (huge ints, nesting, text)."""
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:
            return rng.choice([10**30, -(10**40), 2**63, 1e300, -1e-300])
        if kind == 1:
            value: Any = "leaf"
            for _ in range(rng.randrange(1, 60)):
                value = [value] if rng.random() < 0.5 else {"k": value}
            return value
        if kind == 2:
            return "".join(
                chr(rng.choice([0x41, 0xE9, 0x2028, 0x1F600, 0x22, 0x5C])) for _ in range(20)
            )
        return {"n": rng.randrange(10**6), "s": [1, 2.5, None, True, "x"]}

    def _wire(self, id: str) -> dict[str, Any]:
        return Message(uuid=id, task_name="add", args=[1, 2]).to_wire()

    def _dumps(self, data: Any) -> bytes:
        return json.dumps(data).encode()

    def _random(self, id: str) -> bytes:
        return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(0, 300)))

    def _flipped(self, id: str) -> bytes:
        """Bytes of a valid message flipped until it is no JSON any more (told by ``json``,
        not by qtasks' codec)."""
        body = bytearray(self._dumps(self._wire(id)))
        while True:
            for _ in range(self.rng.randrange(1, 4)):
                body[self.rng.randrange(len(body))] ^= self.rng.randrange(1, 256)
            try:
                json.loads(bytes(body))
            except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                return bytes(body)

    def _cut(self, id: str) -> bytes:
        """A valid message cut short: an object's prefix is never JSON."""
        body = self._dumps(self._wire(id)).replace(b" ", b"")
        return body[: self.rng.randrange(len(body))]

    def _field(self, id: str) -> bytes:
        wire = self._wire(id)
        name = self.rng.choice(sorted(self.WRONG))
        wire[name] = self.rng.choice(self.WRONG[name])
        return self._dumps(wire)

    def _huge(self, id: str) -> bytes:
        """Huge numbers where a number is refused: a non-finite ``created_at`` or
        ``expires`` (``1e999`` reads as infinity), a version or retry count past any."""
        wire = self._wire(id)
        choice = self.rng.randrange(5)
        if choice == 0:
            return self._dumps(wire).replace(b'"created_at": ', b'"created_at": 1e999, "x": ', 1)
        if choice == 1:
            wire["headers"] = {"expires": 0}
            return self._dumps(wire).replace(b'"expires": 0', b'"expires": -1e999', 1)
        if choice == 2:
            wire["v"] = self.rng.choice([10**30, -(10**30), 2**64])
        elif choice == 3:  # an attempt no double holds, of a task the worker does not have
            wire["attempt"], wire["task"] = self.rng.choice([10**30, 2**64]), "nope.huge"
            return self._dumps(wire).replace(b": ", b":").replace(b", ", b",")
        else:
            wire["headers"] = {"retry": -self.rng.choice([10**30, 2**64])}
        return self._dumps(wire)

    def _deep(self, id: str) -> bytes:
        """Nested deeper than any parser goes, in the arguments or a header: deeper than
        the interpreter's recursion limit, read when the message is made (a process that
        raised it, as mypy's API does to 2**14, decodes a nesting of 10,000, and a header
        nested that deep is then a valid message, which runs)."""
        low = max(5_000, 2 * sys.getrecursionlimit())
        depth = self.rng.randrange(low, 12 * low)
        nested = b"[" * depth + b"]" * depth
        wire = self._wire(id)
        if self.rng.random() < 0.5:
            wire["args"] = "@@"
        else:
            wire["headers"] = {"trace": "@@"}
        return self._dumps(wire).replace(b'"@@"', nested, 1)

    def _unknown(self, id: str) -> bytes:
        wire = self._wire(id)
        letters = "abcdefghijklmnopqrstuvwxyz_."
        name = "".join(self.rng.choice(letters) for _ in range(self.rng.randrange(1, 30)))
        wire["task"] = self.rng.choice([f"nope.{name}", name + "\u00e9", "", "add " + name])
        return self._dumps(wire)

    def _header(self, id: str) -> bytes:
        wire = self._wire(id)
        name = self.rng.choice(sorted(self.HEADERS))
        wire["headers"] = {name: self.rng.choice(self.HEADERS[name])}
        return self._dumps(wire)
