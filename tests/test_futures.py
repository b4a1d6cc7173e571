"""FutureCollection on its own: the 1.0 behaviour plus thread safety."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import pytest
from support import TIMEOUT

from flask_executor import FutureCollection


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _run_threads(count: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)


def test_default_max_length() -> None:
    assert FutureCollection().max_length == 50


def test_add_pop_contains_len() -> None:
    futures = FutureCollection(max_length=10)
    first, second = _done(1), Future[int]()
    futures.add("first", first)
    futures.add(("tuple", "key"), second)
    assert len(futures) == 2
    assert "first" in futures
    assert ("tuple", "key") in futures
    assert first in futures
    assert second in futures
    assert _done(1) not in futures
    assert "other" not in futures
    assert futures.pop("first") is first
    assert futures.pop("first") is None
    assert first not in futures
    assert "first" not in futures
    assert len(futures) == 1


def test_duplicate_key_raises_and_keeps_first() -> None:
    futures = FutureCollection()
    first = _done(1)
    futures.add("key", first)
    with pytest.raises(ValueError):
        futures.add("key", _done(2))
    assert len(futures) == 1
    assert futures.pop("key") is first


def test_future_methods_and_attributes_by_key() -> None:
    futures = FutureCollection()
    pending: Future[int] = Future()
    futures.add("done", _done("value"))
    futures.add("pending", pending)
    assert futures.done("done") is True
    assert futures.result("done") == "value"
    assert futures.result("done", timeout=TIMEOUT) == "value"
    assert futures._state("done") == "FINISHED"
    assert futures.done("pending") is False
    assert futures.running("pending") is False
    assert futures._state("pending") == "PENDING"
    assert futures.cancel("pending") is True
    assert futures.cancelled("pending") is True
    for name in ("done", "running", "result", "exception", "cancel", "_state"):
        assert getattr(futures, name)("missing") is None


def test_oldest_dropped_past_max_length() -> None:
    futures = FutureCollection(max_length=3)
    for i in range(5):
        futures.add(i, _done(i))
    assert len(futures) == 3
    assert [i in futures for i in range(5)] == [False, False, True, True, True]
    assert futures.result(4) == 4


def test_concurrent_adds_are_all_kept() -> None:
    futures = FutureCollection(max_length=100_000)
    start = threading.Barrier(8, timeout=TIMEOUT)

    def add_many(thread: int) -> None:
        start.wait()
        for i in range(500):
            futures.add((thread, i), _done(i))

    _run_threads(8, add_many)
    assert len(futures) == 8 * 500
    assert all((t, i) in futures for t in range(8) for i in range(500))


def test_concurrent_adds_respect_max_length() -> None:
    futures = FutureCollection(max_length=100)
    start = threading.Barrier(8, timeout=TIMEOUT)

    def add_many(thread: int) -> None:
        start.wait()
        for i in range(500):
            futures.add((thread, i), _done(i))

    _run_threads(8, add_many)
    assert len(futures) == 100


def _race_duplicate_adds() -> tuple[list[str], int]:
    """Eight threads add different futures under one key at the same moment."""
    futures = FutureCollection()
    start = threading.Barrier(8, timeout=TIMEOUT)
    outcomes: list[str] = []
    lock = threading.Lock()
    candidates = [_done(i) for i in range(8)]

    def add_same(thread: int) -> None:
        start.wait()
        try:
            futures.add("same", candidates[thread])
            outcome = "added"
        except ValueError:
            outcome = "duplicate"
        with lock:
            outcomes.append(outcome)

    _run_threads(8, add_same)
    return sorted(outcomes), len(futures)


def test_concurrent_duplicate_adds_only_one_wins() -> None:
    for round_ in range(100):
        outcomes, length = _race_duplicate_adds()
        assert outcomes == ["added"] + ["duplicate"] * 7, f"round {round_}"
        assert length == 1


def test_concurrent_pops_return_future_once() -> None:
    futures = FutureCollection()
    stored = _done("once")
    futures.add("key", stored)
    start = threading.Barrier(8, timeout=TIMEOUT)
    popped: list[Any] = []
    lock = threading.Lock()

    def pop(thread: int) -> None:
        start.wait()
        result = futures.pop("key")
        with lock:
            popped.append(result)

    _run_threads(8, pop)
    assert [p for p in popped if p is not None] == [stored]


def test_state_names_match_the_status_endpoint() -> None:
    futures = FutureCollection()
    pending: Future[int] = Future()
    running: Future[int] = Future()
    running.set_running_or_notify_cancel()
    cancelled: Future[int] = Future()
    cancelled.cancel()
    failed: Future[int] = Future()
    failed.set_exception(ValueError("no"))
    for key, future in [("pending", pending), ("running", running), ("finished", _done(1)),
                        ("failed", failed), ("cancelled", cancelled)]:
        futures.add(key, future)
        assert futures.state(key) == key
    with pytest.raises(KeyError):
        futures.state("missing")


def test_memory_store_records_when_a_task_started_and_finished(
    app: Any, make_thread_executor: Any, gates: Any
) -> None:
    """The dashboard and `flask executor show` read start times from the record,
    with the default memory store too."""
    from support import block_until, touch, wait_for_path, wait_until

    executor = make_thread_executor(app)
    started, gate = gates.new(), gates.new()
    with app.app_context():
        future = executor.submit_stored("job", block_until, started, gate, "done")
    wait_for_path(started)
    wait_until(lambda: executor.futures.record("job").started_at is not None)
    touch(gate)
    assert future.result(timeout=TIMEOUT) == "done"
    wait_until(lambda: executor.futures.record("job").finished_at is not None)
    record = executor.futures.record("job")
    assert record.submitted_at <= record.started_at <= record.finished_at
