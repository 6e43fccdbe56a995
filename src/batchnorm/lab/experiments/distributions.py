"""What BN does to one hidden layer's values: as they enter BN, after normalization,
and after the learned scale and shift, at initialization and after training.

The baseline has only the first kind (the Linear output, which is what enters its
activation). The stages are taken on a fixed batch of test examples with that
batch's statistics, exactly as BN normalizes in training; the running statistics
are left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from batchnorm.lab import plots, stats
from batchnorm.lab.config import ConfigError, LabConfig
from batchnorm.lab.diagnostics import layer_inputs, quantiles
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

#: Per-unit quantile levels kept for the drift measure (5%, 10%, ..., 95%).
LEVELS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
#: The stages, in order; the baseline has only the first.
ENTERS, NORMALIZED, AFFINE = "enters BN", "normalized", "after gamma, beta"
#: The values that reach the activation: the baseline's Linear output, BN's affine output.
ACT_INPUT = {"baseline": ENTERS, "BN": AFFINE}


@dataclass(frozen=True)
class DistributionsConfig(LabConfig):
    """Defaults are the quick preset.

    Attributes:
        hidden, activation, init_std, optimizer, lr, batch_size, steps: as Figure 1.
        layer: which hidden layer to look at (0 = first).
        probe_examples: test examples in the probe batch.
        sample_size: values kept per stage for the histograms.
        drift_threshold: the baseline's drift of its activation input must be this many
            times BN's for claim 2 to be supported.
        moved: a unit's (gamma, beta) "moved" if |gamma - 1| or |beta| exceeds this.
        moved_share: share of units that must move (in every seed) for the
            gamma/beta verdict to be supported.
    """

    hidden: tuple[int, ...] = (100, 100, 100)
    activation: Activation = "sigmoid"
    init_std: float = 0.01
    optimizer: Optimizer = "sgd"
    lr: float = 0.5
    batch_size: int = 60
    steps: int = 3000
    eval_every: int = 250
    layer: int = 1
    probe_examples: int = 1000
    sample_size: int = 3000
    drift_threshold: float = 2.0
    moved: float = 0.1
    moved_share: float = 0.5

    def check(self) -> None:
        super().check()
        if not 0 <= self.layer < len(self.hidden):
            raise ConfigError(
                f"--layer: expected 0 <= layer < {len(self.hidden)}, got {self.layer}")
        # A share of 0 would pass whatever moved, one above 1 could never pass.
        if not 0 < self.moved_share <= 1:
            raise ConfigError(f"--moved_share: expected a share in (0, 1], got {self.moved_share}")


class StagesProbe(Probe):
    """Captures the stages of one hidden layer at the start and the end of training."""

    def __init__(self, layer: int, examples: int, sample_size: int):
        self.layer = layer
        self.examples = examples
        self.sample_size = sample_size

    def at_start(self, model: MLP, data: Dataset) -> dict[str, Any]:
        return self._capture(model, data)

    def at_end(self, model: MLP, data: Dataset) -> dict[str, Any]:
        return self._capture(model, data)

    def _capture(self, model: MLP, data: Dataset) -> dict[str, Any]:
        block = model.blocks[self.layer]
        x = data.x_test[: self.examples]
        seen = layer_inputs(model, x, {"norm": block.norm, "act": block.act}, batch_stats=True)
        stages: dict[str, torch.Tensor] = {ENTERS: seen["norm"]}
        out: dict[str, Any] = {}
        if not isinstance(block.norm, torch.nn.Identity):
            z = seen["norm"]
            # The textbook transform, computed here from the layer's own eps, gamma, beta.
            xhat = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + block.norm.eps)
            gamma, beta = block.norm.weight.detach(), block.norm.bias.detach()
            stages[NORMALIZED] = xhat
            stages[AFFINE] = seen["act"]  # what the layer really produced
            out["formula_error"] = float((seen["act"] - (gamma * xhat + beta)).abs().max())
            out["gamma"] = [round(v, 5) for v in gamma.tolist()]
            out["beta"] = [round(v, 5) for v in beta.tolist()]
        gen = torch.Generator().manual_seed(0)
        out["stages"] = {}
        for name, values in stages.items():
            flat = values.flatten()
            pick = torch.randperm(len(flat), generator=gen)[: self.sample_size]
            out["stages"][name] = {
                "sample": [round(v, 4) for v in flat[pick].tolist()],
                "quantiles": [[round(v, 5) for v in row]
                              for row in quantiles(values, LEVELS).tolist()],
                "unit_mean": [round(v, 5) for v in values.mean(0).tolist()],
                "unit_std": [round(v, 5) for v in values.std(0, unbiased=False).tolist()],
            }
        return out


def drift(run: dict[str, Any], stage: str) -> float:
    """Mean over units of the distance between a unit's init and trained distributions.

    The distance is the 1-Wasserstein distance estimated from 19 quantiles:
    the mean over levels of |q_trained - q_init|.
    """
    try:
        q0 = torch.tensor(run["extra"]["start"]["stages"][stage]["quantiles"])
        q1 = torch.tensor(run["extra"]["end"]["stages"][stage]["quantiles"])
    except KeyError:
        return float("nan")
    return float((q1 - q0).abs().mean())


def moved_share(run: dict[str, Any], threshold: float) -> float:
    """Share of units whose trained gamma or beta left (1, 0) by more than ``threshold``."""
    end = run["extra"].get("end", {})
    if "gamma" not in end:
        return float("nan")
    g, b = torch.tensor(end["gamma"]), torch.tensor(end["beta"])
    return float(((g - 1).abs().gt(threshold) | b.abs().gt(threshold)).float().mean())


def saturated_share(run: dict[str, Any], stage: str, bound: float = 2.0) -> float:
    """Share of sampled trained values with |z| > bound (a sigmoid's slope there < 0.105)."""
    try:
        sample = torch.tensor(run["extra"]["end"]["stages"][stage]["sample"])
    except KeyError:
        return float("nan")
    return float(sample.abs().gt(bound).float().mean())


class Distributions(Experiment):
    name = "distributions"
    title = "Distributions inside a layer: before BN, normalized, after gamma and beta"
    description = (
        "Trains the Figure 1 sigmoid MLP with and without BN and captures one hidden "
        "layer's values on a fixed batch of test examples, at initialization and after "
        "training: as they enter BN, after normalization, and after the learned scale and "
        "shift (the baseline: what enters its activation)."
    )
    criterion = (
        "Drift of a stage = the mean over units of the 1-Wasserstein distance between the "
        "unit's values at initialization and after training (from 19 quantiles). Claim 2: "
        "supported if the baseline's activation input drifts at least `drift_threshold` "
        "times as much as BN's (after gamma, beta), seed ranges apart. Claim 11 "
        "(mechanism): supported if in every seed at least `moved_share` of the units "
        "moved gamma or beta by more than `moved` from (1, 0); mixed if at least 10% on "
        "average."
    )
    Config = DistributionsConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"hidden": (32, 32, 32), "steps": 40, "eval_every": 20, "probe_examples": 200,
                 "sample_size": 500},
        "full": {"steps": 20000, "eval_every": 1000},
    }

    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        cfg: DistributionsConfig = config
        data = dataset(cfg.data)
        probe = StagesProbe(cfg.layer, cfg.probe_examples, cfg.sample_size)
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
        chance = 1.0 / record["data"]["classes"]
        groups = stats.by_label(record["runs"])
        base = [r for r in groups.get("baseline", []) if not stats.diverged(r)]
        bn = [r for r in groups.get("BN", []) if not stats.diverged(r)]
        # "Every seed" means every seed: a diverged run is not left out of the judgment.
        none_diverged = len(base) == len(groups.get("baseline", [])) and len(bn) == len(
            groups.get("BN", []))
        base_drift = [drift(r, ACT_INPUT["baseline"]) for r in base]
        bn_drift = [drift(r, ACT_INPUT["BN"]) for r in bn]
        ratio = stats.mean(base_drift) / max(stats.mean(bn_drift), 1e-12)
        shares = [moved_share(r, cfg["moved"]) for r in bn]

        measures: dict[str, Any] = {
            "layer": f"hidden layer {cfg['layer']} ({cfg['hidden'][cfg['layer']]} units)",
            "baseline final test accuracy (%)": stats.fmt_range(
                [stats.final_accuracy(r, chance) for r in groups.get("baseline", [])], 2, 100),
            "BN final test accuracy (%)": stats.fmt_range(
                [stats.final_accuracy(r, chance) for r in groups.get("BN", [])], 2, 100),
            "baseline drift of the activation input": stats.fmt_range(base_drift, 3),
            "BN drift of the activation input (after gamma, beta)": stats.fmt_range(bn_drift, 3),
            "BN drift of the values entering BN": stats.fmt_range(
                [drift(r, ENTERS) for r in bn], 3),
            "BN drift after normalization": stats.fmt_range([drift(r, NORMALIZED) for r in bn], 3),
            "drift ratio (baseline / BN)": f"{ratio:.2f}",
            "BN check: max |layer output - (gamma * x_hat + beta)|": stats.fmt_range(
                [r["extra"]["end"].get("formula_error", float("nan")) for r in bn], 7),
            f"BN units with |gamma-1| or |beta| > {cfg['moved']:g} after training (share)":
                stats.fmt_range(shares, 2),
            "share of trained values with |z| > 2, normalized": stats.fmt_range(
                [saturated_share(r, NORMALIZED) for r in bn], 3),
            "share of trained values with |z| > 2, after gamma, beta": stats.fmt_range(
                [saturated_share(r, AFFINE) for r in bn], 3),
            "share of trained values with |z| > 2, baseline": stats.fmt_range(
                [saturated_share(r, ENTERS) for r in base], 3),
        }
        verdicts = [Verdict(
            claim=2,
            statement="BN keeps a layer's input distribution stable during training "
                      "(init vs trained, whole layer).",
            measured=f"drift {stats.mean(base_drift):.3f} (baseline) vs "
                     f"{stats.mean(bn_drift):.3f} (BN): ratio {ratio:.2f}",
            verdict=grade(
                effect_ok=stats.separated(base_drift, bn_drift) and none_diverged,
                threshold_ok=ratio >= cfg["drift_threshold"],
                direction_ok=ratio > 1.0,
            ),
            criterion=f"baseline drift >= {cfg['drift_threshold']:g}x BN's, seed ranges apart, "
                      "no run diverged",
        )]
        if shares:
            # A missing probe value (NaN) fails the test; min() would skip over it.
            if none_diverged and all(s >= cfg["moved_share"] for s in shares):
                verdict = SUPPORTED
            elif stats.mean(shares) >= 0.1:
                verdict = MIXED
            else:
                verdict = NOT_SUPPORTED
            verdicts.append(Verdict(
                claim=11,
                statement="The network uses gamma and beta: trained sigmoid inputs leave the "
                          "standardized distribution BN alone would impose.",
                measured=f"{100 * stats.mean(shares):.0f}% of units moved (seeds: "
                         + ", ".join(f"{100 * s:.0f}%" for s in shares) + ")",
                verdict=verdict,
                criterion=f">= {100 * cfg['moved_share']:.0f}% of units move gamma or beta by "
                          f"> {cfg['moved']:g} in every seed; mixed if >= 10% on average",
            ))
        return Analysis(measures, verdicts)

    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        groups = stats.by_label(record["runs"])
        panels = [("baseline", ENTERS, "baseline: enters activation")] + [
            ("BN", s, f"BN: {s}") for s in (ENTERS, NORMALIZED, AFFINE)]
        shown = _shown_runs(groups)
        fig, axes = plots.figure(ncols=len(panels), nrows=1, width=3.6, height=3.0)
        for ax, (label, stage, title) in zip(axes, panels):
            run = shown[label]
            if run is None:
                ax.set_visible(False)
                continue
            both = {when: run["extra"][key]["stages"][stage]["sample"]
                    for when, key in (("init", "start"), ("trained", "end"))}
            values = [v for vs in both.values() for v in vs]
            lo, hi = _robust_range(values)
            color = plots.BN_COLOR if label == "BN" else plots.BASELINE_COLOR
            for when, vs in both.items():
                ax.hist([min(max(v, lo), hi) for v in vs], bins=50, range=(lo, hi),
                        density=True, histtype="step" if when == "init" else "stepfilled",
                        alpha=1.0 if when == "init" else 0.35, color=color if when == "trained"
                        else "black", label=when)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("density")
        layer = record["config"]["layer"]
        seeds = {label: run["seed"] for label, run in shown.items() if run is not None}
        if not seeds:
            which = "no completed run"
        elif len(set(seeds.values())) == 1:
            which = f"seed {next(iter(seeds.values()))}"
        else:
            which = "seeds " + ", ".join(f"{seed} ({label})" for label, seed in seeds.items())
        caption = (f"Hidden layer {layer}, {which}: values of all units "
                   f"on {record['config']['probe_examples']} test examples, at initialization "
                   "(black line) and after training (filled); values beyond the plotted range are "
                   "counted in the edge bins.")
        return [(caption, fig)]


def _shown_runs(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any] | None]:
    """The run whose values the figure shows, per network (None if none completed).

    A diverged run has no trained values, so only completed runs can be shown. The
    lowest seed that completed in both networks is preferred, so the panels compare one
    seed; failing that, each network's lowest completed seed.
    """
    done = {label: {r["seed"]: r for r in groups.get(label, []) if r["extra"].get("end")}
            for label in ("baseline", "BN")}
    both = sorted(set(done["baseline"]) & set(done["BN"]))
    if both:
        return {label: runs[both[0]] for label, runs in done.items()}
    return {label: runs[min(runs)] if runs else None for label, runs in done.items()}


def _robust_range(values: list[float]) -> tuple[float, float]:
    """The 0.5th..99.5th percentile range, widened slightly, never empty."""
    t = torch.tensor(values)
    lo, hi = (float(v) for v in torch.quantile(t, torch.tensor([0.005, 0.995])))
    pad = 0.05 * (hi - lo) or 0.5
    return lo - pad, hi + pad
