"""What every contract suite shares: the anyio backend, the config, opt-outs and wait helpers."""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import anyio
import pytest

from qtasks.config import QueueConfig

T = TypeVar("T")


class ContractSuite:
    """Base of the contract suites. Subclass a concrete suite, not this class.

    Class attributes a backend may set:

    ``config_overrides``
        Settings merged into the suite's :class:`~qtasks.config.QueueConfig` (for example a
        ``broker_url``). The suite's own timing settings (``lease``, ``max_deliveries``,
        ``result_ttl``) should be left alone: the tests read them back, but a long lease makes the
        suite slow.
    ``not_applicable``
        ``{"test_name": "why this guarantee cannot hold for this backend"}``. Each named test is
        skipped with that reason shown in the report. A reason is required and a name that is not a
        test of the suite is an error, so an opt-out cannot silently outlive a renamed test.
    ``timing_slack``
        Seconds of scheduling noise tolerated where a test checks that something happens
        *promptly* (a due message, a woken waiter): the hard limit of any one round. Raise it
        only for a backend that is slow by design, never to hide polling.
    ``wake_latency``
        Seconds a component may typically take to react to what it must be *woken* by, not
        poll for: a waiting consumer to a publish, ``steps()`` to
        :meth:`~qtasks.components.Storage.add_step`, ``Storage.wait`` to a final save, a
        cancel feed's followers to a cancel (a delayed message's eta has
        ``BrokerContract.due_latency``). The tests measure several rounds, at varied points
        of any poll cycle, and compare the median with it, so a scheduling hiccup or two does
        not fail them; a poller's median is about half its interval, so the default 0.03 fails
        a poll interval of ~0.1 s or more. Raise it only for a backend whose server round
        trip is that slow, never to admit polling.
    """

    config_overrides: ClassVar[Mapping[str, Any]] = {}
    not_applicable: ClassVar[Mapping[str, str]] = {}
    timing_slack: ClassVar[float] = 0.5
    wake_latency: ClassVar[float] = 0.03

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if name.startswith("test_") and inspect.iscoroutinefunction(value):
                setattr(cls, name, plain_failures(value))

    @pytest.fixture
    def anyio_backend(self) -> str:
        """The suites run on asyncio; override with ``"trio"`` for a trio-capable backend."""
        return "asyncio"

    @pytest.fixture
    def contract_config(self) -> QueueConfig:
        """The settings components are started with: a 1 s lease and 3 deliveries at most."""
        base = QueueConfig(lease=1.0, max_deliveries=3, result_ttl=3600.0, prefetch=10)
        return base.merged(**dict(self.config_overrides))

    @pytest.fixture(autouse=True)
    def _contract_opt_out(self, request: pytest.FixtureRequest) -> None:
        tests = {name for name in dir(type(self)) if name.startswith("test_")}
        for name, reason in self.not_applicable.items():
            if name not in tests:
                pytest.fail(
                    f"{type(self).__name__}.not_applicable names {name!r}, which is not a test "
                    "of this contract suite"
                )
            if not isinstance(reason, str) or not reason.strip():
                pytest.fail(f"{type(self).__name__}.not_applicable[{name!r}] needs a reason")
        name = getattr(request.node, "originalname", request.node.name)
        if name in self.not_applicable:
            pytest.skip(f"not applicable to this backend: {self.not_applicable[name]}")


async def wait_until(check: Callable[[], Awaitable[T]], *, timeout: float, what: str) -> T:
    """Re-check ``check`` every 20 ms until it returns a truthy value; fail after ``timeout``.

    For state that a backend exposes only by being asked (stats, dead letters, expired keys):
    the deadline is what the test asserts, the 20 ms is only how often it asks.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.02)


WAKE_ROUNDS = 7
"""How many rounds a test of ``wake_latency`` or ``due_latency`` measures."""


def spread(first: float, last: float, rounds: int = WAKE_ROUNDS) -> list[float]:
    """``rounds`` durations evenly from ``first`` to ``last``: idle times (or delays) that put
    each round's event at a different point of a poll cycle, so no poll interval happens to
    line up with the test's own rhythm."""
    step = (last - first) / (rounds - 1)
    return [first + step * i for i in range(rounds)]


def assert_woken(latencies: Sequence[float], bound: float, what: str) -> None:
    """Fail unless the median of ``latencies`` (seconds) is under ``bound``."""
    median = statistics.median(latencies)
    rounds = ", ".join(f"{latency * 1000:.0f}" for latency in latencies)
    assert median < bound, (
        f"{what}: median latency {median * 1000:.0f} ms, not under {bound * 1000:.0f} ms "
        f"(polled rather than woken?); rounds in ms: {rounds}"
    )


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``, through nested exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def single_failure(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a task group wrapped (a failed assertion in the test's own code while
    the helper tasks were cancelled), or ``None`` if several failed."""
    found = list(leaves(group))
    return found[0] if len(found) == 1 else None


def plain_failures(test: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Re-raise a failure that a task group wrapped as that failure.

    anyio wraps what fails inside a task group in a ``BaseExceptionGroup``. Around a
    ``pytest.fail`` that group is neither an ``Exception`` nor a pytest outcome, so anyio's pytest
    runner stops for good: the test's fixtures are not torn down (components stay open) and the
    report shows "Task exception was never retrieved". Every ``test_*`` coroutine of a suite is
    wrapped in this."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> T:
        try:
            return await test(*args, **kwargs)
        except BaseExceptionGroup as group:
            failure = single_failure(group)
            if failure is None:
                if isinstance(group, Exception):
                    raise
                summary = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(group))
                failure = AssertionError(f"several failures in one test: {summary}")
                failure.__cause__ = group
        # Raised outside the handler, so the failure does not get the group as its context.
        raise failure

    return run
