"""Numbers from saved runs: curves, final accuracies, steps to a target, seed spread.

Everything here reads the JSON form of a run (a dict, as written to ``result.json``),
so analyses and plots work on a results directory alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

Run = dict[str, Any]

#: How many of the last test evaluations "final accuracy" averages (damps eval noise).
FINAL_WINDOW = 3


def test_rows(run: Run) -> list[dict[str, Any]]:
    """The run's test-set rows, in step order."""
    return [r for r in run["rows"] if r["split"] == "test"]


def curve(run: Run, key: str = "accuracy", split: str = "test") -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` in ``split`` rows (rows without a finite value skipped)."""
    steps, values = [], []
    for r in run["rows"]:
        v = r.get(key)
        if r["split"] == split and isinstance(v, (int, float)) and math.isfinite(v):
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def diverged(run: Run) -> bool:
    return run["outcome"] == "diverged"


def final_accuracy(run: Run, chance: float) -> float:
    """Mean test accuracy over the last :data:`FINAL_WINDOW` evaluations.

    A diverged run scores ``chance``: its weights are no longer numbers, so it
    predicts nothing.
    """
    if diverged(run):
        return chance
    _, acc = curve(run)
    tail = acc[-FINAL_WINDOW:]
    return sum(tail) / len(tail) if tail else chance


def best_accuracy(run: Run) -> float:
    """The highest test accuracy the run reached at an evaluation after training began
    (step > 0; 0 if none): the untrained network's score is not something it learned."""
    return max((a for step, a in zip(*curve(run)) if step > 0), default=0.0)


def show(value: float, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``; "n/a" when it is not finite (a
    measure no completed run gave), so a verdict's text never reads "nan%"."""
    return f"{value:{spec}}{suffix}" if math.isfinite(value) else "n/a"


def steps_to_reach(run: Run, target: float) -> int | None:
    """The first evaluated step after training began (step > 0) whose test accuracy is
    at least ``target``; None if there is none.

    Step 0 is the untrained network: a target it meets (chance, in a run too short to
    learn) is not reached by training. A diverged run never reaches a target.
    """
    if diverged(run):
        return None
    for step, acc in zip(*curve(run)):
        if step > 0 and acc >= target:
            return step
    return None


def by_label(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by label, in first-seen order, each group sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run["label"], []).append(run)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def std(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, min and max."""
    return {"mean": mean(values), "std": std(values),
            "min": min(values, default=math.nan), "max": max(values, default=math.nan)}


def separated(high: Sequence[float], low: Sequence[float]) -> bool:
    """The lab's seed-spread rule: every seed of ``high`` beats every seed of ``low``.

    The ranges over seeds do not overlap, so the difference is larger than the
    variation between seeds. With fewer than two seeds on a side there is no spread to compare, so the rule
    cannot hold: a single-seed run never passes it.
    """
    return len(high) >= 2 and len(low) >= 2 and min(high) > max(low)


def halfway(chance: float) -> float:
    """The accuracy halfway from chance to 100%: the lab's bar for "it learned"."""
    return chance + (1.0 - chance) / 2


def trained(run: Run, chance: float) -> bool:
    """Whether a run learned: it completed, and its final accuracy is at least halfway
    from chance to 100%. A claim that credits a network needs it to have trained: a
    network at chance "reaches" chance-level targets at once and has a flat landscape."""
    return not diverged(run) and final_accuracy(run, chance) >= halfway(chance)


class MeanCurve(NamedTuple):
    """A curve over seeds: at each step, the mean, min and max over the runs that have a
    value there, and how many runs that is (``count``)."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    count: list[int]


def mean_curve(runs: Sequence[Run], key: str = "accuracy", split: str = "test") -> MeanCurve:
    """Mean, min and max over runs at every step some run evaluated.

    A run that diverged stops early; the curve goes on over the others, and ``count``
    says how many runs each point is the mean of, so a plot can show where the set of
    seeds shrinks instead of ending every curve at the first divergence.
    """
    curves = [dict(zip(*curve(r, key, split))) for r in runs]
    steps = sorted({s for c in curves for s in c})
    vals = [[c[s] for c in curves if s in c] for s in steps]
    return MeanCurve(steps, [mean(v) for v in vals], [min(v) for v in vals],
                     [max(v) for v in vals], [len(v) for v in vals])


def final_by_param(
    runs: Iterable[Run], param: str, chance: float
) -> dict[str, dict[int, dict[Any, float]]]:
    """label -> seed -> the run's ``params[param]`` -> :func:`final_accuracy`, labels in
    first-seen order: for experiments that sweep one parameter (an init scale, a batch
    size) per configuration."""
    table: dict[str, dict[int, dict[Any, float]]] = {}
    for r in runs:
        table.setdefault(r["label"], {}).setdefault(r["seed"], {})[r["params"][param]] = (
            final_accuracy(r, chance))
    return table


def mean_over_seeds(by_seed: dict[int, dict[Any, float]]) -> dict[Any, float]:
    """Of a :func:`final_by_param` entry: the mean over seeds per parameter value, for the
    values every seed has, in sorted order."""
    values = set.intersection(*(set(a) for a in by_seed.values()))
    return {v: mean([a[v] for a in by_seed.values()]) for v in sorted(values)}


def fmt_range(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``"0.912 (0.905..0.918)"``: mean and the range over seeds."""
    if not values:
        return "n/a"
    v = [x * scale for x in values]
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{mean(v):.{digits}f} ({min(v):.{digits}f}..{max(v):.{digits}f})"
