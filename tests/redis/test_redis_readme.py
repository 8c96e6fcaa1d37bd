"""The example of packages/qtasks-redis/README.md runs against the real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_release import run_readme_example

pytestmark = pytest.mark.redis


def test_readme_example_runs(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    run_readme_example("qtasks-redis", tmp_path, {"redis_prefix": redis_prefix}, redis_url)
