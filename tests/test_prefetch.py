"""Tasks sent ahead to a busy process worker (issue 13): a worker that runs a
task already holds the next one, so it never idles a round trip between tasks.

What must not change (the fault table's semantics): a worker that dies fails
only the task it was running, and a task sent ahead that it never started runs
elsewhere; a time limit counts from the task's start; a task sent ahead can be
cancelled, and then never runs; ``max_tasks_per_child`` holds; a task waiting
behind a long one moves to a worker that goes idle. Every wait has a timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_support import getpid, identity, pid_is_alive
from flask import Flask
from process_support import MakeProcessExecutor
from support import Gates, block_until, touch, wait_for_path, wait_until

from flask_executor import Executor
from flask_executor.backends.process import PREFETCH_SECONDS
from flask_executor.errors import TaskTimeoutError

WAIT = 30.0


def pid_after_gate(started: str, gate: str) -> int:
    """Task: mark ``started``, wait for ``gate``, return this worker's pid."""
    block_until(started, gate, None)
    return os.getpid()


def pid_after_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def backend(executor: Executor) -> Any:
    """The executor's backend (started by its first submit)."""
    started = executor._app_and_state()[1].backend
    assert started is not None
    return started


def stats(executor: Executor) -> dict[str, Any]:
    return backend(executor).stats()  # type: ignore[no-any-return]


def sent_ahead(executor: Executor) -> int:
    return sum(row["sent_ahead"] for row in stats(executor)["workers"])


def running_blocked(
    app: Flask, executor: Executor, gates: Gates, tmp_path: Path, name: str
) -> tuple[Any, str]:
    """Submit a task that blocks on a gate; return it once its worker runs it."""
    started, gate = str(tmp_path / f"{name}-started"), gates.new()
    with app.app_context():
        future = executor.submit(pid_after_gate, started, gate)
    wait_for_path(started, WAIT)
    wait_until(future.running, WAIT)
    return future, gate


def one_sent_ahead(
    app: Flask, executor: Executor, gates: Gates, tmp_path: Path, fn: Any, *args: Any
) -> tuple[Any, str, Any]:
    """A task blocked on a gate, and ``fn(*args)`` sent ahead behind it on the
    same (only) worker: ``(first, its gate, second)``."""
    first, gate = running_blocked(app, executor, gates, tmp_path, "first")
    with app.app_context():
        second = executor.submit(fn, *args)
    wait_until(lambda: sent_ahead(executor) == 1, WAIT)
    return first, gate, second


def test_a_task_is_sent_ahead_to_a_busy_worker_and_runs_after(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    first, gate, second = one_sent_ahead(app, executor, gates, tmp_path, getpid)
    # Sent, but not started: neither running nor counted as busy.
    assert not second.running() and not second.done()
    assert stats(executor)["busy"] == 1 and stats(executor)["queue"] == 1
    touch(gate)
    assert second.result(WAIT) == first.result(WAIT)


def test_a_task_sent_ahead_to_a_worker_that_dies_runs_elsewhere(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    first, _, second = one_sent_ahead(app, executor, gates, tmp_path, getpid)
    dead = stats(executor)["workers"][0]["pid"]
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(Exception, match=f"pid {dead}"):
        first.result(WAIT)  # the task it ran fails...
    assert second.result(WAIT) != dead  # ...the one it never started runs on its replacement
    wait_until(lambda: not pid_is_alive(dead), WAIT)


@pytest.mark.slow
def test_the_time_limit_of_a_task_sent_ahead_counts_from_its_start(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    # Each task takes 60 % of the limit: counted from when it was sent (while the
    # first ran), the second would pass its limit.
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1, EXECUTOR_TASK_TIMEOUT=5)
    with app.app_context():
        executor.submit(getpid).result(WAIT)  # the worker is up
        futures = [executor.submit(pid_after_sleep, 3.0) for _ in range(2)]
    pids = [future.result(WAIT) for future in futures]
    assert pids[0] == pids[1]  # the same worker ran both: nothing was killed


def test_a_cancelled_task_sent_ahead_never_runs_and_its_worker_lives(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    marker = str(tmp_path / "ran")
    first, gate, second = one_sent_ahead(app, executor, gates, tmp_path, touch, marker)
    assert second.cancel()
    assert second.cancelled()
    wait_until(lambda: sent_ahead(executor) == 0, WAIT)  # given back by the worker
    touch(gate)
    pid = first.result(WAIT)
    with app.app_context():
        assert executor.submit(getpid).result(WAIT) == pid  # the same worker: not killed
    assert not os.path.exists(marker)


def test_shutdown_cancelling_futures_cancels_tasks_sent_ahead(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    marker = str(tmp_path / "ran")
    first, gate, second = one_sent_ahead(app, executor, gates, tmp_path, touch, marker)
    executor.shutdown(wait=False, cancel_futures=True)
    assert second.cancelled()
    touch(gate)
    assert first.result(WAIT) > 0
    executor.shutdown(wait=True)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
def test_a_task_cancelled_while_sent_ahead_never_starts_however_late_the_dispatcher(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    gates: Gates,
    tmp_path: Path,
    how: str,
) -> None:
    # On a loaded machine the dispatcher thread may run long after cancel()
    # returned; the task before the cancelled one may end meanwhile. The
    # dispatcher is held here (the pool's own stop-request handling waits) to
    # make that window certain: the worker must still not start the task.
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    marker = str(tmp_path / "ran")
    first, gate, second = one_sent_ahead(app, executor, gates, tmp_path, touch, marker)
    pool = backend(executor)._pool
    handle, release = pool._handle_stop_requests, threading.Event()

    def late() -> None:
        release.wait(WAIT)
        handle()

    pool._handle_stop_requests = late
    try:
        if how == "cancel":
            assert second.cancel()
        else:
            executor.shutdown(wait=False, cancel_futures=True)
        assert second.cancelled()
        touch(gate)  # the first task ends; the worker reads its next call
        ran = marker_within(marker, 2.0)
    finally:
        release.set()
    assert first.result(WAIT) > 0
    assert not ran and second.cancelled()
    executor.shutdown(wait=True)
    assert not os.path.exists(marker)


def test_shutdown_cancelling_futures_lets_a_task_its_worker_may_have_started_run(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    # A task handed to an idle worker is pending until the worker's "took"
    # is read. shutdown(cancel_futures=True) cancelled it meanwhile, and the
    # worker that had started it was killed: a started task stopped, where
    # only the unstarted are cancelled. The dispatcher is held in reading the
    # "took" here, to make that window certain.
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    with app.app_context():
        pid = executor.submit(getpid).result(WAIT)  # the worker is up and idle
    pool = backend(executor)._pool
    took, release = pool._took, threading.Event()

    def late(*args: Any) -> None:
        release.wait(WAIT)
        took(*args)

    pool._took = late
    started, gate = str(tmp_path / "started"), gates.new()
    try:
        with app.app_context():
            first = executor.submit(pid_after_gate, started, gate)
        wait_for_path(started, WAIT)
        assert not first.running()  # its "took" is held
        executor.shutdown(wait=False, cancel_futures=True)
        assert not first.cancelled()
    finally:
        release.set()
    touch(gate)
    assert first.result(WAIT) == pid  # it ran to its end, in the same worker
    executor.shutdown(wait=True)


def marker_within(path: str, seconds: float) -> bool:
    """Whether ``path`` appears within ``seconds``."""
    try:
        wait_for_path(path, seconds)
    except TimeoutError:
        return False
    return True


def test_max_tasks_per_child_counts_the_tasks_sent_ahead(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    executor = make_process_executor(
        app, None, EXECUTOR_MAX_WORKERS=1, EXECUTOR_MAX_TASKS_PER_CHILD=2
    )
    with app.app_context():
        pids = [f.result(WAIT) for f in [executor.submit(pid_after_sleep, 0.05) for _ in range(8)]]
    assert all(pids.count(pid) <= 2 for pid in pids), pids
    assert len(set(pids)) >= 4


def test_a_task_waiting_behind_a_long_one_moves_to_a_worker_that_goes_idle(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=2)
    long_one, _ = running_blocked(app, executor, gates, tmp_path, "long")
    short_one, short_gate = running_blocked(app, executor, gates, tmp_path, "short")
    with app.app_context():
        waiting = executor.submit(getpid)
    wait_until(lambda: sent_ahead(executor) == 1, WAIT)
    touch(short_gate)  # one worker goes idle; the other stays busy with the long task
    assert waiting.result(WAIT) == short_one.result(WAIT)
    assert not long_one.done()


# -- how many are sent ahead -----------------------------------------------------


def warm(app: Flask, executor: Executor, count: int = 60) -> int:
    """Run at least ``count`` trivial tasks one by one on a pool of one
    worker, until it has learned that its tasks are short (see
    :func:`learn_short`). Returns the worker's pid."""
    pids = learn_short(app, executor, count)
    assert len(pids) == 1, pids
    return pids.pop()


def learn_short(app: Flask, executor: Executor, count: int = 0, ahead: int = 12) -> set[int]:
    """Run trivial tasks one by one, at least ``count``, until the pool would
    send ``ahead`` of them ahead to a busy worker. (A worker's first task,
    which imports, counts as a long one; so does one slowed down by other
    load, such as a parallel test run: a longer task counts at once and is
    forgotten little by little.) Returns the pids that ran them."""
    deadline = time.monotonic() + WAIT
    pids = set()
    with app.app_context():
        while True:
            pids.add(executor.submit(getpid).result(WAIT))  # (the first starts the pool)
            count -= 1
            if count <= 0 and backend(executor)._pool._ahead_limit() >= ahead:
                return pids
            assert time.monotonic() < deadline, "the pool never learned its tasks are short"


def test_short_tasks_are_sent_ahead_several_at_a_time(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    warm(app, executor)
    first, gate = running_blocked(app, executor, gates, tmp_path, "first")
    with app.app_context():
        waiting = [executor.submit(getpid) for _ in range(8)]
    wait_until(lambda: sent_ahead(executor) >= 2, WAIT)
    assert stats(executor)["queue"] == 8 and not any(f.running() for f in waiting)
    touch(gate)
    pid = first.result(WAIT)
    assert [f.result(WAIT) for f in waiting] == [pid] * 8


def test_long_tasks_are_sent_ahead_one_at_a_time(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    with app.app_context():
        executor.submit(pid_after_sleep, PREFETCH_SECONDS * 3).result(WAIT)
    first, gate = running_blocked(app, executor, gates, tmp_path, "first")
    with app.app_context():
        waiting = [executor.submit(getpid) for _ in range(4)]
    wait_until(lambda: sent_ahead(executor) == 1, WAIT)
    assert stats(executor)["queue"] == 4
    touch(gate)
    assert len({f.result(WAIT) for f in [first, *waiting]}) == 1


def test_tasks_sent_ahead_to_a_worker_that_dies_all_run_on_its_replacement(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1)
    dead = warm(app, executor)
    first, _ = running_blocked(app, executor, gates, tmp_path, "first")
    with app.app_context():
        waiting = [executor.submit(getpid) for _ in range(8)]
    wait_until(lambda: sent_ahead(executor) >= 2, WAIT)
    os.kill(dead, signal.SIGKILL)
    with pytest.raises(Exception, match=f"pid {dead}"):
        first.result(WAIT)  # only the task it ran fails
    pids = {f.result(WAIT) for f in waiting}
    assert len(pids) == 1 and dead not in pids
    wait_until(lambda: not pid_is_alive(dead), WAIT)


def test_every_task_waiting_behind_a_long_one_moves_to_a_worker_that_goes_idle(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=2)
    with app.app_context():  # both workers up
        for _ in range(30):
            [f.result(WAIT) for f in [executor.submit(getpid) for _ in range(2)]]
    learn_short(app, executor)  # the pool's tasks known as short
    long_one, _ = running_blocked(app, executor, gates, tmp_path, "long")
    short_one, short_gate = running_blocked(app, executor, gates, tmp_path, "short")
    with app.app_context():
        waiting = [executor.submit(getpid) for _ in range(12)]
    wait_until(lambda: sent_ahead(executor) == 12, WAIT)
    rows = stats(executor)["workers"]
    assert all(row["sent_ahead"] >= 2 for row in rows), rows  # both got several
    touch(short_gate)  # one worker goes idle; the other stays busy with the long task
    short_pid = short_one.result(WAIT)
    assert [f.result(WAIT) for f in waiting] == [short_pid] * 12
    assert not long_one.done()


def test_bursts_of_short_tasks_each_run_once_while_workers_rebalance(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    # The end of each burst moves tasks between the workers (given back, sent
    # again, sometimes to the same worker before it read the first copy): the
    # pool must never take an answer about one copy for the other.
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=2)
    with app.app_context():
        for _ in range(100):
            futures = [executor.submit(identity, i) for i in range(300)]
            assert [f.result(WAIT) for f in futures] == list(range(300))


@pytest.mark.slow
def test_tasks_sent_ahead_to_a_worker_that_freezes_run_elsewhere_after_its_time_limit(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_process_executor(app, None, EXECUTOR_MAX_WORKERS=1, EXECUTOR_TASK_TIMEOUT=3)
    frozen = warm(app, executor)
    first, _ = running_blocked(app, executor, gates, tmp_path, "first")
    with app.app_context():
        waiting = [executor.submit(getpid) for _ in range(8)]
    wait_until(lambda: sent_ahead(executor) >= 2, WAIT)
    os.kill(frozen, signal.SIGSTOP)  # it can answer nothing now
    try:
        with pytest.raises(TaskTimeoutError):
            first.result(WAIT)
        pids = {f.result(WAIT) for f in waiting}
    finally:
        if pid_is_alive(frozen):
            os.kill(frozen, signal.SIGCONT)
    assert len(pids) == 1 and frozen not in pids
    wait_until(lambda: not pid_is_alive(frozen), WAIT)
