"""The task store behind ``executor.futures``: the same contract for every store."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import TIMEOUT

from flask_executor import Executor


def _count_run(path: str) -> int:
    with open(path, "a", encoding="utf-8") as marker:
        marker.write("ran\n")
    return 1


def test_memory_store_dedup_is_atomic(
    app: Any, make_thread_executor: Callable[..., Executor], tmp_path: Path
) -> None:
    """32 threads submit_stored one key at the same moment: exactly one task runs."""
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=4)
    marker = tmp_path / "runs"
    start = threading.Barrier(32, timeout=TIMEOUT)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit(_: int) -> None:
        start.wait()
        try:
            with app.app_context():
                executor.submit_stored("same", _count_run, str(marker))
            outcome = "accepted"
        except ValueError:
            outcome = "duplicate"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(outcomes) == ["accepted"] + ["duplicate"] * 31
    assert executor.futures.result("same", timeout=TIMEOUT) == 1
    executor.shutdown(wait=True)
    assert marker.read_text().splitlines() == ["ran"]
