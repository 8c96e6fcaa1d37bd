"""An example third-party plugin: records lifecycle hooks and logs finished tasks.

Enable options in configuration::

    [tool.qtasks.extra.audit]
    prefix = "audit"
"""

from __future__ import annotations

import logging
from typing import Any

from qtasks import QueueConfig, TaskRecord, hookimpl

log = logging.getLogger("qtasks_audit_example")


class AuditPlugin:
    """One instance per app (built by qtasks through ``from_config``)."""

    def __init__(self, prefix: str = "audit") -> None:
        self.prefix = prefix
        self.events: list[tuple[str, str]] = []

    @classmethod
    def from_config(cls, config: QueueConfig) -> AuditPlugin:
        options = config.extra.get("audit", {})
        return cls(prefix=str(options.get("prefix", "audit")))

    @hookimpl
    def qtasks_app_started(self, app: Any) -> None:
        self.events.append(("app_started", app.name))

    @hookimpl
    def qtasks_worker_execute_before(self, record: TaskRecord) -> None:
        self.events.append(("execute_before", record.task_name))

    @hookimpl
    async def qtasks_task_succeeded(self, record: TaskRecord) -> None:
        # async on purpose: the core must await notification hooks.
        self.events.append(("succeeded", record.task_name))
        log.info("%s: task %s %s succeeded", self.prefix, record.task_name, record.uuid)

    @hookimpl
    def qtasks_task_failed(self, record: TaskRecord, exc: BaseException) -> None:
        self.events.append(("failed", record.task_name))
        log.info("%s: task %s %s failed: %r", self.prefix, record.task_name, record.uuid, exc)

    @hookimpl
    def qtasks_inspect(self, report: dict[str, Any]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for event, _ in self.events:
            counts[event] = counts.get(event, 0) + 1
        return {**report, "audit": counts}
