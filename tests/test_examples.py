"""Smoke tests: every example under examples/ runs end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_and_each_task_sees_its_own_context() -> None:
    out = run_script("demo.py")
    assert "thread task for alice: mailed alice@example.com from /signup" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "'SECRET_KEY in worker': None" in out
    assert "done: every task saw its own request, g and config." in out


@pytest.mark.slow
def test_dask_demo_runs_the_same_app_on_a_cluster() -> None:
    out = run_script("dask_demo.py", timeout=180)
    assert "2. dask pool" in out
    assert "'user': 'alice'" in out and "'region': 'eu'" in out
    assert "'user': 'bob'" in out and "'region': 'us'" in out
    assert "done: every task saw its own request, g and config." in out


def run_script(path: str, timeout: float = 120) -> str:
    """Run ``examples/<path>`` as a script; return its output."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_example(name: str) -> str:
    """Run ``examples/<name>/app.py`` as a script; return its output."""
    return run_script(f"{name}/app.py")


@pytest.mark.slow
def test_quickstart_tasks_see_the_form_and_g() -> None:
    out = run_example("quickstart")
    assert "send_email saw: form email=alice@example.com, g.user=alice, path=/signup" in out
    assert "view answered: Welcome! Check your inbox." in out
    assert "poll: done" in out
    assert "'requested by': 'bob'" in out and "'year': 2024" in out
    assert out.rstrip().endswith("done.")


@pytest.mark.slow
def test_progress_updates_arrive_while_the_job_runs() -> None:
    out = run_example("progress")
    assert "GET / has a <progress> bar" in out
    running = re.findall(r"^\s+running\s+progress=([\d.]+)", out, flags=re.MULTILINE)
    assert len(set(running)) >= 3, out
    assert all(0 <= float(value) < 1 for value in running), out
    assert re.search(r"^\s+finished\s+progress=1\.0 \(done\)$", out, flags=re.MULTILINE), out
    assert out.index("running") < out.index("finished")
    assert "state: finished" in out
    assert "result: 285" in out


@pytest.mark.slow
def test_sqlalchemy_factory_workers_use_db_session() -> None:
    out = run_example("sqlalchemy_factory")
    assert "POST /reports/eu: {'grand_total': 245, 'reports': 1," in out
    assert "POST /reports/us: {'grand_total': 545, 'reports': 2," in out
    web_pid = re.search(r"web process \(pid (\d+)\)", out)
    rows = re.findall(r"^  (\w+): total=(\d+), written by pid (\d+)$", out, flags=re.MULTILINE)
    assert web_pid and [row[:2] for row in rows] == [("eu", "245"), ("us", "300")], out
    assert all(pid != web_pid.group(1) for _, _, pid in rows), out
