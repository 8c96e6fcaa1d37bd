"""QTasks' path ``qtasks.tests.sync_testcase``: ``SyncTestCase`` (see :mod:`qtasks.tests`)."""

from typing import TYPE_CHECKING

from qtasks.tests import SyncTestCase

__all__ = ["SyncTestCase"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
