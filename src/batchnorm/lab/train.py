"""One training run: a model spec, a training spec and a seed in; rows of numbers out.

The loop keeps the data as tensors and indexes mini-batches from a seeded permutation
(no DataLoader: for small MLPs its per-batch overhead would dominate). The same spec
and seed give the same numbers. A loss that becomes NaN or infinite ends the run as
``"diverged"`` at that step; it is an outcome to report, not an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm import renorm_schedule, set_renorm_limits
from batchnorm.lab.data import Dataset
from batchnorm.lab.models import MLP, MLPSpec, RNNClassifier, RNNSpec, build

Optimizer = Literal["sgd", "momentum", "rmsprop", "adam"]

#: Test examples per forward pass in evaluation (bounds memory on large test sets).
EVAL_CHUNK = 2000


@dataclass(frozen=True)
class TrainSpec:
    """How to train.

    Attributes:
        steps: optimizer steps (mini-batches).
        lr: learning rate.
        batch_size: examples per mini-batch; the data is reshuffled every epoch and a
            last partial batch is skipped (BN needs more than one example).
        optimizer: ``sgd`` (plain), ``momentum`` (SGD with momentum), ``rmsprop``, ``adam``.
        momentum: the momentum of ``momentum``.
        eval_every: steps between evaluations (also done at step 0 and the last step).
        train_examples: train on the first this many training examples only (the
            split is already shuffled); None: all of them.
        renorm_ramp: for batch renorm, ``(warmup_steps, r_ramp_steps, d_ramp_steps,
            r_max, d_max)`` of :func:`batchnorm.renorm_schedule`, applied to every
            renorm layer before each step; None: the layers' own fixed limits.
    """

    steps: int
    lr: float
    batch_size: int = 60
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    eval_every: int = 100
    train_examples: int | None = None
    renorm_ramp: tuple[float, float, float, float, float] | None = None


class Probe:
    """Measurements an experiment takes during a run; override what you need.

    Subclasses must be defined at module level (runs may execute in worker
    processes, so a probe is pickled). The model is in eval mode when called.
    """

    def at_start(self, model: MLP | RNNClassifier, data: Dataset) -> dict[str, Any]:
        """Before the first step; stored under ``extra["start"]``."""
        return {}

    def at_eval(self, model: MLP | RNNClassifier, data: Dataset, step: int) -> dict[str, Any]:
        """At every evaluation; merged into that step's test row."""
        return {}

    def at_end(self, model: MLP | RNNClassifier, data: Dataset) -> dict[str, Any]:
        """After the last step of a completed run; stored under ``extra["end"]``."""
        return {}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run.

    Attributes:
        label: the configuration's name in plots and tables, e.g. ``"BN"``.
        seed: seeds the weights and the order of the mini-batches.
        data: the data spec.
        model: the network.
        train: the optimization.
        probe: extra measurements, or None.
        params: the values this run varies, for grouping (e.g. ``{"lr_mult": 5}``).
    """

    label: str
    seed: int
    data: str
    model: MLPSpec | RNNSpec
    train: TrainSpec
    probe: Probe | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run produced; JSON-ready through :meth:`to_dict`.

    Attributes:
        outcome: ``"completed"`` or ``"diverged"``.
        diverged_step: the step whose loss was not finite, else None.
        rows: dicts with ``step``, ``split`` (``train``: mean over the mini-batches since
            the last evaluation; ``test``: the whole test set in eval mode), ``loss``,
            ``accuracy`` and any probe measures.
        extra: probe data taken at the start and the end.
        model: the built network's ``describe()``.
    """

    label: str
    seed: int
    params: dict[str, Any]
    outcome: str
    diverged_step: int | None
    rows: list[dict[str, Any]]
    extra: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(spec: TrainSpec, params: Any) -> torch.optim.Optimizer:
    """The torch.optim optimizer ``spec`` names."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr)
    if spec.optimizer == "momentum":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=spec.lr)
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    raise ValueError(
        f"unknown optimizer {spec.optimizer!r}; expected sgd, momentum, rmsprop or adam"
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode on (x, y)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_CHUNK):
        logits = model(x[start:start + EVAL_CHUNK])
        yb = y[start:start + EVAL_CHUNK]
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def train(
    spec: RunSpec, data: Dataset, on_steps: Callable[[int], None] | None = None
) -> RunResult:
    """Train ``spec`` on ``data`` and return its rows.

    Args:
        spec: the run.
        data: the data set ``spec.data`` names (already loaded).
        on_steps: called with the number of steps done since the last call (progress).

    Raises:
        ValueError: a batch size or ``train_examples`` that does not fit the data.
    """
    # Dropout draws from torch's global generator: seed it from the run's seed (the
    # caller's generator state is restored afterwards).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _train(spec, data, on_steps)


def _train(
    spec: RunSpec, data: Dataset, on_steps: Callable[[int], None] | None
) -> RunResult:
    t0 = time.perf_counter()
    ts = spec.train
    n_train = len(data.x_train)
    if ts.train_examples is not None and not 2 <= ts.train_examples <= n_train:
        raise ValueError(
            f"train_examples must be in [2, {n_train}] for this data, got {ts.train_examples}"
        )
    n_used = n_train if ts.train_examples is None else ts.train_examples
    if ts.batch_size < 2 or ts.batch_size > n_used:
        raise ValueError(
            f"batch_size must be in [2, {n_used}] for this data, got {ts.batch_size}"
        )
    model = build(spec.model, spec.seed)
    optimizer = make_optimizer(ts, model.parameters())
    # The batch order has its own generator: the same seed gives the same order for
    # every model, so BN and baseline see identical mini-batches.
    order = torch.Generator().manual_seed(spec.seed)
    x, y = data.x_train[:n_used], data.y_train[:n_used]
    n, bs = len(x), ts.batch_size
    perm, pos = torch.randperm(n, generator=order), 0

    probe = spec.probe or Probe()
    model.eval()
    extra: dict[str, Any] = {"start": probe.at_start(model, data)}
    rows: list[dict[str, Any]] = []
    outcome, diverged_step = "completed", None

    def eval_row(step: int) -> bool:
        """Append the test row for ``step``; False if its loss is not finite."""
        loss, acc = evaluate(model, data.x_test, data.y_test)
        row: dict[str, Any] = {"step": step, "split": "test", "loss": loss, "accuracy": acc}
        if math.isfinite(loss):
            model.eval()
            row.update(probe.at_eval(model, data, step))
        rows.append(row)
        return math.isfinite(loss)

    eval_row(0)
    loss_sum, correct, seen, last_reported = 0.0, 0, 0, 0
    model.train()
    for step in range(1, ts.steps + 1):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos:pos + bs]
        pos += bs
        if ts.renorm_ramp is not None:
            warmup, r_ramp, d_ramp, r_max, d_max = ts.renorm_ramp
            set_renorm_limits(model, *renorm_schedule(
                step - 1, int(warmup), int(r_ramp), int(d_ramp), r_max, d_max))
        xb, yb = x[idx], y[idx]
        try:
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            value = float(loss.detach())
        except FloatingPointError:  # a norm layer asked to raise on non-finite statistics
            value = math.nan
        if not math.isfinite(value):
            outcome, diverged_step = "diverged", step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += value * bs
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += bs
        if step % ts.eval_every == 0 or step == ts.steps:
            rows.append({"step": step, "split": "train", "loss": loss_sum / seen,
                         "accuracy": correct / seen})
            loss_sum, correct, seen = 0.0, 0, 0
            finite = eval_row(step)
            model.train()
            if on_steps is not None:
                on_steps(step - last_reported)
            last_reported = step
            if not finite:
                outcome, diverged_step = "diverged", step
                break
    if on_steps is not None and ts.steps > last_reported:
        on_steps(ts.steps - last_reported)  # a diverged run still counts as done
    model.eval()
    extra["end"] = probe.at_end(model, data) if outcome == "completed" else {}
    return RunResult(
        label=spec.label,
        seed=spec.seed,
        params=dict(spec.params),
        outcome=outcome,
        diverged_step=diverged_step,
        rows=rows,
        extra=extra,
        model=model.describe(),
        train=asdict(ts),
        wall_s=time.perf_counter() - t0,
    )
