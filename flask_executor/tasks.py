"""The task side: :data:`current_task`, a proxy in the style of
:data:`~flask.current_app`, available inside every function an
:class:`~flask_executor.Executor` runs, in threads, processes and on Dask.

``current_task.update(progress=0.4)`` merges fields into the task's meta; the
web process sees them as ``future.meta`` while the task still runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from werkzeug.local import LocalProxy

__all__ = ["TaskHandle", "current_task", "forward_logs", "log_record_restore"]

#: ``publish(kind, data)``: ``kind`` is ``"meta"`` or ``"log"``.
Publisher = Callable[[str, Any], None]


class TaskHandle:
    """What :data:`current_task` points to while a task runs."""

    __slots__ = ("_meta", "_publish")

    def __init__(self, publish: Publisher | None = None) -> None:
        self._meta: dict[str, Any] = {}
        self._publish = publish

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the task's meta so far."""
        return dict(self._meta)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the task's meta and send them to the web
        process, where ``future.meta`` shows them at once. Keep values plain
        data (numbers, strings, lists, dicts): they cross process boundaries.
        """
        self._meta.update(fields)
        if self._publish is not None:
            self._publish("meta", fields)


_current_task: ContextVar[TaskHandle] = ContextVar("flask_executor.current_task")

if TYPE_CHECKING:
    current_task: TaskHandle
else:
    current_task = LocalProxy(
        _current_task,
        unbound_message=(
            "Working outside of a task: current_task is only available inside a"
            " function run by a flask_executor Executor."
        ),
    )


def run_as_task(handle: TaskHandle, call: Callable[[], Any]) -> Any:
    """Run ``call`` with :data:`current_task` bound to ``handle``."""
    token = _current_task.set(handle)
    try:
        return call()
    finally:
        _current_task.reset(token)


# -- log records from workers ----------------------------------------------


def _log_record_reduce(record: logging.LogRecord) -> dict[str, Any]:
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = logging.Formatter().formatException(record.exc_info)
    return {
        "name": record.name,
        "levelno": record.levelno,
        "levelname": record.levelname,
        "msg": record.getMessage(),
        "pathname": record.pathname,
        "filename": record.filename,
        "module": record.module,
        "lineno": record.lineno,
        "funcName": record.funcName,
        "created": record.created,
        "process": record.process,
        "processName": record.processName,
        "threadName": record.threadName,
        "exc_text": exc_text,
    }


def log_record_restore(data: dict[str, Any]) -> None:
    """In the web process: hand a worker's record to the logger it was
    logged to, as if it had been logged here."""
    record = logging.makeLogRecord(data)
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


class _ForwardingHandler(logging.Handler):
    """Root handler in workers: records logged while one of our tasks runs
    travel to the web process."""

    def emit(self, record: logging.LogRecord) -> None:
        handle = _current_task.get(None)
        publish = handle._publish if handle is not None else None
        if publish is None:
            return
        try:
            publish("log", _log_record_reduce(record))
        except Exception:
            self.handleError(record)


_forwarding = _ForwardingHandler()


def forward_logs(level: int | None = None, *, replace: bool = False) -> None:
    """Install the forwarding handler on the root logger (once per process).

    :param level: set the root level (process workers use the web process's).
    :param replace: drop the root handlers this process inherited (``fork``),
        so records are not also written to the worker's own stderr.
    """
    root = logging.getLogger()
    if replace:
        for handler in list(root.handlers):
            root.removeHandler(handler)
    if _forwarding not in root.handlers:
        root.addHandler(_forwarding)
    if level is not None:
        root.setLevel(level)
