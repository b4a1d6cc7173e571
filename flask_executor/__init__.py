"""Background tasks for Flask in threads, processes or a Dask cluster, with
the Flask context (``current_app``, ``request``, ``g``, ``session``) carried
into every task. A drop-in successor of Flask-Executor 1.0."""

from __future__ import annotations

from .errors import (
    BodyNotCapturedError,
    ConfigKeyNotCopiedError,
    GAttributeNotCopiedError,
    SerializationError,
    ShutdownTimeoutError,
    TaskLostError,
    TaskTimeoutError,
    TerminatedWorkerError,
)
from .executor import Executor
from .futures import FutureCollection, FutureProxy
from .jobs import ExecutorJob
from .tasks import current_task

__version__ = "2.0.0.dev0"

__all__ = [
    "BodyNotCapturedError",
    "ConfigKeyNotCopiedError",
    "Executor",
    "ExecutorJob",
    "FutureCollection",
    "FutureProxy",
    "GAttributeNotCopiedError",
    "SerializationError",
    "ShutdownTimeoutError",
    "TaskTimeoutError",
    "TerminatedWorkerError",
    "current_task",
    "TaskLostError",
]
