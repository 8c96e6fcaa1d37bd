"""W1 on Redis with qtasks-web's metrics and tracing plugins off and on, interleaved.

W1 is the workload of ``bench/redis_throughput.py`` (20 warm-up tasks, then N tasks enqueued
one ``add_task`` at a time into a running worker, concurrency 10; each INCRs a Redis counter;
rate = N / (first enqueue -> the counter reaches N)). Modes:

- ``off``: no plugin (as redis_throughput.py);
- ``metrics``: :class:`~qtasks_web.metrics.MetricsPlugin` alone, serving on a port;
- ``api``: :class:`~qtasks_web.metrics.MetricsPlugin` (serving on a port) in the worker and
  :class:`~qtasks_web.tracing.TracingPlugin` in the worker and the producer, with
  opentelemetry-api only (no SDK configured: what runs when tracing is enabled and nobody
  collects);
- ``sdk``: as ``api``, with the SDK's ``TracerProvider`` and a ``BatchSpanProcessor`` whose
  exporter drops the spans (every span recorded, nothing sent over the network);
- ``sampled``: as ``sdk``, with the sampler docs/metrics-and-tracing.md recommends in
  production, ``ParentBased(TraceIdRatioBased(0.01))`` (1 % of the traces recorded).

``--inmemory`` measures instead the CPU the plugins add per task, in one process with the
in-memory components (producer and worker together, no network: the plugins' own cost,
without Redis round trips to hide or blur it), one app whose plugins are swapped between
batches of N tasks.

``--hook-times`` also times each hook of the plugins where it runs, in the producer and
the worker (wall time per call, in us, mean of the run; the wrapper adds ~0.2 us): what a
hook costs among Redis round trips and the event loop, often 2-3x what it costs called in a
tight loop. With ``--inmemory``, the hooks of each mode's plugins, median of its batches'
means (the wrapper's time is in the batches' CPU per task then).

``--baseline REV`` compares a change with the plugins as they were at git revision ``REV``
in the same run: a mode written ``MODE@base`` (``--modes off,sampled@base,sampled``) runs
``qtasks_web/metrics.py`` and ``tracing.py`` of ``REV``, loaded from a temporary copy, in the
producer and in the worker, and calls their hooks through the core's hook caller of ``REV``
(``Hooks.notify`` and ``Hooks.transform`` of ``qtasks/plugins/__init__.py``; every other mode
through this tree's): a change to how the core calls hooks is compared within one process too.

The modes run in turn, the order rotated each round, a fresh worker process per run, so the
shared machine's noise falls on every mode alike; the medians are printed at the end.

Run: ``uv run --all-packages python bench/observability.py [--n 5000] [--rounds 5]
[--modes off,metrics,api,sdk,sampled] [--inmemory] [--baseline REV] [--hook-times]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import redis
from redis_throughput import URL, clean, cpu_seconds, wait_counter, warm

from qtasks import AsyncQueueTasks, QueueConfig
from qtasks.plugins import Hooks
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage

WORKER = """
import sys, redis.asyncio
from qtasks import AsyncQueueTasks, QueueConfig
from qtasks_redis import RedisBroker, RedisGlobalConfig, RedisStorage
url, prefix, mode, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
app = AsyncQueueTasks(
    broker=RedisBroker(url, prefix=prefix, queue="bench"),
    storage=RedisStorage(url, prefix=prefix),
    global_config=RedisGlobalConfig(url, prefix=prefix),
    config=QueueConfig(max_tasks_process=10, log_level="WARNING", plugins_disabled=["*"]),
)
if mode != "off":
    sys.path.insert(0, sys.argv[5])
    from observability import plugins, write_hook_times
    for plugin in plugins(mode, worker=True, port=port):
        app.add_plugin(plugin)
    import atexit
    atexit.register(write_hook_times)
client = redis.asyncio.Redis.from_url(url)

@app.task(name="incr")
async def incr(key: str) -> None:
    await client.incr(key)

app.run_forever()
"""


def tracing_provider(mode: str) -> Any:
    """The tracer provider of ``mode``: ``None`` (the API's default, no-op) or an SDK one
    that records every span and drops it in a batch exporter."""
    if mode not in ("sdk", "sampled"):
        return None
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = ParentBased(TraceIdRatioBased(0.01)) if mode == "sampled" else None
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


BASELINE = "QTASKS_BENCH_OBS_BASELINE"
"""Environment variable: the directory holding the baseline's ``metrics.py`` and
``tracing.py`` (set by ``--baseline``; the worker processes inherit it)."""


BASE_FILES = {
    "metrics": "packages/qtasks-web/src/qtasks_web/metrics.py",
    "tracing": "packages/qtasks-web/src/qtasks_web/tracing.py",
    "hooks": "packages/qtasks-core/src/qtasks/plugins/__init__.py",
}
"""What ``MODE@base`` runs as it was at the baseline: the two plugins, and the core's hook
caller (:class:`qtasks.plugins.Hooks`' ``notify`` and ``transform``, see :func:`hook_caller`)."""

HOOK_CALLER = ("notify", "_notify_rest", "transform", "_transform_rest")
"""The methods of :class:`qtasks.plugins.Hooks` that call the hooks on a task's path."""

_CURRENT_CALLER = {name: getattr(Hooks, name) for name in HOOK_CALLER}


def baseline(rev: str, into: Path) -> None:
    """Copy the modules of :data:`BASE_FILES` at git revision ``rev`` into ``into`` for
    ``MODE@base``."""
    root = Path(__file__).resolve().parent.parent
    for name, path in BASE_FILES.items():
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{rev}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (into / f"{name}.py").write_text(source)
    os.environ[BASELINE] = str(into)


def hook_caller(base: bool) -> None:
    """Make :class:`qtasks.plugins.Hooks` call hooks as the baseline's did (``base``), or as
    this tree's does: its methods of :data:`HOOK_CALLER` swapped, in this process, for every
    app (each keeps its registrations; only how a call goes through them changes)."""
    for name in HOOK_CALLER:
        method = getattr(_module("hooks", True).Hooks, name) if base else _CURRENT_CALLER[name]
        setattr(Hooks, name, method)


def _module(name: str, base: bool) -> ModuleType:
    """``qtasks_web.<name>``, or the baseline's copy (loaded once, under a name of its own)."""
    if not base:
        return importlib.import_module(f"qtasks_web.{name}")
    key = f"obs_baseline_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            key, Path(os.environ[BASELINE]) / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


TIMES = "QTASKS_BENCH_OBS_TIMES"
"""Environment variable: the directory where each worker process writes its hook times
(set by ``--hook-times``)."""

HOOK_TIMES: dict[str, list[float]] = {}
"""``"<side> <plugin>.<hook>" -> [seconds, calls]`` of the timed plugins in this process."""


def timed(plugin: Any, side: str) -> Any:
    """``plugin`` with each of its hooks timed into :data:`HOOK_TIMES` (when ``--hook-times``);
    ``functools.wraps`` keeps the argument names pluggy passes by."""
    if not os.environ.get(TIMES):
        return plugin
    for name in dir(plugin):
        hook = getattr(plugin, name)
        if not name.startswith("qtasks_") or not callable(hook):
            continue
        slot = HOOK_TIMES.setdefault(f"{side} {plugin.name}.{name}", [0.0, 0])

        def wrap(hook: Any, slot: list[float]) -> Any:
            @functools.wraps(hook)
            def call(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return hook(*args, **kwargs)
                finally:
                    slot[0] += time.perf_counter() - start
                    slot[1] += 1

            return call

        setattr(plugin, name, wrap(hook, slot))
    for attr in ("_sends", "_runs", "_closes"):  # the tracing plugin's own (span_ends.py)
        follower = getattr(plugin, attr, None)
        if follower is not None:
            timed(follower, side)
    return plugin


def write_hook_times() -> None:
    """At a worker's exit: its hook times, for the bench process to read."""
    directory = os.environ.get(TIMES)
    if directory:
        Path(directory, f"{os.getpid()}.json").write_text(json.dumps(HOOK_TIMES))


def read_hook_times(pid: int) -> None:
    """Add the hook times a worker process wrote at its exit to :data:`HOOK_TIMES`."""
    written = Path(os.environ.get(TIMES, "."), f"{pid}.json")
    if os.environ.get(TIMES) and written.exists():
        HOOK_TIMES.update(json.loads(written.read_text()))


def hook_means(times: dict[str, list[float]], tasks: int) -> dict[str, float]:
    """us per call of the hooks called at least once per task (not the start/stop ones)."""
    return {name: t / n * 1e6 for name, (t, n) in sorted(times.items()) if n >= tasks}


def plugins(
    mode: str, *, worker: bool, port: int | None = None, side: str | None = None
) -> list[Any]:
    """The plugins of ``mode`` (``KIND`` or ``KIND@base``): in a worker the metrics plugin
    (serving on ``port`` when given) and the tracing plugin, in a producer the tracing one;
    their hook times (``--hook-times``) kept under ``side`` (default: worker or producer)."""
    kind, _, rev = mode.partition("@")
    found: list[Any] = []
    if os.environ.get(BASELINE) and worker and port is not None:
        hook_caller(rev == "base")  # a W1 worker process: one mode for its life
    if kind == "off":
        return found
    side = side or ("worker" if worker else "producer")
    if worker:
        metrics = _module("metrics", rev == "base").MetricsPlugin
        found.append(timed(metrics() if port is None else metrics(port=port), side))
    if kind != "metrics":
        tracing = _module("tracing", rev == "base").TracingPlugin
        found.append(timed(tracing(tracer_provider=tracing_provider(kind)), side))
    return found


def producer(prefix: str, mode: str) -> AsyncQueueTasks:
    app = AsyncQueueTasks(
        broker=RedisBroker(URL, prefix=prefix, queue="bench"),
        storage=RedisStorage(URL, prefix=prefix),
        global_config=RedisGlobalConfig(URL, prefix=prefix),
        config=QueueConfig(plugins_disabled=["*"]),
    )
    if os.environ.get(BASELINE):
        hook_caller(mode.endswith("@base"))
    for plugin in plugins(mode, worker=False):
        app.add_plugin(plugin)
    return app


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_worker(tmp: Path, prefix: str, mode: str) -> subprocess.Popen[bytes]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    here = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, str(script), URL, prefix, mode, str(free_port()), here],
        stdout=subprocess.DEVNULL,
    )


async def w1(mode: str, n: int, tmp: Path) -> tuple[float, float, float]:
    """One W1 run: (tasks/s, producer CPU us per task, worker CPU us per task); its hook
    times into :data:`HOOK_TIMES` (when ``--hook-times``), the worker's with them."""
    HOOK_TIMES.clear()
    prefix = f"bench-obs-{uuid.uuid4().hex[:8]}"
    worker = start_worker(tmp, prefix, mode)
    counter = redis.Redis.from_url(URL)
    app = producer(prefix, mode)
    await app.start()
    try:
        await warm(app, counter, f"{prefix}:warm")
        key = f"{prefix}:w1"
        cpu = (time.process_time(), cpu_seconds(worker.pid))
        start = time.perf_counter()
        for _ in range(n):
            await app.add_task("incr", key)
        done = wait_counter(counter, key, n, 60 + n / 20)
        mine = (time.process_time() - cpu[0]) / n * 1e6
        theirs = (cpu_seconds(worker.pid) - cpu[1]) / n * 1e6
        return n / (done - start), mine, theirs
    finally:
        await app.aclose()
        worker.terminate()
        worker.wait(30)
        counter.close()
        clean(prefix)
        read_hook_times(worker.pid)


async def inmemory(
    modes: list[str], n: int, rounds: int, hooks: dict[str, dict[str, list[float]]]
) -> dict[str, list[float]]:
    """CPU us per task of each mode: one app (in-memory components, concurrency 10) whose
    plugins are swapped between batches of ``n`` tasks, each enqueued one at a time, the modes
    in turn ``rounds`` times (order rotated): a load change on the machine falls on every mode
    within seconds, not on one whole run. Each batch's hook means (``--hook-times``) go into
    ``hooks`` by mode."""
    app = AsyncQueueTasks(config=QueueConfig(plugins_disabled=["*"], max_tasks_process=10))
    each = {mode: plugins(mode, worker=True, side=mode) for mode in modes}
    done = anyio.Event()
    count, target = 0, 0

    @app.task(name="incr")
    async def incr() -> None:
        nonlocal count
        count += 1
        if count == target:
            done.set()

    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    async with app:
        own = app.hooks.pm.get_plugins()
        for round_ in range(rounds):
            order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
            for mode in order:
                # Every plugin of the last mode goes, with those it registered itself (the
                # tracing plugin's hooks that end its spans, qtasks_web.span_ends).
                for plugin in app.hooks.pm.get_plugins() - own:
                    app.hooks.unregister(plugin)
                for plugin in each[mode]:
                    app.hooks.register(plugin)
                if os.environ.get(BASELINE):
                    hook_caller(mode.endswith("@base"))
                done, target = anyio.Event(), count + n
                for slot in HOOK_TIMES.values():  # the wrappers hold them: zeroed, not dropped
                    slot[:] = [0.0, 0]
                start = time.process_time()
                for _ in range(n):
                    await app.add_task("incr")
                await done.wait()
                cpu[mode].append((time.process_time() - start) / n * 1e6)
                for name, mean in hook_means(HOOK_TIMES, n).items():
                    side, _, hook = name.partition(" ")
                    if side == mode:
                        hooks.setdefault(mode, {}).setdefault(hook, []).append(mean)
    return cpu


def load() -> str:
    """The machine's load averages (other agents share its cores), for the results file."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def run(opts: argparse.Namespace) -> None:
    modes = [m.strip() for m in opts.modes.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if opts.hook_times:
            os.environ[TIMES] = tmp
        if opts.baseline:
            (Path(tmp) / "base").mkdir()
            baseline(opts.baseline, Path(tmp) / "base")
        if opts.inmemory:
            hooks: dict[str, dict[str, list[float]]] = {}
            report_inmemory(modes, opts, await inmemory(modes, opts.n, opts.rounds, hooks))
            report_hooks(opts, hooks)
        else:
            report_w1(modes, opts, await w1_rounds(modes, opts, Path(tmp)))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {load()}")


def report_inmemory(
    modes: list[str], opts: argparse.Namespace, cpu: dict[str, list[float]]
) -> None:
    for mode, runs in cpu.items():
        print(f"{mode:>12}: CPU us per task, each batch: {' '.join(f'{c:.1f}' for c in runs)}")
    base = statistics.median(cpu[modes[0]])
    print(f"medians of {opts.rounds} batches of {opts.n} tasks (producer and worker together):")
    for mode, runs in cpu.items():
        median = statistics.median(runs)
        print(
            f"  {mode:>12}: {median:.1f} us per task ({median - base:+.1f} us, "
            f"{(median / base - 1) * 100:+.1f} % vs {modes[0]})"
        )


async def w1_rounds(
    modes: list[str], opts: argparse.Namespace, tmp: Path
) -> dict[str, list[tuple[float, float, float]]]:
    figures: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    hooks: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for round_ in range(opts.rounds):
        order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
        for mode in order:
            rate, mine, theirs = await w1(mode, opts.n, tmp)
            figures[mode].append((rate, mine, theirs))
            print(
                f"round {round_ + 1} {mode:>12}: W1 {rate:,.0f} tasks/s; CPU per task: "
                f"producer {mine:.0f} us incl. polling, worker {theirs:.0f} us",
                flush=True,
            )
            for name, mean in hook_means(HOOK_TIMES, opts.n).items():
                hooks[mode].setdefault(name, []).append(mean)
    report_hooks(opts, hooks)
    return figures


def report_hooks(opts: argparse.Namespace, hooks: dict[str, dict[str, list[float]]]) -> None:
    """The hook times of each mode (``--hook-times``): the median of its runs' means."""
    if opts.hook_times:
        print(f"hook times, us per call (median of {opts.rounds} runs' means):")
        for mode, means in hooks.items():
            for name, runs in means.items():
                print(f"  {mode:>12} {name}: {statistics.median(runs):.2f}")


def report_w1(
    modes: list[str], opts: argparse.Namespace, figures: dict[str, list[tuple[float, float, float]]]
) -> None:
    base = statistics.median(r for r, _, _ in figures[modes[0]])
    base_cpu = statistics.median(m + t for _, m, t in figures[modes[0]])
    print(f"medians of {opts.rounds} runs of {opts.n} tasks each:")
    for mode, runs in figures.items():
        rate = statistics.median(r for r, _, _ in runs)
        mine = statistics.median(m for _, m, _ in runs)
        theirs = statistics.median(t for _, _, t in runs)
        both = statistics.median(m + t for _, m, t in runs)
        print(
            f"  {mode:>12}: {rate:,.0f} tasks/s ({(rate / base - 1) * 100:+.1f} % vs "
            f"{modes[0]}); CPU per task: producer {mine:.0f} us, worker {theirs:.0f} us "
            f"(both {both - base_cpu:+.0f} us, {(both / base_cpu - 1) * 100:+.1f} % CPU)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="off,metrics,api,sdk,sampled")
    parser.add_argument("--inmemory", action="store_true")
    parser.add_argument("--baseline", metavar="REV", help="git revision of the MODE@base modes")
    parser.add_argument("--hook-times", action="store_true", help="time each hook (W1)")
    anyio.run(run, parser.parse_args())
