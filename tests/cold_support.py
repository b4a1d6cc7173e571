"""Tasks for ``test_cold_start.py``: this module imports nothing of flask_executor,
so a worker that imports it to find a task imports only what it imported already."""

from __future__ import annotations

import sys


def loaded_modules() -> list[str]:
    """The modules imported in the process that runs this task."""
    return sorted(sys.modules)


_at_init: set[str] = set()


def record_modules() -> None:
    """``EXECUTOR_WORKER_INIT``: note what the worker has imported before its tasks."""
    _at_init.update(sys.modules)


def modules_since_init() -> list[str]:
    """The modules imported in this worker since :func:`record_modules` ran."""
    return sorted(set(sys.modules) - _at_init)
