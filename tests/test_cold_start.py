"""Cold start (issue 13): what importing flask-executor loads, and what a process
worker has imported before its first task. Behaviour only: nothing here is timed (the
figures are ``benchmarks/bench.py --only cold``)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from cold_support import loaded_modules, modules_since_init
from flask import Flask, g
from process_support import MakeProcessExecutor

import flask_executor
from flask_executor.backends._start import FORK_SERVER_PRELOAD, preload_fork_server

#: Seconds any wait for a task's result may take.
WAIT = 30

#: Loaded only when a feature that needs it is used: optional dependencies, the
#: stores and backends not configured, the dashboard, the CLI.
OPTIONAL = [
    # cloudpickle: only for what the standard pickler cannot pickle (a lambda)
    "cloudpickle",
    "dask",
    "distributed",
    "redis",
    "sqlite3",
    "opentelemetry",
    "tblib",
    "flask_executor.backends.dask",
    "flask_executor.backends.process",
    # (not backends.thread: the default backend, whose task type the front builds)
    "flask_executor.cli",
    "flask_executor.dashboard",
    "flask_executor.stores.redis",
    "flask_executor.stores.sqlite",
]
#: The extension front: the web process runs it, a worker never does.
WEB_SIDE = [
    "flask_executor.executor",
    "flask_executor.jobs",
    "flask_executor.settings",
    "flask_executor.signals",
    "flask_executor.status",
    "flask_executor.tracing",
    "flask_executor.dashboard",
    "flask_executor.cli",
    # the futures and their stores: a worker completes no future
    "flask_executor.futures",
    "flask_executor.stores",
]


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=WAIT
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def _under(modules: set[str], names: list[str]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_importing_the_extension_loads_no_optional_part() -> None:
    modules = _modules_after("from flask_executor import Executor")
    assert "flask_executor.executor" in modules
    assert _under(modules, OPTIONAL) == []


#: Loaded in the web process only for a feature that needs it, also once an app is
#: set up and has run a process task: the task jobs, the status endpoint, the
#: dashboard (the CLI is registered, but the dashboard's model only loads when a
#: command runs), and cloudpickle (the config holds nothing the standard pickler
#: cannot check).
NOT_FOR_A_FIRST_TASK = [
    "cloudpickle",
    "flask_executor.dashboard",
    "flask_executor.jobs",
    "flask_executor.status",
]


def test_a_first_process_task_loads_only_what_it_needs_in_the_web_process() -> None:
    modules = _modules_after(
        "from flask import Flask, g\n"
        "from flask_executor import Executor\n"
        "app = Flask('cold')\n"
        "app.config.update(EXECUTOR_TYPE='process', EXECUTOR_MAX_WORKERS=1)\n"
        "executor = Executor(app)\n"
        "with app.test_request_context('/?a=1'):\n"
        "    g.user = 'alice'\n"
        "    assert executor.submit(len, 'abc').result(30) == 3\n"
        "executor.shutdown()"
    )
    assert {"flask_executor.backends.process", "flask_executor.cli"} <= modules
    assert _under(modules, NOT_FOR_A_FIRST_TASK) == []


def test_importing_the_package_loads_no_front() -> None:
    """``import flask_executor`` (or any submodule) imports a public name's module
    only when the name is used."""
    modules = _modules_after("import flask_executor")
    assert _under(modules, WEB_SIDE) == []
    assert "flask_executor.errors" in modules  # cheap, and workers need it anyway


def test_the_fork_server_preloads_the_worker_side_only() -> None:
    modules = _modules_after(
        "import importlib\nfrom flask_executor.backends._start import FORK_SERVER_PRELOAD\n"
        "for name in FORK_SERVER_PRELOAD:\n    importlib.import_module(name)"
    )
    assert {"flask", "flask_executor.backends._worker"} <= modules
    assert _under(modules, WEB_SIDE + OPTIONAL) == []


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_worker_never_imports_the_front(
    app: Flask, make_process_executor: MakeProcessExecutor, start_method: str
) -> None:
    """A forkserver or spawn worker (a fork worker is a copy of the web process)
    runs context tasks with the worker side of the package alone (what it
    imports before a task is checked by the next test)."""
    executor = make_process_executor(app, start_method)
    with app.test_request_context("/?a=1"):
        g.user = "alice"
        modules = set(executor.submit(loaded_modules).result(WAIT))
    assert "flask_executor.backends._worker" in modules
    assert _under(modules, WEB_SIDE) == []


def test_a_forkserver_worker_imports_nothing_for_its_first_request(
    app: Flask, make_process_executor: MakeProcessExecutor
) -> None:
    """What rebuilding the first request needs was preloaded by the fork server:
    the worker imports nothing between its initializer and its first task's result
    (before, the codec Werkzeug loads for the request's host)."""
    executor = make_process_executor(
        app, "forkserver", EXECUTOR_WORKER_INIT="cold_support:record_modules",
        EXECUTOR_MAX_WORKERS=1,
    )  # fmt: skip
    with app.test_request_context("/?a=1"):
        g.user = "alice"
        assert executor.submit(modules_since_init).result(WAIT) == []


class _Context:
    def __init__(self, method: str) -> None:
        self.method = method
        self.preload: list[str] | None = None

    def get_start_method(self) -> str:
        return self.method

    def set_forkserver_preload(self, names: list[str]) -> None:
        self.preload = names


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_preload_is_set_for_the_fork_server_only(method: str) -> None:
    context = _Context(method)
    preload_fork_server(context)
    expected = list(FORK_SERVER_PRELOAD) if method == "forkserver" else None
    assert context.preload == expected


def test_public_names_stay_reachable_in_every_way() -> None:
    """Lazy names still behave as attributes: ``dir``, ``from ... import *``, the
    1.0 paths after a bare ``import flask_executor``, and unknown names fail."""
    assert set(flask_executor.__all__) <= set(dir(flask_executor))
    namespace: dict[str, Any] = {}
    exec("from flask_executor import *", namespace)
    assert set(flask_executor.__all__) <= set(namespace)
    assert namespace["Executor"] is flask_executor.executor.Executor
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        flask_executor.Nope  # noqa: B018
    code = (
        "import flask_executor\n"
        "assert flask_executor.futures.FutureCollection.__name__ == 'FutureCollection'\n"
        "assert callable(flask_executor.executor.propagate_exceptions_callback)\n"
        "assert flask_executor.Executor is flask_executor.executor.Executor"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=WAIT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
