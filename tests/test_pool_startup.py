"""Process workers starting (issue 11): a task is running only once a started worker has
it, start-up is bounded, the worker initializer (``EXECUTOR_WORKER_INIT``), scripts
without a main guard, and what raising ``SystemExit`` in a done callback or a result's
reducer does. Every wait has a timeout.
"""

from __future__ import annotations

import multiprocessing.spawn
import sys
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from fault_support import SysExitAtPickle, getpid, pid_is_alive, return_instance
from flask import Flask
from pool_support import read_init, run_script
from process_support import MakeProcessExecutor
from support import Gates, block_until, wait_for_path, wait_until

import flask_executor.backends.process as process_backend
from flask_executor import Executor, SerializationError
from flask_executor.backends.process import START_ATTEMPTS

#: Seconds any wait for a task's result may take.
WAIT = 30


# -- 6. time limits and worker start-up -------------------------------------------------------

SLOW_PYTHON = """\
#!{python}
# Stands in for the interpreter of spawned workers: a start-up that is slow (or hangs).
import os, sys, time
marker = {marker!r}
if not {only_first} or not os.path.exists(marker):
    open(marker, "a").close()
    time.sleep({delay})
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def slow_spawn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, delay: float, only_first: bool = False
) -> None:
    """Make every spawned worker (or only the first) take ``delay`` s to start."""
    wrapper = tmp_path / "slow-python"
    wrapper.write_text(
        SLOW_PYTHON.format(
            python=sys.executable,
            marker=str(tmp_path / "started-once"),
            only_first=only_first,
            delay=delay,
        ),
        encoding="utf-8",
    )
    wrapper.chmod(0o755)
    # Restored at the end of the test; set_executable stores it as the platform wants.
    monkeypatch.setattr(multiprocessing.spawn, "_python_exe", multiprocessing.spawn._python_exe)
    multiprocessing.spawn.set_executable(str(wrapper))


@pytest.mark.slow
def test_task_is_not_running_while_its_worker_starts(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=3)
    # The time limit counts from when a started worker has the task, not from submit.
    executor = make_process_executor(app, "spawn", EXECUTOR_MAX_WORKERS=1, EXECUTOR_TASK_TIMEOUT=2)
    future = executor.submit(getpid)
    time.sleep(1)
    assert not future.running() and not future.done()
    assert future.result(timeout=WAIT) > 0


@pytest.mark.slow
def test_worker_that_does_not_start_in_time_is_replaced(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=600, only_first=True)
    monkeypatch.setattr(process_backend, "WORKER_START_TIMEOUT", 2.0, raising=False)
    executor = make_process_executor(app, "spawn", EXECUTOR_MAX_WORKERS=1)
    assert executor.submit(getpid).result(timeout=WAIT) > 0


@pytest.mark.slow
def test_workers_that_never_start_fail_the_task_with_a_clear_error(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=600)
    monkeypatch.setattr(process_backend, "WORKER_START_TIMEOUT", 1.0, raising=False)
    executor = make_process_executor(app, "spawn", EXECUTOR_MAX_WORKERS=1)
    future = executor.submit(getpid)
    with pytest.raises(BrokenProcessPool, match="did not start within 1 s"):
        future.result(timeout=WAIT)


# -- the worker initializer --------------------------------------------------------------------


SLOW_PRELOAD = """\
# Preloaded by the fork server (the script adds it): its start takes until the
# script creates the release file, or until {limit} s have passed.
import os, time
open({started!r}, "w").close()
release = {release!r}
deadline = time.monotonic() + {limit}
while not os.path.exists(release) and time.monotonic() < deadline:
    time.sleep(0.01)
if not os.path.exists(release):
    open({timed_out!r}, "w").close()
"""

SUBMITS_WHILE_THE_POOL_STARTS = """\
import time
from pathlib import Path
from flask import Flask
from flask_executor import Executor
import flask_executor.backends._start as start

if __name__ == "__main__":
    start.FORK_SERVER_PRELOAD += ("slow_preload",)
    app = Flask("starting")
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="forkserver",
                      EXECUTOR_MAX_WORKERS=2)
    executor = Executor(app)
    with app.app_context():
        futures = [executor.submit(pow, 2, 0)]
        deadline = time.monotonic() + 30
        while not Path("started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the fork server is starting the first worker
        futures += [executor.submit(pow, 2, n) for n in range(1, 4)]
    Path("release").touch()  # only once every submit() has returned
    print([f.result(60) for f in futures])
    executor.shutdown()
"""


def test_submit_does_not_wait_for_a_starting_worker(tmp_path: Path) -> None:
    """The fork server (and with it the first worker) takes long to start: the
    submits made meanwhile return at once, they never wait for the start (before,
    each submit after the first waited for the dispatcher's lock, held while the
    worker started)."""
    (tmp_path / "slow_preload.py").write_text(
        SLOW_PRELOAD.format(
            started=str(tmp_path / "started"), release=str(tmp_path / "release"),
            limit=WAIT / 3,
            timed_out=str(tmp_path / "timed-out"),
        ),
        encoding="utf-8",
    )  # fmt: skip
    proc = run_script(tmp_path, SUBMITS_WHILE_THE_POOL_STARTS)
    out, err = proc.communicate(timeout=WAIT * 2)
    assert proc.returncode == 0, err
    assert out.split("\n")[0] == "[1, 2, 4, 8]"
    assert (tmp_path / "started").exists()
    assert not (tmp_path / "timed-out").exists(), "a submit waited for the worker to start"


def test_worker_init_runs_once_per_worker_in_its_app_context(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    app.config["INIT_VALUE"] = "warm"
    executor = make_process_executor(
        app, start_method, EXECUTOR_MAX_WORKERS=1, EXECUTOR_WORKER_INIT="pool_support:init_worker"
    )
    first = executor.submit(read_init).result(timeout=WAIT)
    second = executor.submit(read_init).result(timeout=WAIT)
    (value, pid), calls = first
    assert value == "warm" and calls == 1
    assert second == first


@pytest.mark.slow
def test_failing_worker_init_fails_tasks_naming_it_and_does_not_loop(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str, tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    app.config["INIT_LOG"] = str(log)
    executor = make_process_executor(
        app, start_method, EXECUTOR_MAX_WORKERS=2, EXECUTOR_WORKER_INIT="pool_support:failing_init"
    )
    futures = [executor.submit(getpid) for _ in range(3)]
    for future in futures:
        exc = future.exception(timeout=WAIT)
        assert isinstance(exc, BrokenProcessPool), repr(exc)
        assert "pool_support:failing_init" in str(exc) and "no model here" in str(exc)
        traceback_text = str(exc.__cause__.__cause__)  # the ValueError, then its traceback
        assert "in failing_init" in traceback_text, traceback_text
    time.sleep(1.5)  # let a start that was under way when the tasks failed finish
    attempts = log.read_text(encoding="utf-8").split()
    # START_ATTEMPTS failed starts in a row, and at most the other worker starting then.
    assert START_ATTEMPTS <= len(attempts) <= START_ATTEMPTS + 1
    time.sleep(1.5)  # nothing keeps starting workers
    assert log.read_text(encoding="utf-8").split() == attempts
    assert not any(pid_is_alive(int(pid)) for pid in attempts)


# -- 8. scripts without a main guard ------------------------------------------------------------

NO_MAIN_GUARD = """
    import sys
    from flask import Flask
    from flask_executor import Executor

    app = Flask(__name__)
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=sys.argv[1], EXECUTOR_MAX_WORKERS=1
    )
    executor = Executor(app)


    def double(x):
        return 2 * x


    try:
        print("result", executor.submit(double, 21).result(timeout=30), flush=True)
    except RuntimeError as exc:
        print("error", exc, flush=True)
    executor.shutdown()
"""

WITH_MAIN_GUARD = """
    import sys
    from flask import Flask
    from flask_executor import Executor

    app = Flask(__name__)
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=sys.argv[1], EXECUTOR_MAX_WORKERS=1
    )
    executor = Executor(app)


    def double(x):
        return 2 * x


    if __name__ == "__main__":
        print("result", executor.submit(double, 21).result(timeout=30), flush=True)
        executor.shutdown()
"""


@pytest.mark.slow
def test_script_without_main_guard(tmp_path: Path, start_method: str) -> None:
    script = run_script(tmp_path, NO_MAIN_GUARD, start_method)
    out, err = script.communicate(timeout=WAIT * 2)
    assert script.returncode == 0, err
    assert "Traceback" not in err, err
    if start_method == "fork":  # workers never run the script: it works as with 1.0
        assert out.strip() == "result 42"
    else:  # the first submit() says what to change
        assert out.startswith("error "), out
        assert 'if __name__ == "__main__":' in out and "script.py, line 18:" in out, out
        assert "EXECUTOR_START_METHOD = 'fork'" in out


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_script_without_main_guard_nor_shutdown_exits_cleanly(
    tmp_path: Path, start_method: str
) -> None:
    # The refused pool never registers with the exit hook (it printed an
    # AttributeError about the pool the backend never got, when the backend
    # was still alive at exit: here the kept error's traceback holds it).
    source = NO_MAIN_GUARD.replace("    executor.shutdown()\n", "").replace(
        '        print("error", exc, flush=True)\n',
        '        print("error", exc, flush=True)\n        kept = exc\n',
    )
    assert source != NO_MAIN_GUARD
    script = run_script(tmp_path, source, start_method)
    out, err = script.communicate(timeout=WAIT * 2)
    assert script.returncode == 0, err
    assert out.startswith("error "), out
    assert err == "", err


@pytest.mark.slow
def test_script_with_main_guard_works(tmp_path: Path, start_method: str) -> None:
    script = run_script(tmp_path, WITH_MAIN_GUARD, start_method)
    out, err = script.communicate(timeout=WAIT * 2)
    assert (script.returncode, out.strip()) == (0, "result 42"), err


# -- 7. a done callback that raises SystemExit ---------------------------------------------


def exit_callback(future: Any) -> None:
    raise SystemExit(3)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_callback_system_exit_is_logged_and_pool_goes_on(
    app: Flask,
    shutdown_after: Callable[[Executor], Executor],
    gates: Gates,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app.config.update(EXECUTOR_TYPE=kind, EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    started, gate = gates.new(), gates.new()
    future = executor.submit(block_until, started, gate, 1)
    wait_for_path(started)
    later: list[Any] = []
    future.add_done_callback(exit_callback)  # runs where the pool completes the future
    future.add_done_callback(later.append)  # callbacks after it still run
    Path(gate).touch()
    assert future.result(timeout=WAIT) == 1
    wait_until(lambda: later == [future])
    assert executor.submit(getpid).result(timeout=WAIT) > 0
    assert executor.submit(getpid).result(timeout=WAIT) > 0
    assert any("SystemExit" in (r.exc_text or "") for r in caplog.records), caplog.records


# -- 12. SystemExit while the worker pickles a result ---------------------------------------


def test_sys_exit_at_result_pickle_is_the_tasks_error(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    worker = executor.submit(getpid).result(timeout=WAIT)
    future = executor.submit(return_instance, SysExitAtPickle)
    with pytest.raises(SerializationError, match="SystemExit"):
        future.result(timeout=WAIT)
    assert executor.submit(getpid).result(timeout=WAIT) == worker
