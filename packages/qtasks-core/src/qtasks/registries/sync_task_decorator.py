"""QTasks' path of the sync echo task's ``self`` type."""

from qtasks.context import SyncTaskHandle as SyncTask

__all__ = ["SyncTask"]
