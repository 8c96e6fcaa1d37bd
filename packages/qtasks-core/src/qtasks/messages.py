"""What travels through a broker: :class:`Message` (the task call) and its wire encoding.

A broker never sees Python objects, only :class:`Envelope` values: an id, a priority, an optional
due time and the encoded body. The body is produced by a :class:`Serializer`; JSON by default.
Pickle is never used unless a user passes a serializer that does it.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _quote
from typing import Any, Protocol, runtime_checkable

from qtasks.checks import ETA_TAKES, FAR_AHEAD, far_ahead, finite
from qtasks.errors import MessageTooLargeError, SerializationError, TaskArgumentsError

WIRE_VERSION = 1
"""The version of the message format :meth:`Message.to_wire` writes (its ``v``), the only one
:meth:`Message.from_wire` reads: a message of another (or a ``v`` that is not an int) is
undecodable. A body without ``v`` (a message made by hand) is read as this version."""


def _unencodable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def strict_json_encoder() -> Callable[[Any], str]:
    """A function that encodes a value as compact, strict JSON (no NaN, non-ASCII kept), as
    ``json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode``
    does, raising ``TypeError`` or ``ValueError`` as it does (a circular value included).

    It calls one C encoder made here, where ``JSONEncoder.encode`` makes one per call: a
    quarter of the cost of a task's message or record, which every enqueue encodes."""
    encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    try:
        from _json import make_encoder  # CPython's C accelerator, as json.encoder uses it
        from json.encoder import encode_basestring

        chunks = make_encoder(
            None, _unencodable, encode_basestring, None, ":", ",", False, False, False
        )
    except (ImportError, TypeError):  # pragma: no cover - another interpreter
        return encode

    def fast(value: Any) -> str:
        try:
            return "".join(chunks(value, 0))
        except RecursionError:
            # No circular check here (it costs every call): the JSONEncoder reports one.
            return encode(value)

    return fast


def json_decoder() -> Callable[[str], Any]:
    """A decoder of JSON text, as ``json.JSONDecoder().decode`` (same values, same errors).

    One JSON value filling the text is read by the decoder's C scanner, called once: what
    ``decode`` does around it (two whitespace matches, two calls) is 40 % of a message's
    decode. Anything else (whitespace around it, extra data, an error) goes through
    ``decode``, which says what is wrong."""
    decoder = json.JSONDecoder()
    scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
    decode = decoder.decode

    def fast(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return decode(text)
        return value if end == len(text) else decode(text)

    return fast


@runtime_checkable
class Serializer(Protocol):
    """Turns JSON-like values into bytes and back. Must raise on values it cannot encode."""

    content_type: str

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise :class:`SerializationError` if it cannot be encoded."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; raise :class:`SerializationError` if it is not valid."""
        ...


_WIRE = (
    f'{{"v":{WIRE_VERSION},"uuid":%s,"task":%s,"args":%s,"kwargs":%s,"priority":%d,'
    '"created_at":%r,"attempt":%d,"headers":%s}'
)
""":meth:`Message.to_wire` as compact JSON, its keys in order, for
:meth:`JSONSerializer.dumps_message`."""


class JSONSerializer:
    """The default serializer: strict JSON (no NaN), UTF-8."""

    content_type = "application/json"

    def __init__(self) -> None:
        self._encode = strict_json_encoder()
        self._decode = json_decoder()

    def dumps(self, value: Any) -> bytes:
        try:
            return self._encode(value).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"cannot encode as JSON: {exc}") from exc

    def dumps_message(self, message: Message) -> bytes:
        """``dumps(message.to_wire())``, the same bytes, written around the encoded arguments
        and headers rather than encoding the whole mapping (about a third less per message:
        one is made for every task). A field of an unexpected type (a hook's doing) takes the
        mapping's way, which says what is wrong."""
        uuid, name, created = message.uuid, message.task_name, message.created_at
        priority, attempt = message.priority, message.attempt
        if not (
            type(uuid) is str
            and type(name) is str
            and type(priority) is int
            and type(attempt) is int
            and type(created) is float
            and math.isfinite(created)
        ):
            return self.dumps(message.to_wire())
        encode, kwargs, headers = self._encode, message.kwargs, message.headers
        try:
            text = _WIRE % (
                _quote(uuid),
                _quote(name),
                encode(message.args),
                "{}" if type(kwargs) is dict and not kwargs else encode(kwargs),
                priority,
                created,
                attempt,
                "{}" if type(headers) is dict and not headers else encode(headers),
            )
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"cannot encode as JSON: {exc}") from exc
        return text.encode()

    def loads(self, data: bytes) -> Any:
        try:
            return self._decode(data.decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # RecursionError: nested deeper than the interpreter's limit (a crafted body).
            raise SerializationError(f"cannot decode JSON message: {exc}") from exc


_UUIDS_PER_READ = 128


class _UUIDPool(threading.local):
    """Each thread's unused UUIDs, drawn from the OS 128 at a time."""

    def __init__(self) -> None:
        self.hexes: list[str] = []


_uuids = _UUIDPool()


def _forget_uuids() -> None:
    _uuids.hexes = []  # a forked child must not hand out the UUIDs its parent still holds


os.register_at_fork(after_in_child=_forget_uuids)


def _draw_uuids() -> list[str]:
    raw = bytearray(os.urandom(16 * _UUIDS_PER_READ))
    for at in range(0, len(raw), 16):
        raw[at + 6] = (raw[at + 6] & 0x0F) | 0x40
        raw[at + 8] = (raw[at + 8] & 0x3F) | 0x80
    text = raw.hex()
    return [text[at : at + 32] for at in range(0, len(text), 32)]


def new_uuid() -> str:
    """A random (version 4) UUID as 32 hex digits, as ``uuid.uuid4().hex`` gives, from the
    same source (``os.urandom``) but without a ``UUID`` object and a system call each: it is
    made for every task. Thread-safe; a forked child draws its own."""
    hexes = _uuids.hexes
    if not hexes:
        hexes = _uuids.hexes = _draw_uuids()
    return hexes.pop()


@dataclass(slots=True)
class Message:
    """One task call as it travels from producer to worker."""

    uuid: str
    task_name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    created_at: float = field(default_factory=time.time)
    attempt: int = 0
    """Executions already made (0 for a fresh message; retries increase it)."""
    headers: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-like form written into the envelope body."""
        return {
            "v": WIRE_VERSION,
            "uuid": self.uuid,
            "task": self.task_name,
            "args": self.args,
            "kwargs": self.kwargs,
            "priority": self.priority,
            "created_at": self.created_at,
            "attempt": self.attempt,
            "headers": self.headers,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Message:
        """Rebuild a message; raise :class:`SerializationError` on a version other than
        :data:`WIRE_VERSION`, any missing or bad field, or a header of :data:`HEADER_CHECKS`
        that holds what its reader cannot act on. A message with neither headers nor an odd
        ``created_at`` (nearly every one) pays a few type tests for it."""
        if not isinstance(data, dict):
            raise SerializationError(f"message body is a {type(data).__name__}, not an object")
        version = data.get("v", WIRE_VERSION)
        if version != WIRE_VERSION or type(version) is not int:  # 1.0 and True are == 1
            # Read as this version, a message of another would run with fields misread.
            raise SerializationError(
                f"unsupported message version {reprlib.repr(version)} (this qtasks reads "
                f"version {WIRE_VERSION})"
            )
        try:
            uuid, task, args, kwargs = data["uuid"], data["task"], data["args"], data["kwargs"]
        except KeyError as exc:
            raise SerializationError(f"message is missing the field {exc.args[0]!r}") from None
        if not isinstance(uuid, str) or not isinstance(task, str):
            raise SerializationError("message fields 'uuid' and 'task' must be strings")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise SerializationError("message fields 'args'/'kwargs' must be a list/an object")
        priority, attempt = data.get("priority", 0), data.get("attempt", 0)
        if type(priority) is not int or type(attempt) is not int:  # a bool is not one
            raise SerializationError("message fields 'priority'/'attempt' must be integers")
        created_at = data.get("created_at")
        if type(created_at) is not float or not 0.0 < created_at < _INF:  # nan fails too
            created_at = _created_at(created_at)
        headers = data.get("headers") or {}
        if not isinstance(headers, dict):
            raise SerializationError("message field 'headers' must be an object")
        if headers:
            _check_headers(headers)
        return cls(
            uuid=uuid,
            task_name=task,
            args=args,
            kwargs=kwargs,
            priority=priority,
            created_at=created_at,
            attempt=attempt,
            headers=headers,
        )


_INF = math.inf


def _created_at(value: Any) -> float:
    """A decoded ``created_at`` that is not a positive float (the slow path): an int, or now
    when it is missing or 0; :class:`SerializationError` when it is not a finite number."""
    if value is None:
        return time.time()
    number = finite(value)
    if number is None:
        raise SerializationError(
            f"message field 'created_at' must be a finite number, got {reprlib.repr(value)}"
        )
    return number or time.time()


def _is_time(value: Any) -> bool:
    return finite(value) is not None


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_unique(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 3
        and type(value[0]) is str
        and type(value[1]) is str
        and (hold := finite(value[2])) is not None
        and hold >= 0
    )


def _is_input(value: Any) -> bool:
    """A workflow step's input spec: a uuid, or a list of specs (nested as its groups), in
    which ``{"members": [start, stop, step]}`` names a run of the workflow's members."""
    todo = [value]
    while todo:
        spec = todo.pop()
        if isinstance(spec, list | tuple):
            todo.extend(spec)
        elif isinstance(spec, dict):
            span = spec.get("members")
            if len(spec) != 1 or not isinstance(span, list | tuple) or len(span) != 3:
                return False
            if not all(type(i) is int and i >= 0 for i in span) or not span[0] < span[1]:
                return False
            if span[2] < 1:
                return False
        elif type(spec) is not str:
            return False
    return True


def _never(value: Any) -> bool:
    return False


HEADER_CHECKS: dict[str, tuple[type | None, Callable[[Any], bool]]] = {
    # name: (a type always valid, checked first; what any other value must pass)
    "expires": (None, _is_time),  # qtasks.flow: the unix time after which it is not started
    "unique": (None, _is_unique),  # qtasks.flow: [key, holder, unique_for]
    "retry": (None, _is_count),  # qtasks.workflows.canvas.RETRY_HEADER: a signature's retry
    "parent_uuid": (str, _never),  # the task that enqueued this one
    "qtasks.input": (str, _is_input),  # qtasks.workflows.plan.INPUT: where its input is read
}
"""What each header the worker acts on must hold; a message with one that does not is
undecodable (dead-lettered at once, with the reason). Headers whose readers fall back on a
bad value (``ckey`` and ``flow_at`` in :mod:`qtasks.flow`, the publish generation, the
worker's failure count) and the headers of plugins are not checked here."""


def _check_headers(headers: dict[str, Any]) -> None:
    for name, value in headers.items():
        rule = HEADER_CHECKS.get(name)
        if rule is not None and type(value) is not rule[0] and not rule[1](value):
            raise SerializationError(f"message header {name!r} is malformed: {reprlib.repr(value)}")


_set = object.__setattr__


@dataclass(slots=True, frozen=True, init=False)
class Envelope:
    """What a broker stores and moves: opaque ``body`` plus the fields it schedules by.

    An ``eta`` more than 100 years ahead (:data:`~qtasks.checks.FAR_AHEAD`: milliseconds given
    for seconds) raises :class:`~qtasks.errors.TaskArgumentsError` here, where every
    envelope is made: so no broker is handed one, through ``add_task``, a workflow or a direct
    ``Broker.publish``. Written out rather than generated, for that check: an envelope
    without an eta pays one comparison (measured with timeit, this ``__init__`` is no slower
    than the generated one: about 0.68 against 0.73 µs on a slow machine)."""

    id: str
    body: bytes
    priority: int = 0
    eta: float | None = None
    """Unix time before which the message must not be delivered (``None``: now)."""

    def __init__(self, id: str, body: bytes, priority: int = 0, eta: float | None = None) -> None:
        if eta is not None and eta - time.time() > FAR_AHEAD:
            raise far_ahead("Envelope: eta", eta, eta - time.time(), ETA_TAKES, TaskArgumentsError)
        _set(self, "id", id)
        _set(self, "body", body)
        _set(self, "priority", priority)
        _set(self, "eta", eta)


class Codec:
    """Encodes messages into envelopes and back with one serializer and a size limit."""

    def __init__(self, serializer: Serializer | None = None, max_size: int = 1 << 20) -> None:
        self.serializer: Serializer = serializer or JSONSerializer()
        self.max_size = max_size

    def encode(self, message: Message, eta: float | None = None) -> Envelope:
        """``message`` as an envelope; raise :class:`SerializationError` naming the task and
        the argument that cannot be encoded, :class:`MessageTooLargeError` past the limit."""
        serializer = self.serializer
        try:
            if type(serializer) is JSONSerializer:  # not a subclass: it may encode otherwise
                body = serializer.dumps_message(message)
            else:
                body = serializer.dumps(message.to_wire())
        except SerializationError as exc:
            raise self._unencodable(message, exc) from exc
        if len(body) > self.max_size:
            raise MessageTooLargeError(len(body), self.max_size, message.task_name)
        return Envelope(id=message.uuid, body=body, priority=message.priority, eta=eta)

    def _unencodable(self, message: Message, exc: SerializationError) -> SerializationError:
        """The error for a message that cannot be encoded: which task, and which of its
        arguments (``args[1]``, ``kwargs['user']``) with its type, found by encoding each
        alone (a header, a hook's doing, is named by the serializer's own text)."""
        named = [(f"args[{i}]", value) for i, value in enumerate(message.args)]
        named += [(f"kwargs[{key!r}]", value) for key, value in message.kwargs.items()]
        for where, value in named:
            try:
                self.serializer.dumps(value)
            except SerializationError as own:
                return SerializationError(
                    f"task {message.task_name!r}: argument {where} cannot be encoded "
                    f"({type(value).__name__}): {own}; pass a value the serializer stores "
                    "(an id, a dict of its fields)"
                )
        return SerializationError(f"task {message.task_name!r}: {exc}")

    def decode(self, body: bytes) -> Message:
        if len(body) > self.max_size:
            raise MessageTooLargeError(len(body), self.max_size)
        return Message.from_wire(self.serializer.loads(body))
