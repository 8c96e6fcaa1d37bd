"""docs/timers.md: its example is examples/timers.py, and that example runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_docs_example_is_the_example_file() -> None:
    doc = (ROOT / "docs" / "timers.md").read_text()
    example = (ROOT / "examples" / "timers.py").read_text()
    first_block = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert first_block == example


def test_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "timers.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "heartbeats: ['api', 'api', 'api']" in result.stdout
    assert "next report: " in result.stdout
