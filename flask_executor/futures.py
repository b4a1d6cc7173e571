"""The futures handed back by :class:`~flask_executor.Executor`.

:class:`FutureProxy` is a real :class:`concurrent.futures.Future`, so
:func:`concurrent.futures.wait` and :func:`~concurrent.futures.as_completed`
accept it; what it adds is that done callbacks run inside the submitting app's
context, and that a *running* process task can be cancelled.
:class:`FutureCollection` holds the futures stored under a key by
:meth:`~flask_executor.Executor.submit_stored`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

__all__ = ["FutureCollection", "FutureProxy"]

T = TypeVar("T")

#: Builds the context a done callback runs in (the submitting app's).
ContextFactory = Callable[[], AbstractContextManager[Any]]


class FutureProxy(Future[T], Generic[T]):
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
        self, context_factory: ContextFactory | None = None, timeout: float | None = None
    ) -> None:
        super().__init__()
        self._context_factory = context_factory
        #: Set by a backend that can stop the task while it runs.
        self._stop_running: Callable[[], None] | None = None
        #: This task's time limit (a job's ``timeout=``), or None: the executor's.
        self._task_timeout = timeout
        self._meta: dict[str, Any] = {}

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

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(future)`` when the task finishes or is cancelled.

        The callback runs inside the submitting app's context. As with the
        standard library, it runs in the thread that completes the future, or
        at once if the future is already done.
        """
        factory = self._context_factory
        if factory is None:
            super().add_done_callback(fn)
            return

        def callback(future: Future[T]) -> None:
            with factory():
                fn(future)

        super().add_done_callback(callback)

    def _invoke_callbacks(self) -> None:
        # Called once, when the future completes (result, exception or cancel).
        try:
            super()._invoke_callbacks()  # type: ignore[misc]
        finally:
            self._release()

    def _release(self) -> None:
        """Drop everything of the request once done: the callbacks (they hold
        the request's context), the backend's handle on the running task (the
        payload; in process mode also a reference cycle back to this future)
        and the snapshot behind the callback context. A callback added from
        now on runs in the app context only."""
        self._done_callbacks: list[Callable[[Future[T]], object]] = []
        self._stop_running = None
        release = getattr(self._context_factory, "release", None)
        if release is not None:
            release()

    def cancel(self) -> bool:
        """Cancel the task.

        A pending task is never started. A task running in a process worker
        is stopped by terminating its worker (a replacement starts on its
        own); a running thread task cannot be stopped, and ``False`` is
        returned as with the standard library.

        .. versionchanged:: 2.0
            Running process tasks can be cancelled.
        """
        if super().cancel():
            return True
        stop = self._stop_running
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
    ``futures._state(key)``; for a missing key they return ``None``.
    All operations are thread-safe.

    :param max_length: how many futures to keep; ``None`` keeps all.
    :param ttl: seconds a finished future is kept; ``None`` keeps it until
        popped or pushed out by ``max_length``.

    .. versionchanged:: 2.0
        ``ttl``; ``key in futures``; thread-safe.
    """

    def __init__(self, max_length: int | None = 50, ttl: float | None = None) -> None:
        self.max_length = max_length
        self.ttl = ttl
        self._futures: OrderedDict[Hashable, Future[Any]] = OrderedDict()
        self._finished_at: dict[Hashable, float] = {}
        self._lock = threading.RLock()

    def _expire(self) -> None:
        """Drop finished futures older than ``ttl`` (call with the lock held)."""
        if self.ttl is None or not self._finished_at:
            return
        limit = time.monotonic() - self.ttl
        for key, finished in list(self._finished_at.items()):
            if finished <= limit:
                del self._finished_at[key]
                self._futures.pop(key, None)

    def _mark_finished(self, key: Hashable, future: Future[Any]) -> None:
        with self._lock:
            if self._futures.get(key) is future:
                self._finished_at[key] = time.monotonic()

    def __contains__(self, item: object) -> bool:
        """``key in futures`` or ``future in futures``."""
        with self._lock:
            self._expire()
            if isinstance(item, Future):
                return any(item is future for future in self._futures.values())
            try:
                return item in self._futures
            except TypeError:  # unhashable: cannot be a key
                return False

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._futures)

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
        with self._lock:
            self._expire()
            return self._futures.get(future_key)

    def check_available(self, future_key: Hashable) -> None:
        """Raise :exc:`ValueError` if ``future_key`` is already taken.

        :meth:`~flask_executor.Executor.submit_stored` calls this *before*
        submitting, so a duplicate key never starts a task.
        """
        with self._lock:
            self._expire()
            if future_key in self._futures:
                raise ValueError(
                    f"future_key {future_key!r} already exists in executor.futures;"
                    " pop() it first or use another key"
                )

    def add(self, future_key: Hashable, future: Future[Any]) -> None:
        """Store ``future`` under ``future_key``.

        :raises ValueError: the key is already taken.
        """
        with self._lock:
            self.check_available(future_key)
            self._futures[future_key] = future
            if self.max_length is not None:
                while len(self._futures) > self.max_length:
                    old_key, _ = self._futures.popitem(last=False)
                    self._finished_at.pop(old_key, None)
        if self.ttl is not None:
            # The plain Future method: this bookkeeping needs no app context.
            Future.add_done_callback(future, lambda f: self._mark_finished(future_key, f))

    def pop(self, future_key: Hashable) -> Future[Any] | None:
        """Remove and return the future stored under ``future_key``, or
        ``None`` when there is none."""
        with self._lock:
            self._finished_at.pop(future_key, None)
            return self._futures.pop(future_key, None)

    def keys(self) -> list[Hashable]:
        """The stored keys, oldest first."""
        with self._lock:
            self._expire()
            return list(self._futures)

    def items(self) -> list[tuple[Hashable, Future[Any]]]:
        """``(key, future)`` pairs, oldest first."""
        with self._lock:
            self._expire()
            return list(self._futures.items())
