"""QTasks' path ``qtasks.plugins.states.async_state``: ``AsyncState`` (:mod:`qtasks.state`), which
QTasks re-exported there; its ``AsyncStatePlugin`` is built in (reading it says so)."""

from typing import TYPE_CHECKING

from qtasks.plugins.states import AsyncState

__all__ = ["AsyncState"]

if not TYPE_CHECKING:  # a type checker reports QTasks' names qtasks lacks as missing
    from qtasks.compat.names import refuse

    __getattr__ = refuse(__name__)
