"""Benchmarks: flask-executor against the raw concurrent.futures pools.

Run from the project root::

    python benchmarks/bench.py [--quick] [--only thread,process,config,cpu,cold]
                               [--json out.json] [--compare-1.0 PYTHON]

Every figure with a target is a *ratio* against the raw pool of the same kind
measured in the same run, the variants interleaved in short rounds (see
``_timing.py``) so that machine noise cancels out. See ``README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import flask
from _dask import section_dask
from _external import cold_start, compare_v1
from _goals import goal_lines
from _load import section_load
from _store import section_store
from _tasks import RAW_RESULT, ctx_fib, ctx_task, fib, floor_fib, floor_task, raw_task
from _throughput import floor_environ, section_throughput
from _timing import RESULT_TIMEOUT, Runner, batch, interleave, print_table, ratio_block, round_trips
from _upload import section_upload

SECTIONS = (
    "thread", "process", "config", "cpu", "cold", "dask", "store", "upload", "throughput",
    "load",
)  # fmt: skip
TITLES = {
    "thread": "1. thread pool: full context vs raw ThreadPoolExecutor",
    "process": "2. process pool: full context vs raw ProcessPoolExecutor",
    "config": "3. per-task cost vs config size (process)",
    "cpu": "4. CPU-bound scaling (process)",
    "cold": "5. cold start (process)",
    "dask": "6. Dask: ours vs raw client.submit / client.map on the same cluster",
    "compare": "7. Flask-Executor 1.0, each version against its own raw pool",
    "store": "8. task stores: submit_stored + poll + pop per task, vs the memory store",
    "upload": "9. a large upload passed to a process task: web-process memory",
    "throughput": "10. throughput: many tasks, map, large values, a large g",
    "load": "11. process pool under a backlog: submit 10,000, then wait",
}
CTX_RESULT = ("bench-value", "1", "alice")
#: A section running longer than this is taken for a hang: every thread's
#: stack is dumped to stderr and the benchmark exits.
WATCHDOG_SECONDS = 300


@dataclass(frozen=True)
class Plan:
    """How much work each section does; the defaults are the full run."""

    quick: bool = False
    legacy: bool = False  # running under Flask-Executor 1.0 (the --compare-1.0 subprocess)
    # Many short rounds: the shorter a round, the more alike the load that
    # neighbouring variants see.
    rounds: int = 60  # interleaved rounds of sections 1-3
    thread_n: int = 100  # round trips per round
    batch_n: int = 2000  # tasks per batch
    batch_rounds: int = 9
    process_n: int = 80
    config_n: int = 80
    fib_n: int = 27
    fib_tasks: int = 64
    cpu_rounds: int = 5  # fib: ours and the raw pool within a few % of each other
    cold_runs: int = 9  # the noisiest figure: fresh interpreters, about 7 s
    thread_batch_rounds: int = 5  # section throughput: 20,000 submits then results
    thread_batch_only: bool = False  # section throughput: only that (implied by legacy)

    @classmethod
    def make(cls, quick: bool, legacy: bool = False) -> Plan:
        plan = cls(legacy=legacy)
        if not quick:
            return plan
        return replace(
            plan, quick=True, rounds=15, thread_n=60, batch_n=500, batch_rounds=3,
            process_n=40, config_n=40, fib_n=24, fib_tasks=16, cpu_rounds=1, cold_runs=2,
            thread_batch_rounds=1,
        )  # fmt: skip


# -- helpers ---------------------------------------------------------------------------


def make_app(import_name: str, **config: Any) -> Any:
    """An app with one route, ``/``: tasks are submitted from requests to it.
    (A request that matched no route would make every rebuilt request context
    raise and catch a 404 while matching its URL, which a real view never
    does.)"""
    from flask import Flask

    app = Flask(import_name)
    app.config.update(BENCH_KEY="bench-value", **config)
    app.add_url_rule("/", "index", _index)
    return app


def _index() -> str:
    return "ok"


def in_request(app: Any, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` inside a request to ``/?a=1`` with ``g.user`` set."""
    from flask import g

    with app.test_request_context("/?a=1"):
        g.user = "alice"
        return fn()


def sequential(submit: Callable[[], Future[Any]], app: Any = None) -> Runner:
    """A runner of round trips; inside a request to ``app`` when given (one
    request per round, not timed)."""
    if app is None:
        return lambda n: round_trips(submit, n)
    return lambda n: in_request(app, lambda: round_trips(submit, n))


def batched(submit: Callable[[], Future[Any]], app: Any = None) -> Runner:
    """A runner of one batch (submit ``n``, then wait), like :func:`sequential`."""
    if app is None:
        return lambda n: batch(submit, n)
    return lambda n: in_request(app, lambda: batch(submit, n))


def check(value: Any, expected: Any, what: str) -> None:
    if isinstance(expected, tuple):
        value = tuple(value)
    if value != expected:
        raise AssertionError(f"{what} returned {value!r}, expected {expected!r}")


def warm(submit: Callable[[], Future[Any]], concurrent: int = 4, sequential: int = 30) -> None:
    """Start every worker (a few tasks at once), then a few round trips."""
    for future in [submit() for _ in range(concurrent)]:
        future.result(RESULT_TIMEOUT)
    round_trips(submit, sequential)


def ours_default_start_method() -> str:
    """The start method flask-executor uses when none is configured."""
    try:
        from flask_executor.backends.process import default_start_method
    except ImportError:  # the layout changed: DESIGN.md says "not fork"
        methods = multiprocessing.get_all_start_methods()
        return "forkserver" if "forkserver" in methods else "spawn"
    return default_start_method()


def raw_process_pool(method: str) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context(method))


# -- 1. thread -------------------------------------------------------------------------


def section_thread(plan: Plan) -> dict[str, Any]:
    who = "Flask-Executor 1.0" if plan.legacy else "ours"
    labels = {
        "raw": "raw ThreadPoolExecutor(2), raw_task",
        "floor": "raw pool + Flask's own request context (floor)",
        "ours": f"{who} thread(2), ctx_task in request",
    }
    with _thread_pools("bench_thread") as (app, executor, raw):
        result = in_request(app, lambda: executor.submit(ctx_task).result(RESULT_TIMEOUT))
        check(result, CTX_RESULT, "ctx_task (thread)")
        trips, batches = _thread_runners(app, executor, raw)
        print(f"  sequential round trips (submit + result): {plan.rounds} rounds x {plan.thread_n}")
        seq = ratio_block(interleave(trips, plan.rounds, plan.thread_n), "raw", labels)
        print(
            f"\n  batch: submit {plan.batch_n}, then wait for all; per task, {plan.batch_rounds}"
            " rounds"
        )
        bat = ratio_block(interleave(batches, plan.batch_rounds, plan.batch_n), "raw", labels)
    out = {
        "sequential": seq,
        "batch": bat,
        "ratio": seq["ours"]["ratio"],
        "floor_ratio": seq["floor"]["ratio"],
        "batch_ratio": bat["ours"]["ratio"],
        "batch_floor_ratio": bat["floor"]["ratio"],
        "n": plan.thread_n,
        "batch_n": plan.batch_n,
    }
    one_cpu = _thread_round_trips_on_one_cpu(plan, labels)
    if one_cpu is not None:
        out["one_cpu"] = one_cpu
        out["one_cpu_ratio"] = one_cpu["ours"]["ratio"]
        out["one_cpu_floor_ratio"] = one_cpu["floor"]["ratio"]
        out["one_cpu_vs_floor"] = one_cpu["ours"]["median"] / one_cpu["floor"]["median"]
    return out


@contextlib.contextmanager
def _thread_pools(name: str) -> Iterator[tuple[Any, Any, ThreadPoolExecutor]]:
    """Section 1's app, its thread executor and the raw pool, each of two
    threads; both pools shut down at the end."""
    from flask_executor import Executor

    app = make_app(name, EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=2)
    executor = Executor(app)
    raw = ThreadPoolExecutor(max_workers=2)
    try:
        yield app, executor, raw
    finally:
        executor.shutdown(wait=True)
        raw.shutdown(wait=True)


def _thread_runners(
    app: Any, executor: Any, raw: ThreadPoolExecutor
) -> tuple[list[tuple[str, Runner]], list[tuple[str, Runner]]]:
    """Section 1's round-trip and batch runners (raw, floor, ours), each run
    once unmeasured: a warm-up that also starts both threads of each pool."""
    environ = in_request(app, lambda: dict(flask.request.environ))
    trips = [
        ("raw", sequential(lambda: raw.submit(raw_task))),
        ("floor", sequential(lambda: raw.submit(floor_task, environ, app))),
        ("ours", sequential(lambda: executor.submit(ctx_task), app)),
    ]
    batches = [
        ("raw", batched(lambda: raw.submit(raw_task))),
        ("floor", batched(lambda: raw.submit(floor_task, environ, app))),
        ("ours", batched(lambda: executor.submit(ctx_task), app)),
    ]
    for _, runner in trips + batches:
        runner(200)
    return trips, batches


def _thread_round_trips_on_one_cpu(
    plan: Plan, labels: dict[str, str]
) -> dict[str, Any] | None:
    """The sequential round trips again, with this thread and new pools'
    threads (which inherit its CPU mask) all on one CPU; ``None`` where the
    platform cannot pin threads.

    On two CPUs a round trip is two thread wake-ups, and a wake-up on the
    other CPU costs more than on this one (much more in a virtual machine);
    which CPU each pool's threads end up on is the scheduler's choice, so the
    raw pool beside ours may be luckier or less so. On one CPU every variant
    pays the same wake-ups: what is left is the work each does.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        with _thread_pools("bench_thread_one_cpu") as (app, executor, raw):
            trips, _ = _thread_runners(app, executor, raw)
            print(
                f"\n  sequential round trips, every thread on one CPU: {plan.rounds} rounds x"
                f" {plan.thread_n}"
            )
            return ratio_block(interleave(trips, plan.rounds, plan.thread_n), "raw", labels)
    finally:
        os.sched_setaffinity(0, before)


# -- 2. process ------------------------------------------------------------------------


def section_process(plan: Plan) -> dict[str, Any]:
    from flask_executor import Executor

    if plan.legacy:
        # 1.0 uses the platform's default start method and gives process
        # tasks no context, so its task is raw_task too.
        method = multiprocessing.get_start_method()
        app = make_app("bench_process", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    else:
        method = ours_default_start_method()
        app = make_app(
            "bench_process",
            EXECUTOR_TYPE="process",
            EXECUTOR_MAX_WORKERS=2,
            PLAIN_EXECUTOR_TYPE="process",
            PLAIN_EXECUTOR_MAX_WORKERS=2,
            PLAIN_EXECUTOR_PUSH_APP_CONTEXT=False,
        )
    print(f"  start method: {method}, for the raw pool and ours alike")
    executors = [Executor(app)]
    raw = raw_process_pool(method)
    try:
        ours = executors[0]
        labels = {"raw": "raw ProcessPoolExecutor(2), raw_task"}
        if plan.legacy:
            warm(lambda: ours.submit(raw_task))
            runners = [("ours", sequential(lambda: ours.submit(raw_task)))]
            labels["ours"] = "Flask-Executor 1.0 process(2), raw_task (no context)"
        else:
            plain = Executor(app, name="plain")
            executors.append(plain)
            in_request(app, lambda: warm(lambda: ours.submit(ctx_task)))
            warm(lambda: plain.submit(raw_task))
            result = in_request(app, lambda: ours.submit(ctx_task).result(RESULT_TIMEOUT))
            check(result, CTX_RESULT, "ctx_task (process)")
            check(plain.submit(raw_task).result(RESULT_TIMEOUT), RAW_RESULT, "raw_task (plain)")
            runners = [
                ("ours", sequential(lambda: ours.submit(ctx_task), app)),
                ("plain", sequential(lambda: plain.submit(raw_task))),
            ]
            labels["ours"] = "ours process(2), ctx_task in request"
            labels["plain"] = "ours process(2), raw_task, PUSH_APP_CONTEXT=False"
        warm(lambda: raw.submit(raw_task))
        runners.insert(0, ("raw", sequential(lambda: raw.submit(raw_task))))
        if not plan.legacy:
            environ = floor_environ(app, in_request)
            warm(lambda: raw.submit(floor_task, environ))
            runners.insert(1, ("floor", sequential(lambda: raw.submit(floor_task, environ))))
            labels["floor"] = "raw pool + Flask's own request context (floor)"
        print(f"  sequential round trips, warm pools: {plan.rounds} rounds x {plan.process_n}")
        seq = ratio_block(interleave(runners, plan.rounds, plan.process_n), "raw", labels)
    finally:
        for executor in executors:
            executor.shutdown(wait=True)
        raw.shutdown(wait=True)
    return {
        "start_method": method,
        "sequential": seq,
        "ratio": seq["ours"]["ratio"],
        "floor_ratio": seq.get("floor", {}).get("ratio"),
        "n": plan.process_n,
    }


# -- 3. config size --------------------------------------------------------------------


def section_config(plan: Plan) -> dict[str, Any]:
    from flask_executor import Executor

    def config_app(name: str, keys: int) -> Any:
        extra = {f"K{i}": "v" * 20 for i in range(keys - 1)}  # + BENCH_KEY
        return make_app(name, EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2, **extra)

    apps = {
        "small": config_app("bench_config_small", 10),
        "big": config_app("bench_config_big", 1000),
    }
    executors = {name: Executor(app) for name, app in apps.items()}
    try:
        runners = []
        for name, app in apps.items():
            submit = functools.partial(executors[name].submit, ctx_task)
            in_request(app, functools.partial(warm, submit))
            runners.append((name, sequential(submit, app)))
        labels = {
            "small": f"ours process(2), 10 keys of ours, {len(apps['small'].config)} in all",
            "big": f"ours process(2), 1000 keys of ours, {len(apps['big'].config)} in all",
        }
        print(f"  sequential round trips of ctx_task: {plan.rounds} rounds x {plan.config_n}")
        seq = ratio_block(interleave(runners, plan.rounds, plan.config_n), "small", labels)
    finally:
        for executor in executors.values():
            executor.shutdown(wait=True)
    return {
        "sequential": seq,
        "ratio": seq["big"]["ratio"],
        "config_keys": {name: len(app.config) for name, app in apps.items()},
        "n": plan.config_n,
    }


# -- 4. CPU-bound scaling --------------------------------------------------------------


def section_cpu(plan: Plan) -> dict[str, Any]:
    from flask_executor import Executor

    n, tasks = plan.fib_n, plan.fib_tasks
    expected = [fib(n)] * tasks
    method = ours_default_start_method()
    app = make_app("bench_cpu", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    executor = Executor(app)
    raw = raw_process_pool(method)

    def timed(run: Callable[[], list[Any]]) -> Runner:
        def runner(_: int) -> list[float]:
            start = time.perf_counter()
            results = run()
            elapsed = time.perf_counter() - start
            check(results, expected, f"fib({n}) x {tasks}")
            return [elapsed]

        return runner

    def all_results(futures: list[Future[int]]) -> list[int]:
        return [future.result(RESULT_TIMEOUT) for future in futures]

    try:
        in_request(app, lambda: warm(lambda: executor.submit(ctx_fib, 2), 4, 5))
        warm(lambda: raw.submit(fib, 2), 4, 5)
        environ = floor_environ(app, in_request)
        warm(lambda: raw.submit(floor_fib, environ, 2), 4, 5)
        runners = [
            ("serial", timed(lambda: in_request(app, lambda: [ctx_fib(n) for _ in range(tasks)]))),
            ("raw", timed(lambda: all_results([raw.submit(fib, n) for _ in range(tasks)]))),
            (
                "floor",
                timed(
                    lambda: all_results([raw.submit(floor_fib, environ, n) for _ in range(tasks)])
                ),
            ),
            (
                "ours",
                timed(
                    lambda: all_results(
                        in_request(app, lambda: [executor.submit(ctx_fib, n) for _ in range(tasks)])
                    )
                ),
            ),
        ]
        labels = {
            "serial": f"serial in the main process, ctx_fib({n}) x {tasks}",
            "raw": f"raw ProcessPoolExecutor(2) [{method}], fib",
            "floor": "raw pool, ctx_fib in Flask's own request context (floor)",
            "ours": f"ours process(2) [{method}], ctx_fib in request",
        }
        print(
            f"  fib({n}) x {tasks} tasks, 2 workers, {os.cpu_count()} CPUs, {plan.cpu_rounds}"
            " rounds; time for all tasks"
        )
        times = ratio_block(interleave(runners, plan.cpu_rounds, 1), "serial", labels, unit="s")
    finally:
        executor.shutdown(wait=True)
        raw.shutdown(wait=True)
    speedup, raw_speedup = 1 / times["ours"]["ratio"], 1 / times["raw"]["ratio"]
    ideal = min(2, os.cpu_count() or 1)
    print(
        f"  speedup over serial: ours {speedup:.2f}x, raw pool {raw_speedup:.2f}x (ideal {ideal}x)"
    )
    return {
        "times": times,
        "speedup": speedup,
        "raw_speedup": raw_speedup,
        "ours_vs_raw": times["ours"]["median"] / times["raw"]["median"],
        "floor_vs_raw": times["floor"]["median"] / times["raw"]["median"],
        "fib_n": n,
        "tasks": tasks,
        "cpus": os.cpu_count(),
    }


def section_cold(plan: Plan) -> dict[str, Any]:
    return cold_start(plan.cold_runs, ours_default_start_method())


# -- summary ---------------------------------------------------------------------------


class Target(NamedTuple):
    label: str
    limit: float
    aim: float
    key: str  # the section's figure
    paired_at: tuple[str, str] | None  # (block, variant) of its round-by-round ratio


TARGETS = {
    "thread": Target("thread sequential round trip, ours/raw", 2.5, 2.0, "ratio",
                     ("sequential", "ours")),
    "process": Target("process sequential round trip, ours/raw", 1.25, 1.1, "ratio",
                      ("sequential", "ours")),
    "config": Target("process round trip, 1000 keys / 10 keys", 1.1, 1.0, "ratio",
                     ("sequential", "big")),
    # a speedup: at least 80 % (aim: 90 %) of the ideal for 2 workers on this machine
    "cpu": Target("CPU-bound speedup over serial, 2 workers", 0.8, 0.9, "speedup", None),
    "dask": Target("dask round trip, ours/raw client.submit", 1.25, 1.1, "ratio",
                   ("sequential", "ours")),
    "upload": Target("upload argument, web-process memory in copies", 1.0, 0.25, "copies", None),
    # issue 13: 2.0's time per task over 1.0's (separate interpreters, so no rounds pair up)
    "compare": Target("thread: submit {thread_batch_n:,} then results, ours/Flask-Executor 1.0",
                      1.0, 1.0, "thread_batch_vs_v1", ("thread_batch_v1", "ours")),
}  # fmt: skip
INFO = (
    ("thread", "floor_ratio", "thread round trip, Flask's own floor/raw"),
    ("thread", "one_cpu_ratio", "thread round trip on one CPU, ours/raw"),
    ("thread", "one_cpu_floor_ratio", "thread round trip on one CPU, Flask's floor/raw"),
    ("thread", "one_cpu_vs_floor", "thread round trip on one CPU, ours/Flask's floor"),
    ("thread", "batch_ratio", "thread batch of {batch_n}, ours/raw"),
    ("thread", "batch_floor_ratio", "thread batch of {batch_n}, Flask's floor/raw"),
    ("process", "floor_ratio", "process round trip, Flask's own floor/raw"),
    ("dask", "map_ratio", "dask map of 1000 items, ours/client.map"),
    ("cpu", "ours_vs_raw", "CPU-bound total time, ours/raw pool"),
    ("cpu", "floor_vs_raw", "CPU-bound total time, Flask's floor/raw pool"),
    ("cold", "ratio", "cold start to first result, ours/raw"),
    ("cold", "floor_ratio", "cold start to first result, Flask's floor/raw"),
    ("store", "sqlite_ratio", "stored task with the SQLite store / memory store"),
    ("store", "redis_ratio", "stored task with the Redis store / memory store"),
    ("upload", "time_ratio", "upload to a process task, time to result, ours/raw"),
    ("throughput", "thread_batch_ratio",
     "thread: submit {thread_batch_n:,} then results, ours/raw"),
    ("throughput", "thread_g_ratio", "thread: round trip with a 1 MB g / small g"),
    ("throughput", "thread_g_floor", "thread: floor of that, small + the least copy of the dict"),
    ("throughput", "thread_g_floor_handoff",
     "thread: floor of that, the copy handed to the task's thread"),
    ("throughput", "map_vs_raw1", "process map, default chunksize, ours/raw chunksize 1"),
    ("throughput", "plain_vs_best", "process map, no context, ours/raw best chunksize"),
    ("throughput", "map_us_per_item", "process map, full context, us per item"),
    ("throughput", "map_floor_us_per_item",
     "process map, Flask's floor (raw best chunks, a request context per item), us per item"),
    ("throughput", "process_body_ratio", "process: round trip with a 512 KB JSON body / small"),
    ("throughput", "process_body_floor", "process: floor of that, raw pool's cost of the body"),
    ("throughput", "process_g_ratio", "process: round trip with a 1 MB g / small g"),
    ("throughput", "process_g_floor", "process: floor of that, raw pool's cost of the dict"),
    ("load", "ours_ratio", "process: submit {n:,} then wait, full context, ours/raw"),
    ("load", "floor_ratio", "process: submit {n:,} then wait, Flask's floor/raw"),
    ("load", "plain_ratio", "process: submit {n:,} then wait, no context, ours/raw"),
    ("load", "pebble_ratio", "process: submit {n:,} then wait, Pebble/raw"),
    ("load", "loky_ratio", "process: submit {n:,} then wait, loky/raw"),
    ("compare", "thread_batch_vs_v1_raw_normalised",
     "thread: submit {thread_batch_n:,} then results, (ours/raw) / (1.0/raw)"),
)  # fmt: skip
#: Flag a headline ratio as noisy when the round-by-round median or the ratio
#: of the fast quarters differs from it by more than this.
NOISY = 0.15


def summary_lines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target: measured, target, PASS/MISS; then INFO lines."""
    lines: list[dict[str, Any]] = []
    for section, (label, limit, aim, key, paired_at) in TARGETS.items():
        data = results.get(section)
        if data is None:
            continue
        if "error" in data:
            lines.append(
                {
                    "target": label,
                    "status": "ERROR",
                    "measured": None,
                    "text": "ERROR, see the section's traceback",
                }
            )
            continue
        value = data.get(key)
        if value is None:  # e.g. --compare-1.0 without section throughput
            continue
        label = label.format(**data)
        higher = section == "cpu"
        if higher:
            ideal = min(2, data["cpus"] or 1)
            limit, aim = limit * ideal, aim * ideal
        ok = value >= limit if higher else value <= limit
        aimed = value >= aim if higher else value <= aim
        status = "PASS" if ok else "MISS"
        text = (
            f"{value:.2f}x  target {'>=' if higher else '<='} {limit:.2f}x"
            f" (aim {aim:.2f}x)  {status}{', aim not met' if ok and not aimed else ''}"
        )
        paired = fast = None
        if paired_at is not None:
            figure = data[paired_at[0]][paired_at[1]]
            paired, fast = figure["paired_median"], figure["q1_ratio"]
            noisy = max(abs(paired / value - 1), abs(fast / value - 1)) > NOISY
            text += (
                f"  [round by round {paired:.2f}x, fast quarter {fast:.2f}x"
                f"{', NOISY' if noisy else ''}]"
            )
        lines.append(
            {
                "target": label,
                "measured": value,
                "limit": limit,
                "aim": aim,
                "paired": paired,
                "fast_quarter": fast,
                "status": status,
                "text": text,
            }
        )
    for section, key, label in INFO:
        data = results.get(section)
        if data and "error" not in data and data.get(key) is not None:
            unit = "us" if key.endswith("us_per_item") else "x"  # a time, or a ratio
            lines.append(
                {
                    "target": label.format(**data),
                    "measured": data[key],
                    "status": "INFO",
                    "unit": unit,
                    "text": f"{data[key]:.2f}{' us' if unit == 'us' else 'x'}  (no target)",
                }
            )
    return lines


# -- driver ----------------------------------------------------------------------------


def meta(plan: Plan) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import flask_executor

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "flask_version": dist("flask"),
        "flask_executor_version": getattr(flask_executor, "__version__", None)
        or dist("flask-executor"),
        "flask_executor_file": flask_executor.__file__,
        "default_start_method": multiprocessing.get_start_method(),
        "plan": asdict(plan),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def leftovers() -> list[str]:
    """Processes or non-daemon threads still alive after every section shut
    its pools down: a sign of a shutdown bug."""
    time.sleep(0.2)
    alive = [f"process {p.name} pid {p.pid}" for p in multiprocessing.active_children()]
    alive += [
        f"thread {t.name}"
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if alive:
        print("\nWARNING: still alive after shutdown: " + "; ".join(alive))
    return alive


def run_section(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section under a watchdog; an error is reported, not fatal."""
    print(f"\n== {TITLES[name]} ==")
    start = time.perf_counter()
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    try:
        result = run()
    except Exception:
        text = traceback.format_exc()
        print(f"  ERROR in section {name}:\n{text}")
        result = {"error": text}
    finally:
        faulthandler.cancel_dump_traceback_later()
    result["seconds"] = time.perf_counter() - start
    print(f"  ({result['seconds']:.1f} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 1 minute)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--png", metavar="FILE", help="also draw the ratios as a chart (needs the [bench] extra)"
    )
    parser.add_argument(
        "--compare-1.0",
        dest="compare",
        metavar="PYTHON",
        help=(
            "also run sections 1-2 (and the 20,000-task thread case of throughput) with"
            " this interpreter, which has Flask-Executor 1.0"
        ),
    )
    parser.add_argument("--legacy-v1", action="store_true", help=argparse.SUPPRESS)
    # --compare-1.0: one round of section throughput's thread batch, and nothing else
    parser.add_argument("--thread-batch-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(only) - set(SECTIONS):
        parser.error(f"unknown section in --only {args.only!r}; choose from {SECTIONS}")
    for output in (args.json, args.png):
        if output:  # made now, not after the run: e.g. benchmarks/results/ (not in git)
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    plan = Plan.make(args.quick, legacy=args.legacy_v1)
    if args.thread_batch_round:
        plan = replace(plan, thread_batch_rounds=1, thread_batch_only=True)
    info = meta(plan)
    print(
        f"flask-executor {info['flask_executor_version']} ({info['flask_executor_file']}),"
        f" Flask {info['flask_version']}, Python {info['python']}, {info['cpus']} CPUs,"
        f" {info['platform']}{', --quick' if plan.quick else ''}"
    )
    sections: dict[str, Callable[[Plan], dict[str, Any]]] = {
        "thread": section_thread,
        "process": section_process,
        "config": section_config,
        "cpu": section_cpu,
        "cold": section_cold,
        "dask": lambda plan: section_dask(plan, make_app, in_request, sequential),
        "store": lambda plan: section_store(plan, make_app),
        "upload": lambda plan: section_upload(plan, make_app, ours_default_start_method()),
        "throughput": lambda plan: section_throughput(
            plan, make_app, in_request, ours_default_start_method()
        ),
        "load": lambda plan: section_load(
            plan, make_app, in_request, ours_default_start_method(), raw_process_pool, warm
        ),
    }
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in SECTIONS:
        if name in only:
            results[name] = run_section(name, functools.partial(sections[name], plan))
    if args.compare:
        results["compare"] = run_section(
            "compare",
            lambda: compare_v1(args.compare, plan.quick, results, WATCHDOG_SECONDS),
        )
    alive = leftovers()
    summary = summary_lines(results)
    goals = goal_lines(results)
    if not plan.legacy:
        print("\n== summary ==")
        print_table(["target", "measured"], [[s["target"], s["text"]] for s in summary], left=2)
        if goals:
            print("\n== goals of issue 13 (throughput and load), with the floor of each ==")
            print_table(["goal", "this run"], [[g["goal"], g["text"]] for g in goals], left=2)
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s")
    if args.json:
        report = {
            "meta": info,
            "sections": results,
            "summary": summary,
            "goals": goals,
            "leftovers": alive,
            "total_seconds": total,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.png:
        from _chart import draw

        draw(results, summary, args.png, meta=info, goals=goals)
        print(f"chart written to {args.png}")
    return 1 if alive or any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
