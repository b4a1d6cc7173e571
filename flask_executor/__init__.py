"""Background tasks for Flask in threads, processes or a Dask cluster, with
the Flask context (``current_app``, ``request``, ``g``, ``session``) carried
into every task. A drop-in successor of Flask-Executor 1.0.

The public names are imported on first use (:pep:`562`): a process that
imports only part of the package, such as the fork server of a process pool
preloading :mod:`flask_executor.backends._worker`, does not import the
extension front (``executor``, ``jobs``, ``status``, ...) it never runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

#: The public names not imported above, and the module each comes from.
_LAZY = {
    "Executor": "executor",
    "ExecutorJob": "jobs",
    "FutureCollection": "futures",
    "FutureProxy": "futures",
    "current_task": "tasks",
}
#: Submodules that ``import flask_executor`` made attributes of the package
#: before the names above were lazy (``flask_executor.futures.FutureCollection``
#: after a bare ``import flask_executor``, as in 1.0): still reachable so.
_SUBMODULES = frozenset(
    {
        "appspec", "backends", "executor", "futures", "jobs", "serialize", "settings",
        "signals", "snapshot", "status", "stores", "tasks", "tracing",
    }
)  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found by plain lookup from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
