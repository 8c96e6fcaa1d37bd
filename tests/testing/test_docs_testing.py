"""Every example of docs/testing.md runs as written: the files it shows are written to a temporary
project and pytest runs them (with anyio's plugin and pytest-asyncio in strict mode loaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
FILES = dict(re.findall(r"```(?:python|ini)\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.S))


OPTIONS = ("-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function")


def test_the_doc_shows_files() -> None:
    assert {"pytest.ini", "myproject.py", "test_unittest_cases.py"} <= set(FILES)
    assert {"factory/pytest.ini", "factory/shop.py", "factory/test_shop.py"} <= set(FILES)
    assert sum(Path(name).name.startswith("test_") for name in FILES) >= 8


def write_files(root: Path) -> None:
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def assert_all_passed(result: pytest.RunResult, at_least: int) -> None:
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert "skipped" not in outcomes, result.stdout.str()
    assert outcomes["passed"] >= at_least, outcomes


def test_docs_testing_examples_pass(pytester: pytest.Pytester) -> None:
    write_files(pytester.path)
    # The factory project has its own pytest.ini: it runs on its own, below.
    result = pytester.runpytest_subprocess(*OPTIONS, "--ignore=factory")
    assert_all_passed(result, 14 + 20)  # examples + storage contract


def test_docs_testing_factory_example_passes(pytester: pytest.Pytester) -> None:
    write_files(pytester.path)
    result = pytester.runpytest_subprocess(*OPTIONS, "factory")
    result.stdout.fnmatch_lines(["rootdir: */factory", "configfile: pytest.ini"])  # its own ini
    assert_all_passed(result, 1)
