"""Every example of docs/testing.md runs as written: the files it shows are written to a temporary
project and pytest runs them (with anyio's plugin and pytest-asyncio in strict mode loaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
FILES = dict(re.findall(r"```(?:python|ini)\n# file: (\S+)\n(.*?)```", DOC.read_text(), flags=re.S))


def test_the_doc_shows_files() -> None:
    assert {"pytest.ini", "myproject.py", "test_unittest_cases.py"} <= set(FILES)
    assert sum(name.startswith("test_") for name in FILES) >= 5


def test_docs_testing_examples_pass(pytester: pytest.Pytester) -> None:
    for name, text in FILES.items():
        (pytester.path / name).write_text(text)
    result = pytester.runpytest_subprocess(
        "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == 0, result.stdout.str()
    assert outcomes.get("errors", 0) == 0, result.stdout.str()
    assert "skipped" not in outcomes, result.stdout.str()
    assert outcomes["passed"] >= 11 + 20, outcomes  # examples + storage contract
