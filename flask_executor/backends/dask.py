"""Dask backend: the same pickled payloads as the process backend, run on the
workers of a Dask ``distributed`` cluster.

How work flows::

    submit() ── client.submit(_run_on_worker, payload, app spec*, pure=False)
                   │                               (* scattered once per version)
                   ▼ scheduler ──▶ worker: log_event(topic, JSON) ──▶ future.running(), meta, logs
                                           run_call(): restore context, run
    FutureProxy ◀── outcome (pickled result or error) ◀── Dask future done

Unlike Dask's own ``ClientExecutor``, tasks are impure (two identical submits
run twice), ``running()`` turns true when a worker starts the task (the worker
reports it on a per-executor event topic once the task has run a few
milliseconds), and ``shutdown`` knows
``cancel_futures``. ``map`` sends its items in one ``client.map`` call.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..appspec import restore_app
from ..futures import FutureProxy
from ..serialize import loads, type_name
from ..tasks import forward_logs, log_record_restore
from . import (
    Backend,
    BackendOptions,
    PickledTask,
    _shutdown_all,
    cancel_and_notify,
    settle,
    stop_unfinished,
)
from ._worker import Outcome, _error, rebuild_outcome, run_call, run_worker_init
from .thread import _Deadlines

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "EXECUTOR_TYPE = 'dask' needs Dask's distributed package: install the extra with"
        " `pip install 'flask-executor[dask]'`"
    ) from exc

__all__ = ["CONNECT_ATTEMPTS", "DaskBackend"]

# distributed closes its clusters at exit; atexit runs the last registered
# first: shut our backends down (and let their tasks finish) before that.
atexit.unregister(_shutdown_all)
atexit.register(_shutdown_all)

logger = logging.getLogger("flask_executor")

#: Per worker process: the app specs it has unpickled, by version.
_worker_specs: dict[str, Any] = {}
#: Per worker process: the outcome of ``EXECUTOR_WORKER_INIT`` by executor
#: (event topic): ``None`` once it ran, the error outcome if it raised.
_worker_inits: dict[str, Outcome | None] = {}
_worker_init_lock = threading.Lock()


def _initialize(name: str, topic: str, spec_bytes: bytes, app_version: str) -> Outcome | None:
    """Run the initializer ``name`` once in this worker for the executor of
    ``topic``, in the worker app's context; its error outcome (every task of
    that executor here then fails with it, it is never retried)."""
    with _worker_init_lock:
        if topic in _worker_inits:
            return _worker_inits[topic]
        failure = None
        try:
            spec = _worker_specs.get(app_version) or loads(spec_bytes)
            run_worker_init(name, restore_app(spec))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            broken = concurrent.futures.BrokenExecutor(
                f"the worker initializer (EXECUTOR_WORKER_INIT = {name!r}) raised"
                f" {type_name(exc)}: {exc}; its traceback is this error's cause"
            )
            broken.__cause__ = exc
            failure = _error(broken)
        _worker_inits[topic] = failure
        return failure


#: How long the web process holds the Dask futures of finished tasks (so the
#: cluster their results) before releasing them in one message.
RELEASE_AFTER = 0.1

#: How long a task runs before its worker reports the start (``running()``).
#: A start event and the task's result sent one after the other wait for the
#: batching interval of Dask's worker and scheduler streams (2 ms each): a
#: task done sooner reports no start, and goes from pending to done.
START_REPORT_DELAY = 0.005


class _StartReport:
    """The start event of one task on a Dask worker: sent once, from the
    worker's event loop after :data:`START_REPORT_DELAY` unless the task has
    finished by then, or sooner from the task's thread when it publishes meta
    or a log record. It carries how long the task has run, so that a time
    limit counts from the real start."""

    __slots__ = ("worker", "topic", "key", "started", "sent", "finished")

    def __init__(self, worker: Any, topic: str, key: str) -> None:
        self.worker = worker
        self.topic = topic
        self.key = key
        self.started = time.monotonic()
        self.sent = False
        self.finished = False

    def send(self) -> None:
        if self.sent or self.finished:
            return
        self.sent = True  # a second event, in a race, is harmless: the first counts
        try:
            ran = round(time.monotonic() - self.started, 6)
            self.worker.log_event(self.topic, _event_dumps("start", self.key, ran))
        except Exception:  # noqa: S110 - running() stays false; the task still runs
            pass


def _run_on_worker(
    payload: bytes,
    spec_bytes: bytes,
    app_version: str,
    push_context: bool,
    chunked: bool,
    topic: str,
    key: str,
    worker_init: str | None = None,
) -> Outcome:
    """The function Dask runs: the call, its start reported once it has run
    :data:`START_REPORT_DELAY`; meta updates and log records travel on the
    same event topic."""
    worker = distributed.get_worker()
    start = _StartReport(worker, topic, key)

    def publish(kind: str, data: Any) -> None:
        start.send()  # the start comes first
        worker.log_event(topic, _event_dumps(kind, key, data))

    try:
        worker.loop.add_callback(worker.loop.call_later, START_REPORT_DELAY, start.send)
    except Exception:  # noqa: S110 - running() stays false; the task still runs
        pass
    try:
        forward_logs()
        if worker_init:
            failure = _initialize(worker_init, topic, spec_bytes, app_version)
            if failure is not None:
                return failure
        spec = None
        if push_context:
            spec = _worker_specs.get(app_version)
            if spec is None:
                _worker_specs.clear()  # keep only the current version
                spec = _worker_specs[app_version] = loads(spec_bytes)
        return run_call(payload, spec, push_context, chunked, publish)
    finally:
        start.finished = True


_plaintext_warned: set[str] = set()
_LOOPBACK_HOSTS = ("localhost", "127.", "[::1]", "::1")


def _warn_if_plaintext(address: Any, security: Any) -> None:
    """Warn once per address when a scheduler that is not on this machine is
    reached without TLS: tasks, their request snapshots and results would
    cross the network in clear."""
    if not isinstance(address, str):
        return
    scheme, _, rest = address.rpartition("://")
    if scheme == "tls" or getattr(security, "require_encryption", False):
        return
    if scheme in ("inproc", "ucx") or rest.startswith(_LOOPBACK_HOSTS):
        return
    with _warn_lock:
        if rest in _plaintext_warned:
            return
        _plaintext_warned.add(rest)
    logger.warning(
        "EXECUTOR_DASK_ADDRESS %r is not on this machine and is reached without TLS:"
        " tasks, request snapshots and results cross the network in clear. Use a"
        " tls:// address with EXECUTOR_DASK_SECURITY (see docs/security.rst).",
        address,
    )


_warn_lock = threading.Lock()


# -- the event channel ------------------------------------------------------------
#
# Any client of the scheduler can list topics and post to them, so what arrives
# is untrusted: JSON text (msgpack would turn lists into tuples), parsed and
# checked, never unpickled; messages for keys that are not this executor's
# running tasks are dropped.

_LOG_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "levelno": (int,),
    "levelname": (str,),
    "msg": (str,),
    "pathname": (str,),
    "filename": (str,),
    "module": (str,),
    "lineno": (int,),
    "funcName": (str,),
    "created": (int, float),
    "process": (int, type(None)),
    "processName": (str, type(None)),
    "threadName": (str, type(None)),
    "exc_text": (str, type(None)),
}


def _event_dumps(kind: str, key: str, data: Any) -> str:
    """A worker's message to the web process, as JSON text."""
    try:
        return json.dumps({"kind": kind, "key": key, "data": data}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        if kind != "meta":
            raise
        bad = [name for name, value in data.items() if not _is_json(value)]
        raise TypeError(
            f"current_task.update(): {', '.join(map(repr, bad)) or 'a value'} cannot be"
            f" sent to the web process ({exc}); on Dask, meta travels as JSON: use"
            " strings, numbers, booleans, None, lists and dicts with string keys"
        ) from exc


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _is_duration(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < _MAX_RAN


#: A start event's "has run for" beyond this (about 11 days) is dropped.
_MAX_RAN = 1e6


def _event_loads(message: Any) -> tuple[str, str, Any] | None:
    """``(kind, key, data)`` of a well-formed event, else ``None``."""
    if not isinstance(message, str) or len(message) > _MAX_EVENT:
        return None
    try:
        event = json.loads(message)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    kind, key, data = event.get("kind"), event.get("key"), event.get("data")
    if not isinstance(key, str):
        return None
    if kind == "start" and (data is None or _is_duration(data)):
        return kind, key, data
    if kind == "meta" and isinstance(data, dict):
        return kind, key, data
    if kind == "log" and isinstance(data, dict):
        record = {
            name: data[name]
            for name, types in _LOG_FIELDS.items()
            if type(data.get(name)) in types
        }
        if "name" in record and "levelno" in record and "msg" in record:
            return kind, key, record
    return None


#: Larger events are dropped unread (a log record with a long traceback fits).
_MAX_EVENT = 1024 * 1024


def _cancel_if_cancelled(dask_future: Any, future: Any) -> None:
    if future.cancelled():
        dask_future.cancel()


#: Attempts to connect a client whose handshake fails one of distributed's own
#: checks, a tenth of a second apart and doubling.
CONNECT_ATTEMPTS = 4

#: An app spec (the pickled config and routes) up to this size travels inside
#: each task; a larger one is scattered to the workers once per version and
#: tasks refer to it. A task that depends on scattered data waits for the
#: scheduler to place it with its dependency: about 4 ms more a round trip.
INLINE_SPEC_BYTES = 16 * 1024


def _new_client(*args: Any, **kwargs: Any) -> Any:
    """``distributed.Client(*args, **kwargs)``, tried again (up to
    :data:`CONNECT_ATTEMPTS` in all) when it fails one of distributed's own
    checks: ``assert len(msg) == 1`` in the handshake, seen when a busy
    scheduler batches the stream start with another message while other
    clients come and go (twice in a row once, on a loaded CI machine), or its
    event loop thread not started within distributed's 10 s. The half-made
    client closes itself when collected."""
    for attempt in range(CONNECT_ATTEMPTS - 1):
        try:
            return distributed.Client(*args, **kwargs)
        except AssertionError:
            logger.warning("Dask client handshake failed an internal check; connecting again")
            time.sleep(0.1 * 2**attempt)
    return distributed.Client(*args, **kwargs)  # the last attempt: its error is the caller's


class DaskBackend(Backend):
    """Runs pickled tasks on a Dask cluster: the one at ``EXECUTOR_DASK_ADDRESS``,
    or an embedded ``LocalCluster`` of ``max_workers`` single-threaded worker
    processes started on first use and closed by :meth:`shutdown`."""

    pickles = True

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self._client: Any = None
        self._cluster: Any = None
        self._shutdown = False
        self._topic = f"flask-executor-{uuid.uuid4().hex}"
        self._spec: tuple[str, Any] | None = None
        self._running: dict[str, FutureProxy[Any]] = {}
        self._outstanding: dict[str, Any] = {}
        #: Dask futures of finished tasks, released together every
        #: :data:`RELEASE_AFTER`, under ``_finished_lock``.
        self._finished: list[Any] = []
        self._finished_lock = threading.Lock()
        self._deadlines = _Deadlines(
            "Dask cannot interrupt it, so it may still finish on its worker"
        )

    def _connect(self) -> Any:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._client is None:
                options = self.options
                if options.dask_address:
                    _warn_if_plaintext(options.dask_address, options.dask_security)
                    self._client = _new_client(
                        options.dask_address,
                        security=options.dask_security,
                        set_as_default=False,
                    )
                else:
                    start = time.perf_counter()
                    self._cluster = distributed.LocalCluster(
                        n_workers=options.max_workers or None,
                        threads_per_worker=1,
                        processes=True,
                        dashboard_address="127.0.0.1:0",
                        host="127.0.0.1",
                        security=options.dask_security,
                    )
                    self._client = _new_client(
                        self._cluster, security=options.dask_security, set_as_default=False
                    )
                    logger.info(
                        "started an embedded Dask LocalCluster in %.1f s",
                        time.perf_counter() - start,
                    )
                self._client.subscribe_topic(self._topic, self._on_event)
            return self._client

    def _carried_spec(self, client: Any, task: PickledTask) -> Any:
        """The app spec as tasks carry it: its bytes when it is small (see
        :data:`INLINE_SPEC_BYTES`); else scattered to every worker once per
        version (tasks carry a reference), and again if the workers holding it
        were lost."""
        if len(task.app_spec) <= INLINE_SPEC_BYTES:
            return task.app_spec
        with self._lock:
            spec = self._spec
            if spec is None or spec[0] != task.app_version or spec[1].status != "finished":
                scattered = client.scatter(task.app_spec, hash=False, broadcast=True)
                spec = self._spec = (task.app_version, scattered)
            return spec[1]

    def map_chunksize(self, items: int) -> int:
        """About four chunks per worker: one scheduler round trip per item
        would be slower than ``client.map``."""
        workers = len(self._connect().scheduler_info().get("workers", {})) or 1
        return max(1, -(-items // (4 * workers)))

    def submit(self, future: FutureProxy[Any], task: PickledTask) -> None:
        self.submit_many([(future, task)])

    def submit_many(self, items: Sequence[tuple[FutureProxy[Any], PickledTask]]) -> None:
        """Submit several tasks in one ``client.map`` round trip."""
        if not items:
            return
        client = self._connect()
        spec = self._carried_spec(client, items[0][1])
        keys = [f"flask-executor-{uuid.uuid4().hex}" for _ in items]
        for key, (future, _) in zip(keys, items, strict=True):
            self._running[key] = future
        tasks = [task for _, task in items]
        dask_futures = client.map(
            _run_on_worker,
            [task.payload for task in tasks],
            [spec] * len(tasks),
            [task.app_version for task in tasks],
            [task.push_context for task in tasks],
            [task.chunked for task in tasks],
            [self._topic] * len(tasks),
            keys,
            [getattr(self.options, "worker_init", None)] * len(tasks),
            key=keys,
            pure=False,
        )
        for key, dask_future, (future, _) in zip(keys, dask_futures, items, strict=True):
            self._outstanding[key] = dask_future
            future._stop_running = dask_future.cancel
            future.add_done_callback(functools.partial(_cancel_if_cancelled, dask_future))
            dask_future.add_done_callback(
                lambda d, f=future, k=key: self._on_done(d, f, k)
            )

    def _on_event(self, event: Any) -> None:
        """Handle one message from the topic: plain data, checked, for one of
        this executor's tasks; anything else is dropped. Never raises (it runs
        in the Dask client's event loop)."""
        try:
            parsed = _event_loads(event[1]) if isinstance(event, tuple) else None
            if parsed is None:
                return
            kind, key, data = parsed
            future = self._running.get(key)
            if future is None:
                return
            if kind == "log":
                log_record_restore(data)
            elif kind == "meta":
                future._merge_meta(data)
            else:
                self._start(future, data or 0.0)
        except Exception:
            logger.debug("dropped a Dask event that could not be handled", exc_info=True)

    def _start(self, future: FutureProxy[Any], ran: float) -> None:
        """The task has run for ``ran`` seconds on its worker when it reported
        its start: its time limit counts from the start, not the report."""
        if future.done() or future.running():
            return
        if future.set_running_or_notify_cancel():
            timeout = future._task_timeout or self.options.task_timeout
            if timeout:
                started = time.monotonic() - min(ran, timeout)
                self._deadlines.add(started + timeout, future, timeout)

    def _release_finished(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, []
        del finished  # the last references: Dask tells the scheduler the keys are free

    def _hold_for_release(self, dask_future: Any) -> None:
        """Hold a finished task's Dask future for :data:`RELEASE_AFTER`, then
        release it with the others finished meanwhile. Released at once, each
        key's release message opened the client's batching interval (10 ms)
        just before a view submitted its next task, which then waited out the
        interval: 1.5x-1.7x the raw ``client.submit`` round trip."""
        with self._finished_lock:
            first = not self._finished
            self._finished.append(dask_future)
        if first:
            try:
                self._client.loop.add_callback(
                    self._client.loop.call_later, RELEASE_AFTER, self._release_finished
                )
            except Exception:  # a closed client: nothing left to release on
                self._release_finished()

    def _on_done(self, dask_future: Any, future: FutureProxy[Any], key: str) -> None:
        self._hold_for_release(dask_future)
        self._running.pop(key, None)
        self._outstanding.pop(key, None)
        status = dask_future.status
        if status == "cancelled":
            if not cancel_and_notify(future):
                future.cancel()  # running: FutureProxy marks it notified
            return
        if status == "finished":
            ok, value = rebuild_outcome(dask_future.result())
        else:
            ok, value = False, dask_future.exception()
        if ok:
            settle(future, result=value)
        else:
            settle(future, exception=value)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            client = self._client
        if client is None:
            self._deadlines.stop()
            return
        if cancel_futures:
            # A worker's start event may still be on its way: ask the scheduler
            # which tasks it has handed to workers, and leave those running.
            try:
                assigned = {key for keys in client.processing().values() for key in keys}
            except Exception:
                assigned = set()
            for key, future in list(self._running.items()):
                if key not in assigned:
                    cancel_and_notify(future)  # its done callback cancels the Dask future
        if wait:
            self._close(timeout)
        else:  # submitted tasks still finish, as with concurrent.futures
            threading.Thread(
                target=self._close,
                args=(self.options.shutdown_timeout if timeout is None else timeout,),
                name="flask-executor-dask-close",
            ).start()

    def _close(self, timeout: float | None) -> None:
        _, unfinished = concurrent.futures.wait(list(self._running.values()), timeout)
        if unfinished:
            # Settle first: cancelling on the cluster would cancel running ones.
            stop_unfinished(
                unfinished, timeout, "it was cancelled on the cluster, where it may still finish"
            )
            outstanding = [self._outstanding.get(key) for key in list(self._running)]
            try:
                self._client.cancel([f for f in outstanding if f is not None])
            except Exception:  # noqa: S110 - our futures are settled already
                pass
        self._client.unsubscribe_topic(self._topic)
        self._client.close()
        # After: closing releases every key of the client, and a closed client
        # sends nothing (a release queued just before the close was written to
        # a closing connection, and distributed logged its traceback).
        self._release_finished()
        if self._cluster is not None:
            self._cluster.close()
        self._deadlines.stop()

    def _abandon(self) -> None:
        # In a forked child: the client's connections and event loop thread are
        # the parent's. Closed in name only, it is left alone by its __del__
        # and by distributed's exit hooks.
        if self._client is not None:
            self._client.status = "closed"
        if self._cluster is not None:
            self._cluster.shutdown_on_close = False

    def stats(self) -> dict[str, Any]:
        """See :meth:`Backend.stats`, from the client's cached scheduler info
        (no round trip, so a worker's ``busy`` and ``memory`` are as of its last
        heartbeat); empty before the first submit."""
        client = self._client
        info = client.scheduler_info() if client is not None else {}
        rows = []
        for address, worker in info.get("workers", {}).items():
            metrics = worker.get("metrics", {})
            counts = metrics.get("task_counts")  # by state, of the tasks on the worker now
            executing = counts.get("executing", 0) if counts is not None else None
            rows.append(
                {
                    "name": f"{worker.get('name', '')} {address}".strip(),
                    "pid": worker.get("pid"),  # not in the scheduler's worker info
                    "busy": None if executing is None else executing > 0,
                    "tasks_run": None,
                    "memory": metrics.get("memory"),
                }
            )
        running = list(self._running.values())
        return {
            "backend": "dask",
            "configured_workers": self.options.max_workers,
            "workers": rows,
            "busy": sum(1 for future in running if future.running()),
            "queue": sum(1 for future in running if not future.running()),
        }
