"""Thread backend: a :class:`~concurrent.futures.ThreadPoolExecutor` running
closures that rebuild the task's Flask context in the worker thread.

Timeouts: a thread cannot be killed, so at ``EXECUTOR_TASK_TIMEOUT`` the
future fails with :exc:`~flask_executor.TaskTimeoutError` while the thread
runs on in the background; its eventual result is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import TaskTimeoutError
from ..futures import FutureProxy
from . import Backend, BackendOptions, complete, settle

__all__ = ["ThreadBackend"]


class ThreadBackend(Backend):
    """Runs closures in a thread pool of ``max_workers`` threads."""

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._pool = ThreadPoolExecutor(
            max_workers=options.max_workers, thread_name_prefix="flask-executor"
        )
        self._deadlines = _Deadlines() if options.task_timeout else None

    def submit(self, future: FutureProxy[Any], task: Callable[[], Any]) -> None:
        inner = self._pool.submit(self._run, future, task)
        # shutdown(cancel_futures=True) cancels the pool's own futures.
        inner.add_done_callback(lambda inner: _cancel_if_cancelled(inner, future))

    def _run(self, future: FutureProxy[Any], task: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        timeout = self.options.task_timeout
        if self._deadlines is not None and timeout:
            self._deadlines.add(time.monotonic() + timeout, future, timeout)
        complete(future, task)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        if self._deadlines is not None:
            self._deadlines.stop()


def _cancel_if_cancelled(inner: Future[Any], future: FutureProxy[Any]) -> None:
    if inner.cancelled():
        future.cancel()


class _Deadlines:
    """One daemon thread that fails futures still running at their deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, FutureProxy[Any], float]] = []
        self._counter = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, future: FutureProxy[Any], timeout: float) -> None:
        with self._wakeup:
            heapq.heappush(self._heap, (deadline, next(self._counter), future, timeout))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="flask-executor-deadlines", daemon=True
                )
                self._thread.start()
            self._wakeup.notify()

    def stop(self) -> None:
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()

    def _loop(self) -> None:
        with self._wakeup:
            while not self._stopped or self._heap:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done()):
                    _, _, future, timeout = heapq.heappop(self._heap)
                    if not future.done():
                        settle(
                            future,
                            exception=TaskTimeoutError(
                                f"task ran past EXECUTOR_TASK_TIMEOUT ({timeout:g} s); the"
                                " thread cannot be stopped and finishes in the background"
                            ),
                        )
                if self._stopped and not self._heap:
                    break
                wait = self._heap[0][0] - now if self._heap else None
                self._wakeup.wait(wait)
