"""Helpers shared by the test modules: the test app factory and file-based gates.

Everything here is a module-level function so that process workers can import it by
reference (``EXECUTOR_APP_FACTORY = "support:create_app"``; task functions that call
``wait_for_path``). Gates and markers are files rather than ``threading.Event`` objects
for the same reason: a file works across threads and processes alike.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, current_app, g
from flask.typing import ResponseReturnValue

#: Seconds any single wait in the test suite may take before it becomes a failure.
TIMEOUT = 10.0


def create_app() -> Flask:
    """Build the app every test starts from.

    Routes:

    - ``/`` (``index``)
    - ``/path/<int:item_id>`` (``item``, GET and POST): the URL that
      ``test_request_context`` calls match, so ``request.endpoint`` and
      ``request.view_args`` are set.
    - ``/view/<int:item_id>`` (``view_submit``, GET and POST): runs the callable a test
      stores in ``app.extensions["test_view"]``, so a test can write the body of a view
      that submits tasks without adding routes to the app.

    Teardown handlers (these run after each task's app context too):

    - the Flask tutorial's ``close_db``: closes ``g.db`` if one was opened;
    - if ``TEARDOWN_LOG`` is configured and the context's ``g`` holds a
      ``teardown_marker``, append the marker as one line to that file.
    """
    app = Flask(__name__)
    app.config.update(TESTING=True, SECRET_KEY="test-secret-key")

    @app.route("/")
    def index() -> ResponseReturnValue:
        return "index"

    @app.route("/path/<int:item_id>", methods=["GET", "POST"])
    def item(item_id: int) -> ResponseReturnValue:
        return str(item_id)

    @app.route("/view/<int:item_id>", methods=["GET", "POST"])
    def view_submit(item_id: int) -> ResponseReturnValue:
        view: Callable[[int], ResponseReturnValue] = current_app.extensions["test_view"]
        return view(item_id)

    @app.teardown_appcontext
    def close_db(exc: BaseException | None) -> None:
        db = g.pop("db", None)
        if db is not None:
            db.close()

    @app.teardown_appcontext
    def log_teardown(exc: BaseException | None) -> None:
        path = current_app.config.get("TEARDOWN_LOG")
        marker = g.get("teardown_marker")
        if path and marker:
            with open(path, "a", encoding="utf-8") as log:
                log.write(f"{marker}\n")

    return app


@contextlib.contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Collect once, then keep the cyclic garbage collector off for the block:
    what it frees then was freed by reference counting, not by a collection."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def wait_for_path(path: str, timeout: float = TIMEOUT) -> None:
    """Block until the file at ``path`` exists; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} seconds")
        time.sleep(0.005)


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} seconds")
        time.sleep(0.005)


def touch(path: str) -> str:
    """Create the file at ``path`` (a marker that something ran); return the path."""
    Path(path).touch()
    return path


def block_until(started: str, gate: str, value: Any) -> Any:
    """Task: mark ``started``, wait for the ``gate`` file, then return ``value``."""
    touch(started)
    wait_for_path(gate)
    return value


class Gates:
    """Fresh file paths for ``support.wait_for_path``; all opened when the test ends, so
    no task stays blocked on a gate while its executor shuts down."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._counter = itertools.count()
        self._paths: list[str] = []

    def new(self) -> str:
        path = str(self._directory / f"gate-{next(self._counter)}")
        self._paths.append(path)
        return path

    def open_all(self) -> None:
        for path in self._paths:
            touch(path)
