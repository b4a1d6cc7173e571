"""The Flask extension: :class:`Executor`, its config, and :class:`ExecutorJob`.

The executor is the front: it reads the config, captures the submitting
context (:mod:`flask_executor.snapshot`), packages the call for its backend
(closures for threads, one pickled payload for processes and Dask), and hands
back a :class:`~flask_executor.futures.FutureProxy`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from flask import Blueprint, Flask, current_app, has_app_context

from . import backends, settings
from .appspec import ConfigRules, app_spec
from .backends import Backend, BackendOptions, PickledTask, create_backend, green_problem
from .backends.thread import ThreadTask
from .errors import SerializationError
from .futures import CallbackContext, FutureCollection, FutureProxy
from .serialize import dumps_call, remove_files, spilled_uploads
from .settings import str2bool  # noqa: F401 - importable here, as in 1.0
from .signals import task_failed, task_finished, task_submitted
from .snapshot import Snapshot, capture
from .stores import BaseStore, open_store
from .tracing import traced

if TYPE_CHECKING:
    from .jobs import ExecutorJob

__all__ = ["Executor", "ExecutorJob", "propagate_exceptions_callback"]

P = ParamSpec("P")
T = TypeVar("T")

def propagate_exceptions_callback(future: concurrent.futures.Future[Any]) -> None:
    """Log a failed task's exception, with its traceback, through the app's
    logger. Added to every future when ``EXECUTOR_PROPAGATE_EXCEPTIONS`` is
    true; it runs inside the submitting app's context.

    .. versionchanged:: 2.0
        Logs through :attr:`flask.Flask.logger` instead of raising inside the
        callback, where :mod:`concurrent.futures` swallowed it.
    """
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        return
    log = current_app.logger if has_app_context() else None
    message = "Task failed: %s: %s"
    if log is not None:
        log.error(message, type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))


Q = ParamSpec("Q")
U = TypeVar("U")


class _JobDecorator(Protocol):
    """What ``executor.job(...)`` with options returns."""

    def __call__(self, fn: Callable[Q, U], /) -> ExecutorJob[Q, U]: ...


class _AppState:
    """What the executor resolved from one app's config."""

    __slots__ = (
        "kind", "options", "push_app_context", "propagate_exceptions", "config_rules",
        "max_body", "app_factory", "backend", "lock",
    )  # fmt: skip

    def __init__(
        self,
        kind: str,
        options: BackendOptions,
        push_app_context: bool,
        propagate_exceptions: bool,
        config_rules: ConfigRules,
        max_body: int,
        app_factory: str | None,
    ) -> None:
        self.kind = kind
        self.options = options
        self.push_app_context = push_app_context
        self.propagate_exceptions = propagate_exceptions
        self.config_rules = config_rules
        self.max_body = max_body
        self.app_factory = app_factory
        self.backend: Backend | None = None
        self.lock = threading.Lock()


class Executor(concurrent.futures.Executor):
    """Run background tasks with the Flask context they were submitted from.

    :param app: the Flask app; or call :meth:`init_app` later.
    :param name: prefix of this executor's config keys (``name='reports'``
        reads ``REPORTS_EXECUTOR_TYPE``) and of its key in
        :attr:`flask.Flask.extensions`, so several executors can serve one app.
        Letters, digits and underscores only.
    :raises ValueError: the name has other characters.

    Tasks see :data:`~flask.current_app`, a copy of :data:`~flask.request`,
    of :data:`~flask.g` and of the session, taken at submit time, in thread,
    process and Dask workers alike.
    """

    def __init__(self, app: Flask | None = None, name: str = "") -> None:
        if re.fullmatch(r"\w*", name, flags=re.ASCII) is None:
            raise ValueError(
                f"Executor name {name!r} may only contain letters, numbers or underscores"
            )
        self.name = name
        self._prefix = f"{name.upper()}_" if name else ""
        self.app: Flask | None = None
        self.futures = FutureCollection()
        self._default_done_callbacks: list[Callable[[Future[Any]], object]] = []
        self._states: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._shutdown = False
        backends.on_fork_in_child(self)
        if app is not None:
            self.init_app(app)

    def _key(self, key: str) -> str:
        return self._prefix + key

    def init_app(self, app: Flask) -> None:
        """Read the config and register the executor on ``app``.

        Reads every key of :data:`flask_executor.settings.SETTINGS`, each with
        this executor's name prefix (``EXECUTOR_TYPE``, ``EXECUTOR_MAX_WORKERS``,
        ``EXECUTOR_STORE``, ...; see :doc:`/config`). May be called for
        several apps; outside an app context the last one is used. No worker
        starts here: pools start on the first submit. SIGTERM with its default
        action is made to exit as ``sys.exit()`` does (see :ref:`lifecycle`).

        :raises ValueError: a value is invalid; the message names the key.
        :raises RuntimeError: the backend cannot work in this process (Dask, or
            the ``fork`` start method, under gevent or eventlet monkey-patching).
        """
        value = settings.read(app.config, self._prefix)
        kind, start_method = value["EXECUTOR_TYPE"], value["EXECUTOR_START_METHOD"]
        # Dask workers may be other machines: secrets stay home unless included.
        config_rules = ConfigRules.from_config(
            value["EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE"],
            value["EXECUTOR_SNAPSHOT_CONFIG_INCLUDE"],
            secrets=kind != "dask",
            prefix=self._prefix,
        )
        if kind == "dask" and importlib.util.find_spec("distributed") is None:
            raise ImportError(
                f"{self._key('EXECUTOR_TYPE')} = 'dask' needs Dask's distributed package:"
                " install the extra with `pip install 'flask-executor[dask]'`"
            )
        problem = green_problem(kind, start_method)
        if problem is not None:
            raise RuntimeError(f"{self._key('EXECUTOR_TYPE')} = {kind!r}: {problem}")
        options = BackendOptions(
            max_workers=value["EXECUTOR_MAX_WORKERS"],
            task_timeout=value["EXECUTOR_TASK_TIMEOUT"],
            shutdown_timeout=value["EXECUTOR_SHUTDOWN_TIMEOUT"],
            start_method=start_method,
            max_tasks_per_child=value["EXECUTOR_MAX_TASKS_PER_CHILD"],
            dask_address=value["EXECUTOR_DASK_ADDRESS"],
            dask_security=value["EXECUTOR_DASK_SECURITY"],
            worker_init=value["EXECUTOR_WORKER_INIT"],
            immediate_pickle=value["EXECUTOR_IMMEDIATE_PICKLE"],
        )
        state = _AppState(
            kind=kind,
            options=options,
            push_app_context=value["EXECUTOR_PUSH_APP_CONTEXT"],
            propagate_exceptions=value["EXECUTOR_PROPAGATE_EXCEPTIONS"],
            config_rules=config_rules,
            # None: no limit.
            max_body=value["EXECUTOR_SNAPSHOT_MAX_BODY"] or sys.maxsize,
            app_factory=value["EXECUTOR_APP_FACTORY"],
        )
        max_length, ttl = value["EXECUTOR_FUTURES_MAX_LENGTH"], value["EXECUTOR_FUTURES_TTL"]
        self._open_store(app, value["EXECUTOR_STORE"], value["EXECUTOR_STORE_NAMESPACE"])
        with self._lock:
            self._states[app] = state
            self.app = app
            self._shutdown = False
            if max_length is not None:
                self.futures.max_length = max_length
            self.futures.ttl = ttl
        app.extensions[self.name + "executor"] = self
        backends.exit_on_sigterm()
        from .cli import executor_cli

        app.cli.add_command(executor_cli(self))

    def _open_store(self, app: Flask, url: str | BaseStore, namespace: str | None) -> None:
        """Put :attr:`futures` on the store ``EXECUTOR_STORE`` names; its records
        are kept apart by app and executor name (or ``EXECUTOR_STORE_NAMESPACE``)."""
        setting = self._key("EXECUTOR_STORE")
        current = self.futures.store
        if isinstance(url, str) and current.url == url.strip() and not current.shared:
            store = current  # the memory store the collection started with
        else:
            namespace = namespace or f"{app.import_name}:{self.name or 'executor'}"
            store = open_store(url, namespace, app.instance_path, setting)
        self.futures._use_store(store, lambda: app.config.get("SECRET_KEY"), setting)

    # -- which app ---------------------------------------------------------

    def _app_and_state(self) -> tuple[Flask, _AppState]:
        if has_app_context():
            app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
            state = self._states.get(app)
            if state is not None:
                return app, state
            if self.app is None:
                raise RuntimeError(
                    f"Executor {self.name!r} is not initialised for app {app.name!r};"
                    " call executor.init_app(app)"
                )
        if self.app is None:
            raise RuntimeError(
                f"Executor {self.name!r} has no app: pass one to Executor(app) or call"
                " executor.init_app(app) before submitting"
            )
        return self.app, self._states[self.app]

    def _backend(self, state: _AppState) -> Backend:
        backend = state.backend
        if backend is None:
            with state.lock:
                if self._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                if state.backend is None:
                    state.backend = create_backend(state.kind, state.options)
                backend = state.backend
        return backend

    # -- submitting ----------------------------------------------------------

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> FutureProxy[T]:
        """Schedule ``fn(*args, **kwargs)`` and return its future.

        The task runs with a copy of the current app, request, ``g`` and
        session context (see :doc:`/context`).

        :raises SerializationError: (process and Dask) the callable or an
            argument cannot be pickled; the message names which.
        :raises RuntimeError: the executor was shut down.
        """
        return self._submit(fn, args, kwargs)

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: Hashable | None = None,
        store: bool = False,
        timeout: float | None = None,
    ) -> FutureProxy[T]:
        """Submit one call; with ``store``, keep its future under ``key``
        (checked before anything is submitted). Shared by :meth:`submit`,
        :meth:`submit_stored` and jobs."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        app, state = self._app_and_state()
        backend = self._backend(state)
        # Claim the key atomically (in every process of a shared store) first.
        task_id = self.futures._reserve(key, _qualname(fn)) if store else None
        try:
            future, task = self._prepare(
                app, state, backend, fn, args, kwargs, key=key, timeout=timeout
            )
            if task_id is not None:
                self.futures._attach(task_id, future)
            # Sent first: an immediate backend (or a quick thread) finishes the task in submit().
            if task_submitted.receivers:
                task_submitted.send(app, future=future, key=key)
            backend.submit(future, task)
        except BaseException:
            if task_id is not None:
                self.futures._release(task_id)
            raise
        return future

    def _prepare(
        self,
        app: Flask,
        state: _AppState,
        backend: Backend,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        chunked: bool = False,
        key: Hashable | None = None,
        timeout: float | None = None,
    ) -> tuple[FutureProxy[T], Any]:
        """Capture the context and package the call for ``backend``."""
        fn = traced(fn, self.name, state.kind, key)  # unchanged unless OpenTelemetry is set up
        snap: Snapshot | None = None
        if state.push_app_context:
            snap = capture(max_body=state.max_body, for_thread=not backend.pickles)
        task: Any
        spilled: list[str] = []
        by_value = backend.by_value_main
        if backend.pickles:
            spec_version, spec = app_spec(app, state.config_rules, state.app_factory, by_value)
            with spilled_uploads() as spilled:  # large uploads travel as files
                try:
                    payload = dumps_call(fn, args, kwargs, snap, by_value_main=by_value)
                except SerializationError:
                    if snap is None:
                        raise
                    # Leave out what cannot travel (g.db, a lock); reading it in the
                    # task says so. Raises again, naming it, if fn or an argument fails.
                    snap = snap.picklable()
                    payload = dumps_call(fn, args, kwargs, snap, by_value_main=by_value)
        if backend.pickles:
            task = PickledTask(payload, spec_version, spec, state.push_app_context, chunked)
            future: FutureProxy[T] = FutureProxy(CallbackContext(app, snap), timeout)
        else:  # the task is its future's callback context too: one object, not two
            task = ThreadTask(app, snap, fn, args, kwargs)
            future = task.future = FutureProxy(task, timeout)
        if spilled:  # the worker removes what it opened; this, what no task opened
            Future.add_done_callback(future, functools.partial(remove_files, spilled))
        if task_finished.receivers or task_failed.receivers:
            # The plain Future method: sending signals needs no app context.
            Future.add_done_callback(future, functools.partial(_send_outcome, app, key))
        if state.propagate_exceptions:
            future.add_done_callback(propagate_exceptions_callback)
        for callback in self._default_done_callbacks:
            future.add_done_callback(callback)
        return future, task

    def submit_stored(
        self, future_key: Hashable, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> FutureProxy[T]:
        """Like :meth:`submit`, and store the future in :attr:`futures` under
        ``future_key``.

        :raises ValueError: ``future_key`` is taken; raised *before* anything
            is submitted.
        """
        return self._submit(fn, args, kwargs, future_key, store=True)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`: results in input
        order, each item run with its own copy of the context.

        With a process or Dask backend, ``chunksize`` items travel together
        in one payload; each still runs in its own context. With processes
        and on Dask a ``chunksize`` of 1 is raised to about four chunks per
        worker (processes: at most 1,024 items a chunk, and never with
        ``EXECUTOR_TASK_TIMEOUT`` set, so that the time limit stays per item).

        .. versionchanged:: 2.0
            Process mode chooses the chunk size when ``chunksize`` is 1.
        """
        return self._map(fn, iterables, timeout, chunksize)

    def _map(
        self,
        fn: Callable[..., T],
        iterables: tuple[Iterable[Any], ...],
        timeout: float | None,
        chunksize: int,
        task_timeout: float | None = None,
    ) -> Iterator[T]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = time.monotonic() + timeout if timeout is not None else None
        app, state = self._app_and_state()
        backend = self._backend(state)
        items: Iterable[tuple[Any, ...]] = zip(*iterables, strict=False)
        if chunksize == 1 and backend.pickles:
            items = list(items)
            chunksize = backend.map_chunksize(len(items))
        chunked = chunksize > 1 and backend.pickles
        calls = _chunks(items, chunksize) if chunked else items
        pairs = [
            self._prepare(
                app,
                state,
                backend,
                fn,
                (call,) if chunked else tuple(call),
                {},
                chunked,
                timeout=task_timeout,
            )
            for call in calls
        ]
        if task_submitted.receivers:
            for future, _ in pairs:
                task_submitted.send(app, future=future, key=None)
        backend.submit_many(pairs)
        futures = [future for future, _ in pairs]
        return _flatten(_results(futures, end)) if chunked else _results(futures, end)

    @overload
    def job(self, fn: Callable[P, T]) -> ExecutorJob[P, T]: ...

    @overload
    def job(
        self,
        *,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff: float = 0.0,
        timeout: float | None = None,
    ) -> _JobDecorator: ...

    def job(
        self,
        fn: Callable[P, T] | None = None,
        *,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff: float = 0.0,
        timeout: float | None = None,
    ) -> ExecutorJob[P, T] | _JobDecorator:
        """Decorate a function so it can be submitted as ``fn.submit(...)``:
        ``@executor.job``, or with options,
        ``@executor.job(retries=3, retry_on=(ConnectionError,), backoff=0.5, timeout=10)``
        (see :class:`~flask_executor.jobs.ExecutorJob`).

        Works before :meth:`init_app` and with every backend.
        """
        from .jobs import ExecutorJob

        options = {"retries": retries, "retry_on": retry_on, "backoff": backoff}

        def decorate(function: Callable[Q, U], /) -> ExecutorJob[Q, U]:
            return ExecutorJob(self, function, timeout=timeout, **options)  # type: ignore[arg-type]

        return decorate if fn is None else decorate(fn)

    def status_blueprint(
        self,
        name: str | None = None,
        *,
        authorize: Callable[[], object] | None = None,
        list_keys: bool = False,
    ) -> Blueprint:
        """A blueprint serving the status of :attr:`futures` as JSON:
        ``GET /<key>`` gives one (404 for an unknown key) and, with
        ``list_keys=True``, ``GET /`` lists them (otherwise 404). Register it
        with a ``url_prefix``; ``authorize()`` is called inside each request
        and a false answer is 403 (see :mod:`flask_executor.status`).

        .. versionadded:: 2.0
        .. versionchanged:: 2.0
            ``authorize`` and ``list_keys``; listing is opt-in.
        """
        from .status import status_blueprint

        return status_blueprint(
            self.futures, name or f"{self.name or 'executor'}_status", authorize, list_keys
        )

    def dashboard_blueprint(
        self,
        authorize: Callable[[], object] | None = None,
        *,
        name: str | None = None,
        stream_seconds: float = 25.0,
    ) -> Blueprint:
        """A blueprint serving the task dashboard of :attr:`futures` (see
        :doc:`/dashboard`): register it with a ``url_prefix``.

        :param authorize: required; called with no arguments inside every
            request to the blueprint, a false answer is a 403.
            ``authorize=lambda: True`` opens it to everyone.
        :param stream_seconds: how long one server-sent events response lasts
            before the browser reconnects.
        :raises TypeError: ``authorize`` is missing.

        .. versionadded:: 2.0
        """
        from .dashboard import dashboard_blueprint

        blueprint_name = name or f"{self.name or 'executor'}_dashboard"
        return dashboard_blueprint(
            self, authorize, blueprint_name, stream_seconds=stream_seconds
        )

    def add_default_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        """Add a callback to every future this executor returns from now on;
        it runs inside the submitting app's context."""
        self._default_done_callbacks.append(fn)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks and release the workers, like
        :meth:`concurrent.futures.Executor.shutdown`. Pending tasks still run
        unless ``cancel_futures``; interpreter exit does the same. With
        ``wait``, waits at most ``EXECUTOR_SHUTDOWN_TIMEOUT`` seconds, then
        cancels or fails what is unfinished (see :ref:`lifecycle`).

        .. versionchanged:: 2.0
            Waits at most ``EXECUTOR_SHUTDOWN_TIMEOUT``.
        """
        with self._lock:
            self._shutdown = True
            states = list(self._states.values())
        start = time.monotonic()
        for state in states:
            with state.lock:
                backend = state.backend
            if backend is not None:
                limit = state.options.shutdown_timeout
                timeout = None if limit is None else max(0.0, start + limit - time.monotonic())
                backend.shutdown(wait=wait, cancel_futures=cancel_futures, timeout=timeout)

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's pools (the next submit starts
        this process's own) and locks another thread may have held."""
        self._lock = threading.Lock()
        for state in list(self._states.values()):
            state.lock = threading.Lock()
            state.backend = None


def _qualname(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a task's callable, for its stored record."""
    inner = getattr(fn, "job", fn)  # a job behind retries
    module = getattr(inner, "__module__", None) or ""
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{module}.{name}" if module else name


def _send_outcome(app: Flask, key: Hashable | None, future: Future[Any]) -> None:
    if future.cancelled():
        return
    exception = future.exception()
    if exception is None:
        task_finished.send(app, future=future, key=key, result=future.result())
    else:
        task_failed.send(app, future=future, key=key, exception=exception)


def _chunks(items: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _flatten(chunks: Iterator[list[T]]) -> Iterator[T]:
    # Pop, not iterate: no reference to a result is kept once it was yielded.
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def _results(futures: list[FutureProxy[Any]], end: float | None) -> Iterator[Any]:
    """Yield results in order; on early exit, cancel what has not started.

    As in :mod:`concurrent.futures`, no local keeps the last future or result
    alive while the generator is suspended.
    """
    try:
        futures.reverse()
        while futures:
            yield _result_or_cancel(futures.pop(), end)
    finally:
        for future in futures:
            _cancel_if_pending(future)


def _result_or_cancel(future: FutureProxy[Any], end: float | None) -> Any:
    try:
        return future.result(None if end is None else end - time.monotonic())
    finally:
        _cancel_if_pending(future)
        del future


def _cancel_if_pending(future: FutureProxy[Any]) -> None:
    """Cancel ``future`` only if it has not started (map's generator closing
    must not kill running tasks)."""
    concurrent.futures.Future.cancel(future)


def __getattr__(name: str) -> Any:
    """``ExecutorJob``, importable from here as in 1.0, is imported on first use:
    an app that defines no job does not load :mod:`flask_executor.jobs`."""
    if name == "ExecutorJob":
        from .jobs import ExecutorJob

        return ExecutorJob
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
