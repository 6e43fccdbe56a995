"""Claim 6: BN works across batch sizes but degrades for very small ones, where
normalizations that do not depend on the batch behave differently.

The same MLP is trained at batch sizes from 2 to a few hundred with no norm, BN,
batch renorm (Ioffe 2017), layer norm, group norm and ghost BN. Every run sees the
same number of examples (epochs), not the same number of steps, and the learning
rate scales linearly with the batch size (lr = base_lr · batch / 64, Goyal et al.
2017): every run sees the same examples and the sum of its learning rates over the
steps is the same too. The baseline (no norm) shows what that budget does by itself
at each batch size, layer and group norm what normalization does without batch
statistics.

BN normalizes each unit with the mean and variance of the current mini-batch in
training and with running averages at test time. With two examples a unit's
normalized values are always ±1, so training sees little of the signal and a network
very different from the one tested. Layer and group norm use each example's own
statistics, so they are the same in training and at test time at every batch size.
Batch renorm starts as BN and then corrects the batch statistics towards the running
ones (r = σ_B/σ clipped to [1/r_max, r_max], d = (μ_B − μ)/σ clipped to ±d_max).
Ghost BN normalizes chunks of ``ghost_batch`` examples, so it only differs from BN
at batch sizes above that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.diagnostics import batch_statistics_accuracy
from batchnorm.lab.experiments.base import (
    MIXED,
    NOT_SUPPORTED,
    SUPPORTED,
    Analysis,
    Experiment,
    Verdict,
    grade,
)
from batchnorm.lab.models import MLP, Activation, MLPSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, Probe, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

#: The batch size at which the learning rate equals ``base_lr``.
REFERENCE_BATCH = 64

BASELINE, BN, RENORM, LAYER, GROUP, GHOST = (
    "baseline", "BN", "batch renorm", "layer norm", "group norm", "ghost BN")
#: Labels in plotting order, with the registry name each one trains.
NORMS: dict[str, str] = {
    BASELINE: "none", BN: "batch", RENORM: "renorm", LAYER: "layer", GROUP: "group",
    GHOST: "ghost",
}
COLORS: dict[str, str] = {
    BASELINE: plots.BASELINE_COLOR, BN: plots.BN_COLOR, RENORM: plots.PALETTE[1],
    LAYER: plots.PALETTE[2], GROUP: plots.PALETTE[3], GHOST: plots.PALETTE[4],
}
#: The norms whose statistics come from the batch; the others are the same in training
#: and at test time.
BATCH_NORMS: tuple[str, ...] = (BN, RENORM, GHOST)


@dataclass(frozen=True)
class BatchSizeConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation, init_std: the network (init_std None: PyTorch's default init).
        optimizer: the optimizer of every run.
        batch_sizes: the batch sizes, increasing; the smallest is where BN should
            degrade.
        epochs: passes over the training set per run, the same at every batch size;
            a run takes ``round(epochs · n_train / batch)`` steps.
        base_lr: the learning rate at batch 64; a batch of B trains at base_lr · B / 64.
        evals: test evaluations per run (spread evenly over its steps).
        num_groups: group norm's groups (the largest divisor of the width up to this).
        ghost_batch: ghost BN's virtual batch size; ghost BN is trained only at batch
            sizes above it (at or below it, it is BN exactly).
        r_max, d_max: batch renorm's final clipping limits (Ioffe 2017: 3 and 5).
        renorm_warmup, renorm_r_at, renorm_d_at: batch renorm's schedule as fractions
            of each run: plain BN until ``renorm_warmup``, then r_max and d_max relax
            linearly to their final values, reached at ``renorm_r_at`` and
            ``renorm_d_at`` (the paper's 5k, 40k and 25k steps, per 100k).
        renorm_min_warmup: batch renorm's plain-BN warmup lasts at least this many
            steps, so the running averages (momentum 0.1: 0.9^25 < 8% of their initial
            values left) describe the network before r and d use them.
        works_from: BN should work at every batch size at least this large.
        within: accuracy points; BN "works" at a batch size if its final accuracy is
            within this of its best over those batch sizes.
        drop_threshold: accuracy points BN must lose at the smallest batch size, from
            its best batch size, for "degrades" to be supported.
        ghost_margin: accuracy points by which ghost BN must beat BN at the largest
            batch size.
        less_margin: accuracy points by which another norm's drop at the smallest
            batch size must be smaller than BN's.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: Activation = "relu"
    init_std: float | None = None
    optimizer: Optimizer = "momentum"
    batch_sizes: tuple[int, ...] = (2, 4, 16, 64, 256)
    epochs: float = 3.0
    base_lr: float = 0.05
    evals: int = 20
    num_groups: int = 4
    ghost_batch: int = 16
    r_max: float = 3.0
    d_max: float = 5.0
    renorm_warmup: float = 0.05
    renorm_r_at: float = 0.40
    renorm_d_at: float = 0.25
    renorm_min_warmup: int = 25
    works_from: int = 16
    within: float = 2.0
    drop_threshold: float = 5.0
    less_margin: float = 3.0
    ghost_margin: float = 0.5

    def check(self) -> None:
        super().check()
        sizes = self.batch_sizes
        if len(sizes) < 2 or any(b < 2 for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise ConfigError(
                f"--batch_sizes: expected >= 2 increasing sizes, each >= 2, got {sizes}")
        if not [b for b in sizes[1:] if b >= self.works_from]:
            raise ConfigError(
                f"--works_from: expected a batch size above the smallest to be >= it, got "
                f"{self.works_from} with batch sizes {sizes}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs: expected a number > 0, got {self.epochs}")
        if not self.base_lr > 0:
            raise ConfigError(f"--base_lr: expected a number > 0, got {self.base_lr}")
        if self.evals < 1:
            raise ConfigError(f"--evals: expected an int >= 1, got {self.evals}")
        if self.num_groups < 1:
            raise ConfigError(f"--num_groups: expected an int >= 1, got {self.num_groups}")
        if self.ghost_batch < 2:
            raise ConfigError(f"--ghost_batch: expected an int >= 2, got {self.ghost_batch}")
        if self.r_max < 1 or self.d_max < 0:
            raise ConfigError(
                f"--r_max/--d_max: expected r_max >= 1 and d_max >= 0, got {self.r_max}, "
                f"{self.d_max}")
        for key in ("renorm_warmup", "renorm_r_at", "renorm_d_at"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{key}: expected a fraction in [0, 1], got {value}")
        for key in ("renorm_r_at", "renorm_d_at"):
            if getattr(self, key) < self.renorm_warmup:
                raise ConfigError(
                    f"--{key}: expected >= renorm_warmup ({self.renorm_warmup}), got "
                    f"{getattr(self, key)}")
        if self.renorm_min_warmup < 0:
            raise ConfigError(
                f"--renorm_min_warmup: expected an int >= 0, got {self.renorm_min_warmup}")
        for key in ("within", "drop_threshold", "less_margin", "ghost_margin"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key}: expected a number >= 0, got {getattr(self, key)}")


class BatchStatsProbe(Probe):
    """Test accuracy at the end of a run with batch statistics instead of running ones.

    The test set is cut into batches of the run's batch size and each batch is
    normalized with its own statistics, as training normalizes (batch renorm with its
    final r and d corrections). Set against the usual eval-mode accuracy, this
    separates a network that learned poorly from one that learned well but meets
    population statistics it never saw in training. A last partial batch is left out.
    The running statistics are restored afterwards.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def at_end(self, model: MLP, data: Dataset) -> dict[str, Any]:
        acc, used = batch_statistics_accuracy(model, data.x_test, data.y_test, self.batch_size)
        if used == 0:
            return {}
        return {"batch_stats_accuracy": acc, "batch_stats_examples": used}


def renorm_ramp(cfg: BatchSizeConfig, steps: int) -> tuple[float, float, float, float, float]:
    """Batch renorm's schedule for a run of ``steps``, as :class:`TrainSpec` takes it.

    The paper's proportions, but never fewer than ``renorm_min_warmup`` steps of plain
    BN: the corrections r and d compare the batch with the running averages, which
    start at mean 0 and variance 1 and need that long to describe the network (at batch 256
    for 3 epochs, 47 steps, a 2-step warmup cost about 5 points).
    """
    warmup = max(round(cfg.renorm_warmup * steps), cfg.renorm_min_warmup)
    r_end = max(round(cfg.renorm_r_at * steps), warmup)
    d_end = max(round(cfg.renorm_d_at * steps), warmup)
    return (float(warmup), float(r_end - warmup), float(d_end - warmup), cfg.r_max, cfg.d_max)


def lr_for(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule: the rate grows with the batch, base_lr at batch 64."""
    return base_lr * batch_size / REFERENCE_BATCH


def steps_for(epochs: float, n_train: int, batch_size: int) -> int:
    """Steps that show the network ``epochs`` passes over ``n_train`` examples (>= 1)."""
    return max(1, round(epochs * n_train / batch_size))


class BatchSize(Experiment):
    name = "batchsize"
    title = "Batch size: BN, batch renorm, layer, group and ghost norm"
    description = (
        "Trains a 3-hidden-layer ReLU MLP with no norm, BN, batch renorm, layer norm, "
        "group norm and ghost BN at batch sizes from 2 to a few hundred, for the same number of "
        "epochs at every batch size and a learning rate proportional to the batch "
        "size, and compares final test accuracy (eval mode) across batch sizes."
    )
    criterion = (
        "Per norm and seed, final test accuracy (mean of the last 3 evaluations) at each "
        "batch size; a norm's drop = its best batch size's accuracy minus its accuracy "
        "at the smallest, per seed. (a) BN works: at every batch size >= `works_from`, "
        "its mean is within `within` points of its best there, and so is every seed, "
        "with at least two seeds. (b) BN degrades: its mean drop is >= `drop_threshold` "
        "points, every seed's best accuracy above every seed's at the smallest batch "
        "size. (c) layer and group norm "
        "degrade less: each one's mean drop is at least `less_margin` points below "
        "BN's, every BN seed's drop above every seed's of the other norm; supported if "
        "both hold. (d) the same for batch renorm. (e) ghost BN beats BN at the largest "
        "batch size by at least `ghost_margin` points, seed ranges apart."
    )
    Config = BatchSizeConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (16, 16), "batch_sizes": (2, 8, 32), "epochs": 0.1,
                 "evals": 4, "ghost_batch": 8, "works_from": 8},
        "full": {"epochs": 20.0},
    }

    def check_data(self, config: Any, data: Dataset) -> None:
        super().check_data(config, data)
        n_train = len(data.x_train)
        if config.batch_sizes[-1] > n_train:
            raise ConfigError(
                f"--batch_sizes: expected sizes <= {n_train} (the training examples of "
                f"{config.data}), got {config.batch_sizes[-1]}")

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: BatchSizeConfig = config
        data = dataset(cfg.data)
        n_train = len(data.x_train)
        options: dict[str, tuple[tuple[str, Any], ...]] = {
            GROUP: (("num_groups", cfg.num_groups),),
            GHOST: (("virtual_batch_size", cfg.ghost_batch),),
        }
        specs: list[RunSpec] = []
        plan: dict[int, dict[str, Any]] = {}
        for bs in cfg.batch_sizes:
            steps = steps_for(cfg.epochs, n_train, bs)
            lr = lr_for(cfg.base_lr, bs)
            plan[bs] = {"steps": steps, "lr": lr, "epochs": steps * bs / n_train}
            ramp = renorm_ramp(cfg, steps)
            for label, norm in NORMS.items():
                if label == GHOST and bs <= cfg.ghost_batch:
                    continue  # ghost BN is BN at these sizes: nothing new to train
                train = TrainSpec(
                    steps=steps, lr=lr, batch_size=bs, optimizer=cfg.optimizer,
                    eval_every=max(1, steps // cfg.evals),
                    renorm_ramp=ramp if label == RENORM else None,
                )
                model = MLPSpec(
                    data.num_features, cfg.hidden, data.num_classes, norm=norm,
                    activation=cfg.activation, init_std=cfg.init_std,
                    norm_backend=cfg.norm_backend,
                    norm_options=options.get(label, ()),
                )
                probe = BatchStatsProbe(bs) if label in BATCH_NORMS else None
                specs += [
                    RunSpec(label, seed, cfg.data, model, train, probe=probe,
                            params={"norm": norm, "batch_size": bs, "lr": lr})
                    for seed in range(cfg.seeds)
                ]
        notes = {"plan": {str(bs): p for bs, p in plan.items()}, "n_train": n_train}
        return runner.run(specs, desc=self.name), notes

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        table = _accuracy_table(record["runs"], chance)
        sizes = list(cfg["batch_sizes"])
        smallest = sizes[0]
        plan = record["notes"]["plan"]
        measures: dict[str, Any] = {
            "batch sizes (steps, learning rate)": ", ".join(
                f"{bs} ({plan[str(bs)]['steps']}, {plan[str(bs)]['lr']:.3g})" for bs in sizes),
            "epochs per run": f"{cfg['epochs']:g}",
        }
        for label, by_seed in table.items():
            mean_acc = stats.mean_over_seeds(by_seed)
            measures[f"{label}: final test accuracy (%) by batch size"] = ", ".join(
                f"{bs}: {100 * a:.1f}" for bs, a in mean_acc.items())
        drops = {label: _drops(by_seed, smallest) for label, by_seed in table.items()}
        for label, values in drops.items():
            if values:
                measures[f"{label}: drop at batch {smallest} from its best (points)"] = (
                    stats.fmt_range(values, 1, 100))
        n_div = sum(stats.diverged(r) for r in record["runs"])
        measures["diverged runs"] = n_div
        measures.update(_batch_stats_measures(record["runs"], sizes))
        if GHOST in table and BN in table:
            ghost, bn = stats.mean_over_seeds(table[GHOST]), stats.mean_over_seeds(table[BN])
            measures[f"ghost BN ({cfg['ghost_batch']}) minus BN (points)"] = ", ".join(
                f"batch {bs}: {100 * (ghost[bs] - bn[bs]):+.1f}" for bs in ghost if bs in bn)

        verdicts: list[Verdict] = []
        if BN in table and any(bs >= cfg["works_from"] for bs in stats.mean_over_seeds(table[BN])):
            verdicts.append(self._works(cfg, table[BN], chance))
        if drops.get(BN):
            verdicts.append(self._degrades(cfg, table[BN], smallest))
            for labels, claim_part in (((LAYER, GROUP), "layer and group norm"),
                                       ((RENORM,), "batch renorm")):
                present = [k for k in labels if drops.get(k)]
                if present:
                    # A norm that never trained has nothing to lose: its drop of ~0 is
                    # no evidence that it degrades less.
                    trained = {k: all(max(accs.values()) >= stats.halfway(chance)
                                      for accs in table[k].values()) for k in present}
                    verdicts.append(
                        self._less(cfg, drops, present, claim_part, smallest, trained))
        if GHOST in table and BN in table:
            verdicts.append(self._ghost(cfg, table[GHOST], table[BN]))
        return Analysis(measures, verdicts)

    def _ghost(self, cfg: dict[str, Any], ghost: dict[int, dict[int, float]],
               bn: dict[int, dict[int, float]]) -> Verdict:
        """(e) ghost BN beats BN at the largest batch size (Hoffer et al. 2017: small
        virtual batches close the generalization gap of large-batch training)."""
        largest = max(stats.mean_over_seeds(ghost))
        g = [accs[largest] for accs in ghost.values() if largest in accs]
        b = [accs[largest] for accs in bn.values() if largest in accs]
        lead = 100 * (stats.mean(g) - stats.mean(b))
        # records saved before this verdict existed have no margin: the default
        margin = cfg.get("ghost_margin", BatchSizeConfig.ghost_margin)
        return Verdict(
            claim=6,
            statement=f"Ghost BN (virtual batches of {cfg['ghost_batch']}) trains better than "
                      f"BN at a large batch ({largest}).",
            measured=f"ghost BN {100 * stats.mean(g):.1f}% vs BN {100 * stats.mean(b):.1f}% at "
                     f"batch {largest} ({lead:+.1f} points)",
            verdict=grade(effect_ok=stats.separated(g, b),
                          threshold_ok=lead >= margin, direction_ok=lead > 0),
            criterion=f">= {margin:g} points at batch {largest}, seed ranges apart",
        )

    def _works(self, cfg: dict[str, Any], bn: dict[int, dict[int, float]],
               chance: float) -> Verdict:
        """(a) BN within ``within`` points of its best at every batch size >= works_from,
        and training there: its best at least halfway from chance to 100% (a network
        at chance everywhere is "within 2 points of its best" too).

        An equivalence ("as good at every size"), so the seed-spread rule takes the
        form it has for equivalences: every seed within the tolerance, and at least two
        seeds, since one seed has no spread to compare."""
        mean_acc = stats.mean_over_seeds(bn)
        large = [bs for bs in mean_acc if bs >= cfg["works_from"]]
        within = cfg["within"] / 100
        best = max(mean_acc[bs] for bs in large)
        ok = [bs for bs in large if mean_acc[bs] >= best - within]
        seeds_ok = len(bn) >= 2 and all(
            accs[bs] >= best - within for accs in bn.values() for bs in large if bs in accs)
        worst = min(large, key=lambda bs: mean_acc[bs])
        trains = best >= stats.halfway(chance)
        return Verdict(
            claim=6,
            statement=f"BN works across batch sizes (>= {cfg['works_from']}).",
            measured=f"BN {100 * mean_acc[worst]:.1f}% at its worst such batch size "
                     f"({worst}) vs {100 * best:.1f}% at its best; {len(ok)} of {len(large)} "
                     f"sizes within {cfg['within']:g} points",
            verdict=grade(
                effect_ok=seeds_ok,
                threshold_ok=len(ok) == len(large),
                direction_ok=trains and 2 * len(ok) > len(large),
            ),
            criterion=f"at every batch size >= {cfg['works_from']}, BN's mean and every seed "
                      f"within {cfg['within']:g} points of its best mean there, at least two "
                      "seeds; not supported "
                      "if at most half of those sizes are, or if its best is not halfway "
                      "from chance to 100%",
        )

    def _degrades(self, cfg: dict[str, Any], bn: dict[int, dict[int, float]],
                  smallest: int) -> Verdict:
        """(b) BN loses at least ``drop_threshold`` points at the smallest batch size."""
        drops = _drops(bn, smallest)
        drop = 100 * stats.mean(drops)
        at_smallest = [accs[smallest] for accs in bn.values() if smallest in accs]
        best = [max(accs.values()) for accs in bn.values() if smallest in accs]
        return Verdict(
            claim=6,
            statement=f"BN degrades at very small batches ({smallest}).",
            measured=f"BN {100 * stats.mean(at_smallest):.1f}% at batch {smallest}, "
                     f"{drop:.1f} points below its best batch size's "
                     f"{100 * stats.mean(best):.1f}% (seeds: "
                     + ", ".join(f"{100 * d:.1f}" for d in drops) + ")",
            verdict=grade(
                effect_ok=stats.separated(best, at_smallest),
                threshold_ok=drop >= cfg["drop_threshold"],
                direction_ok=drop > 0,
            ),
            criterion=f"BN's accuracy at batch {smallest} >= {cfg['drop_threshold']:g} points "
                      "below its best batch size's (mean of the seeds' drops), every seed's "
                      f"best above every seed's accuracy at batch {smallest}",
        )

    def _less(self, cfg: dict[str, Any], drops: dict[str, list[float]], labels: list[str],
              claim_part: str, smallest: int, trained: dict[str, bool]) -> Verdict:
        """(c), (d) the named norms lose at least ``less_margin`` points less than BN;
        each must have trained (its best at least halfway from chance to 100%) in every
        seed."""
        bn = drops[BN]
        grades: list[str] = []
        parts: list[str] = []
        for label in labels:
            gap = 100 * (stats.mean(bn) - stats.mean(drops[label]))
            grades.append(grade(
                effect_ok=stats.separated(bn, drops[label]) and trained[label],
                threshold_ok=gap >= cfg["less_margin"],
                direction_ok=gap > 0,
            ))
            parts.append(f"{label} {100 * stats.mean(drops[label]):.1f}")
        if all(g == SUPPORTED for g in grades):
            verdict = SUPPORTED
        elif all(g == NOT_SUPPORTED for g in grades):
            verdict = NOT_SUPPORTED
        else:
            verdict = MIXED
        return Verdict(
            claim=6,
            statement=f"{claim_part[0].upper()}{claim_part[1:]} degrade{'s' if len(labels) == 1 else ''} "
                      f"less than BN at batch {smallest}.",
            measured=f"drop at batch {smallest} from the best batch size (points): BN "
                     f"{100 * stats.mean(bn):.1f}, " + ", ".join(parts),
            verdict=verdict,
            criterion=f"each one's mean drop >= {cfg['less_margin']:g} points below BN's, every "
                      "BN seed's drop above every seed's of the other norm, which trained "
                      "(its best at least halfway from chance to 100%) in every seed"
                      + ("; mixed if only one of them passes" if len(labels) > 1 else ""),
        )

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        table = _accuracy_table(record["runs"], chance)
        sizes = list(cfg["batch_sizes"])
        out: list[tuple[str, Figure]] = []

        fig, (ax,) = plots.figure(width=6.5, height=4.2)
        for label, by_seed in table.items():
            _accuracy_lines(ax, label, by_seed)
        for r in record["runs"]:
            if stats.diverged(r):
                ax.plot([r["params"]["batch_size"]], [100 * chance], "x",
                        color=COLORS.get(r["label"], "black"))
        ax.axhline(100 * chance, color="black", linestyle=":", linewidth=1, label="chance")
        _batch_axis(ax, sizes)
        plots.percent_axis(ax)
        ax.set_ylabel("final test accuracy (%)")
        plots.legend(ax, fontsize=8)
        caption = (f"Final test accuracy (eval mode) against the batch size, "
                   f"{cfg['epochs']:g} epochs at every size, lr = {cfg['base_lr']:g} x batch / "
                   f"{REFERENCE_BATCH}; dots: seeds, x: diverged.")
        out.append((caption, fig))

        groups = _batch_stats_table(record["runs"])
        if groups:
            fig, (ax,) = plots.figure(width=6.5, height=4.2)
            for label, by_bs in groups.items():
                color = COLORS.get(label, "black")
                xs = sorted(by_bs)
                for i, (style, kind) in enumerate((("o-", "running"), ("s--", "batch"))):
                    values = [[100 * v for v in by_bs[b][i]] for b in xs]
                    _mean_with_range(ax, xs, values, style, color,
                                     f"{label}, {kind} statistics", alpha=1.0 - 0.3 * i)
            _batch_axis(ax, sizes)
            plots.percent_axis(ax)
            ax.set_ylabel("test accuracy at the end (%)")
            plots.legend(ax, fontsize=8)
            caption = ("The trained networks tested in eval mode (running statistics, solid) "
                       "and with each test batch, of the training batch size, normalized by "
                       "its own statistics as in training (dashed); mean over seeds, bars: "
                       "min..max over seeds.")
            out.append((caption, fig))
        return out


def _accuracy_lines(ax: Axes, label: str, by_seed: dict[int, dict[int, float]]) -> None:
    """A norm's mean over seeds as a line, each seed as dots."""
    color = COLORS.get(label, "black")
    mean_acc = stats.mean_over_seeds(by_seed)
    xs = sorted(mean_acc)
    ax.plot(xs, [100 * mean_acc[b] for b in xs], "o-", color=color,
            label=f"{label} (mean of {len(by_seed)} seeds)")
    for accs in by_seed.values():
        ax.plot(sorted(accs), [100 * accs[b] for b in sorted(accs)], ".", color=color, alpha=0.4)


def _mean_with_range(ax: Axes, xs: list[int], values: list[list[float]], style: str,
                     color: str, label: str, alpha: float = 1.0) -> None:
    """The mean over seeds at each x as a line, with error bars from the seeds' min to
    max (none where only one seed has a value)."""
    means = [stats.mean(v) for v in values]
    low = [m - min(v) for m, v in zip(means, values)]
    high = [max(v) - m for m, v in zip(means, values)]
    ax.errorbar(xs, means, yerr=[low, high], fmt=style, color=color, alpha=alpha,
                capsize=3, label=f"{label} (n={max(len(v) for v in values)})")


def _batch_axis(ax: Axes, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (log scale)")


def _accuracy_table(
    runs: list[dict[str, Any]], chance: float
) -> dict[str, dict[int, dict[int, float]]]:
    """label -> seed -> batch size -> final accuracy, labels in :data:`NORMS` order."""
    table = stats.final_by_param(runs, "batch_size", chance)
    order = list(NORMS)
    return dict(sorted(table.items(),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _drops(by_seed: dict[int, dict[int, float]], smallest: int) -> list[float]:
    """Per seed: the best accuracy over batch sizes minus the accuracy at ``smallest``."""
    return [max(accs.values()) - accs[smallest] for accs in by_seed.values() if smallest in accs]


def _last_accuracy(run: dict[str, Any]) -> float | None:
    """The test accuracy of the final evaluation (the model the probe measured)."""
    _, acc = stats.curve(run)
    return acc[-1] if acc else None


def _batch_stats_table(
    runs: list[dict[str, Any]]
) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """label -> batch size -> (eval-mode accuracies, batch-statistics accuracies) at the
    end, over the seeds of completed runs that have both."""
    table: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
    for r in runs:
        batch_acc = r["extra"].get("end", {}).get("batch_stats_accuracy")
        last = _last_accuracy(r)
        if batch_acc is None or last is None or stats.diverged(r):
            continue
        pop, bat = table.setdefault(r["label"], {}).setdefault(
            r["params"]["batch_size"], ([], []))
        pop.append(last)
        bat.append(batch_acc)
    order = list(NORMS)
    return dict(sorted(table.items(),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _batch_stats_measures(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, str]:
    """Per batch-statistics norm: end accuracy with running vs batch statistics."""
    out: dict[str, str] = {}
    for label, by_bs in _batch_stats_table(runs).items():
        out[f"{label}: end test accuracy (%), running / batch statistics"] = ", ".join(
            f"{bs}: {100 * stats.mean(by_bs[bs][0]):.1f} / {100 * stats.mean(by_bs[bs][1]):.1f}"
            for bs in sizes if bs in by_bs)
    return out
