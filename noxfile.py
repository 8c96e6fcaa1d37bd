"""Developer sessions: ``nox -s tests``, ``nox -s reliability``, ``nox -s lint``,
``nox -s typecheck``, ``nox -s bench``.

Each session installs the whole uv workspace from ``uv.lock`` into its own environment.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "typecheck", "tests"]


def _sync(session: nox.Session) -> None:
    session.run_install(
        "uv",
        "sync",
        "--all-packages",
        "--locked",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (needs Redis and RabbitMQ on 127.0.0.1, see README)."""
    _sync(session)
    session.run("pytest", *session.posargs)


@nox.session
def reliability(session: nox.Session) -> None:
    """Only the long fault-injection tests (marked ``reliability``, also part of ``tests``):
    worker subprocesses behind a fault proxy in front of a private redis-server (needs
    ``redis-server`` on the PATH)."""
    _sync(session)
    session.run("pytest", "-m", "reliability", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    _sync(session)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy strict on packages/*/src."""
    _sync(session)
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """In-memory throughput and latency figures."""
    _sync(session)
    session.run("python", "bench/inmemory.py", *session.posargs)


@nox.session(venv_backend="none")
def bench_peers(session: nox.Session) -> None:
    """qtasks side by side with its peers; bench/peers/run.py builds one venv per framework."""
    session.run("python3", "bench/peers/run.py", *session.posargs, external=True)
