"""The autograd wrapper around a backend's training forward and backward.

Forward and backward run the backend's kernels; the saved state is ``x``, ``weight``
and the float32 (float64 for float64 input) ``mean`` and ``invstd``. When autograd
records the backward itself (``create_graph=True``, for double backward), the backward
switches to :func:`batchnorm._reference.differentiable_backward`, which recomputes the
statistics from ``x`` with differentiable ops. :class:`BatchNormActTrain` does the same
for the fused ``act(BN(x) + residual)`` of any backend that has act kernels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from batchnorm import _reference
from batchnorm._backends import ActKernels, Backend, as_dtype, reads_sign


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
            dx, dweight, dbias = _reference.differentiable_backward(dy, x, weight, ctx.eps, mean)
        else:
            dx, dweight, dbias = ctx.backend.backward_train(
                dy.contiguous(memory_format=_memory_format(x)), x, weight, mean, invstd
            )
        return (
            dx if need_x else None,
            as_dtype(dweight, weight.dtype) if need_w else None,
            as_dtype(dbias, ctx.bias_dtype) if need_b else None,
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


class ActSpec(NamedTuple):
    """The non-differentiated arguments of the fused ``act(BN(x) + residual)``."""

    train: TrainSpec
    kernels: ActKernels
    activation: str
    negative_slope: float


class BatchNormActTrain(torch.autograd.Function):
    """``out = act(BN(x) + residual)`` through a backend's fused kernels (training).

    For relu/leaky ReLU saves the kernels' ``sign`` (a bool mask z > 0 from the numba
    kernels, the output itself from the Triton ones); silu (and a negative slope)
    rebuilds its input from ``x``, the statistics, ``bias`` and ``residual``. The
    residual's gradient is computed only when autograd asks for it. Under
    ``create_graph`` the backward is made of differentiable ops instead
    (:func:`_act_differentiable_backward`), so double backward works.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        spec: ActSpec,
    ) -> Tensor:
        t = spec.train
        out, mean, invstd, sign = spec.kernels.act_forward_train(
            x, weight, bias, t.eps, t.running_mean, t.running_var, t.momentum,
            t.num_batches_tracked, t.num_batches_skipped, residual=residual,
            activation=spec.activation, negative_slope=spec.negative_slope,
        )
        from_out = reads_sign(spec.activation, spec.negative_slope)
        keep_inputs = not from_out and spec.activation != "identity"
        ctx.save_for_backward(
            x, weight, bias if keep_inputs else None, residual if keep_inputs else None,
            mean, invstd, sign,  # None unless the activation reads it
        )
        ctx.spec = spec
        ctx.param_dtypes = (
            weight.dtype if weight is not None else None,
            bias.dtype if bias is not None else None,
        )
        if t.stats_out is not None:
            t.stats_out.extend((mean, invstd))
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, residual, mean, invstd, sign = ctx.saved_tensors
        spec: ActSpec = ctx.spec
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # create_graph=True: build the backward from differentiable ops.
            dx, dweight, dbias, dresidual = _act_differentiable_backward(
                dout, x, weight, bias, residual, sign, mean, spec
            )
        else:
            dx, dweight, dbias, dresidual = spec.kernels.act_backward_train(
                dout.contiguous(memory_format=_memory_format(x)), sign, x, weight, bias, mean,
                invstd, residual=residual, activation=spec.activation,
                negative_slope=spec.negative_slope, has_residual=need_r,
            )
        w_dtype, b_dtype = ctx.param_dtypes
        return (
            dx if need_x else None,
            dweight.to(w_dtype) if need_w else None,
            dbias.to(b_dtype) if need_b else None,
            dresidual if need_r else None,
            None,
        )


def _act_differentiable_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    sign: Tensor | None,
    mean: Tensor,
    spec: ActSpec,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchNormActTrain's backward in differentiable ops: ``dz = dout·act'(z)``, then
    :func:`batchnorm._reference.differentiable_backward` of dz, about the forward's
    saved ``mean``; ``dresidual = dz``.

    relu and leaky ReLU (slope >= 0) take the mask from ``sign`` (the forward's bool
    mask, or its output): its derivative is zero almost everywhere. silu and a
    negative slope rebuild z = BN(x) + residual from differentiable ops, so the second
    derivatives through act' are exact.
    """
    activation = spec.activation
    slope = 0.0 if activation == "relu" else spec.negative_slope
    if activation == "identity":
        dz = dout
    elif sign is not None:  # relu, leaky ReLU with slope >= 0
        # relu: exactly 0 where off, as torch's relu backward (dout·0 is NaN for Inf)
        dz = torch.where(sign > 0, dout, dout * slope if slope else 0.0)
    else:
        _, offset, var, centred = _reference.centred_stats(x)
        scale, shift = _reference.affine_coefficients(
            weight, bias, offset, torch.rsqrt(var + spec.train.eps)
        )
        z = _reference.apply_centred(centred, x, scale, shift)
        if residual is not None:
            z = z + residual
        if activation == "silu":
            s = torch.sigmoid(z)
            dz = dout * (s * (1 + z * (1 - s)))
        else:
            dz = torch.where(z > 0, dout, dout * slope)
    dx, dweight, dbias = _reference.differentiable_backward(dz, x, weight, spec.train.eps, mean)
    return dx, dweight, dbias, dz
