"""A sync app used before ``os.fork()`` works in the child (review r19 #6): the child forgets
the parent's portal, whose thread it does not have, and starts its own on first use. The
scenario is in tests/fork_scenarios.py, shared with the Redis test."""

from __future__ import annotations

from pathlib import Path

import pytest
from fork_scenarios import run_forked


@pytest.mark.parametrize("serving", [False, True], ids=["used", "serving"])
@pytest.mark.parametrize("how", ["os.fork", "multiprocessing"])
def test_a_forked_child_starts_afresh(tmp_path: Path, how: str, serving: bool) -> None:
    run_forked(tmp_path, "QueueTasks('forked')", "", how, serving)
