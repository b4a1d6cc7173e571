"""Section ``load`` of ``bench.py`` (issue 13): the process pool under a
backlog, where a worker must never idle between tasks.

- submit ``N`` tasks, then wait for all (10,000; 2,000 with ``--quick``), per
  task: the raw ``ProcessPoolExecutor(2)`` (``raw_task``), Flask's own floor
  (the raw pool running ``floor_task``: a request context built from a copy
  of the environ, public APIs only), ours with the full context (``ctx_task``
  submitted in a request), ours with ``EXECUTOR_PUSH_APP_CONTEXT = False``
  (``raw_task``), and the peers Pebble and loky (``raw_task``) when they are
  installed (``pip install pebble loky``; a peer that is missing is left out).

All with two workers and the same start method, interleaved rounds; ratios
against the raw pool in the same run.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from _tasks import ctx_task, floor_task, raw_task
from _throughput import floor_environ, process_executors
from _timing import Runner, batch, interleave, ratio_block


def _peers(method: str) -> tuple[list[tuple[str, Runner]], dict[str, str], list[Callable[[], Any]]]:
    runners: list[tuple[str, Runner]] = []
    labels: dict[str, str] = {}
    closers: list[Callable[[], Any]] = []
    context = multiprocessing.get_context(method)
    try:
        import pebble
    except ImportError:
        print("  Pebble is not installed: left out")
    else:
        pool = pebble.ProcessPool(max_workers=2, context=context)
        closers.append(lambda: (pool.close(), pool.join()))
        submit: Callable[[], Future[Any]] = lambda: pool.schedule(raw_task)  # noqa: E731
        runners.append(("pebble", lambda n, submit=submit: batch(submit, n)))
        labels["pebble"] = f"Pebble {pebble.__version__} ProcessPool(2), raw_task"
    try:
        import loky
    except ImportError:
        print("  loky is not installed: left out")
    else:
        # loky's own executor, not its reusable one: the same start method as the others
        loky_pool = loky.ProcessPoolExecutor(max_workers=2, context=context)
        closers.append(lambda: loky_pool.shutdown(wait=True))
        submit = lambda: loky_pool.submit(raw_task)  # noqa: E731
        runners.append(("loky", lambda n, submit=submit: batch(submit, n)))
        labels["loky"] = f"loky {loky.__version__} ProcessPoolExecutor(2), raw_task"
    return runners, labels, closers


def section_load(
    plan: Any,
    make_app: Any,
    in_request: Any,
    method: str,
    raw_pool: Callable[[str], Any],
    warm: Callable[[Callable[[], Future[Any]]], None],
) -> dict[str, Any]:
    n = 2000 if plan.quick else 10000
    rounds = 3 if plan.quick else 5
    app, ours, plain = process_executors(make_app, "bench_load")
    raw = raw_pool(method)
    peers, peer_labels, closers = _peers(method)
    try:
        environ = floor_environ(app, in_request)
        in_request(app, lambda: warm(lambda: ours.submit(ctx_task)))
        warm(lambda: plain.submit(raw_task))
        warm(lambda: raw.submit(raw_task))
        for _, runner in peers:
            runner(50)
        runners: list[tuple[str, Runner]] = [
            ("raw", lambda k: batch(lambda: raw.submit(raw_task), k)),
            ("floor", lambda k: batch(lambda: raw.submit(floor_task, environ), k)),
            ("ours", lambda k: in_request(app, lambda: batch(lambda: ours.submit(ctx_task), k))),
            ("plain", lambda k: batch(lambda: plain.submit(raw_task), k)),
            *peers,
        ]
        labels = {
            "raw": "raw ProcessPoolExecutor(2), raw_task",
            "floor": "raw pool + Flask's own request context (floor)",
            "ours": "ours process(2), ctx_task in request",
            "plain": "ours process(2), raw_task, PUSH_APP_CONTEXT=False",
            **peer_labels,
        }
        print(f"  start method {method}; submit {n:,} then wait, {rounds} interleaved rounds")
        block = ratio_block(interleave(runners, rounds, n), "raw", labels)
    finally:
        ours.shutdown(wait=True)
        plain.shutdown(wait=True)
        raw.shutdown(wait=True)
        for close in closers:
            close()
    out: dict[str, Any] = {"n": n, "start_method": method, "batch": block}
    for name in ("ours", "floor", "plain", "pebble", "loky"):
        if name in block:
            out[f"{name}_ratio"] = block[name]["ratio"]
    out["ours_vs_floor"] = block["ours"]["median"] / block["floor"]["median"]
    return out
