"""Stored tasks under a real gunicorn with three sync workers: whichever worker answers a
poll sees the task another worker started, and a killed owner's task is reported lost."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import GunicornServer, RedisServer
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent

APP = '''
import os
import time

from flask import Flask, jsonify

from flask_executor import Executor, current_task

app = Flask(__name__)
app.config.update(SECRET_KEY="gunicorn-test", EXECUTOR_STORE=os.environ["TEST_STORE"],
                  EXECUTOR_MAX_WORKERS=2)
executor = Executor(app)
app.register_blueprint(executor.status_blueprint(authorize=lambda: True), url_prefix="/tasks")


def report(steps, delay):
    for i in range(steps):
        current_task.update(step=i + 1)
        time.sleep(delay)
    return {"steps": steps, "by": os.getpid()}


@app.post("/start/<key>/<int:steps>")
def start(key, steps):
    executor.submit_stored(key, report, steps, 0.2 if steps < 100 else 3)
    return jsonify(pid=os.getpid()), 202


@app.get("/poll/<key>")
def poll(key):
    futures = executor.futures
    if key not in futures:
        return jsonify(error="missing", pid=os.getpid()), 404
    state = futures.state(key)
    body = {"state": state, "meta": futures.meta(key), "pid": os.getpid()}
    if state == "finished":
        body["result"] = futures.result(key)
    if state == "failed":
        error = futures.exception(key)
        body["error"] = f"{type(error).__name__}: {error}"
    return jsonify(body)
'''


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/tasks.db"
        return
    with RedisServer(tmp_path) as server:
        yield server.url


def _app_dir(tmp_path: Path) -> Path:
    (tmp_path / "storeapp.py").write_text(APP)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--preload"]], ids=["lazy", "preload"])
def test_every_worker_answers_every_poll(store_url: str, tmp_path: Path, args: list[str]) -> None:
    env = {"TEST_STORE": store_url}
    with GunicornServer("storeapp:app", cwd=_app_dir(tmp_path), workers=3, env=env,
                        args=args) as server:
        started = server.post("/start/job-1/8")
        assert started.status == 202, started
        owner = started.json()["pid"]
        answers = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = server.get("/poll/job-1")
            assert answer.status == 200, answer  # never 404, whichever worker answers
            answers.append(answer.json())
            if answers[-1]["state"] == "finished":
                break
            time.sleep(0.02)
        assert answers[-1]["state"] == "finished"
        assert answers[-1]["result"] == {"steps": 8, "by": owner}
        assert answers[-1]["meta"] == {"step": 8}
        steps = [a["meta"].get("step", 0) for a in answers]
        assert steps == sorted(steps) and len(set(steps)) >= 3
        assert {a["state"] for a in answers} <= {"pending", "running", "finished"}
        assert len({a["pid"] for a in answers} - {owner}) >= 1  # other workers answered
        status = server.get("/tasks/job-1")
        assert status.status == 200 and status.json()["result"] == {"steps": 8, "by": owner}
        again = server.post("/start/job-1/8")  # the key is taken for every worker
        assert again.status == 500


@pytest.mark.slow
def test_killed_owner_is_reported_lost_by_the_others(store_url: str, tmp_path: Path) -> None:
    env = {"TEST_STORE": store_url}
    with GunicornServer("storeapp:app", cwd=_app_dir(tmp_path), workers=3, env=env) as server:
        owner = server.post("/start/long/1000").json()["pid"]
        # The store says "running" a write after the task starts, and this poll
        # may reach another worker at once: wait for it (the kill must hit a
        # running task).
        wait_until(lambda: server.get("/poll/long").json()["state"] == "running", 30)
        os.kill(owner, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:
            answer = server.get("/poll/long")
            assert answer.status == 200, answer
            body = answer.json()
            if body["state"] == "failed":
                break
            assert time.monotonic() - killed_at < 30, body
            time.sleep(0.1)
        assert body["pid"] != owner
        assert body["error"].startswith("TaskLostError: ")
        assert f"pid {owner}" in body["error"] and "host" in body["error"]


@pytest.mark.slow
def test_progress_example_under_three_workers_never_404s(tmp_path: Path) -> None:
    env = {"FLASK_EXECUTOR_STORE": f"sqlite:///{tmp_path}/progress.db",
           "FLASK_SECRET_KEY": "example-test"}
    example = tmp_path / "progress"
    shutil.copytree(ROOT / "examples" / "progress", example,
                    ignore=shutil.ignore_patterns("instance", "__pycache__", "*.log"))
    with GunicornServer("app:app", cwd=example, workers=3, env=env) as server:
        assert "<progress" in server.get("/").text
        key = server.post("/start").json()["key"]
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = server.get(f"/tasks/{key}")
            assert answer.status == 200, answer
            task = answer.json()
            seen.append((task["meta"] or {}).get("progress"))
            if task["state"] in ("finished", "failed"):
                break
            time.sleep(0.05)
        assert task["state"] == "finished", task
        assert task["result"] == 285
        progress = [p for p in seen if p is not None]
        assert len(set(progress)) >= 3 and progress == sorted(progress)
