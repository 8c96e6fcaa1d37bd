"""Three worker processes against the real Redis run the same app with one every-second
timer: each tick is enqueued exactly once, also after one of them is killed with SIGKILL. Two
replicas on a redis-server of the test's own, killed for a few ticks and started again empty:
one coalesced catch-up once it is back. Two replicas, one of which hears late that it won a
tick's claim: the tick runs. Two replicas whose claims wait out an outage after which the claims
are gone: one run."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

import pytest
from redis_server import start_server
from timer_helpers import (
    ClaimGate,
    Gate,
    HeldUntilBack,
    Recorder,
    check_a_won_tick_heard_late_runs,
    check_an_outage_that_emptied_the_claims_gives_one_run,
    key_time,
    wait_until,
)

from qtasks_testing.clock import FakeClock
from qtasks_timer import AsyncTimer
from qtasks_timer.timer import CLAIMS
from qtasks_timer.triggers import tick_key

try:
    from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage  # noqa: F401

    HAVE_REDIS_BACKEND = True
except ImportError:
    HAVE_REDIS_BACKEND = False

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_REDIS_BACKEND,
        reason="waits for qtasks_redis (RedisBroker, RedisStorage, RedisGlobalConfig) on main",
    ),
]

REPLICA = Path(__file__).with_name("redis_replica.py")
RUN_FOR = 10.0


class Replica:
    def __init__(self, url: str, prefix: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPLICA), url, prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ready = threading.Event()
        self.ticks: list[dict[str, Any]] = []
        self.other: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("{"):
                self.ticks.append(json.loads(line))
            else:
                self.other.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=5)
        return code


def tick_time(key: str) -> datetime:
    return datetime.strptime(key, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def cleanup(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_three_replicas_enqueue_each_tick_once_even_after_a_kill(
    redis_url: str, unique_name: str
) -> None:
    replicas = [Replica(redis_url, unique_name) for _ in range(3)]
    killed: Replica | None = None
    try:
        for replica in replicas:
            assert replica.ready.wait(20), replica.other
        started = time.monotonic()
        # Kill (SIGKILL) a replica that has won ticks, halfway between two ticks.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and killed is None:
            time.sleep(0.05)
            if time.monotonic() - started < 4:
                continue
            winners = [r for r in replicas if r.ticks]
            if winners and 0.4 < time.time() % 1 < 0.6:
                killed = max(winners, key=lambda r: r.ticks[-1]["tick"])
                killed.proc.send_signal(signal.SIGKILL)
        assert killed is not None, "no replica won a tick"
        killed_at = datetime.now(UTC)
        time.sleep(max(0.0, RUN_FOR - (time.monotonic() - started)))
    finally:
        codes = [replica.stop() for replica in replicas]
        cleanup(redis_url, unique_name)
    survivors = [
        code for replica, code in zip(replicas, codes, strict=True) if replica is not killed
    ]
    assert survivors == [0, 0]
    keys = [tick["tick"] for replica in replicas for tick in replica.ticks]
    assert len(keys) == len(set(keys)), "a tick was enqueued twice"
    ticks = sorted(tick_time(key) for key in keys)
    assert len(ticks) >= RUN_FOR - 1
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert all(gap == timedelta(seconds=1) for gap in gaps), "a tick was missed"
    assert ticks[-1] > killed_at + timedelta(seconds=2), "ticks went on after the kill"
    after_kill = [
        tick
        for r in replicas
        if r is not killed
        for tick in r.ticks
        if tick_time(tick["tick"]) > killed_at
    ]
    assert after_kill
    per_replica = [len(r.ticks) for r in replicas]
    print(f"{len(ticks)} ticks, {len(set(keys))} distinct; won per replica {per_replica}")


@pytest.mark.anyio
async def test_an_outage_of_several_ticks_gives_one_coalesced_catch_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the tick due when the server died ran once it was back (``late: 0``, seconds
    late), and a second run at once coalesced the ticks after it. Then (one run in four on
    CI), when the claim of the tick before the outage by the replica that lost it was still
    on its way as the server died: that claim won on the empty server, and both replicas had
    a won tick to fold into the catch-up (see test_an_outage_that_emptied_the_claims_...)."""
    from redis_replica import build

    caplog.set_level(logging.DEBUG, logger="qtasks.timer")

    server = start_server(tmp_path, extra=["--appendonly", "no"])  # it starts again empty
    second = timedelta(seconds=1)
    recorders = []
    timers = []
    for _ in range(2):
        # Enough retries that a claim rides out the outage (waits for the server to come
        # back), as it does by default for outages of a few seconds.
        app, timer = build(server.url, "replica", redis_retries=200, redis_retry_cap=0.1)
        recorders.append(Recorder())
        app.add_plugin(recorders[-1])
        timers.append(timer)

    def runs() -> list[tuple[datetime, int, float]]:
        """(tick, late, when enqueued) of both replicas' runs, in tick order."""
        both = [run for recorder in recorders for run in recorder.enqueued]
        return sorted((key_time(info["tick"]), info["late"], at) for info, at, _ in both)

    def after(tick: datetime) -> list[tuple[datetime, int, float]]:
        return [run for run in runs() if run[0] > tick]

    try:
        async with timers[0], timers[1]:
            # The first run is the start's catch-up; the outage begins after the next one.
            await wait_until(lambda: len(runs()) >= 2, 10, "two ticks before the outage")
            server.kill()
            last = runs()[-1][0]
            await wait_until(
                lambda: time.time() > (last + 3.5 * second).timestamp(), 10, "3 ticks down"
            )
            back = time.time()
            server.start()
            await wait_until(lambda: len(after(last)) >= 3, 10, "three runs after the outage")
    finally:
        server.close()
    (catch_up, late, at), *following = after(last)
    # One run for the ticks of the outage: the latest one due once the server was back,
    # counting those before it as coalesced; and the tick before the outage as well when a
    # replica's claim of it won again on the empty server (it cannot tell that tick ran).
    assert catch_up.timestamp() <= at < (catch_up + second).timestamp(), after(last)
    assert catch_up >= last + 3 * second and at >= back, after(last)
    outage = (catch_up - last) / second - 1
    won_again = f"tick {tick_key(timers[0].timers[0].trigger, last)} claimed after the next one"
    assert late == outage or (late == outage + 1 and won_again in caplog.text), after(last)
    # Then the ticks on time again, one run each.
    assert [(tick - catch_up, late) for tick, late, _ in following[:2]] == [
        (second, 0),
        (2 * second, 0),
    ], after(last)
    ticks = [tick for tick, _, _ in runs()]
    assert len(ticks) == len(set(ticks)), "a tick was enqueued twice"


if HAVE_REDIS_BACKEND:

    class GatedRedisClaims(RedisGlobalConfig):
        """A replica's GlobalConfig whose tick claims go through :attr:`gate`."""

        gate: Gate | None = None

        async def set_if_absent(
            self, namespace: str, key: str, value: Any, *, ttl: float | None = None
        ) -> bool:
            make = partial(super().set_if_absent, namespace, key, value, ttl=ttl)
            if namespace != CLAIMS or self.gate is None:
                return await make()
            return await self.gate.claim(key, value, make)


def gated_replicas(
    redis_url: str, prefix: str, clock: FakeClock, gate: Gate
) -> tuple[tuple[AsyncTimer, AsyncTimer], tuple[Recorder, Recorder]]:
    """Two timer replicas on ``clock`` whose tick claims go through ``gate``, each with a
    :class:`Recorder` of its enqueues."""
    from redis_replica import build

    timers, recorders = [], []
    for _ in range(2):
        app, timer = build(redis_url, prefix, clock=clock.now, claims=GatedRedisClaims)
        assert isinstance(app.global_config, GatedRedisClaims)
        app.global_config.gate = gate
        recorders.append(Recorder())
        app.add_plugin(recorders[-1])
        timers.append(timer)
    return (timers[0], timers[1]), (recorders[0], recorders[1])


@pytest.mark.anyio
async def test_a_tick_whose_claim_a_replica_won_runs_though_it_heard_so_late(
    redis_url: str, redis_prefix: str
) -> None:
    """Replica a's claim of tick T1 reaches Redis first, but a hears the answer once T2 is due,
    and b (which lost T1 in time) ran T2: a enqueues T1 instead of coalescing it into T2. The
    replicas' clock is the test's, so each tick comes due when the test says."""
    clock = FakeClock()
    clock.freeze()
    gate = ClaimGate()
    timers, recorders = gated_replicas(redis_url, redis_prefix, clock, gate)
    await check_a_won_tick_heard_late_runs(timers, recorders, gate, clock)


@pytest.mark.anyio
@pytest.mark.parametrize("first", ["a", "b"])
async def test_an_outage_that_emptied_the_claims_gives_one_run(
    redis_url: str, redis_prefix: str, first: Literal["a", "b"]
) -> None:
    """The interleaving that made the outage test above run two catch-ups (one CI run in
    four), on the real Redis: b's claim of T0, which a ran, reaches the server only after it
    restarted empty (the test deletes the claims), as does a's claim of T1. Both replicas win
    and fold into T3; the one whose claim of T3 loses sees in that claim that its tick is
    accounted for, and does not run it on its own."""
    clock = FakeClock()
    clock.freeze()
    gate = HeldUntilBack()
    timers, recorders = gated_replicas(redis_url, redis_prefix, clock, gate)
    await check_an_outage_that_emptied_the_claims_gives_one_run(
        timers,
        recorders,
        gate,
        clock,
        partial(timers[0].app.global_config.clear, CLAIMS),
        first,
    )
