"""Section 6 of ``bench.py``: the Dask backend against raw ``client.submit``
and ``client.map`` on the same cluster, and the embedded cluster's start-up."""

from __future__ import annotations

import time
from typing import Any

from _tasks import RAW_RESULT, ctx_task, raw_task
from _timing import RESULT_TIMEOUT, interleave, print_table, ratio_block


def section_dask(plan: Any, make_app: Any, in_request: Any, sequential: Any) -> dict[str, Any]:
    import distributed

    from flask_executor import Executor

    started = time.perf_counter()
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    )
    start_up = time.perf_counter() - started
    client = distributed.Client(cluster, set_as_default=False)
    app = make_app(
        "bench_dask", EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=cluster.scheduler_address
    )
    executor = Executor(app)
    try:
        if in_request(app, lambda: executor.submit(ctx_task).result(RESULT_TIMEOUT))[2] != "alice":
            raise RuntimeError("ctx_task did not see its context on Dask")
        if client.submit(raw_task, pure=False).result(RESULT_TIMEOUT) != RAW_RESULT:
            raise RuntimeError("raw_task failed on Dask")
        runners = [
            ("raw", sequential(lambda: client.submit(raw_task, pure=False))),
            ("ours", sequential(lambda: executor.submit(ctx_task), app)),
        ]
        for _, runner in runners:
            runner(10)  # warm-up
        labels = {
            "raw": "raw client.submit(raw_task, pure=False)",
            "ours": "ours dask, ctx_task in request",
        }
        rounds = max(5, plan.rounds // 4)
        n = 20 if plan.quick else 40
        print(f"  sequential round trips, same cluster (2 workers): {rounds} rounds x {n}")
        seq = ratio_block(interleave(runners, rounds, n), "raw", labels)

        items = 1000

        def raw_map(_: int) -> list[float]:
            start = time.perf_counter()
            futures = client.map(pow, range(items), [2] * items, pure=False)
            client.gather(futures)
            return [time.perf_counter() - start]

        def ours_map(_: int) -> list[float]:
            def run() -> list[float]:
                start = time.perf_counter()
                list(executor.map(pow, range(items), [2] * items, timeout=RESULT_TIMEOUT))
                return [time.perf_counter() - start]

            result: list[float] = in_request(app, run)
            return result

        map_rounds = 3 if plan.quick else 5
        print(f"\n  map of {items} items, whole map; {map_rounds} rounds")
        maps = ratio_block(
            interleave([("raw", raw_map), ("ours", ours_map)], map_rounds, 1),
            "raw",
            {"raw": f"raw client.map(pow, {items} items)", "ours": f"ours executor.map, {items}"},
            unit="s",
        )
        print("\n  embedded LocalCluster (2 worker processes) start-up")
        print_table(["what", "seconds"], [["LocalCluster() until ready", f"{start_up:.2f}"]])
    finally:
        executor.shutdown(wait=True)
        client.close()
        cluster.close()
    return {
        "sequential": seq,
        "map": maps,
        "ratio": seq["ours"]["ratio"],
        "map_ratio": maps["ours"]["ratio"],
        "startup_seconds": start_up,
    }
