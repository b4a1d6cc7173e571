"""A ready-made JSON status endpoint for stored futures.

``app.register_blueprint(executor.status_blueprint(), url_prefix="/tasks")``
serves ``GET /tasks/`` (every stored future) and ``GET /tasks/<key>``. It is
opt-in; results may be private, so guard it like any view::

    status = executor.status_blueprint()

    @status.before_request
    def only_staff():
        if not current_user.is_staff:
            abort(403)

.. versionadded:: 2.0
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

from flask import Blueprint, Response, jsonify

from .futures import FutureCollection, future_state

__all__ = ["describe", "status_blueprint"]


def _json_or_none(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def describe(key: Hashable, future: Future[Any]) -> dict[str, Any]:
    """The JSON-ready status of one future."""
    state = future_state(future)
    error = None
    if state == "failed":
        exc = future.exception()
        error = f"{type(exc).__name__}: {exc}"
    return {
        "key": key if isinstance(key, (str, int, float)) else str(key),
        "state": state,
        "meta": _json_or_none(getattr(future, "meta", {})),
        "result": _json_or_none(future.result()) if state == "finished" else None,
        "error": error,
    }


def status_blueprint(futures: FutureCollection, name: str) -> Blueprint:
    """A blueprint serving the status of the futures in ``futures``."""
    blueprint = Blueprint(name, __name__)

    @blueprint.get("/")
    def index() -> Response:
        return jsonify(tasks=[describe(key, future) for key, future in futures.items()])

    @blueprint.get("/<path:key>")
    def detail(key: str) -> Response | tuple[Response, int]:
        for stored, future in futures.items():
            if stored == key or str(stored) == key:
                return jsonify(describe(stored, future))
        return jsonify(error=f"no stored task {key!r}", key=key), 404

    return blueprint
