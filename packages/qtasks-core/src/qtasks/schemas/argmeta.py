"""``from qtasks.schemas.argmeta import ArgMeta`` (QTasks' path), for QTasks plugins that read
``args_info`` at ``task_executor_args_replace`` (see :mod:`qtasks.compat.plugins`)."""

from qtasks.compat.plugins import ArgMeta

__all__ = ["ArgMeta"]
