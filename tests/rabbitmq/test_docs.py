"""The example in docs/rabbitmq.md runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import URL, delete_topology

DOC = Path(__file__).parents[2] / "docs" / "rabbitmq.md"

pytestmark = pytest.mark.rabbitmq


def test_docs_example_runs(rabbitmq_url: str) -> None:
    [code] = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
    finally:
        import asyncio

        from qtasks_rabbitmq import Topology

        assert URL
        asyncio.run(delete_topology(Topology("docs-example")))


def test_readme_example_runs(rabbitmq_url: str, tmp_path: Path) -> None:
    """The example of packages/qtasks-rabbitmq/README.md, on a queue of its own."""
    import asyncio
    import uuid

    from test_release import run_readme_example

    from qtasks_rabbitmq import Topology

    queue = f"readme-{uuid.uuid4().hex[:8]}"
    try:
        run_readme_example("qtasks-rabbitmq", tmp_path, {"rabbitmq_queue": queue})
    finally:
        asyncio.run(delete_topology(Topology(queue)))


def test_where_the_code_lives_names_every_module() -> None:
    """The page's module map named every module but errors.py; a module added later is
    named there too."""
    import qtasks_rabbitmq

    section = DOC.read_text().split("## Where the code lives", 1)[1]
    package = Path(qtasks_rabbitmq.__file__).parent
    modules = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert not {name for name in modules if f"`{name}`" not in section}
