"""Checked by mypy (``mypy --strict``), never run: ``submit`` and jobs are typed so the
future's result type follows from the callable, and wrong arguments are type errors.

Each line that must be an error carries a precise ``# type: ignore[code]``; with
``warn_unused_ignores`` (part of ``--strict``), an ignore that is no longer needed,
because the typing stopped catching the error, fails the check.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from flask_executor import Executor, ExecutorJob, FutureProxy, current_task

executor = Executor()


def returns_int(x: int) -> int:
    return x


def keyword_only(x: int, *, label: str) -> str:
    return f"{label}{x}"


def check() -> None:
    future: concurrent.futures.Future[int] = executor.submit(returns_int, 1)
    fp: FutureProxy[int] = executor.submit(returns_int, 1)
    result: int = fp.result()
    meta: dict[str, Any] = fp.meta
    stored: FutureProxy[int] = executor.submit_stored("key", returns_int, 1)
    labelled: FutureProxy[str] = executor.submit(keyword_only, 1, label="n")

    job = executor.job(returns_int)
    jf: FutureProxy[int] = job.submit(1)
    inline: int = job(2)
    js: FutureProxy[int] = job.submit_stored("job-key", 1)
    plain: ExecutorJob[[int], int] = job

    retried = executor.job(retries=3, retry_on=(ConnectionError,), backoff=0.01, timeout=10)(
        returns_int
    )
    rf: FutureProxy[int] = retried.submit(1)

    current_task.update(progress=0.4, stage="render")
    task_meta: dict[str, Any] = current_task.meta

    # Each of these must be a type error.
    executor.submit(returns_int, "x")  # type: ignore[arg-type]
    executor.submit(returns_int)  # type: ignore[call-arg]
    executor.submit(returns_int, 1, 2)  # type: ignore[call-arg]
    executor.submit(keyword_only, 1, label=2)  # type: ignore[arg-type]
    # mypy infers T from the declared type, so the callable is the mismatch.
    s: FutureProxy[str] = executor.submit(returns_int, 1)  # type: ignore[arg-type]
    job.submit("x")  # type: ignore[arg-type]
    job.submit()  # type: ignore[call-arg]
    retried.submit("x")  # type: ignore[arg-type]
    bad_stored: FutureProxy[str] = job.submit_stored("k", 1)  # type: ignore[assignment]

    print(future, result, meta, stored, labelled, jf, inline, js, plain, rf, task_meta, s)
    print(bad_stored)
