"""Curves over seeds and the figures drawn from them, on crafted runs: a diverged seed
must neither cut the other seeds' curves short nor hide in a mean."""

from __future__ import annotations

import math
from typing import Any

import pytest

from batchnorm.lab import plots, stats
from batchnorm.lab.experiments import get
from batchnorm.lab.experiments.distributions import AFFINE, ENTERS, NORMALIZED


def _run(seed: int, curve: dict[int, float], diverged_at: int | None = None,
         label: str = "net", **extra: Any) -> dict[str, Any]:
    """A run as ``result.json`` holds it: test accuracy at the given steps."""
    return {
        "label": label, "seed": seed, "params": {}, "extra": extra,
        "outcome": "completed" if diverged_at is None else "diverged",
        "diverged_step": diverged_at,
        "rows": [{"step": s, "split": "test", "accuracy": a, "loss": 1.0}
                 for s, a in curve.items()],
    }


# The audit's case: seed 0 diverged at step 224, seed 1 ran on at chance.
_DIVERGED = _run(0, {0: 0.1, 100: 0.3, 200: 0.5}, diverged_at=224)
_AT_CHANCE = _run(1, {0: 0.1, 100: 0.26, 200: 0.45, 300: 0.1, 400: 0.1})


@pytest.mark.parametrize(("runs", "steps", "mean", "count"), [
    # every seed everywhere: the plain mean
    ([_run(0, {0: 0.1, 100: 0.5}), _run(1, {0: 0.3, 100: 0.7})],
     [0, 100], [0.2, 0.6], [2, 2]),
    # a diverged seed stops; the curve goes on over the seed left
    ([_DIVERGED, _AT_CHANCE], [0, 100, 200, 300, 400], [0.1, 0.28, 0.475, 0.1, 0.1],
     [2, 2, 2, 1, 1]),
    # steps only one seed evaluated count that one seed
    ([_run(0, {0: 0.2, 50: 0.4}), _run(1, {0: 0.4, 100: 0.6})],
     [0, 50, 100], [0.3, 0.4, 0.6], [2, 1, 1]),
    ([], [], [], []),
])
def test_mean_curve_covers_every_step_a_seed_reached(
    runs: list[dict[str, Any]], steps: list[int], mean: list[float], count: list[int]
) -> None:
    curve = stats.mean_curve(runs)
    assert curve.steps == steps and curve.count == count
    assert curve.mean == pytest.approx(mean)
    assert all(lo <= m <= hi for lo, m, hi in zip(curve.low, curve.mean, curve.high))


def _lines(ax: Any) -> list[tuple[list[float], list[float], str, str]]:
    """The axes' lines as (x, y, line style, label), NaN points dropped."""
    out = []
    for line in ax.get_lines():
        xs, ys = line.get_xdata(), line.get_ydata()
        kept = [(float(x), float(y)) for x, y in zip(xs, ys) if not math.isnan(y)]
        out.append(([x for x, _ in kept], [y for _, y in kept], line.get_linestyle(),
                    line.get_label()))
    return out


@pytest.mark.parametrize(("runs", "solid_to", "dashed", "marks", "label"), [
    ([_run(0, {0: 0.1, 100: 0.5}), _run(1, {0: 0.3, 100: 0.7})],
     100, [], [], "net (n=2)"),
    ([_DIVERGED, _AT_CHANCE], 200, [200, 300, 400], [(224, 50.0)],
     "net (n=2; seed 0 diverged at step 224 (x); dashed: mean of fewer seeds)"),
    ([_DIVERGED, _run(2, {0: 0.1, 100: 0.2}, diverged_at=150), _AT_CHANCE], 100,
     [100, 200, 300, 400], [(224, 50.0), (150, 20.0)],
     ("net (n=3; diverged (x): seed 0 at step 224, seed 2 at step 150; "
      "dashed: mean of fewer seeds)")),
])
def test_band_shows_every_seed_and_says_which_diverged(
    runs: list[dict[str, Any]], solid_to: int, dashed: list[int],
    marks: list[tuple[int, float]], label: str,
) -> None:
    _fig, (ax,) = plots.figure()
    plots.band(ax, runs, "net", "black", scale=100)
    lines = _lines(ax)
    solid = [x for x, _, style, _ in lines if style == "-"]
    assert solid and max(solid[0]) == solid_to
    assert [x for x, _, style, _ in lines if style == "--"] == [dashed]
    assert [(x[0], round(y[0], 6)) for x, y, style, _ in lines if style == "None"] == marks
    assert [text for _, _, _, text in lines if not text.startswith("_")] == [label]
    # the curve reaches the last step any seed evaluated
    assert max(x for xs, _, _, _ in lines for x in xs) == max(
        r["rows"][-1]["step"] for r in runs)


def test_band_of_a_group_incomplete_from_the_start_has_a_dashed_legend_entry() -> None:
    _fig, (ax,) = plots.figure()
    plots.band(ax, [_run(0, {100: 0.5, 200: 0.6}), _run(1, {0: 0.1, 100: 0.7, 200: 0.8})],
               "net", "black")
    (entry,) = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert entry.get_linestyle() == "--"
    # from step 100 on both seeds are there: that segment stays solid
    (solid,) = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert [x for x, y in zip(solid.get_xdata(), solid.get_ydata()) if not math.isnan(y)] == [
        100, 200]


def test_seed_band_draws_the_mean_and_the_range() -> None:
    _fig, (ax,) = plots.figure()
    plots.seed_band(ax, [2, 4], [[0.4, 0.8], [0.6, 0.9]], "batch", "black", scale=100)
    (line,) = ax.get_lines()
    assert list(line.get_ydata()) == pytest.approx([50.0, 85.0])
    assert line.get_label() == "batch (n=2)"
    assert len(ax.collections) == 1  # the min..max band


def _inference_run(seed: int, setting: str, pop: float, by_batch: dict[str, float]
                   ) -> dict[str, Any]:
    run = _run(seed, {0: 0.1, 10: pop}, label=f"BN, {setting}")
    run["params"] = {"setting": setting}
    run["extra"] = {"end": {"population_accuracy": pop, "batch_stat_accuracy": by_batch}}
    return run


def test_inference_left_panel_shows_the_seed_spread() -> None:
    record = {"config": {"test_batch_sizes": [2, 16]}, "runs": [
        _inference_run(0, "momentum 0.1", 0.90, {"2": 0.40, "16": 0.85}),
        _inference_run(1, "momentum 0.1", 0.94, {"2": 0.50, "16": 0.89}),
        _inference_run(0, "cumulative", 0.80, {"2": 0.40, "16": 0.85}),
        _inference_run(1, "cumulative", 0.86, {"2": 0.50, "16": 0.89}),
    ]}
    ((_caption, fig),) = get("inference").figures(record)
    left = fig.axes[0]
    labels = [line.get_label() for line in left.get_lines()]
    assert labels == ["statistics of the test batch (n=2)",
                      "running averages, momentum 0.1 (n=2)", "running averages, cumulative (n=2)"]
    assert list(left.get_lines()[0].get_ydata()) == pytest.approx([45.0, 87.0])
    # one band for the batch-statistics line, one span per population line
    assert len(left.collections) == 1
    assert len(left.patches) == 2


def _distributions_run(label: str, seed: int, completed: bool) -> dict[str, Any]:
    stages = {s: {"sample": [0.0, 0.5, 1.0]} for s in (ENTERS, NORMALIZED, AFFINE)}
    extra = {"start": {"stages": stages}, "end": {"stages": stages}} if completed else {}
    return _run(seed, {0: 0.1}, label=label, **extra)


@pytest.mark.parametrize(("done", "seeds"), [
    ({("baseline", 0), ("baseline", 1), ("BN", 0), ("BN", 1)}, "seed 0"),
    # seed 0's baseline diverged: the panels show seed 1, which completed in both
    ({("baseline", 1), ("BN", 0), ("BN", 1)}, "seed 1"),
    # no seed completed in both networks: each network's own seed is named
    ({("baseline", 1), ("BN", 0)}, "seeds 1 (baseline), 0 (BN)"),
])
def test_distributions_caption_names_the_seeds_plotted(done: set[tuple[str, int]],
                                                       seeds: str) -> None:
    runs = [_distributions_run(label, seed, (label, seed) in done)
            for label in ("baseline", "BN") for seed in (0, 1)]
    record = {"config": {"layer": 1, "probe_examples": 3}, "runs": runs}
    ((caption, _fig),) = get("distributions").figures(record)
    assert caption.startswith(f"Hidden layer 1, {seeds}: ")
