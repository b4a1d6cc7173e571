"""Performance properties that can be checked without timing (issue 13): what
a pending thread task costs the garbage collector, how ``g`` is copied, what
a process task sends down its pipe. No assertion here is on a duration."""

from __future__ import annotations

import collections
import copy
import functools
import gc
import multiprocessing
import os
import threading
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flask import Flask, g, request, session
from support import Gates, block_until, touch, wait_for_path

from flask_executor import Executor
from flask_executor.backends.process import default_start_method

#: A pending thread task costs the cyclic garbage collector no more objects
#: than the stdlib pool's work item and Future (12 on Python 3.11, 15 on 3.10):
#: its future makes its Condition and lists on first use, and the task is
#: also the queue's item and the future's callback context; what is left is
#: the snapshot and the request copy (8 in all on 3.11). It was 20, and with a
#: backlog of 20,000 tasks the collector's full passes dominated.
MAX_TRACKED_BEYOND_RAW = 0


def _read_context() -> tuple[str, Any]:
    return request.args["a"], g.user


def _tracked_per_pending_task(
    app: Flask,
    executor: Executor | ThreadPoolExecutor | ProcessPoolExecutor,
    block: Callable[[], Any],
    release: Callable[[], object],
    n: int = 500,
) -> float:
    """Objects of the cyclic garbage collector per task queued behind
    ``block()`` (run by the executor's only worker until ``release()``)."""
    with app.test_request_context("/?a=1"):
        g.user = "alice"
        blocker = executor.submit(block)
        try:
            executor.submit(_read_context)
            gc.collect()
            before = collections.Counter(map(type, gc.get_objects()))
            futures = [executor.submit(_read_context) for _ in range(n)]
            gc.collect()
            after = collections.Counter(map(type, gc.get_objects()))
        finally:
            release()
        assert blocker.result(60) is True
        if isinstance(executor, Executor):
            assert [f.result(60) for f in futures] == [("1", "alice")] * n
        else:  # no context: the task fails, which is not what is measured
            assert all(f.exception(60) is not None for f in futures)
    return sum((after - before).values()) / n


def _tracked_per_pending_thread_task(
    app: Flask, executor: Executor | ThreadPoolExecutor
) -> float:
    event = threading.Event()
    return _tracked_per_pending_task(app, executor, lambda: event.wait(30), event.set)


def test_pending_thread_task_is_few_gc_objects(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    per_task = _tracked_per_pending_thread_task(app, executor)
    with ThreadPoolExecutor(max_workers=1) as raw:  # its tasks fail: no context, same cost
        raw_per_task = _tracked_per_pending_thread_task(app, raw)
    assert per_task - raw_per_task <= MAX_TRACKED_BEYOND_RAW, (per_task, raw_per_task)


def _tracked_per_pending_process_task(
    app: Flask, executor: Executor | ProcessPoolExecutor, release: Path
) -> float:
    block = functools.partial(block_until, f"{release}.started", str(release), True)
    return _tracked_per_pending_task(app, executor, block, release.touch)


def test_pending_process_task_is_fewer_gc_objects_than_the_raw_pools(
    app: Flask, shutdown_after: Callable[[Executor], Executor], tmp_path: Path
) -> None:
    """A backlog of process tasks costs the collector about half the raw
    pool's objects (12 a task on 3.11): the future, its callback context, the
    queue's item (also the future's way to stop the task), the pickled call
    and the snapshot's two slotted objects. It was 11 (a partial and bound
    method per task, instance dicts made by pickling the snapshot), and the
    collector's passes took a tenth of a 10,000-task backlog. On Python 3.13
    it was 7: a slot on the future's base class kept the future's ``__dict__``
    a dict of its own (on 3.10 it always is one: 7 against the raw 15)."""
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    per_task = _tracked_per_pending_process_task(app, executor, tmp_path / "ours")
    context = multiprocessing.get_context(default_start_method())
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as raw:
        raw_per_task = _tracked_per_pending_process_task(app, raw, tmp_path / "raw")
    assert per_task <= raw_per_task - 5, (per_task, raw_per_task)


class _OwnCopy:
    """Defines its own deep copy: it must be used, as ``copy.deepcopy`` would."""

    def __init__(self) -> None:
        self.copied = False

    def __deepcopy__(self, memo: dict[int, Any]) -> _OwnCopy:
        twin = _OwnCopy()
        twin.copied = True
        return twin


def _g_copies() -> dict[str, Any]:
    data = g.data
    shared_kept = data["pair"][0] is data["pair"][1]
    data["rows"].append("from the task")  # must not reach the view's g
    g.flat["from"] = "the task"  # a dict of strings: copied shallowly, still a copy
    return {
        "rows": len(data["rows"]),
        "shared_kept": shared_kept,
        "own_copy": g.own.copied,
        "fn": data["fn"](2),
    }


def test_thread_g_is_copied_faithfully_without_deepcopy_for_plain_data(
    app: Flask, shutdown_after: Callable[[Executor], Executor], monkeypatch: Any
) -> None:
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    deepcopied: list[str] = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(value: Any, memo: Any = None) -> Any:
        if memo is None:  # a top-level call, not deepcopy's own recursion
            deepcopied.append(type(value).__name__)
        return real_deepcopy(value, memo)

    with app.test_request_context("/"):
        shared = ["x"]
        rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(5000)]
        g.plain = {"rows": rows}  # about 1 MB of plain data: copied by pickle
        g.data = {"rows": ["a", "b"], "pair": [shared, shared], "fn": lambda x: x * 21}
        g.own = _OwnCopy()
        g.flat = {f"k{i}": "v" * i for i in range(1000)}
        monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
        result = executor.submit(_g_copies).result(30)
        monkeypatch.undo()
        assert g.data["rows"] == ["a", "b"]
        assert "from" not in g.flat
    assert result == {"rows": 3, "shared_kept": True, "own_copy": True, "fn": 42}
    # Only the values pickle cannot copy faithfully went through deepcopy:
    # the lambda's dict and the object with its own __deepcopy__, not g.plain.
    assert sorted(deepcopied) == ["_OwnCopy", "dict"], deepcopied


def _same(data: bytes) -> bytes:
    return data


def test_process_large_argument_and_result_are_not_pickled_twice(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """The web process holds at most the raw pool's copies of a large argument
    and result: the payload it sends, then the bytes it receives and the
    result rebuilt from them (2), and nothing once the result is dropped."""
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    assert executor.submit(_same, b"up").result(60) == b"up"  # the worker is started
    size = 16 * 1024 * 1024
    data = b"x" * size
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = executor.submit(_same, data).result(60)
        peak = tracemalloc.get_traced_memory()[1] - base
        assert result == data
        del result
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert peak / size < 2.5, f"peak {peak / size:.2f} copies"
    assert held / size < 0.25, f"held {held / size:.2f} copies after del result"


class _FreedAfterGate:
    """A ``g`` value (or argument) whose copy in a worker is freed only once
    ``gate`` exists; the web process's own copy frees at once."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.home = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.home:
            wait_for_path(self.gate, 30)


def _read_g_value() -> str:
    return g.value.gate  # type: ignore[no-any-return]


def test_a_process_task_sends_its_result_before_freeing_its_g_and_arguments(
    app: Flask, shutdown_after: Callable[[Executor], Executor], gates: Gates
) -> None:
    """The standard pool drops a call after sending its result; the worker
    freed the task's ``g`` and arguments first, as its context was popped,
    so freeing a large ``g`` was part of every round trip (a dict of 10,000
    strings, 1 MB: 0.3 ms of ~9). Here a value that cannot be freed until the
    test opens a gate must not hold the result back."""
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    executor = shutdown_after(Executor(app))
    for where in ("g", "argument"):
        gate = gates.new()
        with app.test_request_context("/"):
            if where == "g":
                g.value = _FreedAfterGate(gate)
                future = executor.submit(_read_g_value)
            else:
                future = executor.submit(_same, _FreedAfterGate(gate))
        try:
            result = future.result(10)
        finally:
            touch(gate)
        assert (result if where == "g" else result.gate) == gate
    with app.app_context():  # the worker went on
        assert executor.submit(_same, 1).result(30) == 1


def _chunk_item(i: int) -> tuple[int, list[int], list[str], list[int]]:
    """Mutates in place what it was given of g, the request and the session:
    nothing of it may reach the next item of the same chunk."""
    g.rows.append(i)
    request.tags.append(f"t{i}")  # type: ignore[attr-defined]
    session["cart"].append(i)
    return i, list(g.rows), list(request.tags), list(session["cart"])  # type: ignore[attr-defined]


def test_chunk_items_get_their_own_context_without_deepcopying_the_snapshot(
    app: Flask, shutdown_after: Callable[[Executor], Executor], monkeypatch: Any
) -> None:
    """The items of one chunk share one snapshot: each gets fresh copies of
    what a task can change in place, not a deep copy of the whole snapshot
    (environ and all) per item."""
    from flask_executor.snapshot import Snapshot

    app.config.update(SECRET_KEY="test", EXECUTOR_TYPE="immediate", EXECUTOR_IMMEDIATE_PICKLE=True)
    executor = shutdown_after(Executor(app))
    deepcopied: list[type] = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(value: Any, memo: Any = None) -> Any:
        deepcopied.append(type(value))
        return real_deepcopy(value, memo)

    with app.test_request_context("/?x=1"):
        g.rows = [-1]
        request.tags = ["view"]  # type: ignore[attr-defined]
        session["cart"] = [0]
        monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
        results = list(executor.map(_chunk_item, range(6), chunksize=3, timeout=30))
        monkeypatch.undo()
        assert (g.rows, request.tags, session["cart"]) == ([-1], ["view"], [0])  # type: ignore[attr-defined]
    assert results == [(i, [-1, i], ["view", f"t{i}"], [0, i]) for i in range(6)]
    assert Snapshot not in deepcopied


def _square_in_request(i: int) -> tuple[int, str]:
    return i * i, request.args["x"]


def test_process_map_chunks_by_itself_unless_a_time_limit_applies(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    from flask_executor.signals import task_submitted

    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    app.config.update(LIMITED_EXECUTOR_TYPE="process", LIMITED_EXECUTOR_MAX_WORKERS=2)
    app.config.update(LIMITED_EXECUTOR_TASK_TIMEOUT=60)
    executors = [shutdown_after(Executor(app)), shutdown_after(Executor(app, name="limited"))]
    submitted: list[Any] = []

    def count(sender: Flask, **kw: Any) -> None:
        submitted.append(kw["future"])

    counts = []
    with task_submitted.connected_to(count, app), app.test_request_context("/?x=map"):
        for executor in executors:
            submitted.clear()
            results = list(executor.map(_square_in_request, range(200), timeout=60))
            assert results == [(i * i, "map") for i in range(200)]
            counts.append(len(submitted))
    assert counts == [8, 200]  # 4 chunks per worker; per item with a time limit


def test_process_map_makes_chunks_of_up_to_1024_items(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """A long map travels in chunks of 1,024 items, not fewer: each chunk
    costs about a millisecond of dispatch on these machines (measured, see
    MAX_AUTO_CHUNK), 4 us per item at 256 items a chunk."""
    from flask_executor.signals import task_submitted

    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    executor = shutdown_after(Executor(app))
    submitted: list[Any] = []

    def count(sender: Flask, **kw: Any) -> None:
        submitted.append(kw["future"])

    with task_submitted.connected_to(count, app), app.test_request_context("/?x=long"):
        results = list(executor.map(_square_in_request, range(20_000), timeout=60))
    assert results == [(i * i, "long") for i in range(20_000)]
    assert len(submitted) == 20  # 20,000 items / 1,024 a chunk, rounded up
