"""The examples in docs/context.md, state.md, depends.md and generators.md run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ["context.md", "state.md", "depends.md", "generators.md"]


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        text = (DOCS / page).read_text()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            found.append((page, i, block))
    return found


@pytest.mark.parametrize(("page", "index", "code"), blocks(), ids=lambda v: str(v)[:14])
def test_doc_example_runs(page: str, index: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / f"{page}_{index}.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{page} example {index}:\n{result.stderr}"
    # A log format that only some records can fill breaks the others (logging prints this).
    assert "--- Logging error ---" not in result.stderr, result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout


def test_every_page_has_an_example() -> None:
    assert {page for page, _, _ in blocks()} == set(PAGES)
