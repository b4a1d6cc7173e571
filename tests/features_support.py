"""Task functions and a module-level ``Executor`` with jobs for ``test_features``.

Process and Dask workers import this module by reference to run the functions, so it
defines them and nothing else. Attempts and timestamps are counted in files, which
work across threads and processes alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flask import current_app
from support import block_until, wait_for_path

from flask_executor import Executor, current_task

executor = Executor()


# -- current_task -----------------------------------------------------------------


def report_progress(go: str, gate: str) -> dict[str, Any]:
    """Wait for ``go``; set ``progress=0.5``; wait for ``gate``; set more fields.

    Returns the task's own view of its meta (``current_task.meta``) taken before the
    last update, so the test can tell updates are merged.
    """
    wait_for_path(go)
    current_task.update(progress=0.5)
    wait_for_path(gate)
    current_task.update(stage="render", items=[1, 2], info={"page": 3})
    seen = current_task.meta
    current_task.update(progress=1.0)
    return seen


def meta_at_start_then_update(value: int) -> dict[str, Any]:
    """The meta a fresh task starts with, then an update of its own."""
    seen = current_task.meta
    current_task.update(value=value)
    return seen


def meta_is_a_copy() -> tuple[dict[str, Any], dict[str, Any]]:
    current_task.update(a=1)
    first = current_task.meta
    first["b"] = 2
    return first, current_task.meta


# -- plain tasks --------------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> int:
    raise ValueError(message)


def unserialisable_result() -> set[int]:
    return {1, 2, 3}


def update_then_block(started: str, gate: str, value: Any) -> Any:
    current_task.update(progress=0.25, stage="download")
    return block_until(started, gate, value)


# -- logging ------------------------------------------------------------------------


def log_messages(token: str) -> str:
    """Log one record through the app's logger and one through a named logger."""
    current_app.logger.warning("app logger %s", token)
    logging.getLogger("myapp.tasks").warning("named logger %s", token)
    return token


# -- jobs with per-job options ------------------------------------------------------


def _count_attempt(counter: str) -> int:
    """Append this attempt's time to ``counter``; return the attempt's number."""
    with open(counter, "a", encoding="utf-8") as file:
        file.write(f"{time.time()!r}\n")
    return len(Path(counter).read_text(encoding="utf-8").splitlines())


def attempt_times(counter: str) -> list[float]:
    return [float(line) for line in Path(counter).read_text(encoding="utf-8").splitlines()]


@executor.job
def plain_job(x: int) -> int:
    """A job without options, next to the ones with options."""
    return x * 2


@executor.job
def plain_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


@executor.job(retries=3, retry_on=(ConnectionError,), backoff=0.01, timeout=10)
def flaky(counter: str, failures: int) -> str:
    """Fail with ``ConnectionError`` on the first ``failures`` attempts."""
    attempt = _count_attempt(counter)
    if attempt <= failures:
        raise ConnectionError(f"attempt {attempt}")
    return f"ok on attempt {attempt}"


@executor.job(retries=3, retry_on=(ConnectionError,), backoff=0.01)
def wrong_error(counter: str) -> str:
    attempt = _count_attempt(counter)
    raise ValueError(f"attempt {attempt}")


@executor.job(retries=3, retry_on=(ConnectionError,), backoff=0.05)
def always_down(counter: str) -> str:
    attempt = _count_attempt(counter)
    raise ConnectionError(f"attempt {attempt}")


@executor.job(timeout=0.5)
def too_slow(started: str, gate: str) -> str:
    """Runs past its own time limit of 0.5 s (the executor's is unset)."""
    result: str = block_until(started, gate, "too late")
    return result
