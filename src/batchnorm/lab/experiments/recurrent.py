"""Claim 9: batch normalization in a recurrent network must keep its statistics per
time step, and its γ starts small (Cooijmans et al. 2016, "Recurrent Batch
Normalization").

The BN-LSTM normalizes the input and the recurrent contributions separately,

    (i, f, o, g) = BN(W_h·h_{t−1}; γ_h) + BN(W_x·x_t; γ_x) + b,
    c_t = σ(f)⊙c_{t−1} + σ(i)⊙tanh(g),   h_t = σ(o)⊙tanh(BN(c_t; γ_c, β_c)),

and in training each step is normalized with that step's batch statistics. What the
paper prescribes on top is (1) population statistics per time step for inference:
early steps have very different statistics from later ones (at t = 0, h is zero, so
W_h·h is zero for every example), so one set of running averages for all steps
normalizes the early steps with the wrong numbers; and (2) γ initialized to 0.1 rather
than 1: with unit variance the tanh and sigmoid saturate and gradients vanish through
time.

MNIST-1D sequences (40 steps of one value, generated locally; Greydanus 2020) are
classified from the last hidden state by an LSTM, a BN-LSTM with per-step statistics and γ = 0.1, the same with
one set of statistics shared by all steps (in training every step is normalized with
its own batch statistics either way, so this network is the per-step one with other
population statistics), and the same with γ = 1. Test accuracy is
in eval mode (population statistics), as everywhere in the lab; for the BN-LSTMs a
probe also tests the final network with each test batch normalized by its own
statistics, which separates a network that learned poorly from one whose population
statistics do not fit it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.experiments.base import Analysis, Experiment, Verdict, grade
from batchnorm.lab.experiments.batchsize import BatchStatsProbe
from batchnorm.lab.models import RNNKind, RNNSpec
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

LSTM, BNLSTM, SHARED, GAMMA1 = ("LSTM", "BN-LSTM", "BN-LSTM, shared statistics",
                                "BN-LSTM, gamma = 1")
COLORS: dict[str, str] = {LSTM: plots.BASELINE_COLOR, BNLSTM: plots.BN_COLOR,
                          SHARED: plots.PALETTE[1], GAMMA1: plots.PALETTE[2]}


@dataclass(frozen=True)
class RecurrentConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        data: MNIST-1D by default, a sequence task; with image data an example is
            read row by row.
        sequence_length: time steps an example is read in; None: rows of a square
            image (28 for MNIST, 8 for the 8x8 digits), else one value per step (40
            for MNIST-1D).
        hidden_size: the LSTM's width.
        gamma_init: the BN-LSTM's initial γ (the paper's 0.1); the comparison runs use 1.
        optimizer, lr, batch_size, steps, eval_every: training, the same for every run.
        margin: accuracy points by which the better side must lead for each verdict.
    """

    data: str = "mnist1d"
    sequence_length: int | None = None
    hidden_size: int = 64
    gamma_init: float = 0.1
    optimizer: Optimizer = "adam"
    lr: float = 0.002
    batch_size: int = 64
    steps: int = 1000
    eval_every: int = 100
    margin: float = 1.0

    def check(self) -> None:
        super().check()
        if self.sequence_length is not None and self.sequence_length < 2:
            raise ConfigError(
                f"--sequence_length: expected an int >= 2, got {self.sequence_length}")
        if self.hidden_size < 1:
            raise ConfigError(f"--hidden_size: expected an int >= 1, got {self.hidden_size}")
        if self.gamma_init <= 0:
            raise ConfigError(f"--gamma_init: expected > 0, got {self.gamma_init}")


class Recurrent(Experiment):
    name = "rnn"
    title = "Batch normalization in an LSTM: statistics per time step, gamma = 0.1"
    description = (
        "Classifies MNIST-1D sequences (40 steps) with an LSTM, a BN-LSTM "
        "(Cooijmans et al. 2016: separate BN of the input and recurrent terms and of the "
        "cell, population statistics per time step, gamma initialized to 0.1), the same "
        "with one set of statistics for all steps, and the same with gamma = 1."
    )
    criterion = (
        "Final test accuracy (eval mode, mean of the last 3 evaluations). (a) BN helps the "
        "LSTM: the BN-LSTM ends at least `margin` points above the LSTM, seed ranges apart. "
        "(b) Statistics per step: per-step statistics end at least `margin` points above "
        "shared ones, seed ranges apart. (c) gamma = 0.1: ends at least `margin` points "
        "above gamma = 1, seed ranges apart. Each: not supported if the claimed side is "
        "not ahead at all, mixed if it is ahead but misses the margin or the seed rule."
    )
    Config = RecurrentConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden_size": 8, "steps": 20, "eval_every": 10, "batch_size": 32},
        "full": {"steps": 5000, "eval_every": 250},
    }

    def check_data(self, config: Any, data: Dataset) -> None:
        super().check_data(config, data)
        steps = sequence_length(config.sequence_length, data.num_features)
        if data.num_features % steps:
            raise ConfigError(
                f"--sequence_length: expected a divisor of the examples' length "
                f"{data.num_features} ({config.data}), got {steps}")

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: RecurrentConfig = config
        data = dataset(cfg.data)
        steps = sequence_length(cfg.sequence_length, data.num_features)
        train = TrainSpec(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        variants: tuple[tuple[str, RNNKind, int | None, float], ...] = (
            (LSTM, "lstm", None, cfg.gamma_init),
            (BNLSTM, "bnlstm", None, cfg.gamma_init),
            (SHARED, "bnlstm", 1, cfg.gamma_init),
            (GAMMA1, "bnlstm", None, 1.0),
        )
        specs = [
            RunSpec(
                label=label, seed=seed, data=cfg.data, train=train,
                model=RNNSpec(data.num_features, steps, cfg.hidden_size,
                              data.num_classes, kind=kind, max_timesteps=slots,
                              gamma_init=gamma, norm_backend=cfg.norm_backend),
                probe=BatchStatsProbe(cfg.batch_size) if kind == "bnlstm" else None,
                params={"kind": kind, "max_timesteps": slots, "gamma_init": gamma},
            )
            for label, kind, slots, gamma in variants
            for seed in range(cfg.seeds)
        ]
        return runner.run(specs, desc=self.name), {"sequence_length": steps}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        groups = stats.by_label(record["runs"])
        final = {k: [stats.final_accuracy(r, chance) for r in v] for k, v in groups.items()}
        measures: dict[str, Any] = {}
        for label, runs in groups.items():
            measures[f"{label}: final accuracy %"] = stats.fmt_range(final[label], 2, 100)
            batch = [r["extra"]["end"]["batch_stats_accuracy"] for r in runs
                     if "batch_stats_accuracy" in (r["extra"].get("end") or {})]
            if batch:
                measures[f"{label}: final network with batch statistics %"] = (
                    stats.fmt_range(batch, 2, 100))
            n_div = sum(stats.diverged(r) for r in runs)
            if n_div:
                measures[f"{label}: diverged runs"] = n_div
        if LSTM in groups and BNLSTM in groups:
            target = [stats.final_accuracy(r, chance) for r in groups[LSTM]]
            steps = [stats.steps_to_reach(r, t) for r, t in zip(groups[BNLSTM], target)]
            measures["BN-LSTM: steps to the LSTM's final accuracy (per seed)"] = ", ".join(
                "not reached" if s is None else str(s) for s in steps)

        verdicts = []
        for better, worse, statement in (
            (BNLSTM, LSTM, ("Batch normalization (BN-LSTM) trains an LSTM to a better "
                           "accuracy in the same number of steps.")),
            (BNLSTM, SHARED, ("A recurrent network must keep BN statistics per time step: "
                             "one set shared by all steps does worse at inference.")),
            (BNLSTM, GAMMA1, ("The BN-LSTM's gamma initialized to 0.1 trains better than "
                             "gamma = 1.")),
        ):
            if better in final and worse in final:
                # Both must have completed (a diverged rival scores chance: no comparison)
                # and the better one trained.
                comparable = (not any(stats.diverged(r) for r in groups[better] + groups[worse])
                              and all(stats.trained(r, chance) for r in groups[better]))
                verdicts.append(_lead(cfg, final, better, worse, statement, comparable))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        groups = stats.by_label(record["runs"])
        fig, (ax,) = plots.figure(width=6.5, height=4.2)
        for label, runs in groups.items():
            plots.band(ax, runs, label, COLORS.get(label, "black"), scale=100)
        ax.set_xlabel("step")
        plots.percent_axis(ax)
        plots.legend(ax, fontsize=8)
        caption = ("Test accuracy (eval mode: population statistics) over training, mean "
                   "and seed range: LSTM, BN-LSTM (statistics per step, gamma 0.1), the "
                   "same with one set of statistics for all steps, and with gamma = 1.")
        return [(caption, fig)]


def sequence_length(configured: int | None, features: int) -> int:
    """The time steps of a flattened example of ``features`` values: ``configured``,
    else the rows of a square image, else one value per step."""
    if configured is not None:
        return configured
    side = math.isqrt(features)
    return side if side * side == features else features


def _lead(cfg: dict[str, Any], final: dict[str, list[float]], better: str, worse: str,
          statement: str, comparable: bool) -> Verdict:
    lead = 100 * (stats.mean(final[better]) - stats.mean(final[worse]))
    return Verdict(
        claim=9,
        statement=statement,
        measured=f"{better} {100 * stats.mean(final[better]):.1f}% vs {worse} "
                 f"{100 * stats.mean(final[worse]):.1f}% ({lead:+.1f} points)",
        verdict=grade(
            effect_ok=stats.separated(final[better], final[worse]) and comparable,
            threshold_ok=lead >= cfg["margin"],
            direction_ok=lead > 0,
        ),
        criterion=f">= {cfg['margin']:g} points, seed ranges apart, no run of either "
                  f"diverged, and {better} trained (at least halfway from chance to 100%)",
    )
