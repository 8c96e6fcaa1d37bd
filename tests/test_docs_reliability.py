"""docs/reliability.md stays true: every test it names as ``path::test_function`` exists, and
every scenario of the reliability plan has its row.

A renamed or deleted test would otherwise leave the page claiming a guarantee nothing checks.
The check is textual (a ``def``/``async def`` of that name in that file, a method of a contract
class included); parametrized ids are not part of a reference."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reliability.md"
REFERENCE = re.compile(r"`(?P<path>[\w./-]+\.py)::(?P<name>\w+)`")
SCENARIOS = [
    *(f"L{n}" for n in range(1, 5)),
    *(f"F{n}" for n in range(1, 19)),
    *(f"T{n}" for n in range(1, 7)),
    *(f"B{n}" for n in range(1, 8)),
    "S1",
]
"""The scenario ids of the plan's section 4.2, in its order."""


def references(text: str) -> list[tuple[str, str]]:
    """Every ``(path, test name)`` the page names, in order, repeats included."""
    return [(m["path"], m["name"]) for m in REFERENCE.finditer(text)]


def missing(refs: list[tuple[str, str]]) -> list[str]:
    """The references whose file does not exist or does not define that function."""
    wrong = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file():
            wrong.append(f"{path}::{name}: no such file")
        elif not re.search(rf"^\s*(async\s+)?def\s+{name}\s*\(", file.read_text(), re.M):
            wrong.append(f"{path}::{name}: no such test in the file")
    return wrong


def test_every_test_the_page_names_exists() -> None:
    refs = references(PAGE.read_text())
    assert len(refs) > 50, "the page names fewer tests than it did: is the pattern still right?"
    assert missing(refs) == []


def test_every_scenario_has_a_row_in_order() -> None:
    rows = re.findall(r"^\| ([LFTBS]\d+) \|", PAGE.read_text(), re.M)
    assert rows == SCENARIOS


def test_a_wrong_reference_is_caught() -> None:
    """The check itself: a missing file, a missing test, and a name that is only a prefix of
    a real test are reported; a test and a contract method are found."""
    refs = references(
        "`tests/nowhere.py::test_x` `tests/test_docs_reliability.py::test_nothing_like_it` "
        "`tests/test_docs_reliability.py::test_every_test` "
        "`tests/test_docs_reliability.py::test_a_wrong_reference_is_caught` "
        "`packages/qtasks-testing/src/qtasks_testing/contract/broker.py::"
        "test_stale_delivery_is_fenced`"
    )
    assert len(refs) == 5
    assert missing(refs) == [
        "tests/nowhere.py::test_x: no such file",
        "tests/test_docs_reliability.py::test_nothing_like_it: no such test in the file",
        "tests/test_docs_reliability.py::test_every_test: no such test in the file",
    ]
