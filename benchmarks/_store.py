"""Section 7 of ``bench.py``: what a shared task store adds per stored task.

Each operation is one stored task as a multi-process app sees it: the owner
calls ``submit_stored``; a reader (a second executor on the same store URL,
as another gunicorn worker would be; the owner itself for the memory store)
polls ``futures.state(key)`` until it says finished, then pops the key and
reads the result. Memory, SQLite and Redis are interleaved in the same run
and reported as ratios to the memory store.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from _tasks import RAW_RESULT, raw_task
from _timing import RESULT_TIMEOUT, Runner, interleave, print_table, ratio_block


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def _runner(owner: Any, reader: Any, app: Any) -> Runner:
    counter = itertools.count()

    def run(n: int) -> list[float]:
        times = []
        clock = time.perf_counter
        with app.app_context():
            for _ in range(n):
                key = f"bench-{next(counter)}"
                start = clock()
                owner.submit_stored(key, raw_task)
                deadline = time.monotonic() + RESULT_TIMEOUT
                while reader.futures.state(key) != "finished":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"stored task {key} not finished")
                    time.sleep(0)
                result = reader.futures.pop(key).result(RESULT_TIMEOUT)
                times.append(clock() - start)
                if result != RAW_RESULT:
                    raise AssertionError(f"stored task returned {result!r}")
        return times

    return run


def section_store(plan: Any, make_app: Any) -> dict[str, Any]:
    from flask_executor import Executor

    directory = tempfile.mkdtemp(prefix="bench-store-")
    redis = _start_redis(directory)
    urls = {"memory": "memory", "sqlite": f"sqlite:///{directory}/tasks.db"}
    if redis is not None:
        urls["redis"] = redis[1]
    executors = []
    runners = []
    try:
        for name, url in urls.items():
            config = {"EXECUTOR_STORE": url, "SECRET_KEY": "bench", "EXECUTOR_MAX_WORKERS": 2}
            app = make_app(f"bench_store_{name}", **config)
            owner = Executor(app)
            reader = owner if name == "memory" else Executor(app, name="reader")
            if reader is not owner:  # the reader shares the owner's namespace
                app.config["READER_EXECUTOR_STORE"] = url
                app.config["READER_EXECUTOR_STORE_NAMESPACE"] = f"bench_store_{name}:executor"
                reader.init_app(app)
            executors += [owner, reader]
            runner = _runner(owner, reader, app)
            runner(20)  # warm-up: pool threads, connections, schema
            runners.append((name, runner))
        rounds = max(5, plan.rounds // 4)
        n = 20 if plan.quick else 50
        print(f"  submit_stored + poll state() from a reader + pop: {rounds} rounds x {n}")
        labels = {
            "memory": "memory store",
            "sqlite": "sqlite store (WAL file)",
            "redis": "redis store (local redis-server)",
        }
        figures = ratio_block(interleave(runners, rounds, n), "memory", labels)
        if redis is None:
            print_table(["note"], [["redis-server not installed: no Redis figure"]])
    finally:
        for executor in executors:
            executor.shutdown(wait=True)
            executor.futures.close()
        if redis is not None:
            os.killpg(redis[0].pid, signal.SIGTERM)
            redis[0].wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    memory = figures["memory"]["median"]
    return {
        "stores": figures,
        "sqlite_ratio": figures["sqlite"]["ratio"],
        "sqlite_added_us": (figures["sqlite"]["median"] - memory) * 1e6,
        "redis_ratio": figures["redis"]["ratio"] if "redis" in figures else None,
        "redis_added_us": (figures["redis"]["median"] - memory) * 1e6 if "redis" in figures
        else None,
    }
