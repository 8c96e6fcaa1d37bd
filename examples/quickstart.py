"""Quickstart: define tasks, serve them in this process, enqueue, print results.

Everything is in-memory: no server is needed. Run with ``python examples/quickstart.py``.
"""

import asyncio

from qtasks import QueueTasks

app = QueueTasks()


@app.task
def add(a: int, b: int) -> int:
    return a + b


@app.task(retry=2, retry_backoff=0)
async def fetch(url: str) -> dict[str, object]:
    await asyncio.sleep(0.01)  # stands in for real I/O
    return {"url": url, "status": 200}


@app.task(priority=1)
def countdown(n: int):  # a generator task: every step is stored as it happens
    while n > 0:
        yield n
        n -= 1


if __name__ == "__main__":
    with app:  # starts a worker in the background
        print("add:", app.add_task("add", 2, 3, timeout=5).returning)
        print("fetch:", fetch.add_task("https://example.org", timeout=5).returning)
        task = countdown.add_task(3)
        print("countdown steps:", list(task.stream(timeout=5)))
        print("countdown:", task.wait_result(timeout=5).returning)
    app.close()
