"""What the dashboard and the ``flask executor`` CLI show of stored tasks:
plain, JSON-ready rows built from :class:`~flask_executor.stores.TaskRecord`
and the pool's :meth:`~flask_executor.backends.Backend.stats`.

.. versionadded:: 2.0
"""

from __future__ import annotations

import json
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from ..stores.base import STATES, TaskRecord

if TYPE_CHECKING:
    from ..executor import Executor
    from ..futures import FutureCollection

__all__ = ["STATES", "duration_text", "find_record", "pool_stats", "progress_of", "task_row"]

#: The window of "tasks per second".
RATE_WINDOW = 60.0


def key_text(key: Hashable) -> str:
    """A key as it appears in URLs and on the command line."""
    return key if isinstance(key, str) else repr(key)


def duration_text(seconds: float | None, compact: bool = False) -> str:
    """``seconds`` for people: ``'340 ms'``, ``'4.2 s'``, ``'3 m 20 s'``, ``'2 h 5 m'``
    (``compact``: ``'4s'``, ``'3m'``, ``'2.1h'``, ``'3.0d'``, for table columns)."""
    if seconds is None:
        return "-" if compact else "—"
    if compact:
        for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
            if seconds < limit:
                return f"{int(seconds // size)}{unit}" if size < 3600 else f"{seconds / size:.1f}h"
        return f"{seconds / 86400:.1f}d"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} m {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} m"


def progress_of(meta: dict[str, Any]) -> float | None:
    """``meta['progress']`` as a fraction 0..1 (values above 1 are read as
    percent), or ``None`` when the task did not report one."""
    value = meta.get("progress")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    fraction = value / 100 if value > 1 else value
    return float(min(1.0, max(0.0, fraction)))


def _plain(value: Any) -> Any:
    """``value`` if JSON can carry it, else its ``repr``."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def task_row(record: TaskRecord, now: float | None = None) -> dict[str, Any]:
    """The JSON-ready view of one record."""
    now = time.time() if now is None else now
    end = record.finished_at if record.finished_at is not None else now
    start = record.started_at
    meta = {str(name): _plain(value) for name, value in record.meta.items()}
    return {
        "key": key_text(record.key),
        "task_id": record.task_id,
        "function": record.function,
        "state": record.state,
        "progress": progress_of(record.meta),
        "meta": meta,
        "submitted_at": record.submitted_at,
        "started_at": start,
        "finished_at": record.finished_at,
        "duration": None if start is None else max(0.0, end - start),
        "age": max(0.0, now - record.submitted_at),
        "error_type": record.error_type,
        "error_message": record.error_message,
        "traceback": record.traceback,
        "owner": f"{record.owner_host}:{record.owner_pid}",
    }


def find_record(futures: FutureCollection, text: str) -> TaskRecord | None:
    """The record whose key is ``text`` (or whose key's :func:`key_text` is:
    the memory store takes any hashable key), or ``None``."""
    try:
        record = futures.record(text)
    except TypeError:
        record = None
    if record is not None:
        return record
    for candidate in futures.records():
        if key_text(candidate.key) == text:
            return candidate
    return None


def pool_stats(executor: Executor, records: list[TaskRecord]) -> dict[str, Any]:
    """The pool of the current app's executor (``started`` is false before the
    first submit), with ``per_second``: tasks that ended over the last minute
    in every process of the store, per second."""
    _, state = executor._app_and_state()
    backend = state.backend
    if backend is None:
        stats: dict[str, Any] = {
            "backend": state.kind,
            "configured_workers": state.options.max_workers,
            "workers": [],
            "busy": 0,
            "queue": 0,
        }
    else:
        stats = backend.stats()
    since = time.time() - RATE_WINDOW
    ended = sum(1 for r in records if r.finished_at is not None and r.finished_at >= since)
    stats["started"] = backend is not None
    stats["per_second"] = ended / RATE_WINDOW
    stats["shared_store"] = executor.futures.store.shared
    return stats
