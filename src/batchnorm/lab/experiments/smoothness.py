"""Claim 10: BN's benefit may come from a smoother loss landscape rather than from
reduced "internal covariate shift" (Santurkar, Tsipras, Ilyas & Madry 2018).

Three tests, as in that paper, on one network:

* If BN helped by keeping each layer's input distribution stable, noise that makes
  those distributions move at every step should take the benefit away. At a learning
  rate high enough that the network trains with BN and not without
  (``noisy_lr``), it is trained without BN, with BN, and with "noisy BN": BN followed
  by a random per-unit shift and scale redrawn at every step
  (:class:`~batchnorm.lab.models.NoisyBatchNorm`). The probe
  measures how much the distribution moves: on a fixed batch of training examples, in
  training mode (noise on), the per-unit mean of one layer's activation input at each
  evaluation; its instability is the standard deviation over evaluations of a unit's
  mean, averaged over units. That is a manipulation check (the noise did move the
  distributions), not a measure of internal covariate shift.
* Internal covariate shift as the paper measures it (its section 2.2): on a training
  batch, G = ∇_{W_i} L, the gradient of one layer's weight, and G′, the same gradient
  after every layer before it has taken a gradient step of the run's rate (the layers
  from i on unchanged); reported: ‖G − G′‖ and cos(G, G′). If BN reduced internal
  covariate shift, G′ would stay closer to G with BN.
* The landscape: at a rate where both networks train (``lr``: a trained network and
  one stuck on a plateau would compare a slope with a flat), without and with BN; at
  each evaluation, on a training batch, the loss L and gradient g
  (training mode, as an optimizer step sees them), then at points w − η·g along the
  gradient for η = lr·k over ``step_multipliers`` k. Reported: the loss's range over
  those points (how far one step's effect can be from what the gradient predicts), the
  gradient's largest change max ‖∇L(w − ηg) − g‖ (the paper's "gradient
  predictiveness", its Figure 4b: an ℓ2 distance, smaller = more predictive; the same
  divided by ‖g‖ is reported beside it), and the effective smoothness
  max ‖∇L(w − ηg) − g‖ / ‖ηg‖ (a local Lipschitz constant of the gradient, Figure 4c).
  The internal covariate shift is measured on the same batches.

The landscape is not measured for noisy BN: its loss along a direction would mix
the landscape with fresh noise at every point.
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
from batchnorm.lab.diagnostics import layer_inputs
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
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset

BASELINE, BN = "baseline", "BN"
HIGH_BASELINE, HIGH_BN, NOISY = "baseline, high rate", "BN, high rate", "noisy BN, high rate"
#: (label, registry name, part): the landscape runs at ``lr``, the noise runs at
#: ``noisy_lr``.
RUNS: tuple[tuple[str, str, str], ...] = (
    (BASELINE, "none", "landscape"), (BN, "batch", "landscape"),
    (HIGH_BASELINE, "none", "noise"), (HIGH_BN, "batch", "noise"),
    (NOISY, "noisy_batch", "noise"),
)
COLORS: dict[str, str] = {BASELINE: plots.BASELINE_COLOR, BN: plots.BN_COLOR,
                          HIGH_BASELINE: plots.BASELINE_COLOR, HIGH_BN: plots.BN_COLOR,
                          NOISY: plots.PALETTE[1]}


@dataclass(frozen=True)
class SmoothnessConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation: the network.
        optimizer, batch_size, steps, eval_every: training, the same for every run.
        lr: the rate of the landscape runs (both networks should train there).
        noisy_lr: the rate of the noise runs (BN should be needed there).
        noise_shift, noise_scale: noisy BN's per-unit shift U(−shift, shift) and scale
            U(1, scale), redrawn at every step.
        layer: the hidden layer whose activation input the instability is taken from.
        probe_examples: training examples in the fixed instability batch.
        step_multipliers: the landscape's step sizes, as multiples of ``lr``.
        landscape_batches: training batches each landscape measurement averages over.
        noisy_margin: accuracy points by which BN and noisy BN must beat the baseline
            at ``noisy_lr``.
        noisy_gap: accuracy points noisy BN may end below BN and still count as
            keeping BN's benefit (the paper: noisy BN trains almost exactly like BN).
        unstable_ratio: noisy BN's instability must be at least this many times BN's
            (the noise really moved the distributions).
        smooth_ratio: the baseline's loss range and gradient change must each be at
            least this many times BN's; and for internal covariate shift, a reduction
            by BN means the baseline's 1 − cos(G, G′) at least this many times BN's.
    """

    hidden: tuple[int, ...] = (100,) * 6
    activation: Activation = "relu"
    optimizer: Optimizer = "momentum"
    lr: float = 0.05
    noisy_lr: float = 0.15
    batch_size: int = 60
    steps: int = 2000
    eval_every: int = 100
    noise_shift: float = 1.0
    noise_scale: float = 2.0
    layer: int = 2
    probe_examples: int = 500
    step_multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    landscape_batches: int = 4
    noisy_margin: float = 1.0
    noisy_gap: float = 1.0
    unstable_ratio: float = 2.0
    smooth_ratio: float = 1.5

    def check(self) -> None:
        super().check()
        if not 0 <= self.layer < len(self.hidden):
            raise ConfigError(
                f"--layer: expected 0 <= layer < {len(self.hidden)}, got {self.layer}")
        if not self.step_multipliers or min(self.step_multipliers) <= 0:
            raise ConfigError(
                f"--step_multipliers: expected positive values, got {list(self.step_multipliers)}")
        if self.noise_shift < 0 or self.noise_scale < 1:
            raise ConfigError(
                f"--noise_shift/--noise_scale: expected shift >= 0 and scale >= 1, got "
                f"{self.noise_shift}, {self.noise_scale}")
        if self.steps // self.eval_every < 2:
            raise ConfigError(
                f"--eval_every: the layer-input instability needs at least 2 evaluations "
                f"after step 0, so at most steps / 2 = {self.steps // 2}, got {self.eval_every}")
        if self.landscape_batches < 1:
            raise ConfigError(
                f"--landscape_batches: expected an int >= 1, got {self.landscape_batches}")
        if self.probe_examples < 2:
            raise ConfigError(f"--probe_examples: expected an int >= 2, got {self.probe_examples}")


def _flat_grad(model: MLP) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()])


def _loss_and_grad(model: MLP, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach()), _flat_grad(model)


class SmoothnessProbe(Probe):
    """At every evaluation: the instability batch's per-unit activation-input means,
    and (with ``landscape``) the loss and gradient along the gradient direction.

    Everything runs on copies (training mode) or restores the model's buffers, and the
    noise drawn here comes from a forked generator: the run itself is not changed.
    """

    def __init__(self, layer: int, probe_examples: int, batch_size: int, lr: float,
                 multipliers: tuple[float, ...], landscape: bool, seed: int,
                 batches: int = 1) -> None:
        self.batches = batches
        self.layer = layer
        self.probe_examples = probe_examples
        self.batch_size = batch_size
        self.lr = lr
        self.multipliers = multipliers
        self.landscape = landscape
        self.seed = seed

    def at_eval(self, model: MLP, data: Dataset, step: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + step)
            x = data.x_train[:self.probe_examples]
            act = model.blocks[self.layer].act
            z = layer_inputs(model, x, {"act": act}, batch_stats=True)["act"]
            out: dict[str, Any] = {"unit_means": [float(v) for v in z.mean(0)]}
            if self.landscape:
                out.update(self._landscape(model, data, step))
        return out

    def _landscape(self, model: MLP, data: Dataset, step: int) -> dict[str, float]:
        """The three landscape measures, each the mean over ``batches`` training
        batches (one batch's values swing by an order of magnitude)."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + step)
        found: dict[str, list[float]] = {}
        for _ in range(self.batches):
            idx = torch.randperm(len(data.x_train), generator=gen)[:self.batch_size]
            for key, value in self._along_gradient(model, data.x_train[idx],
                                                   data.y_train[idx]).items():
                found.setdefault(key, []).append(value)
        return {key: stats.mean(values) for key, values in found.items()}

    def _along_gradient(self, model: MLP, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        work = copy.deepcopy(model).train()
        start = [p.detach().clone() for p in work.parameters()]
        buffers = {k: v.clone() for k, v in work.named_buffers()}
        loss0, g0 = _loss_and_grad(work, x, y)
        norm0 = float(g0.norm())
        if not (math.isfinite(loss0) and norm0 > 0):
            return {}
        weight = work.blocks[self.layer].linear.weight
        offset = 0
        for p in work.parameters():  # where layer i's weight sits in the flat gradient
            if p is weight:
                break
            offset += p.numel()
        g_layer = g0[offset:offset + weight.numel()].clone()

        def move(step: torch.Tensor) -> tuple[float, torch.Tensor]:
            """Loss and flat gradient at start − step (flat), from the same buffers."""
            with torch.no_grad():
                at = 0
                for p, p0 in zip(work.parameters(), start):
                    n = p.numel()
                    p.copy_(p0 - step[at:at + n].view_as(p))
                    at += n
                for name, v in work.named_buffers():  # the same starting statistics
                    v.copy_(buffers[name])
            return _loss_and_grad(work, x, y)

        losses, changes = [loss0], []
        betas = []
        for k in self.multipliers:
            eta = self.lr * k
            loss, g = move(eta * g0)
            change = float((g - g0).norm())
            losses.append(loss)
            changes.append(change)
            betas.append(change / (eta * norm0))
        out = {"loss_range": max(losses) - min(losses), "grad_change": max(changes),
               "grad_change_relative": max(changes) / norm0, "beta": max(betas)}
        if self.layer > 0:
            # Internal covariate shift (Santurkar et al. 2018, section 2.2): layer i's
            # weight gradient after the layers before it (their weights and BN's γ, β)
            # take a gradient step of the run's rate, the rest left where they were.
            earlier = torch.zeros_like(g0)
            earlier[:offset] = self.lr * g0[:offset]  # parameters() lists blocks in order
            _, g_after = move(earlier)
            g_layer_after = g_after[offset:offset + weight.numel()]
            out["ics_l2"] = float((g_layer_after - g_layer).norm())
            out["ics_cos"] = float(F.cosine_similarity(g_layer_after, g_layer, dim=0))
        return out


class Smoothness(Experiment):
    name = "smoothness"
    title = "Internal covariate shift or a smoother landscape (Santurkar et al. 2018)"
    description = (
        "A 6x100 ReLU MLP. At a high rate, without BN, with BN and with 'noisy BN' (BN "
        "followed by a random per-unit shift and scale redrawn at every step, which makes "
        "the next layer's input distribution unstable), measuring how much a layer's input "
        "distribution moves. At a rate where both train, without and with BN, the loss "
        "and gradient along the gradient direction, and the change of a layer's gradient "
        "when the layers before it take their step, at every evaluation."
    )
    criterion = (
        "Noisy BN: supported if, at `noisy_lr`, BN and noisy BN each end at least "
        "`noisy_margin` points above the baseline, seed ranges apart, noisy BN at most "
        "`noisy_gap` points below BN, while noisy BN's layer-input instability is at least "
        "`unstable_ratio` times BN's (the noise did move the distributions); not supported "
        "if BN helps and noisy BN ends at or below the baseline; mixed otherwise (including "
        "when BN itself does not help at that rate). Smoothness: supported if, at `lr`, "
        "the baseline's loss range and ℓ2 gradient change along the gradient (means over "
        "the evaluations after step 0) are each at least `smooth_ratio` times BN's, seed "
        "ranges apart; not supported if neither is smaller with BN; mixed otherwise, or when "
        "a network did not train at `lr`. Internal covariate shift (the change of layer "
        "`layer`'s weight gradient when the layers before it take a gradient step): "
        "supported if BN's 1 − cos(G, G′) is at least `smooth_ratio` times the "
        "baseline's, not supported if the baseline's is at least `smooth_ratio` times "
        "BN's, each with seed ranges apart; mixed otherwise."
    )
    Config = SmoothnessConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (16,) * 4, "steps": 30, "eval_every": 10, "layer": 1,
                 "probe_examples": 50, "step_multipliers": (0.5, 2.0),
                 "landscape_batches": 1},
        "full": {"steps": 10000, "eval_every": 250},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: SmoothnessConfig = config
        data = dataset(cfg.data)
        noise = (("shift", cfg.noise_shift), ("scale", cfg.noise_scale))
        specs = []
        for label, norm, part in RUNS:
            lr = cfg.lr if part == "landscape" else cfg.noisy_lr
            train = TrainSpec(steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                              optimizer=cfg.optimizer, eval_every=cfg.eval_every)
            specs += [
                RunSpec(
                    label=label, seed=seed, data=cfg.data, train=train,
                    model=MLPSpec(data.num_features, cfg.hidden, data.num_classes,
                                  norm=norm, activation=cfg.activation,
                                  norm_backend=cfg.norm_backend,
                                  norm_options=noise if norm == "noisy_batch" else ()),
                    probe=SmoothnessProbe(cfg.layer, cfg.probe_examples, cfg.batch_size, lr,
                                          cfg.step_multipliers,
                                          landscape=part == "landscape", seed=seed,
                                          batches=cfg.landscape_batches),
                    params={"norm": norm, "part": part, "lr": lr},
                )
                for seed in range(cfg.seeds)
            ]
        return runner.run(specs, desc=self.name), {}

    def analyze(self, record: dict[str, Any]) -> Analysis:
        cfg = record["config"]
        chance = 1.0 / record["data"]["classes"]
        groups = stats.by_label(record["runs"])
        final = {k: [stats.final_accuracy(r, chance) for r in v] for k, v in groups.items()}
        instab = {k: [_instability(r) for r in v] for k, v in groups.items()}
        measures: dict[str, Any] = {}
        for label, runs in groups.items():
            measures[f"{label} (lr {runs[0]['params']['lr']:g}): final accuracy %"] = (
                stats.fmt_range(final[label], 2, 100))
            measures[f"{label}: layer-input instability (std over training of a unit's "
                     "mean)"] = stats.fmt_range(instab[label], 3)
        landscape = {k: {key: [_mean_over_training(r, key) for r in groups[k]]
                         for key in LANDSCAPE_KEYS}
                     for k in (BASELINE, BN) if k in groups}
        for label, values in landscape.items():
            for key, (text, digits) in LANDSCAPE_KEYS.items():
                if any(math.isfinite(v) for v in values[key]):
                    measures[f"{label}: {text} (mean over training)"] = stats.fmt_range(
                        values[key], digits)
        verdicts: list[Verdict] = []

        base, bn = final.get(HIGH_BASELINE, []), final.get(HIGH_BN, [])
        noisy = final.get(NOISY, [])
        if base and bn and noisy:
            need = cfg["noisy_margin"]
            bn_helps = (100 * (stats.mean(bn) - stats.mean(base)) >= need
                        and stats.separated(bn, base))
            margin = 100 * (stats.mean(noisy) - stats.mean(base))
            behind_bn = 100 * (stats.mean(bn) - stats.mean(noisy))
            ratio = _ratio(instab[NOISY], instab[HIGH_BN])
            unstable = ratio >= cfg["unstable_ratio"] and stats.separated(
                instab[NOISY], instab[HIGH_BN])
            if bn_helps and margin <= 0:
                noisy_verdict = NOT_SUPPORTED
            elif (bn_helps and margin >= need and stats.separated(noisy, base) and unstable
                  and behind_bn <= cfg.get("noisy_gap", math.inf)
                  and all(stats.trained(r, chance) for r in groups.get(NOISY, []))):
                # ... noisy BN trained (a few points above a diverged baseline at chance
                # is not "still helps"), and about as well as BN: the paper's finding is
                # that the noise takes none of BN's benefit away, not some of it.
                noisy_verdict = SUPPORTED
            else:
                noisy_verdict = MIXED
            verdicts.append(Verdict(
                claim=10,
                statement="BN still helps when noise makes its layers' input distributions "
                          "unstable: its benefit is not a reduced internal covariate shift.",
                measured=f"at lr {cfg['noisy_lr']:g}: noisy BN "
                         f"{stats.show(100 * stats.mean(noisy), '.1f', '%')} vs baseline "
                         f"{stats.show(100 * stats.mean(base), '.1f', '%')} and BN "
                         f"{stats.show(100 * stats.mean(bn), '.1f', '%')}; noisy BN's "
                         f"instability {stats.show(ratio, '.1f', 'x')} BN's",
                verdict=noisy_verdict,
                criterion=f"BN and noisy BN >= {need:g} points above the baseline, seed "
                          f"ranges apart, noisy BN at most {cfg.get('noisy_gap', math.inf):g} "
                          f"points below BN, noisy BN's instability >= "
                          f"{cfg['unstable_ratio']:g}x BN's (the noise moved the "
                          "distributions), and noisy BN trained (at least halfway from chance "
                          "to 100%)",
            ))
        if BASELINE in landscape and BN in landscape:
            trained = all(stats.trained(r, chance) for k in (BASELINE, BN) for r in groups[k])
            accuracy = (f"baseline {stats.show(100 * stats.mean(final[BASELINE]), '.1f', '%')}, "
                        f"BN {stats.show(100 * stats.mean(final[BN]), '.1f', '%')}")
            verdicts.append(_landscape_verdict(landscape, cfg, trained, accuracy))
            ics = _ics_verdict(landscape, cfg, trained, accuracy)
            if ics is not None:
                verdicts.append(ics)
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        cfg = record["config"]
        groups = stats.by_label(record["runs"])
        out: list[tuple[str, Figure]] = []

        fig, axes = plots.figure(ncols=2, width=5.0)
        for ax, labels, lr in ((axes[0], (HIGH_BASELINE, HIGH_BN, NOISY), cfg["noisy_lr"]),
                               (axes[1], (BASELINE, BN), cfg["lr"])):
            for label in labels:
                if label in groups:
                    plots.band(ax, groups[label], label, COLORS[label], scale=100)
            ax.set_title(f"lr {lr:g}", fontsize=9)
            ax.set_xlabel("step")
            plots.percent_axis(ax)
            # Accuracy rises from chance within a few hundred steps, and a diverged
            # run sits at chance: the middle of the right side stays clear (the legend
            # names diverged seeds, so it can be long).
            plots.legend(ax, fontsize=8, loc="center right")
        out.append((("Test accuracy (mean and seed range). Left: at the high rate, without "
                    "BN, with BN and with noisy BN. Right: at the rate of the landscape "
                    "measurements."), fig))

        panels = [("loss_range", "loss range along the gradient", True),
                  ("grad_change", "gradient change (ℓ2)", True)]
        if any("ics_cos" in row for label in (BASELINE, BN) for run in groups.get(label, [])
               for row in run["rows"]):
            panels.append(("ics_cos", "cos(G, G′), layer's gradient", False))
        fig, axes = plots.figure(ncols=len(panels), width=5.0 if len(panels) == 2 else 4.0)
        for ax, (key, ylabel, log) in zip(axes, panels):
            for label in (BASELINE, BN):
                if label in groups:
                    plots.band(ax, groups[label], label, COLORS[label], key=key)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            plots.legend(ax, fontsize=8)
        out.append((f"At lr {cfg['lr']:g}, along the gradient direction on a training batch: "
                    "the range of the loss and the largest ℓ2 change of the gradient "
                    "over steps of lr x {"
                    + ", ".join(f"{k:g}" for k in cfg["step_multipliers"])
                    + "} (lower is smoother)"
                    + (f"; and the cosine between hidden layer {cfg['layer']}'s weight gradient "
                       "before and after the layers below it take a gradient step (internal "
                       "covariate shift as Santurkar et al. measure it; closer to 1 is less "
                       "shift)" if len(panels) == 3 else "")
                    + ".", fig))

        noise_labels = [k for k in (HIGH_BASELINE, HIGH_BN, NOISY) if k in groups]
        fig, axes = plots.figure(ncols=max(1, len(noise_labels)), width=4.0)
        for ax, label in zip(axes, noise_labels):
            run = groups[label][0]
            rows = [r for r in stats.test_rows(run) if isinstance(r.get("unit_means"), list)]
            steps = [r["step"] for r in rows]
            for unit in range(min(5, len(rows[0]["unit_means"]) if rows else 0)):
                ax.plot(steps, [r["unit_means"][unit] for r in rows], color=COLORS[label],
                        alpha=0.4 + 0.12 * unit)
            ax.set_title(f"{label} (seed {run['seed']})", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("mean activation input, 5 units")
            ax.grid(alpha=0.3)
        out.append(((f"At lr {cfg['noisy_lr']:g}: the mean over a fixed batch of training "
                    f"examples of five units' activation inputs in hidden layer "
                    f"{cfg['layer']}, in training mode, at each evaluation."), fig))
        return out


#: The landscape probe's measures: (text, digits) for the report.
LANDSCAPE_KEYS: dict[str, tuple[str, int]] = {
    "loss_range": ("loss range along the gradient", 3),
    "grad_change": ("gradient change along the gradient, ℓ2 (gradient predictiveness)", 3),
    "grad_change_relative": ("gradient change along the gradient / ‖g‖", 3),
    "beta": ("effective smoothness", 2),
    "ics_l2": ("internal covariate shift, ‖G − G′‖", 4),
    "ics_cos": ("internal covariate shift, cos(G, G′)", 3),
}


def _landscape_verdict(landscape: dict[str, dict[str, list[float]]], cfg: dict[str, Any],
                       trained: bool, accuracy: str) -> Verdict:
    """Smoother with BN: the baseline's loss range and ℓ2 gradient change each at least
    ``smooth_ratio`` times BN's. Only testable when both networks trained at that rate:
    one stuck on a plateau has a flat landscape, which says nothing about BN."""
    parts = []
    for key in ("loss_range", "grad_change"):
        b, n = landscape[BASELINE][key], landscape[BN][key]
        parts.append((key, _ratio(b, n), stats.separated(b, n)))
    measured = f"at lr {cfg['lr']:g} ({accuracy}), baseline / BN: " + ", ".join(
        f"{key.replace('_', ' ')} {stats.show(r, '.2f', 'x')}" for key, r, _ in parts)
    if not trained:
        verdict = MIXED
        measured += "; not testable: a network did not train at this rate"
    else:
        verdict = grade(
            effect_ok=all(sep for _, _, sep in parts),
            threshold_ok=all(r >= cfg["smooth_ratio"] for _, r, _ in parts),
            direction_ok=any(r > 1 for _, r, _ in parts),
        )
    return Verdict(
        claim=10,
        statement="BN makes the loss landscape smoother: the loss and the gradient change "
                  "less along the gradient direction.",
        measured=measured,
        verdict=verdict,
        criterion=f"loss range and ℓ2 gradient change each >= {cfg['smooth_ratio']:g}x lower "
                  "with BN, seed ranges apart; both networks trained (at least halfway from "
                  "chance to 100%), else not testable (mixed)",
    )


def _ics_verdict(landscape: dict[str, dict[str, list[float]]], cfg: dict[str, Any],
                 trained: bool, accuracy: str) -> Verdict | None:
    """BN does not reduce internal covariate shift as Santurkar et al. measure it, on
    1 − cos(G, G′) (cosine: free of the gradients' scale, which BN changes). None for
    records without the measure.

    Symmetric: each side needs the same evidence, a ratio of ``smooth_ratio`` between
    the means and seed ranges apart. Not supported if the baseline's shift is that
    much larger (BN reduces it); supported if BN's is that much larger (it does not
    reduce it, as Santurkar et al. found: with BN it is as large or larger); mixed in
    between, where the seeds cannot tell the two apart."""
    b_cos, n_cos = landscape[BASELINE]["ics_cos"], landscape[BN]["ics_cos"]
    if not any(math.isfinite(v) for v in (*b_cos, *n_cos)):
        return None  # a record from before the measure existed, or layer 0
    # A run without the measure (it diverged before any evaluation after step 0) has no
    # value: the comparison is then not testable, not dropped.
    trained = trained and all(math.isfinite(v) for v in (*b_cos, *n_cos))
    b_shift = [1 - v for v in b_cos if math.isfinite(v)]
    n_shift = [1 - v for v in n_cos if math.isfinite(v)]
    ratio = _ratio(b_shift, n_shift)  # baseline / BN; NaN when a side is missing
    reduced = ratio >= cfg["smooth_ratio"] and stats.separated(b_shift, n_shift)
    not_reduced = (ratio > 0 and 1 / ratio >= cfg["smooth_ratio"]
                   and stats.separated(n_shift, b_shift))
    if not trained:
        verdict = MIXED
    elif reduced:
        verdict = NOT_SUPPORTED
    elif not_reduced:
        verdict = SUPPORTED
    else:
        verdict = MIXED
    l2 = _ratio(landscape[BASELINE]["ics_l2"], landscape[BN]["ics_l2"])
    return Verdict(
        claim=10,
        statement="BN does not reduce internal covariate shift measured as the change of a "
                  "layer's gradient when the layers before it take their step.",
        measured=f"at lr {cfg['lr']:g} ({accuracy}), layer {cfg['layer']}: 1 − cos(G, G′) "
                 f"{stats.show(stats.mean(b_shift), '.3g')} (baseline) vs "
                 f"{stats.show(stats.mean(n_shift), '.3g')} (BN), baseline / BN "
                 f"{stats.show(ratio, '.2f', 'x')}; ‖G − G′‖ baseline / BN "
                 f"{stats.show(l2, '.2f', 'x')}"
                 + ("; not testable: a network did not train at this rate (or has no "
                    "measure)" if not trained else ""),
        verdict=verdict,
        criterion=f"supported if BN's 1 − cos(G, G′) is >= {cfg['smooth_ratio']:g}x the "
                  f"baseline's, seed ranges apart; not supported if the baseline's is >= "
                  f"{cfg['smooth_ratio']:g}x BN's, seed ranges apart; mixed otherwise or when "
                  "a network did not train",
    )


def _instability(run: dict[str, Any]) -> float:
    """Std over the evaluations after step 0 of each unit's mean, averaged over units."""
    rows = [r["unit_means"] for r in stats.test_rows(run)
            if r["step"] > 0 and isinstance(r.get("unit_means"), list)]
    if len(rows) < 2:
        return math.nan
    per_unit = [stats.std([row[u] for row in rows]) for u in range(len(rows[0]))]
    return stats.mean(per_unit)


def _mean_over_training(run: dict[str, Any], key: str) -> float:
    values = [r[key] for r in stats.test_rows(run)
              if r["step"] > 0 and isinstance(r.get(key), float) and math.isfinite(r[key])]
    return stats.mean(values)


def _ratio(high: list[float], low: list[float]) -> float:
    """mean(high) / mean(low), NaN when either is missing or low is not positive."""
    h, lo = stats.mean(high), stats.mean(low)
    return h / lo if lo > 0 and math.isfinite(h) else math.nan
