"""The task store behind ``executor.futures``: one contract for the memory, SQLite and
Redis stores (a real ``redis-server`` per test), in one process and across processes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import store_support
from servers import RedisServer, free_port
from store_support import append_line, fail_with, progress_then_wait, store_app
from support import TIMEOUT, Gates, touch, wait_for_path, wait_until

from flask_executor import Executor, TaskLostError
from flask_executor.errors import StoreSignatureError, StoreUnavailableError
from flask_executor.futures import StoredFuture
from flask_executor.stores import TaskRecord

STORES = ["memory", "sqlite", "redis"]
SHARED = ["sqlite", "redis"]


def _url(kind: str, tmp_path: Path, stack: list[RedisServer]) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/tasks.db"
    server = RedisServer(tmp_path)
    stack.append(server)
    return server.url


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    servers: list[RedisServer] = []
    yield _url(request.param, tmp_path, servers)
    for server in servers:
        server.stop()


@pytest.fixture
def executors() -> Iterator[Callable[..., tuple[Any, Executor]]]:
    made: list[Executor] = []

    def make(url: str, kind: str = "thread", **config: Any) -> tuple[Any, Executor]:
        app, executor = store_app(url, kind, **config)
        made.append(executor)
        return app, executor

    yield make
    for executor in made:
        executor.shutdown(wait=True)
        executor.futures.close()


@pytest.fixture
def spawn_pool() -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(4, mp_context=context)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


stores = pytest.mark.parametrize("store_url", STORES, indirect=True)
shared = pytest.mark.parametrize("store_url", SHARED, indirect=True)


# -- one process ------------------------------------------------------------------


@stores
def test_dedup_is_atomic_32_threads(store_url: str, executors: Any, tmp_path: Path) -> None:
    """32 threads submit_stored one key at the same moment: exactly one task runs."""
    app, executor = executors(store_url, EXECUTOR_MAX_WORKERS=4)
    marker = tmp_path / "runs"
    start = threading.Barrier(32, timeout=TIMEOUT)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        start.wait()
        try:
            with app.app_context():
                executor.submit_stored("same", append_line, str(marker))
            outcome = "accepted"
        except ValueError:
            outcome = "duplicate"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert sorted(outcomes) == ["accepted"] + ["duplicate"] * 31
    assert executor.futures.result("same", timeout=TIMEOUT) == "ran"
    executor.shutdown(wait=True)
    assert marker.read_text().splitlines() == ["ran"]


@stores
def test_state_meta_result_pop(store_url: str, executors: Any, gates: Gates) -> None:
    app, executor = executors(store_url)
    gate = gates.new()
    with app.app_context():
        future = executor.submit_stored("job", progress_then_wait, gate, {"answer": 42})
    futures = executor.futures
    assert "job" in futures and future in futures and len(futures) == 1
    wait_until(lambda: futures.meta("job") == {"progress": 0.5, "stage": "half"})
    assert futures.state("job") == "running"
    assert futures.record("job").state == "running"  # type: ignore[union-attr]
    assert futures.records()[0].function.endswith("progress_then_wait")
    touch(gate)
    assert futures.result("job", timeout=TIMEOUT) == {"answer": 42}
    assert futures.state("job") == "finished"
    assert futures.meta("job") == {"progress": 1.0, "stage": "half"}
    with pytest.raises(ValueError, match="already exists"):
        with app.app_context():
            executor.submit_stored("job", progress_then_wait, gate, 1)
    popped = futures.pop("job")
    assert popped is not None and popped.result(TIMEOUT) == {"answer": 42}
    assert "job" not in futures and futures.get("job") is None and futures.pop("job") is None
    with pytest.raises(KeyError):
        futures.state("job")


@stores
def test_failed_task_state_and_error(store_url: str, executors: Any) -> None:
    app, executor = executors(store_url)
    with app.app_context():
        executor.submit_stored("bad", fail_with, "no such row")
    wait_until(lambda: executor.futures.done("bad"))
    assert executor.futures.state("bad") == "failed"
    assert isinstance(executor.futures.exception("bad"), LookupError)
    record = executor.futures.record("bad")
    assert record is not None and record.error_type == "LookupError"
    assert record.error_message == "no such row"


@stores
def test_max_length_and_ttl_hold_for_the_store(store_url: str, executors: Any) -> None:
    app, executor = executors(store_url, EXECUTOR_FUTURES_MAX_LENGTH=3)
    _, other = executors(store_url, EXECUTOR_FUTURES_MAX_LENGTH=3)
    with app.app_context():
        for i in range(5):
            (executor if i % 2 else other).submit_stored(f"k{i}", append_line, os.devnull)
    expected = ["k2", "k3", "k4"] if store_url != "memory" else None
    if expected:  # one store for both collections
        assert executor.futures.keys() == expected == other.futures.keys()
        assert [r.key for r in executor.futures.records()] == expected[::-1]
    else:
        assert executor.futures.keys() == ["k1", "k3"]
    _, timed = executors(store_url, EXECUTOR_FUTURES_TTL=0.5)
    with app.app_context():
        timed.submit_stored("brief", append_line, os.devnull)
    assert timed.futures.result("brief", timeout=TIMEOUT) == "ran"
    wait_until(lambda: "brief" not in timed.futures)


@stores
def test_purge_keeps_pending_and_running(store_url: str, executors: Any, gates: Gates) -> None:
    app, executor = executors(store_url)
    gate = gates.new()
    with app.app_context():
        executor.submit_stored("done", append_line, os.devnull)
        executor.submit_stored("bad", fail_with, "x")
        executor.submit_stored("busy", progress_then_wait, gate, 1)
    store = executor.futures.store
    wait_until(lambda: all(store.get(key).done for key in ("done", "bad")))  # type: ignore[union-attr]
    wait_until(lambda: executor.futures.state("busy") == "running")
    assert executor.futures.purge() == 2
    assert executor.futures.keys() == ["busy"]
    touch(gate)


@shared
def test_jobs_submit_stored_through_the_store(store_url: str, executors: Any) -> None:
    app, owner = executors(store_url)
    _, reader = executors(store_url)
    job = owner.job(retries=1)(fail_with)
    with app.app_context():
        job.submit_stored("job", "always")
        with pytest.raises(ValueError, match="already exists"):
            job.submit_stored("job", "again")
    error = reader.futures.exception("job", timeout=TIMEOUT)
    assert isinstance(error, LookupError) and str(error) == "always"
    record = reader.futures.record("job")
    assert record is not None and record.function.endswith("fail_with")
    assert record.meta == {"attempt": 2}


@shared
def test_namespaces_keep_executors_apart(store_url: str, executors: Any) -> None:
    app, first = executors(store_url)
    app.config["REPORTS_EXECUTOR_STORE"] = store_url
    second = Executor(app, name="reports")
    try:
        with app.app_context():
            first.submit_stored("same", append_line, os.devnull)
            second.submit_stored("same", append_line, os.devnull)
        assert first.futures.keys() == ["same"] == second.futures.keys()
        assert first.futures.pop("same") is not None
        assert "same" in second.futures
    finally:
        second.shutdown()
        second.futures.close()


@shared
def test_another_collection_reads_through_the_store(store_url: str, executors: Any,
                                                    gates: Gates) -> None:
    """A second executor on the same URL (as another process would) gets StoredFutures."""
    app, owner = executors(store_url)
    _, reader = executors(store_url)
    gate = gates.new()
    with app.app_context():
        owner.submit_stored("job", progress_then_wait, gate, [1, 2])
        owner.submit_stored("bad", fail_with, "broken")
    remote = reader.futures.get("job")
    assert isinstance(remote, StoredFuture) and remote in reader.futures
    wait_until(lambda: reader.futures.meta("job").get("stage") == "half")
    assert reader.futures.state("job") == "running" and not remote.done()
    with pytest.raises(concurrent.futures.TimeoutError):
        remote.result(timeout=0.05)
    touch(gate)
    assert remote.result(timeout=TIMEOUT) == [1, 2]
    error = reader.futures.exception("bad", timeout=TIMEOUT)
    assert isinstance(error, LookupError) and str(error) == "broken"
    assert "fail_with" in str(error.__cause__)  # the worker's traceback text
    assert reader.futures.pop("job").result(0) == [1, 2]  # type: ignore[union-attr]
    assert "job" not in owner.futures


@shared
def test_an_exception_class_the_reader_cannot_import(
    store_url: str, executors: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ownermod.py").write_text(
        "class OwnerOnlyError(Exception):\n    pass\n\n"
        "def fail():\n    raise OwnerOnlyError('only the owner knows me')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import ownermod

    app, owner = executors(store_url)
    _, reader = executors(store_url)
    with app.app_context():
        owner.submit_stored("k", ownermod.fail)
    wait_until(lambda: owner.futures.store.get("k").done)  # type: ignore[union-attr]
    monkeypatch.delitem(sys.modules, "ownermod")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    error = reader.futures.exception("k", timeout=TIMEOUT)
    assert type(error) is RuntimeError
    assert str(error) == "ownermod.OwnerOnlyError: only the owner knows me"
    assert "def fail" not in str(error) and "OwnerOnlyError" in str(error.__cause__)


@shared
def test_no_secret_key_refuses_a_shared_store(store_url: str, executors: Any,
                                              tmp_path: Path) -> None:
    app, executor = executors(store_url)
    app.config["SECRET_KEY"] = None
    with app.app_context(), pytest.raises(RuntimeError, match="SECRET_KEY"):
        executor.submit_stored("k", append_line, str(tmp_path / "ran"))
    executor.shutdown(wait=True)
    assert not (tmp_path / "ran").exists()


class _Boom:
    def __reduce__(self) -> Any:
        return (touch, (os.environ["STORE_TEST_MARKER"],))


@shared
def test_a_forged_outcome_is_refused_never_unpickled(
    store_url: str, executors: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, executor = executors(store_url)
    _, reader = executors(store_url)
    with app.app_context():
        executor.submit_stored("k", append_line, os.devnull)
    wait_until(lambda: reader.futures.state("k") == "finished")
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("STORE_TEST_MARKER", str(marker))
    record = reader.futures.record("k")
    assert record is not None and record.outcome is not None
    forged = b"\0" * 32 + pickle.dumps(("ok", _Boom()))
    if store_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(store_url[len("sqlite:///"):])) as db, db:
            db.execute("UPDATE tasks SET outcome = ?", (forged,))
    else:
        import redis

        client = redis.Redis.from_url(store_url)
        (name,) = client.keys("flask_executor:*:t:*")
        client.hset(name, "outcome", forged)
        client.close()
    with pytest.raises(StoreSignatureError, match="signature"):
        reader.futures.result("k", timeout=TIMEOUT)
    assert not marker.exists()
    # A different SECRET_KEY cannot read (or forge) it either.
    other_app, other = executors(store_url)
    other_app.config["SECRET_KEY"] = "another secret"
    with pytest.raises(StoreSignatureError):
        other.futures.result("k", timeout=TIMEOUT)


def test_unreachable_store_fails_before_the_task_runs(executors: Any, tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    app, executor = executors(url)
    with app.app_context(), pytest.raises(StoreUnavailableError) as caught:
        executor.submit_stored("k", append_line, str(tmp_path / "ran"))
    assert "127.0.0.1" in str(caught.value) and "hunter2" not in str(caught.value)
    app2, bad_sqlite = executors(f"sqlite:///{tmp_path}/missing-dir/x/tasks.db")
    with app2.app_context(), pytest.raises(StoreUnavailableError, match="missing-dir"):
        bad_sqlite.submit_stored("k", append_line, str(tmp_path / "ran"))
    executor.shutdown(wait=True)
    bad_sqlite.shutdown(wait=True)
    assert not (tmp_path / "ran").exists()


def test_a_result_that_cannot_be_written_is_retried_then_logged(
    executors: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, executor = executors(f"sqlite:///{tmp_path}/tasks.db")
    store = executor.futures.store
    real_update = store.update
    failures = {"left": 2}

    def flaky(task_id: str, **fields: Any) -> bool:
        if "finished_at" in fields and failures["left"]:
            failures["left"] -= 1
            raise StoreUnavailableError("store down for a moment")
        return real_update(task_id, **fields)

    store.update = flaky  # type: ignore[method-assign]
    _, reader = executors(f"sqlite:///{tmp_path}/tasks.db")
    with app.app_context():
        executor.submit_stored("k", append_line, os.devnull)
    assert reader.futures.result("k", timeout=TIMEOUT) == "ran"
    assert failures["left"] == 0

    failures["left"] = 100
    with app.app_context():
        executor.submit_stored("lost-write", append_line, os.devnull)
    executor.futures.get("lost-write").result(TIMEOUT)  # type: ignore[union-attr]
    wait_until(lambda: "could not write" in caplog.text)
    line = next(r.getMessage() for r in caplog.records if "could not write" in r.getMessage())
    assert "finished_at" in line and "tasks.db" in line and "after 4 attempts" in line
    assert failures["left"] == 100 - 4  # retried, then given up: no hang


def test_bad_store_url_names_the_key(tmp_path: Path) -> None:
    app, _ = store_app("memory")
    app.config["EXECUTOR_STORE"] = "postgres://u:secret@db/x"
    with pytest.raises(ValueError, match="EXECUTOR_STORE") as caught:
        Executor(app)
    assert "secret" not in str(caught.value)


def test_shared_store_keys_must_be_strings(executors: Any, tmp_path: Path) -> None:
    app, executor = executors(f"sqlite:///{tmp_path}/tasks.db")
    with app.app_context(), pytest.raises(TypeError, match="str"):
        executor.submit_stored(("tuple", 1), append_line, os.devnull)


def test_relative_sqlite_path_is_in_the_instance_folder(tmp_path: Path) -> None:
    from support import create_app

    app = create_app()
    app.instance_path = str(tmp_path / "instance")
    app.config["EXECUTOR_STORE"] = "sqlite:///sub/tasks.db"
    executor = Executor(app)
    try:
        with app.app_context():
            executor.submit_stored("k", append_line, os.devnull)
        assert executor.futures.result("k", timeout=TIMEOUT) == "ran"
        assert (tmp_path / "instance" / "sub" / "tasks.db").exists()
    finally:
        executor.shutdown()
        executor.futures.close()


def test_importing_flask_executor_does_not_import_redis() -> None:
    code = (
        "import sys, flask_executor; from flask_executor import stores;"
        " print('redis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_silent_owner_on_another_host_is_lost(executors: Any, tmp_path: Path) -> None:
    _, executor = executors(f"sqlite:///{tmp_path}/tasks.db")
    store = executor.futures.store
    store.add(TaskRecord(key="far", task_id="t1", function="f", state="running",
                         submitted_at=time.time() - 60, owner_host="elsewhere", owner_pid=4242))
    store.beat("elsewhere", 4242)
    store._execute("UPDATE owners SET beat = ?", (time.time() - 60,))  # type: ignore[attr-defined]
    with pytest.raises(TaskLostError, match=r"'elsewhere', pid 4242"):
        executor.futures.result("far", timeout=TIMEOUT)
    assert executor.futures.state("far") == "failed"


# -- across processes --------------------------------------------------------------


@shared
def test_other_process_reads_state_meta_result_and_error(
    store_url: str, executors: Any, gates: Gates, spawn_pool: Any
) -> None:
    app, executor = executors(store_url)
    gate = gates.new()
    with app.app_context():
        executor.submit_stored("job", progress_then_wait, gate, {"rows": 3})
        executor.submit_stored("bad", fail_with, "no rows")
    wait_until(lambda: executor.futures.meta("job").get("stage") == "half")
    ready = gates.new()
    reading = spawn_pool.submit(store_support.child_read, store_url, "job", ready)
    wait_for_path(ready, timeout=60)
    touch(gate)
    seen = reading.result(60)
    assert seen["contains"] is True and seen["state"] == "running"
    assert seen["result"] == {"rows": 3}
    assert seen["meta"] == {"progress": 1.0, "stage": "half"}
    assert seen["state_after"] == "finished"
    bad = spawn_pool.submit(store_support.child_read, store_url, "bad").result(60)
    assert bad["error"][:2] == ("LookupError", "no rows")
    assert "fail_with" in bad["error"][2]
    assert spawn_pool.submit(store_support.child_pop, store_url, "job").result(60) == {"rows": 3}
    assert "job" not in executor.futures


@shared
def test_dedup_is_atomic_across_processes(store_url: str, tmp_path: Path,
                                          spawn_pool: Any) -> None:
    """4 processes x 8 threads submit one key at the same moment: exactly one task runs."""
    marker = tmp_path / "runs"
    start_at = time.time() + 3.0
    runs = [spawn_pool.submit(store_support.child_submit_race, store_url, "once", str(marker),
                              start_at, 8) for _ in range(4)]
    outcomes = sorted(o for run in runs for o in run.result(60))
    assert outcomes == ["accepted"] + ["duplicate"] * 31
    assert marker.read_text().splitlines() == ["ran"]


@shared
def test_cancel_from_another_process(store_url: str, executors: Any, gates: Gates,
                                     spawn_pool: Any) -> None:
    app, executor = executors(store_url, EXECUTOR_MAX_WORKERS=1)
    gate = gates.new()
    with app.app_context():
        running = executor.submit_stored("running", progress_then_wait, gate, 1)
        pending = executor.submit_stored("pending", append_line, os.devnull)
    wait_until(lambda: executor.futures.state("running") == "running")
    # A pending task is cancelled; a running thread task cannot be.
    assert spawn_pool.submit(store_support.child_cancel, store_url, "pending").result(60) is True
    assert pending.cancelled()
    assert spawn_pool.submit(store_support.child_cancel, store_url, "running").result(60) is False
    touch(gate)
    assert running.result(TIMEOUT) == 1
    assert spawn_pool.submit(store_support.child_cancel, store_url, "missing").result(60) is None


@pytest.mark.slow
@shared
def test_cancel_stops_a_running_process_task_from_another_process(
    store_url: str, executors: Any, spawn_pool: Any
) -> None:
    app, executor = executors(store_url, kind="process", EXECUTOR_MAX_WORKERS=1)
    with app.app_context():
        future = executor.submit_stored("slow", store_support.sleep_then, 120, "late")
    wait_until(lambda: executor.futures.state("slow") == "running", timeout=60)
    assert spawn_pool.submit(store_support.child_cancel, store_url, "slow").result(60) is True
    assert future.cancelled()
    assert executor.futures.state("slow") == "cancelled"
    with app.app_context():  # the pool still works
        assert executor.submit(store_support.sleep_then, 0, "next").result(60) == "next"


@shared
def test_owner_killed_is_lost_with_host_and_pid(store_url: str, executors: Any,
                                                tmp_path: Path) -> None:
    started = str(tmp_path / "owner-pid")
    owner = multiprocessing.get_context("spawn").Process(
        target=store_support.child_own_and_report, args=(store_url, "orphan", started))
    owner.start()
    try:
        wait_for_path(started, timeout=60)
        pid = int(Path(started).read_text())
        _, reader = executors(store_url)
        assert reader.futures.state("orphan") == "running"
        os.kill(pid, signal.SIGKILL)
        owner.join(TIMEOUT)
        deadline = time.monotonic() + 30
        with pytest.raises(TaskLostError) as lost:
            reader.futures.result("orphan", timeout=30)
        assert time.monotonic() < deadline
        assert f"pid {pid}" in str(lost.value) and "host" in str(lost.value)
        assert reader.futures.state("orphan") == "failed"
    finally:
        if owner.is_alive():
            owner.kill()
        owner.join(TIMEOUT)
