"""What runs inside a process or cluster worker: unpickle a call, rebuild its
Flask context, run it, and pickle the outcome.

Every failure is turned into a message about *that* task, so nothing a task
does (an argument that will not unpickle, a result that will not pickle) can
break the worker or the pool.
"""

from __future__ import annotations

import contextvars
import logging
import os
import pickle
import select
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from flask import Flask, g

from ..appspec import AppSpec, restore_app
from ..errors import SerializationError
from ..serialize import dumps, import_object, loads, type_name
from ..snapshot import restore
from ..tasks import Publisher, TaskHandle, _current_task, forward_logs
from ._channel import CONTROL_ID, decode, framed, split_parts, write_parts

__all__ = ["Outcome", "RemoteTraceback", "rebuild_outcome", "release", "run_call", "worker_main"]

#: ``("ok", result_bytes)`` or ``("error", exception_bytes_or_None, type, message, traceback)``
Outcome = tuple[Any, ...]


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a task's exception
    (as :mod:`concurrent.futures` does for process pools)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _error(exc: BaseException, wrap: str | None = None) -> Outcome:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f'\n"""\n{text}"""'
    if wrap is not None:
        exc = SerializationError(f"{wrap}: {type_name(exc)}: {exc}")
    try:
        data: bytes | None = dumps(exc)
    except Exception as pickling_error:
        data = None
        exc = SerializationError(
            f"the task raised {type_name(exc)}: {exc}; the exception could not be"
            f" pickled to send it back ({type_name(pickling_error)}: {pickling_error})"
        )
    return ("error", data, type_name(exc), str(exc), text)


def run_call(
    payload: bytes | memoryview,
    spec: AppSpec | None,
    push_context: bool,
    chunked: bool = False,
    publish: Publisher | None = None,
    keep: list[Any] | None = None,
) -> Outcome:
    """Run one pickled call; never raises (but for BaseExceptions that must
    end the worker: KeyboardInterrupt). ``publish`` carries the task's meta
    updates and log records to the web process while it runs. ``keep``
    receives the call's arguments and its ``g``, for the caller to
    let go of once the outcome is sent: freeing a large argument or ``g``
    (a dict of many strings) is then no longer part of the round trip, as in
    the standard pool, which drops a call after sending its result."""
    try:
        fn, args, kwargs, snap = loads(payload)
    except Exception as exc:
        return _error(exc, "the task's arguments could not be unpickled in the worker")
    if keep is not None:
        keep.append((fn, args, kwargs, snap))
    token = _current_task.set(TaskHandle(publish))
    try:
        app = restore_app(spec) if push_context and spec is not None else None
        call = fn if app is None else app.ensure_sync(fn)  # once, for every item of a chunk
        if app is None:
            result = [call(*i, **kwargs) for i in args[0]] if chunked else call(*args, **kwargs)
        elif not chunked:
            result = _in(restore(app, snap), call, args, kwargs, keep)
        elif snap is None or snap.shared_by_items():
            each = restore(app, snap)  # one for every item: restoring never changes the snapshot
            result = [_in(each, call, item, kwargs) for item in args[0]]
        else:  # each item in its own context, from a pristine copy of the shared snapshot
            result = [_in(restore(app, snap.for_one_item()), call, i, kwargs) for i in args[0]]
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return _error(exc)
    finally:
        _current_task.reset(token)
    try:
        return ("ok", dumps(result, by_value_main=False))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a reducer's sys.exit() too: the task's error
        return _error(
            exc, f"the task's return value ({type_name(result)}) could not be pickled"
        )


def _in(
    context: restore,
    call: Any,
    args: Any,
    kwargs: dict[str, Any],
    keep: list[Any] | None = None,
) -> Any:
    """``call(*args, **kwargs)`` in a fresh context pushed by ``context``;
    its ``g`` also goes to ``keep`` (see :func:`run_call`)."""
    with context:
        if keep is not None:
            keep.append(g._get_current_object())
        return call(*args, **kwargs)


def run_worker_init(name: str, app: Flask) -> None:
    """Import the worker initializer ``name`` (``'package.module:function'``)
    and call it in ``app``'s app context (process and Dask workers alike)."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(
            f"EXECUTOR_WORKER_INIT must look like 'package.module:function', got {name!r}"
        )
    function = import_object(module, attr)
    with app.app_context():
        function()


def _initialize(name: str, spec: AppSpec | None, spec_error: Exception | None) -> Outcome | None:
    """Run the worker initializer ``name`` in the app context of ``spec``;
    the error outcome if it (or finding it, or building the app) fails."""
    try:
        if spec is None:
            raise spec_error or RuntimeError("the worker has no app")
        run_worker_init(name, restore_app(spec))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return _error(exc)
    return None


def rebuild_outcome(outcome: Outcome) -> tuple[bool, Any]:
    """In the web process: ``(True, result)`` or ``(False, exception)``."""
    # BaseException: a result whose unpickling calls sys.exit() must fail its
    # own task, not the dispatcher thread that unpickles it.
    if outcome[0] == "ok":
        try:
            return True, loads(outcome[1])
        except BaseException as exc:
            error = SerializationError(
                "the task's return value could not be unpickled in the web process:"
                f" {type_name(exc)}: {exc}"
            )
            error.__cause__ = exc
            return False, error
    _, data, exc_type, message, text = outcome
    exception: BaseException
    if data is None:
        exception = SerializationError(message)
    else:
        try:
            exception = loads(data)
        except BaseException as exc:
            exception = SerializationError(
                f"the task raised {exc_type}: {message}; that exception could not be"
                f" rebuilt in the web process ({type_name(exc)}: {exc})"
            )
    exception.__cause__ = RemoteTraceback(text)
    return False, exception


def worker_main(
    conn: Connection,
    log_level: int = logging.WARNING,
    inherited: tuple[int, ...] = (),
    worker_init: str | None = None,
    control: Connection | None = None,
) -> None:
    """Entry point of a process worker: serve calls until told to stop or the
    web process is gone.

    The web process holds the only other end of ``conn``; when that end
    closes (the web process exited or was killed), a watcher thread ends this
    process at once, even in the middle of a task, and silently. ``inherited``
    are the web process's ends of the pool's pipes that a ``fork`` worker got
    by inheritance: they are released first, or they would keep the pipes
    open after the web process dies.

    With ``worker_init`` (``'pkg.module:function'``), the first message is
    the app spec; the function runs in that app's context before the worker
    says it is ready. If it raises, the worker reports the error and exits.

    ``control`` carries requests to give back a call that was sent ahead
    (prefetched) and has not started: the same watcher thread answers them
    while a task runs (see :class:`_Calls`).

    It runs in a fresh :mod:`contextvars` context, so a worker forked from a
    thread that had a request pushed never sees that request.
    """
    release(inherited)
    control_fd = None
    if control is not None:  # a plain descriptor: only ids are read from it
        control_fd = os.dup(control.fileno())
        control.close()
        os.set_blocking(control_fd, False)  # read by two threads, when data is there
    calls = _Calls(conn, control_fd)
    threading.Thread(
        target=_watch,
        args=(conn.fileno(), control_fd, calls),
        name="orphan-watch",
        daemon=True,
    ).start()
    # Records logged in tasks go to the web process's loggers (at the web
    # process's root level), not to this process's inherited stderr handlers.
    forward_logs(log_level, replace=True)
    contextvars.Context().run(_serve, conn, worker_init, calls)


class _Calls:
    """Which calls this worker started and which it was asked to give back.

    The web process sends a worker calls ahead of the one it runs (at most
    :data:`~._workers.PREFETCH`). It may ask for such a call back (it was
    cancelled, or another worker is idle) on the control socket: the answer
    is ``("skipped", id)`` if the call has not started, and the serving
    thread then drops it when it reads it; a call that started was already
    reported with ``("took", id)``. Both decisions are made under one lock,
    so exactly one of the two answers is sent. The watcher thread reads the
    requests while a task runs, and the serving thread reads what has
    arrived before it takes a call: a request written before the call was
    due to start is always honoured, even when the watcher thread has not
    run since (``cancel()`` writes it before it returns).
    """

    #: Calls remembered as started: more than the web process ever has out to
    #: one worker (one running, :data:`~._workers.PREFETCH` ahead), so a request
    #: to give back one that started is always known as too late.
    REMEMBER = 256

    def __init__(self, conn: Connection, control: int | None = None) -> None:
        self.conn = conn
        self.control = control
        self.lock = threading.Lock()  # also orders every message this worker sends
        self.started: deque[int] = deque(maxlen=self.REMEMBER)
        self.skipped: set[int] = set()
        self.partial = b""  # the start of an id record not fully read yet

    def send(self, message: tuple[Any, ...]) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        with self.lock:
            self.conn.send_bytes(data)

    def write(self, parts: list[memoryview]) -> None:
        with self.lock:
            write_parts(self.conn, parts)

    def take(self, task_id: int, before: list[memoryview]) -> bool:
        """Start ``task_id`` (say ``took``), or ``False``: it was given back.
        ``before`` (the last task's outcome) goes out first, in the same write."""
        with self.lock:
            self._read_requests()
            if task_id in self.skipped:
                self.skipped.discard(task_id)
                write_parts(self.conn, before)
                return False
            self.started.append(task_id)
            took = framed(pickle.dumps(("took", task_id), pickle.HIGHEST_PROTOCOL))
            write_parts(self.conn, [*before, took])
            return True

    def read_requests(self) -> None:
        """Answer the give-back requests that have arrived (the watcher thread)."""
        with self.lock:
            self._read_requests()

    def _read_requests(self) -> None:
        if self.control is None:
            return
        try:
            data = os.read(self.control, 4096)
        except BlockingIOError:
            return  # nothing there
        except OSError:
            data = b""
        if not data:
            os._exit(0)  # the web process is gone
        pending = self.partial + data
        whole = len(pending) - len(pending) % CONTROL_ID.size
        for (task_id,) in CONTROL_ID.iter_unpack(pending[:whole]):
            if task_id not in self.started:  # else its "took" is on its way
                self.skipped.add(task_id)
                self.conn.send_bytes(pickle.dumps(("skipped", task_id), pickle.HIGHEST_PROTOCOL))
        self.partial = pending[whole:]


def release(fds: tuple[int, ...]) -> None:
    """Point ``fds`` at /dev/null: the pipes they held close, and a stale
    object that later closes one of these numbers closes nothing of ours."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)


def _watch(fd: int, control: int | None, calls: _Calls) -> None:
    """Exit the process as soon as the peer of ``fd`` is closed (POLLHUP);
    answer the give-back requests that arrive on ``control`` (:data:`~._channel.CONTROL_ID`).

    This watches the pipe, not ``os.getppid()``: a forkserver worker's parent
    is the fork server, which may outlive the web process (and reading the
    parent pid races with the kernel's reparenting).
    """
    poller = select.poll()
    poller.register(fd, 0)  # no events asked: only hang-up and errors are reported
    if control is not None:
        poller.register(control, select.POLLIN)
    while True:
        for ready, event in poller.poll():
            if ready == fd or not event & select.POLLIN:
                if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(0)
                continue
            try:
                calls.read_requests()
            except (BrokenPipeError, ConnectionResetError):
                os._exit(0)  # the web process is gone (its answer had nobody to go to)


def _outcome_parts(task_id: int, outcome: Outcome, seconds: float) -> list[memoryview]:
    """The message of a finished call: its outcome and how long it ran (the
    web process sends a worker as many calls ahead as fit in a few
    milliseconds of them; timed here, not by when the web process reads
    the messages, which waits for the GIL there)."""
    if outcome[0] != "ok":
        message = ("done", task_id, seconds, outcome)
        return [framed(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))]
    return split_parts(("result", task_id, seconds), outcome[1])  # the result's pickle as is


def _serve(conn: Connection, worker_init: str | None, calls: _Calls) -> None:
    """Serve calls until told to stop or the web process is gone: reading its
    end of the socket at EOF, or writing to it once it is closed (the watcher
    thread ends the process then too; whichever comes first, nothing is
    printed: an exception from here would make :mod:`multiprocessing` print
    the start of a traceback)."""
    try:
        _serve_calls(conn, worker_init, calls)
    except (BrokenPipeError, ConnectionResetError):
        return


def _serve_calls(conn: Connection, worker_init: str | None, calls: _Calls) -> None:
    send = calls.send
    # A finished task's outcome waits until the next call is read when that
    # call is already here (sent ahead): both answers go out in one write.
    held: list[memoryview] = []
    arrived = select.poll()
    arrived.register(conn.fileno(), select.POLLIN)
    spec: AppSpec | None = None
    spec_version = ""
    spec_error: Exception | None = None
    started = worker_init is None
    if started:
        # Tasks are given to a worker, and their time limits count, from
        # here, not from the process start (spawn workers take a while).
        send(("ready",))
    # What the last call used (its arguments and its g): let
    # go of once its outcome is written, see run_call.
    used: list[Any] = []
    while True:
        if held and not arrived.poll(0):
            calls.write(held)
            held = []
        used.clear()
        try:
            message = decode(conn.recv_bytes())
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind != "call" and held:
            calls.write(held)
            held = []
        if kind == "stop":
            return
        if kind == "app":
            spec_version = message[1]
            try:
                spec, spec_error = loads(message[2]), None
            except Exception as exc:
                spec, spec_error = None, exc
            if not started and worker_init is not None:
                failure = _initialize(worker_init, spec, spec_error)
                if failure is not None:
                    send(("init_failed", failure))
                    return
                started = True
                send(("ready",))
            continue
        _, task_id, app_version, push_context, chunked, payload = message
        # From here on, a death of this worker is the task's; a call that was
        # given back meanwhile is dropped unread.
        taken = calls.take(task_id, held)
        held = []
        if not taken:
            del message, payload
            continue

        def publish(kind: str, data: Any, task_id: int = task_id) -> None:
            send((kind, task_id, data))

        began = time.perf_counter()
        if push_context and (spec_error is not None or app_version != spec_version):
            outcome = _error(
                spec_error or RuntimeError("the worker has no app for this task"),
                "the Flask app could not be rebuilt in the worker",
            )
        else:
            outcome = run_call(payload, spec, push_context, chunked, publish, used)
        del message, payload
        held = _outcome_parts(task_id, outcome, time.perf_counter() - began)
        del outcome
