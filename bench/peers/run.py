#!/usr/bin/env python3
"""Side-by-side benchmark of qtasks and its peers (issues 6 and 7).

Each framework gets its own virtual environment under ``bench/.venvs/<env>`` (made with
``uv venv`` and filled with ``uv pip install`` from the pins below), its worker runs as a
subprocess through its own CLI or entry point, and a producer subprocess in the same venv drives
the workloads and prints one JSON line. This driver needs only the standard library.

    python bench/peers/run.py                # every peer, full size (W1 10,000, W2 200, W3 2,000)
    python bench/peers/run.py --quick        # smaller N, for a smoke run
    python bench/peers/run.py arq saq        # only these peers
    python bench/peers/run.py --list
    python bench/peers/run.py --only SC --rounds 3   # SC only, every peer, 3 interleaved rounds

Workloads (same code for every peer, in ``_common.py``):

* W1 throughput: 10,000 no-op tasks (each INCRs a Redis counter) enqueued one call at a time into
  an already running worker with concurrency 10; rate = N / (first enqueue -> counter reaches N),
  measured by the producer.
* W2 latency: 200 sequential round trips (enqueue ``echo(i)``, wait through the framework's own
  result API); p50/p95/p99 in ms.
* W3 concurrency: 2,000 tasks that sleep 10 ms, worker concurrency 100. The tasks are queued while
  the worker is stopped, then the worker starts; wall = last task end - first task start, as
  stamped by the tasks themselves (ideal 2,000 x 10 ms / 100 = 0.2 s). The producer that waits
  for the end is started (and has imported its framework) before the worker, so no interpreter
  start-up shares the two cores with the measured run, and it polls every 50 ms.
* W4 canvas (only with ``--w4 N``): a chord of N no-op members (``echo``) whose callback counts
  the results, through the peer's own canvas API (Celery ``chord(group(...), count.s())``,
  qtasks ``run_workflow(chord(...))``), on the c=10 worker after W2; wall = first enqueue -> the
  callback's result. Peers without a canvas say so.
* SC side channel (only with ``--only ...,SC``): as ``bench/redis_throughput.py --only SC`` for
  qtasks (issue 21): on the c=10 worker (after W1/W2/W4 when they run), 20 counted tasks, then
  20 warm-up and 500 sequential round trips: the producer enqueues ``signal(port, i)`` with the
  framework's normal fire-and-forget call and waits for the task's UDP datagram on loopback;
  the time from the enqueue call to the datagram's arrival, nearest-rank p50/p95/p99 in ms.
* Peak worker RSS: the sum of VmHWM over the worker's process group (``/proc``), read just before
  the worker is stopped.

``--only`` picks the workloads (default ``W1,W2,W3``); ``--rounds R`` runs the selected peers R
times, interleaved (every peer once per round), and prints each round's W1-W3 table, then (with
more than one round) the median of each W1-W3 figure over all the runs with W1's rate per run,
and, for SC, the median of each figure over all the runs; the medians are also in the results
file (``medians``, ``sc_medians``). The results file is rewritten after every peer's
run, so an interrupted run keeps what it measured; it records ``uptime`` at the start and end and
the load averages before and after each peer's run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tables import figures, medians_table, sc_medians, sc_table, table, w_medians

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENVS = ROOT / "bench" / ".venvs"
LOGS = VENVS / "_logs"
FREEZE = HERE / "freeze"
RESULTS = HERE / "results"

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
AMQP_HOST = "127.0.0.1"
AMQP_PORT = 5672

HIREDIS = "hiredis==3.5.0"

# Top-level pins per virtual environment; the full resolved set is written to freeze/<env>.txt.
ENVS: dict[str, list[str]] = {
    "taskiq-redis": ["taskiq==0.13.0", "taskiq-redis==1.2.4", HIREDIS],
    "arq": ["arq==0.28.0", HIREDIS],
    "streaq": ["streaq==7.2.0", "redis==8.1.0", HIREDIS],  # redis-py: the harness only
    # saq 0.26.4 imports typing_extensions without declaring it.
    "saq": ["saq[redis,hiredis]==0.26.4", "typing-extensions==4.16.0"],
    "dramatiq": ["dramatiq[redis]==2.2.1", HIREDIS],
    "celery": ["celery[redis]==5.7.0", HIREDIS],
    "taskiq-aio-pika": [
        "taskiq==0.13.0",
        "taskiq-aio-pika==0.6.1",
        "taskiq-redis==1.2.4",
        HIREDIS,
    ],
    # qtasks from this workspace, editable so the figures follow the working tree.
    "qtasks": [
        "-e",
        str(ROOT / "packages" / "qtasks-core"),
        "-e",
        str(ROOT / "packages" / "qtasks-redis"),
        "-e",
        str(ROOT / "packages" / "qtasks-rabbitmq"),
        HIREDIS,
    ],
}


@dataclass(frozen=True)
class Peer:
    name: str
    module: str
    env: str
    broker: str  # "redis" or "amqp": which family its figures are compared within
    extra_env: dict[str, str] = field(default_factory=dict)
    # Seconds between SIGTERM and SIGKILL. taskiq 0.13 workers keep fetching after SIGTERM when
    # idle and never exit by themselves, so they get a short one to keep the suite short.
    stop_grace: float = 10.0

    @property
    def is_qtasks(self) -> bool:
        return self.env == "qtasks"


PEERS: list[Peer] = [
    Peer("taskiq-redis", "peer_taskiq_redis", "taskiq-redis", "redis", stop_grace=3.0),
    Peer("arq", "peer_arq", "arq", "redis"),
    Peer("streaq", "peer_streaq", "streaq", "redis"),
    Peer("saq", "peer_saq", "saq", "redis"),
    Peer("dramatiq", "peer_dramatiq", "dramatiq", "redis"),
    Peer("celery-redis", "peer_celery", "celery", "redis", {"BENCH_BROKER": "redis"}),
    Peer("qtasks-redis", "peer_qtasks", "qtasks", "redis", {"BENCH_BROKER": "redis"}),
    Peer("taskiq-aio-pika", "peer_taskiq_aio_pika", "taskiq-aio-pika", "amqp", stop_grace=3.0),
    Peer("celery-amqp", "peer_celery", "celery", "amqp", {"BENCH_BROKER": "amqp"}),
    Peer("qtasks-rabbitmq", "peer_qtasks", "qtasks", "amqp", {"BENCH_BROKER": "amqp"}),
]

FULL = {"w1": 10_000, "w2": 200, "w3": 2_000, "sc": 500}
QUICK = {"w1": 2_000, "w2": 50, "w3": 500, "sc": 100}
WORKLOADS = ("W1", "W2", "W3", "SC")
DEFAULT_WORKLOADS = ("W1", "W2", "W3")
W3_WAITING = "waiting for W3"  # printed by the W3-wait producer when it is up (_common.py)
SKIPPED = 3  # exit code of a producer that cannot run (e.g. qtasks backend not importable yet)


# --- tiny RESP client (FLUSHDB and PING only) -------------------------------------------------


def _resp(*args: str | int) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def redis_command(db: int, *args: str | int) -> bytes:
    """Run one command on ``db`` and return its raw first line (``+OK`` etc.)."""
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=10) as sock:
        sock.sendall(_resp("SELECT", db) + _resp(*args))
        buf = b""
        deadline = time.monotonic() + 10
        while buf.count(b"\r\n") < 2 and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) < 2 or lines[0].startswith(b"-") or lines[1].startswith(b"-"):
            raise RuntimeError(f"redis {args[0]} failed: {buf[:200]!r}")
        return lines[1]


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# --- virtual environments ---------------------------------------------------------------------


def venv_python(env: str) -> Path:
    return VENVS / env / "bin" / "python"


def ensure_env(env: str, python: str, force: bool) -> dict[str, str]:
    """Create/refresh ``bench/.venvs/<env>``; return {distribution: version} as installed."""
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("uv is required (https://docs.astral.sh/uv/)")
    path = VENVS / env
    marker = path / ".bench-requirements.json"
    wanted = json.dumps({"python": python, "requires": ENVS[env]})
    fresh = not marker.exists() or marker.read_text() != wanted or force
    if fresh or env == "qtasks":
        if fresh and path.exists():
            shutil.rmtree(path)
        if not path.exists():
            subprocess.run([uv, "venv", "-q", "--python", python, str(path)], check=True)
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", str(venv_python(env)), *ENVS[env]],
            check=True,
        )
        marker.write_text(wanted)
    frozen = subprocess.run(
        [uv, "pip", "freeze", "--python", str(venv_python(env))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    FREEZE.mkdir(exist_ok=True)
    if env != "qtasks":  # editable paths are machine-specific; the workspace lock covers qtasks
        (FREEZE / f"{env}.txt").write_text(frozen)
    versions: dict[str, str] = {}
    for line in frozen.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            versions[name.lower()] = version
        elif line.startswith("-e "):
            name = line.rsplit("/", 1)[-1]
            versions[name.lower()] = "workspace"
    return versions


# --- worker processes -------------------------------------------------------------------------


def _status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the command name, which may itself contain spaces and parentheses.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 2 and int(rest[2]) == pgid:
            pids.append(int(entry))
    return pids


class Worker:
    """A worker subprocess in its own session, so its whole process tree is one group."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log: Path, grace: float = 10.0
    ) -> None:
        self.grace = grace
        self.argv = list(argv)
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_kib = 0
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=HERE,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        assert self.proc is not None
        while not self._stop.wait(0.1):
            pids = _group_pids(self.proc.pid)
            rss = sum(_status_kib(pid, "VmRSS") for pid in pids)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            hwm = sum(_status_kib(pid, "VmHWM") for pid in pids)
            self.hwm_kib = max(self.hwm_kib, hwm)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def peak_mib(self) -> float:
        """Peak of the summed VmHWM (each process's own peak) over the process group."""
        if self.proc is not None:
            pids = _group_pids(self.proc.pid)
            hwm = sum(_status_kib(pid, "VmHWM") for pid in pids)
            self.hwm_kib = max(self.hwm_kib, hwm)
        return round(max(self.hwm_kib, self.peak_rss_kib) / 1024, 1)

    def stop(self) -> None:
        started = time.monotonic()
        try:
            self._stop_group(self.grace)
        finally:
            with open(self.log, "a") as fh:
                fh.write(f"# worker stopped in {time.monotonic() - started:.1f} s\n")

    def _stop_group(self, grace: float) -> None:
        self._stop.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM to the main process only, as a service manager does; it stops its children.
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # Children may outlive a parent that exited on SIGTERM; the group id is still ours.
        deadline = time.monotonic() + grace
        while _group_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_pids(proc.pid):
            with open(self.log, "a") as fh:
                fh.write(f"# worker group still alive {grace:.0f} s after SIGTERM: SIGKILL\n")
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(5)


# --- one peer ---------------------------------------------------------------------------------


class PhaseError(Exception):
    pass


class Skip(Exception):
    pass


def produce(
    peer: Peer,
    env: dict[str, str],
    args: Sequence[str],
    timeout: float,
    log: Path,
    when_ready: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Run ``<peer>.py <args>`` in the peer's venv; return its JSON line. With
    ``when_ready``, call it once the producer printed ``W3_WAITING`` (it is up and waiting)."""
    cmd = [str(venv_python(peer.env)), str(HERE / f"{peer.module}.py"), *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    head = ""
    try:
        if when_ready is not None:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:  # until the producer says it waits (or exits)
                    remaining = started + timeout - time.monotonic()
                    if remaining <= 0:
                        raise subprocess.TimeoutExpired(cmd, timeout)
                    if not sel.select(remaining):
                        continue
                    line = proc.stdout.readline()
                    head += line
                    if not line or line.strip() == W3_WAITING:
                        break
            if proc.poll() is None:
                when_ready()
        stdout, stderr = proc.communicate(timeout=max(timeout - (time.monotonic() - started), 1))
        done = subprocess.CompletedProcess(cmd, proc.returncode, head + stdout, stderr)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        with open(log, "a") as fh:
            partial = "".join(
                out if isinstance(out, str) else (out or b"").decode()
                for out in (exc.stdout, exc.stderr)
            )
            fh.write(f"$ {' '.join(args)}  (timed out after {timeout:.0f} s)\n{partial}\n")
        raise PhaseError(f"{' '.join(args)}: producer timed out after {timeout:.0f} s") from exc
    with open(log, "a") as fh:
        took = time.monotonic() - started
        fh.write(f"$ {' '.join(args)}  ({took:.1f} s)\n{done.stdout}{done.stderr}\n")
    if done.returncode == SKIPPED:
        raise Skip(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "skipped")
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-3:]
        raise PhaseError(f"{' '.join(args)}: exit {done.returncode}: {' | '.join(tail)}")
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise PhaseError(f"{' '.join(args)}: no JSON result on stdout")


def c10(
    peer: Peer,
    env: dict[str, str],
    sizes: dict[str, int],
    workloads: Sequence[str],
    log: Path,
    out: dict[str, Any],
    phase: Callable[[str, Any], Any],
) -> None:
    """The selected workloads that share the running c=10 worker: W1, W2, W4, then SC."""
    if "W1" in workloads:
        w1_timeout = 90 + sizes["w1"] / 50
        out["W1"] = phase(
            "W1", lambda: produce(peer, env, ["W1", str(sizes["w1"])], w1_timeout, log)
        )
    if "W2" in workloads and (out.get("W1") is not None or not out["errors"]):
        out["W2"] = phase("W2", lambda: produce(peer, env, ["W2", str(sizes["w2"])], 120, log))
    if sizes.get("w4"):
        w4_timeout = 120 + sizes["w4"] / 20
        out["W4"] = phase(
            "W4", lambda: produce(peer, env, ["W4", str(sizes["w4"])], w4_timeout, log)
        )
    if "SC" in workloads:
        # At most 5 s per round trip (SC_TIMEOUT in _common.py), most well under 10 ms.
        sc_timeout = 120 + sizes["sc"] / 10
        out["SC"] = phase(
            "SC", lambda: produce(peer, env, ["SC", str(sizes["sc"])], sc_timeout, log)
        )


def w3(peer: Peer, env: dict[str, str], worker_argv: list[str], n: int, log: Path) -> Any:
    """W3: queue the tasks while no worker runs, then start one with concurrency 100."""
    c100 = {**env, "BENCH_CONCURRENCY": "100"}
    first = Worker(worker_argv, c100, log, peer.stop_grace)
    first.start()  # declares queues / consumer groups so queued tasks are not skipped
    try:
        produce(peer, c100, ["warm"], 90, log)
    finally:
        first.stop()
    produce(peer, c100, ["W3-enqueue", str(n)], 120, log)
    second = Worker(worker_argv, c100, log, peer.stop_grace)
    try:
        # The waiting producer starts first, so its start-up is not measured.
        result = produce(peer, c100, ["W3-wait", str(n)], 120, log, second.start)
        result["rss_c100_mib"] = second.peak_mib()
        return result
    finally:
        second.stop()


def run_peer(
    peer: Peer, sizes: dict[str, int], db: int, run_id: str, workloads: Sequence[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {"peer": peer.name, "broker": peer.broker, "errors": []}
    queue = f"bench-{peer.name}-{run_id}"
    log = LOGS / f"{run_id}-{peer.name}.log"
    LOGS.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        {
            "PYTHONPATH": str(HERE),
            "PYTHONUNBUFFERED": "1",
            "BENCH_REDIS_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
            "BENCH_AMQP_URL": f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/",
            "BENCH_QUEUE": queue,
            "BENCH_VENV_BIN": str(VENVS / peer.env / "bin"),
            "BENCH_W3_N": str(sizes.get("w3", 0)),
            **peer.extra_env,
        }
    )
    worker_argv = [str(venv_python(peer.env)), str(HERE / f"{peer.module}.py"), "worker"]

    def phase(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Skip:
            raise
        except Exception as exc:  # one failed phase must not hide the others' figures
            out["errors"].append(f"{name}: {exc}")
            print(f"  {peer.name} {name} failed: {exc}", flush=True)
            return None

    redis_command(db, "FLUSHDB")
    try:
        # W1, W2, W4 and SC (those selected) on one worker with concurrency 10.
        if {"W1", "W2", "SC"} & set(workloads) or sizes.get("w4"):
            worker = Worker(worker_argv, {**env, "BENCH_CONCURRENCY": "10"}, log, peer.stop_grace)
            worker.start()
            try:
                c10(peer, env, sizes, workloads, log, out, phase)
                if not worker.alive():
                    out["errors"].append("worker (c=10) exited early; see " + str(log))
                out["rss_c10_mib"] = worker.peak_mib()
            finally:
                worker.stop()

        if "W3" in workloads:
            redis_command(db, "FLUSHDB")
            out["W3"] = phase("W3", lambda: w3(peer, env, worker_argv, sizes["w3"], log))
    except Skip as exc:
        out = {"peer": peer.name, "broker": peer.broker, "skipped": str(exc), "errors": []}
        print(f"  {peer.name} skipped: {exc}", flush=True)
    finally:
        try:
            produce(peer, env, ["cleanup"], 60, log)
        except (PhaseError, Skip):
            pass
        redis_command(db, "FLUSHDB")
    return out


# --- report -----------------------------------------------------------------------------------


def uptime() -> str:
    """``uptime``'s line (load averages), or the load averages alone without the command."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def result_file(started: dt.datetime, kind: str, run_id: str) -> Path:
    """A new file under ``results/`` named by the run's start, created now so that no other
    run takes the name; a run that started the same second gets the run id appended."""
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"{started:%Y-%m-%dT%H%M%SZ}-{kind}.json"
    try:
        target.open("x").close()
    except FileExistsError:
        target = target.with_name(f"{target.stem}-{run_id}.json")
        target.open("x").close()
    return target


def dump(report: dict[str, Any]) -> str:
    """The report as indented JSON, with each list of numbers (SC samples) on one line."""
    text = json.dumps(report, indent=2)
    return re.sub(
        r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]",
        lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]",
        text,
    )


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    redis_version = "unknown"
    try:
        info = subprocess.run(
            ["redis-cli", "-h", REDIS_HOST, "-p", str(REDIS_PORT), "info", "server"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        for line in info.splitlines():
            if line.startswith("redis_version:"):
                redis_version = line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "redis": redis_version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peers", nargs="*", help="peer names (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller N (smoke run)")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"workloads to run, of {','.join(WORKLOADS)} (default: {','.join(DEFAULT_WORKLOADS)})",
    )
    parser.add_argument("--w1", type=int, help="W1 task count (default 10,000)")
    parser.add_argument("--w2", type=int, help="W2 round trips (default 200)")
    parser.add_argument("--w3", type=int, help="W3 task count (default 2,000)")
    parser.add_argument(
        "--w4", type=int, help="W4 chord members (default: W4 not run); peers with a canvas"
    )
    parser.add_argument("--sc", type=int, help="SC round trips (default 500)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every selected peer this many times, interleaved"
    )
    parser.add_argument("--db", type=int, default=13, help="Redis db number to use and flush")
    parser.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}")
    parser.add_argument("--reinstall", action="store_true", help="recreate the venvs")
    parser.add_argument("--list", action="store_true", help="list the peers and exit")
    parser.add_argument("--json", type=Path, help="write the results here instead")
    opts = parser.parse_args(argv)

    if opts.list:
        for peer in PEERS:
            print(f"{peer.name:16} {peer.broker:5} {' '.join(ENVS[peer.env])}")
        return 0
    known = {p.name for p in PEERS}
    unknown = [name for name in opts.peers if name not in known]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; known: {sorted(known)}")
    wanted = {w.strip().upper() for w in opts.only.split(",") if w.strip()}
    if not wanted or wanted - set(WORKLOADS):
        parser.error(f"--only takes some of {','.join(WORKLOADS)}, not {opts.only!r}")
    workloads = tuple(w for w in WORKLOADS if w in wanted)
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")
    selected = [p for p in PEERS if not opts.peers or p.name in opts.peers]
    # Only the selected workloads' sizes: a report lists what it ran.
    sizes = {k: v for k, v in (QUICK if opts.quick else FULL).items() if k.upper() in workloads}
    for key in sizes:
        if getattr(opts, key) is not None:
            sizes[key] = getattr(opts, key)
    if opts.w4:
        sizes["w4"] = opts.w4

    if not reachable(REDIS_HOST, REDIS_PORT):
        print(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}", file=sys.stderr)
        return 2
    if any(p.broker == "amqp" for p in selected) and not reachable(AMQP_HOST, AMQP_PORT):
        print(f"RabbitMQ not reachable at {AMQP_HOST}:{AMQP_PORT}; skipping its peers")
        selected = [p for p in selected if p.broker != "amqp"]

    run_id = uuid.uuid4().hex[:8]
    started = dt.datetime.now(dt.UTC)
    target = opts.json
    if target is None:
        default_sizes = {k: v for k, v in FULL.items() if k.upper() in DEFAULT_WORKLOADS}
        if workloads == DEFAULT_WORKLOADS and sizes == default_sizes and opts.rounds == 1:
            kind = "full" if not opts.peers else "partial-" + "-".join(p.name for p in selected)
        else:
            parts = [] if workloads == DEFAULT_WORKLOADS else ["-".join(workloads)]
            parts += [f"{opts.rounds}rounds"] if opts.rounds > 1 else []
            parts += ["-".join(p.name for p in selected) if opts.peers else "all"]
            kind = "partial-" + "-".join(parts)
        # One file per run, named by its start: a later run never overwrites an earlier one.
        target = result_file(started, kind, run_id)
    versions: dict[str, dict[str, str]] = {}
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["python3", "bench/peers/run.py", *(argv or sys.argv[1:])]),
        "workloads": list(workloads),
        "rounds": opts.rounds,
        "sizes": sizes,
        "machine": machine(),
        "uptime_start": uptime(),
        "versions": versions,
        "results": results,
    }
    for round_no in range(1, opts.rounds + 1):
        for peer in selected:
            if peer.env not in versions:
                print(f"[{peer.env}] preparing venv", flush=True)
                versions[peer.env] = ensure_env(peer.env, opts.python, opts.reinstall)
            tag = peer.name if opts.rounds == 1 else f"{peer.name} round {round_no}"
            print(f"[{tag}] running {','.join(workloads)} (sizes {sizes})", flush=True)
            t0 = time.monotonic()
            load_before = os.getloadavg()
            result = run_peer(peer, sizes, opts.db, run_id, workloads)
            result["round"] = round_no
            result["load1_before"] = round(load_before[0], 2)
            result["load_before"] = [round(x, 2) for x in load_before]
            result["load_after"] = [round(x, 2) for x in os.getloadavg()]
            result["seconds"] = round(time.monotonic() - t0, 1)
            results.append(result)
            # Rewritten after every run: an interrupted run keeps what it measured.
            target.write_text(dump(report) + "\n")
            shown = {k: v for k, v in figures(result).items() if v is not None}
            print(f"[{tag}] done in {result['seconds']} s: {shown}", flush=True)
    report["uptime_end"] = uptime()
    if "SC" in workloads:
        report["sc_medians"] = sc_medians(results)
    if {"W1", "W2", "W3"} & set(workloads):
        report["medians"] = w_medians(results)

    w3_tasks = sizes.get("w3", FULL["w3"])
    for broker, title in (("redis", "Redis"), ("amqp", "RabbitMQ")):
        if not any(r["broker"] == broker for r in results):
            continue
        if {"W1", "W2", "W3"} & set(workloads):
            for round_no in range(1, opts.rounds + 1):
                suffix = "" if opts.rounds == 1 else f", round {round_no}"
                in_round = [r for r in results if r["round"] == round_no]
                print(f"\n### {title}{suffix}\n\n{table(in_round, broker, w3_tasks)}")
            if opts.rounds > 1:
                print(
                    f"\n### {title}: medians over {opts.rounds} rounds\n\n"
                    f"{medians_table(results, broker, w3_tasks)}"
                )
        if "SC" in workloads:
            runs = "one run" if opts.rounds == 1 else f"medians over {opts.rounds} runs"
            print(
                f"\n### {title}: SC, {sizes['sc']} round trips through a UDP side channel "
                f"({runs})\n\n{sc_table(results, broker)}"
            )
    if sizes.get("w4"):
        print(f"\n### W4: a chord of {sizes['w4']:,} no-op members, then a callback\n")
        print("| framework | broker | wall s | members/s |\n|---|---|--:|--:|")
        for result in results:
            w4 = result.get("W4") or {}
            if w4.get("unsupported"):
                print(f"| {result['peer']} | {result['broker']} | no canvas | |")
            elif w4:
                print(
                    f"| {result['peer']} | {result['broker']} | {w4['seconds']:.2f} "
                    f"| {w4['rate']:,.0f} |"
                )
    target.write_text(dump(report) + "\n")
    print(f"\n{report['uptime_start']} (start)\n{report['uptime_end']} (end)")
    print(f"results written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
