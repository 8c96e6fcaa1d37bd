"""Release metadata: one version for the set, compatible sibling bounds, a license and an index
page in every published distribution (``packages/*``)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import qtasks

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))
NAMES = [p.name for p in PACKAGES]


def project(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((path / "pyproject.toml").read_text())["project"]
    return data


VERSION: str = project(ROOT)["version"]


def test_the_published_set() -> None:
    assert NAMES == [
        "qtasks-core",
        "qtasks-rabbitmq",
        "qtasks-redis",
        "qtasks-testing",
        "qtasks-timer",
        "qtasks-web",
    ]


@pytest.mark.parametrize("package", PACKAGES, ids=NAMES)
def test_one_version_and_a_compatible_core_bound(package: Path) -> None:
    meta = project(package)
    assert meta["name"] == package.name
    assert meta["version"] == VERSION, "run `nox -s set_version -- X.Y.Z` to change versions"
    major, minor, _ = VERSION.split(".")
    wanted = f"qtasks-core>={VERSION},<{major}.{int(minor) + 1}"
    siblings = [d for d in meta["dependencies"] if re.match(r"qtasks-", d)]
    if package.name == "qtasks-core":
        assert siblings == []
    else:
        assert siblings == [wanted]
    # What is installed here was built from these files.
    assert importlib.metadata.version(package.name) == VERSION


def test_the_import_package_reports_the_distribution_version() -> None:
    assert qtasks.__version__ == VERSION


@pytest.mark.parametrize("package", PACKAGES, ids=NAMES)
def test_license_classifiers_and_authors(package: Path) -> None:
    meta = project(package)
    assert meta["license"] == "MIT"
    assert meta["license-files"] == ["LICENSE"]
    assert (package / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert meta["authors"]
    assert meta["requires-python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in meta["classifiers"]
    assert "Typing :: Typed" in meta["classifiers"]
    assert list(package.glob("src/*/py.typed")), "Typing :: Typed needs a py.typed marker"
    # PEP 639: a license expression and a license classifier must not both be given.
    assert not [c for c in meta["classifiers"] if c.startswith("License ::")]


@pytest.mark.parametrize("package", PACKAGES, ids=NAMES)
def test_readme_is_an_index_page(package: Path) -> None:
    meta = project(package)
    assert meta["readme"] == "README.md"
    text = (package / "README.md").read_text()
    assert text.startswith(f"# {package.name}\n")
    for heading in ("## Install", "## Example", "## Documentation"):
        assert heading in text, f"{package.name}/README.md has no {heading!r}"
    assert "```python\n" in text
    assert "not the `qtasks` distribution" in text  # the name clash, on every index page


def readme_example(name: str) -> tuple[str, str]:
    """The Python example of a distribution's README and the output its last comment promises."""
    text = (ROOT / "packages" / name / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [promised] = re.findall(r"print\(.*\)  # (.+)$", code, flags=re.M)
    return code, promised


def run_readme_example(
    name: str, tmp_path: Path, extra: dict[str, str] | None = None, redis_url: str | None = None
) -> None:
    """Run ``name``'s README example as a script; ``extra`` becomes ``$QTASKS_EXTRA``, and
    ``redis_url`` (the fixture's) replaces the Redis URL the example names."""
    import json
    import os
    import subprocess
    import sys

    from redis_keys import on_test_redis

    code, promised = readme_example(name)
    if redis_url is not None:
        code = on_test_redis(code, redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QTASKS_")}
    if extra:
        env["QTASKS_EXTRA"] = json.dumps(extra)
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == promised


@pytest.mark.parametrize("name", ["qtasks-core", "qtasks-timer", "qtasks-testing", "qtasks-web"])
def test_readme_example_runs(name: str, tmp_path: Path) -> None:
    """The in-memory examples; Redis's and RabbitMQ's run in tests/redis and tests/rabbitmq."""
    run_readme_example(name, tmp_path)


def test_the_install_page_lists_the_declared_bounds() -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    for package in PACKAGES:
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{package.name}` |")]
        for requirement in project(package)["dependencies"]:
            name, *versions = (part for part in re.split(r"[<>=!~,]+", requirement) if part)
            if name != "qtasks-core":
                assert name in row and all(v in row for v in versions), (requirement, row)
