"""The 2.0 features of issue 6: ``current_task`` and ``future.meta``, the status
blueprint, ``EXECUTOR_FUTURES_TTL``, signals, worker logs, ``await``, per-job retries
and time limits, and typing of ``submit``.

Features that cross the process boundary (meta, logs) run on every backend of
``make_executor``; the others on the thread pool, plus one process start method where
the behaviour depends on the worker. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import features_support as fs
import pytest
from conftest import backend_config
from flask import Flask, abort, g
from flask.typing import ResponseReturnValue
from support import Gates, block_until, touch, wait_for_path, wait_until

from flask_executor import Executor, TaskTimeoutError, current_task, signals

MakeExecutor = Callable[..., Executor]

#: Seconds any future in this module may take (the global per-test timeout is 60 s).
WAIT = 30

ROOT = Path(__file__).resolve().parent.parent


# -- current_task and future.meta ---------------------------------------------------


def test_meta_arrives_while_the_task_runs(
    app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app)
    go, gate = gates.new(), gates.new()
    future = executor.submit(fs.report_progress, go, gate)
    assert future.meta == {}

    touch(go)
    wait_until(lambda: future.meta == {"progress": 0.5})
    assert not future.done()
    copy = future.meta
    copy["progress"] = 0.9
    assert future.meta == {"progress": 0.5}, "future.meta must be a copy"

    touch(gate)
    seen = future.result(timeout=WAIT)
    assert seen == {"progress": 0.5, "stage": "render", "items": [1, 2], "info": {"page": 3}}
    # Every update made before the task returned is there once its future is done.
    assert future.meta == {**seen, "progress": 1.0}

    # A later task (maybe in the same worker) starts with an empty meta of its own.
    second = executor.submit(fs.meta_at_start_then_update, 7)
    assert second.result(timeout=WAIT) == {}
    assert second.meta == {"value": 7}
    assert future.meta == {**seen, "progress": 1.0}


def test_stored_future_meta_by_key(
    app: Flask, make_thread_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_thread_executor(app)
    started, gate = str(tmp_path / "started"), gates.new()
    future = executor.submit_stored("report", fs.update_then_block, started, gate, "done")
    wait_for_path(started)
    assert executor.futures.meta("report") == {"progress": 0.25, "stage": "download"}
    assert executor.futures.meta("missing") is None
    touch(gate)
    assert future.result(timeout=WAIT) == "done"
    assert executor.futures.meta("report") == {"progress": 0.25, "stage": "download"}


def test_current_task_meta_is_a_copy_inside_the_task(
    app: Flask, make_thread_executor: MakeExecutor
) -> None:
    executor = make_thread_executor(app)
    first, again = executor.submit(fs.meta_is_a_copy).result(timeout=WAIT)
    assert first == {"a": 1, "b": 2}
    assert again == {"a": 1}


def test_current_task_without_app_context(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app, EXECUTOR_PUSH_APP_CONTEXT=False)
    future = executor.submit(fs.meta_at_start_then_update, 3)
    assert future.result(timeout=WAIT) == {}
    assert future.meta == {"value": 3}


def test_each_mapped_item_has_its_own_meta(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=1)
    assert list(executor.map(fs.meta_at_start_then_update, range(4), timeout=WAIT)) == [{}] * 4


@pytest.mark.parametrize(
    "use",
    [
        lambda: current_task.update(progress=0.4),
        lambda: current_task.meta,
        lambda: current_task.update(),
    ],
    ids=["update", "meta", "update-nothing"],
)
def test_current_task_outside_a_task_raises(app: Flask, use: Callable[[], Any]) -> None:
    with pytest.raises(RuntimeError, match="outside of a task"):
        use()
    with app.test_request_context("/"), pytest.raises(RuntimeError, match="outside of a task"):
        use()


# -- the status blueprint -----------------------------------------------------------


def _status_app(app: Flask, executor: Executor) -> Flask:
    blueprint = executor.status_blueprint(authorize=lambda: True, list_keys=True)
    app.register_blueprint(blueprint, url_prefix="/tasks")
    return app


def test_status_of_each_state(
    app: Flask, make_thread_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_thread_executor(app, EXECUTOR_MAX_WORKERS=1)
    client = _status_app(app, executor).test_client()

    started, gate = str(tmp_path / "started"), gates.new()
    running = executor.submit_stored("running", fs.update_then_block, started, gate, "late")
    wait_for_path(started)
    executor.submit_stored("pending", fs.add, 1, 2)
    cancelled = executor.submit_stored("cancelled", fs.add, 3, 4)
    assert cancelled.cancel()

    response = client.get("/tasks/running")
    assert response.status_code == 200
    assert response.get_json() == {
        "key": "running",
        "state": "running",
        "meta": {"progress": 0.25, "stage": "download"},
        "result": None,
        "error": None,
    }
    assert client.get("/tasks/pending").get_json() == {
        "key": "pending",
        "state": "pending",
        "meta": {},
        "result": None,
        "error": None,
    }
    assert client.get("/tasks/cancelled").get_json() == {
        "key": "cancelled",
        "state": "cancelled",
        "meta": {},
        "result": None,
        "error": None,
    }

    touch(gate)
    assert running.result(timeout=WAIT) == "late"
    assert client.get("/tasks/running").get_json() == {
        "key": "running",
        "state": "finished",
        "meta": {"progress": 0.25, "stage": "download"},
        "result": "late",
        "error": None,
    }
    failed = executor.submit_stored("failed", fs.fail, "boom 42")
    with pytest.raises(ValueError):
        failed.result(timeout=WAIT)
    assert client.get("/tasks/failed").get_json() == {
        "key": "failed",
        "state": "failed",
        "meta": {},
        "result": None,
        "error": "ValueError: boom 42",
    }


def test_status_result_json_or_null(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    client = _status_app(app, executor).test_client()
    executor.submit_stored("sum", fs.add, 40, 2).result(timeout=WAIT)
    executor.submit_stored("set", fs.unserialisable_result).result(timeout=WAIT)

    body = client.get("/tasks/sum").get_json()
    assert (body["state"], body["result"]) == ("finished", 42)
    response = client.get("/tasks/set")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["state"], body["result"], body["error"]) == ("finished", None, None)


def test_status_unknown_key_is_404_json(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    client = _status_app(app, executor).test_client()
    response = client.get("/tasks/nope")
    assert response.status_code == 404
    assert response.is_json
    assert isinstance(response.get_json(), dict)


def test_status_list_in_insertion_order(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    client = _status_app(app, executor).test_client()
    assert client.get("/tasks/").get_json() == {"tasks": []}
    for key, (a, b) in zip(["c", "a", "b"], [(1, 1), (2, 2), (3, 3)], strict=True):
        executor.submit_stored(key, fs.add, a, b).result(timeout=WAIT)

    response = client.get("/tasks/")
    assert response.status_code == 200
    assert response.get_json() == {
        "tasks": [
            {"key": key, "state": "finished", "meta": {}, "result": result, "error": None}
            for key, result in [("c", 2), ("a", 4), ("b", 6)]
        ]
    }


def test_status_is_opt_in(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    executor.submit_stored("x", fs.add, 1, 1).result(timeout=WAIT)
    rules_before = {rule.rule for rule in app.url_map.iter_rules()}
    assert not any(rule.startswith("/tasks") for rule in rules_before)
    assert app.test_client().get("/tasks/x").status_code == 404


def test_status_blueprint_can_be_guarded(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    blueprint = executor.status_blueprint()

    @blueprint.before_request
    def guard() -> None:
        abort(403)

    app.register_blueprint(blueprint, url_prefix="/tasks")
    executor.submit_stored("secret", fs.add, 1, 1).result(timeout=WAIT)
    client = app.test_client()
    assert client.get("/tasks/secret").status_code == 403
    assert client.get("/tasks/").status_code == 403
    assert client.get("/tasks/nope").status_code == 403


# -- EXECUTOR_FUTURES_TTL -----------------------------------------------------------


def test_finished_futures_expire_after_ttl(
    app: Flask, make_thread_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_thread_executor(app, EXECUTOR_FUTURES_TTL=0.2)
    done = executor.submit_stored("done", fs.add, 1, 2)
    started, gate = str(tmp_path / "started"), gates.new()
    slow = executor.submit_stored("slow", block_until, started, gate, "slow")
    assert done.result(timeout=WAIT) == 3
    assert "done" in executor.futures
    assert done in executor.futures
    wait_for_path(started)

    time.sleep(0.5)
    assert "done" not in executor.futures
    assert done not in executor.futures
    assert executor.futures.done("done") is None
    # Not finished: kept however long it runs.
    assert "slow" in executor.futures
    assert slow in executor.futures
    assert executor.futures.done("slow") is False
    assert len(executor.futures) == 1

    touch(gate)
    assert slow.result(timeout=WAIT) == "slow"
    # The TTL counts from when the future finished, not from when it was stored.
    assert "slow" in executor.futures
    time.sleep(0.5)
    assert "slow" not in executor.futures
    assert executor.futures.done("slow") is None
    assert len(executor.futures) == 0
    # An expired key can be used again.
    assert executor.submit_stored("done", fs.add, 2, 2).result(timeout=WAIT) == 4


def test_futures_kept_without_ttl(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    done = executor.submit_stored("done", fs.add, 1, 2)
    assert done.result(timeout=WAIT) == 3
    time.sleep(0.3)
    assert "done" in executor.futures
    assert executor.futures.done("done") is True


# -- signals ------------------------------------------------------------------------


class Recorder:
    """A signal receiver that records each call (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        with self._lock:
            self.calls.append({"sender": sender, "pid": os.getpid(), **kwargs})

    def matching(self, future: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [call for call in self.calls if call.get("future") is future]


@pytest.fixture
def recorders(app: Flask) -> Iterator[dict[str, Recorder]]:
    names = ["task_submitted", "task_finished", "task_failed"]
    recs = {name: Recorder() for name in names}
    with (
        signals.task_submitted.connected_to(recs["task_submitted"], app),
        signals.task_finished.connected_to(recs["task_finished"], app),
        signals.task_failed.connected_to(recs["task_failed"], app),
    ):
        yield recs


@pytest.mark.parametrize("backend", ["thread", "process-forkserver"])
def test_signals_in_the_web_process(
    app: Flask,
    backend: str,
    shutdown_after: Callable[[Executor], Executor],
    recorders: dict[str, Recorder],
) -> None:
    app.config.update(backend_config(backend))
    executor = shutdown_after(Executor(app))
    submitted, finished, failed = (
        recorders["task_submitted"],
        recorders["task_finished"],
        recorders["task_failed"],
    )

    ok = executor.submit(fs.add, 1, 2)
    [call] = submitted.matching(ok)
    assert (call["sender"], call["pid"], call["key"]) == (app, os.getpid(), None)
    assert ok.result(timeout=WAIT) == 3
    wait_until(lambda: finished.matching(ok))
    [call] = finished.matching(ok)
    assert call["sender"] is app
    assert call["pid"] == os.getpid()
    assert call["key"] is None

    stored = executor.submit_stored("stored-key", fs.add, 2, 2)
    [call] = submitted.matching(stored)
    assert (call["sender"], call["key"]) == (app, "stored-key")
    assert stored.result(timeout=WAIT) == 4
    wait_until(lambda: finished.matching(stored))
    [call] = finished.matching(stored)
    assert (call["sender"], call["key"], call["pid"]) == (app, "stored-key", os.getpid())

    bad = executor.submit_stored("bad-key", fs.fail, "signal boom")
    exc = bad.exception(timeout=WAIT)
    assert isinstance(exc, ValueError)
    wait_until(lambda: failed.matching(bad))
    [call] = failed.matching(bad)
    assert call["sender"] is app
    assert call["pid"] == os.getpid()
    assert call["key"] == "bad-key"
    assert call["exception"] is exc

    # Success is not a failure and a failure is not a success.
    assert not failed.matching(ok) and not failed.matching(stored)
    assert not finished.matching(bad)
    assert [c["future"] for c in submitted.calls] == [ok, stored, bad]


def test_signals_disconnect_and_other_apps(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    other = Flask("other")
    submitted, finished = Recorder(), Recorder()
    with (
        signals.task_submitted.connected_to(submitted, other),
        signals.task_finished.connected_to(finished, other),
    ):
        executor.submit(fs.add, 1, 1).result(timeout=WAIT)
    with (
        signals.task_submitted.connected_to(submitted, app),
        signals.task_finished.connected_to(finished, app),
    ):
        inside = executor.submit(fs.add, 2, 2)
        assert inside.result(timeout=WAIT) == 4
        wait_until(lambda: finished.matching(inside))
    outside = executor.submit(fs.add, 3, 3)
    assert outside.result(timeout=WAIT) == 6
    time.sleep(0.2)
    assert [c["future"] for c in submitted.calls] == [inside]
    assert [c["future"] for c in finished.calls] == [inside]


# -- logs from workers ----------------------------------------------------------------


def _records(caplog: pytest.LogCaptureFixture, name: str, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name and text in r.getMessage()]


def test_worker_logs_reach_the_web_process(
    app: Flask, make_executor: MakeExecutor, caplog: pytest.LogCaptureFixture, executor_type: str
) -> None:
    caplog.set_level(logging.INFO)
    executor = make_executor(app)
    token = f"token-{executor_type}-{os.getpid()}"
    assert executor.submit(fs.log_messages, token).result(timeout=WAIT) == token

    wait_until(lambda: _records(caplog, app.logger.name, f"app logger {token}"))
    wait_until(lambda: _records(caplog, "myapp.tasks", f"named logger {token}"))
    time.sleep(0.1)  # a duplicate would arrive by now
    [app_record] = _records(caplog, app.logger.name, f"app logger {token}")
    [named] = _records(caplog, "myapp.tasks", f"named logger {token}")
    for record in (app_record, named):
        assert record.levelno == logging.WARNING
        assert record.levelname == "WARNING"
    assert app_record.getMessage() == f"app logger {token}"
    assert named.getMessage() == f"named logger {token}"


# -- asyncio --------------------------------------------------------------------------


def test_await_in_async_view(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)

    @app.get("/double/<int:x>")
    async def double(x: int) -> ResponseReturnValue:
        result = await executor.submit(fs.add, x, x)
        return {"result": result}

    @app.get("/fails")
    async def fails() -> ResponseReturnValue:
        try:
            await executor.submit(fs.fail, "async boom")
        except ValueError as exc:
            return {"caught": f"{type(exc).__name__}: {exc}"}
        return {"caught": None}

    client = app.test_client()
    assert client.get("/double/2").get_json() == {"result": 4}
    assert client.get("/fails").get_json() == {"caught": "ValueError: async boom"}


def test_await_with_asyncio_run(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)

    async def main() -> tuple[int, list[int]]:
        one = await executor.submit(fs.add, 1, 2)
        many = await asyncio.gather(executor.submit(fs.add, 1, 1), executor.submit(fs.add, 2, 2))
        return one, list(many)

    async def failing() -> int:
        return await executor.submit(fs.fail, "run boom")

    with app.app_context():
        g.user = "alice"
        assert asyncio.run(main()) == (3, [2, 4])
        with pytest.raises(ValueError, match="^run boom$"):
            asyncio.run(failing())


# -- retries and per-job options ------------------------------------------------------


@pytest.fixture(params=["thread", "process-forkserver"])
def job_executor(
    request: pytest.FixtureRequest, app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> Executor:
    """The module-level executor of ``features_support``, initialised on ``app``."""
    app.config.update(backend_config(request.param))
    fs.executor.init_app(app)
    return shutdown_after(fs.executor)


def test_plain_job_still_works(job_executor: Executor) -> None:
    assert fs.plain_job(4) == 8
    assert fs.plain_job.submit(5).result(timeout=WAIT) == 10
    assert fs.flaky.__name__ == "flaky"
    assert fs.flaky.__doc__ is not None and "ConnectionError" in fs.flaky.__doc__


def test_retry_until_success(job_executor: Executor, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    future = fs.flaky.submit(counter, 2)
    assert future.result(timeout=WAIT) == "ok on attempt 3"
    assert len(fs.attempt_times(counter)) == 3
    assert future.meta["attempt"] == 3


def test_retries_run_out_and_raise_the_last_error(job_executor: Executor, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    future = fs.always_down.submit(counter)
    with pytest.raises(ConnectionError, match="^attempt 4$"):
        future.result(timeout=WAIT)
    assert len(fs.attempt_times(counter)) == 4
    assert future.meta["attempt"] == 4


def test_other_errors_are_not_retried(job_executor: Executor, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    future = fs.wrong_error.submit(counter)
    with pytest.raises(ValueError, match="^attempt 1$"):
        future.result(timeout=WAIT)
    assert len(fs.attempt_times(counter)) == 1


def test_retries_via_submit_stored(job_executor: Executor, tmp_path: Path) -> None:
    counter = str(tmp_path / "attempts")
    key = f"flaky-{tmp_path.name}"
    future = fs.flaky.submit_stored(key, counter, 1)
    assert future.result(timeout=WAIT) == "ok on attempt 2"
    assert job_executor.futures.meta(key)["attempt"] == 2
    assert job_executor.futures.pop(key) is future


def test_backoff_grows_exponentially(
    app: Flask, shutdown_after: Callable[[Executor], Executor], tmp_path: Path
) -> None:
    app.config.update(backend_config("thread"))
    fs.executor.init_app(app)
    shutdown_after(fs.executor)
    counter = str(tmp_path / "attempts")
    with pytest.raises(ConnectionError):
        fs.always_down.submit(counter).result(timeout=WAIT)
    times = fs.attempt_times(counter)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert len(gaps) == 3
    backoff = 0.05  # always_down's
    for attempt, gap in enumerate(gaps):
        assert gap >= backoff * 2**attempt, f"gap {attempt + 1} was {gap:.3f} s: {gaps}"
    assert gaps[0] < gaps[2], gaps


def test_job_timeout(job_executor: Executor, gates: Gates, tmp_path: Path) -> None:
    started, gate = str(tmp_path / "started"), gates.new()
    start = time.monotonic()
    future = fs.too_slow.submit(started, gate)
    exc = future.exception(timeout=WAIT)
    elapsed = time.monotonic() - start
    assert isinstance(exc, TaskTimeoutError), repr(exc)
    assert isinstance(exc, TimeoutError)
    assert os.path.exists(started), "the task never ran"
    assert elapsed < 5, f"the timeout took {elapsed:.1f} s"
    # The time limit is this job's: other jobs (and the executor) have none.
    assert fs.plain_sleep.submit(0.7).result(timeout=WAIT) == "slept"
    assert job_executor.submit(fs.add, 1, 1).result(timeout=WAIT) == 2


def test_job_options_are_validated() -> None:
    executor = Executor()
    with pytest.raises(ValueError):
        executor.job(retries=-1)(fs.add)
    with pytest.raises(ValueError):
        executor.job(timeout=0)(fs.add)


# -- typing ---------------------------------------------------------------------------


@pytest.mark.slow
def test_typing_check_passes_mypy_strict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "tests/typing_check.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
