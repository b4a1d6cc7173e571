"""The context contract every backend keeps: what a task sees of the submitting context.

Task functions are module-level and return plain data, so the same tests can run in
process workers (add backends to ``conftest.BACKENDS``).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import (
    Flask,
    current_app,
    g,
    has_app_context,
    has_request_context,
    jsonify,
    request,
    session,
    url_for,
)
from flask.ctx import RequestContext
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from support import TIMEOUT, Gates, touch, wait_for_path, wait_until

from flask_executor import BodyNotCapturedError, Executor, GAttributeNotCopiedError

MakeExecutor = Callable[..., Executor]

# -- tasks ----------------------------------------------------------------------------


def probe_request() -> dict[str, Any]:
    return {
        "args": request.args.to_dict(flat=False),
        "json": request.get_json(silent=True),
        "data": request.get_data(as_text=True),
        "x_token": request.headers.get("X-Token"),
        "content_type": request.headers.get("Content-Type"),
        "cookies": request.cookies.to_dict(),
        "view_args": request.view_args,
        "endpoint": request.endpoint,
        "method": request.method,
        "path": request.path,
        "url": request.url,
        "remote_addr": request.remote_addr,
    }


def probe_state() -> dict[str, Any]:
    return {
        "config": current_app.config["TEST_VALUE"],
        "request_user": getattr(request, "user", None),
        "request_meta": getattr(request, "meta", None),
        "g_user": g.get("user"),
        "g_roles": g.get("roles"),
        "session": dict(session),
    }


def probe_json() -> Any:
    return request.get_json()


def probe_form() -> dict[str, list[str]]:
    return request.form.to_dict(flat=False)


def probe_data() -> bytes:
    return request.get_data()


def probe_app_only() -> dict[str, Any]:
    return {
        "app_context": has_app_context(),
        "request_context": has_request_context(),
        "app_name": current_app.name,
        "config": current_app.config.get("TEST_VALUE"),
        "g_user": g.get("user"),
    }


def build_url(item_id: int) -> str:
    return url_for("item", item_id=item_id, _external=True)


def mutate_context() -> dict[str, Any]:
    g.user = "task"
    g.roles.append("task")
    g.added_by_task = True
    request.user = "task"
    request.meta["tags"].append("task")
    session["cart"] = ["task"]
    return {
        "g_user": g.user,
        "g_roles": g.roles,
        "request_user": request.user,
        "request_meta": request.meta,
        "session_cart": session["cart"],
    }


def read_context_after_gate(gate: str) -> dict[str, Any]:
    wait_for_path(gate)
    return {
        "g_user": g.user,
        "g_roles": g.roles,
        "request_user": request.user,
        "session_cart": session["cart"],
    }


def mark_and_check_g(marker: str) -> tuple[Any, Any]:
    """Return what this task's g holds before it sets its own teardown marker."""
    leaked = g.get("teardown_marker")
    g.teardown_marker = marker
    return leaked, g.get("shared")


def use_db_like_tutorial(n: int) -> tuple[bool, int, str]:
    had_db = "db" in g
    if "db" not in g:
        g.db = sqlite3.connect(":memory:")
    # A fresh connection: the view's table "t" does not exist here.
    g.db.execute("create table t (x integer)")
    g.db.executemany("insert into t values (?)", [(i,) for i in range(n)])
    (total,) = g.db.execute("select sum(x) from t").fetchone()
    return had_db, total, g.user


def read_uncopied(name: str) -> dict[str, Any]:
    outcome: dict[str, Any] = {
        "present": name in g,
        "getattr_default": getattr(g, name, "default"),
        "get_default": g.get(name, "default"),
        "user": g.user,
    }
    try:
        getattr(g, name)
    except GAttributeNotCopiedError as exc:
        outcome.update(
            error="GAttributeNotCopiedError",
            is_attribute_error=isinstance(exc, AttributeError),
            message=str(exc),
        )
    except AttributeError as exc:
        outcome.update(error="AttributeError", message=str(exc))
    else:
        outcome.update(error=None)
    return outcome


def map_item_probe(i: int) -> tuple[int, bool, Any, str, str]:
    leaked = "item" in g
    g.item = i
    time.sleep(0.002)
    return i, leaked, g.item, g.user, request.args["x"]


def map_item_appends(i: int) -> list[Any]:
    g.cart.append(i)  # the item's own copy of the view's list
    return list(g.cart)


def whoami() -> tuple[str, str, int]:
    assert request.view_args is not None
    return g.user, request.args["u"], request.view_args["item_id"]


# -- request, g, session, config ------------------------------------------------------


@pytest.mark.parametrize("view_reads_body", [False, True], ids=["unread", "read"])
def test_task_sees_request(app: Flask, make_executor: MakeExecutor, view_reads_body: bool) -> None:
    executor = make_executor(app)
    payload = {"a": [1, 2], "b": "c"}
    with app.test_request_context(
        "/path/7?x=1&x=2&y=z",
        method="POST",
        json=payload,
        headers={"X-Token": "tok-1", "Cookie": "flavour=oat; n=2"},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    ):
        if view_reads_body:
            assert request.get_json() == payload
        future = executor.submit(probe_request)
        seen = future.result(timeout=TIMEOUT)
    assert json.loads(seen.pop("data")) == payload
    assert seen == {
        "args": {"x": ["1", "2"], "y": ["z"]},
        "json": payload,
        "x_token": "tok-1",
        "content_type": "application/json",
        "cookies": {"flavour": "oat", "n": "2"},
        "view_args": {"item_id": 7},
        "endpoint": "item",
        "method": "POST",
        "path": "/path/7",
        "url": "http://localhost/path/7?x=1&x=2&y=z",
        "remote_addr": "10.1.2.3",
    }


def test_task_sees_config_custom_request_attributes_g_and_session(
    app: Flask, make_executor: MakeExecutor
) -> None:
    app.config["TEST_VALUE"] = "config-value-1"
    executor = make_executor(app)
    with app.test_request_context("/path/1"):
        request.user = "alice"
        request.meta = {"tags": ["a"], "level": 3}
        g.user = "alice"
        g.roles = ["admin", "editor"]
        session["cart"] = [1, 2]
        session["name"] = "alice"
        seen = executor.submit(probe_state).result(timeout=TIMEOUT)
    assert seen == {
        "config": "config-value-1",
        "request_user": "alice",
        "request_meta": {"tags": ["a"], "level": 3},
        "g_user": "alice",
        "g_roles": ["admin", "editor"],
        "session": {"cart": [1, 2], "name": "alice"},
    }


def test_task_sees_config_set_after_init_app(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    app.config["TEST_VALUE"] = "late"
    with app.test_request_context("/"):
        in_request = executor.submit(probe_app_only)
    outside = executor.submit(probe_app_only)
    assert in_request.result(timeout=TIMEOUT)["config"] == "late"
    assert outside.result(timeout=TIMEOUT)["config"] == "late"


def test_submit_in_req_ctx_fixture(req_ctx: RequestContext, executor: Executor) -> None:
    g.user = "fixture-user"
    seen = executor.submit(probe_request).result(timeout=TIMEOUT)
    assert seen["path"] == "/"
    assert seen["endpoint"] == "index"
    assert seen["method"] == "GET"
    assert executor.submit(probe_app_only).result(timeout=TIMEOUT)["g_user"] == "fixture-user"


def test_url_for_external(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    with app.test_request_context("/path/1", base_url="https://shop.example:8443/"):
        future = executor.submit(build_url, 3)
    assert future.result(timeout=TIMEOUT) == "https://shop.example:8443/path/3"


def test_url_for_external_without_request(app: Flask, make_executor: MakeExecutor) -> None:
    app.config.update(SERVER_NAME="svc.example", PREFERRED_URL_SCHEME="https")
    executor = make_executor(app)
    assert executor.submit(build_url, 4).result(timeout=TIMEOUT) == "https://svc.example/path/4"


# -- request bodies -------------------------------------------------------------------

BODY_CASES: dict[str, tuple[dict[str, Any], Callable[[], Any], Any]] = {
    "json": ({"json": {"a": [1, 2], "n": None}}, probe_json, {"a": [1, 2], "n": None}),
    "form": (
        {"data": {"name": "alice", "tag": ["x", "y"]}},
        probe_form,
        {"name": ["alice"], "tag": ["x", "y"]},
    ),
    "raw": (
        {"data": b"\x00raw\xffbytes", "content_type": "application/octet-stream"},
        probe_data,
        b"\x00raw\xffbytes",
    ),
}


@pytest.mark.parametrize("kind", sorted(BODY_CASES))
@pytest.mark.parametrize("view_reads_body", [False, True], ids=["unread", "read"])
def test_request_body(
    app: Flask, make_executor: MakeExecutor, kind: str, view_reads_body: bool
) -> None:
    body, probe, expected = BODY_CASES[kind]
    executor = make_executor(app)
    with app.test_request_context("/path/1", method="POST", **body):
        if view_reads_body:
            assert probe() == expected
        future = executor.submit(probe)
        assert future.result(timeout=TIMEOUT) == expected
        # The view can still read the body after the task did.
        assert probe() == expected


def test_view_submits_via_client(
    app: Flask, client: FlaskClient, make_executor: MakeExecutor
) -> None:
    app.config["TEST_VALUE"] = "from-config"
    make_executor(app)

    def view(item_id: int) -> ResponseReturnValue:
        # The view never touches the body.
        g.user = "alice"
        g.roles = ["admin"]
        request.user = "alice"
        request.meta = {"tags": []}
        session["cart"] = [item_id]
        executor = current_app.extensions["executor"]
        seen_request = executor.submit(probe_request).result(timeout=TIMEOUT)
        seen_state = executor.submit(probe_state).result(timeout=TIMEOUT)
        return jsonify(request=seen_request, state=seen_state)

    app.extensions["test_view"] = view
    client.set_cookie("flavour", "oat")
    response = client.post(
        "/view/5?x=1",
        json={"k": "v"},
        headers={"X-Token": "tok-2"},
        environ_base={"REMOTE_ADDR": "10.0.0.9"},
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    seen_request = body["request"]
    assert json.loads(seen_request.pop("data")) == {"k": "v"}
    assert seen_request == {
        "args": {"x": ["1"]},
        "json": {"k": "v"},
        "x_token": "tok-2",
        "content_type": "application/json",
        "cookies": {"flavour": "oat"},
        "view_args": {"item_id": 5},
        "endpoint": "view_submit",
        "method": "POST",
        "path": "/view/5",
        "url": "http://localhost/view/5?x=1",
        "remote_addr": "10.0.0.9",
    }
    assert body["state"] == {
        "config": "from-config",
        "request_user": "alice",
        "request_meta": {"tags": []},
        "g_user": "alice",
        "g_roles": ["admin"],
        "session": {"cart": [5]},
    }


@pytest.mark.parametrize("kind", sorted(BODY_CASES))
def test_body_unread_by_view_via_client(
    app: Flask, client: FlaskClient, make_executor: MakeExecutor, kind: str
) -> None:
    body, probe, expected = BODY_CASES[kind]
    make_executor(app)
    results: list[Any] = []

    def view(item_id: int) -> ResponseReturnValue:
        results.append(current_app.extensions["executor"].submit(probe).result(timeout=TIMEOUT))
        return "ok"

    app.extensions["test_view"] = view
    response = client.post("/view/1", **body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert results == [expected]


# -- isolation ------------------------------------------------------------------------


def test_task_changes_do_not_reach_view(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    with app.test_request_context("/path/1"):
        g.user = "alice"
        g.roles = ["admin"]
        request.user = "alice"
        request.meta = {"tags": ["view"]}
        session["cart"] = ["view"]
        seen = executor.submit(mutate_context).result(timeout=TIMEOUT)
        # The task did change its own copies ...
        assert seen == {
            "g_user": "task",
            "g_roles": ["admin", "task"],
            "request_user": "task",
            "request_meta": {"tags": ["view", "task"]},
            "session_cart": ["task"],
        }
        # ... and none of it reached the view.
        assert g.user == "alice"
        assert g.roles == ["admin"]
        assert "added_by_task" not in g
        assert request.user == "alice"
        assert request.meta == {"tags": ["view"]}
        assert session["cart"] == ["view"]


def test_view_changes_after_submit_do_not_reach_task(
    app: Flask, make_executor: MakeExecutor, gates: Gates
) -> None:
    executor = make_executor(app)
    gate = gates.new()
    with app.test_request_context("/path/1"):
        g.user = "before"
        g.roles = ["before"]
        request.user = "before"
        session["cart"] = ["before"]
        future = executor.submit(read_context_after_gate, gate)
        g.user = "after"
        g.roles.append("after")
        request.user = "after"
        session["cart"] = ["after"]
        touch(gate)
        seen = future.result(timeout=TIMEOUT)
    assert seen == {
        "g_user": "before",
        "g_roles": ["before"],
        "request_user": "before",
        "session_cart": ["before"],
    }


@pytest.mark.parametrize("where", ["request", "app", "none"])
def test_each_task_has_its_own_app_context(
    app: Flask, make_executor: MakeExecutor, tmp_path: Path, where: str
) -> None:
    log = tmp_path / "teardown.log"
    app.config["TEARDOWN_LOG"] = str(log)
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=1)
    markers = [f"task-{i}" for i in range(5)]

    def submit_all() -> list[tuple[Any, Any]]:
        futures = [executor.submit(mark_and_check_g, marker) for marker in markers]
        return [f.result(timeout=TIMEOUT) for f in futures]

    if where == "request":
        with app.test_request_context("/"):
            g.shared = "view"
            results = submit_all()
    elif where == "app":
        with app.app_context():
            g.shared = "view"
            results = submit_all()
    else:
        results = submit_all()
    shared = None if where == "none" else "view"
    # No task saw the marker a previous task set in its g.
    assert results == [(None, shared)] * len(markers)
    # teardown_appcontext ran once after each task, in that task's context.
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= len(markers))
    assert sorted(log.read_text().splitlines()) == markers


@pytest.mark.parametrize("chunksize", [1, 5])
def test_map_items_each_get_their_own_context(
    app: Flask, make_executor: MakeExecutor, chunksize: int
) -> None:
    """Upstream #53: map shared one context object between worker threads."""
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=4)
    with app.test_request_context("/path/2?x=map"):
        g.user = "alice"
        results = list(
            executor.map(map_item_probe, range(50), timeout=TIMEOUT, chunksize=chunksize)
        )
    assert results == [(i, False, i, "alice", "map") for i in range(50)]


def test_map_items_each_get_their_own_copy_of_a_mutable_g_value(
    app: Flask, make_executor: MakeExecutor
) -> None:
    """The items of a chunk share one snapshot (and, in a process worker, one
    restore): a list in ``g`` that one item appends to is not the next item's."""
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2)
    with app.test_request_context("/"):
        g.cart = ["view"]
        results = list(executor.map(map_item_appends, range(20), timeout=TIMEOUT, chunksize=10))
        assert g.cart == ["view"]
    assert results == [["view", i] for i in range(20)]


def test_concurrent_requests_are_isolated(
    app: Flask, make_executor: MakeExecutor, executor_type: str
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=8)
    # A Dask task costs the scheduler milliseconds: 1,600 of them took 16-22 s
    # alone on a slow machine, past the join below in a loaded CI run.
    threads, per_thread = 8, 50 if executor_type == "dask" else 200
    start = threading.Barrier(threads, timeout=TIMEOUT)
    results: dict[int, list[tuple[str, str, int]]] = {}
    errors: list[BaseException] = []

    def client_thread(i: int) -> None:
        try:
            with app.test_request_context(f"/path/{i}?u=user-{i}"):
                g.user = f"user-{i}"
                start.wait()
                futures = [executor.submit(whoami) for _ in range(per_thread)]
                results[i] = [f.result(timeout=TIMEOUT) for f in futures]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=client_thread, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=3 * TIMEOUT)
    assert not any(worker.is_alive() for worker in workers)
    assert errors == []
    for i in range(threads):
        assert results[i] == [(f"user-{i}", f"user-{i}", i)] * per_thread


# -- outside a request ----------------------------------------------------------------


def test_submit_in_app_context_without_request(app: Flask, make_executor: MakeExecutor) -> None:
    app.config["TEST_VALUE"] = 123
    executor = make_executor(app)
    with app.app_context():
        g.user = "bob"
        future = executor.submit(probe_app_only)
        seen = future.result(timeout=TIMEOUT)
        assert g.user == "bob"
    assert seen == {
        "app_context": True,
        "request_context": False,
        "app_name": app.name,
        "config": 123,
        "g_user": "bob",
    }


def test_submit_outside_any_context(app: Flask, make_executor: MakeExecutor) -> None:
    app.config["TEST_VALUE"] = 456
    executor = make_executor(app)
    assert not has_app_context()
    seen = executor.submit(probe_app_only).result(timeout=TIMEOUT)
    assert seen == {
        "app_context": True,
        "request_context": False,
        "app_name": app.name,
        "config": 456,
        "g_user": None,
    }


# -- g values that cannot be copied ---------------------------------------------------


def test_tutorial_sqlite_pattern(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    with app.test_request_context("/"):
        g.db = sqlite3.connect(":memory:")
        g.db.execute("create table t (x integer)")
        g.user = "alice"
        seen = executor.submit(use_db_like_tutorial, 5).result(timeout=TIMEOUT)
        # The view's own connection is untouched and still usable.
        assert g.db.execute("select count(*) from t").fetchone() == (0,)
    assert seen == (False, 10, "alice")


@pytest.mark.parametrize("name", ["db", "lock"])
def test_uncopyable_g_attribute_is_left_out(
    app: Flask, make_executor: MakeExecutor, name: str
) -> None:
    executor = make_executor(app)
    with app.test_request_context("/"):
        g.db = sqlite3.connect(":memory:")
        g.lock = threading.Lock()
        g.user = "alice"
        seen = executor.submit(read_uncopied, name).result(timeout=TIMEOUT)
        assert "db" in g and "lock" in g  # the view keeps its own
    message = seen.pop("message")
    assert seen == {
        "present": False,
        "getattr_default": "default",
        "get_default": "default",
        "user": "alice",
        "error": "GAttributeNotCopiedError",
        "is_attribute_error": True,
    }
    assert re.search(rf"\b{name}\b", message), message
    assert re.search(r"pickl|cop", message, re.IGNORECASE), message


def test_uncopyable_g_attribute_outside_request(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app)
    with app.app_context():
        g.lock = threading.Lock()
        g.user = "alice"
        seen = executor.submit(read_uncopied, "lock").result(timeout=TIMEOUT)
    assert seen["present"] is False
    assert seen["user"] == "alice"
    assert seen["error"] == "GAttributeNotCopiedError"


def read_body_or_error() -> str:
    try:
        return request.get_data().decode()
    except BodyNotCapturedError as exc:
        return f"error: {exc}"


def test_partly_consumed_body_raises_instead_of_arriving_truncated(
    app: Flask, make_executor: MakeExecutor
) -> None:
    executor = make_executor(app)
    with app.test_request_context("/", method="POST", data=b"0123456789"):
        assert request.stream.read(3) == b"012"
        seen = executor.submit(read_body_or_error).result(timeout=TIMEOUT)
    assert seen.startswith("error: ") and "consumed" in seen


def test_no_body_limit_when_max_body_is_none(app: Flask, make_executor: MakeExecutor) -> None:
    executor = make_executor(app, EXECUTOR_SNAPSHOT_MAX_BODY=None)
    with app.test_request_context("/", method="POST", data=b"x" * 5000):
        seen = executor.submit(read_body_or_error).result(timeout=TIMEOUT)
    assert seen == "x" * 5000
