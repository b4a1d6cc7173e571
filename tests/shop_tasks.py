"""Tasks of a small shop app, for the dashboard's browser test and its screenshot (module
level: process workers import them by reference)."""

from __future__ import annotations

import os
import time

from fault_support import write_pid
from support import wait_for_path

from flask_executor import current_task


def render_report(gate: str, steps: int = 40) -> str:
    """Advance the progress bar one step every 0.15 s, then hold at 90 % until the gate."""
    step = 0
    while not os.path.exists(gate):
        current_task.update(progress=min(0.9, step / steps), stage=f"page {step + 1}")
        step += 1
        time.sleep(0.15)
    return "report.pdf"


def long_export(pid_file: str, gate: str) -> None:
    """Write this worker's pid, then run until stopped (or the gate opens)."""
    current_task.update(progress=0.15, rows=1200)
    write_pid(pid_file)  # atomically: the test reads it as soon as it exists
    wait_for_path(gate, timeout=120)


def import_customers() -> None:
    raise ValueError("row 17: missing email address")


def send_email(to: str) -> str:
    return f"sent to {to}"


def resize_images(count: int) -> int:
    current_task.update(progress=1.0, images=count)
    return count
