"""OpenTelemetry: with a tracer provider set, every task gets a span
``flask_executor.task <module.qualname>``, child of the span current at ``submit()``, in
every backend; errors are recorded on it. Without OpenTelemetry nothing is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.util._once import Once

from flask_executor import Executor

TESTS = Path(__file__).parent


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """This process's tracer provider, exporting to memory; removed afterwards so the
    other tests in this worker run without one (as OpenTelemetry's own test utilities
    reset the global)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]


def lookup(item_id: int) -> int:
    return item_id * 10


def broken(item_id: int) -> int:
    raise KeyError(f"no item {item_id}")


def in_span_of_task() -> tuple[str, str]:
    """Inside the task, the task's span is current."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# -- in this process: thread and immediate -------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"EXECUTOR_TYPE": "thread"},
        {"EXECUTOR_TYPE": "immediate"},
        {"EXECUTOR_TYPE": "immediate", "EXECUTOR_IMMEDIATE_PICKLE": True},
    ],
    ids=["thread", "immediate", "immediate-pickle"],
)
def test_task_span_is_a_child_of_the_submit_span(
    app: Flask,
    spans: InMemorySpanExporter,
    shutdown_after: Callable[[Executor], Executor],
    config: dict[str, Any],
) -> None:
    app.config.update({f"REPORTS_{key}": value for key, value in config.items()})
    executor = shutdown_after(Executor(app, name="reports"))
    tracer = trace.get_tracer("tests")
    with app.test_request_context("/"), tracer.start_as_current_span("GET /report") as parent:
        assert executor.submit_stored("r1", lookup, 4).result(timeout=10) == 40
        assert isinstance(executor.submit(broken, 5).exception(timeout=10), KeyError)
        inside = executor.submit(in_span_of_task).result(timeout=10)
    done = {span.name: span for span in spans.get_finished_spans()}
    ok = done[f"flask_executor.task {__name__}.lookup"]
    assert ok.parent is not None and ok.parent.span_id == parent.get_span_context().span_id
    assert ok.context.trace_id == parent.get_span_context().trace_id
    assert dict(ok.attributes or {}) == {
        "flask_executor.executor": "reports",
        "flask_executor.backend": config["EXECUTOR_TYPE"],
        "flask_executor.key": "r1",
    }
    assert ok.status.status_code is StatusCode.UNSET
    failed = done[f"flask_executor.task {__name__}.broken"]
    assert failed.parent is not None and failed.parent.span_id == parent.get_span_context().span_id
    assert failed.status.status_code is StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
    assert (failed.events[0].attributes or {})["exception.type"] == "KeyError"
    current = done[f"flask_executor.task {__name__}.in_span_of_task"]
    assert inside == (f"{current.context.trace_id:032x}", f"{current.context.span_id:016x}")


def test_a_job_with_retries_is_named_after_the_job(
    app: Flask, spans: InMemorySpanExporter, make_thread_executor: Any
) -> None:
    executor = make_thread_executor(app)
    job = executor.job(retries=1)(lookup)
    with app.app_context():
        assert job.submit(1).result(timeout=10) == 10
        assert list(executor.map(lookup, [1, 2])) == [10, 20]
    names = sorted(span.name for span in spans.get_finished_spans())
    assert names == [f"flask_executor.task {__name__}.lookup"] * 3


def test_no_provider_means_no_wrapping(app: Flask, make_thread_executor: Any) -> None:
    # The API is imported (by this module) but no provider is set: tasks run as before.
    from flask_executor.tracing import traced

    assert traced(lookup, "", "thread", None) is lookup
    with app.app_context():
        assert make_thread_executor(app).submit(lookup, 2).result(timeout=10) == 20


# -- across a process boundary: the worker's provider writes its spans to a file -----------


def _read_spans(path: Path) -> dict[str, dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return {span["name"]: span for span in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["process", "dask"])
def test_worker_span_is_a_child_of_the_submit_span(
    app: Flask,
    spans: InMemorySpanExporter,
    shutdown_after: Callable[[Executor], Executor],
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    span_file = tmp_path / "spans.jsonl"
    app.config.update(
        EXECUTOR_TYPE=backend,
        EXECUTOR_MAX_WORKERS=1,
        EXECUTOR_APP_FACTORY="tracing_support:create_app",
        TEST_SPAN_FILE=str(span_file),
    )
    if backend == "process":
        # Not fork: a forked worker would inherit this process's provider.
        app.config["EXECUTOR_START_METHOD"] = "forkserver"
    else:
        app.config["EXECUTOR_DASK_ADDRESS"] = request.getfixturevalue("dask_scheduler_address")
    executor = shutdown_after(Executor(app))
    tracer = trace.get_tracer("tests")
    with app.test_request_context("/"), tracer.start_as_current_span("POST /items") as parent:
        assert executor.submit_stored("item-3", lookup, 3).result(timeout=30) == 30
        assert isinstance(executor.submit(broken, 4).exception(timeout=30), KeyError)
        trace_id, span_id = executor.submit(in_span_of_task).result(timeout=30)
    submit = parent.get_span_context()
    worker_spans = _read_spans(span_file)
    ok = worker_spans[f"flask_executor.task {__name__}.lookup"]
    assert ok["parent_id"] == f"0x{submit.span_id:016x}"
    assert ok["context"]["trace_id"] == f"0x{submit.trace_id:032x}"
    assert ok["attributes"] == {
        "flask_executor.executor": "executor",
        "flask_executor.backend": backend,
        "flask_executor.key": "item-3",
    }
    failed = worker_spans[f"flask_executor.task {__name__}.broken"]
    assert failed["parent_id"] == f"0x{submit.span_id:016x}"
    assert failed["status"]["status_code"] == "ERROR"
    assert [event["name"] for event in failed["events"]] == ["exception"]
    assert failed["events"][0]["attributes"]["exception.type"] == "KeyError"
    current = worker_spans[f"flask_executor.task {__name__}.in_span_of_task"]
    assert current["context"] == {
        "trace_id": f"0x{trace_id}",
        "span_id": f"0x{span_id}",
        "trace_state": "[]",
    }
    # Those spans were made in the worker, not here.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("flask_executor")]


# -- without OpenTelemetry ------------------------------------------------------------------

_PROGRAM = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "blocked":
        sys.modules["opentelemetry"] = None  # as if not installed: importing it fails
    from flask import Flask
    from flask_executor import Executor

    def double(x):
        return 2 * x

    if __name__ == "__main__":
        for kind in ("thread", "process", "immediate"):
            app = Flask(__name__)
            app.config["EXECUTOR_TYPE"] = kind
            executor = Executor(app)
            with app.test_request_context("/"):
                assert executor.submit(double, 21).result(timeout=30) == 42, kind
            executor.shutdown()
        loaded = sorted(
            name for name, module in sys.modules.items()
            if name.startswith("opentelemetry") and module is not None
        )
        print("loaded:", loaded)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["blocked", "installed"])
def test_without_opentelemetry_nothing_is_imported(tmp_path: Path, how: str) -> None:
    script = tmp_path / "no_otel.py"
    script.write_text(_PROGRAM)
    result = subprocess.run(
        [sys.executable, str(script), how],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded: []"


async def async_lookup(item_id: int) -> int:
    return item_id * 100


def test_async_tasks_still_run_and_get_a_span(
    app: Flask, spans: InMemorySpanExporter, make_thread_executor: Any
) -> None:
    with app.app_context():
        assert make_thread_executor(app).submit(async_lookup, 2).result(timeout=10) == 200
    assert [span.name for span in spans.get_finished_spans()] == [
        f"flask_executor.task {__name__}.async_lookup"
    ]
