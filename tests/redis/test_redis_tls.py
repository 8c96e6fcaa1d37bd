"""``rediss://`` takes the fast lane: its connections are TLS ones, made with the context
redis-py makes of the URL (``ssl_ca_certs``, hostname check...), so a TLS Redis gets the same
pipelined client and shared result waits as a plain one (before, redis-py served everything:
a connection per command in flight and per wait). On a redis-server of the test's own with a
TLS port, whose certificate is tests/redis/untrusted_tls.pem (self-signed, for 127.0.0.1):
trusted here by naming it as the CA."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis_procs import RedisServer, free_port, start_server
from wait_apps import lane_of, make_app

from qtasks import TaskStatus
from qtasks_redis.connection import RedisTarget
from qtasks_redis.failures import tls_refused
from qtasks_redis.lane import lane_for

pytestmark = pytest.mark.anyio

PEM = Path(__file__).with_name("untrusted_tls.pem")


class TlsServer:
    def __init__(self, server: RedisServer, tls_port: int) -> None:
        self.server = server
        self.tls_port = tls_port

    def url(self, ca: Path = PEM) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={ca}"

    def tls_clients(self) -> int:
        """Connections to the TLS port (the test's own admin client uses the plain one)."""
        with redis.Redis.from_url(self.server.url) as admin:
            return sum(c["laddr"].endswith(f":{self.tls_port}") for c in admin.client_list())


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsServer]:
    port = free_port()
    args = ["--tls-port", str(port), "--tls-cert-file", str(PEM), "--tls-key-file", str(PEM)]
    args += ["--tls-ca-cert-file", str(PEM), "--tls-auth-clients", "no"]
    server = start_server(tmp_path, fsync="no", extra=args)
    yield TlsServer(server, port)
    server.close()


async def test_a_tls_url_is_served_by_the_lane_over_tls(tls: TlsServer) -> None:
    producer = make_app(tls.url(), redis_wait_connections=0)  # the waits on the watch too
    worker = make_app(tls.url(), concurrency=20)
    await producer.start()
    try:
        lane = lane_of(producer)
        assert isinstance(lane._tls, ssl.SSLContext)
        assert lane._tls.verify_mode is ssl.CERT_REQUIRED  # redis-py's default, kept
        tasks = [await producer.add_task("double", i) for i in range(200)]
        records = []

        async def wait(uuid: str) -> None:
            records.append(await producer.wait(uuid, 30))

        async with anyio.create_task_group() as waits:
            for task in tasks:
                waits.start_soon(wait, task.uuid)
            async with anyio.create_task_group() as serving:
                serving.start_soon(worker.serve)
                with anyio.fail_after(30):
                    while len(records) < len(tasks):  # noqa: ASYNC110 - the waits' own list
                        await anyio.sleep(0.01)
                # Every connection of both apps is on the TLS port: the producer's lane, its
                # watch, the worker's consumers; 200 waits did not open 200.
                assert 3 <= tls.tls_clients() <= 30
                serving.cancel_scope.cancel()
        assert sorted(r.returning for r in records) == [2 * i for i in range(200)]
        assert {r.status for r in records} == {TaskStatus.SUCCESS}
    finally:
        await producer.aclose()


async def test_the_lane_checks_the_servers_certificate(tls: TlsServer, tmp_path: Path) -> None:
    """A CA that did not sign the server's certificate: the lane's connect fails with the
    certificate error as its cause, which qtasks reads as a refusal (no retry mends it)."""
    wrong = tmp_path / "wrong-ca.pem"
    wrong.write_text(_a_certificate_of_another_ca())
    trusted = lane_for(RedisTarget.parse(tls.url()), {})
    refused = lane_for(RedisTarget.parse(tls.url(wrong)), {})
    assert trusted is not None and refused is not None
    try:
        await trusted.check()  # the server's own certificate named as the CA: it verifies
        with pytest.raises(RedisConnectionError) as caught:
            await refused.check()
        assert isinstance(tls_refused(caught.value), ssl.SSLCertVerificationError)
    finally:
        trusted.close()
        refused.close()


def _a_certificate_of_another_ca() -> str:
    """A CA certificate that did not sign the server's: the first of this machine's bundle."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and Path(path).is_file():
            text = Path(path).read_text()
            end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
            return text[text.index("-----BEGIN CERTIFICATE-----") : end] + "\n"
    pytest.fail("no CA bundle on this machine to take a certificate from")
