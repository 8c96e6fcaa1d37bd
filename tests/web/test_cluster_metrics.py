"""``cluster_metrics_app``: the cluster-wide gauges read from the components at each scrape,
served by uvicorn and scraped over HTTP, with a producer app and a worker app sharing the
in-memory components."""

from __future__ import annotations

import anyio
import pytest
from obs_helpers import Samples, get, parse, scrape, scrape_until, serving, value

from qtasks import AsyncQueueTasks, MemoryBroker, MemoryGlobalConfig, MemoryStorage, QueueConfig
from qtasks.components import BrokerStats
from qtasks_web.metrics import cluster_metrics_app

pytestmark = pytest.mark.anyio


async def test_cluster_gauges_from_the_components() -> None:
    broker, storage, global_config = MemoryBroker(), MemoryStorage(), MemoryGlobalConfig()

    def sharing(config: QueueConfig) -> AsyncQueueTasks:
        return AsyncQueueTasks(
            broker=broker, storage=storage, global_config=global_config, config=config
        )

    producer = sharing(QueueConfig(plugins_disabled=["*"]))
    worker = sharing(QueueConfig(plugins_disabled=["*"], max_tasks_process=3, shutdown_grace=1.0))

    @worker.task(name="t")
    async def t() -> None:
        pass

    async with serving(cluster_metrics_app(producer)) as url:
        for priority, count in ((0, 2), (5, 3)):
            for _ in range(count):
                await producer.enqueue("t", priority=priority)
        await producer.enqueue("t", delay=600)
        await producer.enqueue("no_such_task")
        samples = await scrape(url)
        assert value(samples, "qtasks_queue_depth", priority="0") == 3  # with no_such_task
        assert value(samples, "qtasks_queue_depth", priority="5") == 3
        assert value(samples, "qtasks_queue_delayed") == 1
        assert value(samples, "qtasks_dead_letters") == 0
        assert value(samples, "qtasks_workers_live") == 0
        assert value(samples, "qtasks_tasks_stored", status="new") == 7
        async with worker:

            def served(s: Samples) -> bool:
                return (
                    value(s, "qtasks_tasks_stored", status="success") == 5
                    and value(s, "qtasks_dead_letters") == 1
                    and value(s, "qtasks_workers_live") == 1
                    and value(s, "qtasks_worker_processed_total", worker=worker.worker.id) == 5
                )

            samples = await scrape_until(url, served)
            worker_id = worker.worker.id
        assert value(samples, "qtasks_queue_depth", priority="0") in (0, None)
        assert value(samples, "qtasks_queue_depth", priority="5") in (0, None)
        assert value(samples, "qtasks_queue_delayed") == 1
        assert value(samples, "qtasks_worker_concurrency", worker=worker_id) == 3
        assert value(samples, "qtasks_worker_running", worker=worker_id) == 0
        assert value(samples, "qtasks_tasks_stored", status="error") == 1
        status, _, _ = await anyio.to_thread.run_sync(get, url, "POST")
        assert status == 405
    await producer.aclose()


class DownBroker(MemoryBroker):
    async def stats(self) -> BrokerStats:
        raise ConnectionError("broker unreachable")


async def test_a_component_that_cannot_be_read_answers_503() -> None:
    app = AsyncQueueTasks(broker=DownBroker(), config=QueueConfig(plugins_disabled=["*"]))
    async with serving(cluster_metrics_app(app)) as url:
        status, _, body = await anyio.to_thread.run_sync(get, url)
    await app.aclose()
    assert status == 503
    assert "broker unreachable" in body


async def test_the_sync_app_is_accepted_and_the_body_parses() -> None:
    from qtasks import QueueTasks

    app = QueueTasks(config=QueueConfig(plugins_disabled=["*"]))
    async with serving(cluster_metrics_app(app)) as url:
        status, content_type, body = await anyio.to_thread.run_sync(get, url)
    await app.aio.aclose()
    assert (status, content_type.split(";")[0]) == (200, "text/plain")
    assert value(parse(body), "qtasks_workers_live") == 0
