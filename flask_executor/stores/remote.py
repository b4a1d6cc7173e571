"""The reader's side of a shared store: :class:`StoredFuture`, the future of a
task another process owns; :func:`check_lost`, which fails the records of
owners that died; and :class:`Watcher`, the thread that keeps an owner's
heartbeat and serves cancel requests from other processes while it owns
unfinished tasks."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..errors import TaskLostError
from ..serialize import type_name
from .base import CANCEL_REFUSED, BaseStore, TaskRecord

if TYPE_CHECKING:
    from ..futures import FutureCollection

__all__ = [
    "HOST",
    "StoredFuture",
    "Watcher",
    "check_lost",
    "future_state",
    "live_record",
    "wait_cancelled",
]

logger = logging.getLogger("flask_executor")

#: How often an owner looks for cancel requests from other processes.
CANCEL_POLL = 0.25
#: Seconds between an owner's heartbeats.
BEAT_INTERVAL = 3.0
_LOST_TYPE = type_name(TaskLostError())
#: This machine's name, as owners are recorded.
HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_lost(store: BaseStore, record: TaskRecord, lost_after: float) -> TaskRecord:
    """``record`` (unfinished), or failed with :exc:`TaskLostError` and so
    written to the store, if its owner is dead: on this host, its pid is gone;
    anywhere, its heartbeat is older than ``lost_after`` seconds."""
    host, pid = record.owner_host, record.owner_pid
    if (host, pid) == (HOST, os.getpid()):
        return record
    now = time.time()
    reason = None
    if host == HOST and not _pid_alive(pid):
        reason = "that process is gone"
    else:
        # A fresh submission counts as a beat: the owner's watcher may not have beaten yet.
        beat = max(store.last_beat(host, pid) or 0.0, record.submitted_at)
        if now - beat > lost_after:
            reason = f"no heartbeat from it for {now - beat:.0f} s"
    if reason is None:
        return record
    message = (
        f"task {record.key!r} was lost: the process that owned it (host {host!r}, pid"
        f" {pid}) stopped before the task finished; {reason}"
    )
    lost = {"state": "failed", "finished_at": now, "error_type": _LOST_TYPE,
            "error_message": message}
    store.update(record.task_id, **lost)
    return record.replace(**lost)


def wait_cancelled(read: Callable[[], TaskRecord | None], timeout: float) -> bool:
    """After a cancel request: wait (backing off, up to ``timeout`` seconds)
    for the owner's answer in the record ``read()`` returns."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
        current = read()
        if current is None or current.cancel == CANCEL_REFUSED:
            return False
        if current.done:
            return current.state == "cancelled"
    return False


def future_state(future: Future[Any]) -> str:
    """The state of ``future`` by the status endpoint's names: ``pending``,
    ``running``, ``finished``, ``failed`` or ``cancelled``."""
    if isinstance(future, StoredFuture):
        return future.state
    if future.cancelled():
        return "cancelled"
    if future.running():
        return "running"
    if not future.done():
        return "pending"
    return "failed" if future.exception() is not None else "finished"


def live_record(record: TaskRecord, future: Future[Any]) -> TaskRecord:
    """``record`` with the state and meta of the local ``future``."""
    state = future_state(future)
    fields: dict[str, Any] = {"state": state}
    meta = getattr(future, "meta", None)
    if isinstance(meta, dict):
        fields["meta"] = meta
    if state == "failed" and record.error_type is None:
        exc = future.exception()
        fields.update(error_type=type_name(exc), error_message=str(exc))
    return record.replace(**fields)


class StoredFuture(Future[Any]):
    """The future of a stored task that another process owns, read from the
    store: :meth:`result` and :meth:`exception` wait for it (polling the store
    with a growing interval), :meth:`cancel` asks its owner, :attr:`meta`
    shows its progress. A lost owner makes it fail with
    :exc:`~flask_executor.TaskLostError`.

    Callbacks added with :meth:`add_done_callback` run when this object sees
    the task finished (on a call that reads the store), and
    :func:`concurrent.futures.wait` does not poll the store: call
    :meth:`result` with a timeout instead.

    .. versionadded:: 2.0
    """

    def __init__(self, collection: FutureCollection, record: TaskRecord) -> None:
        super().__init__()
        self._collection = collection
        self._record = record
        #: The record was just read: the first question needs no second read.
        self._fresh = True
        self._settle(record)

    @property
    def key(self) -> Hashable:
        return self._record.key

    @property
    def record(self) -> TaskRecord:
        """The record as last read."""
        return self._record

    def _settle(self, record: TaskRecord) -> None:
        if not record.done or Future.done(self):
            return
        if record.state == "cancelled":
            Future.cancel(self)  # a no-op if another thread settled it first
            return
        result, exception = self._collection._decode(record)
        try:
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)
        except concurrent.futures.InvalidStateError:  # another thread settled it first
            pass

    def _refresh(self) -> None:
        if self._fresh:
            self._fresh = False
            return
        if Future.done(self):
            return
        record = self._collection._read_id(self._record.task_id)
        if record is None:
            record = self._record.replace(
                state="failed",
                error_type=_LOST_TYPE,
                error_message=(
                    f"the record of task {self._record.key!r} was removed from the store"
                    " before the task finished (evicted past EXECUTOR_FUTURES_MAX_LENGTH,"
                    " or purged)"
                ),
            )
        self._record = record
        self._settle(record)

    @property
    def state(self) -> str:
        """``pending``, ``running``, ``finished``, ``failed`` or ``cancelled``."""
        self._refresh()
        if Future.cancelled(self):
            return "cancelled"
        if Future.done(self):
            return "failed" if Future.exception(self, 0) is not None else "finished"
        return "running" if self._record.state == "running" else "pending"

    @property
    def meta(self) -> dict[str, Any]:
        """The task's meta as last written by its owner."""
        self._refresh()
        return dict(self._record.meta)

    def done(self) -> bool:
        """Whether the task finished, failed or was cancelled (reads the store)."""
        self._refresh()
        return Future.done(self)

    def running(self) -> bool:
        """Whether the task is running in its owner (reads the store)."""
        return self.state == "running"

    def cancelled(self) -> bool:
        """Whether the task was cancelled (reads the store)."""
        self._refresh()
        return Future.cancelled(self)

    def cancel(self) -> bool:
        """Ask the owning process to cancel the task; ``True`` if it did."""
        if Future.done(self):
            return Future.cancelled(self)
        cancelled = self._collection._cancel(self._record)
        self._refresh()
        return bool(cancelled) or Future.cancelled(self)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        self._refresh()
        while not Future.done(self):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise concurrent.futures.TimeoutError()
                delay = min(delay, left)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
            self._refresh()

    def result(self, timeout: float | None = None) -> Any:
        """The task's result, waiting up to ``timeout`` seconds (``None``: as long
        as it takes).

        :raises TimeoutError: not done in time.
        :raises Exception: what the task raised, or
            :exc:`~flask_executor.TaskLostError`.
        """
        self._wait(timeout)
        return Future.result(self, 0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """What the task raised (``None`` if it succeeded), waiting up to
        ``timeout`` seconds."""
        self._wait(timeout)
        return Future.exception(self, 0)


class Watcher(threading.Thread):
    """One per store and process while it owns unfinished tasks: beats the
    owner's heartbeat and serves cancel requests from other processes; it
    ends when every task it watched is done (the next one starts another)."""

    def __init__(self, collection: FutureCollection) -> None:
        super().__init__(name="flask-executor-store-watcher", daemon=True)
        self._collection = weakref.ref(collection)
        self.pid = os.getpid()
        self.stop = threading.Event()

    def run(self) -> None:
        next_beat = 0.0
        while True:
            collection = self._collection()
            if collection is None or collection._watcher is not self:
                return
            now = time.monotonic()
            if now >= next_beat:
                collection._beat()
                next_beat = now + BEAT_INTERVAL
            try:
                collection._serve_cancels()
            except Exception as error:
                logger.warning("%s: cannot read cancel requests: %s", collection.store.url, error)
            with collection._lock:
                if collection._idle():
                    if collection._watcher is self:
                        collection._watcher = None
                    return
            del collection
            if self.stop.wait(CANCEL_POLL):
                return
