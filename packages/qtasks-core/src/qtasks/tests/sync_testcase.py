"""QTasks' path ``qtasks.tests.sync_testcase``: ``SyncTestCase`` (see :mod:`qtasks.tests`)."""

from qtasks.tests import SyncTestCase

__all__ = ["SyncTestCase"]
