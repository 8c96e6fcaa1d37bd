"""QTasks kept each app's Redis keys under its name (``{name}:task_queue``, ``{name}:<uuid>``):
two apps with different names built with ``broker_url=`` on one Redis were apart. In qtasks the
name is their key prefix too, so one's worker never takes the other's tasks (it would reject
them as unknown) and one's ``flush_all`` leaves the other's records."""

from __future__ import annotations

import pytest

from qtasks import QueueConfig, QueueTasks
from qtasks.errors import ConfigError


def test_apps_named_apart_share_no_queue_nor_records(redis_url: str, prefix: str) -> None:
    billing = QueueTasks(name=f"{prefix}-billing", broker_url=redis_url)
    mailer = QueueTasks(name=f"{prefix}-mailer", broker_url=redis_url)

    @billing.task
    def charge(x: int) -> str:
        return f"charged {x}"

    @mailer.task
    def send(x: int) -> str:
        return f"sent {x}"

    try:
        waiting = mailer.add_task("send", 1)  # no mailer worker runs
        assert billing.inspect()["queue"]["ready_by_priority"] == {}
        assert mailer.inspect()["queue"]["ready_by_priority"] == {"0": 1}
        with billing:  # billing's worker takes billing's tasks only
            assert billing.add_task("charge", 2, timeout=10).returning == "charged 2"
        assert billing.flush_all()["storage"] > 0
        kept = mailer.get(waiting.uuid)
        assert kept is not None and kept.status == "new"
        with mailer:
            assert waiting.wait_result(timeout=10).returning == "sent 1"
    finally:
        billing.close()
        mailer.close()


def test_the_default_name_and_an_explicit_prefix_keep_their_prefix(redis_url: str) -> None:
    plain = QueueTasks(broker_url=redis_url)
    assert plain.aio.broker.prefix == "qtasks"  # type: ignore[attr-defined]
    given = QueueTasks(
        name="billing", broker_url=redis_url, config=QueueConfig(extra={"redis_prefix": "bx"})
    )
    assert given.aio.broker.prefix == "bx"  # type: ignore[attr-defined]
    assert given.aio.storage.prefix == "bx"  # type: ignore[attr-defined]


def test_a_name_that_cannot_be_a_prefix_says_what_to_write(redis_url: str) -> None:
    with pytest.raises(ConfigError, match=r"redis_prefix"):
        QueueTasks(name="app{1}", broker_url=redis_url)
