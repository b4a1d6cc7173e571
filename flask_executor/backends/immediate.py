"""Immediate backend (``EXECUTOR_TYPE = 'immediate'``): each task runs in the
submitting thread, inside :meth:`~flask_executor.Executor.submit`, and the
future it returns is already done. It is meant for tests, in the manner of
Celery's ``task_always_eager`` or Huey's ``immediate`` mode.

How work flows::

    submit() ── immediate: the thread task closure ──────────┐ (the same closure
    (caller)    immediate + EXECUTOR_IMMEDIATE_PICKLE:       │  a thread worker runs)
                payload ─▶ run_call() as in a process worker ┤ (pickled call, context
                                                             │  rebuilt from the snapshot)
    FutureProxy ◀── result / exception ◀─────────────────────┘

Either way the task runs in a fresh :mod:`contextvars` context, as a new
thread or a process worker would: it never sees the caller's pushed contexts,
only the copy it was given. Time limits cannot stop a call in the caller's
own thread; a task that ran past one fails with
:exc:`~flask_executor.TaskTimeoutError` once it returns, as it would have.
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Callable
from typing import Any

from ..errors import TaskTimeoutError
from ..futures import FutureProxy
from ..serialize import loads
from . import Backend, BackendOptions, PickledTask, complete
from ._worker import rebuild_outcome, run_call

__all__ = ["ImmediateBackend", "PicklingImmediateBackend"]


class ImmediateBackend(Backend):
    """Runs thread-task closures at once, in the submitting thread."""

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._shutdown = False

    def submit(self, future: FutureProxy[Any], task: Any) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not future.set_running_or_notify_cancel():
            return
        timeout = future._task_timeout or self.options.task_timeout
        call = functools.partial(_within_limit, self._call(future, task), timeout)
        try:
            contextvars.Context().run(complete, future, call)
        except SystemExit:
            pass  # the future holds it; in a pool only the worker thread would have ended

    def _call(self, future: FutureProxy[Any], task: Any) -> Callable[[], Any]:
        """What runs for ``task``: a thread task is already a closure."""
        return task  # type: ignore[no-any-return]

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        self._shutdown = True  # nothing runs in the background: nothing to wait for


def _within_limit(call: Callable[[], Any], timeout: float | None) -> Any:
    """``call()``; past ``timeout`` it fails as a pool task would have (the
    call cannot be stopped in the caller's own thread, so it ran to its end)."""
    started = time.monotonic()
    try:
        result = call()
    except Exception:
        if not timeout or time.monotonic() - started <= timeout:
            raise
    else:
        if not timeout or time.monotonic() - started <= timeout:
            return result
    raise TaskTimeoutError(
        f"task ran past its time limit ({timeout:g} s: EXECUTOR_TASK_TIMEOUT or the"
        " job's timeout); in immediate mode it could not be stopped and ran to its end"
    )


class PicklingImmediateBackend(ImmediateBackend):
    """``EXECUTOR_IMMEDIATE_PICKLE = True``: the process path, in the
    submitting thread. The call and its snapshot are pickled in ``submit()``
    (so an unpicklable argument fails there, as with processes), then
    unpickled and run by the process worker's own
    :func:`~flask_executor.backends._worker.run_call`, in an app rebuilt from
    the app spec as a ``spawn`` or ``forkserver`` worker builds it (from
    ``EXECUTOR_APP_FACTORY``, or a stand-in with the app's routes and
    config), never the live app object."""

    pickles = True
    # Like process workers, which import the web process's main module.
    by_value_main = False

    def _call(self, future: FutureProxy[Any], task: PickledTask) -> Callable[[], Any]:
        def publish(kind: str, data: Any) -> None:
            # Log records ("log") were already handled by this process's loggers.
            if kind == "meta":
                future._merge_meta(data)

        def call() -> Any:
            spec = None
            if task.push_context:
                # Worker apps are cached by the app's token; a token of our own
                # keeps the live app from being found there and reconfigured.
                spec = loads(task.app_spec)  # this call's own copy
                spec.token = f"immediate-{spec.token}"
            outcome = run_call(task.payload, spec, task.push_context, task.chunked, publish)
            ok, value = rebuild_outcome(outcome)
            if not ok:
                raise value
            return value

        return call
