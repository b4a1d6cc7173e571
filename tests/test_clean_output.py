"""The suite's output stays readable: the deliberate crash cases crash for real, without
printing a ``Fatal Python error`` traceback in the middle of the dots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_deliberate_crashes_print_no_fatal_error_report() -> None:
    # pytest enables faulthandler, and forked workers inherit it: a worker that segfaults
    # on purpose would print its C-level traceback to the terminal.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_faults.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-k",
            "crash or sigsegv or null",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert " passed" in out and " deselected" in out, out
    assert "Fatal Python error" not in out, out
