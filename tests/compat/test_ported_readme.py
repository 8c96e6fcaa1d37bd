"""QTasks' README and getting-started examples, ported with their call shapes."""

import anyio
import pytest

from qtasks.record import TaskStatus

WAIT = 10


def test_readme_sync_example_and_getting_started_calls() -> None:
    from qtasks import QueueTasks

    app = QueueTasks()

    @app.task(name="echo")
    def echo(text: str) -> str:
        return text

    @app.task(name="divide")
    def divide(a: int, b: int):
        return a / b

    @app.task(name="mytest")  # Regular task
    def mytest(text: str):
        return text

    try:
        with app:
            assert echo.add_task("Hello", timeout=50).returning == "Hello"
            assert divide.add_task(1, 0, timeout=50).status == "error"
            app.add_task("mytest", "Test")  # by name via the app
            mytest.add_task("Test")  # via the registered task
            assert mytest.add_task("Test", timeout=50).returning == "Test"
            assert app.add_task("divide", 1, 0, timeout=50).status is TaskStatus.ERROR
    finally:
        app.close()


@pytest.mark.anyio
async def test_readme_async_generator_example() -> None:
    from qtasks.asyncio import QueueTasks

    app = QueueTasks()

    async def gen_handler(value: int) -> int:
        return value + 1

    @app.task(generate_handler=gen_handler)
    async def counter(n: int):
        for _ in range(n):
            n += 1
            yield n

    with anyio.fail_after(WAIT):
        async with app:
            assert (await counter.add_task(5, timeout=50)).returning == [7, 8, 9, 10, 11]
