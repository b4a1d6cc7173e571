"""The status endpoint's guards (issue 12 item 7) and its view across processes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import features_support as fs
import pytest
from conftest import MakeExecutor
from flask import Flask, abort, request
from store_support import store_app
from support import TIMEOUT


def test_authorize_is_called_in_each_request(app: Flask,
                                             make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    asked: list[object] = []

    def authorize() -> bool:
        key = (request.view_args or {}).get("key")
        asked.append(key)
        return key == "mine"

    app.register_blueprint(executor.status_blueprint(authorize=authorize), url_prefix="/tasks")
    executor.submit_stored("mine", fs.add, 1, 1).result(timeout=TIMEOUT)
    executor.submit_stored("theirs", fs.add, 2, 2).result(timeout=TIMEOUT)
    client = app.test_client()
    assert client.get("/tasks/mine").get_json()["result"] == 2
    assert client.get("/tasks/theirs").status_code == 403
    assert client.get("/tasks/nope").status_code == 403
    assert asked == ["mine", "theirs", "nope"]


def test_listing_keys_is_opt_in(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    app.register_blueprint(executor.status_blueprint(authorize=lambda: True),
                           url_prefix="/tasks")
    app.register_blueprint(
        executor.status_blueprint("listing", authorize=lambda: True, list_keys=True),
        url_prefix="/all",
    )
    executor.submit_stored("k", fs.add, 1, 1).result(timeout=TIMEOUT)
    client = app.test_client()
    response = client.get("/tasks/")
    assert response.status_code == 404 and "list_keys" in response.get_json()["error"]
    assert [task["key"] for task in client.get("/all/").get_json()["tasks"]] == ["k"]


def test_tracebacks_only_in_debug(app: Flask, make_thread_executor: MakeExecutor) -> None:
    executor = make_thread_executor(app)
    app.register_blueprint(executor.status_blueprint(authorize=lambda: True),
                           url_prefix="/tasks")
    with pytest.raises(ValueError):
        executor.submit_stored("bad", fs.fail, "secret detail").result(timeout=TIMEOUT)
    client = app.test_client()
    body = client.get("/tasks/bad").get_json()
    assert body["error"] == "ValueError: secret detail" and "traceback" not in body
    app.debug = True
    assert "Traceback" in client.get("/tasks/bad").get_json()["traceback"]


def test_unguarded_blueprint_logs_a_warning(app: Flask, make_thread_executor: MakeExecutor,
                                            caplog: pytest.LogCaptureFixture) -> None:
    executor = make_thread_executor(app)
    with caplog.at_level(logging.WARNING):
        app.register_blueprint(executor.status_blueprint(), url_prefix="/open")
    assert "without authorize" in caplog.text
    caplog.clear()
    guarded = executor.status_blueprint("guarded")

    @guarded.before_request
    def guard() -> None:
        abort(403)

    with caplog.at_level(logging.WARNING):
        app.register_blueprint(guarded, url_prefix="/guarded")
        app.register_blueprint(executor.status_blueprint("auth", authorize=lambda: False),
                               url_prefix="/auth")
    assert "without authorize" not in caplog.text
    assert app.test_client().get("/auth/x").status_code == 403


def test_memory_store_miss_under_a_multiprocess_server_names_the_setting(
    app: Flask, make_thread_executor: MakeExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    executor = make_thread_executor(app)
    app.register_blueprint(executor.status_blueprint(authorize=lambda: True),
                           url_prefix="/tasks")
    client = app.test_client()
    assert "EXECUTOR_STORE" not in client.get("/tasks/x").get_json()["error"]
    with caplog.at_level(logging.WARNING):
        response = client.get("/tasks/x", environ_overrides={"wsgi.multiprocess": True})
    assert response.status_code == 404
    assert "another process may hold it" in response.get_json()["error"]
    assert "EXECUTOR_STORE" in response.get_json()["error"]
    assert "EXECUTOR_STORE" in caplog.text


def test_status_answers_from_a_shared_store(tmp_path: Path) -> None:
    """Two apps (as two processes would) on one SQLite store: the second serves the
    first's task."""
    url = f"sqlite:///{tmp_path}/tasks.db"
    owner_app, owner = store_app(url)
    reader_app, reader = store_app(url)
    try:
        reader_app.register_blueprint(reader.status_blueprint(authorize=lambda: True),
                                      url_prefix="/tasks")
        with owner_app.app_context():
            owner.submit_stored("k", fs.add, 20, 22)
        client = reader_app.test_client()
        end = time.monotonic() + TIMEOUT
        while client.get("/tasks/k").get_json()["state"] != "finished":
            assert time.monotonic() < end
            time.sleep(0.01)
        assert client.get("/tasks/k").get_json() == {
            "key": "k", "state": "finished", "meta": {}, "result": 42, "error": None,
        }
    finally:
        owner.shutdown()
        reader.shutdown()
        owner.futures.close()
        reader.futures.close()
