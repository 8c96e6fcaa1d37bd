"""QTasks' path ``qtasks.plugins.depends``: ``Depends`` and ``ScopeEnum``."""

from enum import StrEnum
from typing import TYPE_CHECKING

from qtasks.depends import Depends


class ScopeEnum(StrEnum):
    """QTasks' names of the ``Depends`` scopes; each equals its string (``scope="worker"``)."""

    TASK = "task"
    WORKER = "worker"
    BROKER = "broker"
    STORAGE = "storage"
    GLOBAL_CONFIG = "global_config"


__all__ = ["Depends", "ScopeEnum"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
