"""The process pool under the treatment real servers give processes (issue 11).

Workers that live as long as the pool, a web process that dies (SIGKILL) or forks, a
graceful stop with a time limit, a dropped executor, frozen (SIGSTOPped) workers, and the
non-blocking socket ends behind that. Start-up, the worker initializer and scripts without
a main guard are in ``test_pool_startup.py``. Every wait has a timeout; processes a test
stops or kills are checked to be gone.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from fault_support import getpid, pid_is_alive, pid_then_sleep, read_pid, rendezvous
from flask import Flask
from pool_support import freeze_mid_message, run_script, size_of
from process_support import MakeProcessExecutor
from support import wait_until

from flask_executor import Executor, ShutdownTimeoutError
from flask_executor.backends import Backend, BackendOptions, PickledTask
from flask_executor.backends._channel import channel_pair
from flask_executor.backends.process import ProcessBackend
from flask_executor.futures import FutureProxy
from flask_executor.serialize import dumps_call

#: Seconds any wait for a task's result may take.
WAIT = 30


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


# -- 1. workers live for the life of the pool -------------------------------------------


@pytest.mark.slow
def test_idle_worker_lives_on(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    first = executor.submit(getpid).result(timeout=WAIT)
    time.sleep(2.5)  # idle for longer than any idle check
    assert pid_is_alive(first)
    assert executor.submit(getpid).result(timeout=WAIT) == first


def test_task_sent_to_a_worker_that_dies_before_reading_it_is_delivered_again(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    doomed = executor.submit(getpid).result(timeout=WAIT)
    os.kill(doomed, signal.SIGSTOP)  # idle and up: the next task goes into its socket
    try:
        future = executor.submit(getpid)
        time.sleep(0.2)
    finally:
        os.kill(doomed, signal.SIGKILL)  # it dies without having read the task
    other = future.result(timeout=WAIT)  # the task never ran: a new worker runs it
    assert other != doomed


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


def test_a_fork_while_a_worker_starts_lets_go_of_that_workers_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The web process forks (another thread, a server) while the pool starts a
    worker, before the worker is in the pool's list: the child lets go of that
    worker's sockets too, or the worker would not see the web process die while
    the child lives."""
    import multiprocessing.context

    backend = ProcessBackend(
        BackendOptions(max_workers=1, task_timeout=None, start_method="forkserver")
    )
    real_start = multiprocessing.context.ForkServerProcess.start
    forked: dict[str, Any] = {}

    def start_then_fork(process: Any) -> None:
        real_start(process)
        if forked:
            return
        fds = [end.fileno() for end in backend._pool._launching]
        forked["fds"] = fds
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            held = [fd for fd in fds if os.readlink(f"/proc/self/fd/{fd}") != os.devnull]
            os._exit(1 if held or not fds else 0)
        forked["pid"] = child

    monkeypatch.setattr(multiprocessing.context.ForkServerProcess, "start", start_then_fork)
    try:
        assert raw_submit(backend, getpid).result(timeout=WAIT) > 0
        deadline = time.monotonic() + WAIT
        while (status := os.waitpid(forked["pid"], os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(forked["pid"], signal.SIGKILL)
                os.waitpid(forked["pid"], 0)
                raise AssertionError("the forked child hung")
            time.sleep(0.01)
        assert len(forked["fds"]) == 2  # the worker's channel and control socket
        assert os.waitstatus_to_exitcode(status[1]) == 0, "the child kept a worker's socket"
    finally:
        backend.shutdown(wait=True)


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
        with pytest.raises(ShutdownTimeoutError, match="EXECUTOR_SHUTDOWN_TIMEOUT"):
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
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str, tmp_path: Path
) -> None:
    executor = make_process_executor(app, start_method)
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
        # The stopped worker holds one task it never started (so nothing more
        # is sent ahead to it); the other worker runs all the rest.
        wait_until(lambda: sum(f.done() for f in futures) == 5, timeout=WAIT)
        assert not any(f.running() for f in futures)
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert [f.result(timeout=WAIT) for f in futures] == [len(blob)] * 6
    assert other != frozen


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_worker_frozen_mid_message_stalls_nothing_else(
    app: Flask, make_process_executor: MakeProcessExecutor, method: str, tmp_path: Path
) -> None:
    executor = make_process_executor(app, method, EXECUTOR_TASK_TIMEOUT=4)
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
