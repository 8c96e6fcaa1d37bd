"""QTasks' path ``qtasks.plugins.depends.sync_depends``: ``Depends`` (``qtasks.Depends``), which
QTasks re-exported there; its ``SyncDependsPlugin`` is built in (reading it says so)."""

from typing import TYPE_CHECKING

from qtasks.plugins.depends import Depends

__all__ = ["Depends"]

if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
