"""Claim 8: where BN goes (before or after the activation), and the redundant bias.

Ioffe & Szegedy (2015, section 3.2) put BN between the Linear layer and the
nonlinearity, on ``Wu + b``, and drop ``b``: BN subtracts the batch mean, so a bias
added before it cancels,

    BN(Wu + b) = γ·(Wu + b − (μ_B + b)) / σ_B + β = BN(Wu),

and its gradient ∂L/∂b = Σ_batch ∂L/∂z = 0 exactly (the backward of the mean
subtraction removes every constant). Whether the position before the activation
trains better than after it is an empirical question the paper argues from the shape
of ``Wu + b`` (more Gaussian than a sigmoid's output); here it is measured.

Per activation (ReLU, sigmoid), the same MLP is trained four ways: BN before the
activation without the bias (the paper's layer), BN before it with a bias kept, BN
after the activation, and no BN. At the end of the run with the bias kept, a probe
measures the bias's gradient on a training batch against the weight's, and how far
the bias moved from its initial value during training.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

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
from batchnorm.lab.models import MLP, Activation, MLPSpec, Placement
from batchnorm.lab.runner import Runner, dataset
from batchnorm.lab.train import Optimizer, Probe, RunResult, RunSpec, TrainSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

#: (label, norm, placement, drop_bias) of the four networks, in plot order.
VARIANTS: tuple[tuple[str, str, Placement, bool], ...] = (
    ("BN before", "batch", "before", True),
    ("BN before, bias kept", "batch", "before", False),
    ("BN after", "batch", "after", True),
    ("baseline", "none", "before", True),
)


@dataclass(frozen=True)
class PlacementConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden: hidden widths.
        activations: the nonlinearities, each trained with all four variants.
        optimizer, lr, batch_size, steps, eval_every: training, the same for every run.
        probe_batches: training batches the bias-gradient probe averages over.
        grad_ratio_max: the kept bias counts as inert if ‖∂L/∂b‖ / ‖∂L/∂W‖ stays
            below this in every layer and seed (float32 rounding gives ~1e-8).
        same_tolerance: accuracy points within which "bias kept" must match the
            paper's layer, in every seed, for the bias to be called redundant.
        placement_margin: accuracy points by which BN before the activation must
            beat BN after it, in every activation, for the placement claim.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activations: tuple[Activation, ...] = ("relu", "sigmoid")
    optimizer: Optimizer = "momentum"
    lr: float = 0.05
    batch_size: int = 60
    steps: int = 2000
    eval_every: int = 200
    probe_batches: int = 10
    grad_ratio_max: float = 1e-4
    same_tolerance: float = 1.0
    placement_margin: float = 0.5

    def check(self) -> None:
        super().check()
        if not self.activations:
            raise ConfigError("--activations: expected at least one activation, got none")
        if self.probe_batches < 1:
            raise ConfigError(f"--probe_batches: expected an int >= 1, got {self.probe_batches}")
        if self.grad_ratio_max <= 0:
            raise ConfigError(f"--grad_ratio_max: expected > 0, got {self.grad_ratio_max}")


class BiasProbe(Probe):
    """For a network whose Linear layers keep a bias in front of BN: the bias's
    gradient against the weight's, at the end of training, and the bias's drift.

    The gradient is taken on a copy in training mode (batch statistics, as in a
    training step), so the trained model and its running statistics stay untouched.
    """

    def __init__(self, batch_size: int, batches: int, seed: int) -> None:
        self.batch_size = batch_size
        self.batches = batches
        self.seed = seed
        self._start: list[torch.Tensor] = []

    def at_start(self, model: MLP, data: Dataset) -> dict[str, Any]:
        self._start = [b.linear.bias.detach().clone() for b in model.blocks
                       if b.linear.bias is not None]
        return {}

    def at_end(self, model: MLP, data: Dataset) -> dict[str, Any]:
        work = copy.deepcopy(model).train()
        gen = torch.Generator().manual_seed(self.seed)
        ratios: list[list[float]] = [[] for _ in work.blocks]
        for _ in range(self.batches):
            idx = torch.randperm(len(data.x_train), generator=gen)[:self.batch_size]
            work.zero_grad(set_to_none=True)
            F.cross_entropy(work(data.x_train[idx]), data.y_train[idx]).backward()
            for i, block in enumerate(work.blocks):
                lin = block.linear
                if lin.bias is not None and lin.bias.grad is not None:
                    ratios[i].append(float(lin.bias.grad.norm() / lin.weight.grad.norm()))
        kept = [b for b in model.blocks if b.linear.bias is not None]
        moved = [float((b.linear.bias.detach() - b0).abs().max())
                 for b, b0 in zip(kept, self._start)]
        return {
            # per layer: the largest ratio over the probe batches
            "grad_ratio": [max(r) for r in ratios if r],
            "bias_moved": moved,
        }


class BNPlacement(Experiment):
    name = "placement"
    title = "BN before or after the activation, and the bias in front of BN"
    description = (
        "Trains a 3x100 MLP per activation (ReLU, sigmoid) four ways: BN before the "
        "activation without the Linear bias (the paper's layer), BN before it with the "
        "bias kept, BN after the activation, and no BN; measures final test accuracy and, "
        "with the bias kept, the bias's gradient against the weight's."
    )
    criterion = (
        "Zero bias gradient (a check: it holds by construction): verified if the kept "
        "bias's gradient is below `grad_ratio_max` times the weight's in every layer, "
        "seed and activation. Redundant bias: supported if in every seed the final "
        "accuracy with the bias is within `same_tolerance` points of the paper's layer, "
        "for every activation, with at least two seeds; not supported if for an "
        "activation every seed differs by more, the same way; mixed otherwise. "
        "Placement: supported if BN before the activation beats BN after it by at least "
        "`placement_margin` points on average for every activation, seed ranges apart; "
        "not supported if after is as good or better for every activation; mixed "
        "otherwise."
    )
    Config = PlacementConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (16, 16, 16), "steps": 30, "eval_every": 10, "probe_batches": 2},
        "full": {"steps": 10000, "eval_every": 500},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: PlacementConfig = config
        data = dataset(cfg.data)
        train = TrainSpec(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                          optimizer=cfg.optimizer, eval_every=cfg.eval_every)
        specs = []
        for activation in cfg.activations:
            for label, norm, placement, drop_bias in VARIANTS:
                for seed in range(cfg.seeds):
                    probe = (BiasProbe(cfg.batch_size, cfg.probe_batches, seed)
                             if norm != "none" and not drop_bias else None)
                    specs.append(RunSpec(
                        label=f"{activation}: {label}", seed=seed, data=cfg.data, train=train,
                        model=MLPSpec(data.num_features, cfg.hidden, data.num_classes,
                                      norm=norm, activation=activation, placement=placement,
                                      drop_bias=drop_bias, norm_backend=cfg.norm_backend),
                        probe=probe,
                        params={"activation": activation, "variant": label},
                    ))
        return runner.run(specs, desc=self.name), {}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        acc = _final_by_variant(record["runs"], chance)
        measures: dict[str, Any] = {}
        for (activation, variant), values in acc.items():
            measures[f"{activation}, {variant}: final accuracy %"] = stats.fmt_range(
                values, 2, 100)
        ratios: list[float] = []
        moved: list[float] = []
        unmeasured = 0  # runs of the bias-kept variant that left a ratio out
        for run in record["runs"]:
            end = run["extra"].get("end") or {}
            # a non-finite value was saved as None (a run whose weights overflowed)
            values = end.get("grad_ratio", [])
            ratios += [v for v in values if _finite(v)]
            if run["params"].get("variant") == "BN before, bias kept" and (
                    stats.diverged(run) or not values or not all(_finite(v) for v in values)):
                unmeasured += 1
            moved += [v for v in end.get("bias_moved", []) if _finite(v)]
        measures["bias kept: largest |grad b| / |grad W| (any layer, seed)"] = (
            f"{max(ratios):.2e}" if ratios else "n/a")
        measures["bias kept: largest change of any bias entry over training"] = (
            f"{max(moved):.2e}" if moved else "n/a")

        activations = list(dict.fromkeys(a for a, _ in acc))
        # The zero gradient is an identity (BN's mean subtraction removes every constant):
        # a check that the probe measures what it says, not evidence for the claim.
        # "Everywhere": a run that diverged or gave no finite ratio verifies nothing.
        largest = max(ratios, default=math.nan)
        if ratios and largest >= cfg["grad_ratio_max"]:
            check_verdict = NOT_SUPPORTED
        elif ratios and not unmeasured:
            check_verdict = SUPPORTED
        else:
            check_verdict = MIXED
        verdicts = [Verdict(
            claim=8,
            statement="A bias in front of BN gets no gradient: BN subtracts the batch mean, "
                      "which removes it.",
            measured=f"|grad b| / |grad W| <= {stats.show(largest, '.1e')}"
                     + (f"; {unmeasured} run(s) diverged or unmeasured" if unmeasured else ""),
            verdict=check_verdict,
            criterion=f"gradient ratio < {cfg['grad_ratio_max']:g} in every layer of every run "
                      "that keeps the bias; mixed (not verified) if one diverged or gave no "
                      "finite ratio",
            check=True,
        )]
        verdicts.append(_bias_verdict(cfg, record["runs"], activations, chance))

        # Placement: before vs after, per activation.
        margins, separated = {}, {}
        for a in activations:
            before, after = acc.get((a, "BN before"), []), acc.get((a, "BN after"), [])
            margins[a] = 100 * (stats.mean(before) - stats.mean(after))
            separated[a] = stats.separated(before, after)
        if all(m <= 0 for m in margins.values()):
            placement_verdict = NOT_SUPPORTED
        else:
            placement_verdict = grade(
                effect_ok=all(separated.values()),
                threshold_ok=all(m >= cfg["placement_margin"] for m in margins.values()),
                direction_ok=True,
            )
        verdicts.append(Verdict(
            claim=8,
            statement="BN before the nonlinearity (the paper's placement) trains better "
                      "than after it.",
            measured="before minus after (points): " + ", ".join(
                f"{a} {m:+.2f}" for a, m in margins.items()),
            verdict=placement_verdict,
            criterion=f">= {cfg['placement_margin']:g} points for every activation, seed "
                      "ranges apart",
        ))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        groups = stats.by_label(record["runs"])
        activations = list(dict.fromkeys(r["params"]["activation"] for r in record["runs"]))
        fig, axes = plots.figure(ncols=len(activations), width=5.0)
        colors = dict(zip([v[0] for v in VARIANTS],
                          (plots.BN_COLOR, plots.PALETTE[2], plots.PALETTE[1],
                           plots.BASELINE_COLOR)))
        for ax, activation in zip(axes, activations):
            for variant, *_ in VARIANTS:
                runs = groups.get(f"{activation}: {variant}", [])
                if runs:
                    plots.band(ax, runs, variant, colors[variant], scale=100)
            ax.set_title(activation)
            ax.set_xlabel("step")
            plots.percent_axis(ax)
            plots.legend(ax, fontsize=8)
        caption = ("Test accuracy over training, mean and seed range: BN before the "
                   "activation without and with the Linear bias, BN after it, no BN.")
        return [(caption, fig)]


def _bias_verdict(cfg: dict[str, Any], runs: list[dict[str, Any]], activations: list[str],
                  chance: float) -> Verdict:
    """Dropping the bias in front of BN changes nothing: per activation and seed, the
    final accuracy with the bias kept minus without it (same seed: same batches).

    An equivalence under the seed-spread rule: supported if every seed's difference is
    within ``same_tolerance`` points, with at least two seeds (one seed has no spread
    to compare); not supported if, for some activation, every seed's difference lies
    beyond the tolerance on the same side; mixed otherwise. Equal accuracy means
    something only if both networks trained (two diverged variants both score chance),
    so an untrained run makes it mixed.
    """
    acc: dict[tuple[str, str], dict[int, float]] = {}
    for r in runs:
        key = (r["params"]["activation"], r["params"]["variant"])
        acc.setdefault(key, {})[r["seed"]] = stats.final_accuracy(r, chance)
    tol = cfg["same_tolerance"]
    diffs: dict[str, list[float]] = {}
    for a in activations:
        kept, without = acc.get((a, "BN before, bias kept"), {}), acc.get((a, "BN before"), {})
        diffs[a] = [100 * (kept[s] - without[s]) for s in sorted(kept) if s in without]
    trained = all(stats.trained(r, chance) for r in runs
                  if r["params"].get("variant") in ("BN before", "BN before, bias kept"))
    within = all(len(d) >= 2 and all(abs(v) <= tol for v in d) for d in diffs.values())
    apart = any(len(d) >= 2 and (min(d) > tol or max(d) < -tol) for d in diffs.values())
    if trained and within:
        verdict = SUPPORTED
    elif trained and apart:
        verdict = NOT_SUPPORTED
    else:
        verdict = MIXED
    measured = "accuracy with the bias minus without (points): " + ", ".join(
        f"{a} {stats.show(stats.mean(d), '+.2f')} (seeds "
        + ", ".join(f"{v:+.2f}" for v in d) + ")" for a, d in diffs.items())
    if not trained:
        measured += "; not testable: a network did not train"
    return Verdict(
        claim=8,
        statement="A bias in front of BN is redundant: dropping it changes nothing.",
        measured=measured,
        verdict=verdict,
        criterion=f"every seed's difference within {tol:g} points for every activation, at "
                  "least two seeds, both variants trained (at least halfway from chance to "
                  f"100%) in every run; not supported if for an activation every seed's "
                  f"difference is beyond {tol:g} points on the same side; mixed otherwise",
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _final_by_variant(
    runs: list[dict[str, Any]], chance: float
) -> dict[tuple[str, str], list[float]]:
    """(activation, variant) -> final accuracy per seed."""
    table: dict[tuple[str, str], list[float]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        key = (run["params"]["activation"], run["params"]["variant"])
        table.setdefault(key, []).append(stats.final_accuracy(run, chance))
    return table
