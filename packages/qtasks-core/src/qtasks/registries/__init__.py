"""QTasks' ``qtasks.registries``: the types of an echo task's ``self``.

``AsyncTask`` here is the handle an ``async def`` echo task receives and ``SyncTask`` the one
a plain ``def`` task receives (not :class:`qtasks.AsyncTask`, the record ``add_task`` returns).
"""

from typing import TYPE_CHECKING

from qtasks.context import AsyncTaskHandle as AsyncTask
from qtasks.context import SyncTaskHandle as SyncTask

__all__ = ["AsyncTask", "SyncTask"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
