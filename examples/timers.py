"""Timers: a cron task and an interval task, run by the app's worker (no beat process).

Everything is in-memory; run with ``python examples/timers.py``. It serves until the interval
task ran three times, then stops.
"""

import anyio

from qtasks import AsyncQueueTasks
from qtasks_timer import AsyncTimer

app = AsyncQueueTasks()
timer = AsyncTimer(app)
done = anyio.Event()
runs: list[str] = []


@app.task
async def heartbeat(service: str) -> None:
    runs.append(service)
    if len(runs) == 3:
        done.set()


@app.task
async def nightly_report() -> str:
    return "report sent"


# Every 0.5 s (intervals are aligned to the Unix epoch, so every replica agrees on the ticks).
beat = timer.add_task("heartbeat", "api", trigger=0.5)
# 02:30 every day, Berlin time (a crontab string; 0 and 7 are Sunday).
report = timer.add_task("nightly_report", trigger="30 2 * * *", timezone="Europe/Berlin")


async def main() -> None:
    print("next report:", report.next_run_time)
    async with app:  # the worker starts, and the timers with it
        with anyio.fail_after(10):
            await done.wait()
    print("heartbeats:", runs)


if __name__ == "__main__":
    anyio.run(main)
