"""QTasks' path ``qtasks.plugins.depends``: ``Depends`` and ``ScopeEnum``."""

from enum import StrEnum

from qtasks.depends import Depends


class ScopeEnum(StrEnum):
    """QTasks' names of the ``Depends`` scopes; each equals its string (``scope="worker"``)."""

    TASK = "task"
    WORKER = "worker"
    BROKER = "broker"
    STORAGE = "storage"
    GLOBAL_CONFIG = "global_config"


__all__ = ["Depends", "ScopeEnum"]
