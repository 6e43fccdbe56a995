"""Claim 7: at inference BN normalizes with population statistics, so one example can
be classified on its own; how those statistics are estimated matters.

In training, BN normalizes with the mini-batch's mean and variance; an output then
depends on the other examples of the batch, and a batch of one has no variance at
all. At inference the layer uses fixed population statistics instead (Ioffe &
Szegedy 2015, section 3.1; here the running averages kept during training), which
makes it a fixed affine map per unit: the prediction for an example no longer
depends on its batch.

The running averages mix statistics from many past versions of the weights. With a
slow average (small momentum, or the cumulative average of every batch since the
start) they lag behind the final weights; recomputing them as exact population
statistics of the final network (:func:`batchnorm.recalibrate`, "precise BN")
removes the lag.

The same BN network is trained with several running-average settings. At the end a
probe (a) classifies test examples one at a time and compares with the batched
predictions, (b) classifies the test set with batch statistics of test batches of
several sizes instead of the population statistics, and (c) recalibrates a copy on
the training set and classifies with the exact statistics.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

import batchnorm
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
)
from batchnorm.lab.models import MLP, Activation, MLPSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, Probe, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

CUMULATIVE = "cumulative"


@dataclass(frozen=True)
class InferenceConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation, optimizer, lr, batch_size, steps, eval_every: training.
        momenta: running-average momenta, one BN network each (torch's default 0.1).
        cumulative: also train one with the cumulative average (``momentum=None``).
        single_examples: test examples classified one at a time.
        test_batch_sizes: sizes of the test batches whose own statistics replace the
            population statistics in (b) (each >= 2: one value has no variance).
        recal_batch_size: batch size of the recalibration pass over the training set.
        logit_tolerance: one-at-a-time logits must match the batched ones within this,
            relative to the largest logit.
        batch_stat_drop: points of accuracy that batch statistics of the smallest test
            batch must lose against population statistics, in every seed.
        recal_gain: points that recalibrated statistics must gain over the running
            averages for the stalest setting.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: Activation = "relu"
    optimizer: Optimizer = "momentum"
    lr: float = 0.05
    batch_size: int = 60
    steps: int = 2000
    eval_every: int = 200
    momenta: tuple[float, ...] = (0.1, 0.01, 0.001)
    cumulative: bool = True
    single_examples: int = 200
    test_batch_sizes: tuple[int, ...] = (2, 4, 16, 64)
    recal_batch_size: int = 200
    logit_tolerance: float = 1e-4
    batch_stat_drop: float = 2.0
    recal_gain: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.momenta and not self.cumulative:
            raise ConfigError("--momenta: expected at least one momentum (or --cumulative=true)")
        bad = [m for m in self.momenta if not 0.0 < m <= 1.0]
        if bad:
            raise ConfigError(f"--momenta: expected values in (0, 1], got {bad[0]}")
        if not self.test_batch_sizes or min(self.test_batch_sizes) < 2:
            raise ConfigError(
                f"--test_batch_sizes: expected sizes >= 2, got {list(self.test_batch_sizes)}")
        if self.single_examples < 1:
            raise ConfigError(f"--single_examples: expected an int >= 1, got {self.single_examples}")
        if self.recal_batch_size < 2:
            raise ConfigError(
                f"--recal_batch_size: expected an int >= 2, got {self.recal_batch_size}")


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def _bn_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that keep running statistics, in model order."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)]


class InferenceProbe(Probe):
    """At the end of training: one-at-a-time inference, batch statistics at test time,
    and recalibrated population statistics (all on copies or under ``no_grad`` in eval
    mode: the trained model is left as it is)."""

    def __init__(self, single_examples: int, test_batch_sizes: tuple[int, ...],
                 recal_batch_size: int, seed: int) -> None:
        self.single_examples = single_examples
        self.test_batch_sizes = test_batch_sizes
        self.recal_batch_size = recal_batch_size
        self.seed = seed

    def _recalibrated(self, model: MLP, data: Dataset) -> MLP:
        """A copy of ``model`` with exact population statistics of its current weights
        over the training set."""
        work = copy.deepcopy(model)
        xt, rb = data.x_train, self.recal_batch_size
        batchnorm.recalibrate(work, [xt[i:i + rb] for i in range(0, len(xt), rb)])
        return work

    @torch.no_grad()
    def at_eval(self, model: MLP, data: Dataset, step: int) -> dict[str, Any]:
        # The running averages lag most while the weights move fast: recalibrated
        # accuracy at every evaluation, beside the row's running-average accuracy.
        return {"recalibrated_accuracy": _accuracy(self._recalibrated(model, data)(data.x_test),
                                                   data.y_test)}

    @torch.no_grad()
    def at_end(self, model: MLP, data: Dataset) -> dict[str, Any]:
        x, y = data.x_test, data.y_test
        model.eval()
        logits = model(x)
        n = min(self.single_examples, len(x))
        singles = torch.cat([model(x[i:i + 1]) for i in range(n)])
        scale = float(logits[:n].abs().max())
        out: dict[str, Any] = {
            "population_accuracy": _accuracy(logits, y),
            "single_agree": float((singles.argmax(1) == logits[:n].argmax(1)).float().mean()),
            "single_max_rel_diff": float((singles - logits[:n]).abs().max()) / scale,
        }
        # Batch statistics at test time, test batches in a seeded order.
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        out["batch_stat_accuracy"] = {
            str(b): batch_statistics_accuracy(model, x, y, b, order)[0]
            for b in self.test_batch_sizes
        }
        # Exact population statistics of the final weights over the training set.
        work = self._recalibrated(model, data)
        out["recalibrated_accuracy"] = _accuracy(work(x), y)
        # How far the running averages were from those statistics: |mean error| in
        # units of the population std, and |log variance ratio|, averaged over units.
        mean_err, var_err = [], []
        for old, new in zip(_bn_layers(model), _bn_layers(work)):
            std = new.running_var.sqrt()
            mean_err.append(float(((old.running_mean - new.running_mean).abs() / std).mean()))
            var_err.append(float((old.running_var / new.running_var).log().abs().mean()))
        out["running_mean_error"] = sum(mean_err) / len(mean_err)
        out["running_var_log_error"] = sum(var_err) / len(var_err)
        return out


def _setting(run: dict[str, Any]) -> str:
    return run["params"]["setting"]


def _curve_means(run: dict[str, Any]) -> tuple[float, float]:
    """Mean test accuracy with the running averages and with recalibrated statistics
    over the run's evaluations after step 0 (where both were measured)."""
    rows = [r for r in stats.test_rows(run)
            if r["step"] > 0 and isinstance(r.get("recalibrated_accuracy"), float)]
    return (stats.mean([r["accuracy"] for r in rows]),
            stats.mean([r["recalibrated_accuracy"] for r in rows]))


class Inference(Experiment):
    name = "inference"
    title = "Inference with population statistics, and recalibrating them"
    description = (
        "Trains a 3x100 ReLU MLP with BN under several running-average settings "
        "(momentum 0.1, 0.01, 0.001, and the cumulative average); then classifies test "
        "examples one at a time, classifies the test set with the statistics of small test "
        "batches instead of the population's, and recalibrates the population statistics "
        "exactly on the training set."
    )
    criterion = (
        "Single examples: supported if one-at-a-time predictions equal the batched ones "
        "(logits within `logit_tolerance`) in every run and batch statistics of the "
        "smallest test batch lose at least `batch_stat_drop` points against population "
        "statistics in every seed (one value per seed), seed ranges apart; mixed if one of "
        "the two holds. Recalibration: "
        "supported if, for the setting whose running averages are furthest from the exact "
        "statistics, recalibrating gains at least `recal_gain` points on average, seed "
        "ranges apart; not supported if it gains nothing anywhere; mixed otherwise."
    )
    Config = InferenceConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (16, 16, 16), "steps": 30, "eval_every": 10, "single_examples": 20,
                 "momenta": (0.1,), "test_batch_sizes": (2, 16)},
        "full": {"steps": 10000, "eval_every": 500},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: InferenceConfig = config
        data = dataset(cfg.data)
        train = TrainSpec(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        settings: list[tuple[str, float | None]] = [(f"momentum {m:g}", m) for m in cfg.momenta]
        if cfg.cumulative:
            settings.append((CUMULATIVE, None))
        specs = [
            RunSpec(
                label=f"BN, {setting}", seed=seed, data=cfg.data, train=train,
                model=MLPSpec(data.num_features, cfg.hidden, data.num_classes, norm="batch",
                              activation=cfg.activation, norm_backend=cfg.norm_backend,
                              norm_options=(("momentum", momentum),)),
                probe=InferenceProbe(cfg.single_examples, cfg.test_batch_sizes,
                                     cfg.recal_batch_size, seed),
                params={"setting": setting, "momentum": momentum},
            )
            for setting, momentum in settings
            for seed in range(cfg.seeds)
        ]
        return runner.run(specs, desc=self.name), {"settings": [s for s, _ in settings]}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        runs = [r for r in record["runs"] if r["extra"].get("end")]
        settings = list(dict.fromkeys(_setting(r) for r in record["runs"]))
        ends = {s: [r["extra"]["end"] for r in runs if _setting(r) == s] for s in settings}
        sizes = [str(b) for b in cfg["test_batch_sizes"]]
        measures: dict[str, Any] = {}
        for s, e in ends.items():
            if not e:
                measures[f"{s}: runs"] = "every run diverged"
                continue
            measures[f"{s}: population statistics accuracy %"] = stats.fmt_range(
                [v["population_accuracy"] for v in e], 2, 100)
            measures[f"{s}: batch statistics accuracy % (test batch "
                     + ", ".join(sizes) + ")"] = ", ".join(
                f"{100 * stats.mean([v['batch_stat_accuracy'][b] for v in e]):.2f}"
                for b in sizes)
            measures[f"{s}: recalibrated accuracy %"] = stats.fmt_range(
                [v["recalibrated_accuracy"] for v in e], 2, 100)
            measures[f"{s}: running mean error (population std units)"] = stats.fmt_range(
                [v["running_mean_error"] for v in e], 3)
        all_ends = [v for e in ends.values() for v in e]
        verdicts = []

        # (a) one example at a time; batch statistics instead of population ones.
        agree = bool(all_ends) and all(
            v["single_agree"] == 1.0 and v["single_max_rel_diff"] <= cfg["logit_tolerance"]
            for v in all_ends)
        small = sizes[0]
        # One value per seed: a seed's runs share their weights (the running averages
        # never enter training), so its batch-statistics accuracy is the same number in
        # every setting, and pooling them would count one seed several times.
        seeds = sorted({r["seed"] for r in runs})
        per_seed = [[r["extra"]["end"] for r in runs if r["seed"] == seed] for seed in seeds]
        pop = [stats.mean([v["population_accuracy"] for v in e]) for e in per_seed]
        by_batch = [stats.mean([v["batch_stat_accuracy"][small] for v in e]) for e in per_seed]
        drop = 100 * (stats.mean(pop) - stats.mean(by_batch))
        needs_population = (stats.separated(pop, by_batch)
                            and 100 * (min(pop) - max(by_batch)) >= cfg["batch_stat_drop"])
        max_diff = max((v["single_max_rel_diff"] for v in all_ends), default=math.nan)
        # One example at a time equals the batch by construction (eval mode uses fixed
        # statistics): a check that the probe measures what it says, not evidence.
        verdicts.append(Verdict(
            claim=7,
            statement="With population statistics one example at a time is classified "
                      "exactly as in a batch.",
            measured=(f"one at a time: {'same' if agree else 'different'} predictions "
                      f"(logits within {stats.show(max_diff, '.1e')})"
                      if all_ends else "no completed run"),
            verdict=SUPPORTED if agree else MIXED if not all_ends else NOT_SUPPORTED,
            criterion=f"identical predictions (logits within {cfg['logit_tolerance']:g}) in "
                      "every run",
            check=True,
        ))
        verdicts.append(Verdict(
            claim=7,
            statement="Batch statistics at test time fail for small batches: inference "
                      "needs the population statistics.",
            measured=(f"batch statistics of {small} examples: "
                      f"{stats.show(100 * stats.mean(by_batch), '.1f', '%')} vs population "
                      f"{stats.show(100 * stats.mean(pop), '.1f', '%')} "
                      f"({stats.show(drop, '+.1f')} points lost)"
                      if all_ends else "no completed run"),
            verdict=(SUPPORTED if needs_population
                     else NOT_SUPPORTED if all_ends and drop <= 0 else MIXED),
            criterion=f">= {cfg['batch_stat_drop']:g} points lost in every seed, seed ranges "
                      "apart (one value per seed: a seed's settings share its weights)",
        ))

        # (b) recalibration over training: per run, the mean over the evaluations
        # after step 0 of the running-average and the recalibrated accuracy; judged at
        # the setting whose running averages end furthest from the exact statistics.
        curves = {s: [_curve_means(r) for r in runs if _setting(r) == s] for s in settings}
        gains = {s: 100 * stats.mean([rc - ema for ema, rc in c])
                 for s, c in curves.items() if c}
        end_gains = {s: 100 * stats.mean([v["recalibrated_accuracy"] - v["population_accuracy"]
                                          for v in e]) for s, e in ends.items() if e}
        for s, gain in gains.items():
            measures[f"{s}: recalibrated minus running averages, points (mean over "
                     "training; at the end)"] = f"{gain:+.2f}; {end_gains.get(s, math.nan):+.2f}"
        staleness = {s: stats.mean([v["running_mean_error"] for v in e])
                     for s, e in ends.items() if e}
        if gains:
            stalest = max(staleness, key=lambda s: staleness[s])
            ema = [m for m, _ in curves[stalest]]
            recal = [m for _, m in curves[stalest]]
            if all(g <= 0 for g in gains.values()):
                recal_verdict = NOT_SUPPORTED
            elif stats.separated(recal, ema) and gains[stalest] >= cfg["recal_gain"]:
                recal_verdict = SUPPORTED
            else:
                recal_verdict = MIXED
            measured = ("gain from recalibrating, mean over training (points): "
                        + ", ".join(f"{s} {g:+.2f}" for s, g in gains.items())
                        + f"; stalest: {stalest}")
        else:
            recal_verdict, measured = NOT_SUPPORTED, "no completed run"
        verdicts.append(Verdict(
            claim=7,
            statement="Recalibrating the population statistics matters: exact statistics "
                      "beat running averages that lag behind the weights.",
            measured=measured,
            verdict=recal_verdict,
            criterion=f">= {cfg['recal_gain']:g} points on average over training at the "
                      "stalest setting, seed ranges apart",
        ))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        cfg = record["config"]
        settings = list(dict.fromkeys(_setting(r) for r in record["runs"]))
        ends = {s: [r["extra"]["end"] for r in record["runs"]
                    if _setting(r) == s and r["extra"].get("end")] for s in settings}
        sizes = list(cfg["test_batch_sizes"])
        fig, (ax1, ax2) = plots.figure(ncols=2, width=5.0)
        groups = {s: [r for r in record["runs"] if _setting(r) == s] for s in settings}
        # The weights are the same in every setting (running averages never enter
        # training), so the batch-statistics line is drawn once, one value per seed:
        # its mean over the seed's completed settings (the same number in each).
        done = [r for r in record["runs"] if r["extra"].get("end")]
        per_seed = [
            [stats.mean([r["extra"]["end"]["batch_stat_accuracy"][str(b)]
                         for r in done if r["seed"] == seed]) for b in sizes]
            for seed in sorted({r["seed"] for r in done})
        ]
        plots.seed_band(ax1, sizes, per_seed, "statistics of the test batch",
                        plots.BASELINE_COLOR, scale=100, marker="o")
        for i, (s, e) in enumerate(ends.items()):
            color = plots.PALETTE[i % len(plots.PALETTE)]
            if e:
                population = [100 * v["population_accuracy"] for v in e]
                ax1.axhline(stats.mean(population), color=color, linestyle="--", linewidth=1,
                            label=f"running averages, {s} (n={len(e)})")
                if len(e) > 1:
                    ax1.axhspan(min(population), max(population), color=color, alpha=0.12,
                                linewidth=0)
            for run in groups[s]:
                rows = [r for r in stats.test_rows(run)
                        if isinstance(r.get("recalibrated_accuracy"), float)]
                ax2.plot([r["step"] for r in rows],
                         [100 * (r["recalibrated_accuracy"] - r["accuracy"]) for r in rows],
                         color=color, alpha=0.8,
                         label=s if run is groups[s][0] else None)
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("test batch size (its own statistics)")
        plots.percent_axis(ax1)
        plots.legend(ax1, fontsize=7)
        ax1.set_title("dashed: population statistics", fontsize=9)
        ax2.axhline(0, color="black", linewidth=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("recalibrated minus running averages (points)")
        ax2.grid(alpha=0.3)
        plots.legend(ax2, fontsize=7)
        caption = ("Left: test accuracy with the statistics of each test batch (solid) "
                   "against the population statistics (dashed), mean over seeds, shaded: "
                   "the range over seeds. Right: what exact "
                   "recalibrated statistics gain over the running averages at each "
                   "evaluation, one line per seed and running-average setting.")
        return [(caption, fig)]
