"""Plot helpers on matplotlib's object API (no pyplot, so no global figure state and
no display needed).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchnorm.lab import stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

BASELINE_COLOR = "#444444"
BN_COLOR = "#1f77b4"
PALETTE: tuple[str, ...] = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
                            "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[
    Figure, list[Axes]
]:
    """A figure of ``nrows x ncols`` axes, each ``width x height`` inches; axes row-major."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def band(
    ax: Axes, runs: Sequence[dict[str, Any]], label: str, color: str,
    key: str = "accuracy", split: str = "test", scale: float = 1.0,
) -> None:
    """The mean over seeds as a line and the min..max over seeds as a shaded band.

    Diverged runs are marked with an x at the step where they diverged.
    """
    steps, mid, low, high = stats.mean_curve(runs, key, split)
    if steps:
        ax.plot(steps, [v * scale for v in mid], color=color, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, [v * scale for v in low], [v * scale for v in high],
                            color=color, alpha=0.2, linewidth=0)
    for run in runs:
        if stats.diverged(run):
            _, v = stats.curve(run, key, split)
            ax.plot([run["diverged_step"]], [(v[-1] if v else 0.0) * scale], "x", color=color,
                    markersize=8)


def percent_axis(ax: Axes) -> None:
    """Label the y axis as test accuracy in percent."""
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def legend(ax: Axes, **kwargs: Any) -> None:
    """A legend when the axes have labelled artists (a panel whose runs all diverged
    before their first evaluation has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)
