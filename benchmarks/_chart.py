"""The benchmark chart: every ratio of one run, against its target."""

from __future__ import annotations

from typing import Any


def draw(results: dict[str, Any], summary: list[dict[str, Any]], path: str, meta: Any) -> None:
    """Write a horizontal bar chart of the summary's ratios to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Ratios only: a time (map's µs per item) on a ratio axis would read as one.
    rows = [
        line
        for line in summary
        if line.get("measured") is not None and line.get("unit", "x") == "x"
    ]
    labels = [line["target"] for line in rows]
    values = [float(line["measured"]) for line in rows]
    colours = []
    for line in rows:
        status = line["status"]
        colours.append(
            {"PASS": "#2e7d32", "MISS": "#c62828"}.get(status, "#78909c")
        )
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    positions = list(range(len(rows)))[::-1]
    ax.barh(positions, values, color=colours)
    for pos, line, value in zip(positions, rows, values, strict=True):
        limit = line.get("limit")
        if limit is not None:
            ax.plot([limit, limit], [pos - 0.4, pos + 0.4], color="black", linewidth=1.5)
        ax.text(value, pos, f" {value:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle="--")
    if values and max(values) / max(min(values), 1e-3) > 20:
        ax.set_xscale("log")  # ratios from 0.01x to 20x: a linear axis hides the small ones
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel("ratio (1.00x = the raw pool; black tick = target; green PASS, red MISS)")
    ax.set_title(
        f"flask-executor {meta['flask_executor_version']}: ratios measured in one run"
        f" ({meta['cpus']} CPUs, Python {meta['python']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
