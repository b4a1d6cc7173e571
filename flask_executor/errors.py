"""Exception types raised by flask-executor.

Each one subclasses the standard exception it refines, so ``except`` clauses
written against :mod:`concurrent.futures` (or plain ``TypeError`` /
``AttributeError``) keep working.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import sys
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "BodyNotCapturedError",
    "ConfigKeyNotCopiedError",
    "GAttributeNotCopiedError",
    "SerializationError",
    "ShutdownTimeoutError",
    "TaskTimeoutError",
    "TerminatedWorkerError",
    "TaskLostError",
    "StoreUnavailableError",
    "StoreSignatureError",
]


class SerializationError(TypeError, pickle.PicklingError):
    """A callable, argument, return value or exception could not be pickled,
    or could not be rebuilt on the other side.

    It is a :exc:`TypeError` (what ``pickle`` raises for most unpicklable
    objects) and a :exc:`pickle.PicklingError` (what code written for the
    standard library's pools catches).

    :meth:`Executor.submit` raises it for the callable and its arguments, so
    nothing unpicklable ever reaches a pool; for return values and exceptions
    it becomes the task's own error. The message names the culprit, e.g.
    ``args[0]: _thread.lock``.
    """


class TerminatedWorkerError(BrokenProcessPool):
    """The worker process running the task died (exit, signal, segfault).

    Only the task that was running fails; the pool starts a replacement
    worker and keeps going. The message names the exit code or signal.
    """


if sys.version_info >= (3, 11):  # concurrent.futures.TimeoutError is TimeoutError

    class TaskTimeoutError(TimeoutError):
        """The task ran past ``EXECUTOR_TASK_TIMEOUT``.

        Process tasks are killed; threads cannot be killed, so a thread task
        keeps running in the background while its future fails.
        """

else:  # pragma: no cover - Python 3.10

    class TaskTimeoutError(concurrent.futures.TimeoutError, TimeoutError):
        """The task ran past ``EXECUTOR_TASK_TIMEOUT``.

        Process tasks are killed; threads cannot be killed, so a thread task
        keeps running in the background while its future fails.
        """


class BodyNotCapturedError(RuntimeError):
    """The task read a request body that was not carried into it.

    Bodies larger than ``EXECUTOR_SNAPSHOT_MAX_BODY`` are not copied, and a
    body the view consumed by reading ``request.stream`` cannot be copied.
    Pass what the task needs as an argument instead.
    """


class GAttributeNotCopiedError(AttributeError):
    """The task read a :data:`flask.g` attribute that was left out of its
    snapshot because it could not be copied or pickled (a connection, a lock).

    ``"name" in g`` is false for such attributes, so the usual
    ``if "db" not in g: g.db = connect()`` opens a fresh resource in the task.
    """


class TaskLostError(concurrent.futures.BrokenExecutor):
    """The process that owned a stored task died before the task finished
    (SIGKILL, OOM, a server's worker timeout or recycling).

    Readers in every other process see the task failed with this error once
    the owner is known dead (same host, pid gone) or its heartbeat in the
    shared store is older than a bound. The message names the owner's host
    name and pid.

    .. versionadded:: 2.0
    """


class StoreUnavailableError(ConnectionError):
    """The task store (``EXECUTOR_STORE``) could not be reached or used. The
    message names the store's URL without its password.

    .. versionadded:: 2.0
    """


class StoreSignatureError(ValueError):
    """A stored result or exception failed its signature check, so it was not
    unpickled: it was written by someone without this app's ``SECRET_KEY``, or
    the key changed.

    .. versionadded:: 2.0
    """


class ShutdownTimeoutError(TaskTimeoutError):
    """The task was still running when :meth:`Executor.shutdown` (or the
    interpreter's exit) stopped waiting, after ``EXECUTOR_SHUTDOWN_TIMEOUT``
    seconds.

    Process workers are stopped; a thread or Dask task cannot be interrupted
    and its eventual result is dropped. Tasks that had not started by then are
    cancelled instead.
    """


class ConfigKeyNotCopiedError(KeyError):
    """A task in a process or Dask worker read a config key that was not sent
    to its worker: excluded by ``EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE``, a secret
    kept from Dask workers (see ``EXECUTOR_SNAPSHOT_CONFIG_INCLUDE``), or a
    value that cannot be pickled. The message names the key and the setting
    to change. ``config.get(key)`` still returns its default.
    """

    def __str__(self) -> str:  # KeyError's own str() is the repr of its argument
        return str(self.args[0]) if self.args else ""
