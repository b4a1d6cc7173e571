"""The process pool's workers and tasks as its dispatcher sees them, and how
they end: a worker that dies or is killed, a task past its time limit, a
cancelled task, a retired worker, a shutdown that stops waiting. The endings
are part of :class:`~.process._Pool` (a mixin of the dispatcher's methods; the
pool's state is declared in it for the type checker).

The rule throughout: a task a worker took fails with that worker; a task it
was sent but never started runs elsewhere; a cancelled one is never started.
"""

from __future__ import annotations

import pickle
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any

from ..errors import TaskTimeoutError
from ..futures import FutureProxy
from . import BackendOptions, PickledTask, cancel_and_notify, settle
from ._channel import Channel, decode
from ._start import death_error, how_it_ended, shutdown_error, start_error

__all__ = ["PREFETCH", "PREFETCH_SECONDS", "START_ATTEMPTS", "Endings", "Worker", "WorkItem"]

#: Failed worker starts in a row after which the tasks waiting for a worker
#: fail with the last start error (the next task tries again).
START_ATTEMPTS = 3
#: How long a stopping worker may take before it is killed, in seconds.
_STOP_GRACE = 5.0


class WorkItem:
    """A task of the pool, and its future's way to stop it (``future._stop_running``
    is the item itself: no bound method and partial per queued task for the
    garbage collector to walk)."""

    __slots__ = ("future", "task", "pool", "task_id", "deadline", "taken", "deliveries", "recalled")

    def __init__(self, future: FutureProxy[Any], task: PickledTask, pool: Endings) -> None:
        self.future = future
        self.task = task
        #: The pool whose ``_request_stop(item)`` stops or takes back the task.
        self.pool = pool
        #: The id of its delivery to a worker (each delivery has its own); -1 before.
        self.task_id = -1
        self.deadline: float | None = None
        #: The worker it was given to said it took it (and had not died before).
        self.taken = False
        self.deliveries = 0
        #: The worker it was sent ahead to was asked to give it back.
        self.recalled = False

    def __call__(self) -> None:
        """The future was cancelled: stop the task if it runs, take it back if
        it was sent ahead (any thread)."""
        self.pool._request_stop(self)


class Worker:
    __slots__ = ("process", "channel", "control", "items", "tasks_done", "app_version", "ready",
                 "broken", "start_timeout", "start_deadline", "failure", "events")  # fmt: skip

    def __init__(
        self, process: Any, channel: Channel, control: socket.socket, start_timeout: float
    ) -> None:
        self.process = process
        self.channel = channel
        #: Where give-back requests go (the worker's watcher thread reads them).
        self.control = control
        #: The calls sent to it, in order: the one it runs (``taken``), and at
        #: most :data:`PREFETCH` more it has not started.
        self.items: deque[WorkItem] = deque()
        self.tasks_done = 0
        self.app_version = ""
        #: The worker said it is up: only then does it get tasks.
        self.ready = False
        #: Its socket failed: never give it a task; its sentinel follows.
        self.broken = False
        self.start_timeout = start_timeout
        self.start_deadline = time.monotonic() + start_timeout
        #: Why it failed to start, when it said so (its initializer raised).
        self.failure: BaseException | None = None
        self.events = selectors.EVENT_READ

    @property
    def running(self) -> WorkItem | None:
        """The task it runs, if it said it took one."""
        items = self.items
        return items[0] if items and items[0].taken else None

    def find(self, task_id: int) -> WorkItem | None:
        for item in self.items:
            if item.task_id == task_id:
                return item
        return None


#: The most calls sent to a busy worker ahead of the one it runs, when every
#: worker is busy and more tasks wait: it starts the next one without waiting
#: for a round trip through the dispatcher thread. How many it gets is set by
#: :data:`PREFETCH_SECONDS`; one at least, and one while no task has finished.
PREFETCH = 64

#: How much work is sent ahead to a busy worker, by how long the pool's recent
#: tasks ran: two of CPython's thread switch intervals (5 ms). While the web
#: process's threads run Python code (a burst of submits), the dispatcher
#: thread may wait that long for the GIL; a worker sent a single short task
#: ahead idles for most of it. A task that ran 10 ms or longer gets one.
PREFETCH_SECONDS = 0.01


class Endings:
    """The dispatcher's methods for ends of workers and tasks."""

    options: BackendOptions
    _lock: threading.RLock
    _pending: deque[WorkItem]
    _stop_requests: deque[WorkItem]
    _workers: list[Worker]
    _retired: list[Any]
    _failed_starts: int
    _stop_at: float | None
    _stop_timeout: float
    _selector: selectors.BaseSelector

    def _forget(self, worker: Worker) -> None:
        raise NotImplementedError

    def _handle(self, worker: Worker, message: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _recall(self, worker: Worker, item: WorkItem) -> None:
        raise NotImplementedError

    def _request_stop(self, item: WorkItem) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _retire(self, worker: Worker) -> None:
        with self._lock:
            self._stop_worker(worker)
            requeue = list(worker.items)  # never sent past its limit; for safety
            worker.items.clear()
            self._pending.extendleft(reversed(requeue))
        self._retired.append(worker.process)

    def _worker_lost(self, worker: Worker) -> None:
        """``worker``'s process ended (or was killed): fail the task it ran,
        deliver again the ones it never started."""
        if worker not in self._workers:
            return
        self._forget(worker)  # first: nobody may claim it any more
        try:  # a result (or why it could not start) sent just before dying still counts
            for data in worker.channel.receive():
                self._handle(worker, decode(data))
                if not worker.items and (worker.ready or worker.failure):
                    break
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        worker.process.join(1.0)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join(1.0)
        failed = []
        with self._lock:
            self._close_worker(worker)
            items = list(worker.items)
            worker.items.clear()
            again = []
            for index, item in enumerate(items):
                if item.taken:
                    failed.append(item)
                elif item.future.cancelled():
                    cancel_and_notify(item.future)
                elif index > 0 or item.deliveries < START_ATTEMPTS:
                    # It never ran: deliver it again (one that waited behind
                    # another task is not counted against its attempts).
                    if index > 0:
                        item.deliveries -= 1
                    again.append(item)
                else:
                    failed.append(item)
            self._pending.extendleft(reversed(again))
        for item in failed:
            settle(item.future, exception=death_error(worker.process))
        if not worker.ready:
            how = f"{how_it_ended(worker.process)} while starting"
            self._start_failed(worker.failure or start_error(worker.process, how))

    def _close_worker(self, worker: Worker) -> None:
        worker.channel.close()
        worker.control.close()

    def _stop_worker(self, worker: Worker) -> None:
        """Tell ``worker`` to stop after what it runs, and close its sockets
        (lock held): it also exits when they close."""
        try:
            worker.channel.send(pickle.dumps(("stop",)))
        except OSError:
            pass
        self._close_worker(worker)

    def _start_failed(self, error: BaseException) -> None:
        """A worker could not start; after :data:`START_ATTEMPTS` in a row the
        tasks waiting for one fail with ``error``."""
        self._failed_starts += 1
        if self._failed_starts < START_ATTEMPTS:
            return
        self._failed_starts = 0
        with self._lock:
            # Queued tasks never ran (a task a worker took is never queued again).
            items = list(self._pending)
            self._pending.clear()
        for item in items:
            if not settle(item.future, exception=error):
                cancel_and_notify(item.future)  # it was cancelled meanwhile: let wait() see it

    def _kill(self, worker: Worker) -> None:
        """Kill ``worker``; what it had is then handled as for any death."""
        worker.process.kill()
        self._worker_lost(worker)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            item = worker.running
            if item is not None and item.deadline is not None and item.deadline <= now:
                settle(
                    item.future,
                    exception=TaskTimeoutError(
                        "task ran past its time limit"
                        f" ({item.future._task_timeout or self.options.task_timeout:g} s:"
                        " EXECUTOR_TASK_TIMEOUT or the job's timeout);"
                        f" its worker (pid {worker.process.pid}) was killed"
                    ),
                )
                self._kill(worker)
            elif not worker.ready and worker.start_deadline <= now:
                worker.failure = start_error(
                    worker.process,
                    f"did not start within {worker.start_timeout:g} s (flask_executor"
                    ".backends.process.WORKER_START_TIMEOUT) and was killed",
                )
                self._kill(worker)
        if self._stop_at is not None and self._stop_at <= now:
            self._stop_now()

    def _stop_now(self) -> None:
        """The shutdown timeout passed: kill the workers still running tasks,
        fail those tasks, cancel the ones that never started."""
        with self._lock:
            dropped = list(self._pending)
            self._pending.clear()
            for worker in self._workers:
                dropped += [item for item in worker.items if not item.taken]
            busy = [w for w in self._workers if w.running is not None]
        for item in dropped:
            cancel_and_notify(item.future)  # a worker that still takes one is stopped
        for worker in busy:
            running = worker.running
            if running is not None:
                settle(running.future, exception=shutdown_error(worker.process, self._stop_timeout))
            self._kill(worker)
        with self._lock:
            for worker in self._workers:
                for item in list(worker.items):
                    self._recall(worker, item)

    def _handle_stop_requests(self) -> None:
        """Stop the workers running a cancelled task. (One sent ahead and not
        started was asked back by ``cancel()`` itself, see ``_request_stop``;
        if its worker takes it meanwhile, ``_took`` stops it.)"""
        while self._stop_requests:
            item = self._stop_requests.popleft()
            for worker in list(self._workers):
                if item in worker.items:
                    if item.taken:
                        self._kill(worker)
                    break

    def _stop_workers(self) -> None:
        with self._lock:
            for worker in self._workers:
                self._stop_worker(worker)
        deadline = time.monotonic() + _STOP_GRACE
        for process in [w.process for w in self._workers] + self._retired:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(1.0)
        with self._lock:
            self._workers.clear()
            self._retired.clear()
            self._close()
