"""Thread backend: worker threads running :class:`ThreadTask` objects, which
rebuild the task's Flask context in the worker thread.

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
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from flask import Flask
from werkzeug.datastructures import FileStorage

from ..errors import TaskTimeoutError
from ..futures import CallbackContext, FutureProxy
from ..serialize import copy_filestorage
from ..snapshot import Snapshot, restore
from ..tasks import TaskHandle, _current_task
from . import Backend, BackendOptions, cancel_and_notify, complete, settle, stop_unfinished

__all__ = ["ThreadBackend"]


class ThreadTask(CallbackContext):
    """A thread task: ``fn(*args, **kwargs)`` inside the contexts rebuilt from
    ``snap`` when called, and its future's callback context. One slotted
    object, which is also what the queue holds: a backlog of pending tasks is
    that many fewer objects for the cyclic garbage collector.

    A task runs once: then (and when the worker drops a cancelled one,
    :meth:`forget`) it lets go of the call, its arguments and its future. The
    future keeps the task as its callback context, so this is also what keeps
    the two from forming a reference cycle, which only the cyclic garbage
    collector could free.
    """

    __slots__ = ("future", "fn", "args", "kwargs", "run_snap")

    future: FutureProxy[Any] | None

    def __init__(
        self,
        app: Flask,
        snap: Snapshot | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        super().__init__(app, snap)
        # The view's uploaded files are closed when its request ends.
        if args and any(isinstance(arg, FileStorage) for arg in args):
            args = tuple(copy_filestorage(a) if isinstance(a, FileStorage) else a for a in args)
        self.fn: Callable[..., Any] | None = fn
        self.args = args
        self.kwargs = kwargs
        #: ``snap`` for the call: :meth:`release` drops ``snap`` as soon as the
        #: future is done, which a time limit can make happen before the call.
        self.run_snap = snap

    def _publish(self, kind: str, data: Any) -> None:
        future = self.future
        if kind == "meta" and future is not None:  # None: the task has ended
            future._merge_meta(data)

    def __call__(self) -> Any:
        fn, snap = self.fn, self.run_snap
        if fn is None:
            raise RuntimeError("this thread task was run already")
        token = _current_task.set(TaskHandle(self._publish))
        try:
            call = self.app.ensure_sync(fn)
            if snap is None:  # EXECUTOR_PUSH_APP_CONTEXT = False; async def still runs
                return call(*self.args, **self.kwargs)
            with restore(self.app, snap):
                return call(*self.args, **self.kwargs)
        finally:
            _current_task.reset(token)
            self.forget()

    def forget(self) -> None:
        """Drop the call, its arguments and the future (whoever runs or
        cancels the task has its own reference to the future)."""
        self.fn = self.run_snap = self.future = None
        self.args = ()
        self.kwargs = {}


class ThreadBackend(Backend):
    """Runs thread tasks in up to ``max_workers`` threads (default, as the
    standard library: ``min(32, cpu_count + 4)``).

    As in :class:`~concurrent.futures.ThreadPoolExecutor`, the threads hold the
    backend only through a weak reference: a backend nobody references any
    more lets its threads finish the queue and exit.
    """

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._max_workers = options.max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._queue: queue.SimpleQueue[ThreadTask | None] = queue.SimpleQueue()
        #: One token per thread waiting for work. A deque, not a semaphore:
        #: its append and pop take no lock another thread can hold, so a
        #: submit never waits for a worker thread to give the GIL back.
        self._idle: deque[None] = deque()
        self._threads: list[threading.Thread] = []
        #: Futures a thread is running now.
        self._running: set[FutureProxy[Any]] = set()
        self._lock = threading.Lock()
        self._shutdown = False
        self._deadlines = _Deadlines(
            "the thread cannot be stopped and finishes in the background"
        )
        # Collected without shutdown(): wake the threads so they exit, and
        # stop the deadline thread.
        self._finalizer = weakref.finalize(self, _wake_all, self._queue, self._deadlines)

    def submit(self, future: FutureProxy[Any], task: ThreadTask) -> None:
        """Queue ``task``, a :class:`ThreadTask` of ``future``."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put(task)
            if not _take(self._idle) and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=_work,
                    args=(
                        self._queue,
                        self._idle,
                        self._running,
                        self._deadlines,
                        self.options.task_timeout,
                    ),
                    name=f"flask-executor-{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        with self._lock:
            if not self._shutdown:
                self._shutdown = True
                if cancel_futures:
                    self._cancel_queued()
                self._queue.put(None)
            threads = [t for t in self._threads if t is not threading.current_thread()]
        if wait:
            end = None if timeout is None else time.monotonic() + timeout
            for thread in threads:
                thread.join(None if end is None else max(0.0, end - time.monotonic()))
            if any(thread.is_alive() for thread in threads):
                # Out of time: what has not started never will; running threads
                # cannot be stopped, their futures fail now.
                self._cancel_queued()
                self._queue.put(None)
                stop_unfinished(
                    list(self._running), timeout, "the thread runs on in the background"
                )
        self._deadlines.stop()

    def _abandon(self) -> None:
        self._finalizer.detach()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                future = item.future
                item.forget()
                if future is not None:
                    cancel_and_notify(future)


    def stats(self) -> dict[str, Any]:
        """See :meth:`Backend.stats`; a thread's ``pid`` is the process's, and
        which thread is busy is not tracked, only how many are."""
        with self._lock:
            threads = [thread for thread in self._threads if thread.is_alive()]
        # Running tasks, not busy threads: a thread that has just completed its
        # task's future is not idle yet, but its task is no longer running.
        busy = sum(1 for future in list(self._running) if not future.done())
        queued = self._queue.qsize() - (1 if self._shutdown else 0)
        pid = os.getpid()
        return {
            "backend": "thread",
            "configured_workers": self._max_workers,
            "workers": [
                {"name": t.name, "pid": pid, "busy": None, "tasks_run": None, "memory": None}
                for t in threads
            ],
            "busy": busy,
            "queue": max(0, queued),
        }


def _take(idle: deque[None]) -> bool:
    """Claim an idle thread's token; ``False`` if none is idle."""
    try:
        idle.pop()
    except IndexError:
        return False
    return True


def _wake_all(work_queue: queue.SimpleQueue[ThreadTask | None], deadlines: _Deadlines) -> None:
    work_queue.put(None)
    deadlines.stop()


def _work(
    work_queue: queue.SimpleQueue[ThreadTask | None],
    idle: deque[None],
    running: set[FutureProxy[Any]],
    deadlines: _Deadlines,
    default_timeout: float | None,
) -> None:
    """A worker thread: run queued items until the ``None`` that shutdown (or
    the backend's collection) puts last, then pass it on to the next thread.
    It gets what it needs, not the backend, so that it does not keep the
    backend alive."""
    while True:
        task = work_queue.get()
        if task is None:
            work_queue.put(None)  # wake the next thread
            return
        future = task.future
        try:
            if future is not None and future.set_running_or_notify_cancel():
                timeout = future._task_timeout or default_timeout
                if timeout:
                    deadlines.add(time.monotonic() + timeout, future, timeout)
                running.add(future)
                try:
                    complete(future, task)
                finally:
                    running.discard(future)
        finally:
            task.forget()
        del future, task
        idle.append(None)


class _Deadlines:
    """One daemon thread that fails futures still running at their deadline.

    It holds the futures weakly: a future nobody waits for any more (and the
    app its callbacks need) is not kept alive until its deadline.

    :param consequence: what happens to the task itself, for the error message.
    """

    def __init__(self, consequence: str) -> None:
        self._consequence = consequence
        self._heap: list[tuple[float, int, weakref.ref[FutureProxy[Any]], float]] = []
        self._counter = itertools.count()
        self._wakeup = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, future: FutureProxy[Any], timeout: float) -> None:
        with self._wakeup:
            entry = (deadline, next(self._counter), weakref.ref(future), timeout)
            heapq.heappush(self._heap, entry)
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
                while self._heap and (self._heap[0][0] <= now or _gone(self._heap[0][2])):
                    _, _, ref, timeout = heapq.heappop(self._heap)
                    future = ref()
                    if future is None:
                        continue
                    settle(
                        future,
                        exception=TaskTimeoutError(
                            f"task ran past its time limit ({timeout:g} s:"
                            " EXECUTOR_TASK_TIMEOUT or the job's timeout);"
                            f" {self._consequence}"
                        ),
                    )
                    del future
                if self._stopped:
                    self._heap = [entry for entry in self._heap if not _gone(entry[2])]
                    heapq.heapify(self._heap)
                    if not self._heap:
                        return
                self._wakeup.wait(self._heap[0][0] - now if self._heap else None)


def _gone(ref: weakref.ref[FutureProxy[Any]]) -> bool:
    future = ref()
    return future is None or future.done()
