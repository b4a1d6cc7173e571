"""The thread backend's hot path (issue 13): a future that makes its Condition
and lists on first use, a task that is also its future's callback context and
the queue's item. What must still hold: futures behave as the standard
library's, each task runs in its own copy of the request, and a finished
future holds neither the request nor the call."""

from __future__ import annotations

import concurrent.futures
import gc
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from flask import Flask, current_app, g, request
from support import TIMEOUT, without_cyclic_gc

from flask_executor import Executor
from flask_executor.backends.thread import ThreadTask
from flask_executor.futures import FutureProxy


def test_future_proxy_has_what_a_future_sets_up() -> None:
    """Pins the standard library: every attribute ``Future.__init__`` sets is
    there on a new FutureProxy, of the same type or a subclass (a future
    Python that adds one fails here, not in a user's ``wait()``)."""
    plain: Future[Any] = Future()
    proxy: FutureProxy[Any] = FutureProxy()
    for name, value in vars(plain).items():
        assert isinstance(getattr(proxy, name), type(value)), name
    assert proxy._condition is proxy._condition
    assert proxy._waiters is proxy._waiters
    assert proxy._done_callbacks is proxy._done_callbacks
    assert "pending" in repr(proxy)


def test_first_use_from_several_threads_makes_one_condition() -> None:
    futures: list[FutureProxy[Any]] = [FutureProxy() for _ in range(200)]
    seen: list[list[tuple[int, int, int]]] = []
    barrier = threading.Barrier(4)

    def use() -> None:
        barrier.wait(TIMEOUT)
        seen.append(
            [(id(f._condition), id(f._waiters), id(f._done_callbacks)) for f in futures]
        )

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert len(seen) == 4
    assert seen[0] == seen[1] == seen[2] == seen[3]


def _wait_for(event: threading.Event) -> bool:
    return event.wait(TIMEOUT)


def _echo(value: Any) -> Any:
    return value


def test_wait_and_as_completed_see_queued_and_cancelled_thread_futures(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    release = threading.Event()
    blocker = executor.submit(_wait_for, release)
    queued = [executor.submit(_echo, i) for i in range(5)]
    assert queued[2].cancel()  # still in the queue: never started
    # As with the stdlib pool, wait() counts it once the worker has dropped it.
    release.set()
    done, not_done = concurrent.futures.wait([blocker, *queued], timeout=TIMEOUT)
    assert not_done == set()
    assert set(concurrent.futures.as_completed(queued, timeout=TIMEOUT)) == set(queued)
    assert [f.result(0) for i, f in enumerate(queued) if i != 2] == [0, 1, 3, 4]
    assert queued[2].cancelled()


def _request_view() -> tuple[str, str, str]:
    request.seen = "task"  # type: ignore[attr-defined]
    g.user = "changed by the task"
    return current_app.name, request.args["q"], getattr(request, "mark", "")


def test_task_runs_in_its_request_copy_even_if_its_future_was_released_first(
    app: Flask,
) -> None:
    """The future drops the request (``release``) as soon as it is done,
    which a time limit can make happen before the task is called: the call
    still gets its own copy of the request and ``g``, teardown runs, and the
    view's request is untouched."""
    from flask_executor.snapshot import capture

    torn_down: list[bool] = []
    app.teardown_appcontext(lambda exc: torn_down.append(True))
    with app.test_request_context("/?q=abc"):
        request.mark = "view"  # type: ignore[attr-defined]
        g.user = "view"
        snap = capture(max_body=1 << 20, for_thread=True)
        task = ThreadTask(app, snap, _request_view, (), {})
        task.future = FutureProxy(task)
        task.release()
        assert task.snap is None
        results: list[Any] = []
        worker = threading.Thread(target=lambda: results.append(task()))
        worker.start()
        worker.join(TIMEOUT)
        assert (request.mark, g.user) == ("view", "view")  # type: ignore[attr-defined]
        assert not hasattr(request, "seen")
        assert torn_down == [True]  # the task's app context, not yet the view's
    assert results == [(app.name, "abc", "view")]


class _Call:
    def __call__(self, data: object) -> str:
        return "ok"


class _Data:
    pass


def test_finished_thread_future_holds_neither_call_nor_arguments(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """Without the cyclic collector: the future (kept by the caller) keeps its
    task as its callback context, but not the callable, its arguments or the
    request snapshot once the task ran; and callbacks added now still run in
    the app context."""
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    assert executor.submit(_echo, 1).result(TIMEOUT) == 1  # the worker is up
    with without_cyclic_gc():
        call, data = _Call(), _Data()
        refs = [weakref.ref(call), weakref.ref(data)]
        with app.test_request_context("/?q=1"):
            g.big = _Data()
            refs.append(weakref.ref(g.big))
            future = executor.submit(call, data)
            g.big = None
        del call, data
        assert future.result(TIMEOUT) == "ok"
        names: list[str] = []
        future.add_done_callback(lambda f: names.append(current_app.name))
        assert names == [app.name]
        deadline = threading.Event()
        for _ in range(100):  # the worker forgets the task just after completing it
            if all(ref() is None for ref in refs):
                break
            deadline.wait(0.05)
        assert [ref() for ref in refs] == [None, None, None]


def test_dropped_thread_future_is_freed_without_the_cyclic_gc(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """A finished future and its task form no reference cycle: dropping the
    future frees it at once, as with the stdlib pool, in request, app context
    and cancelled alike."""
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    assert executor.submit(_echo, 1).result(TIMEOUT) == 1  # the worker is up
    release = threading.Event()
    with without_cyclic_gc():
        with app.test_request_context("/?q=1"):
            blocker = executor.submit(_wait_for, release)
            futures = [executor.submit(_echo, i) for i in range(3)]
        with app.app_context():
            futures.append(executor.submit(_echo, 3))
        assert futures[1].cancel()
        release.set()
        assert blocker.result(TIMEOUT) is True
        concurrent.futures.wait(futures, timeout=TIMEOUT)
        assert executor.submit(_echo, 4).result(TIMEOUT) == 4  # every task was handled
        refs = [weakref.ref(f) for f in futures]
        del futures, blocker
        assert [ref() for ref in refs] == [None] * 4


def _tracked_per_finished_future(
    app: Flask, executor: Executor | concurrent.futures.ThreadPoolExecutor, n: int = 500
) -> float:
    with app.app_context():
        assert executor.submit(_echo, 0).result(TIMEOUT) == 0
        gc.collect()
        before = len(gc.get_objects())
        futures = [executor.submit(_echo, i) for i in range(n)]
        assert [f.result(TIMEOUT) for f in futures] == list(range(n))
        assert executor.submit(_echo, n).result(TIMEOUT) == n  # the last task was dropped too
        gc.collect()
        return (len(gc.get_objects()) - before) / n


def test_finished_thread_future_costs_the_gc_less_than_the_stdlib_future(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """A caller that keeps its futures (submit 20,000, then every result)
    keeps what each finished future holds for the cyclic garbage collector:
    fewer than the stdlib's (its Future with a Condition, RLock and two lists,
    11 objects on Python 3.11); ours: the future, the dict of what it made
    on first use, its condition, lock and their two queues (6)."""
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    ours = _tracked_per_finished_future(app, executor)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as raw:
        stdlib = _tracked_per_finished_future(app, raw)
    assert ours < stdlib, (ours, stdlib)


def test_finished_future_lets_go_of_its_task_and_keeps_the_app_for_late_callbacks(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """Once done, a future keeps its app (a callback added later runs in the
    app context), not its task: one object fewer per finished future kept by
    a caller, and no cyclic garbage collection needed to free the task."""
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    release = threading.Event()
    with without_cyclic_gc():
        with app.test_request_context("/?q=1"):
            blocker = executor.submit(_wait_for, release)
            future = executor.submit(_echo, "done")
            task = future._context
        assert isinstance(task, ThreadTask)
        assert sys.getrefcount(task) > 2  # also the future's (and the queue's)
        release.set()
        assert blocker.result(TIMEOUT) is True
        assert future.result(TIMEOUT) == "done"
        assert executor.submit(_echo, 1).result(TIMEOUT) == 1  # the worker dropped the task
        assert sys.getrefcount(task) == 2  # only this test's name and getrefcount's argument
        del task
        seen: list[tuple[str, bool]] = []
        future.add_done_callback(lambda f: seen.append((current_app.name, f is future)))
        assert seen == [(app.name, True)]
