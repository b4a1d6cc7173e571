"""A task dashboard in the browser: every stored task with its state,
progress, meta, times and error, the pool's workers, and live updates over
server-sent events.

Mount it where the app likes, behind a check of who may see it::

    app.register_blueprint(
        executor.dashboard_blueprint(authorize=lambda: current_user.is_admin),
        url_prefix="/executor",
    )

``authorize`` runs inside every request to the blueprint (page, JSON, events,
actions); a false answer is a 403. The page is rendered on the server and
reads without JavaScript; a small script makes it live. See :doc:`/dashboard`.

.. versionadded:: 2.0
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    jsonify,
    redirect,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue

from .model import STATES, duration_text, find_record, pool_stats, task_row

if TYPE_CHECKING:
    from ..executor import Executor

__all__ = ["dashboard_blueprint"]

#: The double-submit cookie and form field of the cancel and purge forms.
CSRF_COOKIE = "flask_executor_csrf"
CSRF_FIELD = "csrf_token"
#: How many tasks the page and the JSON list show (newest first).
DEFAULT_LIMIT = 200


def dashboard_blueprint(
    executor: Executor,
    authorize: Callable[[], object] | None,
    name: str,
    *,
    stream_seconds: float = 25.0,
    interval: float = 0.5,
    limit: int = DEFAULT_LIMIT,
) -> Blueprint:
    """The dashboard of ``executor``'s stored tasks; see
    :meth:`flask_executor.Executor.dashboard_blueprint`."""
    if authorize is None or not callable(authorize):
        raise TypeError(
            "dashboard_blueprint() needs authorize=: a function with no arguments that"
            " returns true for a request that may see the dashboard (the tasks, their"
            " meta, results and errors, and the cancel and purge buttons); pass"
            " authorize=lambda: True to open it to everyone who can reach it"
        )
    blueprint = Blueprint(
        name,
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    futures = executor.futures

    @blueprint.before_request
    def check_authorized() -> None:
        if not authorize():
            abort(403)

    def records() -> list[Any]:
        return futures.records(limit)

    def page(template: str, **context: Any) -> Response:
        token = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        body = render_template(
            f"flask_executor/dashboard/{template}",
            bp=name,
            csrf_field=CSRF_FIELD,
            csrf_token=token,
            states=STATES,
            fmt=_Format,
            **context,
        )
        response = Response(body, mimetype="text/html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        if request.cookies.get(CSRF_COOKIE) != token:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="Strict",
                secure=request.is_secure,
                path=url_for(f"{name}.index"),
            )
        return response

    @blueprint.get("/")
    def index() -> Response:
        state = request.args.get("state", "")
        state = state if state in STATES else ""
        found = records()
        rows = [task_row(record) for record in found]
        counts = {s: sum(1 for row in rows if row["state"] == s) for s in STATES}
        shown = [row for row in rows if not state or row["state"] == state]
        return page(
            "index.html",
            tasks=shown,
            total=len(rows),
            counts=counts,
            state=state,
            pool=pool_stats(executor, found),
        )

    @blueprint.get("/task/<path:key>")
    def detail(key: str) -> Response:
        record = find_record(futures, key)
        if record is None:
            abort(404, f"no stored task {key!r}")
        return page("task.html", task=task_row(record), result=_result_text(executor, record))

    @blueprint.get("/api/tasks")
    def api_tasks() -> Response:
        found = records()
        return jsonify(
            tasks=[task_row(record) for record in found], pool=pool_stats(executor, found)
        )

    @blueprint.get("/api/task/<path:key>")
    def api_task(key: str) -> Response | tuple[Response, int]:
        record = find_record(futures, key)
        if record is None:
            return jsonify(error=f"no stored task {key!r}", key=key), 404
        return jsonify(task_row(record))

    @blueprint.get("/events")
    def events() -> Response:
        key = request.args.get("key")
        stream = _stream(executor, key, records, stream_seconds, interval)
        response = Response(stream_with_context(stream), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    @blueprint.post("/cancel")
    def cancel() -> ResponseReturnValue:
        _check_same_origin()
        key = request.form.get("key", "")
        record = find_record(futures, key)
        if record is None:
            return _answer(404, f"no stored task {key!r}", name)
        if record.done:
            return _answer(409, f"task {key!r} is already {record.state}", name)
        if futures.cancel(record.key):
            return _answer(200, f"cancelled {key!r}", name)
        return _answer(409, f"task {key!r} could not be cancelled (a running thread task"
                       " cannot be stopped)", name)

    @blueprint.post("/purge")
    def purge() -> ResponseReturnValue:
        _check_same_origin()
        removed = futures.purge()
        return _answer(200, f"removed {removed} finished task(s)", name)

    return blueprint


class _Format:
    """Formatting helpers for the templates."""

    @staticmethod
    def time(stamp: float | None) -> str:
        if stamp is None:
            return "—"
        return time.strftime("%H:%M:%S", time.localtime(stamp))

    @staticmethod
    def iso(stamp: float | None) -> str:
        if stamp is None:
            return ""
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))

    duration = staticmethod(duration_text)

    @staticmethod
    def bytes(size: float | None) -> str:
        if size is None:
            return "—"
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024 or unit == "GiB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        return ""  # pragma: no cover

    @staticmethod
    def meta(meta: dict[str, Any]) -> list[tuple[str, str]]:
        """``meta`` without ``progress`` (the bar shows it), as text."""
        return [
            (name, value if isinstance(value, str) else json.dumps(value))
            for name, value in meta.items()
            if name != "progress"
        ]


def _result_text(executor: Executor, record: Any) -> str | None:
    """The ``repr`` of a finished task's result (shortened), or ``None``."""
    if record.state != "finished":
        return None
    future = executor.futures.get(record.key)
    if future is None:
        return None
    try:
        text = repr(future.result(timeout=0))
    except Exception as error:  # noqa: BLE001 - shown, not raised
        return f"(cannot be read: {type(error).__name__}: {error})"
    return text if len(text) <= 2000 else text[:2000] + " …"


def _check_same_origin() -> None:
    """Refuse a POST another site made the browser send: the browser's
    ``Sec-Fetch-Site`` must say it comes from this origin (or, from a browser
    that does not send it, ``Origin`` must name this host), and the form's
    token must match the token cookie (double submit).

    ``Sec-Fetch-Site`` comes first because it is the browser's own verdict: an
    ``Origin`` compared with ``request.host`` breaks behind a proxy that
    rewrites ``Host`` or terminates TLS."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if fetch_site is not None:
        if fetch_site not in ("same-origin", "none"):
            abort(403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})")
    elif origin is not None and urlsplit(origin).netloc != request.host:
        abort(403, f"cross-origin request refused (Origin: {origin})")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = request.form.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        abort(403, "the form's token does not match: reload the dashboard and try again")


def _answer(status: int, message: str, name: str) -> ResponseReturnValue:
    """JSON for the page's script; a redirect back for a plain form post."""
    if request.accept_mimetypes.best == "application/json":
        return jsonify(ok=status == 200, message=message), status
    if status != 200:
        abort(status, message)
    back = url_for(f"{name}.index")
    key = request.form.get("key")
    if request.form.get("back") == "task" and key:
        back = url_for(f"{name}.detail", key=key)
    return redirect(back, 303)


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


#: Fields that change every second by themselves; a change in them alone is not an event.
_CLOCK_FIELDS = ("age", "duration")


def _stream(
    executor: Executor,
    key: str | None,
    records: Callable[[], list[Any]],
    seconds: float,
    interval: float,
) -> Iterator[str]:
    """Server-sent events: ``keys`` (first: every key shown), ``task`` (a task's
    row, when it changed), ``removed`` (keys that went away), ``pool`` (the
    pool, when it changed); with ``key``
    only that task, then ``done`` when it ended (or ``missing``). The stream
    ends after ``seconds`` and the browser reconnects (``retry``)."""
    yield f"retry: 1000\n: flask-executor events, for {seconds:g} s\n\n"
    deadline = time.monotonic() + seconds
    sent: dict[str, dict[str, Any]] = {}
    last_pool: dict[str, Any] | None = None
    quiet_since = time.monotonic()
    first = True
    while True:
        chunks: list[str] = []
        if key is not None:
            record = find_record(executor.futures, key)
            if record is None:
                yield _event("missing", {"key": key})
                return
            row = task_row(record)
            if record.done:
                yield _event("done", row)
                return
            found = [record]
        else:
            found = records()
        current = {}
        for record in found:
            row = task_row(record)
            plain = {f: v for f, v in row.items() if f not in _CLOCK_FIELDS}
            current[row["key"]] = plain
            if sent.get(row["key"]) != plain:
                chunks.append(_event("task", row))
        if key is None and first:
            # After a reconnect: what went away while no stream was open.
            chunks.insert(0, _event("keys", list(current)))
            first = False
        elif key is None:
            gone = [k for k in sent if k not in current]
            if gone:
                chunks.append(_event("removed", gone))
            pool = pool_stats(executor, found)
            if pool != last_pool:
                chunks.append(_event("pool", pool))
                last_pool = pool
        sent = current
        now = time.monotonic()
        if chunks:
            quiet_since = now
            yield "".join(chunks)
        elif now - quiet_since > 5:
            quiet_since = now
            yield ": keep-alive\n\n"  # finds a browser that has gone away
        if now >= deadline:
            yield _event("reconnect", {"after": 1000})
            return
        time.sleep(interval)
