"""The qtasks hook specification: one pluggy hook per lifecycle trigger.

Implement any of these in a plugin with ``@qtasks.hookimpl``; register it with
``app.add_plugin(obj)`` or through the ``qtasks.plugins`` entry-point group. An implementation
may take any subset of a hook's parameters, and may be ``async def`` (the core awaits it), except
for ``firstresult`` hooks and wrappers, which must be plain functions.

Kinds of hooks (each docstring says which):

* **notification** (past tense, return value ignored). An exception is logged with the
  plugin's name and does not affect the task or the worker.
* **transform** (return a new value, or ``None`` for "unchanged"). Implementations are chained
  in call order: each receives the value the previous one returned. An exception in a worker-side
  transform fails the task with :class:`~qtasks.errors.PluginError` naming the plugin (stored as
  the record's error; not retried); in a caller-side one (``qtasks_task_enqueue``,
  ``qtasks_storage_got``, ``qtasks_global_config_got``, ``qtasks_global_config_write``,
  ``qtasks_inspect``) the call raises it.
* **decide** (``firstresult``): the first non-``None`` return wins; sync only. An exception in
  ``qtasks_task_retry_delay`` is logged and the task fails without a retry.

Order of hooks
--------------
(Checked by ``tests/core/test_plugins_order.py``.)

App: ``qtasks_app_configured`` → ``qtasks_component_started`` for storage, global_config,
broker → ``qtasks_app_started`` → (serving) ``qtasks_broker_listening`` →
``qtasks_component_started`` (worker) … ``qtasks_component_stopped`` (worker) →
``qtasks_app_stopping`` → ``qtasks_component_stopped`` for broker, global_config, storage →
``qtasks_app_stopped``.

Producer: ``qtasks_task_enqueue`` (transform of the message) → the record stored and the
message published → ``qtasks_storage_added`` → ``qtasks_task_enqueued``. With in-memory
components the store comes first, then the publish; with remote ones the record is stored while
the message is published (one shared round trip, or two overlapped ones); either way both hooks
fire once both are done. An enqueue that raises fires ``qtasks_task_enqueue_failed`` instead of
both; an ``add_task`` with a unique key whose task is pending fires ``qtasks_task_deduplicated``
instead of both (it returns that task, nothing is stored or published).

Worker, every path starts: ``qtasks_broker_message_received`` → ``qtasks_worker_task_received``
→ ``qtasks_storage_saved`` (status ``process``) → ``qtasks_worker_execute_before`` →
``qtasks_executor_middlewares`` (transform) → ``qtasks_executor_args`` (transform) →
``qtasks_executor_execute_before`` → the task runs (a generator: ``qtasks_executor_yielded`` per
step). Then:

* success: ``qtasks_executor_result`` (transform) → ``qtasks_executor_execute_after`` →
  ``qtasks_executor_closed`` → ``qtasks_storage_saved`` (final) → ``qtasks_broker_acked`` →
  ``qtasks_task_succeeded`` → ``qtasks_worker_execute_after``.
* error: ``qtasks_executor_closed`` → ``qtasks_executor_error`` → ``qtasks_task_retry_delay``
  (decide) → ``qtasks_storage_saved`` (final) → ``qtasks_broker_acked`` → ``qtasks_task_failed``
  → ``qtasks_worker_execute_after``.
* retry: ``qtasks_executor_closed`` → ``qtasks_executor_error`` → ``qtasks_task_retry_delay``
  (returns a delay; the ``retry`` record is stored) → ``qtasks_worker_task_retry`` →
  ``qtasks_broker_requeued`` → ``qtasks_worker_execute_after``; the next delivery starts over.
* cancel: ``qtasks_executor_closed`` → ``qtasks_storage_saved`` → ``qtasks_broker_acked`` →
  ``qtasks_task_cancelled`` → ``qtasks_worker_execute_after``. A task cancelled after its
  claim began it but before it started: ``qtasks_task_cancelled`` alone, after
  ``qtasks_worker_task_received`` (one cancelled while queued fires it in the canceller's
  process, see the hook).
* lease lost on the last allowed delivery (``max_deliveries``): ``qtasks_executor_closed`` →
  (the ``error`` record, fenced) ``qtasks_task_dead_lettered`` → ``qtasks_worker_execute_after``.
* (no run here) a message the broker dead-lettered on its own, every delivery lost: (the
  ``error`` record, stored by a :class:`~qtasks.components.BeginOnClaim` claim, or fenced
  after a :class:`~qtasks.components.BuryNotice`) ``qtasks_task_dead_lettered``.
* a record the storage refuses for what it holds (the result, the ``retry`` or the ``error``
  record: :class:`~qtasks.errors.UnstorableRecordError`): the error path again with that
  error, not retried: (``qtasks_executor_error`` only when the task raised nothing, its result
  refused) → ``qtasks_storage_saved`` (``error``) → ``qtasks_broker_acked`` →
  ``qtasks_task_failed`` (with the refusal) → ``qtasks_worker_execute_after``.
* ``max_time`` exceeded: ``qtasks_task_timed_out`` → the error path (the error is
  :class:`~qtasks.errors.TaskMaxTimeError`).
* a message that cannot run (undecodable, unknown task, bad arguments):
  ``qtasks_broker_nacked`` → ``qtasks_task_rejected`` (nothing of the above after
  ``qtasks_broker_message_received``).
* a component or plugin raised while the worker handled it (not an outage,
  :mod:`qtasks.poison`): ``qtasks_broker_requeued`` (with the delay, the failure counted in
  the message); the ``max_deliveries``-th failure: ``qtasks_broker_nacked`` →
  ``qtasks_task_rejected``.
* expired (not started by its ``expires`` time, :mod:`qtasks.flow`): after
  ``qtasks_worker_task_received``, ``qtasks_storage_saved`` (``expired``) →
  ``qtasks_broker_acked`` → ``qtasks_task_expired``.
* held by flow control (a rate token or a concurrency slot for later): after
  ``qtasks_worker_task_received``, ``qtasks_broker_requeued`` (with the delay); the next
  delivery starts over.

Reading: ``app.get`` → ``qtasks_storage_got``; ``app.config_get`` → ``qtasks_global_config_got``;
``app.config_set`` → ``qtasks_global_config_write`` (transform) → the write →
``qtasks_global_config_set``; ``app.inspect`` → ``qtasks_inspect``.

Coming from QTasks 1.7
----------------------
A plugin written for QTasks (``trigger(name, **kwargs)``, registered with
``app.add_plugin(p, trigger_names=[...], component=...)``) runs through
:mod:`qtasks.compat.plugins`, which calls it at these hooks (``qtasks.compat.plugins.TRIGGERS``;
``tests/compat/test_qtasks_plugins.py`` checks that this table matches it). "applied": the keys a
plugin returns change the data, as in QTasks; "notified": qtasks only notifies there and a
returned dict is ignored (logged once), for the reason given.

App (``component=None``):

* ``qtasks_add_task_before_broker`` → ``qtasks_task_enqueue``: applied (task_name, priority,
  args, kw)
* ``qtasks_add_task_after_broker`` → ``qtasks_task_enqueued``: notified
* ``qtasks_get`` → ``qtasks_storage_got``: applied (task)
* ``qtasks_stop`` → ``qtasks_app_stopping``: notified
* ``qtasks_ping`` → ``qtasks_app_pinged``: notified
* ``qtasks_flush_all`` → ``qtasks_app_flushed``: notified
* ``starter_start`` → ``qtasks_app_started`` (any component): notified
* ``starter_stop`` → ``qtasks_app_stopping`` (any component): notified

Broker:

* ``broker_listen_start`` → ``qtasks_broker_listening``: notified
* ``broker_add_before`` → ``qtasks_storage_added``: notified (change a new task at
  ``qtasks_task_enqueue``)
* ``broker_add_after`` → ``qtasks_task_enqueued``: notified
* ``broker_add_worker`` → ``qtasks_worker_task_received``: notified. Renaming or re-prioritising
  a delivered task would run something other than what its record and producer say; change
  the message at ``qtasks_task_enqueue`` instead.
* ``broker_get`` → ``qtasks_storage_got``: applied (task)
* ``broker_update`` → ``qtasks_storage_saved``: notified. Status writes are fenced by the
  delivery's lease token, so a plugin cannot rewrite them without breaking recovery.
* ``broker_start`` → ``qtasks_component_started``: notified
* ``broker_stop`` → ``qtasks_component_stopped``: notified
* ``broker_remove_finished_task`` → ``qtasks_broker_acked``: notified (the final record is
  written before the ack; its result is changed at ``qtasks_executor_result``)
* ``broker_flush_all`` → ``qtasks_app_flushed``: notified
* ``broker_running_older_tasks``: none. No start-up recovery runs: an expired lease is
  redelivered by the broker (``qtasks_broker_message_received``, attempt > 1).

Storage:

* ``storage_add`` → ``qtasks_storage_added``: notified
* ``storage_get`` → ``qtasks_storage_got``: applied (result)
* ``storage_update`` → ``qtasks_storage_saved``: notified (fenced writes, as ``broker_update``)
* ``storage_add_process`` → ``qtasks_storage_saved`` (status ``process``): notified
* ``storage_remove_finished_task`` → ``qtasks_broker_acked``: notified
* ``storage_start`` → ``qtasks_component_started``: notified
* ``storage_stop`` → ``qtasks_component_stopped``: notified
* ``storage_flush_all`` → ``qtasks_app_flushed``: notified
* ``storage_running_older_tasks``: none (as ``broker_running_older_tasks``)
* ``storage_delete_finished_tasks``: none. Finished records expire by TTL inside the storage;
  no process deletes them.
* ``storage_get_all``: none. qtasks has no call that reads every record (records are read by
  uuid; ``qtasks inspect`` shows counts).

GlobalConfig:

* ``global_config_set`` → ``qtasks_global_config_write``: applied (value), before
  ``app.config_set`` writes (a returned ``name``/``key`` is not: another key would be written
  than the caller named)
* ``global_config_get`` → ``qtasks_global_config_got``: applied (get)
* ``global_config_start`` → ``qtasks_component_started``: notified
* ``global_config_stop`` → ``qtasks_component_stopped``: notified
* ``global_config_set_status`` → ``qtasks_global_config_status``: notified
* ``global_config_get_all``, ``global_config_get_match``: none. No app call reads a whole
  namespace through plugins; ``qtasks_global_config_got`` sees each value ``app.config_get``
  reads.

Worker and executor (``component="worker"``):

* ``worker_add`` → ``qtasks_worker_task_received``: notified (as ``broker_add_worker``)
* ``worker_start`` → ``qtasks_component_started``: notified
* ``worker_stop`` → ``qtasks_component_stopped``: notified
* ``worker_execute_before`` → ``qtasks_worker_execute_before``: notified (the record is stored
  as ``process`` already)
* ``worker_run_task_before`` → ``qtasks_worker_execute_before``: notified
* ``worker_execute_after`` → ``qtasks_worker_execute_after``: notified
* ``worker_task_error_retry`` → ``qtasks_worker_task_retry``: notified (the retry decision is
  ``qtasks_task_retry_delay``)
* ``worker_remove_finished_task`` → ``qtasks_broker_acked``: notified
* ``task_executor_middlewares_execute`` → ``qtasks_executor_middlewares``: notified
* ``task_executor_args_replace`` → ``qtasks_executor_args``: applied (args, kw); ``args_info``
  describes the task's parameters as QTasks did (``qtasks.compat.plugins.args_info``)
* ``task_executor_before_execute`` → ``qtasks_executor_execute_before``: notified
* ``task_executor_run_task`` → ``qtasks_executor_result``: applied (result)
* ``task_executor_run_task_gen`` → ``qtasks_executor_result``: applied (results; generator
  tasks; each step is also ``qtasks_executor_yielded``)
* ``task_executor_after_execute`` → ``qtasks_executor_execute_after``: notified
* ``task_executor_after_execute_result_replace`` → ``qtasks_executor_result``: applied (result)
* ``task_executor_decode`` → ``qtasks_executor_result``: applied (result). It runs before the
  result is encoded, not after: the stored form is the serializer's (``serializer=``) and the
  task's ``decode=``.
* ``task_executor_run_task_trigger_error`` → ``qtasks_executor_middlewares``: applied (result);
  the adapter adds a middleware around the call that asks the plugin when the task raises
* ``task_executor_task_close`` → ``qtasks_executor_closed``: notified (on every path, not only
  success)

Stats: ``stats_inspect``: none; ``qtasks_inspect`` (a plain hook) adds keys to the report.

Over ~500 lines on purpose: every hook of the product is specified here, in one place, each
with when it fires and what it gets (one file to read to write a plugin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from qtasks.app import AsyncQueueTasks
    from qtasks.components import Delivery
    from qtasks.config import QueueConfig
    from qtasks.executor import Middleware, TaskRun
    from qtasks.messages import Message
    from qtasks.record import TaskRecord
    from qtasks.task import TaskDef

hookspec = pluggy.HookspecMarker("qtasks")

# --- app and configuration ------------------------------------------------------------------


@hookspec
def qtasks_app_configured(app: AsyncQueueTasks, config: QueueConfig) -> None:
    """Notification: the app has its configuration and components, before anything starts.
    Fired once per start: a start tried again after it failed (a worker waiting for its
    servers, see :mod:`qtasks.waiting`; a producer calling again) does not fire it again;
    a start after :meth:`~qtasks.app.AsyncQueueTasks.aclose` does."""


@hookspec
def qtasks_task_registered(app: AsyncQueueTasks, task: TaskDef[..., Any]) -> None:
    """Notification: ``task`` was declared with ``@app.task`` (sync; fired at import time, so
    an ``async`` implementation is awaited when the app starts)."""


# --- starter and component lifecycle --------------------------------------------------------


@hookspec
def qtasks_app_started(app: AsyncQueueTasks) -> None:
    """Notification: every component and plugin started; fired before the worker serves."""


@hookspec
def qtasks_app_stopping(app: AsyncQueueTasks) -> None:
    """Notification: shutdown began; the worker stops taking messages after this."""


@hookspec
def qtasks_app_stopped(app: AsyncQueueTasks) -> None:
    """Notification: every component was stopped (last hook of an app's life)."""


@hookspec
def qtasks_app_restored(app: AsyncQueueTasks) -> None:
    """Notification: a test harness (``qtasks_testing``) put the app back as it was before a
    test (components, State, enqueue methods) and is taking off what the test added to it. A
    plugin lets go here of what the test attached to the app through it: qtasks-timer detaches
    a timer built in the test (not while a module was imported, see :mod:`qtasks.importing`),
    so that the next test can build its own. Fired from sync code with no event loop running:
    implement it as a plain function (a coroutine returned is closed, not awaited)."""


@hookspec
def qtasks_app_pinged(app: AsyncQueueTasks, alive: bool) -> None:
    """Notification: ``app.ping()`` ran; ``alive`` is what it returns."""


@hookspec
def qtasks_app_flushed(app: AsyncQueueTasks, counts: dict[str, int]) -> None:
    """Notification: ``app.flush_all()`` deleted everything; ``counts`` per component kind."""


@hookspec
def qtasks_component_started(app: AsyncQueueTasks, kind: str, component: Any) -> None:
    """Notification: a component started; ``kind`` is ``broker``, ``storage``,
    ``global_config`` or ``worker``. Fired in start order: storage, global_config, broker,
    worker."""


@hookspec
def qtasks_component_stopped(app: AsyncQueueTasks, kind: str, component: Any) -> None:
    """Notification: a component stopped, in reverse start order."""


# --- enqueue --------------------------------------------------------------------------------


@hookspec
def qtasks_task_enqueue(app: AsyncQueueTasks, message: Message) -> Message | None:
    """Transform, before the message goes to the broker: return a replacement message (e.g. with
    other args, priority or headers) or ``None``. Raising aborts ``add_task``.

    Fires for ``add_task``, each task of ``add_tasks`` and every member of a workflow, in
    ``run_workflow`` where its message is built: the first steps' and also those that wait
    in a gate (stored then, published later by the worker that opens the gate, which cannot
    rewrite them: it publishes inside the atomic settle step). A member's uuid must stay
    the same (:class:`~qtasks.errors.WorkflowError` otherwise); its workflow headers are
    kept."""


@hookspec
def qtasks_task_enqueued(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: the broker accepted the message; ``record`` is the stored record (``new``
    unless a worker already began it).

    Fires in the process that published: for ``add_task``/``add_tasks`` and a workflow's first
    steps in the client; for a workflow member published when its gate opened (the next
    step, a chord's callback, the error callback) in the worker whose settle step opened it,
    after that step returned (on Redis after the settle script, once per batch of settled
    tasks); for a workflow's error callback published by the Redis claim script that
    dead-letters a member, in the worker that claimed, right after the claim. A worker killed
    after publishing and before the hook may leave it unfired, or (RabbitMQ, redelivered
    member) fired twice."""


@hookspec
def qtasks_task_enqueue_failed(
    app: AsyncQueueTasks, record: TaskRecord, exc: BaseException
) -> None:
    """Notification: storing or publishing ``record``'s task raised ``exc`` (``add_task`` and
    ``add_tasks`` raise it next; with ``add_tasks``, once per task of the failed batch and of
    the batches behind it, and, when an item cannot be prepared, once per item prepared
    before it, nothing of the call stored; ``run_workflow`` likewise for a failed batch of
    first steps and the batches behind it, and for every member when the workflow itself
    could not be stored). A cancellation of any of the three counts: ``exc`` is the
    cancellation, the hook runs shielded from it, then it propagates. The message may or may
    not have reached the broker. What a plugin began in ``qtasks_task_enqueue`` (a span, a
    timer) ends here: ``qtasks_task_enqueued`` will not come."""


@hookspec
def qtasks_task_deduplicated(
    app: AsyncQueueTasks, record: TaskRecord, existing: TaskRecord
) -> None:
    """Notification: an ``add_task`` with a unique key found the key held by ``existing``, a
    task still pending, and returns it: ``record``, the task this call would have added, was
    neither stored nor published. What a plugin began in ``qtasks_task_enqueue`` (a span, a
    timer) ends here: ``qtasks_task_enqueued`` will not come."""


# --- broker ---------------------------------------------------------------------------------


@hookspec
def qtasks_broker_listening(app: AsyncQueueTasks, worker: Any) -> None:
    """Notification: the worker opened its consumer and waits for messages."""


@hookspec
def qtasks_broker_message_received(app: AsyncQueueTasks, delivery: Delivery) -> None:
    """Notification: a delivery arrived at the worker (before it is decoded)."""


@hookspec
def qtasks_broker_acked(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: the message of a finished task was acknowledged (removed)."""


@hookspec
def qtasks_broker_nacked(app: AsyncQueueTasks, delivery: Delivery, reason: str) -> None:
    """Notification: a message was dead-lettered with ``reason``."""


@hookspec
def qtasks_broker_requeued(app: AsyncQueueTasks, delivery: Delivery, delay: float | None) -> None:
    """Notification: a delivery was handed back to the broker (retry or shutdown)."""


# --- storage --------------------------------------------------------------------------------


@hookspec
def qtasks_storage_added(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: a new record was stored by ``add_task``, ``add_tasks`` or
    ``run_workflow`` (every member's, once, in the client; with remote components, the
    message is already published too: a worker may have started the task)."""


@hookspec
def qtasks_storage_got(app: AsyncQueueTasks, record: TaskRecord) -> TaskRecord | None:
    """Transform: a record read by ``app.get``; return a replacement or ``None``."""


@hookspec
def qtasks_storage_saved(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: the worker wrote ``record``: status ``process`` when it starts the task,
    then the final record (before the ack). The ``retry`` record is announced by
    ``qtasks_worker_task_retry`` instead."""


# --- global config --------------------------------------------------------------------------


@hookspec
def qtasks_global_config_write(
    app: AsyncQueueTasks, namespace: str, key: str, value: Any
) -> Any | None:
    """Transform, before ``app.config_set`` writes: return the value to write instead, or
    ``None`` (unchanged). Raising aborts the call. (State and heartbeat writes do not pass
    here.)"""


@hookspec
def qtasks_global_config_set(app: AsyncQueueTasks, namespace: str, key: str, value: Any) -> None:
    """Notification: ``app.config_set`` wrote a cluster-wide value."""


@hookspec
def qtasks_global_config_got(
    app: AsyncQueueTasks, namespace: str, key: str, value: Any
) -> Any | None:
    """Transform: a value read by ``app.config_get``; return a replacement or ``None``."""


@hookspec
def qtasks_global_config_status(app: AsyncQueueTasks, worker_id: str, info: dict[str, Any]) -> None:
    """Notification: the worker wrote its heartbeat ``info``."""


# --- worker ---------------------------------------------------------------------------------


@hookspec
def qtasks_worker_task_received(app: AsyncQueueTasks, message: Message) -> None:
    """Notification: a delivery decoded into ``message`` and was queued locally."""


@hookspec
def qtasks_worker_execute_before(app: AsyncQueueTasks, record: TaskRecord, run: TaskRun) -> None:
    """Notification: the task is about to run; ``record`` is stored with status ``process``.
    ``run`` is this execution: its ``message`` carries the producer's ``headers`` (e.g. a trace
    context), ``run.state`` is per-run space for plugins (``run.record is record``)."""


@hookspec
def qtasks_worker_execute_after(app: AsyncQueueTasks, record: TaskRecord, run: TaskRun) -> None:
    """Notification: the task's handling ended; ``record`` is its stored record (final, or
    ``retry``). Always fired, whatever happened, for every run that
    ``qtasks_worker_execute_before`` announced (``run`` is the same object), though not always
    in the same task: a success settled with others fires it from the worker's settling
    task."""


@hookspec
def qtasks_worker_task_retry(
    app: AsyncQueueTasks, record: TaskRecord, exc: BaseException, delay: float
) -> None:
    """Notification: the task failed and will run again after ``delay`` seconds."""


# --- executor -------------------------------------------------------------------------------


@hookspec
def qtasks_executor_args(
    app: AsyncQueueTasks,
    task: TaskDef[..., Any],
    record: TaskRecord,
    args: list[Any],
    kwargs: dict[str, Any],
    run: TaskRun,
) -> tuple[list[Any], dict[str, Any]] | None:
    """Transform: return ``(args, kwargs)`` to call the task with, or ``None`` (unchanged).
    ``run`` is this execution (``run.state`` is per-run space for plugins). Implementations
    see the caller's arguments: the core's own steps come after them (a workflow step's
    input, then the ``Depends`` and State values; :meth:`TaskExecutor.arguments
    <qtasks.executor.TaskExecutor.arguments>`)."""


@hookspec
def qtasks_executor_middlewares(
    app: AsyncQueueTasks,
    task: TaskDef[..., Any],
    record: TaskRecord,
    middlewares: list[Middleware],
) -> list[Middleware] | None:
    """Transform, first thing the executor does: return the middlewares that wrap this call,
    outermost first (``middlewares`` is the list so far), or ``None`` (unchanged). The first
    implementation gets ``app.middlewares`` and the task's ``middlewares_before`` and
    ``middlewares_after`` in that order (:func:`qtasks.middleware.chain_of`); the hook is not
    called when no plugin implements it. ``qtasks_executor_args`` and the call run inside the
    innermost one."""


@hookspec
def qtasks_executor_execute_before(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: arguments are final; the task function is called right after."""


@hookspec
def qtasks_executor_yielded(app: AsyncQueueTasks, record: TaskRecord, value: Any) -> None:
    """Notification: a generator task yielded and ``value`` (the handler's result) was stored."""


@hookspec
def qtasks_executor_result(app: AsyncQueueTasks, record: TaskRecord, result: Any) -> Any | None:
    """Transform: the task's result before encoding; return a replacement or ``None``."""


@hookspec
def qtasks_executor_execute_after(app: AsyncQueueTasks, record: TaskRecord, result: Any) -> None:
    """Notification: the task returned ``result`` (after the result transform)."""


@hookspec
def qtasks_executor_error(app: AsyncQueueTasks, record: TaskRecord, exc: BaseException) -> None:
    """Notification: the task raised ``exc``; fired by the worker right after
    ``qtasks_executor_closed``, before the retry decision (not for cancellation). Once a run:
    when the storage then refuses the ``retry`` or ``error`` record, it does not fire again
    (``qtasks_task_failed`` gets the :class:`~qtasks.errors.UnstorableRecordError`, whose
    reason the record keeps in place of this ``exc``); a task whose result is refused, which
    raised nothing, fires it with the ``UnstorableRecordError``."""


@hookspec
def qtasks_executor_closed(app: AsyncQueueTasks, record: TaskRecord, run: TaskRun) -> None:
    """Notification: the call ended (success, error, cancel, timeout, lost lease or shutdown);
    always fired exactly once per run, before the final record is stored. ``run`` is the
    execution; what :meth:`~qtasks.executor.TaskRun.on_close` registered for it (task-scoped
    Depends) was closed just before, or, for a sync call given up on whose thread still runs,
    is closed when that thread returns (:mod:`qtasks.teardowns`)."""


# --- results, errors, retries, cancel, timeout ----------------------------------------------


@hookspec(firstresult=True)
def qtasks_task_retry_delay(
    app: AsyncQueueTasks, task: TaskDef[..., Any], record: TaskRecord, exc: BaseException
) -> float | None:
    """Decide: seconds until the failed task runs again, or ``None`` for no retry. The built-in
    retry plugin implements it from ``retry``/``retry_on_exc``/``retry_backoff``."""


@hookspec
def qtasks_task_succeeded(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: the final ``success`` record is stored and the message acked."""


@hookspec
def qtasks_task_failed(app: AsyncQueueTasks, record: TaskRecord, exc: BaseException) -> None:
    """Notification: the final ``error`` record is stored and the message acked."""


@hookspec
def qtasks_task_cancelled(app: AsyncQueueTasks, record: TaskRecord, reason: str) -> None:
    """Notification: the task ended as ``cancel``; ``reason`` is the record's
    ``cancel_reason``. Fires once per cancelled task, in one process:

    * cancelled while queued (record ``new`` or ``retry``, whether or not a worker had claimed
      the message): in the process that called :meth:`~qtasks.app.AsyncQueueTasks.cancel`,
      after its cancel is stored and the message dropped (with a storage that is not a
      :class:`~qtasks.components.CancelFrom`, only when the broker dropped the message
      unstarted);
    * cancelled once a worker began it (record ``process``), running or still waiting there
      (a :class:`~qtasks.components.BeginOnClaim` claim begins a record before its task
      starts): in that worker, once the message is acked.

    Not for a cancel of a final record, nor (no process knows of it) a task whose worker died
    after beginning it."""


@hookspec
def qtasks_task_timed_out(app: AsyncQueueTasks, record: TaskRecord, max_time: float) -> None:
    """Notification: the task ran past its ``max_time`` (the error path follows)."""


@hookspec
def qtasks_task_expired(app: AsyncQueueTasks, record: TaskRecord) -> None:
    """Notification: the task was not started before its ``expires`` time (or could get no
    rate token before it); its final ``expired`` record is stored and the message acked."""


@hookspec
def qtasks_task_dead_lettered(app: AsyncQueueTasks, record: TaskRecord, reason: str) -> None:
    """Notification: the message of ``record`` was dead-lettered past its delivery limit
    (``max_deliveries``), and ``record`` was stored as ``error`` with ``reason``
    (``"dead-lettered: ..."``). Fires once per message, on the worker that ended the record:
    the task ran on the last allowed delivery and lost its lease (its result is dropped), or
    the broker dead-lettered the message on its own (a message whose every delivery was
    lost), either in the worker's claim, which ended the record too
    (:class:`~qtasks.components.BeginOnClaim`), or telling the worker
    (:class:`~qtasks.components.BuryNotice`). Not for a message whose record was already
    final or is gone."""


@hookspec
def qtasks_task_rejected(app: AsyncQueueTasks, delivery: Delivery, reason: str) -> None:
    """Notification: a message could not run at all (undecodable, unknown task, bad
    arguments, too large, or a component or plugin failed on it ``max_deliveries`` times); it
    was dead-lettered and its record, if any, says ``error``."""


# --- inspect --------------------------------------------------------------------------------


@hookspec
def qtasks_inspect(app: AsyncQueueTasks, report: dict[str, Any]) -> dict[str, Any] | None:
    """Transform: ``qtasks inspect`` is about to print ``report``; return one with more keys."""
