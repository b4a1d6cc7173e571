"""A module-level ``Executor`` and ``@executor.job`` functions, the way an application
declares them before it has an app (``executor = Executor()``; ``init_app`` later).

Process workers import this module by reference to run the jobs, so it must stay free of
side effects beyond defining them. Tests call ``executor.init_app(app)`` on their own app
and shut the executor down when they end.
"""

from __future__ import annotations

import time

from flask import current_app

from flask_executor import Executor

executor = Executor()


@executor.job
def fib(n: int) -> int:
    """Fibonacci numbers, recursively: the job calls itself inline."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


@executor.job
def square_plus_offset(i: int) -> int:
    """``i * i + config['JOB_OFFSET']``; early items finish last, so order is tested."""
    time.sleep(0.002 * (9 - i % 10))
    offset: int = current_app.config["JOB_OFFSET"]
    return i * i + offset
