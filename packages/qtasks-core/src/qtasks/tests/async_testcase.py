"""QTasks' path ``qtasks.tests.async_testcase``: ``AsyncTestCase`` (see :mod:`qtasks.tests`)."""

from qtasks.tests import AsyncTestCase

__all__ = ["AsyncTestCase"]
