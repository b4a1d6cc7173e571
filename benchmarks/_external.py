"""The sections of ``bench.py`` that run other interpreters: cold start (5)
and Flask-Executor 1.0 (6)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from _timing import print_table

__all__ = ["compare_v1", "cold_start"]

HERE = os.path.dirname(os.path.abspath(__file__))

COLD_OURS = """
import time
t0 = time.perf_counter()
import json
from flask import Flask, g
from flask_executor import Executor
from _tasks import ctx_task
app = Flask("cold")
app.config.update(BENCH_KEY="bench-value", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
app.add_url_rule("/", "index", lambda: "ok")
executor = Executor(app)
with app.test_request_context("/?a=1"):
    g.user = "alice"
    result = executor.submit(ctx_task).result(60)
t1 = time.perf_counter()
executor.shutdown(wait=True)
assert tuple(result) == ("bench-value", "1", "alice"), result
print(json.dumps({"first_result": t1 - t0, "shutdown": time.perf_counter() - t1}))
"""

COLD_RAW = """
import time
t0 = time.perf_counter()
import json, multiprocessing
from concurrent.futures import ProcessPoolExecutor
import flask
from _tasks import raw_task
pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(%r))
result = pool.submit(raw_task).result(60)
t1 = time.perf_counter()
pool.shutdown(wait=True)
assert result == 42, result
print(json.dumps({"first_result": t1 - t0, "shutdown": time.perf_counter() - t1}))
"""


def _run_cold(script: str) -> dict[str, float]:
    import flask_executor

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(flask_executor.__file__)))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, package_root, *inherited]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start script failed ({proc.returncode}):\n{proc.stderr}")
    if proc.stderr.strip():
        print("  stderr of a cold-start run:\n" + proc.stderr)
    figures: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["wall"] = wall
    return figures


def cold_start(runs: int, method: str) -> dict[str, Any]:
    """Section 5: a fresh interpreter per run, raw and ours alternating."""
    scripts = {"raw": COLD_RAW % method, "ours": COLD_OURS}
    samples: dict[str, list[dict[str, float]]] = {"raw": [], "ours": []}
    for i in range(runs):
        for name in ("raw", "ours") if i % 2 == 0 else ("ours", "raw"):
            samples[name].append(_run_cold(scripts[name]))
    out: dict[str, Any] = {"start_method": method, "runs": samples}
    labels = {
        "raw": f"raw ProcessPoolExecutor(2) [{method}] + import flask",
        "ours": f"ours process(2) [{method}], ctx_task in request",
    }
    rows = []
    for name, label in labels.items():
        first = statistics.median(r["first_result"] for r in samples[name])
        wall = statistics.median(r["wall"] for r in samples[name])
        out[name] = {"first_result": first, "wall": wall}
        rows.append(
            [
                label,
                f"{first:.3f}",
                f"{wall:.3f}",
                f"{first / out['raw']['first_result']:.2f}x",
                f"{wall / out['raw']['wall']:.2f}x",
            ]
        )
    print(
        f"  a fresh `python -c` per run, median of {runs} runs each, in seconds. first result:"
        "\n  from the script's first line (before its imports) to the first result; wall: the"
        "\n  whole subprocess, interpreter start to exit"
    )
    print_table(["variant", "first result", "wall", "first vs raw", "wall vs raw"], rows)
    out["ratio"] = out["ours"]["first_result"] / out["raw"]["first_result"]
    out["wall_ratio"] = out["ours"]["wall"] / out["raw"]["wall"]
    return out


def compare_v1(python: str, quick: bool, results: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Section 6: run sections 1 and 2 of ``bench.py`` under ``python``, which
    has Flask-Executor 1.0 installed (PYTHONPATH unset, so this checkout is
    not importable there), and set its ratios beside this run's."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "v1.json")
        cmd = [python, os.path.join(HERE, "bench.py"), "--legacy-v1"]
        # The 20,000-task thread case of section throughput too, when this run has it.
        only = "thread,process" + (",throughput" if "throughput" in results else "")
        cmd += ["--only", only, "--json", out] + (["--quick"] if quick else [])
        print(f"  running: {' '.join(cmd)}\n  (PYTHONPATH unset, cwd {tmp})")
        proc = subprocess.run(
            cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout
        )
        for line in (proc.stdout + proc.stderr).rstrip().splitlines():
            print("  | " + line)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"the 1.0 run failed with exit code {proc.returncode}")
        with open(out) as f:
            v1: dict[str, Any] = json.load(f)
    module = v1["meta"]["flask_executor_file"]
    if module.startswith(os.path.dirname(HERE) + os.sep):
        raise RuntimeError(f"the 1.0 run imported this checkout's flask_executor ({module})")

    def fig(
        sections: dict[str, Any], name: str, block: str = "sequential", variant: str = "ours"
    ) -> str:
        try:
            figure = sections[name][block][variant]
        except (KeyError, TypeError):
            return "-"
        return f"{figure['ratio']:.2f}x (fast quarter {figure['q1_ratio']:.2f}x)"

    ours, old = results, v1["sections"]
    batch_n = (old.get("thread") or {}).get("batch_n", "?")
    methods = [(sections.get("process") or {}).get("start_method", "?") for sections in (ours, old)]
    rows = [
        ["thread, sequential, full context", fig(ours, "thread"), fig(old, "thread")],
        [f"thread, batch of {batch_n}", fig(ours, "thread", "batch"), fig(old, "thread", "batch")],
        [
            "process, sequential, 2.0 with full context, 1.0 none",
            fig(ours, "process"),
            fig(old, "process"),
        ],
        [
            "process, sequential, no context",
            fig(ours, "process", variant="plain"),
            fig(old, "process"),
        ],
        ["process start method", methods[0], methods[1]],
    ]
    print(
        "\n  each version against its own raw pool (1.0: flask-executor"
        f" {v1['meta']['flask_executor_version']}, {module})"
    )
    print_table(["figure", "2.0 (this run)", "1.0 (subprocess)"], rows)
    return {"v1": v1, **_thread_batch_vs_v1(ours, old)}


def _thread_batch_vs_v1(ours: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Section throughput's 20,000 submits then results, 2.0 against 1.0.
    The two ran in different interpreters, one after the other, so their
    rounds cannot interleave: both the time ratio (medians of each one's
    rounds) and the ratio of the ratios to each one's own raw pool, which
    cancels a change of load between the two runs, are given."""
    try:
        new_block = ours["throughput"]["thread_batch"]
        old_block = old["throughput"]["thread_batch"]
    except (KeyError, TypeError):
        return {}
    n = ours["throughput"].get("thread_batch_n", "?")

    def spread(figure: dict[str, Any]) -> str:
        rounds = figure["rounds"]
        return (
            f"{figure['median'] * 1e6:.1f} ({min(rounds) * 1e6:.1f}-{max(rounds) * 1e6:.1f},"
            f" {len(rounds)} rounds)"
        )

    time_ratio = new_block["ours"]["median"] / old_block["ours"]["median"]
    raw_ratios = new_block["ours"]["ratio"] / old_block["ours"]["ratio"]
    rows = [
        ["2.0, us/task (round medians)", spread(new_block["ours"])],
        ["1.0, us/task (round medians)", spread(old_block["ours"])],
        ["raw pool in 2.0's run, us/task", spread(new_block["raw"])],
        ["raw pool in 1.0's run, us/task", spread(old_block["raw"])],
        ["2.0 / 1.0, time", f"{time_ratio:.2f}x"],
        [
            "2.0 / 1.0, each against its own raw pool",
            f"{new_block['ours']['ratio']:.2f}x / {old_block['ours']['ratio']:.2f}x"
            f" = {raw_ratios:.2f}x",
        ],
    ]
    print(f"\n  thread: submit {n}, then every result (section throughput), 2.0 against 1.0")
    print_table(["figure", "value"], rows)
    return {
        "thread_batch_vs_v1": time_ratio,
        "thread_batch_vs_v1_raw_normalised": raw_ratios,
        "thread_batch_n": n,
    }
