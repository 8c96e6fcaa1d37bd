"""Shared state for tasks: subclass :class:`AsyncState` or :class:`SyncState` and annotate a task
parameter with the subclass; the worker passes an instance.

Where the values live is the subclass's ``scope``:

* ``"worker"`` (default): a dict in the worker process, guarded by a lock. Fast, shared by every
  task of that worker (threads and coroutines alike), lost when the worker stops, invisible to
  other workers.
* ``"global_config"``: the app's GlobalConfig, in the namespace ``qtasks.state:<name>``. Shared
  by every worker that uses the same GlobalConfig (with Redis: across machines), survives worker
  restarts. Values must be JSON-like; every call is a round-trip.

Two subclasses with the same ``name`` share their values, so an :class:`AsyncState` and a
:class:`SyncState` can give async and sync tasks one set of values.
"""

from __future__ import annotations

import inspect
import threading
import uuid as uuid_mod
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import anyio
import anyio.from_thread

from qtasks.components import CompareDelete, provides
from qtasks.errors import StateError

if TYPE_CHECKING:
    from qtasks.components import GlobalConfig

StateScope = Literal["worker", "global_config"]
_LOCK_TTL = 30.0


class LocalStore:
    """The values of one State name in one worker process."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        # A threading lock: sync tasks touch the store from worker threads, async ones from the
        # event loop; every operation under it is a few dict operations, never an await.
        self.lock = threading.Lock()

    def get(self, key: str, default: Any) -> Any:
        with self.lock:
            return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        with self.lock:
            self.data[key] = value

    def update(self, values: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.data.update(values)
            return dict(self.data)

    def delete(self, key: str) -> bool:
        with self.lock:
            return self.data.pop(key, _MISSING) is not _MISSING

    def clear(self) -> None:
        with self.lock:
            self.data.clear()

    def get_all(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.data)

    def increment(self, key: str, amount: float) -> float:
        with self.lock:
            value: float = self.data.get(key, 0) + amount
            self.data[key] = value
            return value

    def update_with(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        with self.lock:
            value = fn(self.data.get(key, default))
            self.data[key] = value
            return value


_MISSING = object()


class GlobalStore:
    """The values of one State name in the app's GlobalConfig."""

    def __init__(self, global_config: GlobalConfig, name: str) -> None:
        self.config = global_config
        self.namespace = f"qtasks.state:{name}"
        self.locks = f"qtasks.state-lock:{name}"

    async def get(self, key: str, default: Any) -> Any:
        return await self.config.get(self.namespace, key, default)

    async def set(self, key: str, value: Any) -> None:
        await self.config.set(self.namespace, key, value)

    async def update(self, values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            await self.config.set(self.namespace, key, value)
        return await self.get_all()

    async def delete(self, key: str) -> bool:
        return await self.config.delete(self.namespace, key)

    async def clear(self) -> None:
        await self.config.clear(self.namespace)

    async def get_all(self) -> dict[str, Any]:
        return await self.config.get_all(self.namespace)

    async def increment(self, key: str, amount: float) -> float:
        return await self.config.increment(self.namespace, key, amount)

    async def update_with(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        # GlobalConfig has no compare-and-set, so take a lock key (set_if_absent with a TTL, so a
        # crashed holder cannot block it forever), poll for it, and free it only if still ours.
        token = uuid_mod.uuid4().hex
        delay = 0.002
        while not await self.config.set_if_absent(self.locks, key, token, ttl=_LOCK_TTL):
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            value = fn(await self.config.get(self.namespace, key, default))
            await self.config.set(self.namespace, key, value)
            return value
        finally:
            with anyio.CancelScope(shield=True):
                await self._unlock(key, token)

    async def _unlock(self, key: str, token: str) -> None:
        """Free the lock of ``key`` if it still holds ``token``: once its TTL ran out, the
        next holder's lock is there, and must stay (in one atomic step with
        :class:`~qtasks.components.CompareDelete`; else a get then a delete, which a lock
        running out between the two defeats)."""
        config = self.config
        if provides(config, CompareDelete):
            await cast(CompareDelete, config).delete_if_equal(self.locks, key, token)
        elif await config.get(self.locks, key) == token:
            await config.delete(self.locks, key)


class _StateBase:
    """What both State flavours share: the injection marker, ``scope`` and ``name``."""

    __qtasks_injected__: ClassVar[bool] = True
    scope: ClassVar[StateScope] = "worker"
    """``"worker"`` (in this worker process) or ``"global_config"`` (shared by every worker)."""
    name: ClassVar[str | None] = None
    """The key of the values; defaults to ``module.QualifiedClassName``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.scope not in ("worker", "global_config"):
            raise StateError(
                f"{cls.__qualname__}.scope must be 'worker' or 'global_config', got {cls.scope!r}"
            )

    @classmethod
    def state_name(cls) -> str:
        return cls.name or f"{cls.__module__}.{cls.__qualname__}"

    def __init__(self, store: LocalStore | GlobalStore) -> None:
        """Built by qtasks when it injects the state; do not construct it yourself."""
        self._store = store

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} scope={self.scope} name={self.state_name()!r}>"


class AsyncState(_StateBase):
    """State for async tasks (every method is a coroutine).

    ``update_with(key, fn)`` and ``increment`` are atomic read-modify-writes: concurrent tasks do
    not lose updates. ``fn`` is a plain function of the old value and must be quick. Values
    returned by ``get`` are the stored objects: replace them, do not mutate them in place.
    """

    async def _call(self, op: str, *args: Any) -> Any:
        method = getattr(self._store, op)
        result = method(*args)
        if isinstance(self._store, GlobalStore):
            result = await result
        return result

    async def get(self, key: str | None = None, default: Any = None) -> Any:
        """The value of ``key`` (``default`` if missing); with no key, every value (as
        :meth:`get_all`, QTasks' form)."""
        if key is None:
            return await self.get_all()
        return await self._call("get", key, default)

    async def set(self, key: str, value: Any) -> None:
        await self._call("set", key, value)

    async def update(self, **values: Any) -> dict[str, Any]:
        """Set several keys and return every value after (QTasks' form). Each set is atomic;
        with ``global_config`` the sets together and the read after them are not."""
        result: dict[str, Any] = await self._call("update", values)
        return result

    async def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed."""
        result: bool = await self._call("delete", key)
        return result

    async def clear(self) -> None:
        await self._call("clear")

    async def get_all(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("get_all")
        return result

    async def increment(self, key: str, amount: float = 1) -> float:
        """Atomically add ``amount`` to ``key`` (missing counts as 0); return the new value."""
        result: float = await self._call("increment", key, amount)
        return result

    async def update_with(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace ``key``'s value ``v`` (``default`` if missing) with ``fn(v)``;
        return the new value. With ``scope="global_config"`` this takes a lock key in the
        GlobalConfig (prefer ``increment`` for counters: it is one atomic call)."""
        return await self._call("update_with", key, fn, default)


class SyncState(_StateBase):
    """State for sync tasks (blocking methods, called from the task's worker thread).

    Same API and guarantees as :class:`AsyncState`. With ``scope="global_config"`` each call
    hops to the event loop, so it may only be used inside a sync task (a worker thread)."""

    def _call(self, op: str, *args: Any) -> Any:
        method = getattr(self._store, op)
        if isinstance(self._store, GlobalStore):
            coro: Callable[..., Coroutine[Any, Any, Any]] = method
            return anyio.from_thread.run(coro, *args)
        return method(*args)

    def get(self, key: str | None = None, default: Any = None) -> Any:
        """The value of ``key`` (``default`` if missing); with no key, every value."""
        if key is None:
            return self.get_all()
        return self._call("get", key, default)

    def set(self, key: str, value: Any) -> None:
        self._call("set", key, value)

    def update(self, **values: Any) -> dict[str, Any]:
        """Set several keys and return every value after; see :meth:`AsyncState.update`."""
        result: dict[str, Any] = self._call("update", values)
        return result

    def delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed."""
        result: bool = self._call("delete", key)
        return result

    def clear(self) -> None:
        self._call("clear")

    def get_all(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("get_all")
        return result

    def increment(self, key: str, amount: float = 1) -> float:
        """Atomically add ``amount`` to ``key`` (missing counts as 0); return the new value."""
        result: float = self._call("increment", key, amount)
        return result

    def update_with(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace ``key``'s value ``v`` (``default`` if missing) with ``fn(v)``;
        return the new value."""
        return self._call("update_with", key, fn, default)


class _BlockingView:
    """Mixed in before an :class:`AsyncState` subclass injected into a *sync* task: its
    coroutine methods (the built-in ones and the subclass's own) block the task's worker thread
    and run on the event loop through anyio's portal, so a QTasks-style ``class S(AsyncState)``
    works in a plain ``def`` task. Called from the event loop itself they stay coroutines."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value) or _in_event_loop():
            return value

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return anyio.from_thread.run(partial(value, *args, **kwargs))

        return blocking


def _in_event_loop() -> bool:
    try:
        anyio.get_current_task()
    except RuntimeError:  # NoEventLoopError: a worker thread
        return False
    return True


def blocking_view(cls: type[_StateBase]) -> type[_StateBase]:
    """``cls`` (an :class:`AsyncState` subclass) with blocking methods for a sync task; the
    same ``name``, so it shares the values of ``cls``, and still an instance of ``cls``."""
    namespace = {
        "name": cls.state_name(),
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (_BlockingView, cls), namespace)


def state_class(annotation: Any) -> type[_StateBase] | None:
    """The State subclass a parameter annotation names (directly or first in ``Annotated``)."""
    from typing import Annotated, get_args, get_origin

    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, AsyncState | SyncState):
        return annotation
    return None


class StateRegistry:
    """The worker-scope stores of one app (one per State name)."""

    def __init__(self) -> None:
        self._stores: dict[str, LocalStore] = {}
        self._lock = threading.Lock()

    def make(self, cls: type[_StateBase], global_config: GlobalConfig) -> _StateBase:
        """An instance of ``cls`` bound to its store."""
        name = cls.state_name()
        if cls.scope == "global_config":
            return cls(GlobalStore(global_config, name))
        with self._lock:
            store = self._stores.setdefault(name, LocalStore())
        return cls(store)
