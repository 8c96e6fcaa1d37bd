"""``qtasks add``'s arguments checked against the task's plain annotations, before enqueueing.

Each ARG is JSON when it parses, else text, so ``qtasks add square abc`` for ``def square(x:
int)`` enqueued a task that failed when it ran. A parameter annotated with a plain type
(``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``, ``None``, unions of them such as
``int | None``; ``list[...]``/``dict[...]`` by their outer type, ``Annotated`` by its type)
now refuses a value of another JSON type; an int is a fine float, a bool no number. Other
annotations (a class, ``Literal``, ``Any``) are the task's business, and pydantic model
parameters are validated by :mod:`qtasks.models` (the other parameters of such a task are
checked once the call is bound as it binds it: a model's fields may come from the positional
arguments).
"""

from __future__ import annotations

import inspect
import json
import re
import reprlib
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from qtasks.errors import TaskArgumentsError
from qtasks.masking import MASK, is_secret_key

if TYPE_CHECKING:
    from qtasks.task import TaskDef

PLAIN: tuple[type, ...] = (int, float, str, bool, list, dict, NoneType)
"""The types a JSON value (or a text ARG) has, and the annotations checked against them."""


def plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The :data:`PLAIN` types ``annotation`` accepts, or ``None`` when it is not made of them
    alone (nothing is checked then)."""
    if annotation is None:
        return (NoneType,)
    origin = get_origin(annotation)
    if origin is Annotated:
        return plain_types(get_args(annotation)[0])
    if origin is Union or origin is UnionType:
        accepted: list[type] = []
        for member in get_args(annotation):
            types = plain_types(member)
            if types is None:
                return None
            accepted.extend(types)
        return tuple(accepted)
    if origin is list or origin is dict:
        return (origin,)
    return (annotation,) if annotation in PLAIN else None


def fits(value: Any, accepted: tuple[type, ...]) -> bool:
    """Whether ``value`` is of one of the ``accepted`` types (an int is a float, a bool is
    neither an int nor a float)."""
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int) and float in accepted:
        return True
    return isinstance(value, tuple(accepted))


def check_argument_types(task: TaskDef[..., Any], args: list[Any], kwargs: dict[str, Any]) -> None:
    """Raise :class:`~qtasks.errors.TaskArgumentsError` naming the parameter, the expected
    type and the value when an argument of ``qtasks add`` does not fit its parameter's plain
    annotation. A call that does not bind is left to the enqueue's own check."""
    if task.models:  # bound as the enqueue binds them, each model validated there (its error)
        from qtasks.models import build

        args, kwargs = build(task, args, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in task.injected}
    signature = task.caller_signature
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return
    for name, value in bound.arguments.items():
        if name in task.models:
            continue
        param = signature.parameters[name]
        accepted = plain_types(param.annotation)
        if accepted is None:
            continue
        secret = is_secret_key(name)
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            given = [(f"{name}[{i}]", item, secret) for i, item in enumerate(value)]
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            given = [
                (f"{name}[{key!r}]", item, secret or is_secret_key(key))
                for key, item in value.items()
            ]
        else:
            given = [(name, value, secret)]
        for label, item, hidden in given:
            if not fits(item, accepted):
                where = f"task {task.name!r}: parameter {label!r}"
                raise TaskArgumentsError(_refusal(where, param, item, accepted, hidden))


_KEYWORD = re.compile(r"([A-Za-z_]\w*)=(.*)", re.S)


def check_keyword_text(task: TaskDef[..., Any], raw_args: list[str]) -> None:
    """Refuse a text ARG written as a keyword argument of the task (``qtasks add charge 17
    amount=9.5``): it would be passed, as text, to the next positional parameter (an
    unannotated one took it without a word). Keywords go in ``--kwargs``; the text itself is
    still given as a JSON string (``'"amount=9.5"'``)."""
    from qtasks.cli.output import parse_arg, strict_json

    for raw in raw_args:
        match = _KEYWORD.fullmatch(raw)
        if match is None or match[1] not in task.caller_signature.parameters:
            continue
        try:
            strict_json(raw)
        except ValueError:
            name, value = match[1], parse_arg(match[2])
            shown = MASK if is_secret_key(name) else json.dumps({name: value})
            raise TaskArgumentsError(
                f"task {task.name!r}: ARG {name}=... looks like a keyword argument, which "
                f"qtasks add takes as --kwargs '{shown}'; to pass the text as it is, give "
                f"a JSON string ('\"{name}=...\"')"
            ) from None


def _refusal(
    where: str, param: inspect.Parameter, value: Any, accepted: tuple[type, ...], secret: bool
) -> str:
    """What is wrong, and how to write the ARG when a different one was meant."""
    annotation = param.annotation
    if get_origin(annotation) is Annotated:  # its metadata is no type
        annotation = get_args(annotation)[0]
    text = f"{where} expects {inspect.formatannotation(annotation)}, got "
    text += MASK if secret else reprlib.repr(value)
    if value is not None:
        text += f" ({type(value).__name__})"
    if secret:
        return text
    if str in accepted and not isinstance(value, list | dict):  # 5, true, null meant as text
        return f"{text}; to pass it as text, give a JSON string: '{json.dumps(json.dumps(value))}'"
    if isinstance(value, str):
        return f"{text}; an ARG is JSON when it parses (5, 2.5, true, null, [1], {{}}), else text"
    return text
