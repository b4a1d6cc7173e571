"""The process pool under the treatment real servers give processes (issue 11).

Workers that live as long as the pool, a web process that dies (SIGKILL), a graceful
stop with a time limit, frozen (SIGSTOPped) workers, bounded worker start-up, callbacks
that raise ``SystemExit``, a dropped executor, and the worker initializer
(``EXECUTOR_WORKER_INIT``). Every wait has a timeout; processes a test stops or kills are
checked to be gone.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing.spawn
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    SysExitAtPickle,
    getpid,
    pid_is_alive,
    pid_then_sleep,
    read_pid,
    rendezvous,
    return_instance,
)
from flask import Flask
from pool_support import freeze_mid_message, read_init, size_of
from support import Gates, block_until, wait_for_path, wait_until

import flask_executor.backends.process as process_backend
from flask_executor import Executor, SerializationError
from flask_executor.backends import Backend, BackendOptions, PickledTask
from flask_executor.backends._channel import channel_pair
from flask_executor.backends.process import ProcessBackend
from flask_executor.futures import FutureProxy
from flask_executor.serialize import dumps_call

#: Failed worker starts in a row before waiting tasks fail (the pool's START_ATTEMPTS).
START_ATTEMPTS = 3

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


# -- helpers for backend-level tests ----------------------------------------------------------


def raw_submit(backend: Backend, fn: Callable[..., Any], *args: Any) -> FutureProxy[Any]:
    """Submit ``fn(*args)`` straight to a backend, without context (no executor)."""
    future: FutureProxy[Any] = FutureProxy()
    payload = dumps_call(fn, args, {}, None, by_value_main=False)
    backend.submit(future, PickledTask(payload, "", b"", False))
    return future


def dispatchers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "flask-executor-dispatcher"}


def process_state(pid: int) -> str:
    """The state letter of ``pid`` (``T``: stopped), or ``""`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# -- 4. shutdown with a timeout ----------------------------------------------------------------


@pytest.mark.slow
def test_shutdown_timeout_fails_running_and_cancels_waiting_tasks(
    tmp_path: Path, start_method: str
) -> None:
    backend = ProcessBackend(
        BackendOptions(max_workers=1, task_timeout=None, start_method=start_method)
    )
    try:
        running = raw_submit(backend, pid_then_sleep, str(tmp_path / "pid"), 120)
        pid = read_pid(str(tmp_path / "pid"), WAIT)
        waiting = [raw_submit(backend, getpid) for _ in range(3)]
        backend.shutdown(wait=True, timeout=1.0)
        done, not_done = concurrent.futures.wait([running, *waiting], timeout=0)
        assert not not_done, "futures left pending after shutdown(timeout=...)"
        with pytest.raises(BrokenProcessPool, match="shut down"):
            running.result(timeout=0)
        assert all(f.cancelled() for f in waiting)
        wait_until(lambda: not pid_is_alive(pid))
    finally:
        backend.shutdown(wait=True, timeout=0)


def test_shutdown_timeout_lets_tasks_that_finish_in_time_finish(tmp_path: Path) -> None:
    backend = ProcessBackend(
        BackendOptions(max_workers=1, task_timeout=None, start_method="forkserver")
    )
    future = raw_submit(backend, pid_then_sleep, str(tmp_path / "pid"), 0.5)
    pid = read_pid(str(tmp_path / "pid"), WAIT)
    backend.shutdown(wait=True, timeout=WAIT)
    assert future.result(timeout=0) == pid


# -- 9. a dropped backend winds its pool down ----------------------------------------------------


def test_dropped_backend_stops_its_dispatcher_and_workers(start_method: str) -> None:
    before = dispatchers()
    backend = ProcessBackend(
        BackendOptions(max_workers=2, task_timeout=None, start_method=start_method)
    )
    pids = {raw_submit(backend, getpid).result(timeout=WAIT) for _ in range(2)}
    mine = dispatchers() - before
    assert len(mine) == 1
    dropped = weakref.ref(backend)
    del backend
    gc.collect()
    assert dropped() is None, "something still holds the backend"
    wait_until(lambda: not any(t.is_alive() for t in mine))
    wait_until(lambda: not any(pid_is_alive(pid) for pid in pids))


def test_dropped_executor_and_app_wind_the_pool_down() -> None:
    before = dispatchers()
    app = Flask(__name__)
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    executor = Executor(app)
    with app.app_context():
        pid = executor.submit(getpid).result(timeout=WAIT)
    mine = dispatchers() - before
    del executor, app
    gc.collect()
    wait_until(lambda: not any(t.is_alive() for t in mine) and not pid_is_alive(pid))


# -- 5. frozen workers ---------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_never_blocks_on_a_stopped_idle_worker(
    app: Flask, make_process: MakeExecutor, start_method: str, tmp_path: Path
) -> None:
    executor = make_process(app, start_method)
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    pids = [executor.submit(rendezvous, str(meeting), str(i), 2) for i in range(2)]
    frozen, other = (f.result(timeout=WAIT) for f in pids)
    blob = b"x" * (4 << 20)  # far more than a socket buffer holds
    futures: list[Any] = []
    os.kill(frozen, signal.SIGSTOP)
    try:
        submitter = threading.Thread(
            target=lambda: futures.extend(executor.submit(size_of, blob) for _ in range(6))
        )
        submitter.start()
        submitter.join(timeout=WAIT)
        assert not submitter.is_alive(), "submit() blocked on a stopped worker"
        # The stopped worker holds one task; the other worker runs all the rest.
        wait_until(lambda: sum(f.done() for f in futures) == 5, timeout=WAIT)
        assert sum(f.running() for f in futures) == 1
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert [f.result(timeout=WAIT) for f in futures] == [len(blob)] * 6
    assert other != frozen


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_worker_frozen_mid_message_stalls_nothing_else(
    app: Flask, make_process: MakeExecutor, method: str, tmp_path: Path
) -> None:
    executor = make_process(app, method, EXECUTOR_TASK_TIMEOUT=4)
    executor.submit(getpid).result(timeout=WAIT)  # one worker up and idle
    pid_path = str(tmp_path / "frozen.pid")
    frozen_task = executor.submit(freeze_mid_message, pid_path)
    frozen = read_pid(pid_path, WAIT)
    try:
        wait_until(lambda: process_state(frozen) == "T", timeout=WAIT)
        # Another worker's results keep arriving while half a message waits...
        assert all(executor.submit(getpid).result(timeout=WAIT) != frozen for _ in range(3))
        # ...and the frozen task's deadline still applies: its worker is killed.
        with pytest.raises(TimeoutError):
            frozen_task.result(timeout=WAIT)
        wait_until(lambda: not pid_is_alive(frozen))
    finally:
        if pid_is_alive(frozen):
            os.kill(frozen, signal.SIGKILL)


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
    app: Flask, make_process: MakeExecutor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=3)
    # The time limit counts from when a started worker has the task, not from submit.
    executor = make_process(app, "spawn", EXECUTOR_MAX_WORKERS=1, EXECUTOR_TASK_TIMEOUT=2)
    future = executor.submit(getpid)
    time.sleep(1)
    assert not future.running() and not future.done()
    assert future.result(timeout=WAIT) > 0


@pytest.mark.slow
def test_worker_that_does_not_start_in_time_is_replaced(
    app: Flask, make_process: MakeExecutor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=600, only_first=True)
    monkeypatch.setattr(process_backend, "WORKER_START_TIMEOUT", 2.0, raising=False)
    executor = make_process(app, "spawn", EXECUTOR_MAX_WORKERS=1)
    assert executor.submit(getpid).result(timeout=WAIT) > 0


@pytest.mark.slow
def test_workers_that_never_start_fail_the_task_with_a_clear_error(
    app: Flask, make_process: MakeExecutor, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow_spawn(monkeypatch, tmp_path, delay=600)
    monkeypatch.setattr(process_backend, "WORKER_START_TIMEOUT", 1.0, raising=False)
    executor = make_process(app, "spawn", EXECUTOR_MAX_WORKERS=1)
    future = executor.submit(getpid)
    with pytest.raises(BrokenProcessPool, match="did not start within 1 s"):
        future.result(timeout=WAIT)


# -- the worker initializer --------------------------------------------------------------------


def test_worker_init_runs_once_per_worker_in_its_app_context(
    app: Flask, make_process: MakeExecutor, start_method: str
) -> None:
    app.config["INIT_VALUE"] = "warm"
    executor = make_process(
        app, start_method, EXECUTOR_MAX_WORKERS=1, EXECUTOR_WORKER_INIT="pool_support:init_worker"
    )
    first = executor.submit(read_init).result(timeout=WAIT)
    second = executor.submit(read_init).result(timeout=WAIT)
    (value, pid), calls = first
    assert value == "warm" and calls == 1
    assert second == first


@pytest.mark.slow
def test_failing_worker_init_fails_tasks_naming_it_and_does_not_loop(
    app: Flask, make_process: MakeExecutor, start_method: str, tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    app.config["INIT_LOG"] = str(log)
    executor = make_process(
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


@pytest.mark.slow
def test_script_with_main_guard_works(tmp_path: Path, start_method: str) -> None:
    script = run_script(tmp_path, WITH_MAIN_GUARD, start_method)
    out, err = script.communicate(timeout=WAIT * 2)
    assert (script.returncode, out.strip()) == (0, "result 42"), err


# -- forks of the web process --------------------------------------------------------------------

PARENT_FORKS_THEN_DIES = """
    import os, sys, time
    from flask import Flask
    from flask_executor import Executor
    from fault_support import getpid

    if __name__ == "__main__":
        app = Flask(__name__)
        app.config.update(
            EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=sys.argv[1], EXECUTOR_MAX_WORKERS=1
        )
        executor = Executor(app)
        worker = executor.submit(getpid).result(timeout=30)
        child = os.fork()  # e.g. a library that forks; the child outlives its parent
        if child == 0:
            time.sleep(120)
            os._exit(0)
        print(worker, child, flush=True)
        time.sleep(120)
"""


@pytest.mark.slow
def test_workers_exit_when_web_process_dies_even_if_it_forked(
    tmp_path: Path, start_method: str
) -> None:
    web = run_script(tmp_path, PARENT_FORKS_THEN_DIES, start_method)
    worker = child = 0
    try:
        assert web.stdout is not None
        worker, child = map(int, web.stdout.readline().split())
        web.kill()
        web.wait(timeout=WAIT)
        wait_until(lambda: not pid_is_alive(worker), timeout=8)
        assert pid_is_alive(child)
    finally:
        for pid in (worker, child):
            if pid and pid_is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if web.poll() is None:
            web.kill()
        _, err = web.communicate(timeout=WAIT)
    assert "Traceback" not in err, err


def test_forked_child_refuses_the_parents_pool_and_parent_is_untouched() -> None:
    backend = ProcessBackend(
        BackendOptions(max_workers=1, task_timeout=None, start_method="forkserver")
    )
    try:
        worker = raw_submit(backend, getpid).result(timeout=WAIT)
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            code = 3
            try:
                raw_submit(backend, getpid)
            except BrokenProcessPool as exc:
                code = 0 if "forked" in str(exc) else 1
            except BaseException:
                code = 2
            os._exit(code)
        deadline = time.monotonic() + WAIT
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                raise AssertionError("the forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status[1]) == 0
        assert raw_submit(backend, getpid).result(timeout=WAIT) == worker
    finally:
        backend.shutdown(wait=True)


# -- the web process's end of a worker's socket ---------------------------------------------


def test_channel_speaks_connection_framing_without_blocking() -> None:
    """Messages of every size go both ways between a Channel and a Connection, a half-sent
    or half-read message never blocks, and EOF is seen."""
    channel, conn = channel_pair()
    sizes = [0, 1, 4000, 16384, 70_000, 3 << 20]
    try:
        for size in sizes:  # web process -> worker; the socket takes only part of the big one
            channel.send(bytes([size % 251]) * size)
        assert channel.sending
        received: list[bytes] = []
        reader = threading.Thread(
            target=lambda: received.extend(conn.recv_bytes() for _ in sizes), daemon=True
        )
        reader.start()
        deadline = time.monotonic() + WAIT
        while reader.is_alive() and time.monotonic() < deadline:
            channel.flush()  # never blocks: sends what the socket takes now
            time.sleep(0.001)
        reader.join(timeout=WAIT)
        assert [len(m) for m in received] == sizes and not channel.sending
        writer = threading.Thread(  # worker -> web process, read as it arrives
            target=lambda: [conn.send_bytes(bytes([n % 251]) * n) for n in sizes], daemon=True
        )
        writer.start()
        messages: list[Any] = []
        deadline = time.monotonic() + WAIT
        while len(messages) < len(sizes) and time.monotonic() < deadline:
            messages += channel.receive()
        writer.join(timeout=WAIT)
        assert [bytes(m) for m in messages] == [bytes([s % 251]) * s for s in sizes]
        assert channel.receive() == [] and not channel.closed
        conn.close()
        assert channel.receive() == [] and channel.closed
    finally:
        channel.close()
        conn.close()
