"""The message helpers every enqueue uses: task UUIDs, the strict JSON encoder and the decoder;
and what a decoded message must hold."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from qtasks.errors import SerializationError
from qtasks.messages import (
    HEADER_CHECKS,
    WIRE_VERSION,
    Codec,
    JSONSerializer,
    Message,
    new_uuid,
    strict_json_encoder,
)
from qtasks.workflows.canvas import RETRY_HEADER
from qtasks.workflows.plan import INPUT


def test_new_uuids_are_random_version_4_hex_and_never_repeat() -> None:
    made = [new_uuid() for _ in range(2000)]  # several draws from the OS
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.hex, parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


# Python 3.12+ warns of any fork in a process with threads (pytest's, the event loop's): the
# child here only draws uuids and writes them, then exits at once.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_threads_and_forked_children_draw_their_own_uuids() -> None:
    new_uuid()  # this thread holds undrawn UUIDs now
    per_thread: list[list[str]] = [[], []]

    def draw(into: list[str]) -> None:
        into.extend(new_uuid() for _ in range(500))

    threads = [threading.Thread(target=draw, args=(out,)) for out in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not set(per_thread[0]) & set(per_thread[1])

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, "".join(new_uuid() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {data[at : at + 32] for at in range(0, len(data), 32)}
    parent = {new_uuid() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent


@pytest.mark.parametrize(
    "value",
    [
        {"uuid": "a" * 32, "args": [1, 2.5, None, True, 'é\u2028"\\'], "kwargs": {}},
        [2, "x", 1e300, -0.0, 10**30, [], {"k": [{"n": None}]}],
        "plain \U0001f600",
        7,
        None,
    ],
)
def test_the_strict_encoder_writes_what_json_writes(value: object) -> None:
    expected = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    assert strict_json_encoder()(value) == expected


def test_the_strict_encoder_refuses_what_json_refuses() -> None:
    encode = strict_json_encoder()
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        encode(circular)
    with pytest.raises(ValueError, match="Out of range"):
        encode({"x": float("nan")})
    with pytest.raises(TypeError, match="object"):
        encode([object()])
    with pytest.raises(TypeError, match="keys must be"):
        encode({(1, 2): 3})
    with pytest.raises(SerializationError, match="cannot encode as JSON"):
        JSONSerializer().dumps({"when": {1, 2}})


_WIRE_CASES = [
    Message(new_uuid(), "add", [1, 2.5, 'é\u2028"\\'], {"k": None}, 3, time.time(), 2),
    Message("u", 'odd "name"\n', [], {}, 0, 1.0, 0, {"parent_uuid": "p", RETRY_HEADER: 2}),
    Message("u", "t", [{"n": [None]}], {"a": {"b": []}}, -5, 1e-7, 10**20),
    # Fields of unexpected types (a qtasks_task_enqueue hook's doing): the mapping's way.
    Message("u", "t", [], [], 0, 1.0),  # type: ignore[arg-type]
    Message("u", "t", [1], {}, True, 1.0),
    Message("u", "t", [1], {}, 0, 3),
    Message("u", "t", [1], {}, 0, 1.0, 0, []),  # type: ignore[arg-type]
    Message(7, "t", [1], {}, 0, 1.0),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("message", _WIRE_CASES)
def test_a_message_is_written_as_its_wire_mapping_is(message: Message) -> None:
    serializer = JSONSerializer()
    expected = serializer.dumps(message.to_wire())
    assert serializer.dumps_message(message) == expected
    assert Codec().encode(message).body == expected


@pytest.mark.parametrize(
    "message",
    [
        Message("u", "t", [float("nan")], {}, 0, 1.0),
        Message("u", "t", [], {"when": {1, 2}}, 0, 1.0),
        Message("u", "t", [], {}, 0, 1.0, 0, {"h": object()}),
        Message("u", "t", [], {}, 0, float("inf")),
    ],
)
def test_a_message_that_cannot_be_written_is_refused_as_its_mapping_is(message: Message) -> None:
    serializer = JSONSerializer()
    with pytest.raises(SerializationError, match="cannot encode as JSON") as mapping:
        serializer.dumps(message.to_wire())
    with pytest.raises(SerializationError, match="cannot encode as JSON") as written:
        serializer.dumps_message(message)
    assert str(written.value) == str(mapping.value)


def test_a_serializer_subclass_keeps_its_own_dumps() -> None:
    class Tagged(JSONSerializer):
        def dumps(self, value: object) -> bytes:
            return b"tagged:" + super().dumps(value)

    body = Codec(Tagged()).encode(Message("u", "t")).body
    assert body.startswith(b"tagged:{")


@pytest.mark.parametrize(
    "text",
    ['{"k":[1,2.5,"é"]}', '  {"k": 1}\n', "7", '"s"', "[]", "null", '{"a":{"b":[{}]}}'],
)
def test_the_serializer_reads_what_json_reads(text: str) -> None:
    assert JSONSerializer().loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"k":1} x', "Extra data"),
        ('{"k":1}{"k":2}', "Extra data"),
        ("", "Expecting value"),
        ("   ", "Expecting value"),
        ('{"k":', "Expecting value"),
        ("[1,]", "(Expecting value|Illegal trailing comma)"),  # 3.11-3.12 | 3.13+
        ("\ufeff{}", "Expecting value"),
        ("[" * 100_000 + "]" * 100_000, "recursion"),
    ],
)
def test_the_serializer_refuses_what_json_refuses(text: str, says: str) -> None:
    with pytest.raises(SerializationError, match=f"cannot decode JSON message: .*{says}"):
        JSONSerializer().loads(text.encode())
    with pytest.raises(SerializationError, match="cannot decode"):
        JSONSerializer().loads(b"\xff{}")  # not UTF-8


def test_the_header_checks_name_the_headers_their_writers_use() -> None:
    assert set(HEADER_CHECKS) == {"expires", "unique", "parent_uuid", RETRY_HEADER, INPUT}


def test_fields_and_headers_as_qtasks_writes_them_decode_unchanged() -> None:
    codec = Codec()
    headers = {
        "expires": 1.7e9,
        "unique": ["unique:k", "u@1.000@k", 30.0],
        RETRY_HEADER: 2,
        "parent_uuid": "p",
        INPUT: ["a", ["b", "c"]],
        "ckey": 5,  # read with a fallback (recomputed): not checked at decoding
        "flow_at": "later",  # the same (reserved again)
        "traceparent": {"a plugin's": "own"},
    }
    message = Message("u", "t", [1], {"k": 2}, 3, 1.7e9 + 0.5, 1, headers)
    assert codec.decode(codec.encode(message).body) == message


def test_only_the_wire_version_qtasks_writes_is_read() -> None:
    """A body of another version is undecodable (before, ``v`` was not read at all); one
    without ``v``, made by hand, is read as the version qtasks writes."""
    message = Message("u", "t", [1])
    wire = message.to_wire()
    assert wire["v"] == WIRE_VERSION == 1
    del wire["v"]
    assert Message.from_wire(wire) == message
    for version in (2, 7, "1", 1.0, True, None, [1]):
        wire["v"] = version
        with pytest.raises(SerializationError, match=r"^unsupported message version "):
            Message.from_wire(wire)


@pytest.mark.parametrize("created_at", [None, 0, 0.0])
def test_a_missing_created_at_is_now_and_an_int_one_is_kept(created_at: object) -> None:
    wire = Message("u", "t").to_wire()
    wire["created_at"] = created_at
    assert abs(Message.from_wire(wire).created_at - time.time()) < 60
    wire["created_at"] = 1_700_000_000
    decoded = Message.from_wire(wire).created_at
    assert (decoded, type(decoded)) == (1.7e9, float)
