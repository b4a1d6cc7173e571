"""The ``flask executor`` command group, through Flask's CliRunner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from support import TIMEOUT, Gates, wait_for_path, wait_until

from flask_executor import Executor, current_task


def _progress_then_wait(started: str, gate: str) -> str:
    current_task.update(progress=0.5, stage="render")
    open(started, "w").close()
    wait_for_path(gate)
    return "slow done"


def _fail() -> None:
    raise ValueError("the widget broke")


def _answer() -> int:
    return 42


def _invoke(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=list(args))


@pytest.fixture
def busy(
    app: Flask, make_thread_executor: Callable[..., Executor], gates: Gates
) -> tuple[Executor, str]:
    """An executor holding a finished, a failed and a running task (progress 0.5)."""
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=2)
    started, gate = gates.new(), gates.new()
    with app.app_context():
        executor.submit_stored("done", _answer).result(TIMEOUT)
        future = executor.submit_stored("bad", _fail)
        assert future.exception(TIMEOUT) is not None
        executor.submit_stored("slow", _progress_then_wait, started, gate)
    wait_for_path(started)
    wait_until(lambda: executor.futures.meta("slow") == {"progress": 0.5, "stage": "render"})
    return executor, gate


def test_list_shows_key_state_progress_and_age(busy: tuple[Executor, str], app: Flask) -> None:
    result = _invoke(app, "executor", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["KEY", "STATE", "PROGRESS", "AGE", "FUNCTION"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["slow"][1:3] == ["running", "50%"]
    assert rows["slow"][4].endswith("_progress_then_wait")
    assert rows["done"][1:3] == ["finished", "-"]
    assert rows["bad"][1] == "failed"
    assert all(row[3].endswith("s") for row in rows.values())
    assert [line.split()[0] for line in lines[1:]] == ["slow", "bad", "done"]  # newest first
    assert "only sees the tasks of this process" in result.stderr


def test_show_gives_state_meta_result_and_error(busy: tuple[Executor, str], app: Flask) -> None:
    done = _invoke(app, "executor", "show", "done")
    assert done.exit_code == 0, done.output
    assert "state:     finished" in done.output
    assert "result:    42" in done.output

    bad = _invoke(app, "executor", "show", "bad")
    assert bad.exit_code == 0, bad.output
    assert "state:     failed" in bad.output
    assert "ValueError: the widget broke" in bad.output

    slow = _invoke(app, "executor", "show", "slow")
    assert "state:     running" in slow.output
    assert "progress = 0.5" in slow.output
    assert "stage = render" in slow.output


@pytest.mark.parametrize("command", ["show", "cancel"])
def test_unknown_key_exits_non_zero_naming_it(
    app: Flask, make_thread_executor: Callable[..., Executor], command: str
) -> None:
    make_thread_executor(app)
    result = _invoke(app, "executor", command, "no-such-key")
    assert result.exit_code != 0
    assert "no-such-key" in result.output


def test_cancel_stops_a_pending_task_and_refuses_a_running_thread(
    app: Flask, make_thread_executor: Callable[..., Executor], gates: Gates
) -> None:
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=1)
    started, gate = gates.new(), gates.new()
    with app.app_context():
        executor.submit_stored("running", _progress_then_wait, started, gate)
        executor.submit_stored("waiting", _answer)
    wait_for_path(started)

    result = _invoke(app, "executor", "cancel", "waiting")
    assert result.exit_code == 0, result.output
    assert "cancelled 'waiting'" in result.output
    assert executor.futures.state("waiting") == "cancelled"

    refused = _invoke(app, "executor", "cancel", "running")
    assert refused.exit_code != 0
    assert "'running' could not be cancelled" in refused.output
    assert executor.futures.state("running") == "running"

    again = _invoke(app, "executor", "cancel", "waiting")
    assert again.exit_code != 0
    assert "already cancelled" in again.output


def test_purge_removes_ended_tasks_and_keeps_running_ones(
    busy: tuple[Executor, str], app: Flask
) -> None:
    executor, gate = busy
    result = _invoke(app, "executor", "purge")
    assert result.exit_code == 0, result.output
    assert "removed 2" in result.output
    assert executor.futures.keys() == ["slow"]
    open(gate, "w").close()
    assert executor.futures.result("slow", timeout=TIMEOUT) == "slow done"


def test_a_named_executor_gets_its_own_group(
    app: Flask, make_thread_executor: Callable[..., Executor]
) -> None:
    executor = make_thread_executor(app, name="reports")
    with app.app_context():
        executor.submit_stored("r1", _answer).result(TIMEOUT)
    result = _invoke(app, "reports-executor", "list")
    assert result.exit_code == 0, result.output
    assert "r1" in result.stdout
    assert "REPORTS_EXECUTOR_STORE" in result.stderr


OTHER_PROCESS = """
    import sys, time, os
    from flask import Flask
    from flask_executor import Executor, current_task

    app = Flask("other_process")
    app.config.update(
        SECRET_KEY="shared-secret",
        EXECUTOR_STORE=sys.argv[1],
        EXECUTOR_STORE_NAMESPACE="cli-test",
    )
    executor = Executor(app)
    gate = sys.argv[2]

    def wait_for_gate():
        current_task.update(progress=0.25)
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"

    with app.app_context():
        executor.submit_stored("other-done", lambda: 42).result(10)
        executor.submit_stored("other-running", wait_for_gate)
    # Ready once the store (what other processes read) has both tasks' state; this
    # process's own futures can run a moment ahead of their records.
    store = executor.futures.store
    deadline = time.monotonic() + 30
    while not (
        getattr(store.get("other-running"), "meta", None) == {"progress": 0.25}
        and getattr(store.get("other-done"), "state", None) == "finished"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    print("ready", os.getpid(), flush=True)
    executor.futures.result("other-running", timeout=30)
    executor.shutdown()
"""


@pytest.mark.slow
def test_a_shared_store_shows_every_process_tasks(
    app: Flask, make_thread_executor: Callable[..., Executor], tmp_path: Path
) -> None:
    """Tasks that another process submitted to the SQLite store show up."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    gate = tmp_path / "gate"
    script = tmp_path / "other.py"
    script.write_text(textwrap.dedent(OTHER_PROCESS))
    app.config["SECRET_KEY"] = "shared-secret"
    make_thread_executor(app, EXECUTOR_STORE=url, EXECUTOR_STORE_NAMESPACE="cli-test")
    with subprocess.Popen(
        [sys.executable, str(script), url, str(gate)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ) as other:
        try:
            assert other.stdout is not None
            ready = other.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            result = _invoke(app, "executor", "list")
            assert result.exit_code == 0, result.output
            rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
            assert rows["other-running"][1:3] == ["running", "25%"]
            assert rows["other-done"][1] == "finished"
            assert "only sees" not in result.stderr

            shown = _invoke(app, "executor", "show", "other-done")
            assert "result:    42" in shown.output
            assert f":{ready[1]}" in shown.output  # the owner is the other process
        finally:
            gate.touch()
            other.wait(TIMEOUT)
    assert other.returncode == 0
    purged = _invoke(app, "executor", "purge")
    assert "removed 2" in purged.output
