"""How ``.ci/run`` reads ``QTASKS_TEST_REDIS`` (``.ci/redis_url.bash``, sourced here as there,
under ``set -euo pipefail``): host, port, TLS and credentials, an IPv6 host in brackets, and
never a credential in what it prints. It took ``[`` for the host of ``redis://[::1]:6379/0``
(and redis-cli's ``-u`` cannot read that URL either), and probed ``rediss://`` without
``--tls``. ``.ci/run`` itself is not run: it runs the whole suite."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from skips import unavailable

LIB = Path(__file__).resolve().parents[1] / ".ci" / "redis_url.bash"
SECRET = "s3cr@t-pw"
"""A password the tests give in URLs (percent-encoded there) and look for in the output."""

PARSE = """
set -euo pipefail
source "$1"
parse_redis_url "$2"
redis_cli_options
printf '%s\\n' "host=$redis_host" "port=$redis_port" "tls=$redis_tls" "user=$redis_user" \\
  "shown=$redis_shown" "args=${redis_cli_args[*]}"
if [[ $redis_password == "$3" ]]; then echo password=as-given; else echo password=other; fi
if redis_loopback; then echo loopback=yes; else echo loopback=no; fi
"""


def bash(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script, "bash", str(LIB), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def parsed(url: str, password: str = "") -> dict[str, str]:
    """What ``parse_redis_url`` and ``redis_cli_options`` made of ``url``; ``password``: the
    one it should have decoded (compared in bash, never printed)."""
    done = bash(PARSE, url, password)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert SECRET not in done.stdout and "%40" not in done.stdout, done.stdout
    return dict(line.split("=", 1) for line in done.stdout.splitlines())


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "shown", "loopback"),
    [
        ("redis://127.0.0.1:6390/0", "127.0.0.1", "6390", "0", "127.0.0.1:6390", "yes"),
        ("redis://[::1]:6379/0", "::1", "6379", "0", "[::1]:6379", "yes"),
        ("redis://[::1]", "::1", "6379", "0", "[::1]:6379", "yes"),
        ("rediss://localhost:6380", "localhost", "6380", "1", "localhost:6380", "yes"),
        ("redis://10.1.2.3/2?socket_timeout=5", "10.1.2.3", "6379", "0", "10.1.2.3:6379", "no"),
        ("rediss://[2001:db8::7]:7000/0", "2001:db8::7", "7000", "1", "[2001:db8::7]:7000", "no"),
    ],
)
def test_host_port_and_tls(
    url: str, host: str, port: str, tls: str, shown: str, loopback: str
) -> None:
    got = parsed(url)
    assert (got["host"], got["port"], got["tls"], got["shown"]) == (host, port, tls, shown)
    assert got["loopback"] == loopback
    assert got["args"] == f"-h {host} -p {port}" + (" --tls" if tls == "1" else "")
    assert (got["user"], got["password"]) == ("", "as-given")  # none


def test_credentials_are_decoded_and_never_printed() -> None:
    encoded = SECRET.replace("@", "%40")
    got = parsed(f"redis://:{encoded}@127.0.0.1:6379/1", SECRET)
    assert (got["host"], got["port"], got["tls"], got["user"]) == ("127.0.0.1", "6379", "0", "")
    assert got["password"] == "as-given"
    assert got["args"] == "-h 127.0.0.1 -p 6379"  # the password goes through REDISCLI_AUTH
    got = parsed("redis://:secret@127.0.0.1:6379/1", "secret")
    assert (got["host"], got["port"], got["password"]) == ("127.0.0.1", "6379", "as-given")
    got = parsed(f"rediss://ci:{encoded}@[::1]:6380", SECRET)
    assert (got["host"], got["port"], got["tls"], got["user"]) == ("::1", "6380", "1", "ci")
    assert (got["password"], got["args"]) == ("as-given", "-h ::1 -p 6380 --user ci --tls")


@pytest.mark.parametrize(
    "url",
    [
        f"http://:{SECRET}@127.0.0.1:6379/0",
        f":{SECRET}@127.0.0.1:6379",
        f"redis://:{SECRET}@[::1:6379/0",
        f"redis://:{SECRET}@[::1]x/0",
        f"redis://:{SECRET}@127.0.0.1:99999/0",
        f"redis://:{SECRET}@127.0.0.1:63x9/0",
        f"redis://:{SECRET}@/0",
        "redis://ci:pw-without-at/0",  # no "@": read as host ci, port pw-without-at
    ],
)
def test_a_url_it_cannot_read_is_refused_without_its_password(url: str) -> None:
    done = bash(PARSE, url, "")
    assert done.returncode == 1, done
    assert done.stdout == "" and done.stderr.startswith("QTASKS_TEST_REDIS: "), done
    assert SECRET not in done.stderr and "pw-without-at" not in done.stderr, done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_the_probe_reaches_the_local_redis_at_either_address(host: str) -> None:
    """``redis_ping`` against the real server (127.0.0.1:6379, which .ci/run binds to ::1
    as well); redis-cli's ``-u`` does not read ``[::1]``, the old probe failed there."""
    address = host.strip("[]")
    try:
        socket.create_connection((address, 6379), timeout=1).close()
    except OSError:
        unavailable(f"no Redis listening at {host}:6379")
    done = bash(
        'set -euo pipefail; source "$1"; parse_redis_url "$2"; redis_ping', f"redis://{host}:6379/0"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done
