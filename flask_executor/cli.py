"""The ``flask executor`` command group: list, show, cancel and purge stored
tasks from a shell.

:meth:`~flask_executor.Executor.init_app` registers it on ``app.cli`` as
``executor`` (``<name>-executor`` for a named executor). It reads the same
task store as the app (``EXECUTOR_STORE``): with ``'memory'`` that is only the
tasks of the ``flask`` process itself; with a shared store (SQLite, Redis) it
is every process's tasks.

.. versionadded:: 2.0
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click
from flask.cli import AppGroup

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["executor_cli"]


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def executor_cli(executor: Executor) -> click.Group:
    """The command group for ``executor``.

    Built by every ``init_app``, in every web process; what the commands show
    comes from the dashboard's model, imported when a command runs."""
    name = f"{executor.name}-executor" if executor.name else "executor"
    group = AppGroup(name, help="Stored background tasks of flask-executor.")
    futures = executor.futures

    def store_note() -> None:
        store = futures.store
        if not store.shared:
            click.echo(
                "note: the memory store only sees the tasks of this process; set"
                f" {executor._key('EXECUTOR_STORE')} to a shared store ('sqlite:///tasks.db'"
                " or 'redis://...') to see every process's tasks",
                err=True,
            )

    def unknown(key: str) -> click.ClickException:
        return click.ClickException(f"no stored task {key!r}")

    @group.command("list")
    def list_tasks() -> None:
        """Stored tasks, newest first: key, state, progress, age."""
        from .dashboard.model import duration_text, key_text, progress_of

        store_note()
        records = futures.records()
        if not records:
            click.echo("no stored tasks")
            return
        now = time.time()
        rows = [("KEY", "STATE", "PROGRESS", "AGE", "FUNCTION")]
        for record in records:
            progress = progress_of(record.meta)
            rows.append(
                (
                    key_text(record.key),
                    record.state,
                    "-" if progress is None else f"{progress:.0%}",
                    duration_text(now - record.submitted_at, compact=True),
                    record.function,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            click.echo("  ".join([*cells, row[4]]).rstrip())

    @group.command("show")
    @click.argument("key")
    def show(key: str) -> None:
        """State, meta, result or error of the task under KEY."""
        from .dashboard.model import find_record, task_row

        record = find_record(futures, key)
        if record is None:
            raise unknown(key)
        row = task_row(record)
        lines = [
            ("key", row["key"]),
            ("function", row["function"]),
            ("state", row["state"]),
            ("submitted", _when(record.submitted_at)),
            ("started", _when(record.started_at)),
            ("finished", _when(record.finished_at)),
            ("owner", row["owner"]),
        ]
        for label, value in lines:
            click.echo(f"{label + ':':<10} {value}")
        click.echo("meta:")
        for field, value in row["meta"].items() or [("", "(none)")]:
            click.echo(f"  {field}{' = ' if field else ''}{value}")
        if record.state == "finished":
            future = futures.get(record.key)
            try:
                result = repr(future.result(timeout=0)) if future is not None else "-"
            except Exception as error:  # noqa: BLE001 - shown, not raised
                result = f"(cannot be read: {type(error).__name__}: {error})"
            click.echo(f"result:    {result}")
        elif record.state == "failed" or record.error_type:
            error_type, message = record.error_type, record.error_message
            if error_type is None:
                future = futures.get(record.key)
                exc = future.exception(timeout=0) if future is not None else None
                error_type, message = type(exc).__name__, str(exc)
            click.echo(f"error:     {error_type}: {message}")
            if record.traceback:
                click.echo(record.traceback.rstrip())

    @group.command("cancel")
    @click.argument("key")
    def cancel(key: str) -> None:
        """Cancel the pending or running task under KEY."""
        from .dashboard.model import find_record

        record = find_record(futures, key)
        if record is None:
            raise unknown(key)
        if record.done:
            raise click.ClickException(f"task {key!r} is already {record.state}")
        if futures.cancel(record.key):
            click.echo(f"cancelled {key!r}")
            return
        current = find_record(futures, key)
        state = current.state if current is not None else "gone"
        raise click.ClickException(
            f"task {key!r} could not be cancelled (it is {state}; a running thread"
            " task cannot be stopped)"
        )

    @group.command("purge")
    def purge() -> None:
        """Remove finished, failed and cancelled tasks; keep pending and running ones."""
        store_note()
        removed = futures.purge()
        kept = len(futures)
        click.echo(f"removed {removed} finished task(s); kept {kept} pending or running")

    return group
