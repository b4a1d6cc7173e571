"""Pickling for process and cluster workers.

Everything that crosses a process boundary goes through :func:`dumps`: a
:class:`cloudpickle.CloudPickler` (so lambdas, closures and functions defined
in ``__main__`` travel by value) that also knows how to carry Werkzeug
:class:`~werkzeug.datastructures.FileStorage` objects, whose open file the
standard pickler cannot handle. :func:`dumps_call` adds the diagnosis that lets
:meth:`~flask_executor.Executor.submit` name the argument that failed.
"""

from __future__ import annotations

import copy
import copyreg
import importlib
import io
import os
import pickle
import shutil
import tempfile
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeGuard

import flask
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.local import LocalProxy

from .errors import SerializationError

__all__ = [
    "ATOMIC",
    "copy_filestorage",
    "deep_copy",
    "dumps",
    "dumps_call",
    "dumps_nested",
    "import_object",
    "loads",
    "remove_files",
    "spilled_uploads",
    "type_name",
]

loads = pickle.loads


def type_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s type, as used in error messages."""
    cls = type(obj)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


#: Uploads larger than this go to process workers as a temporary file rather
#: than inside the payload, so the web process holds no copy of them.
UPLOAD_FILE_THRESHOLD = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
#: Temporary files spilled by the :func:`spilled_uploads` block in progress.
_spilled: ContextVar[list[str] | None] = ContextVar("flask_executor.spilled", default=None)


def _filestorage_reduce(storage: FileStorage) -> tuple[Callable[..., FileStorage], tuple[Any, ...]]:
    stream = storage.stream
    try:  # not seekable() : SpooledTemporaryFile has no such method before 3.11
        position: int | None = stream.tell()
        stream.seek(0)
    except (AttributeError, OSError, ValueError):
        position = None
    meta = (storage.filename, storage.name, storage.content_type, list(storage.headers.items()))
    try:
        spilled = _spilled.get()
        if spilled is not None and position is not None and not _by_value_main.get():
            # Process workers run on this machine: a large upload travels as a file.
            stream.seek(0, io.SEEK_END)
            size = stream.tell()
            stream.seek(0)
            if size > UPLOAD_FILE_THRESHOLD:
                return _filestorage_file_restore, (_spill(stream, spilled), *meta)
        data = stream.read()
    finally:
        if position is not None:
            stream.seek(position)
    return _filestorage_restore, (data, *meta)


def _spill(stream: Any, spilled: list[str]) -> str:
    with tempfile.NamedTemporaryFile(
        prefix=f"flask-executor-upload-{os.getpid()}-", delete=False
    ) as target:
        spilled.append(target.name)
        shutil.copyfileobj(stream, target, _COPY_CHUNK)
    return target.name


def _filestorage_file_restore(
    path: str,
    filename: str | None,
    name: str | None,
    content_type: str | None,
    headers: list[tuple[str, str]],
) -> FileStorage:
    """In the worker: the upload spilled to ``path``, which is removed at once
    (the open file stays readable until the task's upload is closed)."""
    stream = open(path, "rb")  # noqa: SIM115 - owned by the FileStorage
    try:
        os.unlink(path)
    except OSError:
        pass
    return FileStorage(
        stream, filename=filename, name=name, content_type=content_type, headers=Headers(headers)
    )


@contextmanager
def spilled_uploads() -> Iterator[list[str]]:
    """Collect the temporary files that large uploads are spilled to by the
    :func:`dumps` calls inside the block (process workers only). If the block
    raises they are removed; else remove them with :func:`remove_files` once
    the task is done (the worker removes each one it opens, so this only
    matters for tasks that never ran)."""
    paths: list[str] = []
    token = _spilled.set(paths)
    try:
        yield paths
    except BaseException:  # no task: nobody else removes them
        remove_files(paths)
        raise
    finally:
        _spilled.reset(token)


def remove_files(paths: list[str], *_: object) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


def _filestorage_restore(
    data: bytes,
    filename: str | None,
    name: str | None,
    content_type: str | None,
    headers: list[tuple[str, str]],
) -> FileStorage:
    return FileStorage(
        io.BytesIO(data),
        filename=filename,
        name=name,
        content_type=content_type,
        headers=Headers(headers),
    )


def copy_filestorage(storage: FileStorage) -> FileStorage:
    """An independent in-memory copy of ``storage`` (the request's own file is
    closed when the request ends)."""
    restore, args = _filestorage_reduce(storage)
    return restore(*args)


def _proxy_reduce(proxy: LocalProxy[Any]) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """Context proxies travel by name: in the worker, ``current_app`` is the
    worker's ``current_app``. That is what a lambda or closure that mentions
    ``current_app``, ``request``, ``g``, ``session`` or ``current_task`` needs."""
    from .tasks import current_task

    for module, name in _PROXIES:
        target = current_task if module == "flask_executor" else getattr(flask, name)
        if target is proxy:
            return import_object, (module, name)
    raise pickle.PicklingError(
        "a werkzeug LocalProxy cannot be pickled; pass the object it points to"
        " (proxy._get_current_object()) or plain data instead"
    )


_PROXIES = (
    ("flask", "current_app"),
    ("flask", "g"),
    ("flask", "request"),
    ("flask", "session"),
    ("flask_executor", "current_task"),
)


def import_object(module: str, qualname: str) -> Any:
    """``module.qualname``, importing ``module``."""
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


#: The reducers of the cloudpickle-based pickler, ahead of cloudpickle's own.
_cloud_reducers: dict[type, Any] = {FileStorage: _filestorage_reduce, LocalProxy: _proxy_reduce}
_cloud_pickler: type[pickle.Pickler] | None = None


def _cloud() -> type[pickle.Pickler]:
    """The pickler for what the standard one cannot pickle (lambdas, closures,
    ``__main__`` by value), made on first use: cloudpickle is imported only
    then, so a web process that never needs it, and every process worker
    (whose calls are pickled by reference), start without it."""
    global _cloud_pickler
    if _cloud_pickler is None:
        import cloudpickle

        class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
            dispatch_table = ChainMap(_cloud_reducers, cloudpickle.CloudPickler.dispatch_table)

        _cloud_pickler = _Pickler
    return _cloud_pickler


class _FastPickler(pickle.Pickler):
    # A plain dict: the C pickler looks types up in it for every object, and a
    # ChainMap would make each lookup a Python call.
    dispatch_table = {
        **copyreg.dispatch_table,
        FileStorage: _filestorage_reduce,
        LocalProxy: _proxy_reduce,
    }


class _UseDeepcopy(Exception):
    pass


class _CopyPickler(pickle.Pickler):
    """The pickler of :func:`deep_copy`: refuses objects whose class defines
    ``__deepcopy__`` (their own idea of a copy). The C pickler does not call
    :meth:`reducer_override` for plain ``dict``, ``list``, ``str``, ``int``
    and the like, so plain data is copied at C speed."""

    def reducer_override(self, obj: Any) -> Any:
        if getattr(type(obj), "__deepcopy__", None) is not None:
            raise _UseDeepcopy
        return NotImplemented


#: Immutable types ``copy.deepcopy`` returns as they are.
ATOMIC = (str, bytes, int, float, bool, type(None), complex)


_ATOMIC_TYPES = frozenset(ATOMIC)


def _all_atomic(values: Iterable[object]) -> bool:
    """Whether every one of ``values`` is of an :data:`ATOMIC` type (exactly:
    a ``str`` subclass may carry mutable attributes).

    This runs over every value of a large ``g`` dict at each thread submit,
    so it stays in C: ``map(type, ...)`` collects the types, and one
    ``list.count`` (a pointer comparison per item) settles the usual case of
    a single type; only mixed types are looked up in a set.
    """
    types = list(map(type, values))
    if not types:
        return True
    first = types[0]
    if first in _ATOMIC_TYPES and types.count(first) == len(types):
        return True
    return _ATOMIC_TYPES.issuperset(types)


def deep_copy(value: object) -> Any:
    """A deep copy of ``value``, as :func:`copy.deepcopy` makes it, faster.

    A pickle round trip copies plain data several times faster, and for
    anything else follows the same protocol as ``deepcopy``
    (``__reduce_ex__``, ``copyreg``, shared references kept shared). Where it
    would not give the same copy (an object with its own ``__deepcopy__``) or
    cannot pickle (a lambda, a lock), ``copy.deepcopy`` makes it.

    :raises Exception: what ``copy.deepcopy`` raises for ``value``.
    """
    # A dict or list of atomic values only: deepcopy's copy is a shallow one.
    if _atomic_container(value):
        return value.copy()
    buffer = io.BytesIO()
    try:
        _CopyPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        return pickle.loads(buffer.getbuffer())
    except Exception:
        return copy.deepcopy(value)


def register_reducer(cls: type, reducer: Callable[[Any], Any], *, main_by_reference: bool) -> None:
    """Teach both picklers ``cls``; with ``main_by_reference`` only the
    process pickler (whose workers run the web process's ``__main__``)."""
    _FastPickler.dispatch_table[cls] = reducer
    if not main_by_reference:
        _cloud_reducers[cls] = reducer


def dumps(obj: object, *, by_value_main: bool = True) -> bytes:
    """Pickle ``obj`` with the :class:`FileStorage` and Flask-proxy reducers.

    The standard pickler is tried first: it is several times faster than
    cloudpickle, and what it pickles (module-level functions and classes, by
    reference) loads in any process that can import them. Lambdas, closures
    and local functions then go through cloudpickle, by value.

    :param by_value_main: also send functions and classes of ``__main__`` by
        value (needed for cluster workers, which do not run the web process's
        main script; process workers do, so they can take them by reference).
    """
    token = _by_value_main.set(by_value_main)
    try:
        return _dumps(obj, by_value_main)
    finally:
        _by_value_main.reset(token)


#: How the :func:`dumps` call in progress pickles ``__main__`` (for :func:`dumps_nested`).
_by_value_main: ContextVar[bool] = ContextVar("flask_executor.by_value_main", default=True)


def dumps_nested(obj: object) -> bytes:
    """Pickle ``obj`` on its own from inside a :func:`dumps` call (a
    ``__getstate__``), the way that call pickles: its bytes unpickle, or fail
    to, separately from the rest."""
    if _atomic_container(obj):
        return _dumps_without_memo(obj)
    return dumps(obj, by_value_main=_by_value_main.get())


def _atomic_container(obj: object) -> TypeGuard[dict[Any, Any] | list[Any]]:
    """A dict or list that holds :data:`ATOMIC` values (and keys) only."""
    if type(obj) is dict:
        return _all_atomic(obj.values()) and _all_atomic(obj)
    return type(obj) is list and _all_atomic(obj)


def _dumps_without_memo(obj: object) -> bytes:
    """Pickle a dict or list of atomic values without the pickler's memo: it
    cannot contain itself, and what the memo would keep shared is immutable.
    The memo is most of the time of pickling many strings (a 1 MB dict of
    them pickles four times faster without it); the bytes load as usual."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo
    pickler.dump(obj)
    return buffer.getvalue()


def _dumps(obj: object, by_value_main: bool) -> bytes:
    buffer = io.BytesIO()
    if not by_value_main:
        try:
            _FastPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
            return buffer.getvalue()
        except Exception:
            buffer = io.BytesIO()
    _cloud()(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _call_parts(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterable[tuple[str, object]]:
    yield "the callable", fn
    for index, arg in enumerate(args):
        yield f"args[{index}]", arg
    for key, value in kwargs.items():
        yield f"kwargs[{key!r}]", value


def dumps_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    extra: object,
    *,
    by_value_main: bool = True,
) -> bytes:
    """Pickle a call ``(fn, args, kwargs, extra)``.

    :raises SerializationError: the callable or an argument cannot be pickled;
        the message names which one and its type, e.g. ``args[0]: _thread.lock``.
    """
    try:
        return dumps((fn, args, kwargs, extra), by_value_main=by_value_main)
    except Exception as exc:
        error: Exception = exc
    for label, part in _call_parts(fn, args, kwargs):
        try:
            dumps(part, by_value_main=by_value_main)
        except Exception as exc:
            raise SerializationError(
                f"{label}: {type_name(part)} cannot be pickled for a process worker"
                f" ({exc}). Pass plain data (ids, strings, dicts) and open resources"
                " inside the task."
            ) from exc
    raise SerializationError(f"the task could not be pickled: {error}") from error
