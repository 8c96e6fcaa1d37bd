"""QTasks' ``qtasks.executors`` path: only ``qtasks.executors.base.BaseTaskExecutor``, the type
of the ``task_executor`` a QTasks ``TaskMiddleware`` is built with (see
:mod:`qtasks.compat.middleware`). qtasks' executors are :mod:`qtasks.executor`'s."""
