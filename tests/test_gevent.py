"""Under ``gunicorn -k gevent`` (a monkey-patched process), thread and process mode work,
and waiting for a task never blocks the other requests of the same worker; what cannot
work there (Dask, the ``fork`` start method) is refused by ``init_app`` with the reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from servers import GunicornServer, Response
from support import TIMEOUT

APP = textwrap.dedent(
    """
    import os
    import sys

    from flask import Flask, g, jsonify, request
    from flask_executor import Executor
    from support import wait_for_path

    def task(gate, size):
        wait_for_path(gate)
        return {"pid": os.getpid(), "q": request.args["q"], "user": g.user, "blob": "x" * size}

    app = Flask(__name__)
    app.config["EXECUTOR_TYPE"] = os.environ["EXECUTOR_TYPE"]
    app.config["EXECUTOR_MAX_WORKERS"] = 2
    executor = Executor(app)

    @app.get("/task")
    def run_task():
        g.user = "ann"
        size = int(request.args.get("size", "0"))
        future = executor.submit(task, request.args["gate"], size)
        answer = future.result(timeout=60)
        return jsonify(answer, len(answer.pop("blob")))

    @app.get("/ping")
    def ping():
        import gevent.monkey

        return jsonify(patched=gevent.monkey.is_module_patched("threading"), pid=os.getpid())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_tasks_run_and_waiting_for_one_does_not_block_the_worker(tmp_path: Path, kind: str) -> None:
    (tmp_path / "geventapp.py").write_text(APP)
    gate = tmp_path / "gate"
    with GunicornServer(
        "geventapp:app",
        cwd=tmp_path,
        workers=1,
        args=["-k", "gevent", "--timeout", "60"],
        env={"EXECUTOR_TYPE": kind},
    ) as server:
        web_pid = server.worker_pids()[0]
        pong = server.get("/ping").json()
        assert pong == {"patched": True, "pid": web_pid}

        answers: list[Response] = []
        waiting = threading.Thread(
            target=lambda: answers.append(server.get(f"/task?q=slow&gate={gate}")),
            daemon=True,
        )
        waiting.start()
        # One gevent worker: the view waiting on future.result() and the task (a greenlet
        # in thread mode; the dispatcher greenlet and its pipes in process mode) must all
        # yield, or this request could not be answered before the gate opens.
        assert server.get("/ping", timeout=TIMEOUT).json()["pid"] == web_pid
        assert not answers, "the task finished although its gate was closed"
        gate.touch()
        waiting.join(TIMEOUT)
        assert not waiting.is_alive()
        ((result, _),) = [answer.json() for answer in answers]
        assert (result["q"], result["user"]) == ("slow", "ann")
        assert (result["pid"] == web_pid) is (kind == "thread")

        # Megabytes through the pipes (process mode) come back whole.
        big = server.get(f"/task?q=big&gate={gate}&size={4 * 1024 * 1024}")
        assert big.status == 200, server.output()
        assert big.json()[1] == 4 * 1024 * 1024


REFUSE = textwrap.dedent(
    """
    import gevent.monkey

    gevent.monkey.patch_all()

    import sys
    from flask import Flask
    from flask_executor import Executor

    app = Flask(__name__)
    app.config.update(EXECUTOR_TYPE=sys.argv[1], EXECUTOR_START_METHOD=sys.argv[2] or None)
    try:
        Executor(app)
    except RuntimeError as exc:
        print("refused:", exc)
    else:
        print("accepted")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "start_method", "expected"),
    [
        ("dask", "", "refused: EXECUTOR_TYPE = 'dask': the Dask client cannot work under gevent"),
        ("process", "fork", "refused: EXECUTOR_TYPE = 'process': EXECUTOR_START_METHOD = 'fork'"),
        ("process", "", "accepted"),
        ("process", "spawn", "accepted"),
        ("thread", "", "accepted"),
    ],
)
def test_init_app_refuses_what_cannot_work_under_gevent(
    tmp_path: Path, kind: str, start_method: str, expected: str
) -> None:
    script = tmp_path / "refuse.py"
    script.write_text(REFUSE)
    result = subprocess.run(
        [sys.executable, str(script), kind, start_method],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected), result.stdout


PATCHED_AFTER_INIT = textwrap.dedent(
    """
    from flask import Flask
    from flask_executor import Executor

    # As with gunicorn --preload: the app is built before the server worker patches.
    app = Flask(__name__)
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="fork")
    executor = Executor(app)

    import gevent.monkey

    gevent.monkey.patch_all()
    with app.app_context():
        try:
            executor.submit(print, "ran")
        except RuntimeError as exc:
            print("refused:", exc)
    """
)


@pytest.mark.slow
def test_an_app_built_before_patching_is_refused_at_its_first_submit(tmp_path: Path) -> None:
    script = tmp_path / "preload.py"
    script.write_text(PATCHED_AFTER_INIT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused: EXECUTOR_START_METHOD = 'fork' cannot work"), (
        result.stdout
    )
