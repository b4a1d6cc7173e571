"""The task dashboard blueprint, through Flask's test client (the browser test
is ``test_dashboard_browser.py``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from support import TIMEOUT, Gates, wait_for_path, wait_until

from flask_executor import Executor, current_task
from flask_executor.dashboard import CSRF_COOKIE


def _answer() -> int:
    return 42


def _fail() -> None:
    raise ValueError("the widget broke")


def _step_then_wait(started: str, gate: str) -> str:
    current_task.update(progress=0.4, stage="render")
    open(started, "w").close()
    wait_for_path(gate)
    return "slow done"


Setup = Callable[..., tuple[Executor, FlaskClient]]


@pytest.fixture
def mount(app: Flask, make_thread_executor: Callable[..., Executor]) -> Setup:
    """``mount(authorize=..., **config)``: a thread executor with its dashboard at /executor."""

    def setup(authorize: Callable[[], object] = lambda: True, **config: Any) -> tuple[
        Executor, FlaskClient
    ]:
        executor = make_thread_executor(app, **{"EXECUTOR_MAX_WORKERS": 2, **config})
        blueprint = executor.dashboard_blueprint(authorize=authorize, stream_seconds=5)
        app.register_blueprint(blueprint, url_prefix="/executor")
        return executor, app.test_client()

    return setup


@pytest.fixture
def busy(app: Flask, mount: Setup, gates: Gates) -> Iterator[tuple[Executor, FlaskClient, str]]:
    """A dashboard over a finished, a failed and a running task (progress 0.4)."""
    executor, client = mount()
    started, gate = gates.new(), gates.new()
    with app.app_context():
        executor.submit_stored("done", _answer).result(TIMEOUT)
        assert executor.submit_stored("bad", _fail).exception(TIMEOUT) is not None
        executor.submit_stored("slow", _step_then_wait, started, gate)
    wait_for_path(started)
    wait_until(lambda: executor.futures.meta("slow") == {"progress": 0.4, "stage": "render"})
    # The records trail the futures by a write (done callbacks): wait for both ends.
    wait_until(lambda: all(executor.futures.record(k).finished_at for k in ("done", "bad")))
    yield executor, client, gate


def _events(client: FlaskClient, url: str) -> Iterator[tuple[str, Any]]:
    """The (event, data) pairs of a server-sent events response, as they arrive."""
    response = client.get(url, buffered=False)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    buffer = ""
    try:
        for chunk in response.response:
            buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                fields = dict(
                    line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
                    and ": " in line
                )
                if "event" in fields:
                    yield fields["event"], json.loads(fields["data"])
    finally:
        response.close()


def test_authorize_is_required(app: Flask, make_thread_executor: Callable[..., Executor]) -> None:
    executor = make_thread_executor(app)
    with pytest.raises(TypeError, match=r"authorize=lambda: True"):
        executor.dashboard_blueprint()


def test_every_request_asks_authorize(app: Flask, mount: Setup) -> None:
    calls: list[str] = []
    allowed = {"yes": False}

    def authorize() -> bool:
        from flask import request

        calls.append(request.path)
        return allowed["yes"]

    executor, client = mount(authorize=authorize)
    with app.app_context():
        executor.submit_stored("k", _answer).result(TIMEOUT)
    urls = ["/executor/", "/executor/task/k", "/executor/api/tasks", "/executor/api/task/k",
            "/executor/events", "/executor/static/dashboard.js"]
    for url in urls:
        with client.get(url) as response:
            assert response.status_code == 403, url
    for url in ["/executor/cancel", "/executor/purge"]:
        assert client.post(url, data={"key": "k"}).status_code == 403, url
    assert calls == [*urls, "/executor/cancel", "/executor/purge"]
    assert executor.futures.keys() == ["k"]  # the refused purge removed nothing

    allowed["yes"] = True
    assert client.get("/executor/").status_code == 200
    with client.get("/executor/static/dashboard.css") as css:
        assert css.status_code == 200


def test_page_lists_tasks_newest_first_without_javascript(
    busy: tuple[Executor, FlaskClient, str],
) -> None:
    _, client, _ = busy
    page = client.get("/executor/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert re.findall(r'<tr class="task" data-key="([^"]+)"', html) == ["slow", "bad", "done"]
    slow = html[html.index('data-key="slow"'):html.index('data-key="bad"')]
    assert 'style="width: 40.0%"' in slow and "40%" in slow
    assert "<span>stage</span> render" in slow
    assert "s-running" in slow and "_step_then_wait" in slow
    bad = html[html.index('data-key="bad"'):html.index('data-key="done"')]
    assert "ValueError" in bad and "the widget broke" in bad
    assert "<script" in html and "cdn" not in html.lower() and "https://" not in html


def test_filter_by_state(busy: tuple[Executor, FlaskClient, str]) -> None:
    _, client, _ = busy
    html = client.get("/executor/?state=failed").get_data(as_text=True)
    assert re.findall(r'<tr class="task" data-key="([^"]+)"', html) == ["bad"]
    assert re.search(r'data-count="all">3<', html)


def test_detail_page_shows_result_error_and_meta(busy: tuple[Executor, FlaskClient, str]) -> None:
    _, client, _ = busy
    done = client.get("/executor/task/done").get_data(as_text=True)
    assert '<pre class="result">42</pre>' in done
    bad = client.get("/executor/task/bad").get_data(as_text=True)
    assert "ValueError" in bad and "the widget broke" in bad
    slow = client.get("/executor/task/slow").get_data(as_text=True)
    assert "<span>stage</span> render" in slow
    assert client.get("/executor/task/nope").status_code == 404


def test_json_api(busy: tuple[Executor, FlaskClient, str]) -> None:
    _, client, _ = busy
    data = client.get("/executor/api/tasks").get_json()
    assert [task["key"] for task in data["tasks"]] == ["slow", "bad", "done"]
    slow = data["tasks"][0]
    assert (slow["state"], slow["progress"], slow["meta"]["stage"]) == ("running", 0.4, "render")
    assert data["tasks"][1]["error_type"].endswith("ValueError")
    pool = data["pool"]
    assert pool["backend"] == "thread" and pool["configured_workers"] == 2
    assert pool["busy"] == 1 and pool["queue"] == 0
    assert pool["per_second"] == pytest.approx(2 / 60)  # two ended in the last minute
    assert client.get("/executor/api/task/bad").get_json()["error_message"] == "the widget broke"
    assert client.get("/executor/api/task/nope").status_code == 404


def test_events_tell_an_app_page_when_its_task_is_done(
    app: Flask, mount: Setup, gates: Gates
) -> None:
    executor, client = mount()
    started, gate = gates.new(), gates.new()
    with app.app_context():
        executor.submit_stored("report", _step_then_wait, started, gate)
    wait_for_path(started)
    seen = []
    for event, data in _events(client, "/executor/events?key=report"):
        seen.append((event, data["state"]))
        if event == "task":
            open(gate, "w").close()  # let it finish while the stream is open
        if event == "done":
            break
    assert seen[0] == ("task", "running")
    assert seen[-1] == ("done", "finished")
    # Connecting after the end answers at once.
    assert next(_events(client, "/executor/events?key=report"))[0] == "done"
    assert next(_events(client, "/executor/events?key=nope")) == ("missing", {"key": "nope"})


def test_events_stream_changes_and_ends_after_a_bounded_time(
    busy: tuple[Executor, FlaskClient, str],
) -> None:
    executor, client, gate = busy
    kinds: list[str] = []
    states: dict[str, str] = {}
    for event, data in _events(client, "/executor/events"):
        kinds.append(event)
        if event == "keys":
            assert data == ["slow", "bad", "done"]
        if event == "task":
            states[data["key"]] = data["state"]
            if len(states) == 3:
                open(gate, "w").close()
    assert kinds[0] == "keys"
    assert kinds[-1] == "reconnect"  # the stream ended by itself (stream_seconds=5)
    assert "pool" in kinds
    assert states == {"slow": "finished", "bad": "failed", "done": "finished"}


def _token(client: FlaskClient) -> str:
    client.get("/executor/")
    cookie = client.get_cookie(CSRF_COOKIE, path="/executor/")
    assert cookie is not None
    return cookie.value


def test_cancel_needs_the_token_and_a_same_origin_request(
    app: Flask, mount: Setup, gates: Gates
) -> None:
    executor, client = mount(EXECUTOR_MAX_WORKERS=1)
    started, gate = gates.new(), gates.new()
    with app.app_context():
        executor.submit_stored("running", _step_then_wait, started, gate)
        executor.submit_stored("waiting", _answer)
    wait_for_path(started)
    token = _token(client)
    refused = [
        ({"key": "waiting"}, {}),  # no token
        ({"key": "waiting", "csrf_token": "forged"}, {}),
        ({"key": "waiting", "csrf_token": token}, {"Origin": "https://evil.example"}),
        ({"key": "waiting", "csrf_token": token}, {"Sec-Fetch-Site": "cross-site"}),
        ({"key": "waiting", "csrf_token": token}, {"Sec-Fetch-Site": "same-site"}),
        (  # the browser's verdict wins over an Origin that looks like ours
            {"key": "waiting", "csrf_token": token},
            {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},
        ),
    ]
    for form, headers in refused:
        assert client.post("/executor/cancel", data=form, headers=headers).status_code == 403
    assert executor.futures.state("waiting") == "pending"

    answer = client.post(
        "/executor/cancel",
        data={"key": "waiting", "csrf_token": token},
        # Behind a TLS-terminating proxy the browser's Origin says https.
        headers={"Origin": "https://localhost", "Sec-Fetch-Site": "same-origin"},
    )
    assert answer.status_code == 303 and answer.location.endswith("/executor/")
    assert executor.futures.state("waiting") == "cancelled"

    running = client.post(
        "/executor/cancel", data={"key": "running", "csrf_token": token},
        headers={"Accept": "application/json"},
    )
    assert running.status_code == 409  # a running thread cannot be stopped
    assert "could not be cancelled" in running.get_json()["message"]
    unknown = client.post("/executor/cancel", data={"key": "nope", "csrf_token": token})
    assert unknown.status_code == 404


def test_purge_removes_ended_tasks_and_keeps_running_ones(
    busy: tuple[Executor, FlaskClient, str],
) -> None:
    executor, client, gate = busy
    token = _token(client)
    assert client.post("/executor/purge", data={}).status_code == 403
    answer = client.post(
        "/executor/purge", data={"csrf_token": token}, headers={"Accept": "application/json"}
    )
    assert answer.get_json() == {"ok": True, "message": "removed 2 finished task(s)"}
    assert executor.futures.keys() == ["slow"]


def test_process_pool_stats_name_each_worker(
    app: Flask, make_executor: Callable[..., Executor]
) -> None:
    """Process workers: pid, busy or idle, tasks run, resident memory."""
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2)
    app.register_blueprint(executor.dashboard_blueprint(authorize=lambda: True), url_prefix="/x")
    client = app.test_client()
    assert client.get("/x/api/tasks").get_json()["pool"]["started"] is False
    with app.app_context():
        for i in range(4):
            executor.submit_stored(f"t{i}", _answer).result(TIMEOUT)
    pool = client.get("/x/api/tasks").get_json()["pool"]
    assert pool["backend"] == "process" and pool["started"] is True
    assert pool["configured_workers"] == 2 and pool["queue"] == 0
    assert 1 <= len(pool["workers"]) <= 2
    assert sum(worker["tasks_run"] for worker in pool["workers"]) == 4
    for worker in pool["workers"]:
        assert isinstance(worker["pid"], int) and worker["busy"] is False
        assert worker["memory"] > 1024 * 1024
    html = client.get("/x/").get_data(as_text=True)
    assert str(pool["workers"][0]["pid"]) in html and "MiB" in html


@pytest.fixture(params=["process-forkserver"])
def executor_type(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


GUNICORN_APP = '''
import os
from flask import Flask, jsonify
from flask_executor import Executor

app = Flask(__name__)
app.config.update(SECRET_KEY="dashboard-test", EXECUTOR_STORE=os.environ["TEST_STORE"],
                  EXECUTOR_MAX_WORKERS=1)
executor = Executor(app)
app.register_blueprint(
    executor.dashboard_blueprint(authorize=lambda: True, stream_seconds=2),
    url_prefix="/executor",
)

def hold(gate):
    while not os.path.exists(gate):
        import time
        time.sleep(0.02)
    return os.getpid()

@app.post("/start/<key>")
def start(key):
    executor.submit_stored(key, hold, os.environ["TEST_GATE"])
    return jsonify(pid=os.getpid()), 202
'''


OTHER_OWNER = """
import os
import dashapp

with dashapp.app.app_context():
    for i in range(3):
        dashapp.executor.submit_stored(f"ext{i}", dashapp.hold, os.environ["TEST_GATE"])
print("ready", os.getpid(), flush=True)
for i in range(3):
    try:
        dashapp.executor.futures.result(f"ext{i}", timeout=60)
    except Exception:
        pass  # the cancelled one
dashapp.executor.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_under_gunicorn_every_worker_shows_and_cancels_every_process_tasks(
    tmp_path: Path, worker_class: str
) -> None:
    """Three gunicorn workers and one more process share a SQLite store: whichever worker
    serves the dashboard lists the tasks of every process, streams them (a sync worker is
    held only until the stream ends), and cancels another process's pending task."""
    import os
    import subprocess
    import sys

    from servers import GunicornServer

    (tmp_path / "dashapp.py").write_text(GUNICORN_APP)
    (tmp_path / "other.py").write_text(OTHER_OWNER)
    gate = tmp_path / "gate"
    env = {"TEST_STORE": f"sqlite:///{tmp_path / 'tasks.db'}", "TEST_GATE": str(gate)}
    args = ["-k", worker_class] + (["--threads", "4"] if worker_class == "gthread" else [])
    with GunicornServer("dashapp:app", cwd=tmp_path, workers=3, args=args, env=env) as server, \
            subprocess.Popen(
                [sys.executable, "other.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                                         *sys.path])},
            ) as other:
        try:
            assert other.stdout is not None
            ready = other.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            owners = {f"ext{i}": int(ready[1]) for i in range(3)}
            for i in range(4):
                started = server.post(f"/start/t{i}")
                assert started.status == 202, started
                owners[f"t{i}"] = started.json()["pid"]
            assert len(set(owners.values())) >= 2

            for _ in range(6):  # whichever worker answers
                listing = server.get("/executor/api/tasks")
                assert listing.status == 200, listing
                shown = {task["key"]: task for task in listing.json()["tasks"]}
                assert {k: int(t["owner"].rsplit(":", 1)[1]) for k, t in shown.items()} == owners

            # Cancel the other process's pending task, from a gunicorn worker.
            assert shown["ext1"]["state"] == "pending"  # EXECUTOR_MAX_WORKERS=1 there
            page = server.get("/executor/")
            cookie = page.headers["Set-Cookie"].split(";", 1)[0]
            token = cookie.split("=", 1)[1]
            answer = server.post(
                "/executor/cancel",
                f"key=ext1&csrf_token={token}".encode(),
                headers={"Cookie": cookie, "Accept": "application/json",
                         "Content-Type": "application/x-www-form-urlencoded",
                         "Sec-Fetch-Site": "same-origin"},
            )
            assert answer.status == 200, answer
            assert server.get("/executor/api/task/ext1").json()["state"] == "cancelled"

            stream = server.get("/executor/events")  # ends by itself after 2 s
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            events = stream.text.split("\n\n")
            keys = {json.loads(block.split("data: ", 1)[1])["key"]
                    for block in events if block.startswith("event: task")}
            assert keys == set(owners)
            assert any(block.startswith("event: reconnect") for block in events)
            # The worker that held the stream serves again.
            assert all(server.get("/executor/api/tasks").status == 200 for _ in range(6))
        finally:
            gate.touch()
            other.wait(TIMEOUT)
    assert other.returncode == 0


@pytest.mark.slow
def test_dask_pool_stats_list_the_cluster_workers(
    app: Flask, shutdown_after: Callable[[Executor], Executor], dask_scheduler_address: str
) -> None:
    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=dask_scheduler_address)
    executor = shutdown_after(Executor(app))
    app.register_blueprint(executor.dashboard_blueprint(authorize=lambda: True), url_prefix="/x")
    with app.app_context():
        executor.submit_stored("sum", sum, [1, 2]).result(TIMEOUT)
    pool = app.test_client().get("/x/api/tasks").get_json()["pool"]
    assert pool["backend"] == "dask" and pool["started"] is True
    assert len(pool["workers"]) == 2  # the test cluster's
    for worker in pool["workers"]:
        assert "tcp://127.0.0.1:" in worker["name"]
        # From the worker's last heartbeat, which may predate the task's end.
        assert isinstance(worker["busy"], bool) and worker["memory"] > 1024 * 1024
    assert (pool["busy"], pool["queue"]) == (0, 0)  # from this client's own futures
