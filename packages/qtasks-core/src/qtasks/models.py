"""Pydantic models as task parameters and results (extra ``qtasks-core[pydantic]``).

A parameter annotated with a ``pydantic.BaseModel`` subclass (directly, ``Optional``, or first in
``Annotated``) receives an instance built and validated from the call. The call may pass it:

* by name or position, as an instance or a dict: ``add_task("t", item=Item(...))``,
  ``add_task("t", {"name": "x", "value": 1})``;
* flat, as QTasks did: the model's fields as keywords, and those not given taken from the
  positional arguments in field order: ``add_task("t", name="x", value=1)``,
  ``add_task("t", "x", value=1)``, ``add_task("t", "x", 1)``.

Invalid input raises :class:`~qtasks.errors.TaskArgumentsError`: at ``add_task`` when the
producer has the task registered, else when the worker receives it (the message is then
rejected, its record says ``error``). On the wire a model travels as its JSON dict, so any
serializer stores it.

A task returning a model stores ``model.model_dump(mode="json")``; when the task's return
annotation is a model, the record's ``returning`` is that model again for a producer that has
the task (``add_task(..., timeout=)``, ``wait_result``, ``app.get``).

Nothing here imports pydantic: a model class in an annotation means it is imported already,
so apps without pydantic pay nothing.
"""

from __future__ import annotations

import inspect
import sys
from collections import deque
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from qtasks.errors import TaskArgumentsError
from qtasks.plugins import hookimpl

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.messages import Message
    from qtasks.record import TaskRecord
    from qtasks.task import TaskDef

PLUGIN_NAME = "qtasks.models"
_P = inspect.Parameter


def model_class(annotation: Any) -> type[Any] | None:
    """The pydantic model class ``annotation`` names, or ``None``."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or annotation is inspect.Parameter.empty:
        return None
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, type(int | None)):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        annotation = members[0]
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def model_params(signature: inspect.Signature) -> dict[str, type[Any]]:
    """The caller parameters of ``signature`` annotated with a model, in order."""
    found = {}
    for param in signature.parameters.values():
        cls = model_class(param.annotation)
        if cls is not None:
            found[param.name] = cls
    return found


def result_model(func: Any) -> type[Any] | None:
    """The model class of ``func``'s return annotation (a string is evaluated in its module)."""
    try:
        annotation = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return None
    if isinstance(annotation, str):
        namespace = getattr(inspect.unwrap(func), "__globals__", {})
        try:
            annotation = eval(annotation, namespace)
        except Exception:
            return None
    return model_class(annotation)


def _validate(task: TaskDef[..., Any], name: str, model: type[Any], value: Any) -> Any:
    pydantic = sys.modules["pydantic"]
    if isinstance(value, model):
        return value
    try:
        if isinstance(value, str | bytes):
            return model.model_validate_json(value)
        return model.model_validate(value)
    except pydantic.ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or name}: {e['msg']}" for e in exc.errors()
        )
        raise TaskArgumentsError(
            f"task {task.name!r}: parameter {name!r} ({model.__name__}) is invalid: {errors}"
        ) from None


def build(
    task: TaskDef[..., Any], args: Any, kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """``(args, kwargs)`` of a call to ``task`` with every model parameter an instance (see the
    module docstring for the accepted forms). Raises :class:`TaskArgumentsError`."""
    models = task.models
    signature = task.caller_signature
    extra = {k: v for k, v in kwargs.items() if k in task.injected}
    call = {k: v for k, v in kwargs.items() if k not in task.injected}
    try:
        bound = signature.bind(*args, **call)
    except TypeError as exc:
        bound = _bind_flat(task, list(args), call, exc)
    for name, model in models.items():
        if name in bound.arguments:
            bound.arguments[name] = _validate(task, name, model, bound.arguments[name])
    return list(bound.args), {**bound.kwargs, **extra}


def _bind_flat(
    task: TaskDef[..., Any], args: list[Any], kwargs: dict[str, Any], error: TypeError
) -> inspect.BoundArguments:
    """Bind QTasks' flat form: model fields as keywords, missing ones from the positionals."""
    signature = task.caller_signature
    params = signature.parameters
    flat = {k: v for k, v in kwargs.items() if k not in params}
    named = {k: v for k, v in kwargs.items() if k in params}
    positional: list[Any] = []
    pending = deque(args)
    for param in params.values():
        if param.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
            break
        if param.name in named:
            continue
        model = task.models.get(param.name)
        if model is not None:
            data = {f: flat.pop(f) for f in model.model_fields if f in flat}
            for field in model.model_fields:
                if field not in data and pending:
                    data[field] = pending.popleft()
            named[param.name] = data
        elif pending:
            if param.kind is _P.POSITIONAL_ONLY:
                positional.append(pending.popleft())
            elif param.kind is _P.POSITIONAL_OR_KEYWORD:
                named[param.name] = pending.popleft()
    if pending or flat:
        raise TaskArgumentsError(f"task {task.name!r}: {error}") from None
    try:
        return signature.bind(*positional, **named)
    except TypeError as exc:
        raise TaskArgumentsError(f"task {task.name!r}: {exc}") from None


def to_wire(value: Any) -> Any:
    """``value`` with a model instance replaced by its JSON dict."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    return value


class ModelsPlugin:
    """Built-in plugin, registered by the first task with a model parameter or result."""

    name = PLUGIN_NAME

    @hookimpl(tryfirst=True)
    def qtasks_task_enqueue(self, app: AsyncQueueTasks, message: Message) -> Message | None:
        task = app.tasks.get(message.task_name)
        if task is None or not task.models:
            return None
        args, kwargs = build(task, message.args, message.kwargs)
        message.args = [to_wire(a) for a in args]
        message.kwargs = {k: to_wire(v) for k, v in kwargs.items()}
        return message

    @hookimpl(tryfirst=True)
    def qtasks_executor_args(
        self, task: TaskDef[..., Any], args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]] | None:
        if not task.models:
            return None
        return build(task, args, kwargs)

    @hookimpl
    def qtasks_executor_result(self, result: Any) -> Any:
        wire = to_wire(result)
        return None if wire is result else wire


def register(app: AsyncQueueTasks) -> None:
    """Register the built-in :class:`ModelsPlugin` on ``app`` once."""
    if app.hooks.pm.get_plugin(PLUGIN_NAME) is None:
        app.hooks.register(ModelsPlugin(), PLUGIN_NAME)


def typed_result(task: TaskDef[..., Any] | None, record: TaskRecord) -> None:
    """Turn ``record.returning`` into the task's result model, when it declares one."""
    if task is None or task.result_model is None or record.status.value != "success":
        return
    value = record.returning
    if isinstance(value, dict):
        record.returning = task.result_model.model_validate(value)
