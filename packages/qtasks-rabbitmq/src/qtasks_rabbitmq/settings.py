"""The RabbitMQ broker's settings: its URL (:func:`check_url`) and the ``rabbitmq_*`` keys of
``config.extra``, typed and checked.

One place validates them, whichever way they come in: :meth:`RabbitMQSettings.from_extra` (what
:meth:`~qtasks_rabbitmq.RabbitMQBroker.from_config` uses), the broker's keyword arguments, and
the app's ``config.extra`` when the broker starts. An unknown ``rabbitmq_*`` key, a value of the
wrong type or out of range raises :class:`~qtasks.errors.ConfigError` naming the key (and, for an
unknown key, every valid one). Keys without the prefix belong to other components.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self, get_args

from pamqp.constants import DOMAIN_REGEX
from yarl import URL

from qtasks.errors import ConfigError
from qtasks.masking import mask_text, mask_url, masked_entry
from qtasks_rabbitmq.topology import QueueType, Topology

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"

SERVER_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
"""RabbitMQ's default ``max_message_size`` (bytes of a message body), the default of
``rabbitmq_max_message_size``."""

LARGEST_MESSAGE_SIZE = 512 * 1024 * 1024
"""The largest ``max_message_size`` RabbitMQ accepts."""


def check_url(url: str) -> URL:
    """``url`` read as aio-pika will read it (yarl), when a connection can be tried with it:
    ``amqp://`` or ``amqps://``, a host, a port that is a number from 0 to 65535. Else raises
    :class:`~qtasks.errors.ConfigError` in one line, the URL masked (no password): the
    broker's constructor calls it, so a bad URL is a configuration error when the broker is
    built, not a connection error at its start."""
    if not isinstance(url, str):
        raise ConfigError(f"the RabbitMQ URL must be a str, got {type(url).__name__}")
    try:
        parsed = URL(url)
    except ValueError as exc:  # yarl's: a port that is not a number, say (no URL in its text)
        shown = mask_text(f"{type(exc).__name__}: {exc}")
        raise ConfigError(f"bad RabbitMQ URL {mask_url(url)}: {shown}") from None
    if parsed.scheme not in ("amqp", "amqps"):
        raise ConfigError(f"RabbitMQ URL must start with amqp:// or amqps://, got {mask_url(url)}")
    if not parsed.host:
        raise ConfigError(f"bad RabbitMQ URL {mask_url(url)}: it names no host")
    return parsed


NAME_CHARACTERS = DOMAIN_REGEX["queue-name"]
"""What a queue or exchange name may hold (ASCII letters, digits, space and ``-_.:@#,/+``):
the AMQP client (pamqp) refuses to send any other name. Its exchange names take the same."""

MAX_EXCHANGE_NAME = 127
"""AMQP 0-9-1's limit on an exchange name, which the client enforces (the server's is 255 bytes,
the limit of any AMQP short string, for queue names too)."""

MAX_QUEUE_NAME = MAX_EXCHANGE_NAME - max(len(name) for name in Topology("").all_exchanges())
"""The longest ``rabbitmq_queue``: the exchanges named after it (``Q.delay.out``, the longest,
adds 10) must fit in :data:`MAX_EXCHANGE_NAME`, and its queues (``Q.delay.31``) then fit too."""

RESERVED_PREFIX = "amq."
"""Queue names starting so are the server's: declaring one is refused (``ACCESS_REFUSED``)."""


def check_queue_name(queue: str) -> None:
    """Raise :class:`~qtasks.errors.ConfigError` unless ``queue`` can name a qtasks queue on
    RabbitMQ: not empty nor only whitespace, not starting with ``amq.`` (reserved by the
    server), of :data:`NAME_CHARACTERS` only and at most :data:`MAX_QUEUE_NAME` characters.
    Else the broker's start failed, as if the server or the credentials had."""
    if not queue:
        raise ConfigError("rabbitmq_queue must not be empty")
    shown = reprlib.repr(queue)
    if queue.isspace():
        raise ConfigError(f"rabbitmq_queue must not be only whitespace, got {shown}")
    if queue.startswith(RESERVED_PREFIX):
        raise ConfigError(
            f"rabbitmq_queue must not start with {RESERVED_PREFIX!r} (names the RabbitMQ server "
            f"reserves), got {shown}"
        )
    if not NAME_CHARACTERS.fullmatch(queue):
        bad = sorted({char for char in queue if not NAME_CHARACTERS.fullmatch(char)})
        raise ConfigError(
            "rabbitmq_queue may hold only ASCII letters, digits, spaces and - _ . : @ # , / + "
            f"(the AMQP client sends no other name), got {shown}, with {', '.join(map(repr, bad))}"
        )
    if len(queue) > MAX_QUEUE_NAME:
        raise ConfigError(
            f"rabbitmq_queue must be at most {MAX_QUEUE_NAME} characters (qtasks declares the "
            f"exchange '<queue>.delay.out', and AMQP allows {MAX_EXCHANGE_NAME} for an "
            f"exchange name), got {len(queue)}: {shown}"
        )


PREFIX = "rabbitmq_"

OPTIONS: dict[str, type] = {
    "rabbitmq_queue": str,
    "rabbitmq_queue_type": str,
    "rabbitmq_max_priority": int,
    "rabbitmq_queue_version": int,
    "rabbitmq_heartbeat": int,
    "rabbitmq_connect_timeout": float,
    "rabbitmq_publish_timeout": float,
    "rabbitmq_max_message_size": int,
}
"""Every ``rabbitmq_*`` key the broker reads from ``config.extra``, with its type."""


def _type_error(key: str, value: Any) -> str | None:
    """Why ``value`` is not of the type of ``key`` (``None``: it is); an int is a fine float,
    a bool is no number."""
    kind = OPTIONS[key]
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, accepted) and not isinstance(value, bool):
        return None
    return f"expects {kind.__name__}, got {masked_entry(key, value)!r}"


def check_options(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return ``options`` once every ``rabbitmq_*`` key in it is known and of the right type.

    Other keys are left alone; an unknown ``rabbitmq_*`` key (a typo such as
    ``rabbitmq_qeue``) raises :class:`~qtasks.errors.ConfigError` listing the valid ones."""
    for key, value in options.items():
        if not key.startswith(PREFIX):
            continue
        if key not in OPTIONS:
            raise ConfigError(f"unknown option extra.{key} (known: {', '.join(sorted(OPTIONS))})")
        problem = _type_error(key, value)
        if problem is not None:
            raise ConfigError(f"extra.{key} {problem}")
    return options


@dataclass(frozen=True, slots=True)
class RabbitMQSettings:
    """What :class:`~qtasks_rabbitmq.RabbitMQBroker` takes besides the URL (see its docstring
    and ``docs/rabbitmq.md``); checked when built."""

    queue: str = "qtasks"
    queue_type: QueueType = "classic"
    max_priority: int = 20
    queue_version: int = 0
    heartbeat: int = 30
    connect_timeout: float = 10.0
    publish_timeout: float = 30.0
    max_message_size: int = SERVER_MAX_MESSAGE_SIZE

    def __post_init__(self) -> None:
        for key in OPTIONS:
            problem = _type_error(key, getattr(self, key.removeprefix(PREFIX)))
            if problem is not None:
                raise ConfigError(f"{key} {problem}")
        check_queue_name(self.queue)
        if self.queue_type not in get_args(QueueType):
            raise ConfigError(
                f"rabbitmq_queue_type must be 'classic' or 'quorum', not {self.queue_type!r}"
            )
        if not 0 <= self.max_priority <= 255:
            raise ConfigError(f"rabbitmq_max_priority must be 0..255, not {self.max_priority}")
        if self.queue_version not in (0, 1, 2):
            raise ConfigError(
                f"rabbitmq_queue_version must be 0, 1 or 2, not {self.queue_version!r}"
            )
        if self.heartbeat < 0:
            raise ConfigError(f"rabbitmq_heartbeat must be 0 or more, not {self.heartbeat}")
        if self.connect_timeout <= 0:
            raise ConfigError(
                f"rabbitmq_connect_timeout must be more than 0, not {self.connect_timeout}"
            )
        if self.publish_timeout < 0:
            raise ConfigError(
                f"rabbitmq_publish_timeout must be 0 or more, not {self.publish_timeout}"
            )
        if not 1 <= self.max_message_size <= LARGEST_MESSAGE_SIZE:
            raise ConfigError(
                f"rabbitmq_max_message_size must be 1..{LARGEST_MESSAGE_SIZE}, "
                f"not {self.max_message_size}"
            )

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> Self:
        """Settings from the ``rabbitmq_*`` keys of ``extra`` (others are ignored), defaults for
        the keys left out."""
        check_options(extra)
        values: dict[str, Any] = {}
        for key, value in extra.items():
            if key.startswith(PREFIX):
                # An int given for a float setting is stored as the float it stands for.
                values[key.removeprefix(PREFIX)] = float(value) if OPTIONS[key] is float else value
        return cls(**values)
