"""Reliability of the pools: workers killed from outside, task timeouts, cancelling
running tasks, worker recycling, uploads as arguments, many threads submitting at once,
interpreter exit without shutdown, and shutdown itself.

Process tests run on ``fork`` (cheap) and ``forkserver`` (the default) where a second
start method is cheap; ``spawn`` is covered by ``test_faults``. Every wait has a timeout.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    describe_file,
    describe_file_after,
    getpid,
    identity,
    pid_is_alive,
    pid_then_block,
    pid_then_sleep,
    read_pid,
    rendezvous,
    square,
    whoami,
)
from flask import Flask, g, request
from support import Gates, block_until, touch, wait_for_path, wait_until
from werkzeug.datastructures import FileStorage

from flask_executor import Executor, TaskTimeoutError, TerminatedWorkerError

MakeExecutor = Callable[..., Executor]

#: Seconds any future in this module may take (the global per-test timeout is 60 s).
WAIT = 30

ROOT = Path(__file__).resolve().parent.parent

PROCESS = ["process-fork", "process-forkserver"]


def blocked_pool(
    executor: Executor, tmp_path: Path, gates: Gates, name: str = "blocker"
) -> tuple[concurrent.futures.Future[Any], str]:
    """Occupy a worker with a task that waits for a gate; return its future and gate."""
    started, gate = str(tmp_path / f"{name}-started"), gates.new()
    future = executor.submit(block_until, started, gate, name)
    wait_for_path(started)
    return future, gate


# -- a worker killed from outside ---------------------------------------------------


@pytest.mark.parametrize("executor_type", PROCESS)
def test_worker_killed_from_outside(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2)
    before, gate = blocked_pool(executor, tmp_path, gates, "before")
    pid_file = str(tmp_path / "victim.pid")
    victim = executor.submit(pid_then_sleep, pid_file, 30)
    after = executor.submit(square, 7)  # queued: both workers are busy
    victim_pid = read_pid(pid_file)

    os.kill(victim_pid, signal.SIGKILL)

    exc = victim.exception(timeout=WAIT)
    assert type(exc) is TerminatedWorkerError, repr(exc)
    assert "SIGKILL" in str(exc)
    assert str(victim_pid) in str(exc)
    # The other worker is still blocked, so `after` ran on a replacement worker.
    assert after.result(timeout=WAIT) == 49
    assert not before.done()
    touch(gate)
    assert before.result(timeout=WAIT) == "before"
    assert executor.submit(square, 3).result(timeout=WAIT) == 9
    # Two live workers at once, neither of them the one that was killed.
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    both = [executor.submit(rendezvous, str(meeting), str(i), 2) for i in range(2)]
    pids = {f.result(timeout=WAIT) for f in both}
    assert len(pids) == 2
    assert victim_pid not in pids


# -- EXECUTOR_TASK_TIMEOUT ------------------------------------------------------------


@pytest.mark.parametrize("executor_type", PROCESS)
def test_process_task_timeout_kills_worker(
    app: Flask, make_executor: MakeExecutor, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1, EXECUTOR_TASK_TIMEOUT=1)
    pid_file = str(tmp_path / "sleeper.pid")
    start = time.monotonic()
    sleeper = executor.submit(pid_then_sleep, pid_file, 30)
    queued = [executor.submit(getpid) for _ in range(3)]

    exc = sleeper.exception(timeout=WAIT)
    elapsed = time.monotonic() - start
    assert isinstance(exc, TaskTimeoutError), repr(exc)
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, concurrent.futures.TimeoutError)
    assert "EXECUTOR_TASK_TIMEOUT" in str(exc)
    assert elapsed < 5, f"the timeout took {elapsed:.1f} s"
    sleeper_pid = read_pid(pid_file)
    wait_until(lambda: not pid_is_alive(sleeper_pid), timeout=5)
    # The queued tasks run, on a replacement worker.
    pids = {f.result(timeout=WAIT) for f in queued}
    assert len(pids) == 1
    assert sleeper_pid not in pids


@pytest.mark.parametrize("executor_type", ["thread"])
def test_thread_task_timeout_fails_future(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_TASK_TIMEOUT=1)
    started, gate = str(tmp_path / "started"), gates.new()
    start = time.monotonic()
    future = executor.submit(block_until, started, gate, "too late")

    exc = future.exception(timeout=WAIT)
    elapsed = time.monotonic() - start
    assert isinstance(exc, TaskTimeoutError), repr(exc)
    assert isinstance(exc, TimeoutError)
    assert 0.9 <= elapsed < 3, f"the timeout took {elapsed:.1f} s"
    # The thread cannot be stopped: it runs on, and its late result is dropped.
    touch(gate)
    executor.shutdown(wait=True)
    assert future.exception(timeout=0) is exc


# -- cancel -------------------------------------------------------------------------


@pytest.mark.parametrize("executor_type", ["thread", "process-fork"])
def test_cancel_pending_task(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    blocker, gate = blocked_pool(executor, tmp_path, gates)
    marker = tmp_path / "ran"
    pending = executor.submit(touch, str(marker))

    assert pending.cancel() is True
    assert pending.cancelled()
    touch(gate)
    assert blocker.result(timeout=WAIT) == "blocker"
    assert executor.submit(square, 5).result(timeout=WAIT) == 25  # FIFO: after `pending`
    assert not marker.exists()
    with pytest.raises(CancelledError):
        pending.result(timeout=0)


@pytest.mark.parametrize("executor_type", ["thread", "process-fork"])
def test_cancel_stored_future_by_key(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    blocker, gate = blocked_pool(executor, tmp_path, gates)
    marker = tmp_path / "ran"
    executor.submit_stored("job", touch, str(marker))

    assert executor.futures.cancel("job") is True
    assert executor.futures.cancelled("job") is True
    touch(gate)
    assert blocker.result(timeout=WAIT) == "blocker"
    assert executor.submit(square, 5).result(timeout=WAIT) == 25
    assert not marker.exists()


@pytest.mark.parametrize("executor_type", PROCESS)
def test_cancel_running_process_task_kills_worker(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    pid_file = str(tmp_path / "running.pid")
    running = executor.submit(pid_then_block, pid_file, gates.new())
    queued = executor.submit(getpid)
    pid = read_pid(pid_file)
    seen: list[bool] = []
    running.add_done_callback(lambda f: seen.append(f.cancelled()))
    # Running from when the web process hears the worker took it (just before
    # the task's first line).
    wait_until(running.running, timeout=5)

    assert running.cancel() is True
    assert running.cancelled()
    with pytest.raises(CancelledError):
        running.result(timeout=0)
    wait_until(lambda: seen == [True], timeout=5)
    wait_until(lambda: not pid_is_alive(pid), timeout=5)
    assert queued.result(timeout=WAIT) != pid
    assert executor.submit(square, 4).result(timeout=WAIT) == 16


@pytest.mark.parametrize("executor_type", ["thread"])
def test_cancel_running_thread_task_returns_false(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    running, gate = blocked_pool(executor, tmp_path, gates, "running")
    assert running.cancel() is False
    assert not running.cancelled()
    touch(gate)
    assert running.result(timeout=WAIT) == "running"


# -- EXECUTOR_MAX_TASKS_PER_CHILD ---------------------------------------------------


@pytest.mark.parametrize("executor_type", PROCESS)
def test_max_tasks_per_child_recycles_workers(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2, EXECUTOR_MAX_TASKS_PER_CHILD=2)
    futures = [executor.submit(getpid) for _ in range(50)]
    pids = [f.result(timeout=WAIT) for f in futures]
    counts = Counter(pids)
    assert len(counts) > 2
    assert max(counts.values()) <= 2, counts

    # Every worker has just done its second task and is being retired: a burst now.
    burst = [executor.submit(square, i) for i in range(30)]
    assert [f.result(timeout=WAIT) for f in burst] == [i * i for i in range(30)]
    more = [executor.submit(getpid) for _ in range(10)]
    counts.update(f.result(timeout=WAIT) for f in more)
    assert max(counts.values()) <= 2, counts


# -- uploads as arguments -----------------------------------------------------------


def _upload_context(app: Flask) -> Any:
    return app.test_request_context(
        "/path/1",
        method="POST",
        data={"doc": (io.BytesIO(b"uploaded bytes"), "doc.txt", "text/plain")},
    )


@pytest.mark.parametrize("executor_type", PROCESS)
def test_filestorage_argument_reaches_process_worker(
    app: Flask, make_executor: MakeExecutor
) -> None:
    executor = make_executor(app)
    storage = FileStorage(io.BytesIO(b"data"), filename="a.txt", content_type="text/plain")
    assert executor.submit(describe_file, storage).result(timeout=WAIT) == {
        "is_filestorage": True,
        "filename": "a.txt",
        "content_type": "text/plain",
        "data": b"data",
    }
    with _upload_context(app):
        future = executor.submit(describe_file, request.files["doc"])
    assert future.result(timeout=WAIT) == {
        "is_filestorage": True,
        "filename": "doc.txt",
        "content_type": "text/plain",
        "data": b"uploaded bytes",
    }


@pytest.mark.parametrize("executor_type", ["thread"])
def test_filestorage_readable_in_thread_after_request_ended(
    app: Flask, make_executor: MakeExecutor, gates: Gates
) -> None:
    executor = make_executor(app)
    gate = gates.new()
    with _upload_context(app):
        future = executor.submit(describe_file_after, gate, request.files["doc"])
    touch(gate)  # the request context, and its uploaded file, are gone
    assert future.result(timeout=WAIT) == {
        "is_filestorage": True,
        "filename": "doc.txt",
        "content_type": "text/plain",
        "data": b"uploaded bytes",
    }
    storage = FileStorage(io.BytesIO(b"data"), filename="a.txt", content_type="text/plain")
    assert executor.submit(describe_file, storage).result(timeout=WAIT)["data"] == b"data"


# -- many threads submitting at once ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor_type", ["process-fork"])
def test_many_threads_each_get_their_own_context(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2)
    threads_count, tasks = 8, 500
    deadline = time.monotonic() + 240
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def submit_all(thread: int) -> None:
        try:
            with app.test_request_context(f"/path/{thread}?u=u{thread}"):
                g.user = f"user{thread}"
                futures = [executor.submit(whoami, thread, i) for i in range(tasks)]
            results[thread] = [
                f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures
            ]
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=submit_all, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "deadlock: threads still running"
    assert not errors, errors
    for thread in range(threads_count):
        expected = [(thread, i, f"user{thread}", f"u{thread}") for i in range(tasks)]
        assert results[thread] == expected


# -- interpreter exit without shutdown() ----------------------------------------------

EXIT_SCRIPT = """
import sys
from flask import Flask
from flask_executor import Executor
from fault_support import write_after

kind, out = sys.argv[1], sys.argv[2]
app = Flask("exit_script")
app.config["EXECUTOR_MAX_WORKERS"] = 2
app.config["EXECUTOR_TYPE"], _, method = kind.partition("-")
if method:
    app.config["EXECUTOR_START_METHOD"] = method
executor = Executor(app)
for i in range(6):
    executor.submit(write_after, f"{out}/{i}.txt", 0.3)
print("submitted", flush=True)
"""


@pytest.mark.parametrize("kind", ["thread", "process-forkserver", "process-spawn", "process-fork"])
def test_interpreter_exits_cleanly_without_shutdown(kind: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, kind, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,  # a hang at exit fails here
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "submitted"
    assert "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.txt" for i in range(6)]


# -- executor.futures stays bounded ---------------------------------------------------


@pytest.mark.parametrize("executor_type", ["thread"])
def test_futures_stay_bounded(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    for i in range(5000):
        executor.submit_stored(i, identity, i)
    assert len(executor.futures) == 50
    assert all(i in executor.futures for i in range(4950, 5000))
    assert 4949 not in executor.futures
    assert 0 not in executor.futures
    assert executor.futures.result(4999, timeout=WAIT) == 4999


# -- shutdown -----------------------------------------------------------------------


@pytest.mark.parametrize("executor_type", ["thread", *PROCESS])
def test_submit_after_shutdown_raises(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    assert executor.submit(square, 2).result(timeout=WAIT) == 4
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        executor.submit(square, 3)
    with pytest.raises(RuntimeError):
        executor.submit_stored("late", square, 3)
    with pytest.raises(RuntimeError):
        executor.map(square, [1, 2])
    assert "late" not in executor.futures


@pytest.mark.parametrize("executor_type", ["thread", *PROCESS])
def test_shutdown_cancel_futures_cancels_pending(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    blocker, gate = blocked_pool(executor, tmp_path, gates)
    markers = [tmp_path / f"ran-{i}" for i in range(3)]
    pending = [executor.submit(touch, str(marker)) for marker in markers]

    executor.shutdown(wait=False, cancel_futures=True)

    assert all(f.cancelled() for f in pending)
    touch(gate)
    assert blocker.result(timeout=WAIT) == "blocker"
    executor.shutdown(wait=True)
    assert not any(marker.exists() for marker in markers)
    with pytest.raises(RuntimeError):
        executor.submit(square, 1)


def _dispatcher_bug(outcome: object) -> None:
    raise SystemExit(7)


def test_dispatcher_failure_fails_outstanding_tasks_instead_of_hanging(
    app: Flask,
    shutdown_after: Callable[[Executor], Executor],
    gates: Gates,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug that kills the dispatcher thread (here: SystemExit while it rebuilds a
    result); every outstanding future must then fail with BrokenProcessPool and submit()
    must say so, rather than hang. (A done callback that raises no longer does this: see
    test_pool_lifecycle.py.)"""
    import flask_executor.backends.process as process_backend

    monkeypatch.setattr(process_backend, "rebuild_outcome", _dispatcher_bug)
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="fork", EXECUTOR_MAX_WORKERS=1
    )
    executor = shutdown_after(Executor(app))
    started, gate = gates.new(), gates.new()
    with app.app_context():
        first = executor.submit(block_until, started, gate, "first")
        queued = executor.submit(pow, 2, 3)
        wait_for_path(started)
        touch(gate)
        for future in (first, queued):
            with pytest.raises(BrokenProcessPool, match="dispatcher failed: SystemExit"):
                future.result(timeout=30)
        with pytest.raises(BrokenProcessPool):
            executor.submit(pow, 2, 3)
