"""Task functions for ``bench.py``.

They live in their own importable module (not in ``bench.py``, which is
``__main__``) so that both the raw :mod:`concurrent.futures` pools and
flask-executor pickle them *by reference*: the same bytes travel either way,
and the measured difference is the cost of carrying the Flask context.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request

__all__ = [
    "body_task",
    "ctx_fib",
    "ctx_task",
    "fib",
    "floor_fib",
    "floor_task",
    "given",
    "identity",
    "raw_task",
    "small_g_task",
]

RAW_RESULT = 42


def raw_task() -> int:
    """The baseline: no Flask context needed, returns a constant."""
    return RAW_RESULT


def ctx_task() -> tuple[str, str, str]:
    """Reads the app config, the request and ``g``: fails without a context."""
    return current_app.config["BENCH_KEY"], request.args["a"], g.user


_floor_apps: dict[str, Flask] = {}


def _floor_app() -> Flask:
    """The app a raw pool's worker builds once for the floor tasks."""
    app = _floor_apps.get("app")
    if app is None:
        app = _floor_apps["app"] = Flask("bench_floor")
        app.config["BENCH_KEY"] = "bench-value"
        app.add_url_rule("/", "index", lambda: "")
    return app


def floor_task(environ: dict[str, Any], app: Flask | None = None) -> tuple[str, str, str]:
    """The floor: what giving a task its own request context costs in Flask
    itself, with public APIs only (``app.request_context`` on a copy of the
    environ, then ``g``), and no executor. Run in a raw pool; in a process
    pool the worker builds its app once."""
    with (app or _floor_app()).request_context(dict(environ)):
        g.user = "alice"
        return ctx_task()


def floor_item(environ: dict[str, Any], item: Any) -> Any:
    """The floor of one ``map`` item run in its own context: what
    :func:`floor_task` builds (an app once per worker, a request context from a
    copy of the environ, ``g``), around :func:`identity`."""
    with _floor_app().request_context(dict(environ)):
        g.user = "alice"
        return identity(item)


def floor_fib(environ: dict[str, Any], n: int) -> int:
    """The floor of a CPU-bound context task: :func:`ctx_fib` in the request
    context :func:`floor_task` builds."""
    with _floor_app().request_context(dict(environ)):
        g.user = "alice"
        return ctx_fib(n)


def fib(n: int) -> int:
    """Plain recursive Fibonacci: CPU-bound work that holds the GIL."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def ctx_fib(n: int) -> int:
    """:func:`fib` after touching ``g`` and ``request`` (a context is required)."""
    if not g.user or "a" not in request.args:
        raise RuntimeError("the task did not get its request context")
    return fib(n)


def identity(x: Any) -> Any:
    """A trivial task for ``map`` and for large round trips: returns its argument."""
    return x


def small_g_task() -> bool:
    """Reads ``g.payload`` (a small string or a large dict): a context is required."""
    return g.payload is not None


def small_g_task_given(value: object) -> bool:
    """:func:`small_g_task`, handed ``value`` (dropped with the task, in its thread)."""
    return small_g_task()


def body_task() -> int:
    """Reads the request body (``request.get_data()``, not parsed: parsing it
    would time the JSON parser): its length. A request context is required."""
    return len(request.get_data())


def given(value: Any) -> bool:
    """Takes one argument and returns a bool: a raw pool moving a large value
    to a worker, and only that."""
    return value is not None
