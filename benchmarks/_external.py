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

from _timing import lower_quartile, print_table

__all__ = ["compare_v1", "cold_start"]

HERE = os.path.dirname(os.path.abspath(__file__))

COLD_OURS = """
import time
t0 = time.perf_counter()
import json
from flask import Flask, g
from flask_executor import Executor
from _tasks import ctx_task
t_imported = time.perf_counter()
app = Flask("cold")
app.config.update(BENCH_KEY="bench-value", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
app.add_url_rule("/", "index", lambda: "ok")
executor = Executor(app)
with app.test_request_context("/?a=1"):
    g.user = "alice"
    future = executor.submit(ctx_task)
    t_submitted = time.perf_counter()
    result = future.result(60)
t1 = time.perf_counter()
executor.shutdown(wait=True)
assert tuple(result) == ("bench-value", "1", "alice"), result
print(json.dumps({"first_result": t1 - t0, "imports": t_imported - t0,
                  "submitted": t_submitted - t0, "shutdown": time.perf_counter() - t1}))
"""

def _raw_pool_script(task: str, setup: str, call: str, check: str) -> str:
    """A cold-start script for the raw pool (``%r``: the start method, filled
    in later): import ``task``, run ``setup``, submit ``call``, ``check`` its
    result."""
    return f"""
import time
t0 = time.perf_counter()
import json, multiprocessing
from concurrent.futures import ProcessPoolExecutor
import flask
from _tasks import {task}
t_imported = time.perf_counter()
{setup}pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(%r))
future = pool.submit({call})
t_submitted = time.perf_counter()
result = future.result(60)
t1 = time.perf_counter()
pool.shutdown(wait=True)
assert {check}, result
print(json.dumps({{"first_result": t1 - t0, "imports": t_imported - t0,
                  "submitted": t_submitted - t0, "shutdown": time.perf_counter() - t1}}))
"""


COLD_RAW = _raw_pool_script("raw_task", "", "raw_task", "result == 42")

#: Flask's own floor of a first context task: the raw pool, its worker building
#: an app and a request context from the environ (public APIs only).
COLD_FLOOR = _raw_pool_script(
    "floor_task",
    """app = flask.Flask("cold")
app.add_url_rule("/", "index", lambda: "ok")
with app.test_request_context("/?a=1"):
    environ = {k: v for k, v in flask.request.environ.items()
               if isinstance(v, (str, int, bool, tuple))}
""",
    "floor_task, environ",
    'tuple(result) == ("bench-value", "1", "alice")',
)


def _run_cold(script: str, pycache: str) -> dict[str, float]:
    """One cold run of ``script``; every interpreter it starts (the fork
    server, spawned workers) reads and writes bytecode under ``pycache``."""
    import flask_executor

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(flask_executor.__file__)))
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, package_root, *inherited]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = pycache
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
    """Section 5: a fresh interpreter per run, raw and ours alternating.

    Bytecode is cached, as in an installed package (pip compiles a wheel's
    modules): an editable checkout run with ``PYTHONDONTWRITEBYTECODE`` would
    otherwise compile this package from source in every interpreter, the web
    process and the fork server, and the figure would measure the compiler.
    The cache is a fresh directory (``PYTHONPYCACHEPREFIX``) filled by one
    untimed run of each variant, so nothing is written into the checkout.
    """
    scripts = {"raw": COLD_RAW % method, "floor": COLD_FLOOR % method, "ours": COLD_OURS}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in scripts}
    order = list(scripts)
    with tempfile.TemporaryDirectory(prefix="bench-pycache-") as pycache:
        for name in order:
            _run_cold(scripts[name], pycache)  # fills the bytecode cache
        for i in range(runs):
            for name in order if i % 2 == 0 else order[::-1]:
                samples[name].append(_run_cold(scripts[name], pycache))
    out: dict[str, Any] = {"start_method": method, "runs": samples}
    labels = {
        "raw": f"raw ProcessPoolExecutor(2) [{method}] + import flask",
        "floor": "raw pool, worker builds app + request context (floor)",
        "ours": f"ours process(2) [{method}], ctx_task in request",
    }
    rows = []
    for name, label in labels.items():
        figures = {
            key: statistics.median(r[key] for r in samples[name])
            for key in ("first_result", "imports", "submitted", "wall")
        }
        first = figures["first_result"]
        firsts = sorted(r["first_result"] for r in samples[name])
        out[name] = {**figures, "min": firsts[0], "max": firsts[-1]}
        rows.append(
            [
                label,
                f"{figures['imports']:.3f}",
                f"{figures['submitted'] - figures['imports']:.3f}",
                f"{first - figures['submitted']:.3f}",
                f"{first:.3f} ({firsts[0]:.3f}-{firsts[-1]:.3f})",
                f"{figures['wall']:.3f}",
                f"{first / out['raw']['first_result']:.2f}x",
                f"{figures['wall'] / out['raw']['wall']:.2f}x",
            ]
        )
    print(
        f"  a fresh `python -c` per run, median of {runs} runs each (range in brackets), in"
        "\n  seconds, bytecode cached. imports: the script's first line to its imports done;"
        "\n  submit: from there to submit() returned (app, executor, pool); to result: from"
        "\n  there to the first result (the pool's processes start); first result: the sum;"
        "\n  wall: the whole subprocess, interpreter start to exit"
    )
    print_table(
        ["variant", "imports", "submit", "to result", "first result", "wall",
         "first vs raw", "wall vs raw"],
        rows,
    )  # fmt: skip
    out["ratio"] = out["ours"]["first_result"] / out["raw"]["first_result"]
    out["floor_ratio"] = out["floor"]["first_result"] / out["raw"]["first_result"]
    out["wall_ratio"] = out["ours"]["wall"] / out["raw"]["wall"]
    return out


def _run_bench(
    python: str, args: list[str], timeout: float, legacy: bool, echo: bool = True
) -> dict[str, Any]:
    """Run ``bench.py ARGS`` under ``python`` in another working directory and
    return its JSON report. ``legacy``: ``python`` has Flask-Executor 1.0
    (``--legacy-v1``, PYTHONPATH unset so this checkout is not importable
    there); else this checkout's flask_executor is put on PYTHONPATH."""
    if legacy:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        args = ["--legacy-v1", *args]
    else:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, _package_root()]))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [python, os.path.join(HERE, "bench.py"), *args, "--json", out]
        if echo:
            path = "unset" if legacy else env["PYTHONPATH"]
            print(f"  running: {' '.join(cmd)}\n  (PYTHONPATH {path}, cwd {tmp})")
        proc = subprocess.run(
            cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout
        )
        if echo or proc.returncode != 0:
            for line in (proc.stdout + proc.stderr).rstrip().splitlines():
                print("  | " + line)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
        with open(out) as f:
            report: dict[str, Any] = json.load(f)
    module = report["meta"]["flask_executor_file"]
    if legacy == module.startswith(_package_root() + os.sep):
        which = "this checkout's" if legacy else "another"
        raise RuntimeError(f"the run under {python} imported {which} flask_executor ({module})")
    return report


def _package_root() -> str:
    import flask_executor

    return os.path.dirname(os.path.dirname(os.path.abspath(flask_executor.__file__)))


def compare_v1(python: str, quick: bool, results: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Section 6: run sections 1 and 2 of ``bench.py`` under ``python``, which
    has Flask-Executor 1.0 installed, and set its ratios beside this run's;
    when this run has section throughput, also its 20,000 submits then
    results, 2.0 and 1.0 alternating (see :func:`_thread_batch_vs_v1`)."""
    quick_arg = ["--quick"] if quick else []
    v1 = _run_bench(python, ["--only", "thread,process", *quick_arg], timeout, legacy=True)
    module = v1["meta"]["flask_executor_file"]

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
    out: dict[str, Any] = {"v1": v1}
    if "throughput" in results:
        out.update(_thread_batch_vs_v1(python, quick, timeout))
    return out


#: Alternations of one round of 2.0 and one round of 1.0 (a fresh 1.0 interpreter each).
V1_BATCH_ROUNDS = 5


def _thread_batch_vs_v1(python: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Section throughput's 20,000 submits then results, 2.0 against 1.0.
    Two interpreters cannot interleave short rounds, so whole rounds
    alternate, each in a fresh interpreter running only that round (its raw
    pool, then the version's executor): 2.0 under this interpreter, 1.0 under
    ``python``, the order swapping every time, so that a change of load hits
    both alike and neither runs with more of a heap left by other sections
    (a full pass of the garbage collector walks the whole heap). Given: each
    version's median and range of round medians, the time ratio of the
    medians (the summary's target), the median and range of the ratios of
    neighbouring rounds, and the ratio of each version's ratio to its own raw
    pool."""
    rounds = 1 if quick else V1_BATCH_ROUNDS
    args = ["--only", "throughput", "--thread-batch-round"] + (["--quick"] if quick else [])
    samples: dict[str, list[float]] = {"ours": [], "ours_raw": [], "v1": [], "v1_raw": []}
    n: Any = "?"

    def run(version: str) -> None:
        nonlocal n
        legacy = version == "v1"
        report = _run_bench(python if legacy else sys.executable, args, timeout, legacy, False)
        section = report["sections"]["throughput"]
        samples[version] += section["thread_batch"]["ours"]["rounds"]
        samples[f"{version}_raw"] += section["thread_batch"]["raw"]["rounds"]
        n = section.get("thread_batch_n", "?")

    print(
        f"\n  thread: submit N, then every result; {rounds} alternations of one round each,"
        " each in a fresh interpreter"
    )
    for i in range(rounds):
        for version in ("ours", "v1") if i % 2 == 0 else ("v1", "ours"):
            run(version)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    paired = [a / b for a, b in zip(samples["ours"], samples["v1"], strict=True)]
    time_ratio = medians["ours"] / medians["v1"]
    own = {
        version: statistics.median(
            a / b for a, b in zip(samples[version], samples[f"{version}_raw"], strict=True)
        )
        for version in ("ours", "v1")
    }
    fast = lower_quartile(samples["ours"]) / lower_quartile(samples["v1"])

    def spread(name: str) -> str:
        values = samples[name]
        return f"{medians[name] * 1e6:.1f} ({min(values) * 1e6:.1f}-{max(values) * 1e6:.1f})"

    rows = [
        ["2.0, us/task (round medians)", spread("ours")],
        ["1.0, us/task (round medians)", spread("v1")],
        ["raw pool next to 2.0, us/task", spread("ours_raw")],
        ["raw pool next to 1.0, us/task", spread("v1_raw")],
        ["2.0 / 1.0, time", f"{time_ratio:.2f}x"],
        [
            "2.0 / 1.0, round by round",
            f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})",
        ],
        ["2.0 / 1.0, fast quarter", f"{fast:.2f}x"],
        [
            "2.0 / 1.0, each against its own raw pool",
            f"{own['ours']:.2f}x / {own['v1']:.2f}x = {own['ours'] / own['v1']:.2f}x",
        ],
    ]
    print(f"  (N = {n}; 1.0: {python})")
    print_table(["figure", "value"], rows)
    return {
        "thread_batch_v1": {
            "samples": samples,
            "ours": {"paired_median": statistics.median(paired), "q1_ratio": fast},
        },
        "thread_batch_vs_v1": time_ratio,
        "thread_batch_vs_v1_raw_normalised": own["ours"] / own["v1"],
        "thread_batch_n": n,
    }
