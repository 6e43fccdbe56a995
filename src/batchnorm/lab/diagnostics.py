"""Looking inside a network: the inputs of chosen layers on a batch, and summaries.

Hooks are removed after every call and the model's state is left as it was, so
probes can run in the middle of training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


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
    saved = {k: v.clone() for k, v in model.named_buffers()} if batch_stats else {}
    try:
        model.train(batch_stats)
        model(x)
    finally:
        for h in handles:
            h.remove()
        buffers = dict(model.named_buffers())
        for k, v in saved.items():
            buffers[k].copy_(v)
        model.train(was_training)
    return captured


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
