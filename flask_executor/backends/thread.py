"""Thread backend: worker threads running closures that rebuild the task's
Flask context in the worker thread.

It is a lean pool in the manner of :class:`~concurrent.futures.ThreadPoolExecutor`
(one queue, threads started on demand up to ``max_workers``), except that it
completes the executor's :class:`~flask_executor.futures.FutureProxy` directly
instead of a second, inner future.

Timeouts: a thread cannot be killed, so at ``EXECUTOR_TASK_TIMEOUT`` the
future fails with :exc:`~flask_executor.TaskTimeoutError` while the thread
runs on in the background; its eventual result is dropped.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import TaskTimeoutError
from ..futures import FutureProxy
from . import Backend, BackendOptions, complete, settle

__all__ = ["ThreadBackend"]

_Item = tuple[FutureProxy[Any], Callable[[], Any]]


class ThreadBackend(Backend):
    """Runs closures in up to ``max_workers`` threads (default, as the
    standard library: ``min(32, cpu_count + 4)``)."""

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._max_workers = options.max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shutdown = False
        self._deadlines = _Deadlines(
            "the thread cannot be stopped and finishes in the background"
        )

    def submit(self, future: FutureProxy[Any], task: Callable[[], Any]) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, task))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work,
                    name=f"flask-executor-{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        default_timeout = self.options.task_timeout
        deadlines = self._deadlines
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # wake the next thread
                return
            future, task = item
            del item
            if future.set_running_or_notify_cancel():
                timeout = future._task_timeout or default_timeout
                if timeout:
                    deadlines.add(time.monotonic() + timeout, future, timeout)
                complete(future, task)
            del future, task
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item[0].cancel()
                self._queue.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
        self._deadlines.stop()

    def stats(self) -> dict[str, Any]:
        """See :meth:`Backend.stats`; a thread's ``pid`` is the process's, and
        which thread is busy is not tracked, only how many are."""
        with self._lock:
            threads = [thread for thread in self._threads if thread.is_alive()]
        idle = getattr(self._idle, "_value", 0)  # threads waiting for work
        queued = self._queue.qsize() - (1 if self._shutdown else 0)
        pid = os.getpid()
        return {
            "backend": "thread",
            "configured_workers": self._max_workers,
            "workers": [
                {"name": t.name, "pid": pid, "busy": None, "tasks_run": None, "memory": None}
                for t in threads
            ],
            "busy": max(0, len(threads) - idle),
            "queue": max(0, queued),
        }


class _Deadlines:
    """One daemon thread that fails futures still running at their deadline.

    :param consequence: what happens to the task itself, for the error message.
    """

    def __init__(self, consequence: str) -> None:
        self._consequence = consequence
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
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done()):
                    _, _, future, timeout = heapq.heappop(self._heap)
                    settle(
                        future,
                        exception=TaskTimeoutError(
                            f"task ran past its time limit ({timeout:g} s:"
                            " EXECUTOR_TASK_TIMEOUT or the job's timeout);"
                            f" {self._consequence}"
                        ),
                    )
                if self._stopped:
                    self._heap = [entry for entry in self._heap if not entry[2].done()]
                    heapq.heapify(self._heap)
                    if not self._heap:
                        return
                self._wakeup.wait(self._heap[0][0] - now if self._heap else None)
