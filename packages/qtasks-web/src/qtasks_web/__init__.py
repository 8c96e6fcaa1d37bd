"""qtasks-web: a live dashboard, Prometheus metrics and OpenTelemetry traces for qtasks.

Everything it shows is read from the app's components (storage, broker stats, global config
heartbeats, dead letters, timers), so it is right after a restart and with several dashboards.
"""

__all__: list[str] = []
