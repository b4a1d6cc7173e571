"""Dask backend: the same pickled payloads as the process backend, run on the
workers of a Dask ``distributed`` cluster.

How work flows::

    submit() ── client.submit(_run_on_worker, payload, app spec*, pure=False)
                   │                               (* scattered once per version)
                   ▼ scheduler ──▶ worker: log_event(topic, key)  ──▶ future.running()
                                           run_call(): restore context, run
    FutureProxy ◀── outcome (pickled result or error) ◀── Dask future done

Unlike Dask's own ``ClientExecutor``, tasks are impure (two identical submits
run twice), ``running()`` turns true when a worker starts the task (the worker
reports it on a per-executor event topic), and ``shutdown`` knows
``cancel_futures``. ``map`` sends its items in one ``client.map`` call.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..futures import FutureProxy
from ..serialize import dumps, loads
from ..tasks import forward_logs, log_record_restore
from . import Backend, BackendOptions, PickledTask, settle
from ._worker import Outcome, rebuild_outcome, run_call
from .thread import _Deadlines

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "EXECUTOR_TYPE = 'dask' needs Dask's distributed package: install the extra with"
        " `pip install 'flask-executor[dask]'`"
    ) from exc

__all__ = ["DaskBackend"]

logger = logging.getLogger("flask_executor")

#: Per worker process: the app specs it has unpickled, by version.
_worker_specs: dict[str, Any] = {}


def _run_on_worker(
    payload: bytes,
    spec_bytes: bytes,
    app_version: str,
    push_context: bool,
    chunked: bool,
    topic: str,
    key: str,
) -> Outcome:
    """The function Dask runs: report the start, then run the call; meta
    updates and log records travel on the same event topic."""
    worker = distributed.get_worker()

    def publish(kind: str, data: Any) -> None:
        # Pickled: the event channel is msgpack, which turns lists into tuples.
        worker.log_event(topic, {"kind": kind, "key": key, "data": dumps(data)})

    try:
        worker.log_event(topic, key)
    except Exception:  # noqa: S110 - running() stays false; the task still runs
        pass
    forward_logs()
    spec = None
    if push_context:
        spec = _worker_specs.get(app_version)
        if spec is None:
            _worker_specs.clear()  # keep only the current version
            spec = _worker_specs[app_version] = loads(spec_bytes)
    return run_call(payload, spec, push_context, chunked, publish)


def _cancel_if_cancelled(dask_future: Any, future: Any) -> None:
    if future.cancelled():
        dask_future.cancel()


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
                    self._client = distributed.Client(
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
                    self._client = distributed.Client(
                        self._cluster, security=options.dask_security, set_as_default=False
                    )
                    logger.info(
                        "started an embedded Dask LocalCluster in %.1f s",
                        time.perf_counter() - start,
                    )
                self._client.subscribe_topic(self._topic, self._on_event)
            return self._client

    def _spec_future(self, client: Any, task: PickledTask) -> Any:
        """The app spec, scattered to every worker once per version (tasks carry
        a reference), and again if the workers holding it were lost."""
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
        spec = self._spec_future(client, items[0][1])
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

    def _on_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if isinstance(message, dict):
            if message.get("kind") == "log":
                log_record_restore(loads(message["data"]))
                return
            future = self._running.get(message.get("key", ""))
            if future is not None and message.get("kind") == "meta":
                future._merge_meta(loads(message["data"]))
            return
        future = self._running.get(message)
        if future is None or future.done() or future.running():
            return
        if future.set_running_or_notify_cancel():
            timeout = future._task_timeout or self.options.task_timeout
            if timeout:
                self._deadlines.add(time.monotonic() + timeout, future, timeout)

    def _on_done(self, dask_future: Any, future: FutureProxy[Any], key: str) -> None:
        self._running.pop(key, None)
        self._outstanding.pop(key, None)
        status = dask_future.status
        if status == "cancelled":
            future.cancel()
            return
        if status == "finished":
            ok, value = rebuild_outcome(dask_future.result())
        else:
            ok, value = False, dask_future.exception()
        if ok:
            settle(future, result=value)
        else:
            settle(future, exception=value)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            client = self._client
        if client is None:
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
                    future.cancel()  # its done callback cancels the Dask future
        if wait:
            self._close()
        else:  # submitted tasks still finish, as with concurrent.futures
            threading.Thread(target=self._close, name="flask-executor-dask-close").start()

    def _close(self) -> None:
        concurrent.futures.wait(list(self._running.values()))
        self._client.unsubscribe_topic(self._topic)
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._deadlines.stop()

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
