"""The autograd wrapper around a backend's training forward and backward.

Forward and backward run the backend's kernels; the saved state is ``x``, ``weight``
and the float32 (float64 for float64 input) ``mean`` and ``invstd``. When autograd
records the backward itself (``create_graph=True``, for double backward), the backward
switches to :func:`batchnorm._reference.differentiable_backward`, which recomputes the
statistics from ``x`` with differentiable ops.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from batchnorm import _reference
from batchnorm._backends import Backend


class TrainSpec(NamedTuple):
    """Everything of a training call that is not differentiated: one argument to
    ``Function.apply`` instead of seven keeps the per-call overhead down."""

    running_mean: Tensor | None
    running_var: Tensor | None
    momentum: float | None
    eps: float
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None
    backend: Backend
    # Receives (mean, invstd) from the autograd path, which returns only y: outputs
    # of a Function cost more per call than tensors kept aside.
    stats_out: list[Tensor] | None = None


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: TrainSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """The backend's training forward: ``(y, mean, invstd)``, running stats updated."""
    return spec.backend.forward_train(
        x, weight, bias, spec.eps, spec.running_mean, spec.running_var, spec.momentum,
        spec.num_batches_tracked, spec.num_batches_skipped,
    )


class BatchNormTrain(torch.autograd.Function):
    """y = BN(x) with batch statistics; updates the running statistics in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: TrainSpec
    ) -> Tensor:
        y, mean, invstd = forward_train(x, weight, bias, spec)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend = spec.backend
        ctx.eps = spec.eps
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if spec.stats_out is not None:
            spec.stats_out.extend((mean, invstd))
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: build the backward from differentiable ops.
            dx, dweight, dbias = _reference.differentiable_backward(dy, x, weight, ctx.eps)
        else:
            dx, dweight, dbias = ctx.backend.backward_train(
                dy.contiguous(memory_format=_memory_format(x)), x, weight, mean, invstd
            )
        return (
            dx if need_x else None,
            dweight.to(weight.dtype) if need_w else None,  # no-op when already that dtype
            dbias.to(ctx.bias_dtype) if need_b else None,
            None,
        )


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is stored in, so ``dy`` can be matched to it."""
    if x.dim() < 4 or x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
