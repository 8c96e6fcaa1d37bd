"""The session guard of tests/conftest.py: a session whose tests leave Redis keys behind fails,
and keys written under the default prefix are reported (and fail the session under CI).

Each case runs a small test session through ``pytester`` with the suite's own conftest.py and
redis_keys.py, against the real Redis.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parents[1]

LEAVES_A_KEY = """
import redis
from redis_keys import SESSION_TAG


def test_leaves_a_key(redis_url, redis_prefix):
    client = redis.Redis.from_url(redis_url)
    client.set("{" + redis_prefix + ":rec}:deleted-by-the-fixture", 1)
    # A prefix made by hand, which nobody cleans up.
    client.set("{" + SESSION_TAG + "-by-hand:rec}:forgotten", 1)
"""

CLEAN = """
import redis


def test_cleans_up(redis_url, redis_prefix):
    redis.Redis.from_url(redis_url).set("{" + redis_prefix + ":rec}:kept-until-teardown", 1)
"""

DEFAULT_PREFIX = """
import redis


def test_writes_under_the_default_prefix(redis_url):
    redis.Redis.from_url(redis_url).set("{qtasks:rec}:KEY", 1)
"""


# The suite's conftest.py and the helper modules it imports.
CONFTEST_FILES = ("conftest.py", "redis_keys.py", "skips.py", "start_wait_logs.py")


def session(pytester: pytest.Pytester, tests: str) -> None:
    for name in CONFTEST_FILES:
        (pytester.path / name).write_text((TESTS / name).read_text())
    pytester.makepyfile(test_probe=tests)


def test_the_copied_files_are_all_conftest_imports() -> None:
    """A module conftest.py imports from tests/ and the copy lacks fails every case with a
    usage error, not with the guard's verdict: the list is kept whole here."""
    imported = {
        line.split()[1] + ".py"
        for line in (TESTS / "conftest.py").read_text().splitlines()
        if line.startswith("from ") and (TESTS / (line.split()[1] + ".py")).is_file()
    }
    assert imported <= set(CONFTEST_FILES)


def test_a_session_that_leaves_keys_fails(pytester: pytest.Pytester, redis_url: str) -> None:
    session(pytester, LEAVES_A_KEY)
    client = redis.Redis.from_url(redis_url)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
        result.stdout.fnmatch_lines(
            [
                "*Redis keys left behind*",
                "*left 1 Redis key(s) behind*",
                "*-by-hand:rec}:forgotten (ttl -1)",
                "*1 passed*",
            ]
        )
    finally:
        for key in client.scan_iter(match="*-by-hand:rec}:forgotten"):
            client.delete(key)
        client.close()


def test_a_session_that_cleans_up_passes(pytester: pytest.Pytester, redis_url: str) -> None:
    session(pytester, CLEAN)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    # (Keys under the default prefix may be reported: other processes share this Redis.)
    assert "Redis key(s) behind" not in result.stdout.str()


@pytest.mark.parametrize("ci", [False, True])
def test_keys_under_the_default_prefix_are_reported(
    pytester: pytest.Pytester, redis_url: str, monkeypatch: pytest.MonkeyPatch, ci: bool
) -> None:
    key = f"guard-probe-{uuid.uuid4().hex[:8]}"
    session(pytester, DEFAULT_PREFIX.replace("KEY", key))
    if ci:
        monkeypatch.setenv("CI", "1")
    else:
        monkeypatch.delenv("CI", raising=False)
    client = redis.Redis.from_url(redis_url)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        # Locally another process sharing the Redis may have written it: reported only.
        expected = pytest.ExitCode.TESTS_FAILED if ci else pytest.ExitCode.OK
        assert result.ret == expected, result.stdout.str()
        result.stdout.fnmatch_lines(
            ["*appeared under the default prefix 'qtasks'*", f"*{{qtasks:rec}}:{key} (no ttl)"]
        )
    finally:
        client.delete(f"{{qtasks:rec}}:{key}")
        client.close()
