"""Executor lifecycle: shutdown with a time limit, interpreter exit, dropped executors,
forks of the web process, ``map()`` references and error types (issue 11)."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MakeExecutor
from flask import Flask
from servers import session_pids
from support import wait_until

from flask_executor import Executor, SerializationError, ShutdownTimeoutError

TESTS = Path(__file__).resolve().parent


def run_script(
    tmp_path: Path, source: str, timeout: float = 45, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a script in a fresh interpreter, in ``tmp_path``;
    ``tmp_path`` and tests/ are importable."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    path = os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


# -- item 13: SerializationError is what stdlib code catches -----------------------------


def test_serialization_error_is_a_type_error_and_a_pickling_error() -> None:
    assert issubclass(SerializationError, TypeError)
    assert issubclass(SerializationError, pickle.PicklingError)


def test_unpicklable_argument_is_caught_as_pickling_error(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    app.config["EXECUTOR_TYPE"] = "process"
    executor = shutdown_after(Executor(app))
    with app.app_context():
        assert executor.submit(pow, 2, 3).result(timeout=30) == 8
        with pytest.raises(pickle.PicklingError, match="args"):
            executor.submit(print, threading.Lock())


# -- item 11: map() does not keep the last result alive between yields -----------------


class Box:
    def __init__(self, value: int) -> None:
        self.value = value


def make_box(value: int) -> Box:
    return Box(value)


@pytest.mark.parametrize(
    ("kind", "chunksize"), [("thread", 1), ("process", 1), ("process", 3)]
)
def test_map_drops_each_result_once_yielded(
    app: Flask, shutdown_after: Callable[[Executor], Executor], kind: str, chunksize: int
) -> None:
    app.config.update(EXECUTOR_TYPE=kind, EXECUTOR_START_METHOD="fork", EXECUTOR_MAX_WORKERS=2)
    executor = shutdown_after(Executor(app))
    with app.app_context():
        results = executor.map(make_box, range(6), chunksize=chunksize)
        ref = weakref.ref(next(results))
        gc.collect()
        assert ref() is None, "map() still holds the result it yielded"
        assert [box.value for box in results] == [1, 2, 3, 4, 5]


# -- item 10: no submit after the interpreter-exit hook ------------------------------------


def test_submit_after_exit_hook_raises_runtime_error(tmp_path: Path) -> None:
    # atexit runs handlers last-registered-first: this one runs after flask-executor's.
    result = run_script(tmp_path, """
        import atexit

        def late_submit():
            for executor in (used, unused):
                try:
                    executor.submit(pow, 2, 3)
                except RuntimeError as exc:
                    print("RuntimeError:", exc)
                else:
                    print("accepted")

        atexit.register(late_submit)

        from flask import Flask
        from flask_executor import Executor

        app = Flask("late")
        used = Executor(app, name="used")
        unused = Executor(app, name="unused")
        with app.app_context():
            assert used.submit(pow, 2, 2).result(timeout=30) == 4
        """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == ["RuntimeError: cannot schedule new futures after shutdown"] * 2, result.stdout


# -- item 9: a dropped executor winds its pool down -------------------------------------


def executor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flask-executor")]


def test_dropped_thread_executor_stops_its_threads() -> None:
    from support import create_app

    before = set(executor_threads())
    app = create_app()
    app.config.update(EXECUTOR_MAX_WORKERS=4, EXECUTOR_TASK_TIMEOUT=30)
    executor = Executor(app)
    with app.app_context():
        futures = [executor.submit(time.sleep, 0.05) for _ in range(8)]
    concurrent.futures.wait(futures, timeout=30)
    started = set(executor_threads()) - before
    assert len(started) >= 2  # workers and the deadline thread
    del executor, app, futures
    gc.collect()
    wait_until(lambda: not any(t.is_alive() for t in started), timeout=30)


def test_module_level_registries_hold_executors_weakly() -> None:
    from support import create_app

    app = create_app()
    executor = Executor(app)
    with app.app_context():
        assert executor.submit(pow, 2, 4).result(timeout=30) == 16
    refs = [weakref.ref(executor), weakref.ref(executor._states[app].backend)]
    del executor, app
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


# -- item 4: shutdown waits up to EXECUTOR_SHUTDOWN_TIMEOUT, then leaves nothing pending --


def test_shutdown_timeout_default_fits_gunicorns_graceful_timeout(app: Flask) -> None:
    Executor(app)
    assert 0 < app.config["EXECUTOR_SHUTDOWN_TIMEOUT"] < 30


def test_shutdown_timeout_rejects_nonsense(app: Flask) -> None:
    app.config["EXECUTOR_SHUTDOWN_TIMEOUT"] = "soon"
    with pytest.raises(ValueError, match="EXECUTOR_SHUTDOWN_TIMEOUT"):
        Executor(app)


def test_thread_shutdown_waits_for_running_tasks_within_the_timeout(
    app: Flask, make_thread_executor: MakeExecutor
) -> None:
    executor = make_thread_executor(app, EXECUTOR_SHUTDOWN_TIMEOUT=30, EXECUTOR_MAX_WORKERS=2)
    with app.app_context():
        futures = [executor.submit(time.sleep, 0.2) for _ in range(4)]
    executor.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)


def test_thread_shutdown_past_the_timeout_fails_running_and_cancels_queued(
    app: Flask, make_thread_executor: MakeExecutor
) -> None:
    executor = make_thread_executor(app, EXECUTOR_SHUTDOWN_TIMEOUT=0.5, EXECUTOR_MAX_WORKERS=1)
    release = threading.Event()
    started = threading.Event()

    def block() -> str:
        started.set()
        release.wait(30)
        return "late"

    try:
        with app.app_context():
            running = executor.submit(block)
            queued = [executor.submit(pow, 2, n) for n in range(3)]
        assert started.wait(30)
        executor.shutdown(wait=True)
        # Nothing is left pending: wait() sees every future as done.
        done, not_done = concurrent.futures.wait([running, *queued], timeout=5)
        assert not not_done
        with pytest.raises(ShutdownTimeoutError, match="EXECUTOR_SHUTDOWN_TIMEOUT"):
            running.result(timeout=0)
        assert all(f.cancelled() for f in queued)
    finally:
        release.set()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(pow, 2, 2)


def test_exit_waits_for_running_thread_task_and_delivers_its_result(tmp_path: Path) -> None:
    result = run_script(tmp_path, """
        import time
        from flask import Flask
        from flask_executor import Executor

        app = Flask("exit")
        app.config["EXECUTOR_SHUTDOWN_TIMEOUT"] = 30
        executor = Executor(app)

        def report(future):
            print("callback:", future.result(), flush=True)

        def slow():
            time.sleep(1)
            return "finished"

        with app.app_context():
            executor.submit(slow).add_done_callback(report)
        print("exiting", flush=True)
        """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["exiting", "callback: finished"]
    assert result.stderr == ""


def test_exit_past_the_timeout_fails_the_running_thread_task(tmp_path: Path) -> None:
    result = run_script(tmp_path, """
        import time
        from flask import Flask
        from flask_executor import Executor

        app = Flask("exit")
        app.config["EXECUTOR_SHUTDOWN_TIMEOUT"] = 0.5
        app.config["EXECUTOR_MAX_WORKERS"] = 1
        executor = Executor(app)

        def report(future):
            print("callback:", type(future.exception()).__name__, flush=True)

        with app.app_context():
            executor.submit(time.sleep, 60).add_done_callback(report)
            executor.submit(time.sleep, 60).add_done_callback(
                lambda f: print("cancelled:", f.cancelled(), flush=True))
        """, timeout=30)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "callback: ShutdownTimeoutError", "cancelled: True"
    ]


# -- item 2: a fork of the web process gets pools of its own --------------------------

FORK_APP = '''
import os
import time
from flask import Flask, g
from flask_executor import Executor

app = Flask("forkapp")
app.config["EXECUTOR_TYPE"] = os.environ["KIND"]
app.config["EXECUTOR_START_METHOD"] = os.environ.get("START_METHOD") or None
app.config["EXECUTOR_MAX_WORKERS"] = 2
app.config["EXECUTOR_DASK_ADDRESS"] = os.environ.get("DASK_ADDRESS")
executor = Executor(app)
if os.environ["KIND"] == "dask":  # the test's cluster cannot import this module
    import cloudpickle, sys
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

inner = Executor(app, name="inner")  # a thread pool, for tasks that submit themselves


def echo(value, delay=0.0):
    time.sleep(delay)
    return value, g.get("user")


def nested(n):
    # Runs in a process worker: submits to the thread executor it inherited.
    return inner.submit(pow, n, 2).result(timeout=10)
'''

FORK_SCRIPT = '''
import os, sys, time
from forkapp import app, executor, echo

def submit_all(who, n, delay):
    futures = []
    for i in range(n):
        with app.test_request_context():
            from flask import g
            g.user = f"{who}-{i}"
            futures.append(executor.submit(echo, (who, i), delay))
    return futures

if __name__ == "__main__":
    with app.app_context():
        assert executor.submit(echo, "warm").result(timeout=30)[0] == "warm"
    parent = submit_all("alice", 8, 0.3)  # running and queued when we fork
    pid = os.fork()
    if pid == 0:
        try:
            child = submit_all("bob", 8, 0.05)
            got = [f.result(timeout=30) for f in child]
            ok = got == [(("bob", i), f"bob-{i}") for i in range(8)]
            print("child", "ok" if ok else f"wrong {got}", flush=True)
        except BaseException as exc:
            print("child failed", repr(exc), flush=True)
            os._exit(1)
        sys.exit(0)  # a normal exit: the exit hooks run in the child
    end = time.monotonic() + 60
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        print("child hung", flush=True)
    got = [f.result(timeout=30) for f in parent]
    ok = got == [(("alice", i), f"alice-{i}") for i in range(8)]
    print("parent", "ok" if ok else f"wrong {got}", flush=True)
    later = submit_all("carol", 4, 0)
    ok = [f.result(timeout=30) for f in later] == [(("carol", i), f"carol-{i}") for i in range(4)]
    print("parent later", "ok" if ok else "wrong", flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "start_method"),
    [
        ("thread", ""),
        ("process", "forkserver"),
        ("process", "spawn"),
        ("process", "fork"),
        # A cluster at an address: distributed cannot start a LocalCluster in a forked
        # child, but the child's own client connects as the parent's did.
        ("dask", ""),
    ],
)
def test_fork_after_submits_gives_the_child_its_own_pool(
    tmp_path: Path, kind: str, start_method: str, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "forkapp.py").write_text(FORK_APP)
    env = {"KIND": kind, "START_METHOD": start_method}
    if kind == "dask":
        env["DASK_ADDRESS"] = request.getfixturevalue("dask_scheduler_address")
    result = run_script(tmp_path, FORK_SCRIPT, timeout=120, env=env)
    lines = result.stdout.splitlines()
    assert sorted(lines) == ["child ok", "parent later ok", "parent ok"], (
        result.stdout + result.stderr
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


FORK_HELD_LOCK_SCRIPT = """
import os, sys, threading, time
from multiprocessing import forkserver, resource_tracker
from flask import g
from flask_executor import appspec, snapshot
from forkapp import app, executor, inner, echo

LOCKS = {  # the lock, and the child's executor (its first submit takes that lock)
    "resource tracker": (resource_tracker._resource_tracker, "_lock", executor),
    "fork server": (forkserver._forkserver, "_lock", executor),
    "app spec": (appspec, "_spec_lock", executor),
    # a thread task whose g left a value out (a lock cannot be copied)
    "omitted g": (snapshot, "_omitting_lock", inner),
}

if __name__ == "__main__":
    with app.app_context():
        assert executor.submit(echo, "warm").result(timeout=30)[0] == "warm"
    # Another thread of the parent is starting a pool process right now: it
    # holds the lock when the fork happens, and never releases it in the child.
    holder, name, child_executor = LOCKS[sys.argv[1]]
    lock = getattr(holder, name)
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        try:
            with app.test_request_context():
                g.lock = threading.Lock()
                got = child_executor.submit(echo, "child").result(timeout=15)
            print("child", "ok" if got == ("child", None) else f"wrong {got}", flush=True)
        except BaseException as exc:
            print("child failed", repr(exc), flush=True)
            os._exit(1)
        sys.exit(0)
    lock.release()
    end = time.monotonic() + 25  # (a child that hangs in submit() never times out itself)
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        print("child hung", flush=True)
    print("parent done", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["resource tracker", "fork server", "app spec", "omitted g"])
def test_a_child_forked_while_a_parent_thread_holds_a_lock_still_runs_its_tasks(
    tmp_path: Path, lock: str
) -> None:
    """multiprocessing's fork server and resource tracker each guard their
    start with a plain lock; a child forked while a parent thread holds one
    (its dispatcher starting a worker) must not inherit it held, or its own
    first pool process never starts. The same for flask-executor's own
    module locks (the app spec's cache, the class of a g that left values
    out), which a request thread may hold at the fork."""
    (tmp_path / "forkapp.py").write_text(FORK_APP)
    env = {"KIND": "process", "START_METHOD": "forkserver"}
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent(FORK_HELD_LOCK_SCRIPT))
    path = os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, str(script), lock], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, **env, "PYTHONPATH": path},
        start_new_session=True,  # the script, its forked child and its pools: one group
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=45)
        wait_until(lambda: not session_pids(proc.pid), 15)  # pool processes exit after it
    finally:
        left = session_pids(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not left, f"processes the script started were left running: {left}"
    assert stdout.splitlines() == ["child ok", "parent done"], stdout + stderr
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_fork_worker_submits_to_the_executor_it_inherited(tmp_path: Path) -> None:
    (tmp_path / "forkapp.py").write_text(FORK_APP)
    result = run_script(tmp_path, """
        from forkapp import app, executor, inner, nested

        if __name__ == "__main__":
            with app.app_context():
                # The thread pool has idle threads when the process workers fork.
                assert [f.result(timeout=30) for f in [inner.submit(pow, 3, 2)]] == [9]
                futures = [executor.submit(nested, n) for n in range(4)]
                print([f.result(timeout=30) for f in futures])
        """, timeout=120, env={"KIND": "process", "START_METHOD": "fork"})
    assert result.stdout.splitlines() == ["[0, 1, 4, 9]"], result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


# -- item 14 (thread backend): futures cancelled by shutdown count as done ---------------


def test_thread_shutdown_cancel_futures_marks_cancelled_futures_done_for_wait(
    app: Flask, make_thread_executor: MakeExecutor
) -> None:
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=1)
    release = threading.Event()
    with app.app_context():
        running = executor.submit(release.wait, 30)
        queued = [executor.submit(pow, 2, n) for n in range(50)]
    try:
        executor.shutdown(wait=False, cancel_futures=True)
        done, not_done = concurrent.futures.wait(queued, timeout=5)
        assert not not_done, f"{len(not_done)} cancelled futures never counted as done"
        assert all(f.cancelled() for f in queued)
        assert len(list(concurrent.futures.as_completed(queued, timeout=5))) == 50
    finally:
        release.set()
    assert running.result(timeout=30) is True
