"""QTasks' path of the sync echo task's ``self`` type."""

from typing import TYPE_CHECKING

from qtasks.context import SyncTaskHandle as SyncTask

__all__ = ["SyncTask"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
