"""The goals of issue 13 (throughput and load), each judged in one run.

Each goal is a figure of one run, the goal it must reach, and, where Flask's
public API puts a cost under every way of giving a task its context, Flask's
own floor for the same figure measured in the same run. A goal is

- ``MET``: the figure reaches the goal;
- ``BELOW FLOOR``: it does not, but Flask's floor itself is above the goal, and
  the figure is at or below that floor (nothing built on Flask's public API
  can reach the goal on this machine; the issue asks for the floor then);
- ``MISS``: otherwise. When the floor is above the goal the verdict says how
  far above the floor the figure is.

A goal whose section did not run (``--only``) is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["GOALS", "Goal", "goal_lines", "judge"]

Figure = Callable[[dict[str, Any]], "float | None"]


class Goal(NamedTuple):
    label: str
    #: the largest figure that meets the goal (every goal here is "at most")
    limit: float
    unit: str  # "x" or " us"
    value: Figure
    floor: Figure | None = None
    #: how far above ``limit`` a figure is measurement noise, not a miss
    noise: float = 0.0


def _get(section: str, *keys: str) -> Figure:
    """The figure at ``results[section][keys[0]][keys[1]]...``; ``None`` when
    the section did not run, failed, or lacks it."""

    def figure(results: dict[str, Any]) -> float | None:
        data: Any = results.get(section)
        if not data or "error" in data:
            return None
        for key in keys:
            if not isinstance(data, dict) or data.get(key) is None:
                return None
            data = data[key]
        return float(data)

    return figure


GOALS: tuple[Goal, ...] = (
    Goal("process: submit 10,000 then wait, full context, ours/raw", 1.0, "x",
         _get("load", "ours_ratio"), _get("load", "floor_ratio")),
    Goal("process: map of 100,000 items, default chunksize, us per item", 15.0, " us",
         _get("throughput", "map_us_per_item"), _get("throughput", "map_floor_us_per_item")),
    Goal("process: map without context / raw best-chunked map", 2.0, "x",
         _get("throughput", "plain_vs_best")),
    Goal("thread: submit 20,000 then results, ours/Flask-Executor 1.0", 1.0, "x",
         _get("compare", "thread_batch_vs_v1")),
    Goal("thread: sequential round trip, ours/raw", 2.0, "x",
         _get("thread", "ratio"), _get("thread", "floor_ratio")),
    Goal("process: sequential round trip, ours/raw", 1.1, "x",
         _get("process", "ratio"), _get("process", "floor_ratio")),
    Goal("CPU-bound fib x 64 on 2 workers, ours' time/raw's", 1.0, "x",
         _get("cpu", "ours_vs_raw"), _get("cpu", "floor_vs_raw")),
    Goal("cold start to first result, ours/raw", 1.0, "x",
         _get("cold", "ratio"), _get("cold", "floor_ratio")),
    Goal("process: 100 MiB argument and result, time, ours/raw", 1.0, "x",
         _get("throughput", "large", "time_ratio")),
    Goal("process: 100 MiB round trip, web-process peak, ours/raw", 1.0, "x",
         _get("throughput", "large", "peak_ratio")),
    # tracemalloc's "held after del" is a fraction of a copy: up to 1 % of one
    # is the allocator's noise, not a copy kept
    Goal("process: 100 MiB round trip, held after del, in copies", 0.0, "x",
         _get("throughput", "large", "medians", "ours", "held"), noise=0.01),
    Goal("thread: round trip with a 1 MB g / small g", 5.0, "x",
         _get("throughput", "thread_g_ratio"), _get("throughput", "thread_g_floor_handoff")),
    Goal("process: round trip with a 512 KB JSON body / small", 2.0, "x",
         _get("throughput", "process_body_ratio"), _get("throughput", "process_body_floor")),
    Goal("process: round trip with a 1 MB g / small g", 2.0, "x",
         _get("throughput", "process_g_ratio"), _get("throughput", "process_g_floor")),
)  # fmt: skip

def judge(value: float, limit: float, floor: float | None) -> tuple[str, str]:
    """The verdict on one figure, and what it says beside the figures."""
    if value <= limit:
        return "MET", ""
    if floor is None or floor <= limit:
        return "MISS", ""
    if value <= floor:
        return "BELOW FLOOR", "the goal is under the floor; the figure is at or below it"
    return "MISS", f"{value / floor:.2f}x the floor, which is above the goal"


def goal_lines(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per goal whose figure this run has."""
    lines = []
    for goal in GOALS:
        value = goal.value(results)
        if value is None:
            continue
        floor = goal.floor(results) if goal.floor is not None else None
        status, note = judge(value, goal.limit + goal.noise, floor)
        unit = goal.unit
        text = f"{value:.2f}{unit}  goal <= {goal.limit:g}{unit}"
        if floor is not None:
            text += f"  floor {floor:.2f}{unit}"
        text += f"  {status}"
        if note:
            text += f" ({note})"
        lines.append(
            {
                "goal": goal.label,
                "measured": value,
                "limit": goal.limit,
                "floor": floor,
                "unit": unit,
                "status": status,
                "text": text,
            }
        )
    return lines
