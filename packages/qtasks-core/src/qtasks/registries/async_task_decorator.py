"""QTasks' path of the async echo task's ``self`` type."""

from qtasks.context import AsyncTaskHandle as AsyncTask

__all__ = ["AsyncTask"]
