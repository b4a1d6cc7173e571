"""How the submitting context is copied into a task (``snapshot.py``, ``serialize.py``):
each task gets its own faithful copy of ``g`` and of the request body, taken once
(issue 13, "context size"). No assertion here is on a duration."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, g, request
from process_support import MakeProcessExecutor
from support import TIMEOUT

from flask_executor import Executor, GAttributeNotCopiedError
from flask_executor.serialize import deep_copy

PROCESS_TIMEOUT = 60.0

# -- thread: g copies ----------------------------------------------------------------


class Tagged(str):
    """A ``str`` subclass with attributes: not atomic, it must be copied."""

    note = ""


class Key:
    """A mutable, hashable dict key: deepcopy copies it, so must we."""

    def __init__(self) -> None:
        self.note = ""


def _mutate_g() -> dict[str, Any]:
    """Changes every kind of g value in place; none of it may reach the view or
    another task."""
    (key,) = g.keyed
    seen = {
        "flat": dict(g.flat),
        "nums": list(g.nums),
        "mixed": dict(g.mixed),
        "tagged": g.tagged["a"].note,
        "key": key.note,
    }
    g.flat["k0"] = "task"
    g.flat["new"] = "task"
    g.nums.append(-1)
    g.mixed["n"] = 99
    g.tagged["a"].note = "task"
    key.note = "task"
    return seen


def _wait_then_mutate(release: threading.Event) -> dict[str, Any]:
    if not release.wait(TIMEOUT):
        raise TimeoutError("the view never released the task")
    return _mutate_g()


def test_thread_g_copies_are_independent_of_the_view_and_of_each_other(
    app: Flask, shutdown_after: Callable[[Executor], Executor]
) -> None:
    """Plain dicts and lists of atomic values are copied shallowly (deepcopy's
    copy of them); a str subclass or a mutable key inside makes a deep copy."""
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=2)
    executor = shutdown_after(Executor(app))
    release = threading.Event()
    with app.test_request_context("/"):
        g.flat = {f"k{i}": f"v{i}" for i in range(1000)}
        g.nums = list(range(1000))
        g.mixed = {"s": "x", "n": 1, "f": 1.5, "b": True, "none": None, "raw": b"\x00"}
        g.tagged = {"a": Tagged("x"), "b": "y"}
        g.keyed = {Key(): 1}
        original = {
            "flat": dict(g.flat),
            "nums": list(g.nums),
            "mixed": dict(g.mixed),
            "tagged": "",
            "key": "",
        }
        waiting = executor.submit(_wait_then_mutate, release)
        assert executor.submit(_mutate_g).result(TIMEOUT) == original
        # What the first task changed reached neither the view nor the next task.
        (key,) = g.keyed
        assert (g.flat["k0"], "new" in g.flat, len(g.nums)) == ("v0", False, 1000)
        assert (g.mixed["n"], g.tagged["a"].note, key.note) == (1, "", "")
        assert executor.submit(_mutate_g).result(TIMEOUT) == original
        # Nor does what the view changes after submit() reach a task.
        g.flat["k1"] = "view"
        g.nums.append(-2)
        g.tagged["a"].note = "view"
        key.note = "view"
        release.set()
        assert waiting.result(TIMEOUT) == original


@pytest.mark.parametrize(
    "value",
    [
        [1, "a", None, 1.5, b"x", True, 2j],  # mixed atomic types
        {"a": 1, "b": "x", 3: None},
        ["a"] * 100,  # one type
        [],
    ],
    ids=["list-mixed", "dict-mixed", "list-one-type", "empty"],
)
def test_deep_copy_of_atomic_values_is_a_new_container_of_the_same_values(value: Any) -> None:
    """deepcopy's copy of a container of immutable values: a new container,
    the values themselves shared."""
    copied = deep_copy(value)
    assert copied == value and copied is not value
    if isinstance(value, dict):
        before, after = [*value, *value.values()], [*copied, *copied.values()]
    else:
        before, after = value, copied
    assert all(a is b for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    "value",
    [
        [1, "a", Tagged("x")],  # a str subclass is not atomic
        {"a": "x", "b": Tagged("y")},
        {Key(): "x"},  # nor a key of a class of its own
        ["a", ["nested"]],
        {"a": bytearray(b"mutable")},
    ],
    ids=["list-str-subclass", "dict-str-subclass", "dict-object-key", "nested", "bytearray"],
)
def test_deep_copy_copies_what_is_not_atomic(value: Any) -> None:
    copied = deep_copy(value)
    if isinstance(value, dict):  # the last key if it is an object, else the last value
        (key, inner), (key_copy, inner_copy) = list(value.items())[-1], list(copied.items())[-1]
        if isinstance(key, Key):
            inner, inner_copy = key, key_copy
    else:
        inner, inner_copy = value[-1], copied[-1]
    assert inner_copy is not inner and type(inner_copy) is type(inner)
    if not isinstance(inner, Key):
        assert inner_copy == inner


# -- process: the request body -------------------------------------------------------


def _read_body() -> dict[str, Any]:
    data = request.get_data()
    return {
        "data": hashlib.sha256(data).hexdigest(),
        "json": hashlib.sha256(json.dumps(request.get_json()).encode()).hexdigest(),
        "length": request.content_length,
        "stream": type(request.stream).__name__,
    }


def _json_body() -> bytes:
    return json.dumps([f"{i:08d}" * 6 for i in range(12000)]).encode()  # about 600 KB


@pytest.mark.parametrize("max_content_length", [None, 4 * 1024 * 1024])
def test_process_body_arrives_as_carried_not_reread_through_a_limited_stream(
    app: Flask, make_process_executor: MakeProcessExecutor, max_content_length: int | None
) -> None:
    """The worker's request body is the view's, byte for byte; without
    MAX_CONTENT_LENGTH, Werkzeug reads it as it is (the bytes that arrived)
    rather than copying it again through a LimitedStream, 64 KB at a time."""
    app.config["MAX_CONTENT_LENGTH"] = max_content_length
    executor = make_process_executor(app, None)
    body = _json_body()
    with app.test_request_context(
        "/path/1", method="POST", data=body, content_type="application/json"
    ):
        view_json = request.get_json()  # as a view would, before submit()
        result = executor.submit(_read_body).result(PROCESS_TIMEOUT)
        assert request.get_data() == body
    assert result["data"] == hashlib.sha256(body).hexdigest()
    assert result["json"] == hashlib.sha256(json.dumps(view_json).encode()).hexdigest()
    assert result["length"] == len(body)
    if max_content_length is None:
        assert result["stream"] == "BytesIO"
    else:  # Werkzeug enforces the limit in the task as in the view
        assert result["stream"] == "LimitedStream"


# -- process: g pickled once ---------------------------------------------------------

_reduced: list[int] = []


class Counted:
    """Counts how often it is pickled (in the web process, where submit() pickles)."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows

    def __reduce__(self) -> tuple[Any, ...]:
        _reduced.append(1)
        return Counted, (self.rows,)


def _read_g() -> tuple[list[int], str]:
    try:
        g.lock  # noqa: B018
    except GAttributeNotCopiedError as exc:
        return g.rows.rows, str(exc)
    return g.rows.rows, "g.lock arrived"


def test_process_g_value_is_pickled_once_beside_an_unpicklable_one(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    """An unpicklable g value (a lock, a connection) is left out where it is
    pickled; the rest of g is not pickled again because of it."""
    executor = make_process_executor(app, None)
    _reduced.clear()
    with app.test_request_context("/"):
        g.rows = Counted(list(range(100)))
        g.lock = threading.Lock()
        rows, error = executor.submit(_read_g).result(PROCESS_TIMEOUT)
    assert rows == list(range(100))
    assert "g.lock was not copied into this task" in error and "pickled" in error
    assert len(_reduced) == 1


_PLAIN_G = {
    "flat": {f"k{i}": f"v{i}" * 10 for i in range(2000)},
    "mixed": {"s": "x", "n": 1, "f": 1.5, "b": True, "none": None, "raw": b"\x00", "c": 2j, 3: "k"},
    "repeated": ["same"] * 3 + [1, 1.0, True],
    "nested": {"rows": [{"id": 1}, {"id": 2}], "pair": ("a", ["b"])},
}


def _plain_g_arrived() -> list[tuple[str, Any, list[str]]]:
    def types(value: Any) -> list[str]:
        items = [*value, *value.values()] if isinstance(value, dict) else list(value)
        return [type(item).__name__ for item in items]

    return [(name, getattr(g, name), types(getattr(g, name))) for name in _PLAIN_G]


def test_process_g_values_arrive_exactly(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    """Dicts and lists of plain values (pickled without the pickler's memo) and
    nested ones arrive equal, with the same types of keys and values."""
    executor = make_process_executor(app, None)
    with app.test_request_context("/"):
        for name, value in _PLAIN_G.items():
            setattr(g, name, value)
        arrived = executor.submit(_plain_g_arrived).result(PROCESS_TIMEOUT)
    assert [(name, value) for name, value, _ in arrived] == list(_PLAIN_G.items())
    for name, _, kinds in arrived:
        value = _PLAIN_G[name]
        items = [*value, *value.values()] if isinstance(value, dict) else list(value)
        assert kinds == [type(item).__name__ for item in items], name
