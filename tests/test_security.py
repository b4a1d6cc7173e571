"""Hostile input and secrets (issue 12): what crosses to workers, and what an attacker
can make the web process do. See docs/security.rst."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
import tracemalloc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g, request
from support import TIMEOUT, create_app, touch, wait_for_path, wait_until, without_cyclic_gc
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from flask_executor import (
    BodyNotCapturedError,
    ConfigKeyNotCopiedError,
    Executor,
    GAttributeNotCopiedError,
    current_task,
)

Register = Callable[[Executor], Executor]
#: Seconds a result may take: generous, as the suite runs on loaded machines.
WAIT = max(TIMEOUT, 30.0)

SECRETS = {
    "SECRET_KEY": "web-secret",
    "SECRET_KEY_FALLBACKS": ["old-secret"],
    "DB_PASSWORD": "web-password",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "GITHUB_TOKEN": "gh-token",
    "STRIPE_API_KEY": "sk-live",
    "DATABASE_URL": "postgresql://app:hunter2@db.example/app",
}
PLAIN = {
    "DB_HOST": "db.example",
    "PUBLIC_URL": "https://shop.example/",
    "SQLALCHEMY_DATABASE_URI": "sqlite:///app.db",
}


def config_items(*keys: str) -> dict[str, Any]:
    """The given keys of the worker's config; absent keys are left out."""
    return {key: current_app.config[key] for key in keys if key in current_app.config}


def read_config(key: str) -> Any:
    return current_app.config[key]


def get_config(key: str) -> Any:
    return current_app.config.get(key, "default")


# -- 1. one app spec per executor -----------------------------------------------


@pytest.mark.parametrize("secure_first", [True, False])
def test_each_executor_applies_its_own_exclude_list(
    shutdown_after: Register, secure_first: bool
) -> None:
    app = create_app()
    app.config.update(
        SECRET_KEY="web-secret",
        DB_PASSWORD="web-password",
        DB_HOST="db.example",
        EXECUTOR_TYPE="process",
        SECURE_EXECUTOR_TYPE="process",
        SECURE_EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY", "*_PASSWORD"],
        SECURE_EXECUTOR_DASK_SECURITY="secure-key-material",
        EXECUTOR_DASK_SECURITY="plain-key-material",
    )
    plain = shutdown_after(Executor(app))
    secure = shutdown_after(Executor(app, name="secure"))
    keys = (
        "SECRET_KEY",
        "DB_PASSWORD",
        "DB_HOST",
        "EXECUTOR_DASK_SECURITY",
        "SECURE_EXECUTOR_DASK_SECURITY",
    )
    order = [secure, plain] if secure_first else [plain, secure]
    with app.app_context():
        seen = {
            executor.name: executor.submit(config_items, *keys).result(timeout=WAIT)
            for executor in order
        }
    # No executor ever sends any executor's Dask security (TLS key material).
    assert seen["secure"] == {"DB_HOST": "db.example"}
    assert seen[""] == {
        "SECRET_KEY": "web-secret",
        "DB_PASSWORD": "web-password",
        "DB_HOST": "db.example",
    }


# -- 2. secrets stay home on Dask ----------------------------------------------------


@pytest.fixture
def secret_app() -> Flask:
    app = create_app()
    app.config.update(SECRETS, **PLAIN)
    return app


def dask_executor(app: Flask, register: Register, address: str, **config: Any) -> Executor:
    # No factory: the worker's app is a stand-in, all its config comes from the web process.
    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=address, **config)
    return register(Executor(app))


def test_dask_workers_do_not_get_secrets_by_default(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(secret_app, shutdown_after, dask_scheduler_address)
    with secret_app.app_context():
        seen = executor.submit(config_items, *SECRETS, *PLAIN).result(timeout=WAIT)
    assert seen == PLAIN


def test_dask_reading_a_left_out_key_says_which_setting_to_change(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(secret_app, shutdown_after, dask_scheduler_address)
    with secret_app.app_context():
        with pytest.raises(ConfigKeyNotCopiedError) as info:
            executor.submit(read_config, "SECRET_KEY").result(timeout=WAIT)
        # .get() still gives the default: only [] raises.
        assert executor.submit(get_config, "SECRET_KEY").result(timeout=WAIT) == "default"
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "SECRET_KEY" in message and "EXECUTOR_SNAPSHOT_CONFIG_INCLUDE" in message


def test_dask_secrets_can_be_opted_in(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(
        secret_app,
        shutdown_after,
        dask_scheduler_address,
        EXECUTOR_SNAPSHOT_CONFIG_INCLUDE=["SECRET_KEY", "*_TOKEN"],
    )
    with secret_app.app_context():
        seen = executor.submit(config_items, *SECRETS).result(timeout=WAIT)
    assert seen == {"SECRET_KEY": "web-secret", "GITHUB_TOKEN": "gh-token"}


def test_excluded_key_raises_naming_the_exclude_setting(
    shutdown_after: Register,
) -> None:
    app = create_app()
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY"]
    )
    executor = shutdown_after(Executor(app))
    with app.app_context():
        with pytest.raises(ConfigKeyNotCopiedError, match="EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE"):
            executor.submit(read_config, "SECRET_KEY").result(timeout=WAIT)


def test_process_workers_keep_secrets(shutdown_after: Register) -> None:
    app = create_app()
    app.config.update(SECRETS, EXECUTOR_TYPE="process")
    executor = shutdown_after(Executor(app))
    with app.app_context():
        seen = executor.submit(config_items, *SECRETS).result(timeout=WAIT)
    assert seen == SECRETS


def test_warns_once_for_a_remote_dask_address_without_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flask_executor.backends.dask import _warn_if_plaintext

    caplog.set_level(logging.WARNING, logger="flask_executor")
    _warn_if_plaintext("tcp://127.0.0.1:8786", None)
    _warn_if_plaintext("tcp://localhost:8786", None)
    _warn_if_plaintext("tls://10.1.2.3:8786", None)
    assert not caplog.records
    _warn_if_plaintext("tcp://10.1.2.3:8786", None)
    _warn_if_plaintext("10.1.2.3:8786", None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "10.1.2.3" in warnings[0] and "TLS" in warnings[0]


# -- 9. async tasks without an app context ---------------------------------------------


async def async_answer(value: int) -> int:
    return value * 2


def test_thread_async_task_is_awaited_without_app_context(
    make_thread_executor: Callable[..., Executor],
) -> None:
    app = create_app()
    executor = make_thread_executor(app, EXECUTOR_PUSH_APP_CONTEXT=False)
    assert executor.submit(async_answer, 21).result(timeout=WAIT) == 42


# -- 3. request bodies are read only up to the limit --------------------------------------

MiB = 1024 * 1024


class EndlessBody(io.RawIOBase):
    """A chunked request body of ``size`` bytes produced on demand (no Content-Length)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.left = size
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self.left, MiB)
        buffer[:count] = b"x" * count
        self.left -= count
        self.produced += count
        return count


def body_length() -> int:
    return len(request.get_data())


def chunked_context(app: Flask, body: io.RawIOBase) -> Any:
    # What a server that de-chunks a Transfer-Encoding: chunked request passes on.
    return app.test_request_context("/path/1", method="POST", **chunked(body))


def chunked(body: io.RawIOBase) -> dict[str, Any]:
    """Test-client arguments for a request as a server passes on a de-chunked
    ``Transfer-Encoding: chunked`` body: no Content-Length, ``wsgi.input_terminated``."""
    return {
        "headers": {"Transfer-Encoding": "chunked"},
        "environ_overrides": {
            "wsgi.input": io.BufferedReader(body),
            "wsgi.input_terminated": True,
        },
    }


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_chunked_body_over_the_limit_is_read_only_to_the_limit(
    shutdown_after: Register, kind: str
) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE=kind, EXECUTOR_SNAPSHOT_MAX_BODY=MiB)
    executor = shutdown_after(Executor(app))
    body = EndlessBody(64 * MiB)
    with chunked_context(app, body):
        assert request.content_length is None
        tracemalloc.start()
        try:
            future = executor.submit(body_length)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert body.produced <= 3 * MiB
        assert peak < 8 * MiB, f"submit() allocated {peak / MiB:.0f} MiB"
        with pytest.raises(BodyNotCapturedError, match="EXECUTOR_SNAPSHOT_MAX_BODY"):
            future.result(timeout=WAIT)
        # The view still reads the whole body, as if submit() had not looked at it.
        assert len(request.get_data()) == 64 * MiB


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_chunked_body_within_the_limit_reaches_task_and_view(
    shutdown_after: Register, kind: str
) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE=kind)
    executor = shutdown_after(Executor(app))
    with chunked_context(app, EndlessBody(1000)):
        future = executor.submit(body_length)
        assert request.get_data() == b"x" * 1000
    assert future.result(timeout=WAIT) == 1000


def test_chunked_body_respects_max_content_length(shutdown_after: Register) -> None:
    app = create_app()
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_SNAPSHOT_MAX_BODY=None, MAX_CONTENT_LENGTH=2 * MiB
    )
    executor = shutdown_after(Executor(app))
    with chunked_context(app, EndlessBody(64 * MiB)):
        try:
            without_submit: Any = len(request.get_data())
        except RequestEntityTooLarge as exc:
            without_submit = exc.code
    body = EndlessBody(64 * MiB)
    with chunked_context(app, body):
        future = executor.submit(body_length)
        assert body.produced <= 4 * MiB
        try:  # the view sees what Werkzeug gives it without submit()
            assert len(request.get_data()) == without_submit
        except RequestEntityTooLarge as exc:
            assert exc.code == without_submit
    with pytest.raises(BodyNotCapturedError, match="MAX_CONTENT_LENGTH"):
        future.result(timeout=WAIT)


def test_sized_body_over_max_content_length_is_not_read(shutdown_after: Register) -> None:
    app = create_app()
    app.config.update(
        EXECUTOR_TYPE="thread", EXECUTOR_SNAPSHOT_MAX_BODY=None, MAX_CONTENT_LENGTH=2 * MiB
    )
    executor = shutdown_after(Executor(app))
    body = EndlessBody(3 * MiB)
    with app.test_request_context(
        "/path/1",
        method="POST",
        environ_overrides={"wsgi.input": io.BufferedReader(body), "CONTENT_LENGTH": str(3 * MiB)},
    ):
        future = executor.submit(body_length)  # neither raises nor reads: the view decides
        assert body.produced == 0
    # Reading it in the task gets Werkzeug's own 413, as in the view.
    with pytest.raises(RequestEntityTooLarge):
        future.result(timeout=WAIT)


def test_chunked_request_through_the_test_client(shutdown_after: Register) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_SNAPSHOT_MAX_BODY=MiB)
    executor = shutdown_after(Executor(app))
    outcome: dict[str, Any] = {}

    def view(item_id: int) -> str:
        future = executor.submit(body_length)
        try:
            future.result(timeout=WAIT)
        except BodyNotCapturedError as exc:
            outcome["error"] = str(exc)
        return str(len(request.get_data()))

    app.extensions["test_view"] = view
    body = EndlessBody(16 * MiB)
    response = app.test_client().post("/view/1", **chunked(body))
    assert response.status_code == 200
    assert response.text == str(16 * MiB)
    assert "EXECUTOR_SNAPSHOT_MAX_BODY" in outcome["error"]


# -- 6. a g value that does not unpickle in the worker ------------------------------------


def _skewed_restore(web_pid: int, value: str) -> Skewed:
    if os.getpid() != web_pid:  # the worker runs another version of the code
        raise ModuleNotFoundError("No module named 'skewed_v2'")
    return Skewed(value)


class Skewed:
    """A g value that pickles in the web process and fails to unpickle in a worker."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return _skewed_restore, (os.getpid(), self.value)


def g_report() -> dict[str, Any]:
    return {"user": g.user, "has_skewed": "skewed" in g}


def g_skewed() -> Any:
    return g.skewed


@pytest.mark.parametrize("executor_type", ["process-forkserver", "dask"])
def test_g_value_that_fails_to_unpickle_fails_only_its_readers(
    app: Flask, make_executor: Callable[..., Executor]
) -> None:
    executor = make_executor(app)
    with app.test_request_context("/path/1"):
        g.user = "alice"
        g.skewed = Skewed("v1")
        unaffected = executor.submit(g_report)
        reader = executor.submit(g_skewed)
        assert unaffected.result(timeout=WAIT) == {"user": "alice", "has_skewed": False}
        with pytest.raises(GAttributeNotCopiedError) as info:
            reader.result(timeout=WAIT)
    message = str(info.value)
    assert "g.skewed" in message and "No module named 'skewed_v2'" in message
    assert "unpickle" in message and "arguments" not in message


# -- 4. the Dask event channel carries plain data ---------------------------------------


class _Touch:
    """Unpickling this creates ``path``: proof that a message was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (self.path, "w")


def report_progress(gate: str) -> str:
    current_task.update(progress=[1, 2], stage={"name": "upload", "parts": [3]})
    wait_for_path(gate, timeout=50)
    return "done"


def update_with(value: Any) -> None:
    current_task.update(when=value)


def test_dask_events_are_parsed_never_unpickled(
    app: Flask, shutdown_after: Register, dask_scheduler_address: str, tmp_path: Path
) -> None:
    import distributed

    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=dask_scheduler_address)
    executor = shutdown_after(Executor(app))
    gate = str(tmp_path / "gate")
    marker = str(tmp_path / "unpickled")
    with app.app_context():
        future = executor.submit(report_progress, gate)
        wait_until(future.running, timeout=WAIT)
    backend: Any = executor._states[app].backend
    topic = backend._topic
    (key,) = backend._running
    evil = pickle.dumps(_Touch(marker))
    with distributed.Client(dask_scheduler_address, set_as_default=False) as intruder:
        for message in [
            evil,
            {"kind": "meta", "key": key, "data": evil},
            {"kind": "log", "key": key, "data": evil},
            "not json {",
            json.dumps({"kind": "meta", "key": key, "data": ["not", "a", "dict"]}),
            json.dumps({"kind": "meta", "key": "flask-executor-foreign", "data": {"x": 1}}),
            json.dumps({"kind": "start", "key": "flask-executor-foreign"}),
            json.dumps({"kind": "log", "key": "flask-executor-foreign", "data": {"msg": "x"}}),
            json.dumps([1, 2, 3]),
            12345,
        ]:
            intruder.log_event(topic, message)
    wait_until(lambda: "progress" in future.meta, timeout=WAIT)
    assert future.meta == {"progress": [1, 2], "stage": {"name": "upload", "parts": [3]}}
    touch(gate)
    assert future.result(timeout=WAIT) == "done"
    assert not os.path.exists(marker)
    with app.app_context():  # the executor still works
        assert executor.submit(g_report_plain).result(timeout=WAIT) == "ok"


def g_report_plain() -> str:
    return "ok"


def test_dask_meta_that_is_not_json_fails_clearly(
    app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=dask_scheduler_address)
    executor = shutdown_after(Executor(app))
    with app.app_context():
        future = executor.submit(update_with, {1, 2})
        with pytest.raises(TypeError, match=r"current_task.update\(\).*'when'.*JSON"):
            future.result(timeout=WAIT)


# -- 5. finished futures hold their outcome, not the request ------------------------------


class Tracked:
    """A g value that remembers (weakly) every copy made of it for a task."""

    def __init__(self, copies: list[weakref.ref[Tracked]] | None = None) -> None:
        self.copies = copies if copies is not None else []

    def __deepcopy__(self, memo: dict[int, Any]) -> Tracked:
        new = Tracked(self.copies)
        self.copies.append(weakref.ref(new))
        return new


def noop() -> str:
    return "ok"


def held_memory(base: int) -> int:
    return tracemalloc.get_traced_memory()[0] - base


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_finished_futures_hold_nothing_of_the_request(
    shutdown_after: Register, kind: str
) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE=kind, EXECUTOR_SNAPSHOT_MAX_BODY=None)
    executor = shutdown_after(Executor(app))
    assert executor.submit(noop).result(timeout=WAIT) == "ok"  # workers up
    callback_paths: list[str] = []
    tracked = Tracked()
    refs: list[weakref.ref[Any]] = []
    futures = []
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(20):
            value = Tracked(tracked.copies)
            refs.append(weakref.ref(value))
            with app.test_request_context(
                "/path/1",
                method="POST",
                data=b"x" * (10 * MiB),
                headers={"Cookie": "session=secret-cookie", "Authorization": "Bearer t"},
            ):
                g.tracked = value
                request.get_data()  # the view read its body
                future = executor.submit(noop)
                future.add_done_callback(lambda f: callback_paths.append(request.path))
                futures.append(future)
            del value
        assert [f.result(timeout=WAIT) for f in futures] == ["ok"] * 20
        wait_until(lambda: len(callback_paths) == 20, timeout=WAIT)
        # Done callbacks added before completion ran with the request's context.
        assert callback_paths == ["/path/1"] * 20
        gc.collect()  # the view's own request (environ <-> request) is a cycle
        try:
            wait_until(lambda: held_memory(base) < 40 * MiB, timeout=WAIT)
        except AssertionError:
            pytest.fail(f"20 finished futures hold {held_memory(base) / MiB:.0f} MiB")
        assert [ref for ref in refs if ref() is not None] == []
        assert [ref for ref in tracked.copies if ref() is not None] == []
    finally:
        tracemalloc.stop()
    assert all(f.done() for f in futures)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["thread", "process"])
def test_finished_futures_free_their_payload_without_the_cyclic_gc(
    shutdown_after: Register, kind: str
) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE=kind)
    executor = shutdown_after(Executor(app))
    assert executor.submit(noop).result(timeout=WAIT) == "ok"  # workers up
    with without_cyclic_gc():  # a reference cycle must not be what frees a payload
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            with app.app_context():
                futures = [executor.submit(len, b"x" * (10 * MiB)) for _ in range(20)]
            assert [f.result(timeout=WAIT) for f in futures] == [10 * MiB] * 20
            try:
                wait_until(lambda: held_memory(base) < 40 * MiB, timeout=WAIT)
            except AssertionError:
                pytest.fail(f"20 finished futures hold {held_memory(base) / MiB:.0f} MiB")
        finally:
            tracemalloc.stop()


# -- 8. big uploads to process tasks ------------------------------------------------------


def upload_digest(upload: FileStorage) -> tuple[str | None, int, str]:
    data = upload.read()
    return upload.filename, len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_big_upload_to_a_process_task_costs_at_most_one_copy(
    shutdown_after: Register, tmp_path: Path
) -> None:
    size = 100 * MiB
    app = create_app()
    app.config.update(EXECUTOR_TYPE="process")
    executor = shutdown_after(Executor(app))
    assert executor.submit(noop).result(timeout=WAIT) == "ok"  # workers up
    content = os.urandom(MiB) * (size // MiB)
    digest = hashlib.sha256(content).hexdigest()
    with app.test_request_context(
        "/path/1", method="POST", data={"file": (io.BytesIO(content), "big.bin")}
    ):
        upload = request.files["file"]  # parsed: Werkzeug spooled it to a temporary file
        del content
        gc.collect()
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            future = executor.submit(upload_digest, upload)
            outcome = future.result(timeout=WAIT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert upload.stream.tell() == 0 and len(upload.read()) == size  # the view's is intact
        request.environ["wsgi.input"].close()  # the test client's spooled multipart body
    assert outcome == ("big.bin", size, digest)
    extra = peak - base
    assert extra <= size, f"submit() took {extra / MiB:.0f} MiB for a {size // MiB} MiB upload"
    # The spilled upload is gone once the task is done.
    assert not list(Path(tempfile.gettempdir()).glob(f"flask-executor-upload-{os.getpid()}-*"))


def test_upload_of_a_cancelled_process_task_is_removed(
    shutdown_after: Register, tmp_path: Path
) -> None:
    app = create_app()
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    gate = str(tmp_path / "gate")
    pattern = f"flask-executor-upload-{os.getpid()}-*"
    with app.test_request_context(
        "/path/1", method="POST", data={"file": (io.BytesIO(b"y" * (3 * MiB)), "a.bin")}
    ):
        with app.app_context():
            blocker = executor.submit(wait_for_path, gate)
        queued = executor.submit(upload_digest, request.files["file"])
        assert list(Path(tempfile.gettempdir()).glob(pattern))
        assert queued.cancel()
        request.environ["wsgi.input"].close()
    touch(gate)
    blocker.result(timeout=WAIT)
    assert not list(Path(tempfile.gettempdir()).glob(pattern))
