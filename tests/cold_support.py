"""Tasks for ``test_cold_start.py``: this module imports nothing of flask_executor,
so a worker that imports it to find a task imports only what it imported already."""

from __future__ import annotations

import sys


def loaded_modules() -> list[str]:
    """The modules imported in the process that runs this task."""
    return sorted(sys.modules)
