"""QTasks' path ``qtasks.tests.async_testcase``: ``AsyncTestCase`` (see :mod:`qtasks.tests`)."""

from typing import TYPE_CHECKING

from qtasks.tests import AsyncTestCase

__all__ = ["AsyncTestCase"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
