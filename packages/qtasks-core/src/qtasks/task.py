"""Registered tasks (:class:`TaskDef`) and the records ``add_task`` returns (:class:`Task`,
:class:`AsyncTask`).

Over ~500 lines: the task declaration (options checked at declaration), the task handle
with its async and sync call shapes, and the record a task call returns belong together.
"""

from __future__ import annotations

import builtins
import copy
import difflib
import functools
import inspect
import re
import sys
import warnings
from collections.abc import (
    AsyncGenerator,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import FrameType
from typing import (
    TYPE_CHECKING,
    Any,
    ForwardRef,
    Generic,
    NoReturn,
    ParamSpec,
    TypeVar,
    get_args,
    get_origin,
)

from qtasks.checks import FAR_AHEAD, check_delay, check_priority, far_ahead
from qtasks.errors import (
    AsyncCallInThreadError,
    TaskArgumentsError,
    TaskDeclarationError,
    UnresolvedAnnotationError,
)
from qtasks.flow import check_options as check_flow_options
from qtasks.flow import flow_spec
from qtasks.record import TaskRecord
from qtasks.threads import _running_loop, in_task_thread, loop_only

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.sync import QueueTasks
    from qtasks.workflows.canvas import Group, Signature

P = ParamSpec("P")
R = TypeVar("R")


class TaskKind(StrEnum):
    """How a task function is called."""

    SYNC = "sync"
    ASYNC = "async"
    SYNC_GEN = "sync_gen"
    ASYNC_GEN = "async_gen"

    @property
    def is_async(self) -> bool:
        return self in (TaskKind.ASYNC, TaskKind.ASYNC_GEN)


def task_kind(func: Callable[..., Any]) -> TaskKind:
    """Classify ``func`` (unwrapping ``functools.partial`` and decorators)."""
    target = inspect.unwrap(func)
    if inspect.isasyncgenfunction(target):
        return TaskKind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return TaskKind.SYNC_GEN
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - async callables objects
    ):
        return TaskKind.ASYNC
    return TaskKind.SYNC


_CELERY_OPTIONS = {
    "max_retries": "retry=N",
    "autoretry_for": "retry_on_exc=[...] with retry=N",
    "default_retry_delay": "retry_backoff=seconds",
    "time_limit": "max_time=seconds",
    "soft_time_limit": "max_time=seconds",
    "bind": "echo=True",
    "retry_backoff_max": "the app's setting retry_backoff_max (QueueConfig, [tool.qtasks])",
}
"""Celery's task options that mean one of ours (docs/from-celery.md), with what to write."""

_ONE_QUEUE = (
    "an app has one queue, its broker's: give tasks that must be kept apart an app of their "
    "own, with its broker's queue (RedisBroker(url, queue=...), RabbitMQBroker(url, "
    "queue=...), or redis_queue / rabbitmq_queue in [extra]) and its own workers"
)
_CELERY_ADVICE = {
    "queue": _ONE_QUEUE,
    "routing_key": _ONE_QUEUE,
    "ignore_result": "every task's record is stored with its result, which expires after "
    "the app's result_ttl",
    "serializer": "messages are JSON, or what the app's serializer= (QueueTasks("
    "serializer=...)) makes, for every task",
}
"""Celery's task options that have no counterpart on a task, with what qtasks does instead:
a ``queue`` kept in ``extra`` would send the task to the app's one queue without a word."""

_CELERY_CALL_OPTIONS = {
    "countdown": "the seconds to wait are add_task(..., delay=seconds)",
    "queue": _ONE_QUEUE,
    "routing_key": _ONE_QUEUE,
}
"""Celery's ``apply_async`` options given to ``add_task``, with what to write."""


OPTIONS_WARNED: ContextVar[bool] = ContextVar("qtasks_options_warned", default=False)
"""Set while a router's or shared task's declaration is bound to an app: its options were
warned about where it was declared (:func:`warn_declared_options`), once, not again per app."""


def warn_declared_options(task: str, options: dict[str, Any]) -> None:
    """:func:`warn_misspelt_options` for the options of ``@router.task``/``@shared_task``,
    at that declaration (an app binds it later, where a warning would point at the app)."""
    extra = {k: v for k, v in options.items() if k not in OPTION_NAMES}
    if extra:
        warn_misspelt_options(task, extra, OPTION_NAMES)


def warn_misspelt_options(task: str, extra: dict[str, Any], known: Collection[str]) -> None:
    """Warn about each unknown option of ``@app.task`` that is close to a known one
    (``rate_limt``, ``max_concurency``) or is Celery's name for one (``max_retries``,
    ``autoretry_for``): it is kept in the task's ``extra`` (QTasks' custom options), so what
    it meant (a limit, retries) would silently not apply."""
    if OPTIONS_WARNED.get():
        return
    for option in extra:
        said = f"task {task!r}: unknown option {option!r} is kept in the task's extra and not "
        advice = _CELERY_ADVICE.get(option)
        instead = _CELERY_OPTIONS.get(option)  # before a typo's match: time_limit/rate_limit
        if instead is None and advice is None:
            close = difflib.get_close_matches(option, sorted(known), n=1, cutoff=0.8)
            instead = f"{close[0]!r}" if close else None
        if advice is not None:
            said += f"applied (Celery's option): {advice}"
        elif instead is not None:
            said += f"applied; did you mean {instead}?"
        else:
            continue
        _, level = _user_frame()  # pointed at the declaration
        warnings.warn(said, UserWarning, stacklevel=level)


@dataclass(slots=True)
class TaskOptions:
    """Every option of ``@app.task``, checked at declaration time."""

    name: str
    priority: int | None = None
    echo: bool = False
    max_time: float | None = None
    retry: int | None = None
    retry_on_exc: tuple[type[BaseException], ...] | None = None
    retry_backoff: float | Callable[[int], float] | None = None
    decode: Callable[[Any], Any] | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None
    generate_handler: Callable[[Any], Any] | None = None
    executor: Any = None
    middlewares_before: tuple[Any, ...] = ()
    middlewares_after: tuple[Any, ...] = ()
    rate_limit: str | None = None
    rate_burst: int | None = None
    concurrency_key: str | Callable[..., Any] | None = None
    max_concurrency: int | None = None
    expires: float | None = None
    unique_key: Callable[..., Any] | None = None
    unique_for: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check()
        if self.middlewares_before or self.middlewares_after:
            from qtasks.compat.middleware import adapt_middleware

            # QTasks' TaskMiddleware classes become wrapping middlewares.
            self.middlewares_before = tuple(
                adapt_middleware(m, after=False) for m in self.middlewares_before
            )
            self.middlewares_after = tuple(
                adapt_middleware(m, after=True) for m in self.middlewares_after
            )

    def _check(self) -> None:
        def bad(option: str, expected: str, value: Any) -> TaskDeclarationError:
            return TaskDeclarationError(
                f"task {self.name!r}: option {option} expects {expected}, got {value!r}"
            )

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "a non-empty string", self.name)
        if self.priority is not None:
            what = f"task {self.name!r}: option priority"
            self.priority = check_priority(self.priority, what, TaskDeclarationError)
        if not isinstance(self.echo, bool):
            raise bad("echo", "a bool", self.echo)
        if self.max_time is not None and (
            not isinstance(self.max_time, int | float)
            or isinstance(self.max_time, bool)
            or self.max_time <= 0
        ):
            raise bad("max_time", "a positive number of seconds", self.max_time)
        if self.retry is not None and (
            not isinstance(self.retry, int) or isinstance(self.retry, bool) or self.retry < 0
        ):
            raise bad("retry", "an int >= 0", self.retry)
        if self.retry_on_exc is not None and not all(
            isinstance(e, type) and issubclass(e, BaseException) for e in self.retry_on_exc
        ):
            raise bad("retry_on_exc", "exception classes", self.retry_on_exc)
        if self.retry_backoff is not None and not (
            callable(self.retry_backoff)
            or (isinstance(self.retry_backoff, int | float) and self.retry_backoff >= 0)
        ):
            raise bad("retry_backoff", "seconds >= 0 or a callable(attempt)", self.retry_backoff)
        for option in ("decode", "generate_handler"):
            value = getattr(self, option)
            if value is not None and not callable(value):
                raise bad(option, "a callable", value)
        if not all(isinstance(t, str) for t in self.tags):
            raise bad("tags", "strings", self.tags)
        if self.description is not None and not isinstance(self.description, str):
            raise bad("description", "a string", self.description)
        if self.middlewares_before or self.middlewares_after:
            from qtasks.compat.middleware import SHAPE, check_middleware

            # As add_middleware checks it: a wrong shape fails here, not in every run.
            for option in ("middlewares_before", "middlewares_after"):
                for middleware in getattr(self, option):
                    check_middleware(middleware, f"task {self.name!r}: {option} takes {SHAPE}")
        check_flow_options(self)


OPTION_NAMES = frozenset(TaskOptions.__dataclass_fields__) - {"name", "extra"}
"""The options ``@app.task`` knows; any other is kept in the task's ``extra``."""


def as_tuple(value: Any, option: str, name: str) -> tuple[Any, ...]:
    """Normalise a list option (``None``, one item, or a sequence) to a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, type) or not isinstance(value, Sequence | set | frozenset):
        return (value,)
    return tuple(value)


def resolved_signature(
    func: Callable[..., Any], localns: Mapping[str, Any] | None = None
) -> inspect.Signature:
    """``func``'s signature with string annotations (``from __future__ import annotations``)
    evaluated in the function's module (and ``localns``), so injected parameters are recognised.

    A name found in neither is a forward reference (say, a type imported only under
    ``TYPE_CHECKING``): the annotation stays a string, unless evaluating it with such names as
    ``ForwardRef`` placeholders gives an injection (``Annotated[Conn, Depends(connect)]``
    still injects ``connect`` when ``Conn`` is unknown at run time)."""
    signature = inspect.signature(func)
    namespace = _namespace_of(func)
    if namespace is None:
        return signature
    params = []
    for param in signature.parameters.values():
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = _evaluate(annotation, namespace, localns or {})
        params.append(param.replace(annotation=annotation))
    return signature.replace(parameters=params)


def _namespace_of(func: Callable[..., Any]) -> dict[str, Any] | None:
    """The module namespace ``func``'s annotations are written in: a function's globals, or
    those of the code ``inspect.signature`` reads for a ``functools.partial`` (its function),
    a class (its ``__init__``, else its module) or a callable object (its ``__call__``), as
    ``Depends(Conn)`` or ``Depends(partial(connect, url))`` take."""
    target: Any = inspect.unwrap(func)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if isinstance(target, type):  # the __init__ it runs, perhaps a base class's
        inits = (vars(c)["__init__"] for c in target.__mro__[:-1] if "__init__" in vars(c))
        code = next(inits, None)
    else:
        code = target if hasattr(target, "__globals__") else type(target).__call__
    namespace = getattr(code, "__globals__", None)
    if namespace is None:
        module = sys.modules.get(getattr(target, "__module__", None) or "")
        namespace = None if module is None else vars(module)
    return namespace


def _evaluate(text: str, globalns: dict[str, Any], localns: Mapping[str, Any]) -> Any:
    """``text`` evaluated as ``typing.get_type_hints`` would (what inspect's ``eval_str``
    does), else with unknown names as placeholders if that makes it an injection, else
    ``text`` itself."""
    try:
        return eval(text, globalns, dict(localns))
    except Exception:
        pass
    try:
        value = eval(text, globalns, _Placeholders(globalns, localns))
    except Exception:
        return text
    return value if is_injected(value, inspect.Parameter.empty) else text


class _Placeholders(dict[str, Any]):
    """Names for ``eval``: ``localns``, then the module and builtins as usual, and a
    ``ForwardRef`` for a name found nowhere."""

    def __init__(self, globalns: dict[str, Any], localns: Mapping[str, Any]) -> None:
        super().__init__(localns)
        self.globalns = globalns

    def __missing__(self, name: str) -> Any:
        if name in self.globalns:
            return self.globalns[name]
        if hasattr(builtins, name):
            return getattr(builtins, name)
        return ForwardRef(name)


def _user_frame() -> tuple[FrameType | None, int]:
    """The first frame outside qtasks up the stack from the caller of this function (the code
    applying ``@app.task``), and its ``stacklevel`` for :func:`warnings.warn` called there."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "qtasks" and not module.startswith("qtasks."):
            break
        frame, level = frame.f_back, level + 1
    return frame, level


def _declaring_scope() -> Mapping[str, Any] | None:
    """The local names of the code applying ``@app.task`` (the first frame outside qtasks),
    when that is a function: where a class local to it is visible. ``None`` at module level."""
    frame, _ = _user_frame()
    if frame is None or frame.f_locals is frame.f_globals:
        return None
    return frame.f_locals


def is_injected(annotation: Any, default: Any) -> bool:
    """Whether a parameter is filled by qtasks (Depends, State...), not by the caller."""
    if getattr(default, "__qtasks_injected__", False):
        return True
    candidates = [annotation]
    if get_origin(annotation) is not None:
        candidates.extend(get_args(annotation))
    return any(getattr(c, "__qtasks_injected__", False) for c in candidates)


_APP_OPTIONS = ("expires", "unique_key", "unique_for")
"""Options of the app's ``add_task`` that a declaration's ``add_task`` passes on through its
keywords (it declares ``priority``, ``timeout``, ``delay`` and ``eta`` itself)."""


class TaskDef(Generic[P, R]):
    """A task registered with ``@app.task``.

    Calling it runs the function in this process (handy in tests). ``add_task`` enqueues it:
    a coroutine on the async app, a plain call on the sync app.
    """

    def __init__(self, app: AsyncQueueTasks, func: Callable[P, R], options: TaskOptions) -> None:
        self.app = app
        self.func = func
        self.options = options
        self.name = options.name
        self.kind = task_kind(func)
        if options.echo and not inspect.signature(func).parameters:
            raise TaskDeclarationError(f"task {self.name!r}: echo=True needs a first parameter")
        self._use(resolved_signature(func))
        self.flow = flow_spec(options, self.caller_signature)
        """The task's flow-control options (:mod:`qtasks.flow`), ``None`` without any."""
        scope = _declaring_scope() if self.unresolved else None
        if scope is not None:
            self._refuse_local_injections(scope)
        self.__doc__ = func.__doc__
        self.__name__ = getattr(func, "__name__", self.name)
        self.__wrapped__ = func

    def _use(self, signature: inspect.Signature) -> None:
        """Derive what enqueue and injection need from ``signature``."""
        self.signature = signature
        self._depends_defaults = tuple(
            (index, p.name)
            for index, p in enumerate(signature.parameters.values())
            if getattr(p.default, "__qtasks_injected__", False)
        )
        """Parameters whose default is a ``Depends`` (position, name): what a direct call
        must pass, since only a worker resolves them."""
        params = list(signature.parameters.values())
        if self.options.echo:
            params = params[1:]
        self.injected = frozenset(p.name for p in params if is_injected(p.annotation, p.default))
        self.unresolved = {
            p.name: p.annotation
            for p in params
            if isinstance(p.annotation, str) and p.name not in self.injected
        }
        """Parameters whose string annotation could not be resolved (name -> annotation)."""
        self.caller_signature = signature.replace(
            parameters=[p for p in params if p.name not in self.injected]
        )
        simple = all(
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty
            for p in self.caller_signature.parameters.values()
        )
        # Fast path for the common "plain parameters, no defaults" signature.
        self._plain_names: tuple[str, ...] | None = (
            tuple(self.caller_signature.parameters) if simple else None
        )
        from qtasks import models

        self.models = models.model_params(self.caller_signature)
        """Parameters annotated with a pydantic model (see :mod:`qtasks.models`)."""
        self.result_model = models.result_model(self.func)
        if self.models or self.result_model is not None:
            models.register(self.app)

    def _refuse_local_injections(self, scope: Mapping[str, Any]) -> None:
        """Raise if an unresolved annotation names, in the function declaring the task, a State
        or a ``Depends``: qtasks resolves annotations in the module only, so it would silently
        become an argument the caller must pass."""
        seen = resolved_signature(self.func, scope).parameters
        for name, text in self.unresolved.items():
            param = seen[name]
            if not isinstance(param.annotation, str) and is_injected(
                param.annotation, param.default
            ):
                raise UnresolvedAnnotationError(self.name, name, text)

    def resolve_annotations(self) -> None:
        """Evaluate again the annotations that did not resolve at declaration (a class defined
        further down the module exists by now). The app calls it when it starts."""
        if self.unresolved:
            self._use(resolved_signature(self.func))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._depends_defaults:
            self._check_direct_call(len(args), kwargs)
        return self.func(*args, **kwargs)

    def _check_direct_call(self, positional: int, kwargs: dict[str, Any]) -> None:
        """Refuse a direct call that leaves out a ``= Depends(f)`` parameter: the function
        would get the ``Depends`` marker itself, which only a worker replaces with ``f``'s
        value, and fail further on (or not at all) with an unrelated error."""
        for index, name in self._depends_defaults:
            if name not in kwargs and positional <= index:
                raise TaskArgumentsError(
                    f"task {self.name!r} called directly without its parameter {name!r}: its "
                    f"default is a Depends, which only a worker resolves; pass {name}=... "
                    "here, or run the task (add_task, or qtasks-testing's harness in a test)"
                )

    def with_options(self, **changes: Any) -> TaskDef[P, R]:
        """A copy of this task with some options changed (e.g. a call's own ``retry``)."""
        changed = copy.copy(self)
        changed.options = replace(self.options, **changes)
        return changed

    def __repr__(self) -> str:
        return f"<TaskDef {self.name} ({self.kind.value})>"

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Raise :class:`TaskArgumentsError` if the call does not fit the signature."""
        if self.models:  # pydantic parameters: their forms and validation (qtasks.models)
            from qtasks.models import build

            build(self, args, kwargs)
            return
        if self.injected:
            # An injected parameter may still be passed explicitly, by keyword.
            kwargs = {k: v for k, v in kwargs.items() if k not in self.injected}
        names = self._plain_names
        if names is not None and len(args) + len(kwargs) == len(names):
            if not kwargs:  # the usual call: positional arguments only
                return
            if all(k in names[len(args) :] for k in kwargs):
                return
        try:
            self.caller_signature.bind(*args, **kwargs)
        except TypeError as exc:
            hint = (
                self._echo_hint()
                or self._hint(exc)
                or self._packed_hint(kwargs)
                or self._celery_hint(kwargs)
            )
            raise TaskArgumentsError(f"task {self.name!r}: {exc}{hint}") from None

    def _echo_hint(self) -> str:
        """For a task whose first parameter is ``self`` but declared without ``echo=True``
        (Celery's ``bind=True`` left out): the caller's first argument went to ``self``."""
        first = next(iter(self.caller_signature.parameters), None)
        if self.options.echo or first != "self":
            return ""
        return (
            " (its first parameter is 'self': declare it @app.task(echo=True) for the worker "
            "to pass the task's handle there, as Celery's bind=True; callers leave it out)"
        )

    def _celery_hint(self, kwargs: dict[str, Any]) -> str:
        """For Celery's ``apply_async`` options given to ``add_task`` (``countdown=10``,
        ``queue="high"``) that the task has no parameters for: what qtasks writes."""
        for option, instead in _CELERY_CALL_OPTIONS.items():
            if option in kwargs and option not in self.caller_signature.parameters:
                return f" ({option}= is Celery's: {instead})"
        return ""

    def delay(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Refused, as Celery's call: ``add_task(*args, **kwargs)`` enqueues."""
        raise TaskArgumentsError(
            f"{self.name}.delay(...) is Celery's call: enqueue with {self.name}.add_task(...), "
            "the same arguments, or app.add_task(name, ...)"
        )

    def apply_async(self, *args: Any, **options: Any) -> NoReturn:
        """Refused, as Celery's call: ``add_task(*args, delay=, eta=, priority=)`` enqueues."""
        raise TaskArgumentsError(
            f"{self.name}.apply_async(...) is Celery's call: enqueue with "
            f"{self.name}.add_task(*args, delay=seconds, eta=unix_time, priority=n, **kwargs) "
            "(countdown= is delay=; a lower priority runs first)"
        )

    def _packed_hint(self, kwargs: dict[str, Any]) -> str:
        """For ``args=(...)``/``kwargs={...}`` keywords the task has no parameters for: the
        form of QTasks' examples (``self.add_task(task_name="x", args=(5,))``), which packed
        the task's arguments; they are passed as they are."""
        packed = [k for k in ("args", "kwargs") if k in kwargs]
        packed = [k for k in packed if k not in self.caller_signature.parameters]
        if not packed:
            return ""
        given = " and ".join(f"{k}=" for k in packed)
        return (
            f" ({given} packed the task's arguments in QTasks' examples; qtasks passes them as "
            f"they are: add_task({self.name!r}, *args, **kwargs), e.g. "
            f"add_task({self.name!r}, 5, key=value))"
        )

    def _hint(self, exc: TypeError) -> str:
        """For a missing argument whose annotation did not resolve: it may be a lost State."""
        missing = re.findall(r"missing a required argument: '(\w+)'", str(exc))
        for name in missing:
            if name in self.unresolved:
                return (
                    f" (its annotation {self.unresolved[name]!r} could not be resolved in "
                    f"the module of the task; if it names a State or a Depends, "
                    f"{UnresolvedAnnotationError.FIX})"
                )
        return ""

    def add_task(
        self,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, AsyncTask]:
        """Enqueue this task. ``priority``, ``timeout``, ``delay`` and ``eta`` keywords are
        options of the call; use :meth:`enqueue` when the task itself takes such parameters.
        QTasks' ``task_name=`` keyword enqueues another task with these arguments instead,
        unless this task has a ``task_name`` parameter: it is then this task's argument.

        Typing: the options are checked, the task's own arguments are not (``*args: Any``).
        A ``ParamSpec`` signature cannot take extra keywords, and it cannot leave out the
        parameters qtasks injects (``State``, ``Depends``), which callers must not pass; so
        the arguments are checked when the task is enqueued instead (a call that does not fit
        the task raises :class:`~qtasks.errors.TaskArgumentsError`). Calling the task directly,
        ``task(...)``, keeps the function's checked signature. In a sync task's thread,
        where nothing could await it: :class:`~qtasks.errors.AsyncCallInThreadError`."""
        self._not_in_task_thread("add_task")
        name, own, options = self._call_parts(kwargs)
        return self.app.enqueue(
            name, args, own, priority=priority, timeout=timeout, delay=delay, eta=eta, **options
        )

    def _not_in_task_thread(self, method: str) -> None:
        """A coroutine made in a sync task's thread would never be awaited: refused, naming
        the call (the app's own methods check again, as cheaply: one C call)."""
        if _running_loop() is None and in_task_thread():
            raise AsyncCallInThreadError(self.app.name, f"{self.name}.{method}")

    def _call_parts(self, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """What an ``add_task(*args, **kwargs)`` call enqueues: the task (this one, or the
        one QTasks' ``task_name=`` keyword names), its keyword arguments, and the app's
        options among ``kwargs`` (``expires``, ``unique_key``, ``unique_for``). A keyword
        that names a parameter of this task is this task's argument, not an option."""
        own = dict(kwargs)
        params = self.caller_signature.parameters
        name = self.name
        if "task_name" in own and "task_name" not in params:
            name = own.pop("task_name")
        options = {
            key: own.pop(key)
            for key in _APP_OPTIONS
            if key in own and (key not in params or name != self.name)
        }
        return name, own, options

    def enqueue(
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
    ) -> Coroutine[Any, Any, AsyncTask]:
        """Enqueue with explicit ``args``/``kwargs``, leaving every name free for the task."""
        self._not_in_task_thread("enqueue")
        return self.app.enqueue(
            self.name, args, kwargs, priority=priority, timeout=timeout, delay=delay, eta=eta
        )

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this task (a call not made yet), for workflows and ``add_tasks``;
        options: ``.s(...).set(priority=..., delay=...)``."""
        from qtasks.workflows.canvas import Signature

        return Signature(self.name, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An *immutable* signature of this task: as a chain step (or chord callback) it is
        called with these arguments only, not with its predecessor's result first; as an
        error callback, without the workflow id. Celery's ``task.si(...)``."""
        from qtasks.workflows.canvas import Signature

        return Signature(self.name, args, kwargs, immutable=True)

    def map(self, items: Iterable[Any]) -> Group:
        """A group of this task over ``items``, one call per item (a tuple or list item is the
        call's arguments, anything else its one argument)."""
        from qtasks.bulk import as_args, check_items
        from qtasks.workflows.canvas import Signature, group

        check_items(items, f"{self.name}.map")
        return group([Signature(self.name, as_args(item)) for item in items])

    def add_tasks(
        self,
        args_list: Iterable[Any],
        *,
        priority: int | None = None,
        delay: float | None = None,
    ) -> Coroutine[Any, Any, list[AsyncTask]]:
        """Enqueue one call of this task per item of ``args_list`` (a tuple or list item is
        the arguments, anything else the one argument), in one round trip per batch."""
        self._not_in_task_thread("add_tasks")
        return self.app.add_tasks(self._signatures(args_list, priority, delay))

    def _signatures(
        self, args_list: Iterable[Any], priority: int | None, delay: float | None
    ) -> list[Signature]:
        """The signatures of ``add_tasks``; its options checked first, as ``add_task`` checks
        them (:class:`TaskArgumentsError`, ``add_tasks: ...``), not by each signature (a
        :class:`TaskDeclarationError`, for a signature built wrongly)."""
        from qtasks.bulk import as_args, check_items
        from qtasks.workflows.canvas import Signature

        check_items(args_list, "add_tasks")
        if priority is not None:
            priority = check_priority(priority, "add_tasks: priority", TaskArgumentsError)
        if delay is not None:
            seconds = check_delay(delay, "add_tasks: delay", TaskArgumentsError)
            if seconds > FAR_AHEAD:
                raise far_ahead("add_tasks: delay", seconds, seconds, "seconds", TaskArgumentsError)
        return [Signature(self.name, as_args(a), {}, priority, delay) for a in args_list]


class SyncTaskDef(TaskDef[P, R]):
    """A task of the sync app: ``add_task`` blocks and returns a :class:`Task`."""

    def __init__(self, facade: QueueTasks, inner: TaskDef[P, R]) -> None:
        super().__init__(inner.app, inner.func, inner.options)
        self.facade = facade
        self.aio = inner
        """The same task on the async app, for an ``async def`` task of the sync app (it runs
        on the app's loop, where a blocking call cannot): ``await child.aio.add_task(...)``."""

    # The sync app's add_task and enqueue block and return a Task, not a coroutine.
    def add_task(  # type: ignore[override]
        self,
        *args: Any,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
        **kwargs: Any,
    ) -> Task:
        """Enqueue this task and return its record (typed as :meth:`TaskDef.add_task`)."""
        name, own, options = self._call_parts(kwargs)
        return self.facade.enqueue(
            name, args, own, priority=priority, timeout=timeout, delay=delay, eta=eta, **options
        )

    def enqueue(  # type: ignore[override]
        self,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        delay: float | None = None,
        eta: float | None = None,
    ) -> Task:
        return self.facade.enqueue(
            self.name, args, kwargs, priority=priority, timeout=timeout, delay=delay, eta=eta
        )

    def add_tasks(  # type: ignore[override]  # blocks: a list of records, not a coroutine
        self,
        args_list: Iterable[Any],
        *,
        priority: int | None = None,
        delay: float | None = None,
    ) -> list[Task]:
        """Enqueue one call per item of ``args_list`` and return the records (see
        :meth:`TaskDef.add_tasks`)."""
        return self.facade.add_tasks(self._signatures(args_list, priority, delay))


@dataclass(slots=True)
class Task(TaskRecord):
    """A task record returned to a producer of the sync app, able to wait for its result."""

    _client: Any = field(default=None, repr=False, compare=False)

    def wait_result(self, timeout: float | None = None) -> Task:
        """Block until the task is final and return its record; raises
        :class:`~qtasks.errors.TaskTimeoutError` when ``timeout`` runs out."""
        record: Task = self._client.wait(self.uuid, timeout)
        return record

    async def wait_result_async(self, timeout: float | None = None) -> Task:
        """:meth:`wait_result` awaitable from any event loop (QTasks' name): the blocking wait
        runs in a worker thread, as the sync app's loop is another one."""
        import anyio.to_thread

        record: Task = await anyio.to_thread.run_sync(
            self.wait_result, timeout, abandon_on_cancel=True
        )
        return record

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """Follow a generator task: yield each stored step as it happens (and a
        :class:`~qtasks.steps.StepsRestarted` where a new run started over)."""
        iterator: Iterator[Any] = self._client.stream(self.uuid, timeout)
        return iterator

    def refresh(self) -> Task:
        """The record as stored now."""
        record: Task = self._client.get(self.uuid)
        return record


def _client_name(record: AsyncTask) -> str:
    return str(getattr(record._client, "name", "?"))


_record_loop_only = loop_only(_client_name, "record", lambda: Task)
"""A record's coroutine methods refuse a sync task's thread, as the app's do."""


@dataclass(slots=True)
class AsyncTask(TaskRecord):
    """A task record returned to a producer of the async app. Its coroutine methods called in
    a sync task's thread raise :class:`~qtasks.errors.AsyncCallInThreadError`."""

    _client: Any = field(default=None, repr=False, compare=False)

    @_record_loop_only
    async def wait_result(self, timeout: float | None = None) -> AsyncTask:
        """Wait until the task is final and return its record (woken, not polled)."""
        record: AsyncTask = await self._client.wait(self.uuid, timeout)
        return record

    @_record_loop_only
    async def wait_result_async(self, timeout: float | None = None) -> AsyncTask:
        """QTasks' name of :meth:`wait_result`."""
        return await self.wait_result(timeout)

    @_record_loop_only
    def stream(self, timeout: float | None = None) -> AsyncGenerator[Any, None]:
        """Follow a generator task: ``async for step in task.stream()``; see
        :meth:`~qtasks.app.AsyncQueueTasks.stream` for its errors, ``timeout`` and the
        :class:`~qtasks.steps.StepsRestarted` marker."""
        iterator: AsyncGenerator[Any, None] = self._client.stream(self.uuid, timeout)
        return iterator

    @_record_loop_only
    async def refresh(self) -> AsyncTask:
        """The record as stored now."""
        record: AsyncTask = await self._client.get(self.uuid)
        return record
