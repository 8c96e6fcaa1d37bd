"""Issue 15's rule for the distributions' modules: none over ~500 lines without a reason written
at its top (``Over ~N lines: why`` in its docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

LIMIT = 500
ROOT = Path(__file__).resolve().parents[1]


def test_every_long_module_says_why_at_its_top() -> None:
    unexplained = []
    modules = sorted(ROOT.glob("packages/*/src/**/*.py"))
    assert modules, "no sources found"
    for path in modules:
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines <= LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "Over ~" not in doc or " lines" not in doc:
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not unexplained, "long modules without a reason at their top: " + ", ".join(unexplained)
