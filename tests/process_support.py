"""Process-pool test helpers shared by the process test modules (the fixtures that use
them, ``start_method`` and ``make_process_executor``, are in ``conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask_executor import Executor

START_METHODS = ["fork", "forkserver", "spawn"]

MakeProcessExecutor = Callable[..., Executor]


def process_config(start_method: str | None, **config: Any) -> dict[str, Any]:
    """The config of a two-worker process pool; ``start_method=None`` keeps the default."""
    values: dict[str, Any] = {"EXECUTOR_TYPE": "process", "EXECUTOR_MAX_WORKERS": 2}
    if start_method is not None:
        values["EXECUTOR_START_METHOD"] = start_method
    values.update(config)
    return values
