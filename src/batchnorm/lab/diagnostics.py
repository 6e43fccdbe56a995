"""Looking inside a network: the inputs of chosen layers on a batch, and summaries.

Hooks are removed after every call and the model's state is left as it was, so
probes can run in the middle of training.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def batch_statistics(model: nn.Module, *, norms_only: bool) -> Iterator[None]:
    """Within the block, ``model`` normalizes with the statistics of each batch it sees
    (training mode: the whole model, or with ``norms_only`` only the modules with
    running statistics, so dropout stays off); afterwards every buffer (running
    statistics, counters) and every module's train/eval mode is as before."""
    modes = [(m, m.training) for m in model.modules()]
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        if norms_only:
            model.eval()
            for m in model.modules():
                if isinstance(getattr(m, "running_mean", None), Tensor):
                    m.train()
        else:
            model.train()
        yield
    finally:
        buffers = dict(model.named_buffers())
        for k, v in saved.items():
            buffers[k].copy_(v)
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def layer_inputs(
    model: nn.Module, x: Tensor, layers: Mapping[str, nn.Module], *, batch_stats: bool = False
) -> dict[str, Tensor]:
    """The input each module in ``layers`` receives when ``model`` runs on ``x``.

    Args:
        model: the network.
        x: a batch.
        layers: name to submodule of ``model``.
        batch_stats: run in training mode, so norm layers normalize with the statistics
            of ``x`` (as during training); the running statistics and every other buffer
            are restored afterwards. Otherwise eval mode (running statistics).
    """
    captured: dict[str, Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: captured.__setitem__(name, args[0].detach().clone())
        )
        for name, module in layers.items()
    ]
    was_training = model.training
    try:
        if batch_stats:
            with batch_statistics(model, norms_only=False):
                model(x)
        else:
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return captured


@torch.no_grad()
def batch_statistics_accuracy(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, order: Tensor | None = None
) -> tuple[float, int]:
    """Accuracy of ``model`` when every batch of ``batch_size`` examples is normalized
    with its own statistics (training mode, as in a training step) instead of the
    population statistics; dropout is off.

    The examples are taken in ``order`` (a permutation of their indices; default: as
    they are), in consecutive batches; a last partial batch is left out. The model's
    buffers (running statistics, counters) and train/eval modes are restored afterwards.

    Returns:
        (accuracy, examples used); (nan, 0) when there is not one full batch.
    """
    idx = torch.arange(len(x)) if order is None else order
    used = (len(idx) // batch_size) * batch_size
    if used == 0:
        return float("nan"), 0
    correct = 0
    with batch_statistics(model, norms_only=True):
        for start in range(0, used, batch_size):
            rows = idx[start:start + batch_size]
            correct += int((model(x[rows]).argmax(1) == y[rows]).sum())
    return correct / used, used


def quantiles(values: Tensor, qs: Sequence[float]) -> Tensor:
    """Per-column quantiles of an (N, U) tensor: a (len(qs), U) tensor."""
    q = torch.tensor(list(qs), dtype=values.dtype)
    return torch.quantile(values, q, dim=0)


def histogram(values: Tensor, lo: float, hi: float, bins: int) -> dict[str, Any]:
    """Counts of ``values`` (all entries) in ``bins`` equal bins over [lo, hi]; values
    outside are counted in ``below`` and ``above`` so nothing is silently dropped."""
    flat = values.flatten().double()
    counts = torch.histc(flat.clamp(lo, hi), bins=bins, min=lo, max=hi)
    below = int((flat < lo).sum())
    above = int((flat > hi).sum())
    # clamp put the outliers into the edge bins; take them out again
    counts[0] -= below
    counts[-1] -= above
    return {"lo": lo, "hi": hi, "counts": [int(c) for c in counts], "below": below,
            "above": above}
