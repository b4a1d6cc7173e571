"""Helpers for the store tests that run in other processes (spawned, so they
import this module by name): each builds the test app on the same store URL."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from flask import Flask
from support import TIMEOUT, create_app, wait_for_path

from flask_executor import Executor, current_task


def store_app(url: str, kind: str = "thread", **config: Any) -> tuple[Flask, Executor]:
    app = create_app()
    app.config.update(EXECUTOR_TYPE=kind, EXECUTOR_STORE=url, **config)
    if kind == "process":
        app.config.update(EXECUTOR_START_METHOD="spawn", EXECUTOR_APP_FACTORY="support:create_app")
    return app, Executor(app)


def append_line(path: str, line: str = "ran") -> str:
    with open(path, "a", encoding="utf-8") as marker:
        marker.write(line + "\n")
    return line


def progress_then_wait(gate: str, value: Any) -> Any:
    current_task.update(progress=0.5, stage="half")
    wait_for_path(gate)
    current_task.update(progress=1.0)
    return value


def fail_with(message: str) -> None:
    raise LookupError(message)


def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


# -- run in a child process ---------------------------------------------------


def child_read(url: str, key: str, ready: str | None = None,
               timeout: float = TIMEOUT) -> dict[str, Any]:
    """Another process's view of ``key``: its state, meta, result or error; ``ready`` is
    created once the first state was read."""
    _, executor = store_app(url)
    futures = executor.futures
    seen: dict[str, Any] = {"contains": key in futures, "state": futures.state(key)}
    if ready is not None:
        open(ready, "w").close()
    future = futures.get(key)
    assert future is not None
    try:
        seen["result"] = future.result(timeout)
    except Exception as error:
        seen["error"] = (type(error).__name__, str(error), str(error.__cause__ or ""))
    seen["meta"] = futures.meta(key)
    seen["state_after"] = futures.state(key)
    return seen


def child_pop(url: str, key: str) -> Any:
    _, executor = store_app(url)
    future = executor.futures.pop(key)
    return None if future is None else future.result(TIMEOUT)


def child_cancel(url: str, key: str) -> bool | None:
    _, executor = store_app(url)
    return executor.futures.cancel(key)


def child_submit_race(url: str, key: str, marker: str, start_at: float, threads: int) -> list[str]:
    """``threads`` threads submit_stored ``key`` at ``start_at``; the outcomes."""
    app, executor = store_app(url)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        time.sleep(max(0.0, start_at - time.time()))
        try:
            with app.app_context():
                executor.submit_stored(key, append_line, marker)
            outcome = "accepted"
        except ValueError:
            outcome = "duplicate"
        except Exception as error:  # reported to the test, which fails on it
            outcome = f"{type(error).__name__}: {error}"
        with lock:
            outcomes.append(outcome)

    workers = [threading.Thread(target=submit) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIMEOUT)
    executor.shutdown(wait=True)
    return outcomes


def child_own_and_report(url: str, key: str, started: str) -> None:
    """Submit a long task under ``key``, mark ``started`` with our pid, then wait to be killed."""
    app, executor = store_app(url)
    with app.app_context():
        executor.submit_stored(key, sleep_then, 300, "never")
    with open(started + ".tmp", "w", encoding="utf-8") as out:
        out.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    time.sleep(120)
