"""Process backend: a pool of worker processes that survives its tasks.

How work flows::

    submit() ── idle worker that is up? ── yes ─▶ Channel ═══ socket pair ═══▶ worker 1..N
    (caller)    │ no                         (non-blocking;                   _serve():
                ▼                             queued bytes wait)              ("ready")
             pending deque ─wake─▶ dispatcher thread                          unpickle,
             (WorkItem)           · starts workers, one per waiting task     restore context,
                                   · gives a task to a worker once it is up   run, pickle
    FutureProxy ◀─ settle() ◀───── · reads results as bytes arrive  ◀════════ ("done", outcome)
    (callbacks guarded)            · watches sentinels, task deadlines,
                                     start-up deadlines, the shutdown deadline

    the worker's orphan watch: a thread that exits the process the moment its
    socket's other end closes (the web process is gone), whatever it is doing

Each worker runs one task at a time and says when it takes one ("took"), so
the dispatcher knows which task each worker runs: a worker that dies fails
only that task, and a task past its time limit or cancelled while running has
its worker killed. With a backlog, a worker that runs a task is sent the next
ones ahead (:data:`PREFETCH`, as many as the pool's recent task durations fit
in :data:`PREFETCH_SECONDS`); such a task is still pending until the worker
takes it, so it is delivered again if the worker dies, and cancelling it asks
the worker to give it back over a second, control socket (its watcher thread
answers while the task before it runs). No thread blocks on a worker (the web
process's socket ends are non-blocking, see :mod:`._channel`). What happens
when workers and tasks end is in :mod:`._workers`.
The dispatcher holds the :class:`_Pool`, never the :class:`ProcessBackend`, so
a backend nobody references is collected and its finalizer winds the pool
down. The behaviour is described in ``docs/reliability.rst``.
"""

from __future__ import annotations

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

from ..futures import FutureProxy
from ..serialize import type_name
from ..tasks import log_record_restore
from . import Backend, BackendOptions, PickledTask, cancel_and_notify, settle
from ._channel import CONTROL_ID, channel_pair, control_pair, decode, split_header
from ._start import (
    check_main_guard,
    default_start_method,
    init_error,
    preload_fork_server,
    start_error,
)
from ._worker import rebuild_outcome, release, worker_main
from ._workers import PREFETCH, PREFETCH_SECONDS, START_ATTEMPTS, Endings, Worker, WorkItem

__all__ = [
    "PREFETCH", "PREFETCH_SECONDS", "START_ATTEMPTS", "WORKER_START_TIMEOUT", "ProcessBackend",
    "default_start_method",
]  # fmt: skip

logger = logging.getLogger("flask_executor")

#: Seconds a new worker may take to come up (start the interpreter, import,
#: run ``EXECUTOR_WORKER_INIT``) before it is killed and replaced.
WORKER_START_TIMEOUT = 60.0


#: The largest chunk ``map`` makes by itself (a ``chunksize`` left at 1).
#: Each chunk costs the web process and the worker about a millisecond on a
#: 2-CPU machine (dispatch, wake-ups, results): 4 us per item at 256 items a
#: chunk, under 1 us at 1,024 (a 100,000-item map of a trivial task in full
#: context: 43.0 us per item at 256, 40.7 at 1,024, 40.8 at 2,048). A chunk
#: that fails (a worker dies) fails its items together, so no larger.
MAX_AUTO_CHUNK = 1024


class ProcessBackend(Backend):
    """Runs pickled tasks in ``max_workers`` processes (default: CPU count)."""

    pickles = True
    by_value_main = False  # workers import __main__ as __mp_main__, as the stdlib's do

    def __init__(self, options: BackendOptions) -> None:
        # The pool first: a pool that is refused (a script without a main
        # guard) leaves no half-made backend for the exit hook to shut down.
        pool = _Pool(options)
        super().__init__(options)
        self._pool = pool
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


class _Pool(Endings):
    """The workers, the queue and the dispatcher thread of one backend."""

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        method = options.start_method or default_start_method()
        check_main_guard(method)  # pools start in the first submit(): fail it, clearly
        self._context: Any = multiprocessing.get_context(method)
        self._max_workers = options.max_workers or os.cpu_count() or 1
        self._lock = threading.RLock()
        self._pending: deque[WorkItem] = deque()
        self._stop_requests: deque[WorkItem] = deque()
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
        #: A wake-up byte is on its way to the dispatcher: submits add none.
        self._woken = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._workers: list[Worker] = []
        #: The web process's ends of the sockets of workers being started (not
        #: in ``_workers`` yet): a fork meanwhile must let go of them too.
        self._launching: list[Any] = []
        self._retired: list[Any] = []
        #: How long recent tasks ran in their workers (seconds; rises at
        #: once, falls slowly); ``None`` until one finished.
        self._task_seconds: float | None = None
        _pools.add(self)

    def _forked(self) -> None:
        """In a child forked from the web process (``os.fork()``, a server
        that forks after the pool started): let go of the workers' sockets,
        so that they still see the web process die and the child can never
        write to them, and refuse new tasks (the child has no dispatcher)."""
        self._lock = threading.RLock()  # another thread may have held it at fork time
        fds = [w.channel.fileno() for w in self._workers]
        fds += [w.control.fileno() for w in self._workers]
        fds += [end.fileno() for end in self._launching]
        release(tuple(fd for fd in fds if fd >= 0))
        for worker in self._workers:
            worker.channel.close()  # closes only the /dev/null copy now
            worker.control.close()
        for end in self._launching:
            end.close()
        self._workers, self._pending, self._retired = [], deque(), []
        self._launching = []
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
            item = WorkItem(future, task, self)
            future._stop_running = item
            # An idle worker that is up takes the task straight from this
            # thread: one thread hop less than going through the dispatcher.
            worker = None if self._pending else self._idle_worker(item, ahead=False)
            if worker is None:
                self._pending.append(item)
                # One wake-up for a burst of submits: the dispatcher takes
                # every waiting task each time it wakes.
                wake = not self._woken
                self._woken = True
            else:
                self._give(worker, item)
                wake = worker.channel.sending or worker.broken
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._dispatch, name="flask-executor-dispatcher", daemon=True
                )
                self._thread.start()
        if wake:  # a task to place, or bytes to flush
            self._wake()

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        with self._lock:
            self._shutdown = True
            dropped = list(self._pending) if cancel_futures else []
            if cancel_futures:
                self._pending.clear()
                # Sent ahead behind the worker's current task: cancelled too (and
                # asked back). The current one runs even if its "took" is still
                # on its way: the worker may have started it (as the standard
                # pool runs what it has put in its call queue).
                ahead = [
                    i for w in self._workers for i in itertools.islice(w.items, 1, None)
                    if not i.taken
                ]
            else:
                ahead = []
            if timeout is not None:
                stop_at = time.monotonic() + max(0.0, timeout)
                if self._stop_at is None or stop_at < self._stop_at:
                    self._stop_at, self._stop_timeout = stop_at, timeout
            thread = self._thread
            if thread is None:
                self._close()
        for item in dropped:
            cancel_and_notify(item.future)
        for item in ahead:
            item.future.cancel()
        self._wake()
        if thread is not None and wait and thread is not threading.current_thread():
            thread.join()

    def _request_stop(self, item: WorkItem) -> None:
        """``item``'s future was cancelled: stop its task if it runs, take it
        back if it was sent ahead (any thread).

        A task sent ahead is asked back here, before ``cancel()`` returns, not
        by the dispatcher later: the worker reads the request before it takes
        its next call, so a task reported cancelled while it had not started
        never starts (one that started meanwhile is stopped like any other)."""
        with self._lock:
            for worker in self._workers:
                if item in worker.items:
                    if not item.taken:
                        self._recall(worker, item)
                    break
        self._stop_requests.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:
            pass  # the socket is full (the dispatcher will wake) or closed

    # -- handing out tasks (any thread, lock held) --------------------------------

    def _room(self, worker: Worker, ahead: bool) -> bool:
        if not worker.ready or worker.broken:
            return False
        load = len(worker.items)
        if load and not (
            ahead
            and worker.items[0].taken  # behind a task it said it runs: alive, not frozen
            and load <= self._ahead_limit()
            and not worker.channel.sending  # what it was sent is out: no pile of payloads
        ):
            return False
        limit = self.options.max_tasks_per_child
        return not limit or worker.tasks_done + load < limit

    def _ahead_limit(self) -> int:
        """How many tasks a busy worker is sent ahead (see :data:`PREFETCH_SECONDS`)."""
        seconds = self._task_seconds
        if seconds is None:
            return 1
        if seconds * PREFETCH <= PREFETCH_SECONDS:
            return PREFETCH
        return max(1, int(PREFETCH_SECONDS / seconds))

    def _idle_worker(self, item: WorkItem, ahead: bool) -> Worker | None:
        """A worker that is up with room for ``item`` (an idle one; with
        ``ahead``, also one that runs a task and has room behind it, see
        :meth:`_ahead_limit`), the least loaded first, then one that has the
        task's app."""
        best: Worker | None = None
        for worker in self._workers:
            if not self._room(worker, ahead):
                continue
            if best is None or len(worker.items) < len(best.items):
                best = worker
            elif len(worker.items) == len(best.items) and (
                worker.app_version == item.task.app_version != best.app_version
            ):
                best = worker
        return best

    def _give(self, worker: Worker, item: WorkItem) -> None:
        """Send ``item`` to ``worker``; it runs once the worker takes it
        (``took``): only then is the future running and its time limit
        counting. If the worker's socket is already closed (it died before
        it got the task), the task goes back to the front of the queue."""
        worker.items.append(item)
        # Each delivery has its own id: a worker that is given back a call it
        # has not read yet and then gets it again holds two copies, and an
        # answer about one must never be taken for the other.
        item.task_id = next(self._ids)
        item.taken = item.recalled = False
        item.deliveries += 1
        task = item.task
        try:
            if task.push_context and worker.app_version != task.app_version:
                self._send_app(worker, task)
            header = ("call", item.task_id, task.app_version, task.push_context, task.chunked)
            worker.channel.send(split_header(header), task.payload)  # the payload as it is
        except OSError:
            worker.broken = True
            worker.items.remove(item)
            self._pending.appendleft(item)

    def _send_app(self, worker: Worker, task: PickledTask) -> None:
        worker.channel.send(
            pickle.dumps(("app", task.app_version, task.app_spec), pickle.HIGHEST_PROTOCOL)
        )
        worker.app_version = task.app_version

    def _recall(self, worker: Worker, item: WorkItem) -> None:
        """Ask ``worker`` to give back ``item``, sent ahead and not started:
        it answers ``skipped`` (then it never runs there) or ``took``."""
        if item.recalled or item.taken:
            return
        item.recalled = True
        try:
            worker.control.send(CONTROL_ID.pack(item.task_id))
        except OSError:
            pass  # it is dying: the item is delivered again when it is gone

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
            items = [*self._pending, *(i for w in self._workers for i in w.items)]
            self._pending.clear()
        for item in items:
            settle(item.future, exception=BrokenProcessPool(self._broken))

    def _finished(self) -> bool:
        with self._lock:
            return (
                self._shutdown
                and not self._pending
                and not any(worker.items for worker in self._workers)
            )

    def _assign(self) -> None:
        """Give waiting tasks to idle workers, then one ahead to each busy one
        when the pool is full; start workers for the rest; ask a call sent
        ahead back for a worker that went idle with nothing waiting."""
        dropped = []
        with self._lock:
            full = len(self._workers) >= self._max_workers and all(
                w.ready for w in self._workers
            )
            for ahead in (False, True) if full else (False,):
                while self._pending:
                    item = self._pending[0]
                    if item.future.cancelled():
                        dropped.append(self._pending.popleft())
                        continue
                    worker = self._idle_worker(item, ahead)
                    if worker is None:
                        break
                    self._pending.popleft()
                    self._give(worker, item)
            if not self._pending:
                self._rebalance()
            starting = sum(1 for w in self._workers if not w.ready)
            # A task sent ahead to a worker that died or is gone waits in the
            # queue; one behind a running task wants a worker too, when the pool
            # lost one: it moves there once that is up (see _rebalance).
            behind = sum(len(w.items) - 1 for w in self._workers if len(w.items) > 1)
            waiting = len(self._pending) + behind
            wanted = min(waiting - starting, self._max_workers - len(self._workers))
            # The initializer runs in the worker's app: the first waiting task's.
            app_task = self._pending[0].task if wanted > 0 and self.options.worker_init else None
        for item in dropped:
            cancel_and_notify(item.future)
        self._start_workers(wanted, app_task)

    def _rebalance(self) -> None:
        """For each idle worker, ask back the later half of the calls waiting
        behind a running task in the worker with the most (lock held): they
        run on the idle one. The last are asked first, so that they are
        queued again in their order."""
        workers = self._workers
        if not any(len(w.items) > 1 for w in workers):
            return  # nothing waits behind a running task (the usual case: checked first)
        idle = sum(1 for w in workers if not w.items and self._room(w, False))
        for _ in range(idle):
            tails = [
                ([i for i in itertools.islice(w.items, 1, None) if not i.recalled], w)
                for w in workers
            ]
            tail, worker = max(tails, key=lambda pair: len(pair[0]))
            if not tail:
                return
            for item in reversed(tail[len(tail) // 2 :]):
                self._recall(worker, item)

    def _start_workers(self, count: int, app_task: PickledTask | None) -> None:
        """Start ``count`` workers (dispatcher thread, lock not held: with the
        ``forkserver`` method a start waits for the fork server, the first
        one until it has imported Flask, and ``submit()`` must not wait for
        it). ``app_task``: the task whose app the worker initializer runs in."""
        for _ in range(count):
            started = self._launch()
            if isinstance(started, BaseException):
                self._start_failed(started)
                continue
            with self._lock:
                # Listed before it is unlisted: a fork from another thread meanwhile
                # always finds its sockets (releasing them twice does no harm).
                self._workers.append(started)
                self._launching.clear()
                if app_task is not None:
                    try:
                        self._send_app(started, app_task)
                    except OSError:
                        pass  # it died already; its sentinel says so
            self._selector.register(started.channel, selectors.EVENT_READ, ("conn", started))
            sentinel = started.process.sentinel
            self._selector.register(sentinel, selectors.EVENT_READ, ("sentinel", started))

    def _launch(self) -> Worker | BaseException:
        """A new worker process, or the error if none could be started."""
        channel, child_conn = channel_pair()
        control, child_control = control_pair()
        self._launching += (channel, control)  # one list operation: no lock needed
        # A fork child inherits the web process's end of every pool socket; it
        # must release them, or no worker would see the web process die. The
        # at-fork hook releases the other workers' ends; these are its own.
        inherited: tuple[int, ...] = ()
        if self._context.get_start_method() == "fork":
            inherited = (channel.fileno(), control.fileno())
        process = self._context.Process(
            target=worker_main,
            args=(
                child_conn,
                logging.getLogger().getEffectiveLevel(),
                inherited,
                self.options.worker_init,
                child_control,
            ),
            name="flask-executor-worker",
            daemon=True,
        )
        try:
            process.start()
        except Exception as exc:  # fork failed (EAGAIN, ENOMEM), exec failed
            self._launching.clear()
            channel.close()
            control.close()
            return start_error(None, f"could not be started ({type_name(exc)}: {exc})", exc)
        finally:
            child_conn.close()
            child_control.close()
        return Worker(process, channel, control, WORKER_START_TIMEOUT)

    def _forget(self, worker: Worker) -> None:
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
            running = [w.running for w in self._workers]
            deadlines = [item.deadline for item in running if item and item.deadline]
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
                self._woken = False  # before reading: a submit from now on wakes again
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

    def _receive(self, worker: Worker) -> None:
        for data in worker.channel.receive():
            self._handle(worker, decode(data))
            if worker not in self._workers:
                return
        if worker.channel.closed:
            self._worker_lost(worker)

    def _handle(self, worker: Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            self._failed_starts = 0
        elif kind == "took":
            self._took(worker, message[1])
        elif kind == "skipped":
            self._skipped(worker, message[1])
        elif kind == "done":
            self._complete(worker, message[1], message[3], message[2])
        elif kind == "result":  # a split message: the result's pickle is its body
            self._complete(worker, message[1], ("ok", message[3]), message[2])
        elif kind == "meta":
            item = worker.find(message[1])
            if item is not None:
                item.future._merge_meta(message[2])
        elif kind == "log":
            log_record_restore(message[2])
        elif kind == "init_failed":
            cause = rebuild_outcome(message[1])[1]
            worker.failure = init_error(self.options.worker_init, cause)
            self._worker_lost(worker)  # it exits by itself

    def _took(self, worker: Worker, task_id: int) -> None:
        """The worker started ``task_id``: the task runs from here."""
        item = worker.find(task_id)
        if item is None:
            return
        item.taken = True
        # The worker has the call and will never need it again (a task it
        # took is not delivered again): the web process no longer holds a
        # copy of a large argument while the task runs.
        item.task.payload = b""  # the task is this pool's own (made for this submit)
        # Running from here: a task is taken once (one that a worker took is
        # never delivered again).
        if not item.future.set_running_or_notify_cancel():
            # Cancelled while it was on its way, and the worker started it
            # before it read the request to give it back: stop it.
            self._kill(worker)
            return
        timeout = item.future._task_timeout or self.options.task_timeout
        item.deadline = time.monotonic() + timeout if timeout else None

    def _skipped(self, worker: Worker, task_id: int) -> None:
        """The worker gave back ``task_id`` unstarted: cancelled, or for
        another worker."""
        item = worker.find(task_id)
        if item is None or item.taken:  # (a worker never gives back what it took)
            return
        worker.items.remove(item)
        item.deliveries -= 1  # it never reached the worker's hands
        if item.future.cancelled():
            cancel_and_notify(item.future)
        else:
            with self._lock:
                self._pending.appendleft(item)

    def _complete(self, worker: Worker, task_id: int, outcome: Any, seconds: float) -> None:
        """``task_id`` ended in ``worker`` after running ``seconds`` there."""
        item = worker.items[0] if worker.items else None
        if item is not None and item.task_id != task_id:
            item = None
        if item is not None:  # while the worker still has it: a bug here fails it too
            ok, value = rebuild_outcome(outcome)
            self._ran(seconds)
        limit = self.options.max_tasks_per_child
        with self._lock:
            worker.tasks_done += 1
            if item is not None:
                worker.items.popleft()
            retire = bool(limit and worker.tasks_done >= limit)
            if retire:  # out of the pool before anyone can claim it again
                self._forget(worker)
        if retire:
            self._retire(worker)
        if item is not None:
            if ok:
                settle(item.future, result=value)
            else:
                settle(item.future, exception=value)

    def _ran(self, seconds: float) -> None:
        """A task ran ``seconds``: a longer one counts at once (fewer are sent
        ahead from the next assignment on), shorter ones little by little."""
        last = self._task_seconds
        if last is None or seconds >= last:
            self._task_seconds = seconds
        else:
            self._task_seconds = last + (seconds - last) * 0.1

    def _close(self) -> None:
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()

    def stats(self) -> dict[str, Any]:
        """See :meth:`Backend.stats`; ``memory`` is each worker's resident set
        size, read from ``/proc`` (``None`` where there is none);
        ``sent_ahead`` the tasks sent to it that it has not started (they
        count in ``queue`` too)."""
        with self._lock:
            workers = [
                (w.process.pid, w.running is not None, w.tasks_done,
                 sum(1 for item in w.items if not item.taken))
                for w in self._workers
            ]  # fmt: skip
            queued = len(self._pending) + sum(ahead for *_, ahead in workers)
        rows = []
        for pid, busy, done, ahead in workers:
            try:
                with open(f"/proc/{pid}/statm") as statm:
                    memory: int | None = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError, AttributeError):
                memory = None
            rows.append(
                {"name": f"process {pid}", "pid": pid, "busy": busy, "tasks_run": done,
                 "memory": memory, "sent_ahead": ahead}
            )
        return {
            "backend": "process",
            "configured_workers": self._max_workers,
            "workers": rows,
            "busy": sum(1 for _, busy, _, _ in workers if busy),
            "queue": queued,
        }


_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
