"""Plot helpers on matplotlib's object API (no pyplot, so no global figure state and
no display needed).
"""

from __future__ import annotations

import io
import math
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

    The curve covers every step some seed reached. Where fewer seeds than the group's
    have a value (one diverged and stopped), the line is dashed: it is the mean of the
    seeds left. Each diverged run is marked with an x at its last value, at the step
    where it diverged, and the legend names the diverged seeds, so no mean over a
    changing set of seeds goes unsaid.
    """
    curve = stats.mean_curve(runs, key, split)
    n = len(runs)
    full = [c == n for c in curve.count]
    diverged = [r for r in runs if stats.diverged(r)]
    notes = [f"n={n}"]
    if len(diverged) == 1:
        notes.append(f"seed {diverged[0]['seed']} diverged at step "
                     f"{diverged[0]['diverged_step']} (x)")
    elif diverged:
        notes.append("diverged (x): " + ", ".join(
            f"seed {r['seed']} at step {r['diverged_step']}" for r in diverged))
    if not all(full):
        notes.append("dashed: mean of fewer seeds")
    text = f"{label} ({'; '.join(notes)})"
    if curve.steps:
        mid = [v * scale for v in curve.mean]
        # Solid between points that average every seed; dashed on any segment that
        # touches a point averaging fewer.
        solid = [v if ok else math.nan for v, ok in zip(mid, full)]
        dashed = [v if not all(full[max(i - 1, 0):i + 2]) else math.nan
                  for i, v in enumerate(mid)]
        (solid_line,) = ax.plot(curve.steps, solid, color=color)
        (dashed_line,) = ax.plot(curve.steps, dashed, color=color, linestyle="--")
        # The legend entry takes the style of the curve's start: solid unless the
        # group's seeds were incomplete from the first step.
        (solid_line if full[0] else dashed_line).set_label(text)
        if n > 1:
            ax.fill_between(curve.steps, [v * scale for v in curve.low],
                            [v * scale for v in curve.high], color=color, alpha=0.2,
                            linewidth=0)
    for run in diverged:
        _, v = stats.curve(run, key, split)
        if v:  # a run that diverged before its first evaluation has no value to mark
            ax.plot([run["diverged_step"]], [v[-1] * scale], "x", color=color, markersize=8)


def seed_band(
    ax: Axes, x: Sequence[float], per_seed: Sequence[Sequence[float]], label: str,
    color: str, scale: float = 1.0, **line: Any,
) -> None:
    """Values measured at the same ``x`` in every seed (one sequence per seed): the
    mean over seeds as a line, the min..max as a shaded band, ``n`` in the legend."""
    if not per_seed:
        return
    columns = list(zip(*per_seed))
    ax.plot(x, [scale * stats.mean(c) for c in columns], color=color,
            label=f"{label} (n={len(per_seed)})", **line)
    if len(per_seed) > 1:
        ax.fill_between(x, [scale * min(c) for c in columns], [scale * max(c) for c in columns],
                        color=color, alpha=0.2, linewidth=0)


def percent_axis(ax: Axes) -> None:
    """Label the y axis as test accuracy in percent."""
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)


def legend(ax: Axes, **kwargs: Any) -> None:
    """A legend when the axes have labelled artists (a panel whose runs all diverged
    before their first evaluation has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)
