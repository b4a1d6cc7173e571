"""Process backend: a pool of worker processes that survives its tasks.

How work flows::

    submit() ─── idle worker that is up? ──────────── pipe ───────▶ worker 1..N
    (caller)  └─ else: pending deque ──wake──▶ dispatcher thread ─▶  run_call():
                 (_WorkItem)                   assigns one task per   unpickle, restore
                                               idle worker, watches   context, run,
    FutureProxy ◀── result / error ◀────────── pipes, sentinels and ◀ pickle outcome
    completed                                  deadlines

Each worker has its own duplex pipe and runs one task at a time, so the
dispatcher always knows which task a worker is running. That is what the
standard :class:`~concurrent.futures.ProcessPoolExecutor` cannot offer, and
what makes the failure semantics local:

* a worker that dies (exit, signal, segfault) fails only the task it was
  running, with :exc:`~flask_executor.TerminatedWorkerError`; a replacement
  starts when there is work for it;
* a task past ``EXECUTOR_TASK_TIMEOUT`` has its worker killed and fails with
  :exc:`~flask_executor.TaskTimeoutError`;
* ``future.cancel()`` on a running task kills its worker;
* with ``EXECUTOR_MAX_TASKS_PER_CHILD`` the dispatcher retires a worker after
  its N-th result (no in-worker exit race, cf. CPython gh-115634);
* the app spec (config and routes) is sent to a worker only when its version
  changed, so per-task traffic does not grow with the config.

Workers are started lazily, on demand, from the dispatcher thread. A task
submitted while a started worker is idle goes straight down that worker's pipe
from the submitting thread (the worker is reserved under the pool's lock),
saving the hop through the dispatcher; everything else (queueing, results,
deaths, deadlines, retirement) stays with the dispatcher.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import pickle
import selectors
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any

from ..errors import TaskTimeoutError, TerminatedWorkerError
from ..futures import FutureProxy
from ..tasks import log_record_restore
from . import Backend, BackendOptions, PickledTask, settle
from ._worker import rebuild_outcome, worker_main

__all__ = ["ProcessBackend", "default_start_method"]

logger = logging.getLogger("flask_executor")

#: How long a stopping worker may take before it is killed, in seconds.
_STOP_GRACE = 5.0


def default_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``: never
    ``fork``, which is unsafe in a multi-threaded web server."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


class _WorkItem:
    __slots__ = ("future", "task", "task_id", "started", "deadline")

    def __init__(self, future: FutureProxy[Any], task: PickledTask, task_id: int) -> None:
        self.future = future
        self.task = task
        self.task_id = task_id
        self.started = False
        self.deadline: float | None = None


class _Worker:
    __slots__ = ("process", "conn", "item", "tasks_done", "app_version", "ready")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.item: _WorkItem | None = None
        self.tasks_done = 0
        self.app_version = ""
        #: The worker said it is up; task time limits start counting then.
        self.ready = False


class ProcessBackend(Backend):
    """Runs pickled tasks in ``max_workers`` processes (default: CPU count)."""

    pickles = True
    by_value_main = False  # workers import __main__ as __mp_main__, as the stdlib's do

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        method = options.start_method or default_start_method()
        self._context: Any = multiprocessing.get_context(method)
        self._max_workers = options.max_workers or os.cpu_count() or 1
        self._lock = threading.RLock()
        self._pending: deque[_WorkItem] = deque()
        self._stop_requests: deque[_WorkItem] = deque()
        self._ids = itertools.count()
        self._shutdown = False
        self._broken = ""
        self._thread: threading.Thread | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._workers: list[_Worker] = []
        self._retired: list[Any] = []

    # -- caller side -----------------------------------------------------------

    def submit(self, future: FutureProxy[Any], task: PickledTask) -> None:
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            item = _WorkItem(future, task, next(self._ids))
            future._stop_running = lambda: self._request_stop(item)
            # An idle worker that is up takes the task straight from this
            # thread: one thread hop less than going through the dispatcher.
            worker = None if self._pending else self._claim(item, start=False)
            if worker is None:
                self._pending.append(item)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._dispatch, name="flask-executor-dispatcher", daemon=True
                )
                self._thread.start()
        if worker is None:
            self._wake()
        elif future.set_running_or_notify_cancel():
            item.started = True
            self._deliver(worker, item)
        else:  # cancelled already: give the worker back
            with self._lock:
                worker.item = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    self._pending.popleft().future.cancel()
            thread = self._thread
        self._wake()
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

    def _request_stop(self, item: _WorkItem) -> None:
        self._stop_requests.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the dispatcher will wake) or closed

    # -- dispatcher thread ---------------------------------------------------------

    def _dispatch(self) -> None:
        if self._context.get_start_method() == "forkserver":
            self._context.set_forkserver_preload(["flask_executor.backends._worker"])
        try:
            while True:
                self._assign()
                if self._finished():
                    break
                self._wait_and_handle()
                self._enforce_deadlines()
                self._handle_stop_requests()
        except BaseException as exc:
            # A bug, or a done callback raising SystemExit: never leave callers
            # waiting on futures nobody will complete.
            self._break(exc)
            logger.error("flask-executor's process dispatcher failed", exc_info=exc)
        finally:
            self._stop_workers()

    def _break(self, exc: BaseException) -> None:
        with self._lock:
            self._shutdown = True
            self._broken = f"the process pool's dispatcher failed: {type(exc).__name__}: {exc}"
            items = [*self._pending, *(w.item for w in self._workers if w.item)]
            self._pending.clear()
        for item in items:
            settle(item.future, exception=BrokenProcessPool(self._broken))

    def _finished(self) -> bool:
        with self._lock:
            return (
                self._shutdown
                and not self._pending
                and not any(worker.item for worker in self._workers)
            )

    def _assign(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                item = self._pending[0]
                if item.future.cancelled():
                    self._pending.popleft()
                    continue
                worker = self._claim(item, start=True)
                if worker is None:
                    return
                self._pending.popleft()
            if not item.started:
                if not item.future.set_running_or_notify_cancel():
                    with self._lock:
                        worker.item = None
                    continue
                item.started = True
            self._deliver(worker, item)

    def _claim(self, item: _WorkItem, start: bool) -> _Worker | None:
        """Reserve an idle worker for ``item`` (call with the lock held).

        From the caller's thread (``start=False``) only a worker that is up
        qualifies; the dispatcher may also start a new one.
        """
        idle = [w for w in self._workers if w.item is None and (start or w.ready)]
        worker = next((w for w in idle if w.app_version == item.task.app_version), None)
        if worker is None and idle:
            worker = idle[0]
        if worker is None and start and len(self._workers) < self._max_workers:
            worker = self._start_worker()
        if worker is not None:
            worker.item = item
        return worker

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(child_conn, os.getpid(), logging.getLogger().getEffectiveLevel()),
            name="flask-executor-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        self._workers.append(worker)
        self._selector.register(parent_conn, selectors.EVENT_READ, (False, worker))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (True, worker))
        return worker

    def _forget(self, worker: _Worker) -> None:
        """Remove ``worker`` from the pool (its process is ended or ending)."""
        with self._lock:
            if worker not in self._workers:
                return
            self._workers.remove(worker)
        for fileobj in (worker.conn, worker.process.sentinel):
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    def _deliver(self, worker: _Worker, item: _WorkItem) -> None:
        """Send ``item`` to ``worker``, which was claimed for it (any thread)."""
        task = item.task
        try:
            if task.push_context and worker.app_version != task.app_version:
                worker.conn.send_bytes(
                    pickle.dumps(("app", task.app_version, task.app_spec), pickle.HIGHEST_PROTOCOL)
                )
                worker.app_version = task.app_version
            worker.conn.send_bytes(
                pickle.dumps(
                    (
                        "call",
                        item.task_id,
                        task.payload,
                        task.app_version,
                        task.push_context,
                        task.chunked,
                    ),
                    pickle.HIGHEST_PROTOCOL,
                )
            )
        except OSError:
            # The worker died before it got the task: the task never ran, so it
            # goes back to the front of the queue; the dispatcher sees the death.
            with self._lock:
                if worker.item is item:
                    worker.item = None
                    self._pending.appendleft(item)
            self._wake()
            return
        if worker.ready:
            self._start_clock(item)
            if item.deadline is not None:
                self._wake()  # the dispatcher must wait no longer than this deadline

    def _start_clock(self, item: _WorkItem) -> None:
        timeout = item.future._task_timeout or self.options.task_timeout
        item.deadline = time.monotonic() + timeout if timeout else None

    def _wait_and_handle(self) -> None:
        deadlines = [w.item.deadline for w in self._workers if w.item and w.item.deadline]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if self._retired:
            timeout = min(timeout, 0.5) if timeout is not None else 0.5
            self._retired = [p for p in self._retired if p.exitcode is None]
        events = self._selector.select(timeout)
        lost = []
        for key, _ in events:
            if key.data is None:
                self._wake_reader.recv(4096)
                continue
            is_sentinel, worker = key.data
            if is_sentinel:
                lost.append(worker)
            elif worker in self._workers:
                self._receive(worker)
        for worker in lost:
            if worker in self._workers:
                self._worker_lost(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._handle(worker, pickle.loads(worker.conn.recv_bytes()))
        except (EOFError, OSError):
            self._worker_lost(worker)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            if worker.item is not None:
                self._start_clock(worker.item)
        elif kind == "done":
            self._complete(worker, message[1], message[2])
        elif kind == "meta":
            if worker.item is not None and worker.item.task_id == message[1]:
                worker.item.future._merge_meta(message[2])
        elif kind == "log":
            log_record_restore(message[2])

    def _complete(self, worker: _Worker, task_id: int, outcome: Any) -> None:
        limit = self.options.max_tasks_per_child
        with self._lock:
            item = worker.item
            worker.tasks_done += 1
            retire = bool(limit and worker.tasks_done >= limit)
            if retire:  # out of the pool before anyone can claim it again
                self._forget(worker)
            worker.item = None
        if retire:
            self._retire(worker)
        if item is not None and item.task_id == task_id:
            ok, value = rebuild_outcome(outcome)
            if ok:
                settle(item.future, result=value)
            else:
                settle(item.future, exception=value)

    def _retire(self, worker: _Worker) -> None:
        try:
            worker.conn.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass
        worker.conn.close()
        self._retired.append(worker.process)

    def _worker_lost(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._forget(worker)  # first: nobody may claim it any more
        try:  # a result sent just before dying still counts
            while worker.item is not None and worker.conn.poll():
                self._handle(worker, pickle.loads(worker.conn.recv_bytes()))
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        worker.process.join(1.0)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join(1.0)
        worker.conn.close()
        with self._lock:
            item, worker.item = worker.item, None
        if item is not None:
            settle(item.future, exception=TerminatedWorkerError(_death_message(worker.process)))

    def _kill(self, worker: _Worker) -> None:
        self._forget(worker)
        worker.process.kill()
        worker.process.join(_STOP_GRACE)
        worker.conn.close()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            item = worker.item
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

    def _handle_stop_requests(self) -> None:
        while self._stop_requests:
            item = self._stop_requests.popleft()
            for worker in self._workers:
                if worker.item is item:
                    self._kill(worker)
                    break

    def _stop_workers(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass
        deadline = time.monotonic() + _STOP_GRACE
        for process in [w.process for w in self._workers] + self._retired:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                process.kill()
                process.join(1.0)
        for worker in self._workers:
            worker.conn.close()
        self._workers.clear()
        self._retired.clear()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def stats(self) -> dict[str, Any]:
        """See :meth:`Backend.stats`; ``memory`` is each worker's resident set
        size, read from ``/proc`` (``None`` where there is none)."""
        with self._lock:
            workers = [(w.process.pid, w.item is not None, w.tasks_done) for w in self._workers]
            queued = len(self._pending)
        rows = []
        for pid, busy, done in workers:
            try:
                with open(f"/proc/{pid}/statm") as statm:
                    memory: int | None = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError, AttributeError):
                memory = None
            rows.append(
                {"name": f"process {pid}", "pid": pid, "busy": busy, "tasks_run": done,
                 "memory": memory}
            )
        return {
            "backend": "process",
            "configured_workers": self._max_workers,
            "workers": rows,
            "busy": sum(1 for _, busy, _ in workers if busy),
            "queue": queued,
        }


def _death_message(process: Any) -> str:
    code = process.exitcode
    if code is None:
        how = "stopped responding"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed by {name} (exit code {code})"
    else:
        how = f"exited with code {code}"
    return (
        f"the worker process (pid {process.pid}) running this task {how}; only this task"
        " failed, a replacement worker starts for the others"
    )
