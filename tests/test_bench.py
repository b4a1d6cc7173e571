"""``benchmarks/bench.py`` as its documentation runs it, and its verdict on each
goal of issue 13 (``benchmarks/_goals.py``): a figure is judged against its
goal and, where the goal is under what Flask's public API allows, against the
floor measured in the same run. Nothing here is timed: the figures of the
verdict tests are made up, the verdicts are what is checked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks", "bench.py")


def test_the_json_and_chart_paths_of_the_docs_work_in_a_fresh_clone(tmp_path: Any) -> None:
    """docs/benchmarks.rst writes ``benchmarks/results/run.json``, a directory
    git does not hold: the run makes it (before it runs, not after)."""
    out = tmp_path / "results" / "run.json"
    proc = subprocess.run(
        [sys.executable, BENCH, "--quick", "--only", "config", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["sections"]["config"]["ratio"] > 0
    assert report["goals"] == []  # the config section has no goal of issue 13
    assert report["leftovers"] == []


@pytest.fixture(scope="module")
def goals() -> ModuleType:
    path = os.path.join(os.path.dirname(HERE), "benchmarks", "_goals.py")
    spec = importlib.util.spec_from_file_location("bench_goals_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("value", "limit", "floor", "status"),
    [
        (0.9, 1.0, None, "MET"),
        (1.0, 1.0, 1.2, "MET"),
        (1.1, 1.0, None, "MISS"),
        (1.1, 1.0, 0.9, "MISS"),  # the floor is under the goal: no excuse
        (1.1, 1.0, 1.2, "BELOW FLOOR"),
        (1.2, 1.0, 1.2, "BELOW FLOOR"),
        (1.5, 1.0, 1.2, "MISS"),
    ],
)
def test_a_figure_is_judged_against_its_goal_then_its_floor(
    goals: ModuleType, value: float, limit: float, floor: float | None, status: str
) -> None:
    assert goals.judge(value, limit, floor)[0] == status


def test_a_miss_above_the_floor_says_how_far_above_the_floor_it_is(goals: ModuleType) -> None:
    status, note = goals.judge(3.0, 2.0, 2.5)
    assert status == "MISS"
    assert note == "1.20x the floor, which is above the goal"


def _results() -> dict[str, Any]:
    return {
        "thread": {"ratio": 3.0, "floor_ratio": 2.5},
        "process": {"ratio": 1.3, "floor_ratio": 1.5},
        "cpu": {"ours_vs_raw": 0.98},
        "cold": {"error": "Traceback ..."},
        "throughput": {
            "large": {
                "time_ratio": 0.9,
                "peak_ratio": 0.6,
                "medians": {"ours": {"held": 0.004}},
            },
        },
    }


def test_each_goal_of_a_section_that_ran_gets_a_line(goals: ModuleType) -> None:
    lines = {line["goal"]: line for line in goals.goal_lines(_results())}
    assert lines["thread: sequential round trip, ours/raw"]["status"] == "MISS"
    assert "1.20x the floor" in lines["thread: sequential round trip, ours/raw"]["text"]
    assert lines["process: sequential round trip, ours/raw"]["status"] == "BELOW FLOOR"
    assert lines["process: sequential round trip, ours/raw"]["floor"] == 1.5
    assert lines["CPU-bound fib x 64 on 2 workers, ours' time/raw's"]["status"] == "MET"
    # A fraction of a copy of tracemalloc noise is not a copy held.
    held = lines["process: 100 MiB round trip, held after del, in copies"]
    assert held["status"] == "MET"
    # Sections that did not run, or failed, have no line (not a false MET).
    assert not any(name.startswith("cold start") for name in lines)
    assert not any("10,000" in name for name in lines)
    assert len(lines) == 6


def test_a_copy_held_after_del_is_a_miss(goals: ModuleType) -> None:
    results = _results()
    results["throughput"]["large"]["medians"]["ours"]["held"] = 1.0
    lines = {line["goal"]: line for line in goals.goal_lines(results)}
    assert lines["process: 100 MiB round trip, held after del, in copies"]["status"] == "MISS"
