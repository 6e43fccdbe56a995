"""Claim 4: BN makes training less sensitive to the scale of the initial weights.

A deep MLP is trained from Gaussian weights N(0, s²) for s log-spaced over four
decades, with and without BN, with everything else fixed. Without BN, small s makes
the signal vanish through the layers and large s makes it explode; with BN every
hidden layer's output is renormalized, so only the last layer still sees the scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.experiments.base import Analysis, Experiment, Verdict, grade
from batchnorm.lab.models import Activation, MLPSpec, log_space
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class InitConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden: hidden widths (at least 6 layers).
        activation: the nonlinearity.
        scale_min, scale_max, num_scales: the init std values, log-spaced, inclusive.
        optimizer, lr, batch_size, steps, eval_every: training, the same for every run.
        within: accuracy points; a scale "works" if its final accuracy is within this
            of the net's best over all scales.
        count_margin: BN must work at this many more scales than the baseline.
    """

    hidden: tuple[int, ...] = (100,) * 6
    activation: Activation = "relu"
    scale_min: float = 1e-4
    scale_max: float = 1.0
    num_scales: int = 12
    optimizer: Optimizer = "momentum"
    lr: float = 0.02
    batch_size: int = 60
    steps: int = 1000
    eval_every: int = 100
    within: float = 5.0
    count_margin: int = 3

    def check(self) -> None:
        super().check()
        if len(self.hidden) < 6:
            raise ConfigError(f"--hidden: expected >= 6 layers, got {len(self.hidden)}")
        if not 0 < self.scale_min < self.scale_max:
            raise ConfigError(
                f"--scale_min/--scale_max: expected 0 < min < max, got {self.scale_min}, "
                f"{self.scale_max}"
            )
        if self.num_scales < 2:
            raise ConfigError(f"--num_scales: expected >= 2, got {self.num_scales}")
        if self.within < 0 or self.count_margin < 0:
            raise ConfigError(
                f"--within/--count_margin: expected values >= 0, got {self.within}, "
                f"{self.count_margin}")


class InitScale(Experiment):
    name = "init"
    title = "Sensitivity to the initial weight scale"
    description = (
        "Trains a >= 6-hidden-layer MLP from N(0, s^2) weights for 12 values of s "
        "log-spaced over 1e-4..1, with and without BN (same optimizer and rate), and "
        "compares final test accuracy across scales."
    )
    criterion = (
        "For each net and seed, a scale 'works' if its final test accuracy (mean of the "
        "last 3 evaluations; a diverged run scores chance) is within `within` points of "
        "that net's best scale. Claim 4 is supported if BN works at least `count_margin` "
        "more scales than the baseline on average and every BN seed's count exceeds every "
        "baseline seed's."
    )
    Config = InitConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (16,) * 6, "steps": 30, "eval_every": 10, "num_scales": 12},
        "full": {"steps": 5000, "eval_every": 250},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: InitConfig = config
        data = dataset(cfg.data)
        scales = log_space(cfg.scale_min, cfg.scale_max, cfg.num_scales)
        train = TrainSpec(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        specs = [
            RunSpec(
                label=label, seed=seed, data=cfg.data, train=train,
                model=MLPSpec(data.num_features, cfg.hidden, data.num_classes, norm=norm,
                              activation=cfg.activation, init_std=scale,
                              norm_backend=cfg.norm_backend),
                params={"norm": norm, "scale": scale},
            )
            for scale in scales
            for label, norm in (("baseline", "none"), ("BN", "batch"))
            for seed in range(cfg.seeds)
        ]
        return runner.run(specs, desc=self.name), {"scales": list(scales)}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        table = stats.final_by_param(record["runs"], "scale", chance)
        within = cfg["within"] / 100
        halfway = stats.halfway(chance)
        counts: dict[str, list[float]] = {}
        for label, by_seed in table.items():
            counts[label] = []
            for accs in by_seed.values():
                best = max(accs.values())
                # A scale "works" if it is near the best and trained at all: a network at
                # chance everywhere is near its best everywhere.
                works = halfway if best >= halfway else math.inf
                counts[label].append(float(sum(a >= max(best - within, works)
                                               for a in accs.values())))
        base, bn = counts.get("baseline", []), counts.get("BN", [])
        diff = stats.mean(bn) - stats.mean(base)

        measures: dict[str, Any] = {
            "scales": ", ".join(f"{s:.2g}" for s in record["notes"]["scales"]),
        }
        for label, by_seed in table.items():
            mean_acc = stats.mean_over_seeds(by_seed)
            best_scale = max(mean_acc, key=lambda s: mean_acc[s])
            measures[f"{label}: best scale (mean accuracy %)"] = (
                f"{best_scale:.2g} ({100 * mean_acc[best_scale]:.2f})")
            measures[f"{label}: scales within {cfg['within']:g} points of its best"] = (
                stats.fmt_range(counts[label], 1) + f" of {len(mean_acc)}")
            n_div = sum(stats.diverged(r) for r in record["runs"] if r["label"] == label)
            measures[f"{label}: diverged runs"] = n_div
        verdict = Verdict(
            claim=4,
            statement="BN makes training much less sensitive to the weight-init scale.",
            measured=f"scales within {cfg['within']:g} points of the best: BN "
                     f"{stats.mean(bn):.1f} vs baseline {stats.mean(base):.1f} of "
                     f"{len(record['notes']['scales'])}",
            verdict=grade(
                effect_ok=stats.separated(bn, base),
                threshold_ok=diff >= cfg["count_margin"],
                direction_ok=diff > 0,
            ),
            criterion=f"BN works at >= {cfg['count_margin']} more scales on average, every "
                      "BN seed's count above every baseline seed's; a scale works if its "
                      f"final accuracy is within {cfg['within']:g} points of the seed's best "
                      "and at least halfway from chance to 100%",
        )
        return Analysis(measures, [verdict])

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        chance = 1.0 / record["data"]["classes"]
        table = stats.final_by_param(record["runs"], "scale", chance)
        fig, (ax,) = plots.figure(width=6.0)
        for label, by_seed in table.items():
            color = plots.BN_COLOR if label == "BN" else plots.BASELINE_COLOR
            mean_acc = stats.mean_over_seeds(by_seed)
            scales = sorted(mean_acc)
            ax.plot(scales, [100 * mean_acc[s] for s in scales], "o-", color=color,
                    label=f"{label} (mean of {len(by_seed)} seeds)")
            for accs in by_seed.values():
                ax.plot(sorted(accs), [100 * accs[s] for s in sorted(accs)], ".", color=color,
                        alpha=0.4)
        div = [r for r in record["runs"] if stats.diverged(r)]
        for r in div:
            ax.plot([r["params"]["scale"]], [100 * chance], "x",
                    color=plots.BN_COLOR if r["label"] == "BN" else plots.BASELINE_COLOR)
        ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("init std s (weights ~ N(0, s²))")
        plots.percent_axis(ax)
        ax.set_ylabel("final test accuracy (%)")
        ax.legend()
        caption = (f"Final test accuracy against the init scale ({len(record['config']['hidden'])} "
                   f"hidden layers, {record['config']['activation']}); dots: seeds, x: diverged.")
        return [(caption, fig)]
