"""Section 7 of ``bench.py``: a large upload passed to a process task.

What it costs the *web process* in memory, as a multiple of the upload's size
(the peak of :mod:`tracemalloc` from ``submit()`` to the result), and the time until the
worker has read it, against a raw :class:`~concurrent.futures.ProcessPoolExecutor`
given the upload's bytes (what a view without flask-executor would pass).
Target: at most one copy (flask-executor sends uploads over 1 MiB to process
workers as a temporary file, so it should be far below).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import multiprocessing
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from _timing import RESULT_TIMEOUT

MiB = 1024 * 1024


def upload_digest(upload: Any) -> str:
    """The task: read the upload (a FileStorage, or bytes for the raw pool)."""
    data = upload if isinstance(upload, bytes) else upload.read()
    return hashlib.sha256(data).hexdigest()


def _raw_submit(raw: ProcessPoolExecutor, upload: Any) -> Future[str]:
    """Without flask-executor a view reads the upload and passes its bytes."""
    return raw.submit(upload_digest, upload.read())


def _measure(submit: Callable[[], Future[str]], expected: str) -> tuple[float, float]:
    """``(peak extra bytes from submit to result, seconds until the result)``."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        start = time.perf_counter()
        result = submit().result(RESULT_TIMEOUT)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if result != expected:
        raise AssertionError("the worker read a different upload")
    return peak - base, elapsed


def section_upload(plan: Any, make_app: Callable[..., Any], method: str) -> dict[str, Any]:
    from flask import request

    from flask_executor import Executor

    size = (20 if plan.quick else 100) * MiB
    runs = 2 if plan.quick else 3
    content = os.urandom(MiB) * (size // MiB)
    expected = hashlib.sha256(content).hexdigest()
    app = make_app("bench_upload", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    ours = Executor(app)
    raw = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method))
    figures: dict[str, list[tuple[float, float]]] = {"raw": [], "ours": []}
    try:
        with app.app_context():
            ours.submit(len, b"").result(RESULT_TIMEOUT)  # workers up
        raw.submit(len, b"").result(RESULT_TIMEOUT)
        for _ in range(runs):
            with app.test_request_context(
                "/", method="POST", data={"file": (io.BytesIO(content), "big.bin")}
            ):
                upload = request.files["file"]  # spooled to a temporary file by Werkzeug
                figures["ours"].append(
                    _measure(functools.partial(ours.submit, upload_digest, upload), expected)
                )
                upload.stream.seek(0)
                raw_submit = functools.partial(_raw_submit, raw, upload)
                figures["raw"].append(_measure(raw_submit, expected))
                request.environ["wsgi.input"].close()
    finally:
        ours.shutdown(wait=True)
        raw.shutdown(wait=True)
    rows = {}
    print(f"  a {size // MiB} MiB upload passed to a process task, {runs} runs, medians")
    print(f"  {'variant':<52} {'web-process peak':>18} {'copies':>7} {'seconds':>8}")
    for name, label in (
        ("raw", "raw ProcessPoolExecutor(1), the upload's bytes"),
        ("ours", "ours process(1), the FileStorage"),
    ):
        peak = statistics.median(p for p, _ in figures[name])
        seconds = statistics.median(s for _, s in figures[name])
        rows[name] = {"peak_bytes": peak, "copies": peak / size, "seconds": seconds}
        print(f"  {label:<52} {peak / MiB:>14.1f} MiB {peak / size:>7.2f} {seconds:>8.2f}")
    return {
        "size": size,
        "variants": rows,
        "copies": rows["ours"]["copies"],
        "time_ratio": rows["ours"]["seconds"] / rows["raw"]["seconds"],
    }
