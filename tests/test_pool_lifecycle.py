"""The process pool under the treatment real servers give processes (issue 11).

Workers that live as long as the pool, a web process that dies (SIGKILL), a graceful
stop with a time limit, frozen (SIGSTOPped) workers, bounded worker start-up, callbacks
that raise ``SystemExit``, a dropped executor, and the worker initializer
(``EXECUTOR_WORKER_INIT``). Every wait has a timeout; processes a test stops or kills are
checked to be gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    SysExitAtPickle,
    getpid,
    pid_is_alive,
    return_instance,
)
from flask import Flask
from support import Gates, block_until, wait_for_path, wait_until

from flask_executor import Executor, SerializationError

MakeExecutor = Callable[..., Executor]

#: Seconds any wait for a task's result may take.
WAIT = 30

START_METHODS = ["fork", "forkserver", "spawn"]
TESTS_DIR = str(Path(__file__).parent)


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    method: str = request.param
    return method


@pytest.fixture
def make_process(shutdown_after: Callable[[Executor], Executor]) -> MakeExecutor:
    """``make(app, start_method, **config)``: a process executor of two workers."""

    def make(app: Flask, start_method: str, **config: Any) -> Executor:
        app.config.update(
            EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2, EXECUTOR_START_METHOD=start_method
        )
        app.config.update(config)
        return shutdown_after(Executor(app))

    return make


def run_script(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    """Start ``source`` as a Python script in ``tmp_path`` (tests/ on its path)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, *sys.path])}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- 1. workers live for the life of the pool -------------------------------------------


@pytest.mark.slow
def test_idle_worker_lives_on(app: Flask, make_process: MakeExecutor, start_method: str) -> None:
    executor = make_process(app, start_method, EXECUTOR_MAX_WORKERS=1)
    first = executor.submit(getpid).result(timeout=WAIT)
    time.sleep(2.5)  # idle for longer than any idle check
    assert pid_is_alive(first)
    assert executor.submit(getpid).result(timeout=WAIT) == first


# -- 3. the web process dies -------------------------------------------------------------

PARENT_DIES = """
    import os, sys, time
    from flask import Flask
    from flask_executor import Executor
    from fault_support import getpid, pid_then_sleep, read_pid

    if __name__ == "__main__":
        app = Flask(__name__)
        app.config.update(
            EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=sys.argv[1], EXECUTOR_MAX_WORKERS=2
        )
        executor = Executor(app)
        executor.submit(pid_then_sleep, sys.argv[2], 120)
        busy = read_pid(sys.argv[2], 30)
        idle = executor.submit(getpid).result(timeout=30)
        print(busy, idle, flush=True)
        time.sleep(120)
"""


@pytest.mark.slow
def test_workers_exit_when_web_process_is_killed(tmp_path: Path, start_method: str) -> None:
    web = run_script(tmp_path, PARENT_DIES, start_method, str(tmp_path / "busy.pid"))
    busy = idle = 0
    try:
        assert web.stdout is not None
        line = web.stdout.readline()
        busy, idle = map(int, line.split())
        assert busy != idle and pid_is_alive(busy) and pid_is_alive(idle)
        web.kill()
        web.wait(timeout=WAIT)
        # Within a few seconds (2 s is the promise; generous for a loaded machine).
        wait_until(lambda: not pid_is_alive(busy) and not pid_is_alive(idle), timeout=8)
        # Every holder of the script's stdout/stderr (workers, fork server) is gone,
        # and none printed anything on the way out.
        out, err = web.communicate(timeout=WAIT)
        assert "Traceback" not in err, err
        assert err.strip() == "", err
    finally:
        for pid in (busy, idle):  # leave nothing behind when the test fails
            if pid and pid_is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if web.poll() is None:
            web.kill()
        web.communicate(timeout=WAIT)


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
    app: Flask, make_process: MakeExecutor, start_method: str
) -> None:
    executor = make_process(app, start_method, EXECUTOR_MAX_WORKERS=1)
    worker = executor.submit(getpid).result(timeout=WAIT)
    future = executor.submit(return_instance, SysExitAtPickle)
    with pytest.raises(SerializationError, match="SystemExit"):
        future.result(timeout=WAIT)
    assert executor.submit(getpid).result(timeout=WAIT) == worker
