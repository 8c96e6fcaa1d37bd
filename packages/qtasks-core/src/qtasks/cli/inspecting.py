"""``qtasks inspect`` (and QTasks' ``qtasks stats inspect``) and ``qtasks dlq``: what the
components hold, and dead letters."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Annotated, Any

import typer

from qtasks.app import AsyncQueueTasks
from qtasks.cli.group import cli, command, dlq, stats
from qtasks.cli.options import Components, JsonOpt, ShowSecretsOpt
from qtasks.cli.output import shown_body, table, to_json, warn_secrets_shown, workflows_table
from qtasks.cli.resolve import aio_of, resolve_app, run_on
from qtasks.errors import ConfigError, UnknownTaskError
from qtasks.health import stalled_past
from qtasks.masking import mask_text, masked_value


@command(cli)
def inspect(*, where: Components, as_json: JsonOpt = False) -> None:
    """Show tasks, queue depth, dead letters, workers, records by status and workflows.

    Registered tasks with their options; queue depth per priority, delayed, in-flight and
    dead-lettered counts (broker); workers alive (global config heartbeats); records by status
    (storage); the newest workflows with their status and size, when the storage keeps
    workflows (`qtasks workflow ID` shows one's members); flow control (rate tokens,
    concurrency slots and what waits for them) when the global config has it; plus what
    plugins add through the qtasks_inspect hook.
    """
    _show(_report(where), as_json)


def _report(where: Components) -> dict[str, Any]:
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)
    report: dict[str, Any] = run_on(
        the_app,
        AsyncQueueTasks.inspect,
        command="inspect",
        uses=("broker", "storage", "global_config"),
    )
    if "workflows" in report:  # a workflow's error may quote a DSN, as `qtasks workflow` masks
        report["workflows"] = masked_value(report["workflows"])
    return report


def _flow_options(flow: dict[str, Any] | None) -> str:
    """A task's flow options in a table cell: ``rate 5/s burst 1; key customer max 2``."""
    if not flow:
        return ""
    parts = []
    if flow["rate_limit"] is not None:
        parts.append(f"rate {flow['rate_limit']} burst {flow['rate_burst']}")
    if flow["max_concurrency"] is not None:
        parts.append(f"key {flow['concurrency_key']} max {flow['max_concurrency']}")
    if flow["expires"] is not None:
        parts.append(f"expires {flow['expires']:g}s")
    if flow["unique_key"] is not None:
        parts.append(f"unique_key {flow['unique_key']}")
    if flow.get("unique_for") is not None:
        parts.append(f"unique_for {flow['unique_for']:g}s")
    return "; ".join(parts)


def _show(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(to_json(report))
        return
    typer.echo(f"app: {report['app']}")
    typer.echo("components: " + ", ".join(f"{k}={v}" for k, v in report["components"].items()))
    typer.echo(f"enqueue: {report['enqueue']} (record and message: see docs/architecture.md)")
    typer.echo(f"\ntasks ({len(report['tasks'])}):")
    if report["tasks"]:
        rows = [
            [name, t["kind"], t["priority"], t["retry"], t["max_time"], ",".join(t["tags"])]
            for name, t in report["tasks"].items()
        ]
        headers = ["name", "kind", "priority", "retry", "max_time", "tags"]
        if any("flow" in t for t in report["tasks"].values()):
            headers.append("flow")
            for row, t in zip(rows, report["tasks"].values(), strict=True):
                row.append(_flow_options(t.get("flow")))
        typer.echo(table(headers, rows))
    queue = report["queue"]
    ready = ", ".join(f"p{p}={n}" for p, n in queue["ready_by_priority"].items()) or "empty"
    typer.echo(
        f"\nqueue: ready {ready}; delayed {queue['delayed']}; in flight "
        f"{queue['in_flight']}; dead letters {queue['dead_letters']}"
    )
    by_status = ", ".join(f"{s}={n}" for s, n in report["records_by_status"].items()) or "none"
    typer.echo(f"records: {by_status}")
    workers = report["workers"]
    typer.echo(f"\nworkers alive ({len(workers)}):")
    if workers:
        rows = [
            [
                wid,
                w.get("running"),
                w.get("waiting"),
                w.get("processed"),
                w.get("concurrency"),
                consuming(w),
            ]
            for wid, w in sorted(workers.items())
        ]
        headers = ["id", "running", "waiting", "processed", "concurrency", "consuming"]
        typer.echo(table(headers, rows))
    flow = report.get("flow")
    if flow:
        typer.echo("\nflow control:")
        rows = [
            [name, f"{f['tokens']}/{f['burst']} ({f['per_second']:g}/s)", "", f["waiting"]]
            if "tokens" in f
            else [name, "", f"{f['held']}/{f['limit']}", f["waiting"]]
            if "held" in f
            else [name, "", "", f"error: {f.get('error')}"]
            for name, f in flow.items()
        ]
        typer.echo(table(["key", "tokens", "slots held", "waiting"], rows))
    if "workflows" in report:
        shown = report["workflows"]
        typer.echo(f"\nworkflows (newest {len(shown)}): " + workflows_table(shown))
    typer.echo(f"\nplugins: {', '.join(report['plugins'])}")
    known = {
        "flow",
        "app",
        "components",
        "enqueue",
        "tasks",
        "queue",
        "workers",
        "records_by_status",
        "plugins",
        "workflows",
    }
    for key in sorted(set(report) - known):
        typer.echo(f"{key}: {json.dumps(report[key], default=str, sort_keys=True)}")


@command(stats, "inspect")
def stats_inspect(
    what: Annotated[
        list[str] | None,
        typer.Argument(
            help="QTasks' words (`app`, `tasks [NAME...]`, `task NAME`, `json=true`): the "
            "report of `qtasks inspect`, its tasks narrowed to the NAMEs given; `json=true` "
            "is `--json`."
        ),
    ] = None,
    *,
    where: Components,
    as_json: JsonOpt = False,
) -> None:
    """Alias of `qtasks inspect`, as QTasks 1.7 spelled it (`stats inspect app|task NAME|tasks
    [NAME...]`); a NAME the app does not have is an error."""
    json_words = {"json=true", "json=1", "json=yes"}
    names: list[str] = []
    subject = None
    for word in what or []:
        if word.lower() in json_words:
            as_json = True
        elif subject in ("task", "tasks"):
            names.append(word)  # a task name keeps its case
        elif word.lower() in ("app", "tasks", "task") and subject is None:
            subject = word.lower()
        else:
            raise ConfigError(
                f"stats inspect: unknown word {word!r} (app, task NAME, tasks [NAME...])"
            )
    if subject == "task" and len(names) != 1:
        raise ConfigError("stats inspect task: give one task NAME (tasks NAME... for several)")
    report = _report(where)
    if names:
        tasks = report["tasks"]
        for name in names:
            if name not in tasks:
                raise UnknownTaskError(name, tasks)
        report["tasks"] = {name: tasks[name] for name in names}
    _show(report, as_json)


@command(dlq, "list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 100,
    *,
    where: Components,
    as_json: JsonOpt = False,
    show_secrets: ShowSecretsOpt = False,
) -> None:
    """List the oldest dead letters: id, priority, deliveries and reason (--json: and body).

    Secret-named arguments in a body and credentials in any text are shown as ***, as qtasks
    get shows a record's, unless --show-secrets is given.
    """
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)

    async def go(aio: AsyncQueueTasks) -> list[Any]:
        return list(await aio.dead_letters(limit))

    letters = run_on(the_app, go, command="dlq list", uses=("broker",))
    warn_secrets_shown(show_secrets)
    if not show_secrets:
        aio = aio_of(the_app)
        letters = [
            replace(d, reason=mask_text(d.reason), body=shown_body(d.body, aio).encode())
            for d in letters
        ]
    if as_json:
        rows = []
        for letter in letters:
            data = asdict(letter)
            data["body"] = letter.body.decode("utf-8", "replace")
            rows.append(data)
        typer.echo(to_json(rows))
        return
    if not letters:
        typer.echo("no dead letters")
        return
    typer.echo(
        table(
            ["id", "priority", "deliveries", "reason"],
            [[d.id, d.priority, d.deliveries, d.reason] for d in letters],
        )
    )


@command(dlq, "requeue")
def dlq_requeue(
    ids: Annotated[
        list[str] | None, typer.Argument(help="Dead-letter ids (default: all of them).")
    ] = None,
    *,
    where: Components,
    force: Annotated[
        bool,
        typer.Option("--force", help="Also requeue dead letters whose task already succeeded."),
    ] = False,
) -> None:
    """Publish dead letters again (all, or the given IDS) and print how many.

    Their records are reset to status new, so a worker runs them again. A dead letter whose
    task record says success is left where it is unless --force is given. The exit code is 1
    when one of the IDS given was not requeued (not a dead letter, or kept).
    """
    the_app = resolve_app(where.app, where.config, where.flags(), need_tasks=False)
    chosen = list(dict.fromkeys(ids)) if ids else None

    async def go(aio: AsyncQueueTasks) -> tuple[int, list[str], list[str]]:
        before = {d.id for d in await aio.dead_letters(limit=1_000_000)}
        requeued = await aio.requeue_dead_letters(chosen, force=force)
        after = {d.id for d in await aio.dead_letters(limit=1_000_000)}
        wanted = before if chosen is None else [i for i in chosen if i in before]
        unknown = [] if chosen is None else [i for i in chosen if i not in before]
        return requeued, unknown, sorted(i for i in wanted if i in after)

    requeued, unknown, kept = run_on(the_app, go, command="dlq requeue", uses=("broker", "storage"))
    typer.echo(f"requeued {requeued}")
    problems = [f"not a dead letter: {', '.join(unknown)}"] if unknown else []
    if kept:
        problems.append(
            f"kept {len(kept)}, whose task already succeeded (--force runs it again): "
            + ", ".join(kept)
        )
    if problems:
        # Named ids that were not requeued fail the command; with none named, kept ones
        # are only reported.
        typer.echo(("error: " if chosen is not None else "") + "; ".join(problems), err=True)
        if chosen is not None:
            raise typer.Exit(1)


def consuming(info: dict[str, Any]) -> str:
    """A worker's heartbeat's word on its consumer (see :mod:`qtasks.health`): ``yes``, or
    ``stalled N s`` past the worker's ``health_stall_limit``; ``?`` when its broker cannot
    tell."""
    stalled = info.get("consume_stalled")
    if not isinstance(stalled, int | float):
        return "?"
    past = stalled_past(stalled, info.get("stall_limit"))
    return "yes" if past is None else f"stalled {past:.0f} s"
