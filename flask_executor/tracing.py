"""OpenTelemetry spans for tasks, when the app uses OpenTelemetry.

Two hooks, one per side:

* :func:`traced` (submit side, in :meth:`~flask_executor.Executor.submit`):
  if a tracer provider is configured, wrap the callable in a
  :class:`TracedCall` that carries the trace context current at submit time
  as a W3C ``traceparent`` carrier (plain strings: it pickles with the call,
  into threads, process workers and Dask workers alike);
* :func:`task_span` (worker side, around the call, inside the rebuilt Flask
  context): a span ``flask_executor.task <module.qualname>``, child of the
  submitting span, that records the task's exception (status ``ERROR`` and an
  ``exception`` event).

Nothing here imports OpenTelemetry unless the app already did: without it
installed, or with no tracer provider set, :func:`traced` returns the
callable unchanged. A worker without ``opentelemetry-api`` runs the call
without a span. Spans are exported by the tracer provider of the process
they end in, so a process or Dask worker needs one too (set it up in
``EXECUTOR_APP_FACTORY`` or the worker's start-up code).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import current_app, has_app_context

__all__ = ["SPAN_NAME", "TracedCall", "task_span", "traced"]

#: The span name; the function's qualified name follows it.
SPAN_NAME = "flask_executor.task"


def traced(fn: Callable[..., Any], executor: str, backend: str, key: Hashable | None) -> Any:
    """``fn``, or ``fn`` wrapped with the current trace context when a tracer
    provider is configured. Called once per task, in the submitting thread."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # the app never imported OpenTelemetry
        return fn
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return fn  # no SDK provider set: spans would go nowhere
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    attributes = {
        "flask_executor.executor": executor or "executor",
        "flask_executor.backend": backend,
    }
    if key is not None:
        attributes["flask_executor.key"] = str(key)
    return TracedCall(fn, f"{SPAN_NAME} {_qualified_name(fn)}", carrier, attributes)


def _qualified_name(fn: Any) -> str:
    # A job with retries runs behind a wrapper that keeps the job as ``.job``.
    while isinstance(fn, functools.partial) or (
        not hasattr(fn, "__qualname__") and hasattr(fn, "job")
    ):
        fn = fn.func if isinstance(fn, functools.partial) else fn.job
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else qualname


class TracedCall:
    """A task's callable with the trace context of its submit (picklable
    whenever the callable is)."""

    __slots__ = ("fn", "name", "carrier", "attributes")

    def __init__(
        self, fn: Callable[..., Any], name: str, carrier: dict[str, str], attributes: dict[str, str]
    ) -> None:
        self.fn = fn
        self.name = name
        self.carrier = carrier
        self.attributes = attributes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.fn
        # The executor hands ``async def`` tasks to ensure_sync; it cannot see
        # through this wrapper, so do it here.
        if inspect.iscoroutinefunction(fn) and has_app_context():
            fn = current_app.ensure_sync(fn)
        with task_span(self.name, self.carrier, self.attributes):
            return fn(*args, **kwargs)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fn, self.name, self.carrier, self.attributes)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fn, self.name, self.carrier, self.attributes = state


@contextmanager
def task_span(name: str, carrier: dict[str, str], attributes: dict[str, str]) -> Iterator[None]:
    """Run the body in a span ``name``, child of the context in ``carrier``;
    an exception leaving the body is recorded on the span."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:  # a worker without opentelemetry-api: no span
        yield
        return
    parent = TraceContextTextMapPropagator().extract(carrier)
    tracer = trace.get_tracer("flask_executor")
    with tracer.start_as_current_span(name, context=parent, attributes=attributes):
        yield
