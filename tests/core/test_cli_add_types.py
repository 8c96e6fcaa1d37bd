"""``qtasks add`` checks each argument against its parameter's plain annotation before
enqueueing: ``qtasks add square abc`` for ``def square(x: int)`` enqueued a task that failed
only when it ran. Served as in test_cli: the CLI reaches the app through its portal."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from qtasks.cli import cli

APP_SOURCE = """
from typing import Annotated, Any, Optional

from pydantic import BaseModel

from qtasks import QueueConfig, QueueTasks


class Item(BaseModel):
    name: str
    size: int

app = QueueTasks(
    "cli-types",
    config=QueueConfig(plugins_disabled=["*"], shutdown_grace=1.0, heartbeat_interval=60.0),
)

@app.task
def square(x: int) -> int:
    return x * x

@app.task
def scale(x: float, times: int | None = None, label: Optional[str] = None) -> float:
    return x * (times or 1)

@app.task
def greet(name: str, loud: bool = False, tags: list[str] | None = None, meta: dict = {}) -> str:
    return name

@app.task
def total(*nums: Annotated[int, "counts"], **weights: float) -> float:
    return sum(nums) + sum(weights.values())

@app.task
def login(user: str, password: int) -> None:
    pass

@app.task
def pack(item: Item, count: int = 1) -> int:
    return item.size * count

@app.task
def loose(x, y: Any, z: int | bytes) -> None:
    pass
"""

runner = CliRunner()


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app module served in the background; yields the ``-A`` target."""
    name = f"typesapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module: ModuleType = importlib.import_module(name)
    try:
        with module.app:
            yield f"{name}:app"
    finally:
        module.app.close()
        sys.modules.pop(name, None)


def add(served: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(cli, ["add", "-A", served, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output.strip()


def recorded(served: str) -> int:
    """How many task records the app's storage holds (``qtasks inspect``)."""
    result = runner.invoke(cli, ["inspect", "-A", served, "--json"])
    assert result.exit_code == 0, result.output
    return sum(json.loads(result.output)["records_by_status"].values())


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["square", "abc"],
            "task 'square': parameter 'x' expects int, got 'abc' (str); an ARG is JSON when it "
            "parses (5, 2.5, true, null, [1], {}), else text",
        ),
        (["square", "2.5"], "task 'square': parameter 'x' expects int, got 2.5 (float)"),
        (["square", "true"], "task 'square': parameter 'x' expects int, got True (bool)"),
        (["square", "--kwargs", '{"x": null}'], "'square': parameter 'x' expects int, got None"),
        (["scale", "[1]"], "task 'scale': parameter 'x' expects float, got [1] (list)"),
        (["scale", "1", "1.5"], "parameter 'times' expects int | None, got 1.5 (float)"),
        (["scale", "1", "--kwargs", '{"label": 3}'], "'label' expects Optional[str], got 3 (int)"),
        (
            ["greet", "5"],
            "task 'greet': parameter 'name' expects str, got 5 (int); to pass it as text, give "
            """a JSON string: '"5"'""",
        ),
        (["greet", "ann", "yes"], "parameter 'loud' expects bool, got 'yes' (str)"),
        (["greet", "ann", "false", "{}"], "'tags' expects list[str] | None, got {} (dict)"),
        (["greet", "ann", "false", "null", "[]"], "'meta' expects dict, got [] (list)"),
        (["total", "1", "2", "x"], "task 'total': parameter 'nums[2]' expects int, got 'x'"),
        (["total", "--kwargs", '{"a": "heavy"}'], "parameter \"weights['a']\" expects float"),
        # A model's own validation, and the other parameters of its task checked after it.
        (["pack", '{"name": "a", "size": "big"}'], "parameter 'item' (Item) is invalid: size:"),
        (["pack", "a", "big", "1"], "task 'pack': parameter 'item' (Item) is invalid: size:"),
        (["pack", '{"name": "a", "size": 2}', "x"], "parameter 'count' expects int, got 'x'"),
        (["pack", "a", "2", "x"], "task 'pack': parameter 'count' expects int, got 'x' (str)"),
        # A parameter named like a secret: its value is not shown.
        (["login", "ann", "hunter2"], "parameter 'password' expects int, got *** (str)"),
        (
            ["total", "--kwargs", '{"token": "hunter2"}'],
            "\"weights['token']\" expects float, got ***",
        ),
        (
            ["greet", "null"],
            """'name' expects str, got None; to pass it as text, give a JSON string: '"null"'""",
        ),
        # A keyword written as an ARG went, as text, to the next positional parameter: an
        # unannotated one took it without a word (walk-through of docs/cli.md).
        (
            ["loose", "1", "y=2.5", "3"],
            "task 'loose': ARG y=... looks like a keyword argument, which qtasks add takes as "
            """--kwargs '{"y": 2.5}'; to pass the text as it is, give a JSON string ('"y=..."')""",
        ),
        (["greet", "ann", "loud=true"], """--kwargs '{"loud": true}'"""),
        (["login", "ann", "password=hunter2"], "ARG password=... looks like a keyword argument"),
    ],
)
def test_an_argument_of_the_wrong_json_type_is_refused_before_enqueueing(
    served: str, args: list[str], error: str
) -> None:
    code, out = add(served, *args)
    assert code == 1, out
    assert out.startswith("error: ") and error in out, out
    assert "hunter2" not in out
    assert recorded(served) == 0  # nothing enqueued


def test_arguments_that_fit_or_are_not_plainly_annotated_are_enqueued(served: str) -> None:
    """An int is a fine float, null a fine optional; a parameter with no annotation, ``Any``
    or a type JSON has not (``bytes``) is not checked; a call that does not bind is left to
    the enqueue's own error; --force enqueues a task the app lacks unchecked."""
    fine = [
        ["square", "3"],
        ["scale", "2", "null", '"x"'],
        ["scale", "2.5", "--kwargs", '{"times": 3}'],
        ["greet", '"5"', "true", '["a"]', '{"k": 1}'],
        ["total", "1", "2", "--kwargs", '{"a": 1, "b": 0.5}'],
        ["pack", '{"name": "a", "size": 2}', "3"],
        ["pack", "a", "2", "--kwargs", '{"count": 3}'],
        ["loose", "abc", "[1]", "text"],
        ["loose", "abc", '"y=2"', "w=3"],  # the text given as JSON; w= names no parameter
        ["greet", "nobody=x"],  # no parameter of that name: text
        ["elsewhere", "abc", "--force"],
    ]
    for args in fine:
        code, out = add(served, *args)
        assert code == 0, (args, out)
    code, out = add(served, "square", "1", "2")
    assert code == 1 and "task 'square': too many positional arguments" in out, out
    assert recorded(served) == len(fine)
