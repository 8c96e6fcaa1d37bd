"""``run_forever()`` in a process that set up no logging logs as ``qtasks run`` does: to stderr
at ``config.log_level``, with the "serving" line; a program's own logging is left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import logging, os, signal
from qtasks import QueueConfig, QueueTasks
{setup}
app = QueueTasks("shop", config=QueueConfig({config}))

@app.task
def stop_me() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the worker stops gracefully once this returns

stop_me.add_task()
app.run_forever()
"""


def serve(setup: str = "", config: str = "") -> str:
    """Run the script to its end; its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(setup=setup, config=config))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_an_unconfigured_process_logs_that_it_serves() -> None:
    err = serve()
    assert (
        " INFO qtasks.serving: serving 'shop': 1 task, concurrency 10; broker MemoryBroker, "
        "storage MemoryStorage, global config MemoryGlobalConfig" in err
    )
    assert "INFO qtasks: received SIGINT, stopping" in err


def test_the_configured_level_applies() -> None:
    err = serve(config='log_level="WARNING"')
    assert "serving" not in err
    assert err == ""


def test_a_programs_own_logging_is_left_alone() -> None:
    err = serve(setup='logging.basicConfig(level=logging.WARNING, format="%(message)s")')
    assert "serving" not in err
    assert err == ""


@pytest.mark.parametrize("level", ["LOUD"])
def test_an_unknown_level_is_a_config_error(level: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(setup="", config=f"log_level={level!r}")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert f"log_level: unknown level {level!r}" in done.stderr
