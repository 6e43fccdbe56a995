"""The headline: "the same accuracy in 14 times fewer training steps", and higher rates.

Ioffe & Szegedy (2015) compare Inception with and without BN at the baseline's
learning rate and at 5 and 30 times it. Here the baseline's rate is first tuned by a
small sweep (the baseline gets its best chance), then BN trains at 1x, 5x and 30x
that rate and the baseline at 5x. A second part trains a deep sigmoid network with
and without BN (claim 11: deep sigmoid networks train with BN and not without).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.experiments.base import (
    MIXED,
    NOT_SUPPORTED,
    SUPPORTED,
    Analysis,
    Experiment,
    Verdict,
    grade,
)
from batchnorm.lab.models import Activation, MLPSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class SpeedupConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation, init_std: the network of the speed part (None: PyTorch's
            default init).
        optimizer, batch_size, steps, eval_every: training, shared by every run.
        lr_grid: the baseline's learning-rate sweep; the rate with the best mean
            (over seeds) peak test accuracy wins.
        bn_multipliers: BN trains at these multiples of the tuned rate.
        baseline_multipliers: the baseline also trains at these multiples.
        deep_hidden, deep_activation, deep_lr: the deep network (None: the tuned rate).
        speedup_threshold: the fastest BN variant must reach the baseline's best
            accuracy this many times faster for claim 1 to be supported.
        tolerance: accuracy points within which a run "trains well" at a high rate
            (final accuracy no more than this below the tuned baseline's best).
        deep_gap: points by which deep BN must beat the deep baseline (claim 11).
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: Activation = "relu"
    init_std: float | None = None
    optimizer: Optimizer = "momentum"
    batch_size: int = 60
    steps: int = 3000
    eval_every: int = 100
    lr_grid: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3)
    bn_multipliers: tuple[float, ...] = (1.0, 5.0, 30.0)
    baseline_multipliers: tuple[float, ...] = (5.0,)
    deep_hidden: tuple[int, ...] = (100,) * 8
    deep_activation: Activation = "sigmoid"
    deep_lr: float | None = None
    speedup_threshold: float = 5.0
    tolerance: float = 2.0
    deep_gap: float = 10.0

    def check(self) -> None:
        super().check()
        if len(self.deep_hidden) < 6:
            raise ConfigError(f"--deep_hidden: expected >= 6 layers, got {len(self.deep_hidden)}")


def _label(norm: str, mult: float) -> str:
    return f"{'BN' if norm == 'batch' else 'baseline'} x{mult:g}"


class Speedup(Experiment):
    name = "speedup"
    title = "Fewer steps and higher learning rates (the 14x headline)"
    description = (
        "Tunes the baseline MLP's learning rate by a sweep, then trains BN at 1x, 5x and "
        "30x the tuned rate and the baseline at 5x, and counts the steps each needs to "
        "reach the tuned baseline's best test accuracy. Also trains a deep (>= 6 hidden "
        "layers) sigmoid MLP with and without BN."
    )
    criterion = (
        "Target: per seed, the best test accuracy the tuned baseline reached; steps: the "
        "first evaluation at or above it. Claim 1: supported if the fastest BN variant's "
        "mean speed-up is at least `speedup_threshold` and its steps range lies below "
        "the baseline's. Claim 3: a run 'trains well' if it does not diverge and ends "
        "within `tolerance` points of the target; supported if BN trains well at 5x and "
        "30x in every seed while the baseline at 5x does not in any seed. Claim 11: "
        "supported if deep BN ends at least `deep_gap` points above the deep baseline, "
        "seed ranges apart. The sweep picks the rate by test accuracy, which can only "
        "favour the baseline."
    )
    Config = SpeedupConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (32, 32), "steps": 40, "eval_every": 20, "lr_grid": (0.03, 0.1),
                 "deep_hidden": (16,) * 6},
        "full": {"steps": 20000, "eval_every": 250},
    }

    def _spec(self, cfg: SpeedupConfig, label: str, seed: int, norm: str, lr: float,
              params: dict[str, Any], deep: bool = False) -> RunSpec:
        data = dataset(cfg.data)
        model = MLPSpec(
            data.num_features, cfg.deep_hidden if deep else cfg.hidden, data.num_classes,
            norm=norm, activation=cfg.deep_activation if deep else cfg.activation,
            init_std=cfg.init_std, norm_backend=cfg.norm_backend,
        )
        train = TrainSpec(steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        return RunSpec(label, seed, cfg.data, model, train, params={**params, "norm": norm})

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: SpeedupConfig = config
        seeds = range(cfg.seeds)
        sweep = runner.run(
            [self._spec(cfg, f"sweep lr={lr:g}", s, "none", lr, {"part": "sweep", "lr": lr})
             for lr in cfg.lr_grid for s in seeds],
            desc=f"{self.name} sweep",
        )
        chance = 1.0 / dataset(cfg.data).num_classes
        best_lr = _best_lr([r.to_dict() for r in sweep], chance)

        specs = []
        for mult in cfg.bn_multipliers:
            specs += [self._spec(cfg, _label("batch", mult), s, "batch", best_lr * mult,
                                 {"part": "speed", "mult": mult, "lr": best_lr * mult})
                      for s in seeds]
        for mult in cfg.baseline_multipliers:
            specs += [self._spec(cfg, _label("none", mult), s, "none", best_lr * mult,
                                 {"part": "speed", "mult": mult, "lr": best_lr * mult})
                      for s in seeds]
        deep_lr = cfg.deep_lr if cfg.deep_lr is not None else best_lr
        for norm in ("none", "batch"):
            specs += [self._spec(cfg, f"deep {'BN' if norm == 'batch' else 'baseline'}", s,
                                 norm, deep_lr, {"part": "deep", "lr": deep_lr}, deep=True)
                      for s in seeds]
        rest = runner.run(specs, desc=self.name)
        return sweep + rest, {"best_lr": best_lr, "deep_lr": deep_lr}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg, notes = record["config"], record["notes"]
        chance = 1.0 / record["data"]["classes"]
        runs = record["runs"]
        best_lr = notes["best_lr"]
        sweep = [r for r in runs if r["params"]["part"] == "sweep"]
        baseline = {r["seed"]: r for r in sweep if r["params"]["lr"] == best_lr}
        seeds = sorted(baseline)
        targets = {s: stats.best_accuracy(baseline[s]) for s in seeds}
        base_steps = [float(stats.steps_to_reach(baseline[s], targets[s]) or cfg["steps"])
                      for s in seeds]

        measures: dict[str, Any] = {
            "tuned baseline learning rate": f"{best_lr:g}",
            "sweep (lr: mean peak test accuracy %)": ", ".join(
                f"{lr:g}: {100 * score:.1f}" for lr, score in _sweep_scores(sweep, chance).items()),
            "target = tuned baseline's best test accuracy (%)": stats.fmt_range(
                list(targets.values()), 2, 100),
            "tuned baseline steps to target": stats.fmt_range(base_steps, 0),
        }
        speed_groups = stats.by_label(r for r in runs if r["params"]["part"] == "speed")
        ratios_by: dict[str, list[float]] = {}
        steps_by: dict[str, list[float]] = {}
        well_by: dict[str, list[bool]] = {}
        for label, group in speed_groups.items():
            ratios, steps, well = [], [], []
            for run in group:
                target = targets.get(run["seed"])
                if target is None:
                    continue
                n = stats.steps_to_reach(run, target)
                base_n = base_steps[seeds.index(run["seed"])]
                steps.append(float(n) if n is not None else float("inf"))
                ratios.append(base_n / n if n is not None else 0.0)  # n > 0: step 0 never counts
                final = stats.final_accuracy(run, chance)
                well.append(stats.trained(run, chance)
                            and final >= target - cfg["tolerance"] / 100)
            ratios_by[label], steps_by[label], well_by[label] = ratios, steps, well
            n_div = sum(stats.diverged(r) for r in group)
            reached = [s for s in steps if s != float("inf")]
            never = len(steps) - len(reached)
            measures[f"{label}: steps to target"] = (
                stats.fmt_range(reached, 0) if reached else "never"
            ) + (f", {never} seed(s) never" if reached and never else "")
            measures[f"{label}: speed-up"] = stats.fmt_range(ratios, 2)
            measures[f"{label}: final test accuracy (%)"] = stats.fmt_range(
                [stats.final_accuracy(r, chance) for r in group], 2, 100) + (
                f", {n_div} diverged" if n_div else "")

        verdicts = []
        # The target is the tuned baseline's: it means something only if that trained.
        base_trained = bool(seeds) and all(stats.trained(baseline[s], chance) for s in seeds)
        bn_labels = [_label("batch", m) for m in cfg["bn_multipliers"]]
        bn_labels = [k for k in bn_labels if k in ratios_by]
        if bn_labels:
            fastest = max(bn_labels, key=lambda k: stats.mean(ratios_by[k]))
            r = stats.mean(ratios_by[fastest])
            all_reached = all(s != float("inf") for s in steps_by[fastest])
            verdicts.append(Verdict(
                claim=1,
                statement="BN reaches the tuned baseline's best accuracy in far fewer steps "
                          "(the paper: 14x fewer).",
                measured=f"{fastest}: {r:.2f}x fewer steps (seeds: "
                         + ", ".join(f"{v:.2f}" for v in ratios_by[fastest]) + ")",
                verdict=grade(
                    effect_ok=all_reached and base_trained
                    and stats.separated(base_steps, steps_by[fastest]),
                    threshold_ok=r >= cfg["speedup_threshold"],
                    direction_ok=r > 1.0,
                ),
                criterion=f"fastest BN variant's mean speed-up >= {cfg['speedup_threshold']:g}x, "
                          "its steps range below the baseline's, and the tuned baseline "
                          "trained (final accuracy at least halfway from chance to 100%)",
            ))
        # "Higher rates": multipliers above the tuned rate only.
        high_bn = [_label("batch", m) for m in cfg["bn_multipliers"]
                   if m > 1 and _label("batch", m) in ratios_by]
        high_base = [_label("none", m) for m in cfg["baseline_multipliers"]
                     if m > 1 and _label("none", m) in well_by]
        if high_bn:
            bn_ok = {k: all(well_by[k]) for k in high_bn}
            base_fails = all(not any(well_by[k]) for k in high_base) if high_base else True
            if all(bn_ok.values()) and base_fails and base_trained and high_base:
                verdict = SUPPORTED
            elif any(bn_ok.values()) or any(any(well_by[k]) for k in high_bn):
                verdict = MIXED
            else:
                verdict = NOT_SUPPORTED
            verdicts.append(Verdict(
                claim=3,
                statement="BN allows much higher learning rates (5x, 30x) without divergence.",
                measured="; ".join(
                    f"{k}: {sum(well_by[k])}/{len(well_by[k])} seeds train well"
                    for k in high_bn + high_base),
                verdict=verdict,
                criterion="BN at every rate above the tuned one ("
                          + ", ".join(f"{m:g}x" for m in cfg["bn_multipliers"] if m > 1)
                          + f") trains well (trained, within {cfg['tolerance']:g} points of "
                          "the target) in every seed, and the baseline above the tuned rate ("
                          + ", ".join(f"{m:g}x" for m in cfg["baseline_multipliers"] if m > 1)
                          + ") in none; mixed if only part of that holds",
            ))

        deep = stats.by_label(r for r in runs if r["params"]["part"] == "deep")
        deep_base = [stats.final_accuracy(r, chance) for r in deep.get("deep baseline", [])]
        deep_bn = [stats.final_accuracy(r, chance) for r in deep.get("deep BN", [])]
        if deep_base and deep_bn:
            gap = 100 * (stats.mean(deep_bn) - stats.mean(deep_base))
            measures[f"deep {len(cfg['deep_hidden'])}-layer {cfg['deep_activation']} baseline: "
                     "final test accuracy (%)"] = stats.fmt_range(deep_base, 2, 100)
            measures[f"deep {len(cfg['deep_hidden'])}-layer {cfg['deep_activation']} BN: "
                     "final test accuracy (%)"] = stats.fmt_range(deep_bn, 2, 100)
            verdicts.append(Verdict(
                claim=11,
                statement=f"A deep ({len(cfg['deep_hidden'])} hidden layers) "
                          f"{cfg['deep_activation']} network trains with BN and not without.",
                measured=f"BN {100 * stats.mean(deep_bn):.1f}% vs baseline "
                         f"{100 * stats.mean(deep_base):.1f}% ({gap:+.1f} points)",
                verdict=grade(
                    effect_ok=stats.separated(deep_bn, deep_base),
                    threshold_ok=gap >= cfg["deep_gap"],
                    direction_ok=gap > 0,
                ),
                criterion=f"BN's final accuracy >= baseline's + {cfg['deep_gap']:g} points, "
                          "seed ranges apart",
            ))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        runs = record["runs"]
        chance = 1.0 / record["data"]["classes"]
        best_lr = record["notes"]["best_lr"]
        out: list[tuple[str, Figure]] = []

        sweep = _by_lr([r for r in runs if r["params"]["part"] == "sweep"])
        fig, (ax,) = plots.figure(width=5.0)
        lrs = list(sweep)
        peak = [[stats.best_accuracy(r) if not stats.diverged(r) else chance for r in sweep[lr]]
                for lr in lrs]
        ax.plot(lrs, [100 * stats.mean(p) for p in peak], "o-", color=plots.BASELINE_COLOR)
        for lr, p in zip(lrs, peak):
            ax.plot([lr] * len(p), [100 * v for v in p], ".", color=plots.BASELINE_COLOR, alpha=0.5)
        ax.axvline(best_lr, color=plots.BN_COLOR, linestyle=":", label=f"chosen {best_lr:g}")
        if len(lrs) == 1:  # a one-point sweep has no extent of its own
            ax.set_xlim(lrs[0] / 3, lrs[0] * 3)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("peak test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        caption = "The baseline's learning-rate sweep: peak test accuracy, seeds (dots) and mean."
        out.append((caption, fig))

        fig, (ax,) = plots.figure(width=6.5, height=4.0)
        base = [r for r in runs if r["params"]["part"] == "sweep" and r["params"]["lr"] == best_lr]
        plots.band(ax, base, f"baseline x1 (lr {best_lr:g})", plots.BASELINE_COLOR, scale=100)
        speed = stats.by_label(r for r in runs if r["params"]["part"] == "speed")
        for i, (label, group) in enumerate(speed.items()):
            color = plots.PALETTE[i % len(plots.PALETTE)]
            plots.band(ax, group, label, color, scale=100)
        targets = [stats.best_accuracy(r) for r in base]
        if targets:
            ax.axhline(100 * stats.mean(targets), color="black", linestyle=":", linewidth=1,
                       label="target (baseline best)")
        ax.set_xlabel("training step")
        plots.percent_axis(ax)
        ax.set_ylim(max(0.0, 100 * chance - 5), 100)
        ax.legend(fontsize=8)
        caption = "Test accuracy at multiples of the tuned rate; band: min..max; x: diverged."
        out.append((caption, fig))

        deep = stats.by_label(r for r in runs if r["params"]["part"] == "deep")
        if deep:
            fig, (ax,) = plots.figure(width=6.0)
            for label, group in deep.items():
                color = plots.BN_COLOR if "BN" in label else plots.BASELINE_COLOR
                plots.band(ax, group, label, color, scale=100)
            ax.set_xlabel("training step")
            plots.percent_axis(ax)
            ax.legend()
            caption = (f"Deep {record['config']['deep_activation']} MLP "
                       f"({len(record['config']['deep_hidden'])} hidden layers), "
                       f"lr {record['notes']['deep_lr']:g}.")
            out.append((caption, fig))
        return out


def _by_lr(runs: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    groups: dict[float, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["params"]["lr"], []).append(r)
    return dict(sorted(groups.items()))


def _sweep_scores(sweep: list[dict[str, Any]], chance: float) -> dict[float, float]:
    """Each rate's mean (over seeds) peak test accuracy; a diverged run scores chance."""
    return {
        lr: stats.mean([chance if stats.diverged(r) else stats.best_accuracy(r) for r in group])
        for lr, group in _by_lr(sweep).items()
    }


def _best_lr(sweep: list[dict[str, Any]], chance: float) -> float:
    """The rate with the best sweep score; ties go to the smaller rate."""
    scores = _sweep_scores(sweep, chance)
    return max(scores, key=lambda lr: (scores[lr], -lr))
