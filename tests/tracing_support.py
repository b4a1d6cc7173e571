"""Worker side of the tracing tests: an app factory for process and Dask workers that
sets up a tracer provider in the worker process, whose exporter appends each finished
span as one JSON line to the file named by the task's ``TEST_SPAN_FILE`` config.

Spans end inside the task's rebuilt Flask context, and ``SimpleSpanProcessor`` exports
synchronously, so the line is written before the task's outcome is sent back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from flask import Flask, current_app, has_app_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from support import create_app as create_test_app

_lock = threading.Lock()
_configured = False


class FileSpanExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not has_app_context() or "TEST_SPAN_FILE" not in current_app.config:
            return SpanExportResult.FAILURE
        with _lock, open(current_app.config["TEST_SPAN_FILE"], "a") as out:
            for span in spans:
                out.write(span.to_json(indent=None) + "\n")
        return SpanExportResult.SUCCESS


def create_app() -> Flask:
    global _configured
    with _lock:
        if not _configured:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter()))
            trace.set_tracer_provider(provider)
            _configured = True
    return create_test_app()
