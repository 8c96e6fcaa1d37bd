"""The backend of the ported apps: Redis when ``PORT_REDIS_URL`` is set, else in memory."""

import os

from qtasks import QueueConfig

BROKER_URL = os.environ.get("PORT_REDIS_URL") or None
CONFIG = QueueConfig(extra={"redis_prefix": os.environ.get("PORT_REDIS_PREFIX", "qtasks")})
