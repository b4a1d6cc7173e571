"""Process mode specifics: what a task rebuilt from a pickled snapshot sees in a worker
process, how functions, jobs, errors and callbacks travel, and how pools start.

Most tests run once per start method (``fork``, ``forkserver``, ``spawn``): the worker
gets its app differently in each (inherited by fork, or rebuilt from the app spec) and
imports task functions by reference in the last two. Task functions are module-level so
that they pickle by reference; each test uses one executor of at most two workers.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jobs_support
import pytest
from flask import (
    Blueprint,
    Flask,
    Request,
    current_app,
    g,
    has_app_context,
    has_request_context,
    render_template,
    render_template_string,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from process_support import MakeProcessExecutor, process_config
from support import Gates, block_until, create_app, touch, wait_for_path, wait_until
from werkzeug.routing import BaseConverter

from flask_executor import (
    BodyNotCapturedError,
    Executor,
    GAttributeNotCopiedError,
    SerializationError,
)
from flask_executor.backends.process import default_start_method

#: Seconds any wait for a task's result may take.
WAIT = 30

def child_pids() -> set[int]:
    return {process.pid for process in multiprocessing.active_children() if process.pid}


def dispatcher_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "flask-executor-dispatcher"}


# -- apps -----------------------------------------------------------------------------


class TaggedRequest(Request):
    """A custom ``request_class``: workers must use it too."""

    flavour = "tagged"


class UpperConverter(BaseConverter):
    def to_python(self, value: str) -> str:
        return value.lower()

    def to_url(self, value: str) -> str:
        return value.upper()


def create_rich_app(template_folder: str) -> Flask:
    """An app with a custom request class, a URL converter, a blueprint and templates.

    Never used as ``EXECUTOR_APP_FACTORY``: workers must rebuild all of it from the app
    spec.
    """
    app = Flask(__name__, template_folder=template_folder)
    app.request_class = TaggedRequest
    app.url_map.converters["upper"] = UpperConverter
    app.config.update(TESTING=True, SECRET_KEY="rich-secret")
    shop = Blueprint("shop", __name__, url_prefix="/shop")

    @shop.route("/items")
    def listing() -> ResponseReturnValue:
        return "items"

    @shop.route("/items/<int:item_id>", methods=["GET", "POST"])
    def detail(item_id: int) -> ResponseReturnValue:
        return str(item_id)

    app.register_blueprint(shop)

    @app.route("/code/<upper:code>")
    def code(code: str) -> ResponseReturnValue:
        return code

    return app


def create_factory_app() -> Flask:
    """``EXECUTOR_APP_FACTORY`` for the config-exclusion tests: the factory's own secrets."""
    app = create_app()
    app.config.update(DB_PASSWORD="factory-password", ADMIN_PASSWORD="factory-admin")
    return app


# -- tasks ----------------------------------------------------------------------------

#: Rebinding this in the test process is visible only to workers forked after it.
MARKER = "as imported"


def read_marker() -> str:
    return MARKER


def echo(value: Any) -> Any:
    return value


def echo_kwargs(a: Any, x: Any = None) -> tuple[Any, Any]:
    return a, x


def getpid() -> int:
    return os.getpid()


def config_items(*keys: str) -> dict[str, Any]:
    """The given keys of the worker's config; absent keys are left out."""
    return {key: current_app.config[key] for key in keys if key in current_app.config}


def config_keys_present(*keys: str) -> list[str]:
    """Which of the given keys the worker's config has (their values may not pickle)."""
    return [key for key in keys if key in current_app.config]


def probe_standin() -> dict[str, Any]:
    req = request._get_current_object()  # type: ignore[attr-defined]
    return {
        "import_name": current_app.import_name,
        "name": current_app.name,
        "endpoint": request.endpoint,
        "view_args": request.view_args,
        "blueprint": request.blueprint,
        "url_external": url_for("shop.detail", item_id=9, _external=True),
        "url_relative": url_for(".listing"),
        "url_converter": url_for("code", code="abc", _external=True),
        "url_static": url_for("static", filename="site.css"),
        "request_class": f"{type(req).__module__}.{type(req).__qualname__}",
        "flavour": getattr(req, "flavour", None),
        "string_template": render_template_string(
            "{{ greeting }} {{ request.path }}", greeting="hi"
        ),
        "file_template": render_template("hello.html", name="ann"),
    }


def probe_upload() -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.path,
        "args": request.args.to_dict(flat=False),
        "form": request.form.to_dict(flat=False),
        "files": {
            name: (storage.filename, storage.read())
            for name, storage in request.files.items(multi=True)
        },
        "x_token": request.headers.get("X-Token"),
        "cookies": request.cookies.to_dict(),
        "view_args": request.view_args,
        "endpoint": request.endpoint,
        "remote_addr": request.remote_addr,
        "request_user": getattr(request, "user", None),
        "session": dict(session),
        "g_user": g.get("user"),
    }


def probe_bodies() -> dict[str, Any]:
    return {
        "json": request.get_json(silent=True),
        "data": request.get_data(),
        "form": request.form.to_dict(flat=False),
    }


def probe_data() -> bytes:
    return request.get_data()


def probe_form() -> dict[str, list[str]]:
    return request.form.to_dict(flat=False)


def probe_g() -> dict[str, Any]:
    outcome: dict[str, Any] = {
        "user": g.get("user"),
        "roles": g.get("roles"),
        "db_in_g": "db" in g,
        "lock_in_g": "lock" in g,
    }
    for name in ("db", "lock"):
        try:
            getattr(g, name)
        except GAttributeNotCopiedError as exc:
            outcome[name] = ("GAttributeNotCopiedError", isinstance(exc, AttributeError), str(exc))
        except AttributeError as exc:
            outcome[name] = ("AttributeError", True, str(exc))
        else:
            outcome[name] = None
    return outcome


def probe_context() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "app_context": has_app_context(),
        "request_context": has_request_context(),
        "app_name": current_app.name if has_app_context() else None,
        "g": dict(vars(g._get_current_object())) if has_app_context() else None,
        "args": request.args.to_dict() if has_request_context() else None,
        "session": dict(session) if has_request_context() else None,
    }


def add_one(x: int) -> int:
    return x + 1


class TaskFailed(Exception):
    """A custom exception with several constructor arguments."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def raise_value_error(n: int) -> None:
    raise ValueError(f"bad value {n}")


def raise_task_failed(code: int) -> None:
    raise TaskFailed(code, "custom detail")


# -- config ---------------------------------------------------------------------------


def test_unpicklable_config_is_left_out_and_logged_once(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    start_method: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flask_executor")
    app.config.update(LOCK_VALUE=threading.Lock(), GEN_VALUE=(i for i in ()), PLAIN="one")
    executor = make_process_executor(app, start_method)
    keys = ("LOCK_VALUE", "GEN_VALUE", "PLAIN")
    seen = [executor.submit(config_keys_present, *keys).result(timeout=WAIT)]
    app.config["PLAIN"] = "two"  # a config change: the picklable subset is taken again
    with app.app_context():
        seen.append(executor.submit(config_items, "PLAIN").result(timeout=WAIT))
        seen.append(executor.submit(config_keys_present, *keys).result(timeout=WAIT))
    with app.test_request_context("/"):
        seen.append(executor.submit(config_keys_present, *keys).result(timeout=WAIT))
    assert seen == [["PLAIN"], {"PLAIN": "two"}, ["PLAIN"], ["PLAIN"]]
    for key in ("LOCK_VALUE", "GEN_VALUE"):
        records = [
            r for r in caplog.records if r.name == "flask_executor" and key in r.getMessage()
        ]
        assert len(records) == 1, [r.getMessage() for r in records]
        assert records[0].levelno >= logging.DEBUG


@pytest.mark.parametrize("factory", [None, "test_process:create_factory_app"])
def test_config_exclude(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    start_method: str,
    factory: str | None,
) -> None:
    app.config.update(
        SECRET_KEY="web-secret",
        DB_PASSWORD="web-password",
        ADMIN_PASSWORD="web-admin",
        DB_HOST="db.example",
    )
    executor = make_process_executor(
        app,
        start_method,
        EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY", "*_PASSWORD"],
        EXECUTOR_APP_FACTORY=factory,
    )
    keys = ("SECRET_KEY", "DB_PASSWORD", "ADMIN_PASSWORD", "DB_HOST")
    with app.test_request_context("/"):
        seen = executor.submit(config_items, *keys).result(timeout=WAIT)
    if factory is None:
        # Excluded keys are gone (reading one raises ConfigKeyNotCopiedError), even
        # SECRET_KEY, which Flask's default config has as None.
        assert seen == {"DB_HOST": "db.example"}
    else:
        # The factory app's own values remain; the web app's are not applied on top.
        assert seen == {
            "SECRET_KEY": "test-secret-key",
            "DB_PASSWORD": "factory-password",
            "ADMIN_PASSWORD": "factory-admin",
            "DB_HOST": "db.example",
        }


def test_config_changes_between_submits(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    app.config["STAGE"] = "first"
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    first = executor.submit(config_items, "STAGE", "ADDED").result(timeout=WAIT)
    app.config.update(STAGE="second", ADDED=[1, 2])
    second = executor.submit(config_items, "STAGE", "ADDED").result(timeout=WAIT)
    app.config["ADDED"] = [3]
    with app.test_request_context("/"):
        third = executor.submit(config_items, "STAGE", "ADDED").result(timeout=WAIT)
    assert first == {"STAGE": "first"}
    assert second == {"STAGE": "second", "ADDED": [1, 2]}
    assert third == {"STAGE": "second", "ADDED": [3]}


def test_config_key_removed_between_submits(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    """The task sees the config at submit time, also when a key was deleted after an
    earlier task ran on the same worker."""
    app.config["FEATURE_FLAG"] = True
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    first_pid, first = executor.submit(_pid_and_config, "FEATURE_FLAG").result(timeout=WAIT)
    del app.config["FEATURE_FLAG"]
    second_pid, second = executor.submit(_pid_and_config, "FEATURE_FLAG").result(timeout=WAIT)
    assert first_pid == second_pid  # one worker
    assert first == {"FEATURE_FLAG": True}
    assert second == {}


def _pid_and_config(*keys: str) -> tuple[int, dict[str, Any]]:
    return os.getpid(), config_items(*keys)


# -- the worker's app without EXECUTOR_APP_FACTORY ------------------------------------


def test_standin_app_has_routes_request_class_and_templates(
    tmp_path: Path, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    (tmp_path / "hello.html").write_text("Hello {{ name }} at {{ request.path }}")
    app = create_rich_app(str(tmp_path))
    executor = make_process_executor(app, start_method)
    with app.test_request_context("/shop/items/7?q=x", base_url="https://shop.example/"):
        assert type(request._get_current_object()) is TaggedRequest  # type: ignore[attr-defined]
        seen = executor.submit(probe_standin).result(timeout=WAIT)
    assert seen == {
        "import_name": "test_process",
        "name": "test_process",
        "endpoint": "shop.detail",
        "view_args": {"item_id": 7},
        "blueprint": "shop",
        "url_external": "https://shop.example/shop/items/9",
        "url_relative": "/shop/items",
        "url_converter": "https://shop.example/code/ABC",
        "url_static": "/static/site.css",
        "request_class": "test_process.TaggedRequest",
        "flavour": "tagged",
        "string_template": "hi /shop/items/7",
        "file_template": "Hello ann at /shop/items/7",
    }


# -- request --------------------------------------------------------------------------


@pytest.mark.parametrize("view_parsed_form", [False, True], ids=["unparsed", "parsed"])
def test_request_with_upload(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    start_method: str,
    view_parsed_form: bool,
) -> None:
    executor = make_process_executor(app, start_method)
    with app.test_request_context(
        "/path/3?x=1&x=2",
        method="POST",
        data={
            "title": "Report",
            "tag": ["a", "b"],
            "doc": (io.BytesIO(b"\x00file\xffbytes"), "a.txt"),
        },
        headers={"X-Token": "tok", "Cookie": "flavour=oat; n=2"},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    ):
        if view_parsed_form:
            # The view parsed the form, which consumed the body: it is re-encoded.
            assert request.form["title"] == "Report"
            assert request.files["doc"].filename == "a.txt"
        request.user = "alice"
        g.user = "alice"
        session["cart"] = [1, 2]
        seen = executor.submit(probe_upload).result(timeout=WAIT)
        # The view's own upload is still readable.
        assert request.files["doc"].read() == b"\x00file\xffbytes"
    assert seen == {
        "method": "POST",
        "path": "/path/3",
        "args": {"x": ["1", "2"]},
        "form": {"title": ["Report"], "tag": ["a", "b"]},
        "files": {"doc": ("a.txt", b"\x00file\xffbytes")},
        "x_token": "tok",
        "cookies": {"flavour": "oat", "n": "2"},
        "view_args": {"item_id": 3},
        "endpoint": "item",
        "remote_addr": "10.1.2.3",
        "request_user": "alice",
        "session": {"cart": [1, 2]},
        "g_user": "alice",
    }


def test_request_bodies(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method)
    seen = {}
    with app.test_request_context("/path/1", method="POST", json={"a": [1, None]}):
        seen["json"] = executor.submit(probe_bodies).result(timeout=WAIT)
    with app.test_request_context(
        "/path/1", method="POST", data=b"\x00raw", content_type="application/octet-stream"
    ):
        seen["raw"] = executor.submit(probe_bodies).result(timeout=WAIT)
    with app.test_request_context(
        "/path/1", method="POST", data={"name": "alice", "k": ["1", "2"]}
    ):
        assert request.form["name"] == "alice"  # parsed by the view before submit
        seen["parsed_urlencoded"] = executor.submit(probe_form).result(timeout=WAIT)
    assert seen == {
        "json": {"json": {"a": [1, None]}, "data": b'{"a": [1, null]}', "form": {}},
        "raw": {"json": None, "data": b"\x00raw", "form": {}},
        "parsed_urlencoded": {"name": ["alice"], "k": ["1", "2"]},
    }


def test_body_larger_than_max_body_raises_in_task(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method, EXECUTOR_SNAPSHOT_MAX_BODY=100)
    with app.test_request_context(
        "/path/1", method="POST", data=b"x" * 500, content_type="application/octet-stream"
    ):
        raw = executor.submit(probe_data)
    with app.test_request_context("/path/1", method="POST", data={"field": "y" * 500}):
        form = executor.submit(probe_form)
    with app.test_request_context("/path/1", method="POST", data=b"small"):
        small = executor.submit(probe_data)  # under the limit: carried
    with pytest.raises(BodyNotCapturedError, match="EXECUTOR_SNAPSHOT_MAX_BODY"):
        raw.result(timeout=WAIT)
    with pytest.raises(BodyNotCapturedError, match="EXECUTOR_SNAPSHOT_MAX_BODY"):
        form.result(timeout=WAIT)
    assert small.result(timeout=WAIT) == b"small"


def test_body_consumed_by_view_raises_in_task(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method)
    with app.test_request_context(
        "/path/1", method="POST", data=b"streamed", content_type="application/octet-stream"
    ):
        assert request.stream.read() == b"streamed"
        future = executor.submit(probe_data)
    with pytest.raises(BodyNotCapturedError, match="consumed"):
        future.result(timeout=WAIT)


# -- g, session, no request -------------------------------------------------------------


@pytest.mark.parametrize("where", ["request", "app"])
def test_g_unpicklable_attributes_are_left_out(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str, where: str
) -> None:
    executor = make_process_executor(app, start_method)
    ctx = app.test_request_context("/") if where == "request" else app.app_context()
    with ctx:
        g.user = "alice"
        g.roles = ["admin", "editor"]
        g.lock = threading.Lock()
        g.db = sqlite3.connect(":memory:")
        try:
            seen = executor.submit(probe_g).result(timeout=WAIT)
            assert "db" in g and "lock" in g  # the view keeps its own
        finally:
            g.db.close()
    assert {k: seen[k] for k in ("user", "roles", "db_in_g", "lock_in_g")} == {
        "user": "alice",
        "roles": ["admin", "editor"],
        "db_in_g": False,
        "lock_in_g": False,
    }
    for name in ("db", "lock"):
        assert seen[name] is not None, f"g.{name} was readable in the task"
        error, is_attribute_error, message = seen[name]
        assert (error, is_attribute_error) == ("GAttributeNotCopiedError", True)
        assert re.search(rf"\b{name}\b", message), message
        assert "could not be pickled" in message, message


def test_without_request_and_without_any_context(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method)
    with app.app_context():
        g.user = "bob"
        in_app = executor.submit(probe_context).result(timeout=WAIT)
    outside = executor.submit(probe_context).result(timeout=WAIT)
    for seen in (in_app, outside):
        del seen["pid"]
    assert in_app == {
        "app_context": True,
        "request_context": False,
        "app_name": app.name,
        "g": {"user": "bob"},
        "args": None,
        "session": None,
    }
    assert outside == {**in_app, "g": {}}


def test_worker_never_sees_a_previous_tasks_context(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method, EXECUTOR_MAX_WORKERS=1)
    from_thread: list[dict[str, Any]] = []

    def submit_without_context() -> None:
        from_thread.append(executor.submit(probe_context).result(timeout=WAIT))

    with app.test_request_context("/path/1?u=alice"):
        g.user = "alice"
        session["who"] = "alice"
        a = executor.submit(probe_context).result(timeout=WAIT)
        # Another thread, with no context, submits while this request is still pushed.
        thread = threading.Thread(target=submit_without_context)
        thread.start()
        thread.join(timeout=WAIT)
        assert not thread.is_alive()
    with app.app_context():
        b = executor.submit(probe_context).result(timeout=WAIT)
    with app.test_request_context("/path/2"):
        c = executor.submit(probe_context).result(timeout=WAIT)
    assert a["request_context"] is True
    assert (a["g"], a["args"], a["session"]) == (
        {"user": "alice"},
        {"u": "alice"},
        {"who": "alice"},
    )
    assert [seen["pid"] for seen in (b, *from_thread, c)] == [a["pid"]] * 3  # one worker
    for seen in (b, *from_thread):
        assert (seen["request_context"], seen["g"], seen["args"]) == (False, {}, None)
    assert (c["request_context"], c["g"], c["args"], c["session"]) == (True, {}, {}, {})


# -- functions ------------------------------------------------------------------------


def test_functions_module_level_lambda_closure_and_local(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    app.config["X"] = "config-x"
    executor = make_process_executor(app, start_method)
    offset = 10

    def local_function(x: int) -> int:
        return x * 3

    def closure(x: int) -> int:
        return x + offset

    calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "module_level": (add_one, (1,)),
        "lambda": (lambda x: x * 2, (4,)),
        "closure": (closure, (5,)),
        "local_function": (local_function, (6,)),
        "lambda_current_app": (lambda: current_app.config["X"], ()),
        "lambda_g": (lambda: g.user, ()),
        "lambda_request": (lambda: request.args["q"], ()),
        "lambda_session": (lambda: session["s"], ()),
        "lambda_pid": (lambda: os.getpid(), ()),
    }
    with app.test_request_context("/?q=query"):
        g.user = "alice"
        session["s"] = "session-value"
        futures = {name: executor.submit(fn, *args) for name, (fn, args) in calls.items()}
        seen = {name: future.result(timeout=WAIT) for name, future in futures.items()}
    assert seen.pop("lambda_pid") != os.getpid()
    assert seen == {
        "module_level": 2,
        "lambda": 8,
        "closure": 15,
        "local_function": 18,
        "lambda_current_app": "config-x",
        "lambda_g": "alice",
        "lambda_request": "query",
        "lambda_session": "session-value",
    }


def test_jobs(
    app: Flask, start_method: str, shutdown_after: Callable[[Executor], Executor]
) -> None:
    executor = jobs_support.executor
    app.config.update(process_config(start_method, JOB_OFFSET=100))
    executor.init_app(app)
    shutdown_after(executor)
    fib, square = jobs_support.fib, jobs_support.square_plus_offset

    @executor.job
    def local_job(x: int) -> tuple[int, str]:
        return x + current_app.config["JOB_OFFSET"], g.user

    @executor.job
    def countdown(n: int) -> list[int]:
        return [] if n == 0 else [n, *countdown(n - 1)]

    assert fib(10) == 55  # inline
    assert fib.submit(15).result(timeout=WAIT) == 610
    key = f"fib-{start_method}"
    fib.submit_stored(key, 12)
    stored = executor.futures.pop(key)
    assert stored is not None
    assert stored.result(timeout=WAIT) == 144
    expected = [i * i + 100 for i in range(10)]
    assert list(square.map(range(10), chunksize=1, timeout=WAIT)) == expected
    assert list(square.map(range(10), chunksize=3, timeout=WAIT)) == expected
    with app.test_request_context("/"):
        g.user = "alice"
        assert local_job.submit(5).result(timeout=WAIT) == (105, "alice")
        mapped = list(local_job.map([1, 2, 3, 4], chunksize=3, timeout=WAIT))
    assert mapped == [(101, "alice"), (102, "alice"), (103, "alice"), (104, "alice")]
    assert countdown.submit(3).result(timeout=WAIT) == [3, 2, 1]


# -- exceptions, callbacks, serialisation -------------------------------------------


def test_task_exceptions_keep_type_message_and_worker_traceback(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    executor = make_process_executor(app, start_method)
    value_error = executor.submit(raise_value_error, 42)
    custom = executor.submit(raise_task_failed, 7)
    with pytest.raises(ValueError, match=r"^bad value 42$") as info:
        value_error.result(timeout=WAIT)
    assert type(info.value) is ValueError
    assert "raise_value_error" in str(info.value.__cause__)
    with pytest.raises(TaskFailed) as custom_info:
        custom.result(timeout=WAIT)
    assert type(custom_info.value) is TaskFailed
    assert (custom_info.value.code, custom_info.value.detail) == (7, "custom detail")
    assert "raise_task_failed" in str(custom_info.value.__cause__)
    assert executor.submit(add_one, 1).result(timeout=WAIT) == 2


def test_done_callbacks_run_in_web_process_with_app_context(
    app: Flask, make_process_executor: MakeProcessExecutor, gates: Gates
) -> None:
    executor = make_process_executor(app, "forkserver")
    calls: list[dict[str, Any]] = []

    def record(future: Any) -> None:
        calls.append(
            {
                "pid": os.getpid(),
                "test_thread": threading.current_thread() is test_thread,
                "app_name": current_app.name,
                "path": request.path if has_request_context() else None,
                "g_user": g.get("user"),
                "result": future.result(timeout=0),
            }
        )

    test_thread = threading.current_thread()
    executor.add_default_done_callback(record)
    started, gate = gates.new(), gates.new()
    with app.test_request_context("/path/4"):
        g.user = "alice"
        in_request = executor.submit(block_until, started, gate, "from-request")
        in_request.add_done_callback(record)
    outside = executor.submit(echo, "outside")
    wait_for_path(started)
    assert not in_request.done()  # so the callbacks run when the worker's result arrives
    touch(gate)
    assert in_request.result(timeout=WAIT) == "from-request"
    assert outside.result(timeout=WAIT) == "outside"
    wait_until(lambda: len(calls) == 3)
    request_call = {
        "pid": os.getpid(),
        "test_thread": False,
        "app_name": app.name,
        "path": "/path/4",
        "g_user": "alice",
        "result": "from-request",
    }
    outside_calls = [call for call in calls if call["result"] == "outside"]
    assert [call for call in calls if call["result"] == "from-request"] == [request_call] * 2
    assert [{**call, "test_thread": False} for call in outside_calls] == [
        {**request_call, "path": None, "g_user": None, "result": "outside"}
    ]


def test_unpicklable_arguments_raise_in_submit(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    before = child_pids()
    executor = make_process_executor(app, "forkserver")
    with app.test_request_context("/"):
        with pytest.raises(SerializationError) as args_error:
            executor.submit(echo, threading.Lock())
    with pytest.raises(SerializationError) as kwargs_error:
        executor.submit(echo_kwargs, 1, x=threading.Lock())
    lock = threading.Lock()
    with pytest.raises(SerializationError) as callable_error:
        executor.submit(lambda: lock.locked())
    assert isinstance(args_error.value, TypeError)
    message = str(args_error.value)
    assert "args[0]" in message and "lock" in message, message
    assert "kwargs['x']" in str(kwargs_error.value), str(kwargs_error.value)
    assert "callable" in str(callable_error.value), str(callable_error.value)
    # Nothing was sent: no worker was even started.
    assert child_pids() - before == set()
    assert executor.submit(echo_kwargs, 1, x=2).result(timeout=WAIT) == (1, 2)
    with pytest.raises(SerializationError, match=re.escape("args[1]")):
        executor.submit(echo_kwargs, 1, threading.Lock())
    assert executor.submit(echo, "next").result(timeout=WAIT) == "next"


# -- pools ----------------------------------------------------------------------------


def test_pool_starts_lazily(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    children, dispatchers = child_pids(), dispatcher_threads()
    executor = make_process_executor(app, start_method)
    # (Differences, not equality: a process of an earlier test may still be exiting.)
    assert child_pids() - children == set()
    assert dispatcher_threads() - dispatchers == set()
    pid = executor.submit(getpid).result(timeout=WAIT)
    assert pid != os.getpid()
    assert pid in child_pids() - children


@pytest.mark.parametrize(
    ("configured", "expected"),
    [(None, "as imported"), ("fork", "set in parent")],
    ids=["default", "fork"],
)
def test_default_start_method_is_not_fork(
    app: Flask,
    make_process_executor: MakeProcessExecutor,
    monkeypatch: pytest.MonkeyPatch,
    configured: str | None,
    expected: str,
) -> None:
    """A forked worker inherits the test module as changed at runtime; a worker started
    by forkserver or spawn imports it afresh."""
    assert default_start_method() in ("forkserver", "spawn")
    monkeypatch.setattr(sys.modules[__name__], "MARKER", "set in parent")
    executor = make_process_executor(app, configured)
    assert app.config["EXECUTOR_START_METHOD"] == configured
    assert executor.submit(read_marker).result(timeout=WAIT) == expected


def test_invalid_start_method(app: Flask) -> None:
    app.config.update(process_config("threads"))
    with pytest.raises(ValueError) as info:
        Executor(app)
    message = str(info.value)
    for word in ("'threads'", "EXECUTOR_START_METHOD", "fork", "forkserver", "spawn"):
        assert word in message, message
