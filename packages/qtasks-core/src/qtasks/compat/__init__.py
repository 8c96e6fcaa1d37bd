"""Compatibility with QTasks 1.7: the names, call shapes and plugins its apps use.

Each module here maps a QTasks form onto the qtasks one (docs/coming-from-qtasks.md lists them,
and every difference that remains):

* :mod:`qtasks.compat.config`: QTasks' ``QueueConfig`` field names and ``QTASKS_*`` variables.
* :mod:`qtasks.compat.url`: ``QueueTasks(broker_url="redis://...")``.
* :mod:`qtasks.compat.plugins`: ``BasePlugin`` subclasses with ``trigger(name, **kwargs)``.
* :mod:`qtasks.compat.events`: ``app.events.on.<event>()`` handlers.

This package imports nothing at import time, so :mod:`qtasks.config` can use its config module.
"""
