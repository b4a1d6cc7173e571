"""Backends run tasks; the :class:`~flask_executor.Executor` front decides what
a task is. They share one small interface, :class:`Backend`: a thread backend
receives ready-to-call closures, a process or cluster backend receives one
pickled payload (``pickles = True``). Each completes the
:class:`~flask_executor.futures.FutureProxy` it is given.
"""

from __future__ import annotations

import atexit
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from typing import Any

from ..futures import FutureProxy

__all__ = ["Backend", "BackendOptions", "PickledTask"]


@dataclass(frozen=True)
class BackendOptions:
    """The config an executor resolved for one app."""

    max_workers: int | None
    task_timeout: float | None
    start_method: str | None = None
    max_tasks_per_child: int | None = None
    dask_address: str | None = None
    dask_security: Any = None


@dataclass
class PickledTask:
    """A task for a backend that pickles: the call and the app it needs."""

    #: ``(fn, args, kwargs, snapshot)`` pickled by :func:`~flask_executor.serialize.dumps_call`.
    payload: bytes
    #: Version and pickled :class:`~flask_executor.appspec.AppSpec`; workers
    #: receive the spec only when their version differs.
    app_version: str
    app_spec: bytes
    #: Run the call inside a rebuilt Flask context.
    push_context: bool
    #: ``args`` is ``(items,)``: call ``fn(*item)`` for each, each in its own context.
    chunked: bool = False


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
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; see :meth:`concurrent.futures.Executor.shutdown`."""

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


_live: weakref.WeakSet[Backend] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    """Finish submitted work when the interpreter exits without an explicit
    ``shutdown()``; nothing submitted is lost."""
    for backend in list(_live):
        backend.shutdown(wait=True)


def create_backend(kind: str, options: BackendOptions) -> Backend:
    """The backend for ``EXECUTOR_TYPE`` ``kind``."""
    if kind == "thread":
        from .thread import ThreadBackend

        return ThreadBackend(options)
    if kind == "process":
        from .process import ProcessBackend

        return ProcessBackend(options)
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
    future: FutureProxy[Any], result: Any = None, exception: BaseException | None = None
) -> bool:
    """Complete ``future`` unless it already is; ``False`` if it was."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False
    return True
