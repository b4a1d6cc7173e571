from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from flask import Flask, has_app_context, has_request_context
from flask.ctx import AppContext, RequestContext
from flask.testing import FlaskClient
from process_support import START_METHODS, MakeProcessExecutor, process_config
from support import Gates, create_app

from flask_executor import Executor

#: The backends the contract tests (``make_executor``, ``executor``) run against. Append
#: "process-fork", "process-forkserver", "process-spawn" (or "dask") to run them there too;
#: ``backend_config`` maps each name to configuration.
BACKENDS = ["thread", "process-fork", "process-forkserver", "process-spawn", "dask"]


def backend_config(backend: str) -> dict[str, Any]:
    """The (unprefixed) config keys that select ``backend``.

    ``"process-<start method>"`` is a process pool with that start method. Process workers
    build the app with ``support.create_app`` so they have the same routes and teardown
    handlers as the test app; the snapshot's config is applied on top.
    """
    kind, _, start_method = backend.partition("-")
    if kind == "thread":
        return {"EXECUTOR_TYPE": "thread"}
    if kind == "process":
        return {
            "EXECUTOR_TYPE": "process",
            "EXECUTOR_START_METHOD": start_method,
            "EXECUTOR_APP_FACTORY": "support:create_app",
        }
    if kind == "dask":
        return {"EXECUTOR_TYPE": "dask", "EXECUTOR_APP_FACTORY": "support:create_app"}
    raise ValueError(f"unknown backend {backend!r}")


MakeExecutor = Callable[..., Executor]


@pytest.fixture(autouse=True)
def no_context_left_pushed() -> Iterator[None]:
    """Fail a test that leaves a Flask app or request context pushed.

    Autouse fixtures are set up first, so this check runs after every other fixture of
    the test (executors shut down, ``req_ctx`` popped).
    """
    yield
    leaked = has_app_context() or has_request_context()
    # Pop what was left so the next test in this worker starts clean.
    for _ in range(10):
        if has_request_context():
            flask.globals.request_ctx._get_current_object().pop()
        elif has_app_context():
            flask.globals.app_ctx._get_current_object().pop()
        else:
            break
    assert not leaked, "the test left a Flask app or request context pushed"


@pytest.fixture
def app() -> Flask:
    return create_app()


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[AppContext]:
    with app.app_context() as ctx:
        yield ctx


@pytest.fixture
def req_ctx(app: Flask) -> Iterator[RequestContext]:
    with app.test_request_context() as ctx:
        yield ctx


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def shutdown_after() -> Iterator[Callable[[Executor], Executor]]:
    """Register an executor to be shut down (``wait=True``) when the test ends."""
    executors: list[Executor] = []

    def register(executor: Executor) -> Executor:
        executors.append(executor)
        return executor

    yield register
    for executor in reversed(executors):
        executor.shutdown(wait=True)


def _executor_factory(
    backend: str, register: Callable[[Executor], Executor], extra: dict[str, Any] | None = None
) -> MakeExecutor:
    def make(app: Flask, name: str = "", **config: Any) -> Executor:
        prefix = f"{name.upper()}_" if name else ""
        for key, value in {**backend_config(backend), **(extra or {}), **config}.items():
            app.config[prefix + key] = value
        return register(Executor(app, name=name))

    return make


@pytest.fixture(params=BACKENDS)
def executor_type(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture(scope="session")
def dask_scheduler_address() -> Iterator[str]:
    """One real Dask cluster (two single-threaded worker processes on loopback) per test
    process, shared like a database server would be; each test makes its own executor
    (client) and shuts it down. The embedded-cluster path has tests of its own."""
    import distributed

    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        host="127.0.0.1",
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def make_executor(
    executor_type: str,
    shutdown_after: Callable[[Executor], Executor],
    request: pytest.FixtureRequest,
) -> MakeExecutor:
    """``make_executor(app, name="", **config)``: an Executor on the backend under test.

    ``config`` keys are given without the name prefix (``EXECUTOR_MAX_WORKERS=2``); for a
    named executor both they and the backend keys get the ``NAME_`` prefix. Every executor
    made here is shut down when the test ends.
    """
    extra = {}
    if executor_type == "dask":
        extra["EXECUTOR_DASK_ADDRESS"] = request.getfixturevalue("dask_scheduler_address")
    return _executor_factory(executor_type, shutdown_after, extra)


@pytest.fixture
def make_thread_executor(shutdown_after: Callable[[Executor], Executor]) -> MakeExecutor:
    """Like ``make_executor`` but always a thread pool, for tests that share in-memory
    objects (events, barriers, closures) with their tasks."""
    return _executor_factory("thread", shutdown_after)


@pytest.fixture
def executor(app: Flask, make_executor: MakeExecutor) -> Executor:
    return make_executor(app)


@pytest.fixture
def gates(tmp_path: Path, shutdown_after: Callable[[Executor], Executor]) -> Iterator[Gates]:
    # Depends on shutdown_after so that it is torn down (gates opened) before the
    # executors are shut down.
    gates = Gates(tmp_path)
    yield gates
    gates.open_all()


@pytest.fixture(params=START_METHODS)
def start_method(request: pytest.FixtureRequest) -> str:
    """Each process start method in turn: fork, forkserver, spawn."""
    method: str = request.param
    return method


@pytest.fixture
def make_process_executor(
    shutdown_after: Callable[[Executor], Executor],
) -> MakeProcessExecutor:
    """``make(app, start_method, **config)``: a process executor of two workers, shut
    down after the test.

    No ``EXECUTOR_APP_FACTORY`` unless given: workers use the stand-in app built from the
    app spec (or, under fork, the app they inherited).
    """

    def make(app: Flask, start_method: str | None, **config: Any) -> Executor:
        app.config.update(process_config(start_method, **config))
        return shutdown_after(Executor(app))

    return make
