"""Smoke tests: every example under examples/ runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_and_each_task_sees_its_own_context() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "thread task for alice: mailed alice@example.com from /signup" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "'SECRET_KEY in worker': None" in out
    assert "done: every task saw its own request, g and config." in out


@pytest.mark.slow
def test_dask_demo_runs_the_same_app_on_a_cluster() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dask_demo.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2. dask pool" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "done: every task saw its own request, g and config." in out
