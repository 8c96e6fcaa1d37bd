"""Developer sessions: ``nox -s tests``, ``reliability``, ``lint``, ``typecheck``, ``docs``,
``lowest``, ``bench``.

Each session installs the whole uv workspace from ``uv.lock`` into its own environment, except
``lowest``, which resolves the lowest allowed versions instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import nox

ROOT = Path(__file__).parent

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "typecheck", "tests", "docs"]


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


DISTRIBUTIONS = [
    "packages/qtasks-core",
    "packages/qtasks-redis",
    "packages/qtasks-rabbitmq",
    "packages/qtasks-timer",
    "packages/qtasks-testing",
    "packages/qtasks-web",
    "tests/plugin_pkg",
]


@nox.session
def lowest(session: nox.Session) -> None:
    """The test suite on the lowest versions the distributions declare, so no bound lies.

    ``--resolution lowest-direct``: every direct dependency of the distributions (and of the
    dev group) at its lowest allowed version, their own dependencies at the newest.
    """
    session.run_install(
        "uv",
        "pip",
        "install",
        "--resolution",
        "lowest-direct",
        "--group",
        "dev",
        *(arg for path in DISTRIBUTIONS for arg in ("-e", path)),
        env={"VIRTUAL_ENV": session.virtualenv.location},
        external=True,
    )
    session.run(
        "uv", "pip", "list", env={"VIRTUAL_ENV": session.virtualenv.location}, external=True
    )
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
    """mypy strict on packages/*/src and tests/ (the files of pyproject.toml [tool.mypy])."""
    _sync(session)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs.yml) with --strict: a broken link, a missing page in
    the nav or an API reference that does not resolve fails the build. Output: site/."""
    _sync(session)
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """In-memory throughput and latency figures."""
    _sync(session)
    session.run("python", "bench/inmemory.py", *session.posargs)


@nox.session(venv_backend="none")
def bench_peers(session: nox.Session) -> None:
    """qtasks side by side with its peers; bench/peers/run.py builds one venv per framework."""
    session.run("python3", "bench/peers/run.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def set_version(session: nox.Session) -> None:
    """Set the version of every distribution: ``nox -s set_version -- 0.2.0``.

    The root ``pyproject.toml`` holds the version; each ``packages/*/pyproject.toml`` gets it,
    and its ``qtasks-core`` requirement becomes ``>=X.Y.Z,<X.(Y+1)`` (same minor: at 0.x a minor
    release may change what the backends use of the core). Then ``uv lock``.
    """
    if len(session.posargs) != 1 or not re.fullmatch(r"\d+\.\d+\.\d+", session.posargs[0]):
        session.error("usage: nox -s set_version -- X.Y.Z")
    new = session.posargs[0]
    major, minor, _ = (int(part) for part in new.split("."))
    bound = f"qtasks-core>={new},<{major}.{minor + 1}"
    for path in [ROOT / "pyproject.toml", *sorted(ROOT.glob("packages/*/pyproject.toml"))]:
        text = path.read_text()
        text = re.sub(r'(?m)^version = "[^"]*"$', f'version = "{new}"', text, count=1)
        text = re.sub(r'"qtasks-core[<>=!~][^"]*"', f'"{bound}"', text)  # requirements only
        path.write_text(text)
        session.log(f"{path.relative_to(ROOT)}: {new}")
    session.run("uv", "lock", external=True)
