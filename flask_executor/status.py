"""A ready-made JSON status endpoint for stored futures.

``app.register_blueprint(executor.status_blueprint(authorize=...), url_prefix="/tasks")``
serves ``GET /tasks/<key>``, and with ``list_keys=True`` also ``GET /tasks/``
(every stored future). It is opt-in, and results may be private, so decide
who may see what with ``authorize``, called inside each request::

    def may_see() -> bool:
        key = request.view_args.get("key")  # None for the list
        return current_user.is_staff or (key or "").startswith(f"user-{current_user.id}-")

    app.register_blueprint(executor.status_blueprint(authorize=may_see), url_prefix="/tasks")

A blueprint registered with neither ``authorize`` nor a ``before_request``
guard of its own logs a warning. With a shared store (``EXECUTOR_STORE``) it
answers the same whichever process serves the request.

.. versionadded:: 2.0
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState

from .errors import StoreUnavailableError
from .futures import FutureCollection, future_state

__all__ = ["describe", "status_blueprint"]


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def _result_or_none(future: Future[Any]) -> Any:
    try:
        return _json_or_none(future.result())
    except Exception:  # a stored result this process cannot read
        return None


def describe(key: Hashable, future: Future[Any]) -> dict[str, Any]:
    """The JSON-ready status of one future. In debug mode a failed task's
    description also has its ``traceback``."""
    state = future_state(future)
    error = None
    described: dict[str, Any] = {}
    if state == "failed":
        exc = future.exception()
        error = f"{type(exc).__name__}: {exc}"
        if current_app.debug and exc is not None:
            described["traceback"] = "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)
            )
    return {
        "key": key if isinstance(key, (str, int, float)) else str(key),
        "state": state,
        "meta": _json_or_none(getattr(future, "meta", {})),
        "result": _result_or_none(future) if state == "finished" else None,
        "error": error,
        **described,
    }


def _lookup(futures: FutureCollection, key: str) -> tuple[Hashable, Future[Any]] | None:
    future = futures.get(key)
    if future is not None:
        return key, future
    if not futures.store.shared:  # the URL form of a non-string key: /tasks/42 finds 42
        for stored, candidate in futures.items():
            if str(stored) == key:
                return stored, candidate
    return None


def status_blueprint(
    futures: FutureCollection,
    name: str,
    authorize: Callable[[], object] | None = None,
    list_keys: bool = False,
) -> Blueprint:
    """A blueprint serving the status of the futures in ``futures``.

    :param authorize: called with no arguments inside each request to the
        blueprint (``request.view_args["key"]`` is the key asked for); a
        false answer is ``403``.
    :param list_keys: also serve ``GET /`` with every stored future; without
        it that URL answers ``404``.
    """
    blueprint = Blueprint(name, __name__)

    if authorize is not None:

        @blueprint.before_request
        def check_authorized() -> None:
            if not authorize():
                abort(403)

    def warn_if_unguarded(state: BlueprintSetupState) -> None:
        if not state.blueprint.before_request_funcs.get(None):
            state.app.logger.warning(
                "status blueprint %r is registered without authorize= or a before_request"
                " guard: anyone who can reach it sees stored tasks' results and errors",
                name,
            )

    blueprint.record(warn_if_unguarded)

    @blueprint.errorhandler(StoreUnavailableError)
    def store_down(error: StoreUnavailableError) -> tuple[Response, int]:
        current_app.logger.error("status endpoint: %s", error)
        return jsonify(error="the task store is unavailable"), 503

    @blueprint.get("/")
    def index() -> Response | tuple[Response, int]:
        if not list_keys:
            message = "listing tasks is not enabled: status_blueprint(list_keys=True)"
            return jsonify(error=message), 404
        return jsonify(tasks=[describe(key, future) for key, future in futures.items()])

    @blueprint.get("/<path:key>")
    def detail(key: str) -> Response | tuple[Response, int]:
        found = _lookup(futures, key)
        if found is not None:
            return jsonify(describe(*found))
        message = f"no stored task {key!r}"
        if not futures.store.shared and request.environ.get("wsgi.multiprocess"):
            message += (
                f"; the server runs several processes and {futures._setting} = 'memory'"
                " keeps tasks per process, so another process may hold it: set"
                f" {futures._setting} to a shared store"
            )  # futures.get() logged it, once
        return jsonify(error=message, key=key), 404

    return blueprint
