"""qtasks-web: a live dashboard, Prometheus metrics and OpenTelemetry traces for qtasks.

Everything it shows is read from the app's components (storage, broker stats, global config
heartbeats, dead letters, timers), so it is right after a restart and with several dashboards.
The dashboard is :func:`create_app` (an ASGI app) and the ``qtasks web`` command.
"""

from qtasks_web.app import create_app
from qtasks_web.settings import Auth, WebSettings

__all__ = ["Auth", "WebSettings", "create_app"]
