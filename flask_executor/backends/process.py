"""Process backend: a pool of worker processes that survives its tasks.

How work flows::

    submit() ── idle worker that is up? ── yes ─▶ Channel ═══ socket pair ═══▶ worker 1..N
    (caller)    │ no                         (non-blocking;                   _serve():
                ▼                             queued bytes wait)              ("ready")
             pending deque ─wake─▶ dispatcher thread                          unpickle,
             (_WorkItem)           · starts workers, one per waiting task     restore context,
                                   · gives a task to a worker once it is up   run, pickle
    FutureProxy ◀─ settle() ◀───── · reads results as bytes arrive  ◀════════ ("done", outcome)
    (callbacks guarded)            · watches sentinels, task deadlines,
                                     start-up deadlines, the shutdown deadline

    the worker's orphan watch: a thread that exits the process the moment its
    socket's other end closes (the web process is gone), whatever it is doing

Each worker runs one task at a time, so the dispatcher knows which task each
worker has: a worker that dies fails only that task, and a task past its time
limit or cancelled while running has its worker killed. No thread blocks on a
worker (the web process's socket ends are non-blocking, see :mod:`._channel`).
The dispatcher holds the :class:`_Pool`, never the :class:`ProcessBackend`, so
a backend nobody references is collected and its finalizer winds the pool
down. The behaviour is described in ``docs/reliability.rst``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import pickle
import selectors
import socket
import threading
import time
import weakref
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import TaskTimeoutError
from ..futures import FutureProxy
from ..serialize import type_name
from ..tasks import log_record_restore
from . import Backend, BackendOptions, PickledTask, cancel_and_notify, settle
from ._channel import Channel, channel_pair, decode, split_header
from ._start import (
    check_main_guard,
    death_error,
    default_start_method,
    how_it_ended,
    init_error,
    preload_fork_server,
    shutdown_error,
    start_error,
)
from ._worker import rebuild_outcome, release, worker_main

__all__ = ["START_ATTEMPTS", "WORKER_START_TIMEOUT", "ProcessBackend", "default_start_method"]

logger = logging.getLogger("flask_executor")

#: Seconds a new worker may take to come up (start the interpreter, import,
#: run ``EXECUTOR_WORKER_INIT``) before it is killed and replaced.
WORKER_START_TIMEOUT = 60.0
#: Failed worker starts in a row after which the tasks waiting for a worker
#: fail with the last start error (the next task tries again).
START_ATTEMPTS = 3
#: How long a stopping worker may take before it is killed, in seconds.
_STOP_GRACE = 5.0


class _WorkItem:
    __slots__ = ("future", "task", "task_id", "started", "deadline", "taken", "deliveries")

    def __init__(self, future: FutureProxy[Any], task: PickledTask, task_id: int) -> None:
        self.future = future
        self.task = task
        self.task_id = task_id
        #: The future was marked running (a redelivered task keeps that).
        self.started = False
        self.deadline: float | None = None
        #: The worker it was given to said it took it (and had not died before).
        self.taken = False
        self.deliveries = 0


class _Worker:
    __slots__ = ("process", "channel", "item", "tasks_done", "app_version", "ready", "broken",
                 "start_deadline", "failure", "events")  # fmt: skip

    def __init__(self, process: Any, channel: Channel) -> None:
        self.process = process
        self.channel = channel
        self.item: _WorkItem | None = None
        self.tasks_done = 0
        self.app_version = ""
        #: The worker said it is up: only then does it get tasks.
        self.ready = False
        #: Its socket failed: never give it a task; its sentinel follows.
        self.broken = False
        self.start_deadline = time.monotonic() + WORKER_START_TIMEOUT
        #: Why it failed to start, when it said so (its initializer raised).
        self.failure: BaseException | None = None
        self.events = selectors.EVENT_READ


#: The largest chunk ``map`` makes by itself (a ``chunksize`` left at 1).
MAX_AUTO_CHUNK = 256


class ProcessBackend(Backend):
    """Runs pickled tasks in ``max_workers`` processes (default: CPU count)."""

    pickles = True
    by_value_main = False  # workers import __main__ as __mp_main__, as the stdlib's do

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._pool = _Pool(options)
        # Dropped without shutdown(): finish what was submitted, then stop.
        # (At interpreter exit the backends' own exit hook does it, waiting.)
        weakref.finalize(self, self._pool.shutdown, False).atexit = False

    def submit(self, future: FutureProxy[Any], task: PickledTask) -> None:
        self._pool.submit(future, task)

    def map_chunksize(self, items: int) -> int:
        """About four chunks per worker, at most :data:`MAX_AUTO_CHUNK` items
        each: one round trip per item costs more than the item. With
        ``EXECUTOR_TASK_TIMEOUT`` set, 1: the time limit stays per item."""
        if self.options.task_timeout:
            return 1
        workers = self._pool._max_workers
        return max(1, min(MAX_AUTO_CHUNK, -(-items // (4 * workers))))

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting tasks; see :meth:`concurrent.futures.Executor.shutdown`.

        :param timeout: seconds the running tasks get to finish; then their
            workers are killed and their futures fail with
            :exc:`~flask_executor.ShutdownTimeoutError`, and tasks that did
            not start are cancelled. ``None``: wait for all of them.
        """
        self._pool.shutdown(wait, cancel_futures=cancel_futures, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return self._pool.stats()


class _Pool:
    """The workers, the queue and the dispatcher thread of one backend."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        method = options.start_method or default_start_method()
        check_main_guard(method)  # pools start in the first submit(): fail it, clearly
        self._context: Any = multiprocessing.get_context(method)
        self._max_workers = options.max_workers or os.cpu_count() or 1
        self._lock = threading.RLock()
        self._pending: deque[_WorkItem] = deque()
        self._stop_requests: deque[_WorkItem] = deque()
        self._ids = itertools.count()
        self._shutdown = False
        #: When a shutdown with a timeout stops waiting for running tasks.
        self._stop_at: float | None = None
        self._stop_timeout = 0.0
        self._broken = ""
        self._failed_starts = 0
        self._thread: threading.Thread | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._workers: list[_Worker] = []
        self._retired: list[Any] = []
        _pools.add(self)

    def _forked(self) -> None:
        """In a child forked from the web process (``os.fork()``, a server
        that forks after the pool started): let go of the workers' sockets,
        so that they still see the web process die and the child can never
        write to them, and refuse new tasks (the child has no dispatcher)."""
        self._lock = threading.RLock()  # another thread may have held it at fork time
        release(tuple(fd for fd in (w.channel.fileno() for w in self._workers) if fd >= 0))
        for worker in self._workers:
            worker.channel.close()  # closes only the /dev/null copy now
        self._workers, self._pending, self._retired = [], deque(), []
        self._thread = None
        self._close()
        self._broken = (
            "this process was forked from the one that started this process pool,"
            " and a pool serves only the process that started it"
        )

    # -- caller side -----------------------------------------------------------

    def submit(self, future: FutureProxy[Any], task: PickledTask) -> None:
        with self._lock:
            if self._broken:
                raise BrokenProcessPool(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            item = _WorkItem(future, task, next(self._ids))
            future._stop_running = functools.partial(self._request_stop, item)
            # An idle worker that is up takes the task straight from this
            # thread: one thread hop less than going through the dispatcher.
            worker = None if self._pending else self._idle_worker(item)
            if worker is None:
                self._pending.append(item)
                wake = True
            else:
                self._give(worker, item)
                wake = item.deadline is not None or worker.channel.sending or worker.broken
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._dispatch, name="flask-executor-dispatcher", daemon=True
                )
                self._thread.start()
        if wake:  # a task to place, a deadline to watch, or bytes to flush
            self._wake()

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        with self._lock:
            self._shutdown = True
            dropped = list(self._pending) if cancel_futures else []
            if cancel_futures:
                self._pending.clear()
            if timeout is not None:
                stop_at = time.monotonic() + max(0.0, timeout)
                if self._stop_at is None or stop_at < self._stop_at:
                    self._stop_at, self._stop_timeout = stop_at, timeout
            thread = self._thread
            if thread is None:
                self._close()
        for item in dropped:
            cancel_and_notify(item.future)
        self._wake()
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

    def _request_stop(self, item: _WorkItem) -> None:
        self._stop_requests.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # the socket is full (the dispatcher will wake) or closed

    # -- handing out tasks (any thread, lock held) --------------------------------

    def _idle_worker(self, item: _WorkItem) -> _Worker | None:
        """An idle worker that is up, preferring one that has the task's app."""
        idle = [w for w in self._workers if w.item is None and w.ready and not w.broken]
        for worker in idle:
            if worker.app_version == item.task.app_version:
                return worker
        return idle[0] if idle else None

    def _give(self, worker: _Worker, item: _WorkItem) -> bool:
        """Start ``item`` on ``worker``; ``False`` if it was cancelled.

        The future is running from here and its time limit starts now. If the
        worker's socket is already closed (it died before it got the task),
        the task goes back to the front of the queue: it never ran.
        """
        if not item.started:
            if not item.future.set_running_or_notify_cancel():
                return False
            item.started = True
        worker.item = item
        item.taken = False
        item.deliveries += 1
        task = item.task
        try:
            if task.push_context and worker.app_version != task.app_version:
                self._send_app(worker, task)
            header = ("call", item.task_id, task.app_version, task.push_context, task.chunked)
            worker.channel.send(split_header(header), task.payload)  # the payload as it is
        except OSError:
            worker.broken = True
            worker.item = None
            self._pending.appendleft(item)
            return True
        timeout = item.future._task_timeout or self.options.task_timeout
        item.deadline = time.monotonic() + timeout if timeout else None
        return True

    def _send_app(self, worker: _Worker, task: PickledTask) -> None:
        worker.channel.send(
            pickle.dumps(("app", task.app_version, task.app_spec), pickle.HIGHEST_PROTOCOL)
        )
        worker.app_version = task.app_version

    # -- dispatcher thread ---------------------------------------------------------

    def _dispatch(self) -> None:
        preload_fork_server(self._context)
        try:
            while True:
                self._assign()
                if self._finished():
                    break
                self._wait_and_handle()
                self._enforce_deadlines()
                self._handle_stop_requests()
        except BaseException as exc:
            # A bug: never leave callers waiting on futures nobody will complete.
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
        """Give waiting tasks to idle workers; start workers for the rest."""
        dropped = []
        with self._lock:
            while self._pending:
                item = self._pending[0]
                if item.future.cancelled():
                    dropped.append(self._pending.popleft())
                    continue
                worker = self._idle_worker(item)
                if worker is None:
                    break
                self._pending.popleft()
                if not self._give(worker, item):
                    dropped.append(item)
            starting = sum(1 for w in self._workers if not w.ready)
            wanted = min(len(self._pending) - starting, self._max_workers - len(self._workers))
            errors = [self._start_worker() for _ in range(wanted)]
        for item in dropped:
            cancel_and_notify(item.future)
        for error in errors:
            if error is not None:
                self._start_failed(error)

    def _start_worker(self) -> BaseException | None:
        """Start a worker (lock held); the error if no process could be started."""
        channel, child_conn = channel_pair()
        # A fork child inherits the web process's end of every pool socket; it
        # must release them, or no worker would see the web process die. The
        # at-fork hook releases the other workers' ends; this is its own.
        inherited: tuple[int, ...] = ()
        if self._context.get_start_method() == "fork":
            inherited = (channel.fileno(),)
        process = self._context.Process(
            target=worker_main,
            args=(
                child_conn,
                logging.getLogger().getEffectiveLevel(),
                inherited,
                self.options.worker_init,
            ),
            name="flask-executor-worker",
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:  # fork failed (EAGAIN, ENOMEM), exec failed
            channel.close()
            return start_error(None, f"could not be started ({type_name(exc)}: {exc})", exc)
        finally:
            child_conn.close()
        worker = _Worker(process, channel)
        self._workers.append(worker)
        self._selector.register(channel, selectors.EVENT_READ, ("conn", worker))
        self._selector.register(process.sentinel, selectors.EVENT_READ, ("sentinel", worker))
        if self.options.worker_init:
            # The initializer runs in the worker's app: the first waiting task's.
            try:
                self._send_app(worker, self._pending[0].task)
            except OSError:
                pass  # it died already; its sentinel says so
        return None

    def _forget(self, worker: _Worker) -> None:
        """Remove ``worker`` from the pool (its process is ended or ending)."""
        with self._lock:
            if worker not in self._workers:
                return
            self._workers.remove(worker)
        for fileobj in (worker.channel, worker.process.sentinel):
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    def _wait_and_handle(self) -> None:
        with self._lock:
            deadlines = [w.item.deadline for w in self._workers if w.item and w.item.deadline]
            deadlines += [w.start_deadline for w in self._workers if not w.ready]
            if self._stop_at is not None:
                deadlines.append(self._stop_at)
            for worker in self._workers:  # watch for room in sockets with queued bytes
                events = selectors.EVENT_READ
                if worker.channel.sending:
                    events |= selectors.EVENT_WRITE
                if events != worker.events:
                    self._selector.modify(worker.channel, events, ("conn", worker))
                    worker.events = events
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        if self._retired:
            timeout = min(timeout, 0.5) if timeout is not None else 0.5
            self._retired = [p for p in self._retired if p.exitcode is None]
        lost = []
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                self._wake_reader.recv(4096)
                continue
            kind, worker = key.data
            if kind == "sentinel":
                lost.append(worker)
                continue
            if mask & selectors.EVENT_WRITE:
                with self._lock:
                    try:
                        worker.channel.flush()
                    except OSError:
                        worker.broken = True
            if mask & selectors.EVENT_READ and worker in self._workers:
                self._receive(worker)
        for worker in lost:
            self._worker_lost(worker)

    def _receive(self, worker: _Worker) -> None:
        for data in worker.channel.receive():
            self._handle(worker, decode(data))
            if worker not in self._workers:
                return
        if worker.channel.closed:
            self._worker_lost(worker)

    def _handle(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._failed_starts = 0
        elif kind == "took":
            item = worker.item
            if item is not None and item.task_id == message[1]:
                item.taken = True
                # The worker has the call and will never need it again (a task it
                # took is not delivered again): the web process no longer holds a
                # copy of a large argument while the task runs.
                item.task = dataclasses.replace(item.task, payload=b"")
        elif kind == "done":
            self._complete(worker, message[1], message[2])
        elif kind == "result":  # a split message: the result's pickle is its body
            self._complete(worker, message[1], ("ok", message[2]))
        elif kind == "meta":
            if worker.item is not None and worker.item.task_id == message[1]:
                worker.item.future._merge_meta(message[2])
        elif kind == "log":
            log_record_restore(message[2])
        elif kind == "init_failed":
            cause = rebuild_outcome(message[1])[1]
            worker.failure = init_error(self.options.worker_init, cause)
            self._worker_lost(worker)  # it exits by itself

    def _complete(self, worker: _Worker, task_id: int, outcome: Any) -> None:
        item = worker.item
        if item is not None and item.task_id != task_id:
            item = None
        if item is not None:  # while the worker still has it: a bug here fails it too
            ok, value = rebuild_outcome(outcome)
        limit = self.options.max_tasks_per_child
        with self._lock:
            worker.tasks_done += 1
            retire = bool(limit and worker.tasks_done >= limit)
            if retire:  # out of the pool before anyone can claim it again
                self._forget(worker)
            worker.item = None
        if retire:
            self._retire(worker)
        if item is not None:
            if ok:
                settle(item.future, result=value)
            else:
                settle(item.future, exception=value)

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            try:
                worker.channel.send(pickle.dumps(("stop",)))
            except OSError:
                pass
            worker.channel.close()  # the worker also exits when its socket closes
        self._retired.append(worker.process)

    def _worker_lost(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._forget(worker)  # first: nobody may claim it any more
        try:  # a result (or why it could not start) sent just before dying still counts
            for data in worker.channel.receive():
                if worker.item is None and (worker.ready or worker.failure):
                    break
                self._handle(worker, decode(data))
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        worker.process.join(1.0)
        if worker.process.exitcode is None:
            worker.process.kill()
            worker.process.join(1.0)
        with self._lock:
            worker.channel.close()
            item, worker.item = worker.item, None
            if item is not None and not item.taken and item.deliveries < START_ATTEMPTS:
                # It died before it read the task: the task never ran, deliver it again.
                self._pending.appendleft(item)
                item = None
        if item is not None:
            settle(item.future, exception=death_error(worker.process))
        elif not worker.ready:
            how = f"{how_it_ended(worker.process)} while starting"
            self._start_failed(worker.failure or start_error(worker.process, how))

    def _start_failed(self, error: BaseException) -> None:
        """A worker could not start; after :data:`START_ATTEMPTS` in a row the
        tasks waiting for one fail with ``error``."""
        self._failed_starts += 1
        if self._failed_starts < START_ATTEMPTS:
            return
        self._failed_starts = 0
        with self._lock:
            items = [item for item in self._pending if not item.started]
            for item in items:
                self._pending.remove(item)
        for item in items:
            if not settle(item.future, exception=error):
                cancel_and_notify(item.future)  # it was cancelled meanwhile: let wait() see it

    def _kill(self, worker: _Worker) -> None:
        self._forget(worker)
        worker.process.kill()
        worker.process.join(_STOP_GRACE)
        with self._lock:
            worker.channel.close()

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
            elif not worker.ready and worker.start_deadline <= now:
                self._kill(worker)
                how = (
                    f"did not start within {WORKER_START_TIMEOUT:g} s (flask_executor"
                    ".backends.process.WORKER_START_TIMEOUT) and was killed"
                )
                self._start_failed(start_error(worker.process, how))
        if self._stop_at is not None and self._stop_at <= now:
            self._stop_now()

    def _stop_now(self) -> None:
        """The shutdown timeout passed: kill the workers still running tasks,
        fail those tasks, cancel the ones that never started."""
        with self._lock:
            dropped = list(self._pending)
            self._pending.clear()
            busy = [w for w in self._workers if w.item is not None]
        for worker in busy:
            item = worker.item
            self._kill(worker)
            if item is not None:
                settle(item.future, exception=shutdown_error(worker.process, self._stop_timeout))
        for item in dropped:
            cancel_and_notify(item.future)

    def _handle_stop_requests(self) -> None:
        while self._stop_requests:
            item = self._stop_requests.popleft()
            for worker in self._workers:
                if worker.item is item:
                    self._kill(worker)
                    break

    def _stop_workers(self) -> None:
        with self._lock:
            for worker in self._workers:
                try:
                    worker.channel.send(pickle.dumps(("stop",)))
                except OSError:
                    pass
                worker.channel.close()  # a worker also exits when its socket closes
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

    def _close(self) -> None:
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


_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
