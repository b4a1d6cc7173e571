"""The benchmark chart of one run: the summary's targets, then issue 13's goals
against their goals and floors."""

from __future__ import annotations

from typing import Any

COLOURS = {"PASS": "#2e7d32", "MET": "#2e7d32", "BELOW FLOOR": "#f9a825", "MISS": "#c62828"}


def draw(
    results: dict[str, Any],
    summary: list[dict[str, Any]],
    path: str,
    meta: Any,
    goals: list[dict[str, Any]] | None = None,
) -> None:
    """Write a PNG to ``path``: a bar per summary target (its ratio, a tick at
    the target), and a bar per goal of issue 13 whose goal is above zero (the
    figure divided by its goal, so 1.0 is the goal; a diamond at the floor
    measured in the same run, divided alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [line for line in summary if line["status"] in ("PASS", "MISS")]
    judged = [line for line in goals or [] if line["limit"] > 0]
    panels = [(targets, "target")] + ([(judged, "goal")] if judged else [])
    heights = [max(len(rows), 1) for rows, _ in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, 0.42 * sum(heights) + 1.2 * len(panels) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (rows, kind) in zip(axes[:, 0], panels, strict=True):
        if kind == "target":
            _targets(ax, rows)
        else:
            _goals(ax, rows)
    axes[0, 0].set_title(
        f"flask-executor {meta['flask_executor_version']}: one run of benchmarks/bench.py"
        f" ({meta['cpus']} CPUs, Python {meta['python']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _targets(ax: Any, rows: list[dict[str, Any]]) -> None:
    positions = list(range(len(rows)))[::-1]
    values = [float(line["measured"]) for line in rows]
    ax.barh(positions, values, color=[COLOURS[line["status"]] for line in rows])
    for pos, line, value in zip(positions, rows, values, strict=True):
        limit = line["limit"]
        ax.plot([limit, limit], [pos - 0.4, pos + 0.4], color="black", linewidth=1.5)
        ax.text(value, pos, f" {value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    if values and max(values) / max(min(values), 1e-3) > 20:
        _log_axis(ax)  # ratios from 0.01x to 20x: a linear axis hides the small ones
    ax.set_yticks(positions, [line["target"] for line in rows], fontsize=8)
    ax.set_xlabel(
        "targets: ratio (1.00x = the raw pool; black tick = target; green PASS, red MISS)",
        fontsize=8,
    )


def _goals(ax: Any, rows: list[dict[str, Any]]) -> None:
    positions = list(range(len(rows)))[::-1]
    shares = [float(line["measured"]) / line["limit"] for line in rows]
    ax.barh(positions, shares, color=[COLOURS[line["status"]] for line in rows])
    for pos, line, share in zip(positions, rows, shares, strict=True):
        end = share
        if line["floor"] is not None:
            floor = line["floor"] / line["limit"]
            ax.plot(floor, pos, marker="D", color="black", markersize=4)
            end = max(end, floor)
        ax.text(end * 1.03, pos, f" {line['measured']:.2f}{line['unit']}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1.2)
    _log_axis(ax)  # from well under the goal to 10x over it (a 1 MB g in processes)
    ax.set_yticks(positions, [line["goal"] for line in rows], fontsize=8)
    ax.set_xlabel(
        "issue 13: the figure / its goal (1.0 = the goal; diamond = the floor measured in the"
        " same run;\ngreen MET, amber BELOW FLOOR: the goal is under the floor, red MISS)",
        fontsize=8,
    )


def _log_axis(ax: Any) -> None:
    """A log x axis labelled 0.2, 0.5, 1, 2, 5, ... in plain numbers: the
    default labels every minor tick in powers of ten, and they overlap."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
