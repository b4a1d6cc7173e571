"""Jobs: functions decorated with :meth:`Executor.job
<flask_executor.Executor.job>`, and their per-job options (retries with
backoff, a time limit)."""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from .serialize import import_object, register_reducer
from .tasks import _current_task

if TYPE_CHECKING:
    from .executor import Executor
    from .futures import FutureProxy

__all__ = ["ExecutorJob"]

P = ParamSpec("P")
T = TypeVar("T")


class ExecutorJob(Generic[P, T]):
    """A function decorated with :meth:`Executor.job <flask_executor.Executor.job>`.

    Calling the job runs the function inline (so recursive jobs work);
    :meth:`submit`, :meth:`submit_stored` and :meth:`map` run it on the
    executor. It keeps the function's name and docstring, and pickles by
    reference to its module, so jobs work with process and Dask backends.

    :param retries: run again up to this many times when the function raises
        one of ``retry_on``, waiting ``backoff * 2 ** (attempt - 1)`` seconds
        plus up to half as much again (jitter) in between; the attempt number is in ``future.meta``;
        when attempts run out the last exception is raised.
    :param timeout: this job's ``EXECUTOR_TASK_TIMEOUT``, in seconds.

    .. versionchanged:: 2.0
        Works with process workers; ``retries``, ``retry_on``, ``backoff``
        and ``timeout``.
    """

    def __init__(
        self,
        executor: Executor,
        fn: Callable[P, T],
        *,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        if retries < 0 or backoff < 0 or (timeout is not None and timeout <= 0):
            raise ValueError(
                f"job {getattr(fn, '__qualname__', fn)!r}: retries and backoff must be >= 0"
                " and timeout > 0"
            )
        self.executor = executor
        self.fn = fn
        self.retries = retries
        self.retry_on = tuple(retry_on)
        self.backoff = backoff
        self.timeout = timeout
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.fn(*args, **kwargs)

    def _task(self) -> Callable[..., T]:
        """What workers run: the job itself, or the job behind retries."""
        if not self.retries:
            return self
        return _Retrying(self, self.retries, self.retry_on, self.backoff)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> FutureProxy[T]:
        """Submit the job; see :meth:`Executor.submit <flask_executor.Executor.submit>`."""
        return self.executor._submit(self._task(), args, kwargs, timeout=self.timeout)

    def submit_stored(
        self, future_key: Hashable, *args: P.args, **kwargs: P.kwargs
    ) -> FutureProxy[T]:
        """Submit the job and store its future; see :meth:`Executor.submit_stored
        <flask_executor.Executor.submit_stored>`."""
        return self.executor._submit(
            self._task(), args, kwargs, future_key, store=True, timeout=self.timeout
        )

    def map(
        self, *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[T]:
        """Map the job over ``iterables``; see :meth:`Executor.map
        <flask_executor.Executor.map>`."""
        return self.executor._map(self._task(), iterables, timeout, chunksize, self.timeout)

    def __reduce__(self) -> tuple[Any, ...]:
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", "")
        if module and module != "__main__" and "<locals>" not in qualname:
            return (import_object, (module, qualname))
        return (_InlineJob, (self.fn,))


def _job_reduce_for_processes(job: ExecutorJob[Any, Any]) -> tuple[Any, ...]:
    """Process workers run the web process's main script as ``__main__``:
    a job defined there travels by reference, like a plain function."""
    qualname = getattr(job.fn, "__qualname__", "")
    if getattr(job.fn, "__module__", None) == "__main__" and "<locals>" not in qualname:
        return (import_object, ("__main__", qualname))
    return job.__reduce__()


register_reducer(ExecutorJob, _job_reduce_for_processes, main_by_reference=True)


class _InlineJob:
    """A job as seen inside a worker: calling it runs the function inline."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class _Retrying:
    """Runs a job up to ``retries + 1`` times, in the worker."""

    def __init__(
        self,
        job: Callable[..., Any],
        retries: int,
        retry_on: tuple[type[BaseException], ...],
        backoff: float,
    ) -> None:
        self.job = job
        self.retries = retries
        self.retry_on = retry_on
        self.backoff = backoff

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = _current_task.get(None)
        for attempt in range(1, self.retries + 2):
            if handle is not None:
                handle.update(attempt=attempt)
            try:
                return self.job(*args, **kwargs)
            except self.retry_on:
                if attempt > self.retries:
                    raise
                # At least the base delay, plus up to half of it as jitter.
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * random.uniform(1.0, 1.5))
        raise AssertionError("unreachable")  # pragma: no cover
