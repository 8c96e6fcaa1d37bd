"""``qtasks add``, ``get`` and ``cancel``: one task at a time, through the components; and
``qtasks workflow``: a workflow's state and members."""

from __future__ import annotations

import json
from typing import Annotated, Any, cast

import typer

from qtasks.app import AsyncQueueTasks
from qtasks.cli.argtypes import check_argument_types, check_keyword_text
from qtasks.cli.group import cli, command
from qtasks.cli.options import Components, JsonOpt, ShowSecretsOpt
from qtasks.cli.output import (
    parse_arg,
    print_record,
    shown_record,
    strict_json,
    table,
    to_json,
    warn_secrets_shown,
    workflows_table,
)
from qtasks.cli.resolve import aio_of, resolve_app, run_on
from qtasks.components import AttemptLog, provides
from qtasks.errors import ConfigError, TaskTimeoutError, UnknownTaskError
from qtasks.masking import masked_value
from qtasks.record import TaskRecord, TaskStatus
from qtasks.workflows import runtime as workflows
from qtasks.workflows.runtime import store_of


def _no_record(uuid: str) -> typer.Exit:
    typer.echo(f"error: no task record for uuid {uuid!r}", err=True)
    return typer.Exit(1)


@command(cli)
def add(
    task: Annotated[str, typer.Argument(help="Task name.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Positional arguments; each is JSON if it parses, else text."),
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Lower runs first.")] = None,
    delay: Annotated[float | None, typer.Option(help="Run after this many seconds.")] = None,
    wait: Annotated[
        float | None, typer.Option(help="Wait up to SECONDS for the result and print it.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Enqueue a task the app does not have (another app's worker runs it)."
        ),
    ] = False,
    *,
    where: Components,
    as_json: JsonOpt = False,
    show_secrets: ShowSecretsOpt = False,
) -> None:
    """Enqueue a task and print its uuid.

    A task the loaded app does not have is refused (exit code 1) unless --force is given, and
    so is an argument of another JSON type than its parameter's plain annotation (int, float,
    str, bool, list, dict, X | None).
    With --wait, print its final record instead (secrets masked as in `qtasks get`); the exit
    code is 1 if the task ended in error or was cancelled, or did not finish in time.
    """
    parsed_kwargs: dict[str, Any] = {}
    if kwargs is not None:
        try:
            parsed_kwargs = strict_json(kwargs)
        except ValueError as exc:
            raise ConfigError(f"--kwargs: not valid JSON: {exc}") from exc
        if not isinstance(parsed_kwargs, dict):
            raise ConfigError("--kwargs: expected a JSON object")
    positional = [parse_arg(a) for a in args or []]
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)
    enqueued: list[str] = []  # its uuid, for a Ctrl-C during --wait

    async def go(aio: AsyncQueueTasks) -> TaskRecord:
        # Started by run_on, so aio.tasks has the shared tasks imported since it was built.
        if aio.tasks and task not in aio.tasks and not force:
            raise UnknownTaskError(
                task, aio.tasks, fix="--force enqueues it for a worker of another app"
            )
        if task in aio.tasks:  # else (--force) no signature to check against
            check_keyword_text(aio.tasks[task], args or [])
            check_argument_types(aio.tasks[task], positional, parsed_kwargs)
        record = await aio.enqueue(task, positional, parsed_kwargs, priority=priority, delay=delay)
        enqueued.append(record.uuid)
        if wait is None:
            return record
        try:
            return await aio.wait(record.uuid, wait)
        except TaskTimeoutError:
            typer.echo(record.uuid)
            raise

    try:
        record = run_on(the_app, go, command="add", uses=("broker", "storage"))
    except KeyboardInterrupt:
        if enqueued:  # as when the wait times out: the task is enqueued and runs anyway
            typer.echo(enqueued[0])
            typer.echo(
                f"interrupted: task {enqueued[0]} is enqueued and runs anyway "
                f"(qtasks get {enqueued[0]})",
                err=True,
            )
        raise
    warn_secrets_shown(show_secrets)
    aio = aio_of(the_app)
    if wait is None:
        typer.echo(to_json(shown_record(record, aio, show_secrets)) if as_json else record.uuid)
        return
    print_record(record, as_json, aio, show_secrets)
    if record.status is not TaskStatus.SUCCESS:
        raise typer.Exit(1)


@command(cli)
def get(
    uuid: Annotated[str, typer.Argument(help="Task uuid.")],
    *,
    where: Components,
    as_json: JsonOpt = False,
    show_secrets: ShowSecretsOpt = False,
) -> None:
    """Print the stored record of a task (exit code 1 if there is none), then how its
    earlier attempts ended (storages that keep them: retried, or lost with their worker).

    Values of secret-named arguments (password, token, api_key...) and passwords in URLs are
    shown as ***, as in `qtasks config` and the dashboard, unless --show-secrets is given."""
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)

    async def go(aio: AsyncQueueTasks) -> tuple[TaskRecord | None, list[TaskRecord] | None]:
        record = await aio.get(uuid)
        log = aio.storage
        if record is None or not provides(log, AttemptLog):
            return record, None
        return record, await cast(AttemptLog, log).attempts(uuid)

    record, earlier = run_on(the_app, go, command="get", uses=("storage",))
    if record is None:
        raise _no_record(uuid)
    warn_secrets_shown(show_secrets)
    print_record(record, as_json, aio_of(the_app), show_secrets, earlier)


@command(cli)
def cancel(
    uuid: Annotated[str, typer.Argument(help="Task uuid.")],
    reason: Annotated[str, typer.Option(help="Stored as cancel_reason.")] = "cancelled",
    *,
    where: Components,
) -> None:
    """Cancel a task and print its resulting status.

    A queued task never runs, a running one is stopped; a finished task keeps its status.
    """
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)

    async def go(aio: AsyncQueueTasks) -> TaskRecord | None:
        return await aio.cancel(uuid, reason)

    record = run_on(the_app, go, command="cancel", uses=("broker", "storage"))
    if record is None:
        raise _no_record(uuid)
    typer.echo(f"{record.uuid}: {record.status.value}")


@command(cli)
def workflow(
    id: Annotated[
        str | None,
        typer.Argument(help="Workflow id (run_workflow's Workflow.id); none: list them."),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Without ID: list at most this many, newest first.")
    ] = 20,
    members_shown: Annotated[
        int,
        typer.Option(
            "--members",
            min=0,
            help="With ID: show at most this many members (0: all); --json lists them all.",
        ),
    ] = 50,
    *,
    where: Components,
    as_json: JsonOpt = False,
    show_secrets: ShowSecretsOpt = False,
) -> None:
    """Print a workflow's status, error and members with their statuses (exit code 1 if
    there is none). Each member's record names its workflow (``qtasks get``). Without ID,
    list the newest workflows, as ``qtasks inspect`` does. Its result and error are masked
    as ``qtasks get`` masks a record's, unless ``--show-secrets``. The members are counted by
    status; the first ``--members`` are listed (a chord of 100,000 would print 100,000
    lines), those not succeeded first."""
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)
    warn_secrets_shown(show_secrets)

    def shown_value(value: Any) -> Any:
        return value if show_secrets else masked_value(value)

    if id is None:

        async def newest(aio: AsyncQueueTasks) -> list[dict[str, Any]]:
            store_of(aio)  # a storage that keeps no workflows says so
            return await workflows.newest(aio, limit)

        shown = [
            shown_value(w) for w in run_on(the_app, newest, command="workflow", uses=("storage",))
        ]
        typer.echo(to_json(shown) if as_json else workflows_table(shown))
        return

    async def go(aio: AsyncQueueTasks) -> tuple[Any, list[TaskRecord | None]]:
        state = await aio.get_workflow(id)
        if state is None:
            return None, []
        members = [*state.members, *([state.on_error] if state.on_error else [])]
        return state, await store_of(aio).get_many(members)

    state, members = run_on(the_app, go, command="workflow", uses=("storage",))
    if state is None:
        typer.echo(f"error: no workflow {id!r}", err=True)
        raise typer.Exit(1)
    rows = [[m.uuid, m.task_name, m.status.value] for m in members if m is not None]
    error, result = shown_value(state.error), shown_value(state.result)
    if as_json:
        typer.echo(
            to_json(
                {
                    "id": state.id,
                    "status": state.status,
                    "error": error,
                    "failed_member": state.failed_member,
                    "result": result,
                    "members": [
                        dict(zip(("uuid", "task", "status"), r, strict=True)) for r in rows
                    ],
                }
            )
        )
        return
    typer.echo(f"workflow {state.id}: {state.status}")
    if error:
        typer.echo(f"error: {error}")
    if state.failed_member:
        typer.echo(f"failed member: {state.failed_member} (qtasks get it for its traceback)")
    if state.status == "success":
        typer.echo(f"result: {json.dumps(result, default=str)}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    typer.echo(
        f"members: {len(rows)} ("
        + ", ".join(f"{status}={n}" for status, n in sorted(counts.items()))
        + ")"
    )
    if members_shown and len(rows) > members_shown:
        # What needs a look first: members that did not succeed, in workflow order.
        rows = sorted(rows, key=lambda row: row[2] == "success")[:members_shown]
        typer.echo(table(["member", "task", "status"], rows))
        typer.echo(f"... {len(members) - members_shown} more (--members 0 shows all)")
        return
    typer.echo(table(["member", "task", "status"], rows))
