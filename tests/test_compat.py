"""The Flask-Executor 1.0 API, which 2.0 keeps working unchanged."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g, has_app_context, has_request_context, request
from support import TIMEOUT, Gates, block_until, create_app, touch, wait_for_path, wait_until

import flask_executor
import flask_executor.executor
import flask_executor.futures
from flask_executor import Executor, ExecutorJob, FutureCollection, FutureProxy
from flask_executor.executor import propagate_exceptions_callback

MakeExecutor = Callable[..., Executor]
Register = Callable[[Executor], Executor]

# -- tasks: module-level so that process workers can import them by reference ---------


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def add(a: int, b: int = 0) -> int:
    return a + b


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def fail(message: str) -> None:
    raise ValueError(message)


def context_flags() -> tuple[bool, bool]:
    return has_app_context(), has_request_context()


def app_id() -> str:
    value: str = current_app.config["APP_ID"]
    return value


def slow_add(a: int, b: int) -> int:
    time.sleep(0.01)
    return a + b


# -- helpers --------------------------------------------------------------------------


def assert_max_workers(executor: Executor, n: int) -> None:
    """Assert that ``executor`` (a thread pool) runs exactly ``n`` tasks at once.

    ``n`` tasks meeting at a barrier prove at least ``n`` workers; the number of distinct
    worker threads over many more tasks proves at most ``n``.
    """
    barrier = threading.Barrier(n, timeout=5)

    def meet() -> int:
        barrier.wait()
        return threading.get_ident()

    def ident() -> int:
        time.sleep(0.002)
        return threading.get_ident()

    met = [executor.submit(meet) for _ in range(n)]
    idents = {f.result(timeout=TIMEOUT) for f in met}
    assert len(idents) == n
    more = [executor.submit(ident) for _ in range(4 * n)]
    idents |= {f.result(timeout=TIMEOUT) for f in more}
    assert len(idents) == n


class CallbackRecorder:
    """A done callback that records what it saw; thread-safe, waits with a timeout."""

    def __init__(self, probe: Callable[[concurrent.futures.Future[Any]], Any]) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        self.calls: list[Any] = []

    def __call__(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            seen = self._probe(future)
        except Exception as exc:  # noqa: BLE001 - surfaced through the assertion
            seen = ("callback raised", repr(exc))
        with self._lock:
            self.calls.append(seen)

    def wait_for(self, count: int) -> list[Any]:
        wait_until(lambda: len(self.calls) >= count)
        return list(self.calls)


# -- public API -----------------------------------------------------------------------


def test_all_is_pinned() -> None:
    assert sorted(flask_executor.__all__) == sorted(
        [
            "Executor",
            "ExecutorJob",
            "FutureProxy",
            "FutureCollection",
            "SerializationError",
            "TerminatedWorkerError",
            "TaskTimeoutError",
            "ShutdownTimeoutError",
            "BodyNotCapturedError",
            "GAttributeNotCopiedError",
            "ConfigKeyNotCopiedError",
            "current_task",
            "TaskLostError",
        ]
    )
    assert len(set(flask_executor.__all__)) == len(flask_executor.__all__)
    for name in flask_executor.__all__:
        assert getattr(flask_executor, name) is not None


def test_version() -> None:
    assert isinstance(flask_executor.__version__, str)
    assert flask_executor.__version__.startswith("2.")


def test_upstream_import_paths() -> None:
    assert flask_executor.futures.FutureCollection is FutureCollection
    assert flask_executor.futures.FutureProxy is FutureProxy
    assert flask_executor.executor.Executor is Executor
    assert flask_executor.executor.ExecutorJob is ExecutorJob
    assert callable(flask_executor.executor.propagate_exceptions_callback)


def test_error_types_refine_stdlib_errors() -> None:
    from concurrent.futures.process import BrokenProcessPool

    assert issubclass(flask_executor.SerializationError, TypeError)
    assert issubclass(flask_executor.TerminatedWorkerError, BrokenProcessPool)
    assert issubclass(flask_executor.TaskTimeoutError, TimeoutError)
    assert issubclass(flask_executor.TaskTimeoutError, concurrent.futures.TimeoutError)
    assert issubclass(flask_executor.BodyNotCapturedError, RuntimeError)
    assert issubclass(flask_executor.GAttributeNotCopiedError, AttributeError)


# -- construction and configuration ---------------------------------------------------


def test_executor_app_argument(app: Flask, shutdown_after: Register) -> None:
    executor = shutdown_after(Executor(app))
    assert isinstance(executor, concurrent.futures.Executor)
    assert app.extensions["executor"] is executor
    assert executor.submit(add, 2, 3).result(timeout=TIMEOUT) == 5


def test_init_app(app: Flask, shutdown_after: Register) -> None:
    executor = shutdown_after(Executor())
    assert "executor" not in app.extensions
    executor.init_app(app)
    assert app.extensions["executor"] is executor
    assert executor.submit(add, 2, 3).result(timeout=TIMEOUT) == 5


def test_init_app_sets_config_defaults(app: Flask, shutdown_after: Register) -> None:
    shutdown_after(Executor(app))
    expected = {
        "EXECUTOR_TYPE": "thread",
        "EXECUTOR_MAX_WORKERS": None,
        "EXECUTOR_FUTURES_MAX_LENGTH": None,
        "EXECUTOR_PROPAGATE_EXCEPTIONS": False,
        "EXECUTOR_PUSH_APP_CONTEXT": True,
        "EXECUTOR_MAX_TASKS_PER_CHILD": None,
        "EXECUTOR_TASK_TIMEOUT": None,
        "EXECUTOR_SNAPSHOT_MAX_BODY": 1024 * 1024,
        "EXECUTOR_APP_FACTORY": None,
    }
    assert {key: app.config.get(key, "<missing>") for key in expected} == expected
    assert tuple(app.config["EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE"]) == ()
    assert "EXECUTOR_START_METHOD" in app.config


def test_init_app_keeps_configured_values(app: Flask, shutdown_after: Register) -> None:
    app.config["EXECUTOR_MAX_WORKERS"] = 3
    app.config["EXECUTOR_FUTURES_MAX_LENGTH"] = 7
    executor = shutdown_after(Executor(app))
    assert app.config["EXECUTOR_MAX_WORKERS"] == 3
    assert app.config["EXECUTOR_FUTURES_MAX_LENGTH"] == 7
    assert executor.futures.max_length == 7


def test_named_executor_uses_prefixed_keys(app: Flask, shutdown_after: Register) -> None:
    executor = shutdown_after(Executor(app, name="custom"))
    assert app.extensions["customexecutor"] is executor
    assert "executor" not in app.extensions
    assert app.config["CUSTOM_EXECUTOR_TYPE"] == "thread"
    assert "CUSTOM_EXECUTOR_MAX_WORKERS" in app.config
    assert "EXECUTOR_TYPE" not in app.config
    assert executor.submit(add, 1, 1).result(timeout=TIMEOUT) == 2


@pytest.mark.parametrize("name", ["custom_1", "Reports", "x2"])
def test_valid_names(app: Flask, shutdown_after: Register, name: str) -> None:
    executor = shutdown_after(Executor(app, name=name))
    assert app.extensions[name + "executor"] is executor


@pytest.mark.parametrize("name", ["invalid name", "bad-name", "dotted.name", "semi;colon"])
def test_invalid_name(app: Flask, shutdown_after: Register, name: str) -> None:
    with pytest.raises(ValueError):
        shutdown_after(Executor(app, name=name))
    assert name + "executor" not in app.extensions


def test_named_executor_reads_prefixed_max_workers(app: Flask, shutdown_after: Register) -> None:
    app.config["EXECUTOR_MAX_WORKERS"] = 1
    app.config["CUSTOM_EXECUTOR_MAX_WORKERS"] = 3
    default = shutdown_after(Executor(app))
    custom = shutdown_after(Executor(app, name="custom"))
    assert app.extensions["executor"] is default
    assert app.extensions["customexecutor"] is custom
    assert_max_workers(default, 1)
    assert_max_workers(custom, 3)


def test_named_executor_reads_prefixed_push_app_context(
    app: Flask, shutdown_after: Register
) -> None:
    app.config["CUSTOM_EXECUTOR_PUSH_APP_CONTEXT"] = False
    default = shutdown_after(Executor(app))
    custom = shutdown_after(Executor(app, name="custom"))
    assert default.submit(context_flags).result(timeout=TIMEOUT) == (True, False)
    assert custom.submit(context_flags).result(timeout=TIMEOUT) == (False, False)


@pytest.mark.parametrize("name", ["", "custom"])
@pytest.mark.parametrize("via_init_app", [False, True], ids=["constructor", "init_app"])
def test_invalid_executor_type(
    app: Flask, shutdown_after: Register, name: str, via_init_app: bool
) -> None:
    prefix = f"{name.upper()}_" if name else ""
    app.config[prefix + "EXECUTOR_TYPE"] = "bogus"
    with pytest.raises(ValueError) as excinfo:
        if via_init_app:
            shutdown_after(Executor(name=name)).init_app(app)
        else:
            shutdown_after(Executor(app, name=name))
    message = str(excinfo.value)
    assert "bogus" in message
    assert "thread" in message
    assert "process" in message


def test_unprefixed_type_does_not_affect_named_executor(
    app: Flask, shutdown_after: Register
) -> None:
    app.config["EXECUTOR_TYPE"] = "bogus"
    custom = shutdown_after(Executor(app, name="custom"))
    assert custom.submit(add, 4, 4).result(timeout=TIMEOUT) == 8


@pytest.mark.parametrize("value", [2, "2", "5"])
def test_max_workers(app: Flask, shutdown_after: Register, value: int | str) -> None:
    app.config["EXECUTOR_MAX_WORKERS"] = value
    executor = shutdown_after(Executor(app))
    assert_max_workers(executor, int(value))


@pytest.mark.parametrize("value", [False, "False", "false", "0", "no", 0])
def test_push_app_context_false(app: Flask, make_executor: MakeExecutor, value: object) -> None:
    executor = make_executor(app, EXECUTOR_PUSH_APP_CONTEXT=value)
    with app.test_request_context("/path/1"):
        in_request = executor.submit(context_flags)
    outside = executor.submit(context_flags)
    assert in_request.result(timeout=TIMEOUT) == (False, False)
    assert outside.result(timeout=TIMEOUT) == (False, False)


@pytest.mark.parametrize("value", [True, "True", "true", "1", "yes"])
def test_push_app_context_true(app: Flask, make_executor: MakeExecutor, value: object) -> None:
    executor = make_executor(app, EXECUTOR_PUSH_APP_CONTEXT=value)
    with app.test_request_context("/path/1"):
        in_request = executor.submit(context_flags)
    outside = executor.submit(context_flags)
    assert in_request.result(timeout=TIMEOUT) == (True, True)
    assert outside.result(timeout=TIMEOUT) == (True, False)


# -- futures --------------------------------------------------------------------------


def test_submit_returns_future_proxy(executor: Executor) -> None:
    futures = [executor.submit(add, i, 10) for i in range(5)]
    for future in futures:
        assert isinstance(future, FutureProxy)
        assert isinstance(future, concurrent.futures.Future)
    done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
    assert not_done == set()
    assert done == set(futures)
    completed = list(concurrent.futures.as_completed(futures, timeout=TIMEOUT))
    assert sorted(f.result(timeout=0) for f in completed) == [10, 11, 12, 13, 14]
    assert [f.result(timeout=0) for f in futures] == [10, 11, 12, 13, 14]


def test_submit_fn_is_positional_only(executor: Executor) -> None:
    future = executor.submit(echo_kwargs, fn=1, self=2, future_key=3)
    assert future.result(timeout=TIMEOUT) == {"fn": 1, "self": 2, "future_key": 3}


def test_task_exception_reaches_future(executor: Executor) -> None:
    future = executor.submit(fail, "task failed: 17")
    exc = future.exception(timeout=TIMEOUT)
    assert isinstance(exc, ValueError)
    assert str(exc) == "task failed: 17"
    with pytest.raises(ValueError, match="task failed: 17"):
        future.result(timeout=TIMEOUT)


@pytest.mark.parametrize("chunksize", [1, 4])
def test_map_keeps_input_order(executor: Executor, chunksize: int) -> None:
    results = executor.map(
        slow_add, range(20), range(100, 120), chunksize=chunksize, timeout=TIMEOUT
    )
    assert list(results) == [i + 100 + i for i in range(20)]
    assert list(executor.map(fib, range(15), timeout=TIMEOUT)) == [fib(i) for i in range(15)]


def test_futures_default_max_length(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    assert executor.futures.max_length == 50
    for i in range(51):
        executor.submit_stored(i, add, i)
    assert len(executor.futures) == 50
    assert 0 not in executor.futures
    assert 1 in executor.futures
    assert executor.futures.result(50, timeout=TIMEOUT) == 50


@pytest.mark.parametrize("value", [3, "3"])
def test_futures_configured_max_length(
    app: Flask, make_executor: MakeExecutor, value: int | str
) -> None:
    executor = make_executor(app, EXECUTOR_FUTURES_MAX_LENGTH=value)
    assert executor.futures.max_length == 3
    for i in range(5):
        executor.submit_stored(f"key-{i}", add, i)
    assert len(executor.futures) == 3
    assert [f"key-{i}" in executor.futures for i in range(5)] == [False, False, True, True, True]


def test_submit_stored_and_future_collection(
    app: Flask, make_executor: MakeExecutor, gates: Gates
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    started, gate = gates.new(), gates.new()
    future = executor.submit_stored("job", block_until, started, gate, 42)
    assert isinstance(future, FutureProxy)
    assert "job" in executor.futures
    assert future in executor.futures
    assert len(executor.futures) == 1

    wait_for_path(started)
    # On a cluster, running() turns true when the worker's start event arrives.
    wait_until(lambda: executor.futures.running("job") is True)
    assert executor.futures.done("job") is False
    assert executor.futures._state("job") == "RUNNING"

    touch(gate)
    assert executor.futures.result("job", timeout=TIMEOUT) == 42
    assert executor.futures.done("job") is True
    assert executor.futures.running("job") is False
    assert executor.futures._state("job") == "FINISHED"
    assert executor.futures.exception("job", timeout=TIMEOUT) is None

    assert executor.futures.pop("job") is future
    assert len(executor.futures) == 0
    assert "job" not in executor.futures
    assert future not in executor.futures
    assert executor.futures.pop("job") is None


def test_future_collection_missing_key_is_none(executor: Executor) -> None:
    assert executor.futures.done("missing") is None
    assert executor.futures.running("missing") is None
    assert executor.futures.result("missing") is None
    assert executor.futures._state("missing") is None
    assert executor.futures.pop("missing") is None
    assert "missing" not in executor.futures


def test_submit_stored_duplicate_key_does_not_run_task(
    app: Flask, make_executor: MakeExecutor, tmp_path: Path
) -> None:
    executor = make_executor(app)
    first = executor.submit_stored("key", touch, str(tmp_path / "first"))
    with pytest.raises(ValueError):
        executor.submit_stored("key", touch, str(tmp_path / "second"))
    assert first.result(timeout=TIMEOUT) == str(tmp_path / "first")
    executor.shutdown(wait=True)  # anything that was submitted has run now
    assert (tmp_path / "first").exists()
    assert not (tmp_path / "second").exists()
    assert executor.futures.pop("key") is first


def test_submit_stored_duplicate_key_is_checked_before_submit(
    app: Flask, make_thread_executor: MakeExecutor
) -> None:
    executor = make_thread_executor(app)
    called = threading.Event()
    executor.submit_stored("key", add, 1)
    with pytest.raises(ValueError):
        executor.submit_stored("key", called.set)
    executor.shutdown(wait=True)
    assert not called.is_set()


# -- the job decorator ----------------------------------------------------------------


def test_job_decorator(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)

    @executor.job
    def triple(n: int) -> int:
        """Multiply n by three."""
        return 3 * n

    assert isinstance(triple, ExecutorJob)
    assert triple.__name__ == "triple"
    assert triple.__doc__ == "Multiply n by three."
    assert triple.executor is executor
    assert triple.fn(2) == 6
    assert triple(4) == 12  # inline, in the caller
    future = triple.submit(5)
    assert isinstance(future, FutureProxy)
    assert future.result(timeout=TIMEOUT) == 15
    stored = triple.submit_stored("triple", 6)
    assert executor.futures.pop("triple") is stored
    assert stored.result(timeout=TIMEOUT) == 18
    assert list(triple.map(range(5), timeout=TIMEOUT)) == [0, 3, 6, 9, 12]
    assert list(triple.map(range(5), timeout=TIMEOUT, chunksize=2)) == [0, 3, 6, 9, 12]


def test_job_inline_call_runs_in_caller(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)

    @executor.job
    def where() -> int:
        return threading.get_ident()

    assert where() == threading.get_ident()
    assert where.submit().result(timeout=TIMEOUT) != threading.get_ident()


def test_job_recursive(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)

    @executor.job
    def fib_job(n: int) -> int:
        return n if n < 2 else fib_job(n - 1) + fib_job(n - 2)

    assert fib_job(10) == 55
    assert fib_job.submit(15).result(timeout=TIMEOUT) == 610
    assert list(fib_job.map(range(8), timeout=TIMEOUT)) == [0, 1, 1, 2, 3, 5, 8, 13]


def test_job_submit_stored_duplicate_key(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    calls: list[int] = []

    @executor.job
    def record(n: int) -> int:
        calls.append(n)
        return n

    record.submit_stored("record", 1).result(timeout=TIMEOUT)
    with pytest.raises(ValueError):
        record.submit_stored("record", 2)
    executor.shutdown(wait=True)
    assert calls == [1]


def test_job_decorated_before_init_app(app: Flask, shutdown_after: Register) -> None:
    executor = shutdown_after(Executor())

    @executor.job
    def square(n: int) -> int:
        """Square n."""
        return n * n

    assert square.__doc__ == "Square n."
    executor.init_app(app)
    assert square.submit(7).result(timeout=TIMEOUT) == 49
    assert list(square.map([1, 2, 3], timeout=TIMEOUT)) == [1, 4, 9]


# -- done callbacks -------------------------------------------------------------------


def test_default_done_callback_has_app_context(app: Flask, make_executor: MakeExecutor) -> None:
    app.config["APP_ID"] = "callback-app"
    executor = make_executor(app)
    recorder = CallbackRecorder(
        lambda future: (current_app.config["APP_ID"], future.result(timeout=0))
    )
    executor.add_default_done_callback(recorder)

    outside = executor.submit(add, 1, 2)
    with app.app_context():
        in_app = executor.submit(add, 3, 4)
    with app.test_request_context("/path/1"):
        in_request = executor.submit(add, 5, 6)
    for future in (outside, in_app, in_request):
        future.result(timeout=TIMEOUT)
    calls = recorder.wait_for(3)
    assert sorted(calls) == [("callback-app", 3), ("callback-app", 7), ("callback-app", 11)]


def test_default_done_callback_for_map_and_submit_stored(
    app: Flask, make_executor: MakeExecutor
) -> None:
    executor = make_executor(app)
    recorder = CallbackRecorder(lambda future: future.result(timeout=0))
    executor.add_default_done_callback(recorder)
    executor.submit_stored("stored", add, 100).result(timeout=TIMEOUT)
    assert list(executor.map(add, [1, 2], timeout=TIMEOUT)) == [1, 2]
    assert sorted(recorder.wait_for(3)) == [1, 2, 100]


def test_future_done_callback_sees_submitting_request(
    app: Flask, make_executor: MakeExecutor, gates: Gates
) -> None:
    app.config["APP_ID"] = "callback-app"
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    started, gate = gates.new(), gates.new()
    recorder = CallbackRecorder(
        lambda future: (
            current_app.config["APP_ID"],
            request.path,
            request.args["x"],
            g.user,
            future.result(timeout=0),
        )
    )
    with app.test_request_context("/path/3?x=9"):
        g.user = "alice"
        future = executor.submit(block_until, started, gate, "value")
        future.add_done_callback(recorder)
    received: list[object] = []
    future.add_done_callback(received.append)
    touch(gate)
    assert future.result(timeout=TIMEOUT) == "value"
    assert recorder.wait_for(1) == [("callback-app", "/path/3", "9", "alice", "value")]
    wait_until(lambda: received)
    assert received == [future]
    assert received[0] is future


def test_future_done_callback_added_after_completion(
    app: Flask, make_executor: MakeExecutor
) -> None:
    app.config["APP_ID"] = "callback-app"
    executor = make_executor(app)
    future = executor.submit(add, 20, 22)
    assert future.result(timeout=TIMEOUT) == 42
    recorder = CallbackRecorder(
        lambda f: (current_app.config["APP_ID"], f is future, f.result(timeout=0))
    )
    future.add_done_callback(recorder)
    assert recorder.wait_for(1) == [("callback-app", True, 42)]


# -- EXECUTOR_PROPAGATE_EXCEPTIONS ----------------------------------------------------


def _error_records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.levelno >= logging.ERROR
        and (text in record.getMessage() or (record.exc_info and text in str(record.exc_info[1])))
    ]


@pytest.mark.parametrize("value", [True, "true", "True", "1", "yes"])
def test_propagate_exceptions_logs_traceback(
    app: Flask, make_executor: MakeExecutor, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    caplog.set_level(logging.ERROR)
    executor = make_executor(app, EXECUTOR_PROPAGATE_EXCEPTIONS=value)
    future = executor.submit(fail, "boom-4711")
    with pytest.raises(ValueError, match="boom-4711"):
        future.result(timeout=TIMEOUT)
    wait_until(lambda: _error_records(caplog, "boom-4711"))
    [record] = _error_records(caplog, "boom-4711")
    assert record.name == app.logger.name
    assert record.exc_info is not None
    assert record.exc_info[0] is ValueError
    assert "boom-4711" in str(record.exc_info[1])
    assert "Traceback" in caplog.text
    assert "boom-4711" in caplog.text


@pytest.mark.parametrize("value", [False, "False", "0", "no"])
def test_exceptions_not_logged_by_default(
    app: Flask, make_executor: MakeExecutor, caplog: pytest.LogCaptureFixture, value: object
) -> None:
    caplog.set_level(logging.DEBUG)
    executor = make_executor(app, EXECUTOR_PROPAGATE_EXCEPTIONS=value)
    future = executor.submit(fail, "quiet-0815")
    with pytest.raises(ValueError, match="quiet-0815"):
        future.result(timeout=TIMEOUT)
    # Callbacks run in the order they were added, so once this one has run any default
    # callback has run too.
    ran: list[object] = []
    future.add_done_callback(ran.append)
    wait_until(lambda: ran)
    assert _error_records(caplog, "quiet-0815") == []


def test_propagate_exceptions_callback(
    app: Flask, app_ctx: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    ok: concurrent.futures.Future[int] = concurrent.futures.Future()
    ok.set_result(1)
    propagate_exceptions_callback(ok)
    assert _error_records(caplog, "") == []

    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    try:
        raise KeyError("direct-42")
    except KeyError as exc:
        failed.set_exception(exc)
        raised = exc
    propagate_exceptions_callback(failed)
    [record] = _error_records(caplog, "direct-42")
    assert record.name == app.logger.name
    assert record.exc_info is not None
    assert record.exc_info[1] is raised
    assert "Traceback" in caplog.text


# -- shutdown -------------------------------------------------------------------------


def test_submit_after_shutdown_raises(executor: Executor) -> None:
    assert executor.submit(add, 1).result(timeout=TIMEOUT) == 1
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        executor.submit(add, 1, 2)
    with pytest.raises(RuntimeError):
        executor.submit_stored("late", add, 1, 2)
    assert "late" not in executor.futures
    with pytest.raises(RuntimeError):
        list(executor.map(add, [1, 2], timeout=TIMEOUT))


def test_shutdown_cancel_futures(app: Flask, make_executor: MakeExecutor, gates: Gates) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    # Every slot busy, so that the tasks after them wait: one worker here; the
    # shared Dask cluster has two single-threaded workers, whatever the config
    # (with one of them free, the six quick tasks could all finish first).
    slots = 2 if app.config["EXECUTOR_TYPE"] == "dask" else 1
    gate = gates.new()
    blockers = []
    for _ in range(slots):
        started = gates.new()
        blockers.append(executor.submit(block_until, started, gate, "first"))
        wait_for_path(started)
    pending = [executor.submit(add, i, 1000) for i in range(6)]
    executor.shutdown(wait=False, cancel_futures=True)
    touch(gate)
    assert [f.result(timeout=TIMEOUT) for f in blockers] == ["first"] * slots
    # Not concurrent.futures.wait(): futures cancelled by shutdown() stay in the
    # CANCELLED state that wait() does not count as done (a CPython quirk).
    wait_until(lambda: all(f.done() for f in pending))
    # A process pool may already have handed one or two items to a worker's queue;
    # the last ones are certainly still pending and must be cancelled.
    assert all(f.cancelled() for f in pending[-3:])
    for i, f in enumerate(pending):
        assert f.cancelled() or f.result(timeout=0) == i + 1000
    with pytest.raises(RuntimeError):
        executor.submit(add, 1)


def test_context_manager(app: Flask, shutdown_after: Register) -> None:
    with Executor(app) as executor:
        shutdown_after(executor)
        future = executor.submit(slow_add, 2, 2)
    assert future.done()
    assert future.result(timeout=0) == 4
    with pytest.raises(RuntimeError):
        executor.submit(add, 1, 1)


# -- the app factory pattern ----------------------------------------------------------


def _factory(executor: Executor, app_id_value: str) -> Flask:
    app = create_app()
    app.config["APP_ID"] = app_id_value
    executor.init_app(app)
    return app


def test_app_factory_second_app_works(shutdown_after: Register) -> None:
    executor = shutdown_after(Executor())  # as at module level in an app package
    first = _factory(executor, "first")
    with first.app_context():
        assert executor.submit(app_id).result(timeout=TIMEOUT) == "first"
    second = _factory(executor, "second")
    assert second.extensions["executor"] is executor
    with second.app_context():
        assert executor.submit(app_id).result(timeout=TIMEOUT) == "second"
    with second.test_request_context("/path/2"):
        assert executor.submit(app_id).result(timeout=TIMEOUT) == "second"
        assert list(executor.map(lambda _: app_id(), range(3), timeout=TIMEOUT)) == ["second"] * 3


def test_app_factory_one_executor_serves_both_apps(shutdown_after: Register) -> None:
    executor = shutdown_after(Executor())
    first = _factory(executor, "first")
    second = _factory(executor, "second")
    assert first.extensions["executor"] is executor
    with first.app_context():
        assert executor.submit(app_id).result(timeout=TIMEOUT) == "first"
    with second.app_context():
        assert executor.submit(app_id).result(timeout=TIMEOUT) == "second"


def test_app_factory_outside_context_uses_latest_app(shutdown_after: Register) -> None:
    executor = shutdown_after(Executor())
    _factory(executor, "first")
    _factory(executor, "second")
    assert executor.submit(app_id).result(timeout=TIMEOUT) == "second"
