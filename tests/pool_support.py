"""Tasks and worker initializers for tests/test_pool_lifecycle.py (module-level, so that
process workers import them by reference)."""

from __future__ import annotations

import gc
import os
import signal
import struct
import subprocess
import sys
import textwrap
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fault_support import write_pid
from flask import current_app

TESTS_DIR = str(Path(__file__).parent)

#: What ``init_worker`` saw, in this worker process.
INITIALIZED: tuple[Any, ...] | None = None
INIT_CALLS = 0


def init_worker() -> None:
    """A worker initializer: records the worker app's config value and a call count."""
    global INITIALIZED, INIT_CALLS
    INIT_CALLS += 1
    INITIALIZED = (current_app.config["INIT_VALUE"], os.getpid())


def read_init() -> tuple[Any, int]:
    return INITIALIZED, INIT_CALLS


def failing_init() -> None:
    """A worker initializer that notes each attempt, then raises."""
    with open(current_app.config["INIT_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{os.getpid()}\n")
    raise ValueError("no model here")


def size_of(data: bytes) -> int:
    return len(data)


def freeze_mid_message(pid_path: str) -> None:
    """Task: write the start of a message (a header promising 1 MB, then 1000 bytes) on
    the worker's own connection to the web process, then SIGSTOP this worker.

    The web process now holds half a message from a frozen worker, exactly as when a
    worker is stopped while it sends a large result.
    """
    conns = [o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed]
    if len(conns) != 1:
        raise RuntimeError(f"expected the worker's one connection, found {len(conns)}")
    write_pid(pid_path)
    os.write(conns[0].fileno(), struct.pack("!i", 1 << 20) + b"x" * 1000)
    os.kill(os.getpid(), signal.SIGSTOP)


def run_script(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    """Start ``source`` as a Python script in ``tmp_path`` (tests/ on its path)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, *sys.path])}
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
