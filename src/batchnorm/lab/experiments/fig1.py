"""Ioffe & Szegedy (2015), Figure 1: a sigmoid MLP on MNIST with and without BN.

(a) test accuracy against training steps; (b, c) the 15th, 50th and 85th
percentiles of one last-hidden-layer sigmoid's input over training. Both networks
use the same small Gaussian initialization, batch size and learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.diagnostics import layer_inputs, quantiles
from batchnorm.lab.experiments.base import MIXED, Analysis, Experiment, Verdict, grade
from batchnorm.lab.models import MLP, Activation, MLPSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, Probe, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

PERCENTILES: tuple[float, ...] = (0.15, 0.50, 0.85)


@dataclass(frozen=True)
class Fig1Config(LabConfig):
    """Figure 1's setup. Defaults are the quick preset.

    Attributes:
        hidden: hidden layer widths (the paper: three layers of 100).
        activation: the nonlinearity (the paper: sigmoid).
        init_std: weights drawn from N(0, init_std²) ("small random Gaussian values").
        optimizer, lr, batch_size, steps: training; the same for both networks.
        eval_every: steps between test evaluations.
        unit: which sigmoid of the last hidden layer the percentile plots follow.
        probe_examples: test examples the percentiles are taken over.
        speedup_threshold: BN must reach the baseline's final accuracy this many
            times faster for claim 1 to be supported.
        drift_threshold: the baseline's drift of the median sigmoid input must be this
            many times BN's for claim 2 to be supported.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: Activation = "sigmoid"
    init_std: float = 0.01
    optimizer: Optimizer = "sgd"
    lr: float = 0.5
    batch_size: int = 60
    steps: int = 6000
    eval_every: int = 100
    unit: int = 0
    probe_examples: int = 1000
    speedup_threshold: float = 2.0
    drift_threshold: float = 2.0

    def check(self) -> None:
        super().check()
        if not 0 <= self.unit < self.hidden[-1]:
            raise ConfigError(
                f"--unit: expected 0 <= unit < {self.hidden[-1]} (the last hidden layer's "
                f"units), got {self.unit}")


class SigmoidInputProbe(Probe):
    """Percentiles of the last hidden layer's activation inputs on test examples, in
    eval mode (population statistics), except at step 0: there a BN network's running
    statistics are still their placeholders (mean 0, variance 1), not estimates, so the
    batch's own statistics stand in for them, as training sees them."""

    def __init__(self, unit: int, examples: int):
        self.unit = unit
        self.examples = examples

    def at_eval(self, model: MLP, data: Dataset, step: int) -> dict[str, Any]:
        act = model.blocks[-1].act
        z = layer_inputs(
            model, data.x_test[: self.examples], {"act": act}, batch_stats=step == 0
        )["act"]
        qs = quantiles(z, PERCENTILES)
        unit = qs[:, self.unit].tolist()
        return {
            "p15": unit[0], "p50": unit[1], "p85": unit[2],
            # every unit's median, for a drift measure over the whole layer
            "unit_medians": [round(v, 5) for v in torch.median(z, dim=0).values.tolist()],
        }


def _never(steps: list[float]) -> str:
    """A note on seeds that never reached the target (steps recorded as infinity)."""
    missing = sum(s == float("inf") for s in steps)
    return f" ({missing} seed(s) never)" if missing else ""


def median_drift(run: dict[str, Any], unit: int | None = None) -> float:
    """How far the median of a sigmoid's input moves over training (max - min).

    With ``unit`` None: the median over the layer's units of each unit's drift.
    """
    medians = [r["unit_medians"] for r in stats.test_rows(run) if r.get("unit_medians")]
    if not medians:
        return float("nan")
    t = torch.tensor(medians)  # (evaluations, units)
    drift = t.max(0).values - t.min(0).values
    return float(drift[unit]) if unit is not None else float(drift.median())


class Fig1(Experiment):
    name = "fig1"
    title = "Figure 1: sigmoid MLP on MNIST, with and without BN"
    description = (
        "A 784-100-100-100-10 sigmoid MLP trained with plain SGD, batch 60, from small "
        "Gaussian weights, with and without BN before each sigmoid (same learning rate). "
        "Records test accuracy over training and the 15th/50th/85th percentiles of one "
        "last-hidden-layer sigmoid's input (Ioffe & Szegedy 2015, Figure 1)."
    )
    criterion = (
        "Claim 1: the baseline's final test accuracy (mean of its last 3 evaluations) is "
        "the target, per seed; 'steps' is the first evaluation at or above it. Supported "
        "if the baseline needs at least `speedup_threshold` times BN's steps on average "
        "and BN's steps range lies below the baseline's, both networks having trained; "
        "not testable (mixed) if the baseline did not train, since its final accuracy is "
        "then chance, which any network reaches at once. Claim 2: drift = max - min over "
        "training of a sigmoid input's median, taken per unit, median over the layer's "
        "units. Supported if the baseline drifts at least `drift_threshold` times as much "
        "as BN on average and the seed ranges do not overlap."
    )
    Config = Fig1Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (32, 32, 32), "steps": 60, "eval_every": 20, "probe_examples": 200},
        "full": {"steps": 50000, "eval_every": 500},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: Fig1Config = config
        data = dataset(cfg.data)
        probe = SigmoidInputProbe(cfg.unit, cfg.probe_examples)
        train = TrainSpec(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        specs = [
            RunSpec(
                label=label, seed=seed, data=cfg.data, train=train, probe=probe,
                model=MLPSpec(data.num_features, cfg.hidden, data.num_classes, norm=norm,
                              activation=cfg.activation, init_std=cfg.init_std,
                              norm_backend=cfg.norm_backend),
                params={"norm": norm},
            )
            for seed in range(cfg.seeds)
            for label, norm in (("baseline", "none"), ("BN", "batch"))
        ]
        return runner.run(specs, desc=self.name), {}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        groups = stats.by_label(record["runs"])
        base, bn = groups.get("baseline", []), groups.get("BN", [])
        chance = 1.0 / record["data"]["classes"]
        seeds = sorted({r["seed"] for r in base} & {r["seed"] for r in bn})
        base_by, bn_by = {r["seed"]: r for r in base}, {r["seed"]: r for r in bn}

        targets, base_steps, bn_steps, ratios = [], [], [], []
        for s in seeds:
            target = stats.final_accuracy(base_by[s], chance)
            b = stats.steps_to_reach(base_by[s], target) or cfg["steps"]
            n = stats.steps_to_reach(bn_by[s], target)
            targets.append(target)
            base_steps.append(float(b))
            # BN never reaching the target counts as taking forever (ratio 0).
            bn_steps.append(float(n) if n is not None else float("inf"))
            ratios.append(b / n if n is not None else 0.0)  # n > 0: step 0 never counts
        reached = [s for s in bn_steps if s != float("inf")]
        mean_ratio = stats.mean(ratios)

        base_drift = [median_drift(r) for r in base]
        bn_drift = [median_drift(r) for r in bn]
        unit = cfg["unit"]
        drift_ratio = stats.mean(base_drift) / max(stats.mean(bn_drift), 1e-12)

        measures = {
            "baseline final test accuracy (%)": stats.fmt_range(
                [stats.final_accuracy(r, chance) for r in base], 2, 100),
            "BN final test accuracy (%)": stats.fmt_range(
                [stats.final_accuracy(r, chance) for r in bn], 2, 100),
            "target = baseline final accuracy (%)": stats.fmt_range(targets, 2, 100),
            "baseline steps to target": stats.fmt_range(base_steps, 0),
            "BN steps to target": stats.fmt_range(reached, 0) + _never(bn_steps),
            "speed-up (baseline steps / BN steps)": stats.fmt_range(ratios, 2),
            "baseline drift of median sigmoid input (layer median)": stats.fmt_range(base_drift, 3),
            "BN drift of median sigmoid input (layer median)": stats.fmt_range(bn_drift, 3),
            f"baseline drift, unit {unit}": stats.fmt_range(
                [median_drift(r, unit) for r in base], 3),
            f"BN drift, unit {unit}": stats.fmt_range([median_drift(r, unit) for r in bn], 3),
            "drift ratio (baseline / BN)": f"{drift_ratio:.2f}",
            "diverged runs": sum(stats.diverged(r) for r in base + bn),
        }
        measured = (f"{mean_ratio:.2f}x fewer steps (seeds: "
                    + ", ".join(f"{r:.2f}" for r in ratios) + ")")
        # The target is the baseline's final accuracy: it means something only if the
        # baseline trained. A diverged or untrained baseline's target is chance, which
        # BN "reaches" at its first evaluation, while the baseline's steps fall back to
        # the whole budget: the ratio is then the budget over eval_every, not a speed-up.
        untrained = [s for s in seeds if not stats.trained(base_by[s], chance)]
        if untrained:
            speed_verdict = MIXED
            measured += (f"; not testable: the baseline did not train in {len(untrained)} of "
                         f"{len(seeds)} seed(s) (diverged, or final accuracy below halfway "
                         "from chance to 100%), so its final accuracy is no target")
        else:
            speed_verdict = grade(
                # BN must have trained: at chance it "reaches" a chance-level target at once.
                effect_ok=len(reached) == len(bn_steps) and stats.separated(base_steps, bn_steps)
                and all(stats.trained(r, chance) for r in bn),
                threshold_ok=mean_ratio >= cfg["speedup_threshold"],
                direction_ok=mean_ratio > 1.0,
            )
        speed = Verdict(
            claim=1,
            statement="BN reaches the baseline's final accuracy in far fewer steps (Figure 1a).",
            measured=measured,
            verdict=speed_verdict,
            criterion=f"mean speed-up >= {cfg['speedup_threshold']:g}x, every BN seed "
                      "reaches the target before every baseline seed, and both networks "
                      "trained in every seed (final accuracy at least halfway from chance "
                      "to 100%); not testable (mixed) when the baseline did not",
        )
        drift = Verdict(
            claim=2,
            statement="BN keeps a sigmoid's input distribution stable during training "
                      "(Figure 1b,c).",
            measured=f"median drifts {stats.mean(base_drift):.3f} (baseline) vs "
                     f"{stats.mean(bn_drift):.3f} (BN): ratio {drift_ratio:.2f}",
            verdict=grade(
                # A run that diverged has no drift to measure (one row at step 0).
                effect_ok=stats.separated(base_drift, bn_drift)
                and not any(stats.diverged(r) for r in base + bn),
                threshold_ok=drift_ratio >= cfg["drift_threshold"],
                direction_ok=drift_ratio > 1.0,
            ),
            criterion=f"baseline drift >= {cfg['drift_threshold']:g}x BN's, seed ranges apart, "
                      "no run diverged",
        )
        return Analysis(measures, [speed, drift])

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        groups = stats.by_label(record["runs"])
        base, bn = groups.get("baseline", []), groups.get("BN", [])
        fig, (ax,) = plots.figure(width=6.0)
        plots.band(ax, base, "without BN", plots.BASELINE_COLOR, scale=100)
        plots.band(ax, bn, "with BN", plots.BN_COLOR, scale=100)
        ax.set_xlabel("training step")
        plots.percent_axis(ax)
        ax.set_title("(a) test accuracy")
        ax.legend()
        out: list[tuple[str, Figure]] = [
            ("(a) Test accuracy against training steps: mean over seeds, band = min..max.", fig)
        ]

        unit = record["config"]["unit"]
        fig2, axes = plots.figure(ncols=2, width=4.6)
        for ax, runs, name, color in ((axes[0], base, "(b) without BN", plots.BASELINE_COLOR),
                                      (axes[1], bn, "(c) with BN", plots.BN_COLOR)):
            if not runs:
                continue
            run = runs[0]
            for key, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
                steps, vals = stats.curve(run, key)
                ax.plot(steps, vals, style, color=color, label=key)
            ax.set_title(f"{name}: unit {unit}, seed {run['seed']}")
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        axes[0].set_ylabel("sigmoid input")
        lo = min(a.get_ylim()[0] for a in axes)
        hi = max(a.get_ylim()[1] for a in axes)
        for a in axes:
            a.set_ylim(lo, hi)  # one scale, so the two panels compare directly
        caption = (
            f"(b, c) 15th, 50th and 85th percentiles of the input to sigmoid {unit} of the last "
            f"hidden layer over {record['config']['probe_examples']} test examples "
            "(same y scale).")
        out.append((caption, fig2))
        return out
