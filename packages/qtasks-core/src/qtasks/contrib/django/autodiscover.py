"""QTasks' path ``qtasks.contrib.django.autodiscover``: ``autodiscover_tasks`` (see
:mod:`qtasks.contrib.django`)."""

from qtasks.contrib.django import autodiscover_tasks

__all__ = ["autodiscover_tasks"]
