"""Claim 5: BN regularizes, through the noise of batch statistics, and can reduce the
need for dropout.

Ioffe & Szegedy (2015, section 3.4) note that a training example is "seen in
conjunction with other examples in the mini-batch", so the network no longer
produces deterministic values for it, and that removing dropout from BN-Inception
did not hurt. Here an MLP is made to overfit: it trains long enough to fit a small
subset of the training data exactly. Four configurations (baseline, baseline with
dropout, BN, BN with dropout) each train at every rate of a small grid, and each is
judged at the rate that does best on held-out training examples, so that no
configuration is compared at a rate that suits only another one.

The mechanism (the regularization comes from the noise of the batch statistics, so
it is stronger for smaller batches) is tested by varying that noise alone: ghost BN
(``batchnorm.GhostBatchNorm1d``) normalizes chunks of ``virtual_batch_size``
examples of each batch with the chunk's own statistics, so smaller chunks mean
noisier statistics while the batch, the learning rate (BN's chosen one), the steps
and the seeds stay those of the BN runs. If the noise regularizes, the smallest
chunks give the smallest generalization gap; if the order reverses, it does not.

The noise itself is also measured, as a description, not as evidence: the first
BN layer's normalized value of one fixed example changes with the other examples
drawn into its mini-batch, and its spread over random batch compositions shrinks
about as 1/sqrt(B). That is the arithmetic of sampling and holds for any network
and any input (an untrained network on Gaussian noise gives the same numbers), so
it says how strong the noise is, not that it regularizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

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
from batchnorm.lab.models import MLP, Activation, MLPSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import (
    Optimizer,
    Probe,
    RunResult,
    RunSpec,
    TrainSpec,
    evaluate,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

BASELINE, BASELINE_DROPOUT, BN, BN_DROPOUT = (
    "baseline", "baseline + dropout", "BN", "BN + dropout")
#: The configurations in report order: (name, norm, uses dropout).
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    (BASELINE, "none", False),
    (BASELINE_DROPOUT, "none", True),
    (BN, "batch", False),
    (BN_DROPOUT, "batch", True),
)
COLORS: dict[str, str] = {
    BASELINE: plots.BASELINE_COLOR, BASELINE_DROPOUT: "#ff7f0e",
    BN: plots.BN_COLOR, BN_DROPOUT: "#2ca02c",
}
#: The measured splits, as the probe stores them.
SPLITS: tuple[str, ...] = ("train", "validation", "test")


@dataclass(frozen=True)
class RegularizationConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation: the network (PyTorch's default init).
        dropout: the drop probability of the "+ dropout" configurations, after every
            hidden block. 0.2, not the customary 0.5: at the rate that suits the
            baseline (0.1) a rate of 0.5 keeps it from fitting the subset and does not
            raise its test accuracy, while 0.2 raises it by about a point.
        train_examples: the training subset (the first this many training examples);
            small, so that every configuration can fit it.
        validation_examples: the last this many training examples, never trained on;
            each configuration's rate is chosen by its accuracy there.
        optimizer, lr_grid, batch_size, steps, eval_every: training; every
            configuration trains at every rate of ``lr_grid``.
        noise_examples: examples (the first of the training subset) whose normalized
            values are followed across batch compositions.
        noise_draws: random batch compositions per example and batch size.
        noise_batch_sizes: the batch sizes of the noise measurement.
        virtual_batches: ghost BN's virtual batch sizes (each below ``batch_size``),
            trained at BN's chosen rate for claim 5c; the full batch is the BN runs
            themselves. 6 and 20 divide the batch of 60 into equal chunks.
        gap_margin: accuracy points by which BN's generalization gap must be smaller
            than the baseline's (claim 5a), and the smallest virtual batch's than
            the full batch's (claim 5c).
        dropout_tolerance: accuracy points by which BN without dropout may fall short
            of the baseline with dropout and still count as "as good" (claim 5b).
    """

    hidden: tuple[int, ...] = (300, 300)
    activation: Activation = "relu"
    dropout: float = 0.2
    train_examples: int = 1000
    validation_examples: int = 1000
    optimizer: Optimizer = "momentum"
    lr_grid: tuple[float, ...] = (0.03, 0.1, 0.2)
    batch_size: int = 60
    steps: int = 1500
    eval_every: int = 100
    noise_examples: int = 32
    noise_draws: int = 200
    noise_batch_sizes: tuple[int, ...] = (4, 16, 64, 256)
    virtual_batches: tuple[int, ...] = (6, 20)
    gap_margin: float = 0.5
    dropout_tolerance: float = 0.5

    def check(self) -> None:
        super().check()
        if not self.hidden:
            raise ConfigError("--hidden: expected at least one hidden layer, got none")
        if not 0.0 < self.dropout < 1.0:
            raise ConfigError(f"--dropout: expected a float in (0, 1), got {self.dropout}")
        if self.train_examples < 2 * self.batch_size:
            raise ConfigError(
                f"--train_examples: expected >= 2 * batch_size = {2 * self.batch_size}, "
                f"got {self.train_examples}")
        if self.validation_examples < 1:
            raise ConfigError(
                f"--validation_examples: expected an int >= 1, got {self.validation_examples}")
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise ConfigError(f"--lr_grid: expected positive rates, got {self.lr_grid}")
        if len(self.noise_batch_sizes) < 2 or min(self.noise_batch_sizes) < 2:
            raise ConfigError(
                f"--noise_batch_sizes: expected >= 2 sizes, each >= 2, got "
                f"{self.noise_batch_sizes}")
        others = self.train_examples - self.noise_examples
        if self.noise_examples < 1 or max(self.noise_batch_sizes) - 1 > others:
            raise ConfigError(
                f"--noise_batch_sizes: expected at most train_examples - noise_examples + 1 "
                f"= {others + 1}, got {max(self.noise_batch_sizes)}")
        if self.noise_draws < 2:
            raise ConfigError(f"--noise_draws: expected an int >= 2, got {self.noise_draws}")
        sizes = self.virtual_batches
        if (not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 2
                or sizes[-1] >= self.batch_size):
            raise ConfigError(
                f"--virtual_batches: expected increasing sizes, each >= 2 and below "
                f"batch_size ({self.batch_size}), got {sizes}")


class EndProbe(Probe):
    """Loss and accuracy on the training subset, the validation examples and the test
    set, and, for BN networks when ``measure_noise``, the batch noise of the first BN
    layer.

    Args:
        train_examples: the size of the training subset (its first examples).
        validation_examples: the held-out examples at the end of the training split.
        noise_examples, noise_draws, batch_sizes: see :class:`RegularizationConfig`.
        measure_noise: whether to measure the batch noise (not for the ghost BN runs:
            the description is taken once, on the BN networks).
    """

    def __init__(self, train_examples: int, validation_examples: int, noise_examples: int,
                 noise_draws: int, batch_sizes: tuple[int, ...], measure_noise: bool = True):
        self.train_examples = train_examples
        self.validation_examples = validation_examples
        self.noise_examples = noise_examples
        self.noise_draws = noise_draws
        self.batch_sizes = batch_sizes
        self.measure_noise = measure_noise

    def at_end(self, model: MLP, data: Dataset) -> dict[str, Any]:
        n = self.train_examples
        splits = {
            "train": (data.x_train[:n], data.y_train[:n]),
            "validation": (data.x_train[-self.validation_examples:],
                           data.y_train[-self.validation_examples:]),
            "test": (data.x_test, data.y_test),
        }
        out: dict[str, Any] = {}
        for name, (x, y) in splits.items():
            loss, acc = evaluate(model, x, y)  # eval mode: running statistics, no dropout
            out[name] = {"loss": loss, "accuracy": acc}
        norm = model.blocks[0].norm
        if self.measure_noise and not isinstance(norm, torch.nn.Identity):
            noise = batch_noise(model, data.x_train[:n], self.noise_examples, self.noise_draws,
                                self.batch_sizes, float(norm.eps))
            out["noise"] = {str(b): v for b, v in noise.items()}
        return out


@torch.no_grad()
def batch_noise(model: MLP, x: Tensor, examples: int, draws: int, batch_sizes: tuple[int, ...],
                eps: float) -> dict[int, float]:
    """How much the first BN layer's normalized value of an example depends on its batch.

    Each of the first ``examples`` rows of ``x`` is put in ``draws`` random batches of
    size B with B - 1 companions drawn without replacement from the other rows (never
    another followed example). In each batch its value is normalized with that batch's
    statistics, x̂ = (z - μ_B) / sqrt(σ²_B + eps), as BN does in training, where z is
    the first Linear layer's output. The noise at B is the standard deviation of x̂
    over the draws, averaged over units and examples; x̂ has unit variance over the
    data, so this is in units of the unit's own spread.

    Companions come from the training subset, as the training batches do; when B is
    not small against the subset's size N, the spread carries the finite-population
    factor sqrt((N - B) / (N - 1)) and falls a little faster than 1/sqrt(B).

    The layer itself is not called: its running statistics are left untouched.
    The companions' mean and squared deviations are computed centred and merged with
    the example's value by the pairwise (Chan) update, not as E[z²] - E[z]².

    Returns:
        batch size -> noise.
    """
    z = model.blocks[0].linear(x).double()
    followed, pool = z[:examples], z[examples:]
    gen = torch.Generator().manual_seed(0)
    out: dict[int, float] = {}
    for b in batch_sizes:
        picks = torch.stack([torch.randperm(len(pool), generator=gen)[: b - 1]
                             for _ in range(draws)])
        comp = pool[picks]                                   # (draws, b - 1, units)
        m_o = comp.mean(1)                                   # companions' mean
        ss_o = ((comp - m_o.unsqueeze(1)) ** 2).sum(1)       # their squared deviations
        delta = followed.unsqueeze(1) - m_o.unsqueeze(0)     # (examples, draws, units)
        mu = m_o.unsqueeze(0) + delta / b
        var = (ss_o.unsqueeze(0) + delta ** 2 * (b - 1) / b) / b  # biased, as BN
        xhat = (followed.unsqueeze(1) - mu) / torch.sqrt(var + eps)
        out[b] = float(xhat.std(1).mean())
    return out


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(v) for v in xs], [math.log(v) for v in ys]
    mx, my = stats.mean(lx), stats.mean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else math.nan


def _label(name: str, lr: float) -> str:
    return f"{name} lr={lr:g}"


def _ghost_name(virtual_batch: int) -> str:
    return f"BN, virtual batch {virtual_batch}"


class Regularization(Experiment):
    name = "regularization"
    title = "Regularization by batch noise, and the need for dropout"
    description = (
        "Trains a ReLU MLP until it fits a small training subset, as baseline, baseline "
        "+ dropout, BN and BN + dropout, each at every rate of a small grid and judged "
        "at the rate that does best on held-out training examples. Compares test "
        "accuracy and the generalization gap (train - test, eval mode). For the "
        "mechanism, trains ghost BN at BN's chosen rate with smaller virtual batches "
        "(noisier batch statistics, everything else the same) and compares the gaps. "
        "Also describes how much the first BN layer's normalized value of an example "
        "varies with the other examples of its batch, at several batch sizes."
    )
    criterion = (
        "Each configuration is judged at the rate of `lr_grid` with the best mean "
        "(over seeds) accuracy on the `validation_examples` held-out training examples. "
        "5a, primary criterion: BN's generalization gap (train accuracy - test "
        "accuracy, both in eval mode at the end) is at least `gap_margin` points smaller "
        "than the baseline's, seed ranges apart, and its test accuracy is not lower. "
        "5b: BN without dropout comes within `dropout_tolerance` points of the baseline "
        "with dropout on test accuracy, and dropout gains BN less than it gains the "
        "baseline (per-seed gains, ranges apart); mixed if only one holds. 5c, the "
        "mechanism: ghost BN with the smallest of `virtual_batches` has a generalization "
        "gap at least `gap_margin` points smaller than BN's with the full batch, seed "
        "ranges apart, the mean gap growing with the virtual batch size, its test "
        "accuracy not lower and its train accuracy at most `gap_margin` points lower; "
        "not supported if the smallest virtual batch's gap is larger in every seed; "
        "mixed otherwise. A diverged seed fails that seed in every rule. The spread of "
        "x̂ over batch compositions is reported as a description only: it falls as "
        "1/sqrt(B) by sampling arithmetic, for any network."
    )
    Config = RegularizationConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (32, 32), "train_examples": 300, "validation_examples": 300,
                 "steps": 40, "eval_every": 20, "lr_grid": (0.03, 0.1), "noise_examples": 8,
                 "noise_draws": 20, "noise_batch_sizes": (4, 16, 64)},
        "full": {"steps": 4000, "eval_every": 200, "lr_grid": (0.01, 0.03, 0.1, 0.2),
                 "noise_draws": 500},
    }

    def check_data(self, config: Any, data: Dataset) -> None:
        super().check_data(config, data)
        n_train = len(data.x_train)
        if config.train_examples + config.validation_examples > n_train:
            raise ConfigError(
                f"--train_examples/--validation_examples: expected a sum <= {n_train} (the "
                f"training split of {config.data}), got {config.train_examples} + "
                f"{config.validation_examples}")

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: RegularizationConfig = config
        data = dataset(cfg.data)
        probe = EndProbe(cfg.train_examples, cfg.validation_examples, cfg.noise_examples,
                         cfg.noise_draws, cfg.noise_batch_sizes)
        specs = []
        for name, norm, drop in CONFIGS:
            model = MLPSpec(data.num_features, cfg.hidden, data.num_classes, norm=norm,
                            activation=cfg.activation, norm_backend=cfg.norm_backend,
                            dropout=cfg.dropout if drop else 0.0)
            for lr in cfg.lr_grid:
                train = TrainSpec(steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                                  optimizer=cfg.optimizer, eval_every=cfg.eval_every,
                                  train_examples=cfg.train_examples)
                specs += [RunSpec(_label(name, lr), seed, cfg.data, model, train, probe=probe,
                                  params={"config": name, "norm": norm, "lr": lr,
                                          "dropout": model.dropout, "part": "grid"})
                          for seed in range(cfg.seeds)]
        runs = runner.run(specs, desc=self.name)
        chosen = choose_rates([r.to_dict() for r in runs])

        # Claim 5c: only the noise of the statistics changes. Ghost BN at BN's chosen
        # rate, batch, steps and seeds; the BN runs at that rate are the full batch.
        lr = chosen[BN]
        train = TrainSpec(steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every,
                          train_examples=cfg.train_examples)
        ghost_probe = EndProbe(cfg.train_examples, cfg.validation_examples, cfg.noise_examples,
                               cfg.noise_draws, cfg.noise_batch_sizes, measure_noise=False)
        ghost_specs = []
        for v in cfg.virtual_batches:
            model = MLPSpec(data.num_features, cfg.hidden, data.num_classes, norm="ghost",
                            activation=cfg.activation, norm_backend=cfg.norm_backend,
                            norm_options=(("virtual_batch_size", v),))
            ghost_specs += [RunSpec(_label(_ghost_name(v), lr), seed, cfg.data, model, train,
                                    probe=ghost_probe,
                                    params={"config": _ghost_name(v), "norm": "ghost", "lr": lr,
                                            "dropout": 0.0, "virtual_batch": v, "part": "ghost"})
                            for seed in range(cfg.seeds)]
        runs += runner.run(ghost_specs, desc=f"{self.name} ghost")
        return runs, {"chosen_lr": chosen, "virtual_batch_lr": lr}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chosen = chosen_runs(record)
        m = {name: _end_table(group) for name, group in chosen.items()}
        measures: dict[str, Any] = {
            "training subset / validation / test examples":
                f"{cfg['train_examples']} / {cfg['validation_examples']} / "
                f"{record['data'].get('test', 'n/a')}",
            "validation accuracy by rate (%)": "; ".join(
                f"{name}: " + ", ".join(f"{lr:g}: {100 * v:.1f}" for lr, v in by_lr.items())
                for name, by_lr in _validation_by_rate(record["runs"]).items()),
        }
        for name, t in m.items():
            prefix = f"{name} (lr {record['notes']['chosen_lr'][name]:g})"
            measures.update(_accuracy_measures(prefix, t))
            measures[f"{prefix}: loss gap (test - train loss)"] = stats.fmt_range(
                t["loss_gap"], 3)
            n_div = sum(stats.diverged(r) for r in chosen[name])
            if n_div:
                measures[f"{prefix}: diverged runs"] = n_div
        for without, with_ in ((BASELINE, BASELINE_DROPOUT), (BN, BN_DROPOUT)):
            if m.get(without) and m.get(with_):
                measures[f"{without}: test accuracy gained by dropout (points)"] = (
                    stats.fmt_range(_paired_gain(m[without], m[with_]), 2, 100))
        ghosts = {v: _end_table(group) for v, group in ghost_runs(record).items()}
        for v, t in ghosts.items():
            prefix = f"{_ghost_name(v)} (lr {record['notes']['virtual_batch_lr']:g})"
            measures.update(_accuracy_measures(prefix, t))
            if t["failed"]:
                measures[f"{prefix}: diverged runs"] = len(t["failed"])
        # A description of the noise, not evidence: it falls as 1/sqrt(B) for any input.
        noise = _noise_table(chosen.get(BN, []))
        for b, values in noise["by_size"].items():
            measures[f"BN: batch noise at B={b} (std of x̂; descriptive)"] = stats.fmt_range(
                values, 4)
        if noise["slopes"]:
            measures["BN: log-log slope of noise against B (-0.5: 1/sqrt(B), by sampling)"] = (
                stats.fmt_range(noise["slopes"], 3))

        verdicts: list[Verdict] = []
        halfway = stats.halfway(1.0 / record["data"]["classes"])
        if m.get(BN) and m.get(BASELINE):
            verdicts.append(_verdict_regularizes(cfg, m[BASELINE], m[BN], halfway))
        if all(m.get(name) for name, _, _ in CONFIGS):
            verdicts.append(_verdict_dropout(cfg, m, halfway))
        if ghosts and BN in m:
            verdicts.append(_verdict_batch_noise(cfg, m[BN], ghosts, halfway))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        cfg = record["config"]
        chosen = chosen_runs(record)
        lrs = record["notes"]["chosen_lr"]
        out: list[tuple[str, Figure]] = []

        fig, (ax,) = plots.figure(width=6.5, height=4.0)
        for name, group in chosen.items():
            plots.band(ax, group, f"{name} (lr {lrs[name]:g})", COLORS[name], scale=100)
        ax.set_xlabel("training step")
        plots.percent_axis(ax)
        tails = [100 * stats.final_accuracy(r, 0.0) for g in chosen.values() for r in g]
        if tails:  # the interesting range is the last few points, not the climb from chance
            ax.set_ylim(max(0.0, min(tails) - 8), min(100.0, max(tails) + 3))
        plots.legend(ax, fontsize=8)
        caption = (f"Test accuracy while fitting {cfg['train_examples']} training examples; "
                   "each configuration at its chosen rate, band: min..max over seeds.")
        out.append((caption, fig))

        fig, (ax_acc, ax_loss) = plots.figure(ncols=2, width=4.2, height=3.6)
        names = list(chosen)
        for i, name in enumerate(names):
            t = _end_table(chosen[name])
            for ax, values, scale in ((ax_acc, t["gap"], 100.0), (ax_loss, t["loss_gap"], 1.0)):
                if not values:
                    continue
                ax.bar([i], [scale * stats.mean(values)], color=COLORS[name], alpha=0.5)
                ax.plot([i] * len(values), [scale * v for v in values], "o", color=COLORS[name])
        for ax, ylabel in ((ax_acc, "train - test accuracy (points)"),
                           (ax_loss, "test - train loss")):
            ax.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ") for n in names],
                          fontsize=8)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, axis="y")
        ax_acc.set_title("generalization gap, accuracy", fontsize=10)
        ax_loss.set_title("generalization gap, loss", fontsize=10)
        caption = ("Generalization gaps at the end of training (eval mode); bars: mean, "
                   "dots: seeds.")
        out.append((caption, fig))

        ghosts = {v: _end_table(group) for v, group in ghost_runs(record).items()}
        if ghosts and BN in chosen:
            by_size = {**ghosts, cfg["batch_size"]: _end_table(chosen[BN])}
            fig, (ax_gap, ax_test) = plots.figure(ncols=2, width=4.2, height=3.6)
            sizes = sorted(by_size)
            for ax, key in ((ax_gap, "gap"), (ax_test, "test_acc")):
                xs = [b for b in sizes if by_size[b][key]]
                ax.plot(xs, [100 * stats.mean(by_size[b][key]) for b in xs], "o-",
                        color=COLORS[BN], label="mean over seeds")
                for b in xs:
                    ax.plot([b] * len(by_size[b][key]), [100 * v for v in by_size[b][key]],
                            ".", color=COLORS[BN], alpha=0.5)
                ax.set_xscale("log", base=2)
                ax.set_xticks(sizes, [str(b) for b in sizes])
                ax.minorticks_off()
                ax.set_xlabel("virtual batch size (log scale)")
                ax.grid(alpha=0.3)
            ax_gap.set_ylabel("train - test accuracy (points)")
            ax_test.set_ylabel("test accuracy (%)")
            ax_gap.set_title("generalization gap", fontsize=10)
            ax_test.set_title("test accuracy", fontsize=10)
            caption = (f"Ghost BN: the same network, batch ({cfg['batch_size']}), rate (BN's "
                       f"chosen {record['notes']['virtual_batch_lr']:g}), steps and seeds, "
                       "each batch normalized in chunks of the virtual batch size (the "
                       f"largest, {cfg['batch_size']}, is BN); smaller chunks, noisier "
                       "statistics. Line: mean, dots: seeds.")
            out.append((caption, fig))

        noise_runs = {name: chosen[name] for name in (BN, BN_DROPOUT) if name in chosen}
        if any(_noise_table(g)["slopes"] for g in noise_runs.values()):
            fig, (ax,) = plots.figure(width=5.0)
            # The two networks' curves nearly coincide: dashed and larger markers keep
            # both visible.
            for (name, group), style in zip(noise_runs.items(), ("o-", "s--")):
                _plot_noise(ax, group, name, COLORS[name], style)
            sizes = [float(b) for b in cfg["noise_batch_sizes"]]
            ref = _noise_table(noise_runs.get(BN, []))["by_size"]
            if ref:
                first = stats.mean(next(iter(ref.values())))
                ax.plot(sizes, [first * math.sqrt(sizes[0] / b) for b in sizes], ":",
                        color="black", label="∝ 1/sqrt(B)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel("std of x̂ over batch compositions")
            ax.grid(alpha=0.3, which="both")
            plots.legend(ax, fontsize=8)
            caption = (f"Batch noise of the first BN layer after training: the spread of one "
                       f"example's normalized value over {cfg['noise_draws']} random batches, "
                       f"mean over units and {cfg['noise_examples']} examples; dots: seeds. "
                       "A description of the noise's size: its fall as 1/sqrt(B) is "
                       "sampling arithmetic and holds for any network and input.")
            out.append((caption, fig))
        return out


def choose_rates(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per configuration of the rate grid, the rate with the best mean validation
    accuracy over seeds.

    A diverged run (no end measurements) scores 0.
    """
    return {name: max(by_lr, key=lambda lr: by_lr[lr])
            for name, by_lr in _validation_by_rate(runs).items()}


def _validation_by_rate(runs: list[dict[str, Any]]) -> dict[str, dict[float, float]]:
    """configuration -> rate -> mean validation accuracy over seeds, for the runs of
    the rate grid (not the ghost BN runs, which train at BN's chosen rate only)."""
    scores: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r["params"].get("part", "grid") != "grid":
            continue
        acc = r["extra"].get("end", {}).get("validation", {}).get("accuracy", 0.0)
        scores.setdefault(r["params"]["config"], {}).setdefault(r["params"]["lr"], []).append(acc)
    return {name: {lr: stats.mean(v) for lr, v in sorted(by_lr.items())}
            for name, by_lr in scores.items()}


def chosen_runs(record: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """configuration -> its runs at the chosen rate, sorted by seed, in report order."""
    lrs = record["notes"]["chosen_lr"]
    out: dict[str, list[dict[str, Any]]] = {}
    for name, _, _ in CONFIGS:
        group = [r for r in record["runs"]
                 if r["params"]["config"] == name and r["params"]["lr"] == lrs.get(name)]
        if group:
            out[name] = sorted(group, key=lambda r: r["seed"])
    return out


def ghost_runs(record: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """virtual batch size -> the ghost BN runs (claim 5c), sorted by seed, by size."""
    out: dict[int, list[dict[str, Any]]] = {}
    for r in record["runs"]:
        if r["params"].get("part") == "ghost":
            out.setdefault(int(r["params"]["virtual_batch"]), []).append(r)
    return {v: sorted(g, key=lambda r: r["seed"]) for v, g in sorted(out.items())}


def _accuracy_measures(prefix: str, table: dict[str, Any]) -> dict[str, str]:
    """The report's accuracy and gap lines for one configuration's end table."""
    return {
        f"{prefix}: train / test accuracy (%)": (
            f"{stats.fmt_range(table['train_acc'], 2, 100)} / "
            f"{stats.fmt_range(table['test_acc'], 2, 100)}"),
        f"{prefix}: generalization gap (accuracy points)": stats.fmt_range(
            table["gap"], 2, 100),
    }


def _end_table(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """End-of-run measures, one value per seed that completed, and under "failed" the
    seeds whose run diverged (no end measurements). A failed seed has no gap to
    compare, and a verdict's "every seed" must not quietly shrink to the others: every
    verdict counts it as a seed that fails (:func:`_failed_text`)."""
    t: dict[str, list[float]] = {
        k: [] for k in ("seed", "train_acc", "test_acc", "gap", "loss_gap", "failed")}
    for r in runs:
        end = r["extra"].get("end", {})
        if "train" not in end:
            t["failed"].append(float(r["seed"]))
            continue
        t["seed"].append(float(r["seed"]))
        t["train_acc"].append(end["train"]["accuracy"])
        t["test_acc"].append(end["test"]["accuracy"])
        t["gap"].append(end["train"]["accuracy"] - end["test"]["accuracy"])
        t["loss_gap"].append(end["test"]["loss"] - end["train"]["loss"])
    return t


def _noise_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Noise per batch size (one value per seed) and each seed's log-log slope."""
    by_size: dict[int, list[float]] = {}
    slopes: list[float] = []
    for r in runs:
        noise = r["extra"].get("end", {}).get("noise")
        if not noise:
            continue
        sizes = sorted(int(b) for b in noise)
        values = [noise[str(b)] for b in sizes]
        for b, v in zip(sizes, values):
            by_size.setdefault(b, []).append(v)
        slopes.append(loglog_slope([float(b) for b in sizes], values))
    return {"by_size": dict(sorted(by_size.items())), "slopes": slopes}


def _plot_noise(ax: Axes, runs: list[dict[str, Any]], name: str, color: str,
                style: str) -> None:
    by_size = _noise_table(runs)["by_size"]
    if not by_size:
        return
    sizes = list(by_size)
    ax.plot(sizes, [stats.mean(v) for v in by_size.values()], style, color=color,
            label=f"{name} (n={len(runs)})", markerfacecolor="none")
    for b, values in by_size.items():
        ax.plot([b] * len(values), values, ".", color=color, alpha=0.5)


def _learned(t: dict[str, list[float]], halfway: float) -> bool:
    """Every seed completed and tests at least halfway from chance to 100%: the network
    learned. A diverged seed fails this, as it fails every "every seed" rule."""
    return bool(t["test_acc"]) and not t["failed"] and all(a >= halfway for a in t["test_acc"])


def _failed_text(tables: dict[str, dict[str, list[float]]]) -> str:
    """A note for a verdict's measured text on the seeds that diverged ("" if none)."""
    parts = [f"{name} {len(t['failed'])}" for name, t in tables.items() if t["failed"]]
    return ("; diverged seeds (each fails its seed): " + ", ".join(parts)) if parts else ""


def _verdict_regularizes(cfg: dict[str, Any], base: dict[str, list[float]],
                         bn: dict[str, list[float]], halfway: float) -> Verdict:
    """5a: BN's generalization gap is smaller, without a lower test accuracy, and not
    because BN fits the training set less (its train accuracy at most gap_margin points
    below the baseline's), with both networks having learned."""
    shrink = 100 * (stats.mean(base["gap"]) - stats.mean(bn["gap"]))
    test_diff = 100 * (stats.mean(bn["test_acc"]) - stats.mean(base["test_acc"]))
    fits = 100 * (stats.mean(base["train_acc"]) - stats.mean(bn["train_acc"])) <= cfg["gap_margin"]
    return Verdict(
        claim=5,
        statement="BN regularizes: a network that fits its training set generalizes better "
                  "with BN (smaller train - test gap).",
        measured=f"gap {stats.show(100 * stats.mean(bn['gap']), '.2f')} (BN) vs "
                 f"{stats.show(100 * stats.mean(base['gap']), '.2f')} (baseline) points, "
                 f"{stats.show(shrink, '.2f')} smaller; test accuracy "
                 f"{stats.show(test_diff, '+.2f')} points; train accuracy "
                 f"{stats.show(100 * stats.mean(bn['train_acc']), '.1f', '%')} vs "
                 f"{stats.show(100 * stats.mean(base['train_acc']), '.1f', '%')}"
                 + _failed_text({BN: bn, BASELINE: base}),
        verdict=grade(
            effect_ok=stats.separated(base["gap"], bn["gap"]) and fits
            and _learned(base, halfway) and _learned(bn, halfway),
            threshold_ok=shrink >= cfg["gap_margin"],
            direction_ok=shrink > 0 and test_diff >= 0,
        ),
        criterion=f"BN's gap >= {cfg['gap_margin']:g} points smaller on average, seed ranges "
                  "apart, its test accuracy not lower, its train accuracy at most "
                  f"{cfg['gap_margin']:g} points below the baseline's, and both networks "
                  "testing at least halfway from chance to 100% in every seed (a diverged "
                  "seed fails)",
    )


def _verdict_dropout(cfg: dict[str, Any], m: dict[str, dict[str, list[float]]],
                     halfway: float) -> Verdict:
    """5b: BN alone is as good as the baseline with dropout, and dropout adds less to BN;
    all four configurations must have learned."""
    bn_vs_drop = 100 * (stats.mean(m[BN]["test_acc"]) - stats.mean(m[BASELINE_DROPOUT]["test_acc"]))
    gain_base = _paired_gain(m[BASELINE], m[BASELINE_DROPOUT])
    gain_bn = _paired_gain(m[BN], m[BN_DROPOUT])
    as_good = bn_vs_drop >= -cfg["dropout_tolerance"]
    less_gain = stats.mean(gain_bn) < stats.mean(gain_base)
    return Verdict(
        claim=5,
        statement="BN can reduce the need for dropout: BN alone tests as well as the "
                  "baseline with dropout, and dropout adds less to BN.",
        measured=f"BN {stats.show(bn_vs_drop, '+.2f')} points vs baseline + dropout; "
                 f"dropout gains {stats.show(100 * stats.mean(gain_base), '+.2f')} (baseline) "
                 f"and {stats.show(100 * stats.mean(gain_bn), '+.2f')} (BN) points"
                 + _failed_text(m),
        verdict=grade(
            effect_ok=stats.separated(gain_base, gain_bn)
            and all(_learned(t, halfway) for t in m.values()),
            threshold_ok=as_good,
            direction_ok=as_good or less_gain,
        ),
        criterion=f"BN within {cfg['dropout_tolerance']:g} points of baseline + dropout (mean "
                  "test accuracy), and dropout's per-seed gain for BN below every seed's gain "
                  "for the baseline, all four testing at least halfway from chance to "
                  "100% in every seed (a diverged seed fails); mixed if only one holds",
    )


def _verdict_batch_noise(cfg: dict[str, Any], full: dict[str, list[float]],
                         ghosts: dict[int, dict[str, list[float]]], halfway: float) -> Verdict:
    """5c, the mechanism: BN regularizes through the noise of its batch statistics, so
    noisier statistics regularize more.

    Ghost BN with virtual batches of v normalizes each chunk of v examples with the
    chunk's statistics: the smaller v, the noisier the statistics, and nothing else
    differs from the BN runs (``full``, virtual batch = the batch). If the noise is the
    regularizer, the smallest virtual batch has the smallest generalization gap, and
    not because it fits the training subset less (its train accuracy at most
    gap_margin points lower) or tests worse. The test can fail: if the noise did not
    regularize, the gaps would not order by v, or would order the other way.
    """
    batch = cfg["batch_size"]
    tables = {**ghosts, batch: full}
    sizes = sorted(tables)
    small = tables[sizes[0]]
    margin = cfg["gap_margin"]
    means = [stats.mean(tables[v]["gap"]) for v in sizes]
    shrink = 100 * (stats.mean(full["gap"]) - stats.mean(small["gap"]))
    test_diff = 100 * (stats.mean(small["test_acc"]) - stats.mean(full["test_acc"]))
    fits = 100 * (stats.mean(full["train_acc"]) - stats.mean(small["train_acc"])) <= margin
    ordered = all(a <= b for a, b in pairwise(means))
    # Each seed completed and learned in every configuration ("every seed" counts a
    # diverged seed as failing, never as absent).
    learned = all(_learned(t, halfway) for t in tables.values())
    if (learned and fits and ordered and shrink >= margin and test_diff >= 0
            and stats.separated(full["gap"], small["gap"])):
        verdict = SUPPORTED
    elif learned and shrink < 0 and stats.separated(small["gap"], full["gap"]):
        verdict = NOT_SUPPORTED  # the order reverses, beyond the seeds' spread
    else:
        verdict = MIXED
    names = {v: (f"virtual batch {v}" if v != batch else f"full batch {v} (BN)") for v in sizes}
    return Verdict(
        claim=5,
        statement="BN's regularization comes from the noise of its batch statistics, "
                  "stronger for smaller batches: ghost BN with smaller virtual batches "
                  "generalizes better.",
        measured="generalization gap (points): " + ", ".join(
            f"{names[v]} {stats.show(100 * mu, '.2f')}" for v, mu in zip(sizes, means))
                 + f"; smallest vs full: gap {stats.show(shrink, '.2f')} smaller, test "
                 f"accuracy {stats.show(test_diff, '+.2f')} points"
                 + _failed_text({names[v]: tables[v] for v in sizes}),
        verdict=verdict,
        criterion=f"at BN's chosen rate, the smallest virtual batch's gap >= {margin:g} points "
                  "below the full batch's, seed ranges apart, the mean gap growing with the "
                  f"virtual batch size, its test accuracy not lower and its train accuracy at "
                  f"most {margin:g} points lower, every network testing at least halfway from "
                  "chance to 100% in every seed; not supported if the smallest virtual "
                  "batch's gap is larger in every seed; mixed otherwise",
    )


def _paired_gain(without: dict[str, list[float]], with_: dict[str, list[float]]) -> list[float]:
    """Per seed both completed, test accuracy with dropout minus without (same seed:
    same initial weights and batch order)."""
    acc = dict(zip(with_["seed"], with_["test_acc"]))
    return [acc[s] - a for s, a in zip(without["seed"], without["test_acc"]) if s in acc]
