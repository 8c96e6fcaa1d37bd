"""Developer sessions: ``nox -s tests``, ``reliability``, ``lint``, ``typecheck``, ``docs``,
``lowest``, ``newer_python``, ``bench``.

Each session installs the whole uv workspace from ``uv.lock`` into its own environment, except
``lowest``, which resolves the lowest allowed versions instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


NEWER = ("3.14", "3.13", "3.12")
"""The CPython versions above the lock's 3.11 that :func:`_newest_python` looks for, newest
first."""


def _newest_python() -> tuple[str, str] | None:
    """The newest CPython of :data:`NEWER` on this machine, as ``(version, executable)``: on
    the ``PATH`` (``python3.13``) or installed by pyenv (``~/.pyenv/versions/3.13.*``; its
    shims only answer for the selected versions). ``None`` when there is none."""
    home = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in NEWER:
        found = [shutil.which(f"python{version}") or ""]
        found += sorted(map(str, home.glob(f"versions/{version}*/bin/python{version}")))
        for exe in found:
            if exe and subprocess.run([exe, "-c", ""], capture_output=True).returncode == 0:
                return version, exe
    return None


@nox.session(venv_backend="none")
def newer_python(session: nox.Session) -> None:
    """``tests/core`` (or the pytest arguments given) on the newest CPython above 3.11 found
    on this machine (:func:`_newest_python`), in its own environment from ``uv.lock``
    (``.nox/newer-python``): 3.12 changed how ``isinstance`` reads protocols and 3.13 how
    threading keeps its exit callbacks, which the lock's 3.11 does not see. Without one it
    says so and fails when ``CI`` is set."""
    found = _newest_python()
    if found is None:
        message = f"no CPython {', '.join(NEWER)} on this machine (PATH or pyenv)"
        if os.environ.get("CI"):
            session.error(message)
        session.skip(message)
    version, exe = found
    env = ROOT / ".nox" / "newer-python"
    session.log(f"CPython {version}: {exe}")
    session.run(
        "uv",
        "sync",
        "--all-packages",
        "--locked",
        "--python",
        exe,
        env={"UV_PROJECT_ENVIRONMENT": str(env)},
        external=True,
    )
    session.run(
        str(env / "bin" / "python"),
        "-m",
        "pytest",
        *(session.posargs or ["tests/core"]),
        external=True,
    )


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
