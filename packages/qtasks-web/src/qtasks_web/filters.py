"""The Tasks page's filters, from the query string: every bad value becomes a message shown on
the page (with status 400), never an exception out of the request."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from qtasks.components import MAX_PAGE, RecordQuery
from qtasks.record import TaskStatus

DEFAULT_LIMIT = 50
_UUID_PREFIX = re.compile(r"^[0-9A-Za-z_.:-]{1,100}$")
_NAME_MAX = 200


def parse_time(text: str) -> float:
    """A time typed by a person: unix seconds, or an ISO 8601 date/time (UTC unless it says
    otherwise, as ``<input type=datetime-local>`` sends it). Raises ``ValueError``."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a time")
    return value


@dataclass(slots=True)
class TaskFilters:
    """The filters of one Tasks page request, and what was wrong with them."""

    status: str = ""
    name: str = ""
    since: str = ""
    until: str = ""
    uuid: str = ""
    limit: int = DEFAULT_LIMIT
    cursor: str = ""
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> TaskFilters:
        """From query parameters; problems are collected in ``errors``."""
        found = cls(
            status=params.get("status", "").strip(),
            name=params.get("name", "").strip(),
            since=params.get("since", "").strip(),
            until=params.get("until", "").strip(),
            uuid=params.get("uuid", "").strip(),
            cursor=params.get("cursor", "").strip(),
        )
        if found.status and found.status not in {s.value for s in TaskStatus}:
            found.errors.append(f"unknown status {found.status!r}")
        if len(found.name) > _NAME_MAX:
            found.errors.append(f"the task name is longer than {_NAME_MAX} characters")
        if found.uuid and not _UUID_PREFIX.match(found.uuid):
            found.errors.append("a uuid (prefix) has letters, digits, '-', '_', '.' and ':' only")
        for label in ("since", "until"):
            text = getattr(found, label)
            if text:
                try:
                    parse_time(text)
                except ValueError:
                    found.errors.append(
                        f"{label}: {text[:40]!r} is not a time (ISO 8601 or unix seconds)"
                    )
        raw = params.get("limit", "").strip()
        if raw:
            try:
                found.limit = int(raw)
            except ValueError:
                found.errors.append(f"limit: {raw[:20]!r} is not a whole number")
            else:
                if not 1 <= found.limit <= MAX_PAGE:
                    found.errors.append(f"limit must be between 1 and {MAX_PAGE}")
                    found.limit = DEFAULT_LIMIT
        return found

    def query(self) -> RecordQuery:
        """The storage query (only when ``errors`` is empty)."""
        return RecordQuery(
            status=TaskStatus(self.status) if self.status else None,
            task_name=self.name or None,
            since=parse_time(self.since) if self.since else None,
            until=parse_time(self.until) if self.until else None,
            uuid_prefix=self.uuid or None,
            limit=self.limit,
            cursor=self.cursor or None,
        )

    def params(self, **changes: str) -> str:
        """The query string of these filters with ``changes`` (empty values left out)."""
        values = {
            "status": self.status,
            "name": self.name,
            "since": self.since,
            "until": self.until,
            "uuid": self.uuid,
            "limit": "" if self.limit == DEFAULT_LIMIT else str(self.limit),
            "cursor": self.cursor,
        }
        values.update(changes)
        return urlencode({k: v for k, v in values.items() if v})
