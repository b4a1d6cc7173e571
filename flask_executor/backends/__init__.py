"""Backends run tasks; the :class:`~flask_executor.Executor` front decides what
a task is. They share one small interface, :class:`Backend`: a thread backend
receives ready-to-call closures, a process or cluster backend receives one
pickled payload (``pickles = True``). Each completes the
:class:`~flask_executor.futures.FutureProxy` it is given.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.process
import os
import signal
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ShutdownTimeoutError

if TYPE_CHECKING:  # a worker process imports this package: not the futures and stores
    from ..futures import FutureProxy

__all__ = ["Backend", "BackendOptions", "PickledTask"]

logger = logging.getLogger("flask_executor")


class BackendOptions:
    """The config an executor resolved for one app.

    Plain classes here and in every module a process worker imports, not
    dataclasses: creating one costs about half a millisecond, in the web
    process and again in the fork server, before the first task can start.
    """

    __slots__ = (
        "max_workers", "task_timeout", "shutdown_timeout", "start_method",
        "max_tasks_per_child", "dask_address", "dask_security", "worker_init",
        "immediate_pickle",
    )  # fmt: skip

    def __init__(
        self,
        max_workers: int | None,
        task_timeout: float | None,
        shutdown_timeout: float | None = None,
        start_method: str | None = None,
        max_tasks_per_child: int | None = None,
        dask_address: str | None = None,
        dask_security: Any = None,
        worker_init: str | None = None,
        immediate_pickle: bool = False,
    ) -> None:
        self.max_workers = max_workers
        self.task_timeout = task_timeout
        #: ``EXECUTOR_SHUTDOWN_TIMEOUT``: what interpreter exit passes to
        #: :meth:`Backend.shutdown`; ``None``: no limit.
        self.shutdown_timeout = shutdown_timeout
        self.start_method = start_method
        self.max_tasks_per_child = max_tasks_per_child
        self.dask_address = dask_address
        self.dask_security = dask_security
        #: ``'pkg.module:function'`` run once in each new worker, in its app context.
        self.worker_init = worker_init
        self.immediate_pickle = immediate_pickle


class PickledTask:
    """A task for a backend that pickles: the call and the app it needs."""

    __slots__ = ("payload", "app_version", "app_spec", "push_context", "chunked")

    def __init__(
        self,
        payload: bytes,
        app_version: str,
        app_spec: bytes,
        push_context: bool,
        chunked: bool = False,
    ) -> None:
        #: ``(fn, args, kwargs, snapshot)`` pickled by :func:`~flask_executor.serialize.dumps_call`.
        self.payload = payload
        #: Version and pickled :class:`~flask_executor.appspec.AppSpec`; workers
        #: receive the spec only when their version differs.
        self.app_version = app_version
        self.app_spec = app_spec
        #: Run the call inside a rebuilt Flask context.
        self.push_context = push_context
        #: ``args`` is ``(items,)``: call ``fn(*item)`` for each, each in its own context.
        self.chunked = chunked


class Backend(ABC):
    """A pool of workers that completes :class:`FutureProxy` objects."""

    #: ``True``: tasks arrive as :class:`PickledTask`; ``False``: as closures.
    pickles: bool = False
    #: Workers do not run the web process's ``__main__``: pickle its
    #: functions and classes by value.
    by_value_main: bool = True

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        _live.add(self)

    @abstractmethod
    def submit(self, future: FutureProxy[Any], task: Any) -> None:
        """Run ``task`` and complete ``future`` with its outcome.

        :raises RuntimeError: the backend was shut down.
        """

    def map_chunksize(self, items: int) -> int:
        """The chunk size ``map`` uses when the caller left it at 1."""
        return 1

    def submit_many(self, items: Sequence[tuple[FutureProxy[Any], Any]]) -> None:
        """Submit several tasks; backends with a batch call override this."""
        for future, task in items:
            self.submit(future, task)

    @abstractmethod
    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop accepting tasks; see :meth:`concurrent.futures.Executor.shutdown`.

        With ``wait``, return once the submitted tasks finished (only those
        already on a worker with ``cancel_futures``), or after ``timeout``
        seconds: then stop the workers and leave no future unfinished, with
        :func:`stop_unfinished`.
        """

    def _abandon(self) -> None:  # noqa: B027 - most backends have nothing to do
        """In a forked child: this backend's workers are the parent's. Make
        sure nothing of it runs here (no finalizer, no exit hook); never stop,
        join or message its workers."""

    def stats(self) -> dict[str, Any]:
        """A read-only, JSON-ready view of the pool for dashboards: ``backend``,
        ``configured_workers``, ``workers`` (one dict per live worker: ``name``,
        ``pid``, ``busy``, ``tasks_run``, ``memory`` in bytes; ``None`` where
        the backend cannot tell), ``busy`` (how many run a task) and ``queue``
        (tasks waiting for a worker). Backends override it; this default
        knows only the configuration.

        .. versionadded:: 2.0
        """
        return {
            "backend": type(self).__name__.removesuffix("Backend").lower(),
            "configured_workers": self.options.max_workers,
            "workers": [],
            "busy": None,
            "queue": None,
        }


#: Every backend not yet collected; weak, so that a dropped executor's pool winds down.
_live: weakref.WeakSet[Backend] = weakref.WeakSet()
#: Set by the exit hook: from then on no new backend starts.
_exiting = False
#: In a forked child only: the parent's backends, kept so that nothing of
#: theirs (a Dask client's ``__del__``) is ever collected and run here.
_abandoned: list[Backend] = []


def exit_on_sigterm() -> None:
    """Make SIGTERM end the process like ``sys.exit()`` so that the exit hook
    runs (tasks finish within ``EXECUTOR_SHUTDOWN_TIMEOUT``), instead of the
    default action, which kills the process on the spot.

    Only from the main thread, and only while SIGTERM has its default action:
    servers that handle it (gunicorn, uWSGI) keep their own handler. Waitress,
    ``flask run`` and plain scripts have none and die mid-task without this.
    """
    global _sigterm_pid
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    _sigterm_pid = os.getpid()
    signal.signal(signal.SIGTERM, _sigterm_exit)


#: The process that installed :func:`_sigterm_exit`.
_sigterm_pid = 0


def _sigterm_exit(signum: int, frame: object) -> None:
    if os.getpid() != _sigterm_pid:  # a forked child: the default action
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise SystemExit(128 + signum)


class _ForkListener(Protocol):
    def _after_fork_in_child(self) -> None: ...


#: Owners of backends (executors), told in a forked child that the backends
#: they hold are the parent's; weak, so that dropped executors are collected.
_fork_listeners: weakref.WeakSet[_ForkListener] = weakref.WeakSet()


def on_fork_in_child(listener: _ForkListener) -> None:
    """Call ``listener._after_fork_in_child()`` in every child forked from
    this process, after the backends there were abandoned."""
    _fork_listeners.add(listener)


def _after_fork_in_child() -> None:
    """After ``os.fork()`` (``gunicorn --preload``, a ``fork`` start-method
    worker, a library that forks), in the child: abandon the parent's backends
    (see :meth:`Backend._abandon`) and let their owners start fresh ones; the
    parent's workers, pipes and Dask client are left untouched, its pending
    futures stay its own."""
    if signal.getsignal(signal.SIGTERM) is _sigterm_exit:
        try:  # a worker process must die of SIGTERM as it would have before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # not the main thread: _sigterm_exit checks the pid
            pass
    for backend in list(_live):
        backend._abandon()
        _abandoned.append(backend)
        _live.discard(backend)
    # The parent's worker processes are not this process's children: forget
    # them, as multiprocessing does in the children it forks itself, or its
    # exit hook would terminate and join them from here.
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.clear()
    _forget_forkserver()
    _unlock_resource_tracker()
    for listener in list(_fork_listeners):
        listener._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _forget_forkserver() -> None:
    """In a forked child, forget the parent's fork server: asking whether it
    is alive (``waitpid``) fails here, as it is not this process's child. The
    child's next forkserver pool starts its own. Only the child's copy of the
    fd that keeps the parent's server alive is closed: nothing is sent, and
    the server's socket is left in place."""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._forkserver_address = None
    server._lock = threading.Lock()  # another thread may have held it at the fork


def _unlock_resource_tracker() -> None:
    """In a forked child, a fresh lock for :mod:`multiprocessing`'s resource
    tracker. Every process a fork server (or ``spawn``) starts asks the tracker
    whether it is alive, under that lock, so a parent thread starting a pool worker may
    hold it at the fork; a lock held at a fork stays held in the child for
    good, and the child's first pool worker would never start. The tracker is
    still the parent's, shared with the child as multiprocessing shares it
    with the processes it starts."""
    module = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    lock = getattr(tracker, "_lock", None)
    if lock is None:
        return
    # Python 3.12+ uses an RLock (it checks its recursion count), earlier a Lock.
    reentrant = isinstance(lock, type(threading.RLock()))
    tracker._lock = threading.RLock() if reentrant else threading.Lock()  # type: ignore[union-attr]


@atexit.register
def _shutdown_all() -> None:
    """At interpreter exit, shut every live backend down: running and queued
    tasks get ``EXECUTOR_SHUTDOWN_TIMEOUT`` seconds (counted from the start of
    exit, not per backend), then the rest are stopped, failed or cancelled.
    Later submits raise :exc:`RuntimeError`, as with the standard library."""
    global _exiting
    _exiting = True
    start = time.monotonic()
    for backend in list(_live):
        limit = backend.options.shutdown_timeout
        timeout = None if limit is None else max(0.0, start + limit - time.monotonic())
        backend.shutdown(wait=True, timeout=timeout)


def cancel_and_notify(future: Future[Any]) -> bool:
    """Cancel ``future`` if it has not started, and mark it notified, as the
    standard library's pools do for a work item they drop: only then do
    :func:`concurrent.futures.wait` and ``as_completed`` count it as done.
    ``False`` if it had started or finished."""
    if not Future.cancel(future):
        return False
    with future._condition:
        if future._state == CANCELLED:
            future.set_running_or_notify_cancel()
    return True


def stop_unfinished(futures: Iterable[Future[Any]], timeout: float | None, what: str) -> None:
    """After shutdown stopped waiting: cancel the futures that never started
    and fail the running ones with :exc:`~flask_executor.ShutdownTimeoutError`
    (``what`` says what became of the task itself)."""
    limit = "" if timeout is None else f" ({timeout:g} s: EXECUTOR_SHUTDOWN_TIMEOUT)"
    for future in futures:
        if not cancel_and_notify(future):
            settle(
                future,
                exception=ShutdownTimeoutError(
                    f"the task was still running when shutdown stopped waiting{limit}; {what}"
                ),
            )


def green_problem(kind: str, start_method: str | None) -> str | None:
    """Why ``kind`` cannot work in this process if gevent or eventlet
    monkey-patched it (``gunicorn -k gevent``), else ``None``."""
    monkey = sys.modules.get("gevent.monkey")
    patcher = sys.modules.get("eventlet.patcher")
    if monkey is not None and monkey.is_module_patched("threading"):
        green = "gevent"
    elif patcher is not None and patcher.is_monkey_patched("thread"):
        green = "eventlet"
    else:
        return None
    if kind == "dask":
        return (
            f"the Dask client cannot work under {green} monkey-patching: it runs its event"
            " loop in a background thread, which is a greenlet of the same OS thread here,"
            " so its blocking calls return coroutines; use EXECUTOR_TYPE = 'process' or"
            " 'thread', or a non-green server worker"
        )
    if kind == "process" and start_method == "fork":
        return (
            f"EXECUTOR_START_METHOD = 'fork' cannot work under {green} monkey-patching: the"
            " forked worker inherits the server's greenlets (its accept and heartbeat loops)"
            " and runs them; leave it unset (forkserver) or use 'spawn'"
        )
    return None


def create_backend(kind: str, options: BackendOptions) -> Backend:
    """The backend for ``EXECUTOR_TYPE`` ``kind``.

    :raises RuntimeError: the interpreter is exiting, or ``kind`` cannot work
        in this (monkey-patched) process.
    """
    if _exiting:
        raise RuntimeError("cannot schedule new futures after shutdown")
    problem = green_problem(kind, options.start_method)
    if problem is not None:  # init_app checks too; this catches an app loaded before patching
        raise RuntimeError(problem)
    if kind == "thread":
        from .thread import ThreadBackend

        return ThreadBackend(options)
    if kind == "process":
        from .process import ProcessBackend

        return ProcessBackend(options)
    if kind == "immediate":
        from .immediate import ImmediateBackend, PicklingImmediateBackend

        return (PicklingImmediateBackend if options.immediate_pickle else ImmediateBackend)(options)
    from .dask import DaskBackend

    return DaskBackend(options)


def complete(future: FutureProxy[Any], call: Callable[[], Any]) -> None:
    """Run ``call`` for a future that is already marked running, and record
    its outcome, unless the future was completed meanwhile (timed out or
    cancelled)."""
    try:
        result = call()
    except BaseException as exc:
        settle(future, exception=exc)
        if not isinstance(exc, Exception):
            raise
    else:
        settle(future, result=result)


def settle(
    future: Future[Any], result: Any = None, exception: BaseException | None = None
) -> bool:
    """Complete ``future`` unless it already is; ``False`` if it was.

    Its done callbacks run here, each guarded (see
    :meth:`FutureProxy._invoke_callbacks`): whatever one raises, even
    ``SystemExit``, is logged, so a callback can never break the worker thread
    or dispatcher that settles futures.
    """
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True
