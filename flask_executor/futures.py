"""The futures handed back by :class:`~flask_executor.Executor`.

:class:`FutureProxy` is a real :class:`concurrent.futures.Future`, so
:func:`concurrent.futures.wait` and :func:`~concurrent.futures.as_completed`
accept it; what it adds is that done callbacks run inside the submitting app's
context, and that a *running* process task can be cancelled.
:class:`FutureCollection` holds the futures stored under a key by
:meth:`~flask_executor.Executor.submit_stored`, as records in a task store
(:mod:`flask_executor.stores`): the owning process writes each record (state,
meta, outcome), any process that uses the same store reads it, and gets a
:class:`StoredFuture` for a task another process owns.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Hashable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from flask import Flask, has_app_context, has_request_context, request

from ._leanfuture import LeanFuture
from .errors import StoreSignatureError, StoreUnavailableError
from .serialize import type_name
from .snapshot import Snapshot, restore
from .stores.base import CANCEL_REFUSED, BaseStore, TaskRecord
from .stores.memory import MemoryStore
from .stores.remote import (
    HOST,
    StoredFuture,
    Watcher,
    check_lost,
    future_state,
    live_record,
    wait_cancelled,
)
from .stores.signing import Signer, decode_outcome, encode_outcome

__all__ = ["FutureCollection", "FutureProxy", "StoredFuture", "future_state"]

logger = logging.getLogger("flask_executor")

#: How long an owner may stay silent (its heartbeat, every
#: ``stores.remote.BEAT_INTERVAL`` s) before its unfinished tasks count as lost,
#: and how long ``cancel(key)`` waits for another process's owner to answer.
LOST_AFTER = 15.0
CANCEL_WAIT = 10.0
#: Attempts at writing a record before the failure is logged.
WRITE_ATTEMPTS = 4

T = TypeVar("T")


class CallbackContext:
    """The context a future's done callbacks run in: the submitting request's
    (rebuilt from ``snap``) until :meth:`release`, which the future calls once
    done, so that a finished future holds nothing of the request; the app's
    after. A thread task is one too (:class:`~flask_executor.backends.thread.ThreadTask`):
    one object per pending task rather than two."""

    __slots__ = ("app", "snap")

    def __init__(self, app: Flask, snap: Snapshot | None) -> None:
        self.app = app
        self.snap = snap

    def context(self) -> AbstractContextManager[Any]:
        snap = self.snap
        if snap is None:
            return self.app.app_context() if not has_app_context() else nullcontext()
        return restore(self.app, snap)

    def release(self) -> None:
        self.snap = None


class FutureProxy(LeanFuture[T]):
    """The future of one task.

    It behaves as any :class:`concurrent.futures.Future`; in addition

    * callbacks added with :meth:`add_done_callback` (and the executor's
      default callbacks) run inside the submitting app's context, with a copy
      of the request and :data:`~flask.g` when the task was submitted from a
      request;
    * :meth:`cancel` also stops a task that is already running in a process
      worker (the worker is terminated and replaced);
    * ``await future`` works in ``async`` views.

    .. versionchanged:: 2.0
        A real ``Future`` instead of a proxy around one; callbacks run with
        the app context.
    """

    def __init__(
        self, context: CallbackContext | None = None, timeout: float | None = None
    ) -> None:
        super().__init__()
        self._context = context
        #: Once done: the app callbacks added from now on run in (the context
        #: itself, a thread task, is let go).
        self._app: Flask | None = None
        #: Set by a backend that can stop the task while it runs.
        self._stop_running: Callable[[], None] | None = None
        #: This task's time limit (a job's ``timeout=``), or None: the executor's.
        self._task_timeout = timeout
        self._meta: dict[str, Any] = {}
        #: Set by a :class:`FutureCollection` with a shared store: told
        #: ``("running", None)`` and ``("meta", fields)``.
        self._listener: Callable[[str, Any], None] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """The fields the task set with ``current_task.update(...)`` so far
        (a copy; updates arrive while the task runs).

        .. versionadded:: 2.0
        """
        with self._condition:
            return dict(self._meta)

    def _merge_meta(self, fields: dict[str, Any]) -> None:
        with self._condition:
            self._meta.update(fields)
        listener = self._listener
        if listener is not None:
            listener("meta", fields)

    def set_running_or_notify_cancel(self) -> bool:
        running = super().set_running_or_notify_cancel()
        listener = self._listener
        if running and listener is not None:
            listener("running", None)
        return running

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(future)`` when the task finishes or is cancelled.

        The callback runs inside the submitting app's context. As with the
        standard library, it runs in the thread that completes the future, or
        at once if the future is already done.
        """
        context = self._context
        if context is None:
            app = self._app
            if app is None:  # a future made outside an executor
                super().add_done_callback(fn)
                return
            context = CallbackContext(app, None)

        def callback(future: Future[T]) -> None:
            with context.context():
                fn(future)

        super().add_done_callback(callback)

    def _invoke_callbacks(self) -> None:
        # Called once, when the future completes (result, exception or cancel).
        # Each callback is guarded: whatever one raises, even SystemExit, is
        # logged and the next one runs, so a callback never breaks the worker
        # thread or dispatcher that completes futures.
        try:
            for callback in self._callbacks_added():
                try:
                    callback(self)
                except BaseException:
                    logger.exception("a done callback of %r raised", self)
        finally:
            self._release()

    def _release(self) -> None:
        """Drop everything of the request once done: the callbacks (they hold
        the request's context), the backend's handle on the running task (the
        payload; in process mode also a reference cycle back to this future)
        and the callback context (a thread task: with its snapshot). A
        callback added from now on runs in the app context only."""
        self._drop_callbacks()
        self._stop_running = None
        context = self._context
        if context is not None:
            context.release()
            self._app = context.app
            self._context = None

    def cancel(self) -> bool:
        """Cancel the task.

        A pending task is never started. A task running in a process worker
        is stopped by terminating its worker (a replacement starts on its
        own); a running thread task cannot be stopped, and ``False`` is
        returned as with the standard library.

        .. versionchanged:: 2.0
            Running process tasks can be cancelled.
        """
        stop = self._stop_running
        if super().cancel():
            if stop is not None:
                stop()  # a backend that sent the task ahead takes it back
            return True
        with self._condition:
            if self._state != RUNNING or stop is None:
                return False
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        stop()
        self._invoke_callbacks()
        return True

    def __await__(self) -> Generator[Any, None, T]:
        import asyncio

        return asyncio.wrap_future(self).__await__()


class FutureCollection:
    """Futures stored under keys, oldest dropped past ``max_length``.

    Every :class:`~concurrent.futures.Future` method or attribute is available
    by key, e.g. ``futures.done(key)``, ``futures.result(key, timeout=1)`` or
    ``futures.meta(key)``; for a missing key they return ``None``.
    :meth:`state` names the state as the status endpoint does.
    All operations are thread-safe.

    The futures live as records in a task store (``EXECUTOR_STORE``). With the
    default memory store this is the 1.0 collection: one process, the very
    :class:`FutureProxy` objects. With a shared store (SQLite, Redis) every
    process of the app sees every record: a task this process owns comes back
    as its :class:`FutureProxy`, one another process owns as a
    :class:`StoredFuture` that reads the store; ``max_length`` and ``ttl``
    hold for the store as a whole, and shared keys are strings.

    :param max_length: how many futures to keep; ``None`` keeps all.
    :param ttl: seconds a finished future is kept; ``None`` keeps it until
        popped or pushed out by ``max_length``.
    :param store: where the records live; a new :class:`~flask_executor.stores.MemoryStore`
        by default.

    .. versionchanged:: 2.0
        ``ttl``; ``key in futures``; thread-safe; ``store``; :meth:`state`,
        :meth:`cancel`, :meth:`records`, :meth:`purge`; adding a key is atomic.
    """

    def __init__(
        self, max_length: int | None = 50, ttl: float | None = None, store: BaseStore | None = None
    ) -> None:
        self._store: BaseStore = store if store is not None else MemoryStore()
        self.max_length = max_length
        self.ttl = ttl
        #: task_id -> the future of a task this process owns.
        self._local: dict[str, Future[Any]] = {}
        self._lock = threading.RLock()
        self._setting = "EXECUTOR_STORE"
        self._secret: Callable[[], Any] = lambda: None
        self._signer: Signer | None = None
        self._watcher: Watcher | None = None
        self._warned_multiprocess = False

    # -- configuration ---------------------------------------------------------

    @property
    def store(self) -> BaseStore:
        """The task store holding the records.

        .. versionadded:: 2.0
        """
        return self._store

    @property
    def max_length(self) -> int | None:
        return self._store.max_length

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        self._store.max_length = value

    @property
    def ttl(self) -> float | None:
        return self._store.ttl

    @ttl.setter
    def ttl(self, value: float | None) -> None:
        self._store.ttl = value

    def _use_store(self, store: BaseStore, secret: Callable[[], Any], setting: str) -> None:
        """Called by :meth:`Executor.init_app`: keep records in ``store``;
        ``secret()`` gives the ``SECRET_KEY`` results are signed with."""
        if store is not self._store:
            self.close()  # outside the lock: the watcher takes it
        with self._lock:
            store.max_length, store.ttl = self._store.max_length, self._store.ttl
            if store is not self._store:
                self._store = store
                self._local.clear()
            self._secret = secret
            self._signer = None
            self._setting = setting

    def _signing(self) -> Signer | None:
        """The signer of a shared store's outcomes (``None`` for memory)."""
        if not self._store.shared:
            return None
        signer = self._signer
        if signer is None:
            secret = self._secret()
            if not secret:
                raise RuntimeError(
                    f"{self._setting} = {self._store.url!r} is shared between processes, and"
                    " results are signed with a key derived from the app's SECRET_KEY: set"
                    " app.config['SECRET_KEY'] (the same in every process of the app)"
                )
            signer = self._signer = Signer(secret, self._store.namespace)
        return signer

    def close(self) -> None:
        """Stop this process's heartbeat for the store and release its
        connections (both come back on the next stored submit).

        .. versionadded:: 2.0
        """
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop.set()
            if watcher is not threading.current_thread() and watcher.pid == os.getpid():
                watcher.join(timeout=5)
        self._store.close()

    # -- the owner's side ---------------------------------------------------------

    def _reserve(self, key: Hashable, function: str = "") -> str:
        """Claim ``key`` atomically for a new task; return its ``task_id``.

        :raises ValueError: the key is taken (in any process).
        :raises TypeError: a shared store and a key that is not a string.
        :raises StoreUnavailableError: the store cannot be reached.
        """
        store = self._store
        if store.shared and not isinstance(key, str):
            raise TypeError(
                f"{self._setting} = {store.url!r} is shared between processes: a"
                f" future_key must be a str, not {type_name(key)}"
            )
        self._signing()
        record = TaskRecord(
            key=key,
            task_id=os.urandom(16).hex(),
            function=function,
            owner_host=HOST,
            owner_pid=os.getpid(),
        )
        try:
            added = store.add(record)
        except StoreUnavailableError:
            raise
        except Exception as error:
            raise StoreUnavailableError(
                f"{self._setting} = {store.url!r}: cannot store the task:"
                f" {type_name(error)}: {error}"
            ) from error
        if not added:
            raise ValueError(
                f"future_key {key!r} already exists in executor.futures;"
                " pop() it first or use another key"
            )
        return record.task_id

    def _attach(self, task_id: str, future: Future[Any]) -> None:
        """Keep ``future`` as the task of record ``task_id`` and write its
        progress to the store (call before the future can run)."""
        with self._lock:
            self._local[task_id] = future
            if len(self._local) > 2 * (self.max_length or 50) + 16:
                self._prune()
            if self._store.shared:
                self._ensure_watcher()
        if isinstance(future, FutureProxy):  # every store records when a task started
            future._listener = functools.partial(self._on_event, task_id)
            if future.running():
                self._on_event(task_id, "running", None)
        # The plain Future method: writing the record needs no app context.
        Future.add_done_callback(future, functools.partial(self._on_done, task_id))

    def _release(self, task_id: str) -> None:
        """Forget a reserved task that was never submitted."""
        with self._lock:
            self._local.pop(task_id, None)
        self._store.remove(task_id)

    def _prune(self) -> None:
        """Drop local futures whose record is gone (call with the lock held)."""
        for task_id in list(self._local):
            if self._store.get_by_id(task_id) is None:
                del self._local[task_id]

    def _on_event(self, task_id: str, kind: str, data: Any) -> None:
        if kind == "running":
            self._write(task_id, state="running", started_at=time.time())
        elif kind == "meta" and self._store.shared:  # in memory, the future answers
            self._write(task_id, meta=dict(data))

    def _on_done(self, task_id: str, future: Future[Any]) -> None:
        try:  # the memory store keeps no outcome: the local future has it
            fields = encode_outcome(future, self._signing())
        except Exception:
            logger.exception("could not encode the outcome of task %s", task_id)
            fields = {"state": "failed", "error_message": "outcome could not be stored"}
        self._write(task_id, finished_at=time.time(), **fields)

    def _write(self, task_id: str, **fields: Any) -> None:
        """Update a record, retrying a failing store; log if it still fails."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                self._store.update(task_id, **fields)
                return
            except Exception as error:
                if attempt == WRITE_ATTEMPTS - 1:
                    logger.error(
                        "%s = %r: could not write %s of task %s after %d attempts: %s: %s",
                        self._setting, self._store.url, sorted(fields), task_id,
                        WRITE_ATTEMPTS, type_name(error), error,
                    )
                    return
                time.sleep(0.05 * 2**attempt)

    def _ensure_watcher(self) -> None:
        """Start this process's watcher unless it runs (call with the lock held)."""
        watcher = self._watcher
        if watcher is None or watcher.pid != os.getpid() or not watcher.is_alive():
            self._watcher = Watcher(self)
            self._watcher.start()

    def _idle(self) -> bool:
        """Whether every task this process owns has finished (lock held)."""
        return all(future.done() for future in self._local.values())

    def _beat(self) -> None:
        try:
            self._store.beat(HOST, os.getpid())
        except Exception as error:
            logger.warning("%s: heartbeat failed: %s", self._store.url, error)

    def _serve_cancels(self) -> None:
        """Cancel the tasks other processes asked this owner to cancel."""
        with self._lock:
            if self._idle():
                return
        for task_id in self._store.cancel_requests(HOST, os.getpid()):
            future = self._local.get(task_id)
            if future is None or not future.cancel():
                self._write(task_id, cancel=CANCEL_REFUSED)

    # -- reading, any process ----------------------------------------------------

    def _check_lost(self, record: TaskRecord) -> TaskRecord:
        """``record``, failed with :exc:`TaskLostError` if its owner is dead."""
        if record.done or not self._store.shared:
            return record
        return check_lost(self._store, record, LOST_AFTER)

    def _read(self, key: Hashable) -> TaskRecord | None:
        if self._store.shared and not isinstance(key, str):
            return None
        record = self._store.get(key)
        return None if record is None else self._check_lost(record)

    def _read_id(self, task_id: str) -> TaskRecord | None:
        record = self._store.get_by_id(task_id)
        return None if record is None else self._check_lost(record)

    def _future(self, record: TaskRecord) -> Future[Any]:
        future = self._local.get(record.task_id)
        return future if future is not None else StoredFuture(self, record)

    def _decode(self, record: TaskRecord) -> tuple[Any, BaseException | None]:
        try:
            return decode_outcome(
                record.state, record.outcome, record.error_type, record.error_message,
                record.traceback, self._signing(), f"task {record.key!r}",
            )
        except StoreSignatureError as error:
            return None, error

    def _missed(self, key: Hashable) -> None:
        """Say once, under a pre-fork server, why a memory-store key may be missing."""
        if self._store.shared or self._warned_multiprocess:
            return
        if has_request_context() and request.environ.get("wsgi.multiprocess"):
            self._warned_multiprocess = True
            logger.warning(
                "no stored task %r in this process: the server runs several processes and"
                " %s = 'memory' keeps tasks per process, so another process may hold it;"
                " set %s to a shared store ('sqlite:///tasks.db' or 'redis://...')",
                key, self._setting, self._setting,
            )

    def __contains__(self, item: object) -> bool:
        """``key in futures`` or ``future in futures``."""
        if isinstance(item, StoredFuture):
            current = self._read(item.key)
            return current is not None and current.task_id == item.record.task_id
        if isinstance(item, Future):
            with self._lock:
                owned = [tid for tid, future in self._local.items() if future is item]
            for task_id in owned:
                record = self._store.get_by_id(task_id)
                if record is not None:
                    current = self._read(record.key)
                    if current is not None and current.task_id == task_id:
                        return True
            return False
        try:
            return self._read(item) is not None
        except TypeError:  # unhashable: cannot be a key
            return False

    def __len__(self) -> int:
        return len(self._store)

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def future_attr(future_key: Hashable, *args: Any, **kwargs: Any) -> Any:
            future = self.get(future_key)
            if future is None:
                return None
            value = getattr(future, attr)
            if callable(value):
                return value(*args, **kwargs)
            return value

        future_attr.__name__ = attr
        return future_attr

    def get(self, future_key: Hashable) -> Future[Any] | None:
        """The future stored under ``future_key``, or ``None``."""
        record = self._read(future_key)
        if record is None:
            self._missed(future_key)
            return None
        return self._future(record)

    def state(self, future_key: Hashable) -> str:
        """The state of the task under ``future_key``: ``'pending'``,
        ``'running'``, ``'finished'``, ``'failed'`` or ``'cancelled'`` (the
        status endpoint's names).

        :raises KeyError: no task is stored under ``future_key``.

        .. versionadded:: 2.0
        """
        future = self.get(future_key)
        if future is None:
            raise KeyError(future_key)
        return future_state(future)

    def check_available(self, future_key: Hashable) -> None:
        """Raise :exc:`ValueError` if ``future_key`` is already taken.

        :meth:`~flask_executor.Executor.submit_stored` claims its key
        atomically instead, so a duplicate key never starts a task.
        """
        if self._read(future_key) is not None:
            raise ValueError(
                f"future_key {future_key!r} already exists in executor.futures;"
                " pop() it first or use another key"
            )

    def add(self, future_key: Hashable, future: Future[Any]) -> None:
        """Store ``future`` under ``future_key``.

        :raises ValueError: the key is already taken.
        """
        self._attach(self._reserve(future_key, type_name(future)), future)

    def pop(self, future_key: Hashable) -> Future[Any] | None:
        """Remove the future stored under ``future_key`` (for every process)
        and return it, or ``None`` when there is none."""
        if self._store.shared and not isinstance(future_key, str):
            return None
        record = self._store.pop(future_key)
        if record is None:
            return None
        with self._lock:
            future = self._local.pop(record.task_id, None)
        return future if future is not None else StoredFuture(self, self._check_lost(record))

    def cancel(self, future_key: Hashable) -> bool | None:
        """Cancel the task under ``future_key``, in whichever process owns it:
        a pending task never starts, a running process task is stopped (as
        :meth:`FutureProxy.cancel` does). For another process's task this
        waits (up to ``CANCEL_WAIT`` seconds) for the owner to answer.

        :returns: whether it was cancelled; ``None`` for a missing key.

        .. versionadded:: 2.0
        """
        record = self._read(future_key)
        return None if record is None else self._cancel(record)

    def _cancel(self, record: TaskRecord) -> bool:
        """Cancel the task of ``record``, here or through its owner."""
        future = self._local.get(record.task_id)
        if future is not None:
            return future.cancel()
        if record.done:
            return record.state == "cancelled"
        current = self._store.get(record.key)
        if current is None or current.task_id != record.task_id:
            return False  # popped: its key may name another task now
        self._store.request_cancel(record.key)
        return wait_cancelled(lambda: self._read_id(record.task_id), CANCEL_WAIT)

    def records(self, limit: int | None = None) -> list[TaskRecord]:
        """The stored tasks' records, newest submitted first (for dashboards
        and the CLI); a task this process owns shows its live state.

        .. versionadded:: 2.0
        """
        records = []
        for record in self._store.records(limit):
            future = self._local.get(record.task_id)
            if future is not None:
                record = live_record(record, future)
            records.append(self._check_lost(record))
        return records

    def record(self, future_key: Hashable) -> TaskRecord | None:
        """The record of the task under ``future_key``, or ``None``.

        .. versionadded:: 2.0
        """
        record = self._read(future_key)
        if record is None:
            return None
        future = self._local.get(record.task_id)
        return record if future is None else live_record(record, future)

    def purge(self) -> int:
        """Remove every finished, failed and cancelled task; keep pending and
        running ones. :returns: how many were removed.

        .. versionadded:: 2.0
        """
        # A task of this process that just finished may not have had its end
        # written yet by its done callback: write it first (the write is idempotent).
        with self._lock:
            done = [(tid, future) for tid, future in self._local.items() if future.done()]
        for task_id, future in done:
            self._on_done(task_id, future)
        removed = self._store.purge()
        with self._lock:
            self._prune()
        return removed

    def keys(self) -> list[Hashable]:
        """The stored keys, oldest first."""
        return self._store.keys()

    def items(self) -> list[tuple[Hashable, Future[Any]]]:
        """``(key, future)`` pairs, oldest first."""
        return [
            (record.key, self._future(self._check_lost(record)))
            for record in reversed(self._store.records())
        ]
