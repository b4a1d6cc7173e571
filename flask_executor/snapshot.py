"""Capture the Flask context of a submit and rebuild it around a task.

At submit time, :func:`capture` takes a :class:`Snapshot` of :data:`~flask.g`
and of the request (environ, body, custom attributes, session). In a thread
worker, :func:`restore` turns it back into real, pushed Flask contexts on the
live app; in a process or cluster worker the snapshot arrives pickled, beside
an :class:`~flask_executor.appspec.AppSpec` from which
:func:`~flask_executor.appspec.restore_app`
builds the worker's app once per process.

Each piece comes as a pair, ``_x_reduce`` (capture side) and ``_x_restore``
(worker side), so the two halves sit together. Only public Flask APIs are
used: contexts are created with :meth:`~flask.Flask.app_context` and
:class:`~flask.ctx.RequestContext`, never through Flask's context variables.
This module imports nothing from the executor.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any, TypeVar
from urllib.parse import urlencode

from flask import Flask, g, has_app_context, has_request_context, request, session
from flask.ctx import RequestContext
from flask.sessions import NullSession
from flask.wrappers import Request as FlaskRequest
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import encode_multipart
from werkzeug.wrappers import Request

from .errors import BodyNotCapturedError, GAttributeNotCopiedError
from .serialize import (
    ATOMIC,
    _all_atomic,
    copy_filestorage,
    deep_copy,
    dumps,
    dumps_nested,
    loads,
    type_name,
)

__all__ = ["RequestSnapshot", "Snapshot", "capture", "restore"]

logger = logging.getLogger("flask_executor")
_T = TypeVar("_T", bound="Snapshot | RequestSnapshot")

_ATOMIC = ATOMIC
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class _NotCopyable(Exception):
    pass


def _thread_copy(value: Any) -> Any:
    """A deep copy for another thread (a pickle round trip where that is the
    same copy, see :func:`~flask_executor.serialize.deep_copy`); resources
    (locks, connections) raise."""
    if type(value) in _ATOMIC:
        return value
    try:
        return deep_copy(value)
    except Exception as exc:
        raise _NotCopyable(type_name(value)) from exc


def _pickle_check(value: Any) -> Any:
    """Process mode keeps references: the payload pickle is the copy. This
    only sorts out what cannot travel at all: what neither the standard
    pickler nor cloudpickle (tried second, so imported only when needed) can
    pickle."""
    if type(value) in _ATOMIC:
        return value
    try:
        dumps(value, by_value_main=False)
    except Exception as exc:
        raise _NotCopyable(type_name(value)) from exc
    return value


class RequestSnapshot:
    """What a task needs to rebuild the request it was submitted from.

    A plain class, as are the other classes a process worker imports (see
    :class:`~flask_executor.backends.BackendOptions`); :func:`_replaced`
    copies one. Slotted, and pickled as its constructor's arguments: a
    queued task's snapshot has no instance dict for the garbage collector to
    walk, and its payload carries no attribute names.
    """

    __slots__ = (
        "environ", "body", "body_missing", "attrs", "omitted_attrs", "session", "null_session",
        "live",
    )  # fmt: skip

    def __init__(
        self,
        environ: dict[str, Any],
        body: bytes | None,
        body_missing: str | None = None,
        attrs: dict[str, Any] | None = None,
        omitted_attrs: dict[str, str] | None = None,
        session: dict[str, Any] | None = None,
        null_session: bool = False,
        live: FlaskRequest | None = None,
    ) -> None:
        self.environ = environ
        self.body = body
        #: Why ``body`` is ``None`` (too large, consumed); names the config key.
        self.body_missing = body_missing
        self.attrs: dict[str, Any] = {} if attrs is None else attrs
        self.omitted_attrs: dict[str, str] = {} if omitted_attrs is None else omitted_attrs
        self.session = session
        self.null_session = null_session
        #: Thread mode only: a copy of the view's request object (its own environ,
        #: body stream and deep-copied custom attributes), pushed as is.
        self.live = live

    def __reduce__(self) -> tuple[Any, ...]:
        return RequestSnapshot, (
            self.environ, self.body, self.body_missing, self.attrs, self.omitted_attrs,
            self.session, self.null_session, self.live,
        )  # fmt: skip


class Snapshot:
    """The context of one submit: :data:`~flask.g` and the request (slotted
    and pickled as :class:`RequestSnapshot` is)."""

    __slots__ = ("g", "omitted_g", "request", "g_pickled")

    def __init__(
        self,
        g: dict[str, Any],
        omitted_g: dict[str, str] | None = None,
        request: RequestSnapshot | None = None,
        g_pickled: dict[str, bytes] | None = None,
    ) -> None:
        self.g = g
        self.omitted_g: dict[str, str] = {} if omitted_g is None else omitted_g
        self.request = request
        #: In a pickled snapshot, the ``g`` values that are not atomic, each
        #: pickled on its own: one that fails to unpickle in the worker (the
        #: worker runs another version of its class) fails only the tasks that
        #: read it, with :exc:`GAttributeNotCopiedError`.
        self.g_pickled: dict[str, bytes] = {} if g_pickled is None else g_pickled

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle each ``g`` value that is not atomic on its own, once; one that
        cannot be pickled (``g.db``, a lock) is left out here and listed as
        omitted, so the payload around it never has to be pickled again."""
        values, pickled, omitted = self.g, self.g_pickled, self.omitted_g
        if not _all_atomic(values.values()):
            atomic: dict[str, Any] = {}
            pickled, omitted = dict(pickled), dict(omitted)
            for name, value in values.items():
                if type(value) in _ATOMIC:
                    atomic[name] = value
                    continue
                try:
                    pickled[name] = dumps_nested(value)
                except Exception:
                    omitted[name] = type_name(value)
            values = atomic
        return Snapshot, (values, omitted, self.request, pickled)

    def shared_by_items(self) -> bool:
        """Whether the items of a chunk can all be restored from this one
        snapshot: it holds nothing a task can change in place (request
        attributes, session values). ``g`` holds atomic values and pickles
        unpickled per task, and the environ is copied per request."""
        req = self.request
        return req is None or not (req.attrs or req.session)

    def for_one_item(self) -> Snapshot:
        """A snapshot for one item of a chunk, whose items share one unpickled
        snapshot: fresh copies of what a task can change in place (the
        request's custom attributes, the session's values); the rest is
        shared (see :meth:`shared_by_items`)."""
        req = self.request
        if req is None or self.shared_by_items():
            return self
        attrs = deep_copy(req.attrs) if req.attrs else req.attrs
        session_data = deep_copy(req.session) if req.session else req.session
        return _replaced(self, request=_replaced(req, attrs=attrs, session=session_data))

    def picklable(self) -> Snapshot:
        """A copy without the request's values that cannot be pickled (they
        are listed as omitted, so reading them in the task says why they are
        missing). ``g`` needs no filtering: pickling leaves out its own."""
        snap = _replaced(self)
        if self.request is not None:
            attrs, omitted = _filter(self.request.attrs, _pickle_check)
            session_data, _ = _filter(self.request.session or {}, _pickle_check)
            snap.request = _replaced(
                self.request,
                attrs=attrs,
                omitted_attrs={**self.request.omitted_attrs, **omitted},
                session=session_data if self.request.session is not None else None,
            )
        return snap


def _replaced(obj: _T, **changes: Any) -> _T:
    """A shallow copy of ``obj`` (a :class:`Snapshot` or
    :class:`RequestSnapshot`) with ``changes``: what ``dataclasses.replace``
    did, without calling ``__init__`` (this runs for every item of a ``map``
    chunk whose snapshot its items cannot share)."""
    new = object.__new__(type(obj))
    for name in obj.__slots__:
        setattr(new, name, changes.pop(name) if name in changes else getattr(obj, name))
    if changes:
        raise TypeError(f"{type(obj).__name__} has no field {', '.join(changes)}")
    return new


def _filter(values: dict[str, Any], copier: Any) -> tuple[dict[str, Any], dict[str, str]]:
    omitted: dict[str, str] = {}
    if not values or copier is _identity:
        return values, omitted
    kept: dict[str, Any] = {}
    for name, value in values.items():
        try:
            kept[name] = copier(value)
        except _NotCopyable as exc:
            omitted[name] = str(exc)
    return kept, omitted


# -- capture / restore of the whole context ------------------------------------


def capture(*, max_body: int, for_thread: bool) -> Snapshot:
    """Snapshot the current :data:`~flask.g` and request.

    :param max_body: largest request body carried, in bytes.
    :param for_thread: ``True``: deep-copy values now (the task shares the
        process); ``False``: keep references, the caller pickles the snapshot
        at once (a process payload).
    """
    if not has_app_context():
        return Snapshot(g={})
    copier = _thread_copy if for_thread else _identity
    g_values, omitted_g = _filter(_g_reduce(), copier)
    snap = Snapshot(g=g_values, omitted_g=omitted_g)
    if has_request_context():
        snap.request = _request_reduce(max_body, copier, for_thread)
    return snap


def _identity(value: Any) -> Any:
    return value


class restore:
    """Push real Flask contexts for ``app`` rebuilt from ``snap`` (a context
    manager; a class rather than a generator, as it runs once per task).

    With a request snapshot a request context is pushed (it brings its own app
    context, so ``teardown_request`` and ``teardown_appcontext`` run when the
    task ends); without one, an app context.
    """

    __slots__ = ("app", "snap", "req", "attrs", "own_session", "ctx")

    def __init__(self, app: Flask, snap: Snapshot | None) -> None:
        self.app = app
        self.snap = snap
        req = self.req = snap.request if snap is not None else None
        # Decided once: a map chunk enters one of these for each of its items.
        rebuilt = req if req is not None and req.live is None else None
        self.attrs = rebuilt is not None and bool(rebuilt.attrs)
        self.own_session = (
            rebuilt is not None and not rebuilt.null_session and _opens_own_session(app)
        )

    def __enter__(self) -> None:
        snap, req = self.snap, self.req
        ctx: Any = self.app.app_context() if req is None else _request_restore(self.app, req)
        ctx.push()
        self.ctx = ctx
        try:
            if snap is not None:
                _g_restore(snap)
                if req is not None and self.attrs:
                    _request_attrs_restore(req)
                if req is not None and self.own_session:
                    _session_apply(req)
        except BaseException as exc:
            ctx.pop(exc)
            raise

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.ctx.pop(exc)


# -- g -------------------------------------------------------------------------


def _g_reduce() -> dict[str, Any]:
    return dict(vars(g._get_current_object()))


def _g_restore(snap: Snapshot) -> None:
    target = g._get_current_object()
    for name, value in snap.g.items():
        setattr(target, name, value)
    if not snap.g_pickled and not snap.omitted_g:
        return  # only atomic values (the usual g: ids, names, flags)
    reasons = {
        name: f"its value ({kind}) could not be pickled or copied"
        for name, kind in snap.omitted_g.items()
    }
    for name, data in snap.g_pickled.items():
        try:
            setattr(target, name, loads(data))
        except Exception as exc:
            reasons[name] = (
                f"its value could not be unpickled in the worker ({type_name(exc)}: {exc});"
                " do the web process and the worker run the same version of its code?"
            )
    if reasons:
        # g's own __setattr__ would store "__class__" as an attribute.
        object.__setattr__(target, "__class__", _omitting_class(type(target), reasons))


_omitting_classes: dict[tuple[type, frozenset[tuple[str, str]]], type] = {}
_omitting_lock = threading.Lock()


def _new_lock_in_child() -> None:
    """In a forked child, a free ``_omitting_lock`` (see
    :func:`flask_executor.appspec._new_lock_in_child`)."""
    global _omitting_lock
    _omitting_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _omitting_class(base: type, omitted: dict[str, str]) -> type:
    """A subclass of the app's ``g`` class whose missing-attribute error says
    that the attribute was left out and why (``omitted``: name to reason)."""
    key = (base, frozenset(omitted.items()))
    with _omitting_lock:
        cls = _omitting_classes.get(key)
        if cls is not None:
            return cls
        reasons = dict(omitted)
        parent = getattr(base, "__getattr__", None)

        def __getattr__(self: Any, name: str) -> Any:
            reason = reasons.get(name)
            if reason is not None:
                raise GAttributeNotCopiedError(
                    f"g.{name} was not copied into this task: {reason}. Create it inside"
                    f" the task, e.g. `if {name!r} not in g: g.{name} = ...`."
                )
            if parent is not None:
                return parent(self, name)
            raise AttributeError(name)

        cls = type(base.__name__, (base,), {"__getattr__": __getattr__})
        _omitting_classes[key] = cls
        return cls


# -- request -------------------------------------------------------------------


_PLAIN_ENVIRON = frozenset((str, bytes, int, float, bool, type(None)))
_request_fields: dict[type, frozenset[str]] = {}


def _custom_attrs(req: Request) -> dict[str, Any]:
    """Attributes the app set on ``request`` (``request.user = ...``), as
    opposed to Werkzeug's own state and caches."""
    cls = type(req)
    known = _request_fields.get(cls)
    if known is None:
        fresh = cls({"REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()})
        known = frozenset(vars(fresh)) | frozenset(dir(cls))
        _request_fields[cls] = known
    return {
        name: value
        for name, value in vars(req).items()
        if name not in known and not name.startswith("_")
    }


def _request_reduce(max_body: int, copier: Any, for_thread: bool) -> RequestSnapshot:
    req: FlaskRequest = request._get_current_object()  # type: ignore[attr-defined]
    if for_thread:
        environ = dict(req.environ)
    else:
        environ = {
            key: value
            for key, value in req.environ.items()
            if type(value) in _PLAIN_ENVIRON
            or (type(value) is tuple and all(type(v) in _PLAIN_ENVIRON for v in value))
        }
    environ.pop("werkzeug.request", None)
    # The thread copy is taken before the body is read (and cached on the
    # view's request), so it never inherits a partial read of it.
    live = None
    if for_thread:
        # Parsed once here, not in every task: the query args are an
        # immutable MultiDict, made from the environ every copy shares.
        req.args  # noqa: B018
        live = _shallow_copy(req)
    body, missing = _body_reduce(req, environ, max_body, reencode=not for_thread)
    environ["wsgi.input"] = _MissingBody(missing) if body is None else io.BytesIO(body)
    attrs, omitted_attrs = _filter(_custom_attrs(req), copier)
    session_data, null_session = _session_reduce(copier)
    snap = RequestSnapshot(
        environ=environ,
        body=body,
        body_missing=missing,
        attrs=attrs,
        omitted_attrs=omitted_attrs,
        session=session_data,
        null_session=null_session,
    )
    if live is not None:
        snap.live = _live_request_reduce(live, environ, attrs, omitted_attrs)
    else:
        del environ["wsgi.input"]
    return snap


def _shallow_copy(req: FlaskRequest) -> FlaskRequest:
    """``copy.copy`` for a request, without its generic machinery (this runs
    once per thread task)."""
    cls = type(req)
    live = cls.__new__(cls)
    vars(live).update(vars(req))
    return live


def _live_request_reduce(
    live: FlaskRequest, environ: dict[str, Any], attrs: dict[str, Any], omitted: dict[str, str]
) -> FlaskRequest:
    """Complete ``live``, a shallow copy of the view's request, with its own
    environ, body stream, uploaded files and custom attributes: cheaper than a
    new request (parsed args, form and JSON are reused), and nothing the task
    does reaches the view."""
    state = vars(live)
    state["environ"] = environ
    if "form" not in state:  # parsed forms keep the (consumed) stream they came from
        state.pop("stream", None)  # re-read from the copied body
    for name in omitted:
        state.pop(name, None)
    state.update(attrs)
    files = state.get("files")
    if files:
        state["files"] = type(files)(
            (key, copy_filestorage(storage)) for key, storage in files.items(multi=True)
        )
    return live


def _request_restore(app: Flask, snap: RequestSnapshot) -> RequestContext:
    session_obj = _session_restore(app, snap)
    if snap.live is not None:
        return RequestContext(app, snap.live.environ, request=snap.live, session=session_obj)
    environ = dict(snap.environ)
    if snap.body is None:
        environ["wsgi.input"] = _MissingBody(snap.body_missing or "the body was not captured")
    else:
        environ["wsgi.input"] = io.BytesIO(snap.body)
        if snap.body:
            # A stream that ends with the body, as gunicorn's and waitress's do: Werkzeug
            # reads it as it is, not again through a LimitedStream, 64 KB at a time.
            environ.setdefault("wsgi.input_terminated", True)
    return RequestContext(app, environ, session=session_obj)


def _opens_own_session(app: Flask) -> bool:
    """Whether the session was opened from the cookie (no ``session_class``
    to build it from the snapshot)."""
    return getattr(app.session_interface, "session_class", None) is None


def _session_apply(snap: RequestSnapshot) -> None:
    """For session interfaces without ``session_class``: the interface opened
    the session from the cookie; make its data the view's."""
    current = session._get_current_object()  # type: ignore[attr-defined]
    if snap.session is not None and dict(current) != snap.session:
        current.clear()
        current.update(snap.session)


def _request_attrs_restore(snap: RequestSnapshot) -> None:
    target = request._get_current_object()  # type: ignore[attr-defined]
    for name, value in snap.attrs.items():
        setattr(target, name, value)


def _body_reduce(
    req: Request, environ: dict[str, Any], max_body: int, reencode: bool
) -> tuple[bytes | None, str | None]:
    """The request body to carry, or ``None`` and the reason it is not."""
    length = req.content_length
    if not length and not environ.get("wsgi.input_terminated"):
        return b"", None
    if length is not None and length > max_body:
        return None, _too_large(length, max_body)
    form_parsed = "form" in vars(req)
    if length is None:  # chunked: read at most the limit + 1 byte
        return _unsized_body_reduce(req, environ, max_body, form_parsed, reencode)
    max_content = req.max_content_length
    if max_content is not None and length > max_content:
        return None, _over_max_content(max_content)
    data = req.get_data(cache=True)
    if length is not None and len(data) < length:
        if form_parsed and req.mimetype in _FORM_TYPES:
            # Thread copies keep the parsed form; processes get it re-encoded.
            return (_form_body_reduce(req, environ) if reencode else b""), None
        return None, (
            "the request body was consumed by the view (request.stream was read) before"
            " submit(), so it could not be copied into the task; read it with"
            " request.get_data() or pass it as an argument"
        )
    if len(data) > max_body:
        return None, _too_large(len(data), max_body)
    return data, None


def _too_large(length: int, max_body: int, at_least: str = "") -> str:
    return (
        f"the request body ({at_least}{length} bytes) is larger than"
        f" EXECUTOR_SNAPSHOT_MAX_BODY ({max_body} bytes), so it was not copied into"
        " the task; raise that setting or pass what the task needs as arguments"
    )


def _over_max_content(max_content: int | None) -> str:
    return (
        f"the request body is larger than MAX_CONTENT_LENGTH ({max_content} bytes),"
        " so it was not copied into the task"
    )


def _unsized_body_reduce(
    req: Request, environ: dict[str, Any], max_body: int, form_parsed: bool, reencode: bool
) -> tuple[bytes | None, str | None]:
    """A body without ``Content-Length`` (``Transfer-Encoding: chunked``):
    at most the limit (``EXECUTOR_SNAPSHOT_MAX_BODY`` or Flask's
    ``MAX_CONTENT_LENGTH``) plus one byte is read, whatever the client sends,
    and what was read is put back in front of the rest, so the view reads the
    body as if ``submit()`` had not looked at it."""
    max_content = req.max_content_length
    limit = max_body if max_content is None else min(max_body, max_content)
    state = vars(req)
    touched = "stream" in state  # the view (or a form parse) opened the stream
    # Not touched: read the server's stream (it ends the body, wsgi.input_terminated);
    # request.stream is built over what is put back, with Werkzeug's own checks.
    source = req.stream if touched else req.environ["wsgi.input"]
    probe = _BoundedReader(source, limit + 1)
    req.stream = probe  # type: ignore[assignment]  # a cached_property: assignable
    too_large_error = False
    try:
        data: bytes | None = req.get_data(cache=False)  # the view's cached data, or the probe
    except RequestEntityTooLarge:  # a touched stream past MAX_CONTENT_LENGTH
        data, too_large_error = None, True
    finally:
        head = bytes(probe.head)
        if probe.truncated or too_large_error:
            rest: Any = _Prepended(head, source)
        elif probe.used:
            rest = io.BytesIO(head)
        else:
            rest = source
        if touched:
            state["stream"] = rest
        else:
            del state["stream"]
            req.environ["wsgi.input"] = rest
    if data is None or (max_content is not None and len(data) > max_content):
        return None, _over_max_content(max_content)
    if len(data) > max_body:
        return None, _too_large(len(data), max_body, "at least " if probe.truncated else "")
    if not data and form_parsed and req.mimetype in _FORM_TYPES:
        # The form parser consumed the body; processes get it re-encoded.
        return (_form_body_reduce(req, environ) if reencode else b""), None
    return data, None


class _BoundedReader(io.RawIOBase):
    """Reads at most ``budget`` bytes of ``source`` and keeps them (``head``)."""

    def __init__(self, source: Any, budget: int) -> None:
        super().__init__()
        self.source = source
        self.budget = budget
        self.head = bytearray()
        self.used = False
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.used = True
        want = min(len(buffer), self.budget - len(self.head))
        if want <= 0:
            self.truncated = True
            return 0
        chunk = self.source.read(want)
        count = len(chunk)
        buffer[:count] = chunk
        self.head += chunk
        if len(self.head) >= self.budget:
            self.truncated = True
        return count


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``source``: a request body as the view
    would have read it."""

    def __init__(self, head: bytes, source: Any) -> None:
        super().__init__()
        self.head = io.BytesIO(head)
        self.source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.head.readinto(buffer)
        if count:
            return count
        chunk = self.source.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _form_body_reduce(req: Request, environ: dict[str, Any]) -> bytes:
    """Re-encode form data that the view already parsed (the parser consumed
    the original body)."""
    if req.mimetype == "multipart/form-data":
        values: MultiDict[str, Any] = MultiDict(req.form.items(multi=True))
        for key, storage in req.files.items(multi=True):
            values.add(key, copy_filestorage(storage))
        boundary, body = encode_multipart(values)
        environ["CONTENT_TYPE"] = f"multipart/form-data; boundary={boundary}"
    else:
        body = urlencode(list(req.form.items(multi=True))).encode()
    environ["CONTENT_LENGTH"] = str(len(body))
    return body


class _MissingBody(io.RawIOBase):
    """``wsgi.input`` of a task whose request body was not carried: reading
    it raises :exc:`BodyNotCapturedError` instead of returning a silent
    empty body."""

    def __init__(self, reason: str | None) -> None:
        super().__init__()
        self.reason = reason or "the request body was not captured"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise BodyNotCapturedError(self.reason)


# -- session -------------------------------------------------------------------


def _session_reduce(copier: Any) -> tuple[dict[str, Any] | None, bool]:
    current = session._get_current_object()  # type: ignore[attr-defined]
    if isinstance(current, NullSession):
        return None, True
    accessed = getattr(current, "accessed", None)
    data, _ = _filter(dict(current), copier)
    if accessed is not None:
        current.accessed = accessed  # reading it for the task is not the view's access
    return data, False


def _session_restore(app: Flask, snap: RequestSnapshot) -> Any:
    interface = app.session_interface
    if snap.null_session:
        return interface.make_null_session(app)
    session_class = getattr(interface, "session_class", None)
    if session_class is None or snap.session is None:
        return None  # the session interface opens it from the request's cookie
    return session_class(snap.session)
