"""QTasks' path of the async echo task's ``self`` type."""

from typing import TYPE_CHECKING

from qtasks.context import AsyncTaskHandle as AsyncTask

__all__ = ["AsyncTask"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
