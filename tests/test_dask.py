"""Dask-specific behaviour; the shared contract tests run on Dask through conftest."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distributed
import pytest
from flask import Flask, current_app, g, request
from support import TIMEOUT, Gates, block_until, create_app, wait_until

from flask_executor import Executor
from flask_executor.backends.dask import (
    CONNECT_ATTEMPTS,
    INLINE_SPEC_BYTES,
    RELEASE_AFTER,
    START_REPORT_DELAY,
    _event_loads,
)

Register = Callable[[Executor], Executor]


def append_line(path: str, text: str) -> int:
    """A side effect: two submits of this must write two lines."""
    with open(path, "a") as handle:
        handle.write(text + "\n")
    return os.getpid()


def context_report() -> dict[str, Any]:
    return {
        "user": g.user,
        "arg": request.args["u"],
        "config": current_app.config["REPORT_TITLE"],
        "pid": os.getpid(),
    }


class Broken(Exception):
    pass


def fail(message: str) -> None:
    raise Broken(message)


@pytest.fixture
def dask_app() -> Flask:
    app = create_app()
    app.config["REPORT_TITLE"] = "yearly"
    return app


def dask_executor(app: Flask, register: Register, address: str | None, **config: Any) -> Executor:
    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_APP_FACTORY="support:create_app", **config)
    if address is not None:
        app.config["EXECUTOR_DASK_ADDRESS"] = address
    return register(Executor(app))


def test_tasks_are_impure(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str, tmp_path: Path
) -> None:
    """Two identical submits of a side-effecting task run twice (Dask's own
    ClientExecutor merges them with pure=True)."""
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    log = str(tmp_path / "sent.log")
    with dask_app.app_context():
        first = executor.submit(append_line, log, "mail to bob")
        second = executor.submit(append_line, log, "mail to bob")
        first.result(timeout=TIMEOUT)
        second.result(timeout=TIMEOUT)
    assert Path(log).read_text().splitlines() == ["mail to bob", "mail to bob"]


def test_context_reaches_cluster_workers(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    with dask_app.test_request_context("/?u=carol"):
        g.user = "carol"
        report = executor.submit(context_report).result(timeout=TIMEOUT)
    assert report["user"] == "carol"
    assert report["arg"] == "carol"
    assert report["config"] == "yearly"
    assert report["pid"] != os.getpid()


def test_exception_keeps_type_message_and_worker_traceback(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    with dask_app.app_context():
        future = executor.submit(fail, "no route to printer")
        with pytest.raises(Broken, match="no route to printer") as info:
            future.result(timeout=TIMEOUT)
    assert "in fail" in str(info.value.__cause__)


def test_map_sends_items_in_one_batch_and_keeps_order(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    with dask_app.app_context():
        results = list(executor.map(pow, range(200), [2] * 200, timeout=60))
    assert results == [i**2 for i in range(200)]


def test_embedded_cluster_starts_on_first_submit_and_closes_on_shutdown(
    dask_app: Flask,
) -> None:
    executor = Executor()
    dask_app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_MAX_WORKERS=1)
    executor.init_app(dask_app)
    try:
        with dask_app.test_request_context("/?u=dave"):
            g.user = "dave"
            assert executor.submit(context_report).result(timeout=60)["user"] == "dave"
        backend: Any = executor._states[dask_app].backend
        cluster = backend._cluster
        assert cluster is not None
        assert len(cluster.workers) == 1
    finally:
        executor.shutdown()
    assert cluster.status.name == "closed"


def test_shutdown_never_closes_a_cluster_it_did_not_start(
    dask_app: Flask, dask_scheduler_address: str
) -> None:
    executor = Executor()
    dask_app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=dask_scheduler_address)
    executor.init_app(dask_app)
    with dask_app.app_context():
        assert executor.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32
    executor.shutdown()
    with distributed.Client(dask_scheduler_address, set_as_default=False) as client:
        assert client.submit(pow, 3, 2, pure=False).result(timeout=TIMEOUT) == 9
        assert len(client.scheduler_info()["workers"]) == 2


def test_cancel_pending_task(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str, tmp_path: Path
) -> None:
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    log = str(tmp_path / "cancelled.log")
    with dask_app.app_context():
        future = executor.submit(append_line, log, "should not run")
        cancelled = future.cancel()
    if cancelled:  # the worker may have started it already: then it is running
        assert future.cancelled()
        wait_until(lambda: not executor._states[dask_app].backend._running)  # type: ignore[union-attr]
    else:
        assert future.result(timeout=TIMEOUT)
    with dask_app.app_context():
        assert executor.submit(pow, 2, 3).result(timeout=TIMEOUT) == 8


def test_missing_extra_names_it(
    dask_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "distributed" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    dask_app.config["EXECUTOR_TYPE"] = "dask"
    with pytest.raises(ImportError, match=r"flask-executor\[dask\]"):
        Executor(dask_app)


def test_security_config_never_travels_to_workers(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(
        dask_app, shutdown_after, dask_scheduler_address, EXECUTOR_DASK_SECURITY=None
    )
    dask_app.config["EXECUTOR_DASK_SECURITY"] = "pretend-key-material"
    with dask_app.app_context():
        seen = executor.submit(config_value, "EXECUTOR_DASK_SECURITY").result(timeout=TIMEOUT)
    assert seen != "pretend-key-material"


def config_value(key: str) -> Any:
    return current_app.config.get(key)


# -- shutdown (issue 11, items 4 and 14) ------------------------------------------------


def sleep_and_return(seconds: float, value: int) -> int:
    import time

    time.sleep(seconds)
    return value


@pytest.mark.slow
def test_shutdown_cancel_futures_with_400_queued_tasks_returns_and_leaves_none_pending(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    import concurrent.futures
    import threading

    for run in range(3):
        app = create_app()
        executor = dask_executor(app, shutdown_after, dask_scheduler_address)
        with app.app_context():
            futures = [executor.submit(sleep_and_return, 0.05, n) for n in range(400)]
            assert futures[0].result(timeout=TIMEOUT) == 0  # tasks are on the workers
        stopper = threading.Thread(
            target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}
        )
        stopper.start()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive(), f"run {run}: shutdown(cancel_futures=True) hung"
        # Every future is done as concurrent.futures counts it: cancelled ones too.
        done, not_done = concurrent.futures.wait(futures, timeout=5)
        assert not not_done, f"run {run}: {len(not_done)} futures never counted as done"
        assert any(f.cancelled() for f in futures)
        for n, future in enumerate(futures):
            if not future.cancelled():
                assert future.result(timeout=0) == n
        assert list(concurrent.futures.as_completed(futures, timeout=5))


@pytest.mark.slow
def test_shutdown_past_the_timeout_fails_the_running_task(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    from flask_executor import ShutdownTimeoutError

    executor = dask_executor(
        dask_app, shutdown_after, dask_scheduler_address, EXECUTOR_SHUTDOWN_TIMEOUT=1
    )
    with dask_app.app_context():
        quick = executor.submit(sleep_and_return, 0, 1)
        assert quick.result(timeout=TIMEOUT) == 1
        # Short enough not to hold a worker of the shared cluster long after the test.
        slow = executor.submit(sleep_and_return, 4, 2)
        wait_until(slow.running)
    executor.shutdown(wait=True)
    with pytest.raises(ShutdownTimeoutError, match="EXECUTOR_SHUTDOWN_TIMEOUT"):
        slow.result(timeout=5)


# -- EXECUTOR_WORKER_INIT on Dask workers ----------------------------------------------


def init_worker() -> None:
    """Counts its runs per worker process, in the worker app's config."""
    current_app.config["WORKER_INIT_RUNS"] = current_app.config.get("WORKER_INIT_RUNS", 0) + 1
    os.environ["FLASK_EXECUTOR_TEST_INIT"] = current_app.name


def init_runs() -> tuple[int, int, str]:
    return os.getpid(), current_app.config["WORKER_INIT_RUNS"], os.environ[
        "FLASK_EXECUTOR_TEST_INIT"
    ]


def init_fails() -> None:
    raise Broken("no model file")


@pytest.mark.slow
def test_worker_init_runs_once_per_dask_worker_in_the_app_context(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    # NEEDS THE POOL BRANCH, which reads EXECUTOR_WORKER_INIT into BackendOptions.worker_init.
    executor = dask_executor(
        dask_app, shutdown_after, dask_scheduler_address,
        EXECUTOR_WORKER_INIT="test_dask:init_worker",
    )
    with dask_app.app_context():
        futures = [executor.submit(init_runs) for _ in range(20)]
        answers = [f.result(timeout=TIMEOUT) for f in futures]
    assert {runs for _, runs, _ in answers} == {1}
    assert {name for _, _, name in answers} == {"support"}


@pytest.mark.slow
def test_failing_worker_init_fails_tasks_naming_it_with_its_traceback(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    import concurrent.futures

    # NEEDS THE POOL BRANCH, as above.
    executor = dask_executor(
        dask_app, shutdown_after, dask_scheduler_address,
        EXECUTOR_WORKER_INIT="test_dask:init_fails",
    )
    with dask_app.app_context():
        futures = [executor.submit(sleep_and_return, 0, n) for n in range(6)]
        for future in futures:
            with pytest.raises(concurrent.futures.BrokenExecutor) as info:
                future.result(timeout=TIMEOUT)
            assert "EXECUTOR_WORKER_INIT = 'test_dask:init_fails'" in str(info.value)
            assert "no model file" in str(info.value)
            assert "init_fails" in str(info.value.__cause__)  # the worker's traceback


@pytest.mark.parametrize("failures", [1, 3])
def test_a_client_handshake_that_fails_distributeds_check_connects_again(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failures: int,
) -> None:
    """distributed's Client asserts that the scheduler's first answer is one message;
    a busy shared scheduler sometimes batches two (seen in CI, twice in a row once).
    That race cannot be provoked on demand, so the first attempts are made to fail
    that way."""
    real_client = distributed.Client
    attempts: list[int] = []

    def flaky_client(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        if len(attempts) <= failures:
            raise AssertionError
        return real_client(*args, **kwargs)

    monkeypatch.setattr(distributed, "Client", flaky_client)
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    with dask_app.app_context():
        assert executor.submit(pow, 2, 5).result(timeout=TIMEOUT) == 32
    assert len(attempts) == failures + 1
    assert "connecting again" in caplog.text


def test_a_client_handshake_that_keeps_failing_raises_after_a_few_attempts(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[int] = []

    def broken_client(*args: Any, **kwargs: Any) -> Any:
        attempts.append(1)
        raise AssertionError

    monkeypatch.setattr(distributed, "Client", broken_client)
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    with dask_app.app_context(), pytest.raises(AssertionError):
        executor.submit(pow, 2, 5)
    assert len(attempts) == CONNECT_ATTEMPTS


def _our_tasks_dependencies(dask_scheduler: Any) -> list[int]:
    return [
        len(task.dependencies)
        for key, task in dask_scheduler.tasks.items()
        if str(key).startswith("flask-executor-")
    ]


def _report_title_length() -> int:
    return len(current_app.config["REPORT_TITLE"])


@pytest.mark.parametrize("title_size", [10, 2 * INLINE_SPEC_BYTES])
def test_a_small_app_spec_travels_in_the_task_and_a_large_one_once_per_worker(
    dask_app: Flask,
    shutdown_after: Register,
    dask_scheduler_address: str,
    gates: Gates,
    title_size: int,
) -> None:
    """A task that depends on the app spec scattered to the workers waits for
    the scheduler to place it with its dependency: about 4 ms more a round
    trip (1.42x the raw ``client.submit``). A spec of a few KB goes with each
    task; only a large one is scattered once (and the task refers to it)."""
    dask_app.config["REPORT_TITLE"] = "t" * title_size
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    started, gate = gates.new(), gates.new()
    client = distributed.Client(dask_scheduler_address, set_as_default=False)
    try:
        with dask_app.app_context():
            future = executor.submit(block_until, started, gate, "done")
            wait_until(lambda: os.path.exists(started))
            dependencies = client.run_on_scheduler(_our_tasks_dependencies)
            Path(gate).touch()
            assert future.result(timeout=TIMEOUT) == "done"
            assert executor.submit(_report_title_length).result(timeout=TIMEOUT) == title_size
    finally:
        client.close()
    assert dependencies == [0 if title_size < INLINE_SPEC_BYTES else 1]


def test_a_task_reports_its_start_once_it_has_run_a_few_milliseconds(
    dask_app: Flask, shutdown_after: Register, dask_scheduler_address: str, gates: Gates
) -> None:
    """A start event sent just before the result held the result back by the
    batching interval of the worker's stream and of the scheduler's (2 ms
    each): 1.6x-1.7x the raw ``client.submit`` round trip. A task done within
    ``START_REPORT_DELAY`` reports no start; a longer one reports it with the
    time it has run, and turns ``running()``."""
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    started, gate = gates.new(), gates.new()
    client = distributed.Client(dask_scheduler_address, set_as_default=False)
    try:
        with dask_app.app_context():
            assert [executor.submit(pow, 2, n).result(timeout=TIMEOUT) for n in range(5)] == [
                1, 2, 4, 8, 16
            ]
            slow = executor.submit(block_until, started, gate, "done")
            wait_until(slow.running)
            Path(gate).touch()
            assert slow.result(timeout=TIMEOUT) == "done"
        topic = executor._states[dask_app].backend._topic  # type: ignore[union-attr]
        events = [json.loads(message) for _, message in client.get_events(topic)]
    finally:
        client.close()
    starts = [event for event in events if event["kind"] == "start"]
    assert len(starts) == 1, events
    assert starts[0]["data"] >= START_REPORT_DELAY


@pytest.mark.parametrize(
    "data", [-1, float("nan"), float("inf"), True, "0.1", [0.1], 1e12]
)
def test_a_start_event_with_a_bad_running_time_is_dropped(data: Any) -> None:
    message = json.dumps({"kind": "start", "key": "flask-executor-x", "data": data})
    assert _event_loads(message) is None
    for good in (None, 0, 0.006, 3600.5):
        message = json.dumps({"kind": "start", "key": "flask-executor-x", "data": good})
        assert _event_loads(message) == ("start", "flask-executor-x", good)


def _keys_wanted_by(dask_scheduler: Any, client_id: str) -> list[str]:
    return sorted(
        str(key)
        for key, task in dask_scheduler.tasks.items()
        if str(key).startswith("flask-executor-")
        and any(client.client_key == client_id for client in task.who_wants)
    )


def test_finished_tasks_are_released_together_not_one_by_one(
    dask_app: Flask,
    shutdown_after: Register,
    dask_scheduler_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each finished task's key released at once sent a message that opened
    the client's 10 ms batching interval just before the view's next submit,
    which waited it out: 1.5x-1.7x the raw round trip. Finished keys are held
    for ``RELEASE_AFTER`` and released in one message; shutdown releases the
    rest."""
    assert RELEASE_AFTER <= 1.0  # results do not linger on the cluster
    executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
    client = distributed.Client(dask_scheduler_address, set_as_default=False)
    try:
        monkeypatch.setattr("flask_executor.backends.dask.RELEASE_AFTER", 60.0)
        with dask_app.app_context():
            assert [executor.submit(pow, 2, n).result(timeout=TIMEOUT) for n in range(6)] == [
                1, 2, 4, 8, 16, 32
            ]
            ours = executor._states[dask_app].backend._client.id  # type: ignore[union-attr]
            # The scheduler reads our client's messages in order: a release sent
            # before the last submit has been handled by now.
            held = client.run_on_scheduler(_keys_wanted_by, client_id=ours)
            assert len(held) == 6, held
        executor.shutdown()
        wait_until(lambda: not client.run_on_scheduler(_keys_wanted_by, client_id=ours))
        monkeypatch.undo()
        executor = dask_executor(dask_app, shutdown_after, dask_scheduler_address)
        with dask_app.app_context():
            assert [executor.submit(pow, 3, n).result(timeout=TIMEOUT) for n in range(3)] == [
                1, 3, 9
            ]
            ours = executor._states[dask_app].backend._client.id  # type: ignore[union-attr]
        wait_until(lambda: not client.run_on_scheduler(_keys_wanted_by, client_id=ours))
    finally:
        client.close()
