"""Section ``throughput`` of ``bench.py`` (issue 13): the cases beyond one
round trip where users with real load look.

- thread: ``N`` submits, then every result (20,000; 2,000 with ``--quick``),
  raw ``ThreadPoolExecutor(2)`` against ours, interleaved rounds;
- thread: a submit round trip with ``g`` holding a 1 MB dict, against a small
  ``g`` (how ``g`` is copied), and two floors: the small round trip plus the
  least a faithful copy of that dict costs (:func:`_least_copy`), dropped at
  once; and the same copy handed to the task, which drops it in its own
  thread, as the task's copy of ``g`` must be (freeing a dict of 10,000
  entries in another thread than the one that made it touches each entry's
  object again from the other CPU);
- process: ``executor.map(identity, range(N))`` with the default chunksize
  (100,000 items; 10,000 with ``--quick``), against the raw pool's ``map``
  with its default chunksize of 1 (on a tenth of the items: it is slow) and
  with the best chunk (four per worker), and against ours with
  ``EXECUTOR_PUSH_APP_CONTEXT = False``; per item;
- process: a 100 MB bytes argument returned as the result (20 MB with
  ``--quick``): time, and the web process's peak of :mod:`tracemalloc` in
  copies of the bytes, and what it still holds after ``del result`` (each pool
  runs twice in a row: memory from the first run, time from the second, see
  :func:`_large_round_trip`);
- process: a round trip from a request with a 512 KB JSON body, and one with
  ``g`` holding the 1 MB dict, against the small context; beside them the
  floor, a raw pool given the same bytes or dict as its argument against a
  small one (:func:`_process_context_size`).

Every figure is a median over rounds; the ratios are against the raw pool in
the same run.
"""

from __future__ import annotations

import functools
import gc
import json
import multiprocessing
import statistics
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import flask
from _tasks import (
    body_task,
    ctx_task,
    floor_item,
    given,
    identity,
    raw_task,
    small_g_task,
    small_g_task_given,
)
from _timing import RESULT_TIMEOUT, Runner, interleave, ratio_block

MiB = 1024 * 1024


def _all_results(submit: Callable[[], Future[Any]], n: int) -> list[float]:
    start = time.perf_counter()
    futures = [submit() for _ in range(n)]
    for future in futures:
        future.result(RESULT_TIMEOUT)
    return [(time.perf_counter() - start) / n]


def thread_batch(plan: Any, make_app: Any, in_request: Any, executor_cls: Any) -> dict[str, Any]:
    """Submit ``N`` tasks, then every result: raw ``ThreadPoolExecutor(2)``
    against ``executor_cls`` (ours, or Flask-Executor 1.0 under
    ``--legacy-v1``), interleaved rounds. Also what ``--compare-1.0`` runs
    under 1.0, so both versions take the same steps."""
    n = 2000 if plan.quick else 20000
    rounds = plan.thread_batch_rounds
    app = make_app("bench_throughput_thread", EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=2)
    executor = executor_cls(app)
    raw = ThreadPoolExecutor(max_workers=2)
    try:
        runners: list[tuple[str, Runner]] = [
            ("raw", lambda k: _all_results(lambda: raw.submit(raw_task), k)),
            ("ours", lambda k: in_request(app, lambda: _all_results(
                lambda: executor.submit(ctx_task), k))),
        ]  # fmt: skip
        for _, runner in runners:
            runner(200)
        who = "Flask-Executor 1.0" if plan.legacy else "ours"
        print(f"  thread: submit {n}, then every result; per task, {rounds} rounds")
        labels = {"raw": "raw ThreadPoolExecutor(2), raw_task",
                  "ours": f"{who} thread(2), ctx_task in request"}  # fmt: skip
        block = ratio_block(interleave(runners, rounds, n), "raw", labels)
    finally:
        executor.shutdown(wait=True)
        raw.shutdown(wait=True)
    return {"block": block, "n": n, "rounds": rounds}


def section_throughput(plan: Any, make_app: Any, in_request: Any, method: str) -> dict[str, Any]:
    from flask import g

    from flask_executor import Executor

    quick = plan.quick
    out: dict[str, Any] = {}
    # -- thread: N submits, then results ---------------------------------------------
    batch = thread_batch(plan, make_app, in_request, Executor)
    out["thread_batch"] = batch["block"]
    out["thread_batch_ratio"] = batch["block"]["ours"]["ratio"]
    out["thread_batch_n"] = batch["n"]
    if plan.legacy or plan.thread_batch_only:  # what --compare-1.0 runs, in both versions
        return out
    app = make_app(
        "bench_throughput_thread", EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=2
    )
    executor = Executor(app)
    big = _big_dict()  # about 1 MB of strings

    try:
        def round_trips(value: Any, copy: Callable[[], object] = lambda: None) -> Runner:
            """``copy()``'s return value is handed to the task (which drops it)."""

            def run(k: int) -> list[float]:
                def go() -> list[float]:
                    g.payload = value
                    times = []
                    for _ in range(k):
                        start = time.perf_counter()
                        executor.submit(small_g_task_given, copy()).result(RESULT_TIMEOUT)
                        times.append(time.perf_counter() - start)
                    return times

                return in_request(app, go)  # type: ignore[no-any-return]

            return run

        g_runners = [
            ("small", round_trips("small")),
            ("big", round_trips(big)),
            ("floor", round_trips("small", lambda: _dropped(_least_copy(big)))),
            ("handoff", round_trips("small", lambda: _least_copy(big))),
        ]
        print("\n  thread: submit + result with g holding a 1 MB dict vs a string")
        g_labels = {"small": "ours thread, g.payload = 'small'",
                    "big": "ours thread, g.payload = 1 MB dict",
                    "floor": "floor: 'small' + the least a copy of the dict costs",
                    "handoff": "floor: that copy handed to the task, dropped there"}  # fmt: skip
        g_block = ratio_block(interleave(g_runners, 5 if quick else 15, 10), "small", g_labels)
        out["thread_g"] = g_block
        out["thread_g_ratio"] = g_block["big"]["ratio"]
        out["thread_g_floor"] = g_block["floor"]["ratio"]
        out["thread_g_floor_handoff"] = g_block["handoff"]["ratio"]
    finally:
        executor.shutdown(wait=True)
    # -- process: map ----------------------------------------------------------------
    items = 10000 if quick else 100000
    app, ours, plain = process_executors(make_app, "bench_throughput_process")
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context(method))
    try:
        best = -(-items // 8)
        per_item_floor = functools.partial(floor_item, floor_environ(app, in_request))

        def timed_map(run: Callable[[int], list[Any]], count: int) -> Runner:
            def runner(_: int) -> list[float]:
                start = time.perf_counter()
                results = run(count)
                elapsed = time.perf_counter() - start
                if results != list(range(count)):
                    raise AssertionError("map returned wrong results")
                return [elapsed / count]

            return runner

        map_runners: list[tuple[str, Runner]] = [
            ("raw1", timed_map(lambda c: list(pool.map(identity, range(c))), items // 10)),
            ("raw_best", timed_map(
                lambda c: list(pool.map(identity, range(c), chunksize=best)), items)),
            ("floor", timed_map(
                lambda c: list(pool.map(per_item_floor, range(c), chunksize=best)), items)),
            ("ours", timed_map(lambda c: in_request(app, lambda: list(
                ours.map(identity, range(c), timeout=RESULT_TIMEOUT))), items)),
            ("plain", timed_map(
                lambda c: list(plain.map(identity, range(c), timeout=RESULT_TIMEOUT)), items)),
        ]  # fmt: skip
        for _, runner in map_runners:
            runner(0)  # warm-up: start the workers
        map_labels = {
            "raw1": f"raw ProcessPoolExecutor(2).map, chunksize 1 ({items // 10} items)",
            "raw_best": f"raw ProcessPoolExecutor(2).map, chunksize {best}",
            "floor": "floor: that, each item in its own request context",
            "ours": "ours process(2) map, default chunksize, in request",
            "plain": "ours process(2) map, default, PUSH_APP_CONTEXT=False",
        }
        map_rounds = 1 if quick else 5
        print(f"\n  process: map(identity, range({items})); per item, {map_rounds} rounds")
        block = ratio_block(interleave(map_runners, map_rounds, 1), "raw1", map_labels)
        out["process_map"] = block
        out["map_vs_raw1"] = block["ours"]["ratio"]
        out["map_us_per_item"] = block["ours"]["median"] * 1e6
        out["map_floor_us_per_item"] = block["floor"]["median"] * 1e6
        out["plain_vs_best"] = block["plain"]["median"] / block["raw_best"]["median"]
        # -- process: a large argument and result --------------------------------------
        size = (20 if quick else 100) * MiB
        out["large"] = _large_round_trip(pool, ours, app, in_request, size, 1 if quick else 7)
    finally:
        ours.shutdown(wait=True)
        plain.shutdown(wait=True)
        pool.shutdown(wait=True)
    out.update(_process_context_size(plan, make_app, method))
    return out


def floor_environ(app: Any, in_request: Any) -> dict[str, Any]:
    """The WSGI environ of a request to ``app`` (as ``in_request`` makes it),
    its plain values only: what the floor tasks build their request from."""
    environ = in_request(app, lambda: dict(flask.request.environ))
    return {k: v for k, v in environ.items() if isinstance(v, (str, int, bool, tuple))}


def process_executors(make_app: Any, name: str) -> tuple[Any, Any, Any]:
    """An app with two process executors of two workers: ``ours`` with the
    full context and ``plain`` with ``EXECUTOR_PUSH_APP_CONTEXT = False``."""
    from flask_executor import Executor

    app = make_app(
        name,
        EXECUTOR_TYPE="process",
        EXECUTOR_MAX_WORKERS=2,
        PLAIN_EXECUTOR_TYPE="process",
        PLAIN_EXECUTOR_MAX_WORKERS=2,
        PLAIN_EXECUTOR_PUSH_APP_CONTEXT=False,
    )
    return app, Executor(app), Executor(app, name="plain")


def _big_dict() -> dict[str, str]:
    return {f"k{i}": f"{i:08d}" * 12 for i in range(10000)}  # about 1 MB of strings


def _dropped(value: object) -> None:
    """Nothing: ``value`` is freed here, in the caller's thread."""
    del value


def _least_copy(value: dict[str, str]) -> dict[str, str]:
    """The least work any faithful copy of ``value`` does in Python: look at
    the type of every key and value (a shallow copy is a deep one only if
    each is immutable) and copy its table (``dict.copy``). Returns the copy."""
    list(map(type, value))
    list(map(type, value.values()))
    return value.copy()


def _json_body(size: int) -> bytes:
    """A JSON list of strings, ``size`` bytes long or a little less."""
    return json.dumps([f"{i:08d}" * 6 for i in range(size // 52)]).encode()


def _process_context_size(plan: Any, make_app: Any, method: str) -> dict[str, Any]:
    """Process round trips from a request with a 512 KB JSON body (the view
    has read ``request.get_json()``; the task reads ``request.get_data()``) and
    with ``g`` holding a 1 MB dict, against the small context (``g.payload =
    'small'``, no body), interleaved. The floor of each ratio: the small
    context plus what the raw pool takes more to be given the same bytes or
    dict as its argument than a small one (pickling, the pipe, unpickling)."""
    from flask import g, request

    from flask_executor import Executor

    app = make_app("bench_ctx_size", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    app.add_url_rule("/upload", "upload", lambda: "ok", methods=["POST"])
    executor = Executor(app)
    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context(method))
    big, body = _big_dict(), _json_body(512 * 1024)

    def ours(payload: Any, fn: Callable[[], Any], **request_args: Any) -> Runner:
        def run(k: int) -> list[float]:
            with app.test_request_context("/upload" if request_args else "/?a=1",
                                          **request_args):  # fmt: skip
                g.user = "alice"
                g.payload = payload
                if request_args:
                    request.get_json()  # as a view would
                times = []
                for _ in range(k):
                    start = time.perf_counter()
                    executor.submit(fn).result(RESULT_TIMEOUT)
                    times.append(time.perf_counter() - start)
                return times

        return run

    def raw(value: Any) -> Runner:
        def run(k: int) -> list[float]:
            times = []
            for _ in range(k):
                start = time.perf_counter()
                pool.submit(given, value).result(RESULT_TIMEOUT)
                times.append(time.perf_counter() - start)
            return times

        return run

    json_request = {"method": "POST", "data": body, "content_type": "application/json"}
    runners: list[tuple[str, Runner]] = [
        ("small", ours("small", small_g_task)),
        ("body", ours("small", body_task, **json_request)),
        ("big_g", ours(big, small_g_task)),
        ("raw_small", raw("small")),
        ("raw_body", raw(body)),
        ("raw_big", raw(big)),
    ]
    try:
        for _, runner in runners:
            runner(2)  # warm-up: start the workers
        labels = {
            "small": "ours process(2), g.payload = 'small'",
            "body": f"ours process(2), {len(body) // 1024} KB JSON body",
            "big_g": "ours process(2), g.payload = 1 MB dict",
            "raw_small": "floor: raw ProcessPoolExecutor(2), given 'small'",
            "raw_body": f"floor: raw, given the {len(body) // 1024} KB body",
            "raw_big": "floor: raw, given the 1 MB dict",
        }
        print("\n  process: round trip with a 512 KB JSON body / a 1 MB g vs a small context")
        block = ratio_block(interleave(runners, 5 if plan.quick else 15, 10), "small", labels)
    finally:
        executor.shutdown(wait=True)
        pool.shutdown(wait=True)
    # The floor of each ratio: the small context plus what moving the same bytes
    # or dict to a worker and unpickling it there costs the raw pool.
    small, raw_small = block["small"]["median"], block["raw_small"]["median"]
    return {
        "process_ctx_size": block,
        "process_body_ratio": block["body"]["ratio"],
        "process_g_ratio": block["big_g"]["ratio"],
        "process_body_floor": (small + block["raw_body"]["median"] - raw_small) / small,
        "process_g_floor": (small + block["raw_big"]["median"] - raw_small) / small,
    }


def _large_round_trip(
    pool: ProcessPoolExecutor, ours: Any, app: Any, in_request: Any, size: int, rounds: int
) -> dict[str, Any]:
    data = b"x" * size
    variants: dict[str, Callable[[], Future[Any]]] = {
        "raw": lambda: pool.submit(identity, data),
        "ours": lambda: ours.submit(identity, data),
    }
    figures: dict[str, dict[str, list[float]]] = {
        name: {"seconds": [], "peak": [], "held": []} for name in variants
    }
    def run(submit: Callable[[], Future[Any]]) -> tuple[float, float, float]:
        """One traced round trip: its seconds, peak and held (bytes)."""
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            result = in_request(app, lambda: submit().result(RESULT_TIMEOUT))
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            ok = result == data
            del result
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        if not ok:
            raise AssertionError("the large round trip returned other bytes")
        return elapsed, peak, held

    # Each variant runs twice in a row. A run right after the other pool's pays
    # for what that pool left behind (the raw pool holds a copy after ``del``:
    # ours ran 0.70 s after raw, 0.42 s after ours), so the time is the second
    # run's; memory is the first's, taken as each pool meets the other's state
    # (a second run would see its own previous copy freed and count it as less).
    order = list(variants.items())
    for round_ in range(rounds + 1):  # round 0 warms both up (page faults, pipe buffers)
        for name, submit in order:
            _, peak, held = run(submit)
            elapsed = run(submit)[0]
            if round_:
                figures[name]["seconds"].append(elapsed)
                figures[name]["peak"].append(peak / size)
                figures[name]["held"].append(held / size)
        order.reverse()  # alternate which runs first
    medians = {
        name: {key: statistics.median(values) for key, values in fig.items()}
        for name, fig in figures.items()
    }
    print(f"\n  process: {size // MiB} MiB bytes argument returned as the result, {rounds} rounds")
    for name, fig in medians.items():
        print(
            f"    {name:5s} {fig['seconds'] * 1e3:8.1f} ms   peak {fig['peak']:.2f} copies"
            f"   held after del {fig['held']:.2f} copies"
        )
    seconds = figures["ours"]["seconds"], figures["raw"]["seconds"]
    pairs = [o / r for o, r in zip(*seconds, strict=True)]
    print(
        f"    ours/raw, round by round: median {statistics.median(pairs):.2f}x"
        f" ({min(pairs):.2f}-{max(pairs):.2f})"
    )
    return {
        "size": size,
        "figures": figures,
        "medians": medians,
        # The median of each round's ours/raw: a round pairs two runs a second
        # apart, so drift between rounds (rounds here spread 0.7-1.3 s) cancels.
        "time_ratio": statistics.median(pairs),
        "peak_ratio": medians["ours"]["peak"] / max(medians["raw"]["peak"], 1e-9),
    }
