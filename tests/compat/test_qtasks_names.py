"""QTasks 1.7's names that qtasks' modules at QTasks' paths lack (``from qtasks.plugins import
AsyncDependsPlugin``): importing one says what to write instead, in the message the user sees
(CPython 3.11 replaces an ``AttributeError`` raised by a module's ``__getattr__`` during ``from
m import name`` with a bare "cannot import name"), while ``hasattr()`` still says ``False``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from qtasks.compat.names import MISSING
from qtasks.errors import (
    QTasksAttributeNotProvidedError,
    QTasksError,
    QTasksImportNotProvidedError,
    QTasksNameNotProvidedError,
)

NAMES = [(module, name) for module, names in MISSING.items() for name in names]


@pytest.mark.parametrize(("module", "name"), NAMES)
def test_importing_a_qtasks_name_qtasks_lacks_says_what_to_write(module: str, name: str) -> None:
    with pytest.raises(QTasksImportNotProvidedError) as raised:
        exec(f"from {module} import {name}", {})
    advice = MISSING[module][name]
    assert str(raised.value).startswith(f"cannot import name {name!r} from {module!r}")
    assert advice in str(raised.value)
    assert isinstance(raised.value, ImportError) and isinstance(raised.value, QTasksError)
    assert isinstance(raised.value, QTasksNameNotProvidedError)


@pytest.mark.parametrize(("module", "name"), NAMES)
def test_reading_it_as_an_attribute_is_an_attribute_error(module: str, name: str) -> None:
    loaded = importlib.import_module(module)
    assert not hasattr(loaded, name)
    with pytest.raises(QTasksAttributeNotProvidedError, match=r"QTasks 1\.7's") as raised:
        getattr(loaded, name)
    assert MISSING[module][name] in str(raised.value)
    assert str(raised.value).startswith(f"module {module!r} has no attribute {name!r}")


def test_another_missing_name_is_missing_as_python_says() -> None:
    import qtasks.plugins

    with pytest.raises(ImportError, match="cannot import name 'NoSuchName'") as raised:
        exec("from qtasks.plugins import NoSuchName", {})
    assert not isinstance(raised.value, QTasksError)
    missing = "NoSuchName"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'") as read:
        getattr(qtasks.plugins, missing)
    assert not isinstance(read.value, QTasksError)


def test_the_user_sees_the_advice_from_a_fresh_interpreter() -> None:
    """The issue's example, as a user's program runs it: the traceback's last line."""
    done = subprocess.run(
        [sys.executable, "-c", "from qtasks.plugins import AsyncDependsPlugin"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "qtasks.errors.QTasksImportNotProvidedError: cannot import name 'AsyncDependsPlugin' "
        "from 'qtasks.plugins': it is QTasks 1.7's"
    ), last
    assert "from qtasks import Depends" in last
