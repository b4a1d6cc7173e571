"""``EXECUTOR_TYPE = 'immediate'``: tasks run in the submitting thread during ``submit()``
and return a finished future; with ``EXECUTOR_IMMEDIATE_PICKLE`` they take the process
path (pickled call, context rebuilt from the snapshot) in the same thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from flask import Flask, current_app, g, has_request_context, request, session

from flask_executor import (
    Executor,
    GAttributeNotCopiedError,
    SerializationError,
    TaskTimeoutError,
    current_task,
)
from flask_executor.signals import task_failed, task_finished, task_submitted

MODES = ["immediate", "immediate-pickle"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def make(mode: str, shutdown_after: Callable[[Executor], Executor]) -> Callable[..., Executor]:
    def make(app: Flask, name: str = "", **config: Any) -> Executor:
        prefix = f"{name.upper()}_" if name else ""
        config = {
            "EXECUTOR_TYPE": "immediate",
            "EXECUTOR_IMMEDIATE_PICKLE": mode == "immediate-pickle",
            **config,
        }
        for key, value in config.items():
            app.config[prefix + key] = value
        return shutdown_after(Executor(app, name=name))

    return make


@pytest.fixture
def ex(app: Flask, make: Callable[..., Executor]) -> Executor:
    return make(app)


# -- module-level tasks: the pickling mode sends them by reference ---------------


def context_seen(x: int) -> dict[str, Any]:
    g.user = "changed in the task"
    return {
        "x": x,
        "thread": threading.get_ident(),
        "user": g.user_at_submit,
        "arg": request.args["q"],
        "form": request.form.get("name"),
        "session": session.get("cart"),
        "url": request.url,
        "testing": current_app.config["TESTING"],
    }


def fail(message: str) -> None:
    raise LookupError(message)


def double(x: int) -> int:
    return 2 * x


def add(x: int, y: int) -> int:
    return x + y


def report_progress() -> str:
    current_task.update(progress=0.5, stage="half")
    current_task.update(progress=1.0)
    return "done"


def read_g_conn() -> Any:
    return g.conn


def app_extensions() -> list[str]:
    return sorted(current_app.extensions)


def sleep_then(seconds: float) -> str:
    time.sleep(seconds)
    return "late"


def has_request() -> bool:
    return has_request_context()


# -- tests ---------------------------------------------------------------------------


def test_submit_returns_a_finished_future_with_the_copied_context(app: Flask, ex: Executor) -> None:
    with app.test_request_context("/path/1?q=search", method="POST", data={"name": "Ann"}):
        g.user_at_submit = "ann"
        g.user = "ann"
        session["cart"] = [1, 2]
        future = ex.submit(context_seen, 7)
        assert future.done()
        seen = future.result(timeout=0)
        # The task's change to g stays in the task; the view's context is untouched.
        assert g.user == "ann"
        assert request.path == "/path/1"
    assert seen == {
        "x": 7,
        "thread": threading.get_ident(),
        "user": "ann",
        "arg": "search",
        "form": "Ann",
        "session": [1, 2],
        "url": "http://localhost/path/1?q=search",
        "testing": True,
    }


def test_a_failing_task_gives_a_failed_future_not_an_exception_from_submit(
    app: Flask, ex: Executor
) -> None:
    with app.app_context():
        future = ex.submit(fail, "no such row")
    assert future.done()
    error = future.exception(timeout=0)
    assert isinstance(error, LookupError)
    assert str(error) == "no such row"


def exit_task() -> None:
    raise SystemExit(3)


def test_sys_exit_in_a_task_is_the_tasks_own_error(app: Flask, ex: Executor) -> None:
    with app.app_context():
        future = ex.submit(exit_task)
        assert ex.submit(double, 1).result(timeout=0) == 2
    error = future.exception(timeout=0)
    # args, not .code: pickled, .code is lost when tblib's pickling support is installed.
    assert isinstance(error, SystemExit) and error.args == (3,)


def test_the_task_never_sees_the_callers_pushed_context(app: Flask, make: Any) -> None:
    # Without EXECUTOR_PUSH_APP_CONTEXT a thread or process task has no context at
    # all; the caller's request, pushed in this very thread, must not leak in.
    ex = make(app, EXECUTOR_PUSH_APP_CONTEXT=False)
    with app.test_request_context("/"):
        assert ex.submit(has_request).result(timeout=0) is False
    with app.test_request_context("/"):
        assert make(app, name="ctx").submit(has_request).result(timeout=0) is True


def test_map_returns_results_in_order(app: Flask, ex: Executor) -> None:
    with app.app_context():
        assert list(ex.map(double, range(5))) == [0, 2, 4, 6, 8]
        assert list(ex.map(add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]


def test_submit_stored_and_the_status_endpoint(app: Flask, ex: Executor) -> None:
    app.register_blueprint(ex.status_blueprint(), url_prefix="/tasks")

    def view(item_id: int) -> str:
        ex.submit_stored(f"report-{item_id}", report_progress)
        return "started"

    app.extensions["test_view"] = view
    client = app.test_client()
    assert client.post("/view/3").text == "started"
    # The task is done when the request returns: that is the point of immediate mode.
    assert ex.futures.done("report-3") is True
    body = client.get("/tasks/report-3").get_json()
    assert body == {
        "key": "report-3",
        "state": "finished",
        "meta": {"progress": 1.0, "stage": "half"},
        "result": "done",
        "error": None,
    }
    with pytest.raises(ValueError, match="report-3"):
        with app.app_context():
            ex.submit_stored("report-3", report_progress)


def test_current_task_update_reaches_future_meta(app: Flask, ex: Executor) -> None:
    with app.app_context():
        future = ex.submit(report_progress)
    assert future.meta == {"progress": 1.0, "stage": "half"}


_attempts: dict[str, int] = {}


def flaky(name: str) -> str:
    _attempts[name] = _attempts.get(name, 0) + 1
    if _attempts[name] < 3:
        raise ConnectionError(f"attempt {_attempts[name]}")
    return f"ok after {_attempts[name]}"


def test_jobs_with_retries(app: Flask, ex: Executor, mode: str) -> None:
    job = ex.job(retries=3, retry_on=(ConnectionError,))(flaky)
    name = f"retries-{mode}"
    with app.app_context():
        future = job.submit(name)
        assert future.result(timeout=0) == "ok after 3"
        assert future.meta == {"attempt": 3}
        assert list(ex.job(double).map([1, 2])) == [2, 4]


def test_callbacks_run_at_once_in_the_app_context(app: Flask, make: Any) -> None:
    seen: list[Any] = []
    ex = make(app)
    ex.add_default_done_callback(lambda f: seen.append(("default", current_app.name)))
    with app.test_request_context("/"):
        future = ex.submit(double, 21)
    assert seen == [("default", app.name)]
    future.add_done_callback(lambda f: seen.append(("added", f.result(), current_app.name)))
    assert seen[-1] == ("added", 42, app.name)


def test_propagate_exceptions_logs_the_failure(
    app: Flask, make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ex = make(app, EXECUTOR_PROPAGATE_EXCEPTIONS=True)
    with caplog.at_level(logging.ERROR, logger=app.logger.name), app.app_context():
        ex.submit(fail, "boom")
    assert any("LookupError" in record.getMessage() for record in caplog.records)


def test_signals_are_sent_in_order(app: Flask, ex: Executor) -> None:
    events: list[tuple[str, Any]] = []

    def record(name: str) -> Callable[..., None]:
        return lambda sender, **kw: events.append((name, kw.get("key")))

    with (
        task_submitted.connected_to(record("submitted"), app),
        task_finished.connected_to(record("finished"), app),
        task_failed.connected_to(record("failed"), app),
        app.app_context(),
    ):
        ex.submit_stored("a", double, 1)
        ex.submit(fail, "x")
    assert events == [
        ("submitted", "a"),
        ("finished", "a"),
        ("submitted", None),
        ("failed", None),
    ]


def test_a_task_past_its_time_limit_fails_with_task_timeout(app: Flask, make: Any) -> None:
    ex = make(app, EXECUTOR_TASK_TIMEOUT=0.05)
    with app.app_context():
        future = ex.submit(sleep_then, 0.2)
        assert isinstance(future.exception(timeout=0), TaskTimeoutError)
        assert ex.submit(sleep_then, 0).result(timeout=0) == "late"


def test_submit_after_shutdown_raises(app: Flask, ex: Executor) -> None:
    ex.shutdown()
    with app.app_context(), pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(double, 1)


def test_an_unknown_type_names_immediate_among_the_choices(app: Flask) -> None:
    app.config["EXECUTOR_TYPE"] = "eager"
    with pytest.raises(ValueError, match="'immediate'"):
        Executor(app)


# -- what only the pickling mode catches -------------------------------------------------


@pytest.fixture
def pickling(app: Flask, shutdown_after: Callable[[Executor], Executor]) -> Iterator[Executor]:
    app.config.update(EXECUTOR_TYPE="immediate", EXECUTOR_IMMEDIATE_PICKLE="true")
    yield shutdown_after(Executor(app))


def test_pickling_mode_rejects_an_unpicklable_argument_in_submit(
    app: Flask, pickling: Executor
) -> None:
    with app.app_context(), pytest.raises(SerializationError, match=r"args\[0\].*lock"):
        pickling.submit(double, threading.Lock())


def test_pickling_mode_leaves_out_a_g_value_that_does_not_travel(
    app: Flask, pickling: Executor
) -> None:
    with app.app_context():
        g.conn = threading.Lock()
        error = pickling.submit(read_g_conn).exception(timeout=0)
        assert isinstance(error, GAttributeNotCopiedError)
        assert "conn" in str(error) and "pickled" in str(error)


def test_pickling_mode_runs_in_a_stand_in_app_not_the_live_one(
    app: Flask, pickling: Executor
) -> None:
    app.config["EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE"] = ()
    with app.app_context():
        # The live app has the executor registered; a process worker's stand-in does not.
        assert "executor" in current_app.extensions
        assert pickling.submit(app_extensions).result(timeout=0) == []
        # ... and the live app's config is left as it was.
        assert current_app.config["EXECUTOR_TYPE"] == "immediate"
        assert current_app.extensions["executor"] is pickling


def test_pickling_mode_sends_results_back_pickled(app: Flask, pickling: Executor) -> None:
    with app.app_context():
        error = pickling.submit(lambda: threading.Lock()).exception(timeout=0)
    assert isinstance(error, SerializationError)
    assert "return value" in str(error)


def test_the_future_is_a_real_future(app: Flask, ex: Executor) -> None:
    with app.app_context():
        future = ex.submit(double, 2)
    assert isinstance(future, Future)
    assert not future.running() and not future.cancelled() and future.done()
    assert future.cancel() is False


def endpoint_and_teardown_marker(marker: str) -> tuple[str | None, bool]:
    g.teardown_marker = marker
    return request.endpoint, "executor" in current_app.extensions


def test_pickling_mode_builds_the_worker_app_with_the_factory(
    app: Flask, shutdown_after: Callable[[Executor], Executor], tmp_path: Any
) -> None:
    # support:create_app registers a teardown handler that writes g.teardown_marker to the
    # TEARDOWN_LOG file: it runs in the factory-built app, after the task, as in a worker.
    log = tmp_path / "teardown.log"
    app.config.update(
        EXECUTOR_TYPE="immediate",
        EXECUTOR_IMMEDIATE_PICKLE=True,
        EXECUTOR_APP_FACTORY="support:create_app",
        TEARDOWN_LOG=str(log),
    )
    executor = shutdown_after(Executor(app))
    with app.test_request_context("/path/5"):
        future = executor.submit(endpoint_and_teardown_marker, "m1")
    # The factory's app (no executor on it), not the live one; its teardown ran.
    assert future.result(timeout=0) == ("item", False)
    assert log.read_text().split() == ["m1"]
