"""The qtasks plugin that starts an app's timers with its worker and reports them to
``qtasks inspect``.

It is registered by ``AsyncTimer(app)``, or loaded through the ``qtasks.plugins`` entry point
(``timer``) as ``TimerPlugin()``: an unbound plugin creates the app's timer itself when the
configuration declares timers (``[[extra.timers]]``, see :mod:`qtasks_timer.settings`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qtasks import hookimpl
from qtasks.importing import importing
from qtasks_timer.errors import TimerError
from qtasks_timer.settings import TimerSettings
from qtasks_timer.timer import FIRING, HEADER, SKIP_UNFIT, AsyncTimer

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.config import QueueConfig
    from qtasks.messages import Message


class TimerPlugin:
    """Hook implementations of qtasks-timer for one app."""

    name = "qtasks-timer"

    def __init__(self, timer: AsyncTimer | None = None) -> None:
        self.timer = timer
        self._on_import = importing()
        """Whether :attr:`timer` was attached while a module was imported: the module's timer,
        which a test harness leaves bound (see :meth:`qtasks_app_restored`)."""

    @classmethod
    def from_config(cls, config: QueueConfig) -> TimerPlugin:
        """The entry-point plugin of an app built with ``config``. The configuration's timers
        are checked here, so a malformed one fails building the app (as a
        :class:`~qtasks.errors.PluginError` naming the entry): found when the worker starts,
        its error would be logged and ignored like any notification hook's, and the worker
        would serve without any of its timers."""
        TimerSettings.from_config(config)
        return cls()

    @classmethod
    def bind(cls, app: AsyncQueueTasks, timer: AsyncTimer) -> TimerPlugin:
        """Attach ``timer`` to the app's plugin (registering one if there is none)."""
        for plugin in app.hooks.pm.get_plugins():
            if isinstance(plugin, cls):
                if plugin.timer is not None and plugin.timer is not timer:
                    raise TimerError(
                        f"app {app.name!r} already has a timer; add every timer to that one"
                    )
                plugin.timer = timer
                plugin._on_import = importing()
                return plugin
        plugin = cls(timer)
        app.add_plugin(plugin)
        return plugin

    def _timer(self, app: AsyncQueueTasks) -> AsyncTimer | None:
        """This plugin's timer; ``None`` when there is none or another TimerPlugin of the app
        (say, the entry-point one besides one added in code) owns it, so timers run once."""
        if self.timer is None:
            for plugin in app.hooks.pm.get_plugins():
                if isinstance(plugin, TimerPlugin) and plugin.timer is not None:
                    return None
            if TimerSettings.declared(app.config):
                token = SKIP_UNFIT.set(True)  # as the worker starts: one unfit timer, not all
                try:
                    AsyncTimer(app)  # binds itself to one TimerPlugin of the app
                finally:
                    SKIP_UNFIT.reset(token)
        return self.timer

    @hookimpl
    async def qtasks_component_started(
        self, app: AsyncQueueTasks, kind: str, component: Any
    ) -> None:
        """When the worker starts, start the timers in the app's task group (they are
        cancelled there when the app stops)."""
        if kind != "worker":
            return
        timer = self._timer(app)
        if timer is not None:
            # One timer whose arguments do not fit its task is left out, not every timer.
            token = SKIP_UNFIT.set(True)
            try:
                await app.task_group.start(timer.run, name="qtasks timer")
            finally:
                SKIP_UNFIT.reset(token)

    @hookimpl
    def qtasks_app_restored(self) -> None:
        """A test harness closed: a timer attached in the test (or by this plugin, from the
        configuration, when the worker started) is the test's; let go of it, so that the next
        test can build its own. A timer built while a module was imported stays, as the
        module stays imported."""
        if not self._on_import:
            self.timer = None

    @hookimpl
    def qtasks_task_enqueue(self, message: Message) -> Message | None:
        """Mark messages enqueued by a timer tick with the ``qtasks_timer`` header."""
        firing = FIRING.get()
        if firing is None:
            return None
        message.headers[HEADER] = dict(firing)
        return message

    @hookimpl
    async def qtasks_inspect(
        self, app: AsyncQueueTasks, report: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Add ``"timers"``: one row per timer with its next run time."""
        timer = self._timer(app)
        if timer is None:
            return None
        return {**report, "timers": await timer.describe()}
