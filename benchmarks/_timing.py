"""Measurement and reporting helpers for ``bench.py``.

The machine running a benchmark is rarely quiet. Rather than timing variant A
for ten seconds and then variant B, every variant runs one short *round* in
turn (a few milliseconds; the order rotates each round), so a burst of
background load hits all variants alike. Each round yields the median of its
per-operation timings; a variant's figure is the median of its per-round
medians, and a ratio is taken between two such figures from the same run.
The round-by-round ratios are reported too: when their median disagrees with
the headline ratio, the run was noisy.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import Any

__all__ = [
    "RESULT_TIMEOUT",
    "Runner",
    "batch",
    "interleave",
    "lower_quartile",
    "print_table",
    "ratio_block",
    "round_trips",
    "us",
]

#: ``runner(n)`` performs ``n`` operations and returns per-operation seconds
#: (one value per operation, or a single value for a batch).
Runner = Callable[[int], list[float]]

#: Seconds any single wait may take before the benchmark calls it a hang.
RESULT_TIMEOUT = 60.0


def round_trips(submit: Callable[[], Future[Any]], n: int) -> list[float]:
    """``n`` sequential submit-then-result round trips; seconds for each."""
    times = []
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        submit().result(RESULT_TIMEOUT)
        times.append(clock() - start)
    return times


def batch(submit: Callable[[], Future[Any]], n: int) -> list[float]:
    """Submit ``n`` tasks, then wait for all of them; seconds per task."""
    start = time.perf_counter()
    futures = [submit() for _ in range(n)]
    _, not_done = wait(futures, timeout=RESULT_TIMEOUT)
    elapsed = time.perf_counter() - start
    if not_done:
        raise TimeoutError(f"{len(not_done)} of {n} tasks not done after {RESULT_TIMEOUT} s")
    for future in futures:
        future.result(0)  # a task's error, if any
    return [elapsed / n]


def interleave(
    runners: Sequence[tuple[str, Runner]], rounds: int, n: int
) -> dict[str, list[float]]:
    """Run every runner ``rounds`` times, rotating the order each round, and
    return each runner's per-round medians (seconds per operation)."""
    medians: dict[str, list[float]] = {name: [] for name, _ in runners}
    for r in range(rounds):
        gc.collect()  # between rounds, never inside one; the rotation spreads its cost
        shift = r % len(runners)
        for name, runner in list(runners[shift:]) + list(runners[:shift]):
            medians[name].append(statistics.median(runner(n)))
    return medians


def ratio_block(
    medians: dict[str, list[float]], base: str, labels: dict[str, str], unit: str = "us"
) -> dict[str, dict[str, Any]]:
    """Print one table and return its figures for the JSON report.

    Per variant: ``median`` of its per-round medians (and their range), the
    headline ``ratio`` of that median to ``base``'s, the median and range of
    the round-by-round ratios (each round against the ``base`` round next to
    it), and ``q1_ratio``, between the lower quartiles of the per-round
    medians: the figure of the faster rounds, the least disturbed by other
    work on the machine.
    """
    base_median = statistics.median(medians[base])
    base_q1 = lower_quartile(medians[base])
    fmt: Callable[[float], str] = us if unit == "us" else (lambda s: f"{s:.3f}")
    out: dict[str, dict[str, Any]] = {}
    rows = []
    for name, per_round in medians.items():
        median = statistics.median(per_round)
        paired = [a / b for a, b in zip(per_round, medians[base], strict=True)]
        out[name] = {
            "median": median,
            "rounds": per_round,
            "ratio": median / base_median,
            "paired_ratios": paired,
            "paired_median": statistics.median(paired),
            "q1": lower_quartile(per_round),
            "q1_ratio": lower_quartile(per_round) / base_q1,
        }
        spread = f"{min(paired):.2f}-{max(paired):.2f}"
        rows.append(
            [
                labels[name],
                fmt(median),
                f"{fmt(min(per_round))}-{fmt(max(per_round))}",
                f"{median / base_median:.2f}x",
                "" if name == base else f"{statistics.median(paired):.2f}x ({spread})",
                "" if name == base else f"{lower_quartile(per_round) / base_q1:.2f}x",
            ]
        )
    unit_label = "us/task" if unit == "us" else "s"
    headers = [
        "variant",
        f"median {unit_label}",
        "round medians",
        f"vs {base}",
        "per-round",
        "fast quarter",
    ]
    print_table(headers, rows)
    return out


def lower_quartile(values: list[float]) -> float:
    """The 25th percentile (the value itself for a single round)."""
    return statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]


def us(seconds: float) -> str:
    """Seconds as microseconds, for tables."""
    return f"{seconds * 1e6:,.1f}"


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1, indent: str = "  "
) -> None:
    """A plain text table: the first ``left`` columns left-aligned, the others
    right-aligned."""
    cells = [list(headers)] + [list(row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return indent + "  ".join(padded).rstrip()

    print(line(headers))
    print(indent + "  ".join("-" * width for width in widths))
    for row in cells[1:]:
        print(line(row))
