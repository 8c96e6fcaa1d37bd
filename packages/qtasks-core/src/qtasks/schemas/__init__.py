"""QTasks' ``qtasks.schemas`` path; only ``TestConfig`` (here and in ``qtasks.schemas.test``)
and ``qtasks.schemas.argmeta.ArgMeta`` are provided (the other schemas are qtasks' records and
messages: :mod:`qtasks.record`, :mod:`qtasks.messages`; reading one says so)."""

from typing import TYPE_CHECKING

from qtasks.schemas.test import TestConfig

__all__ = ["TestConfig"]


if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
