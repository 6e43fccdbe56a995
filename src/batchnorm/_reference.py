"""Batch normalization in plain torch ops: the portable backend and the differentiable form.

Everything here is written from the formulas of Ioffe & Szegedy (2015), Algorithm 1,
for a channel with m values x_1..x_m::

    mu      = (1/m) sum x_i
    var     = (1/m) sum (x_i - mu)^2          (biased: used to normalize)
    x_hat_i = (x_i - mu) / sqrt(var + eps)
    y_i     = gamma * x_hat_i + beta

and its backward, with invstd = 1/sqrt(var + eps)::

    dbeta  = sum dy_i
    dgamma = sum dy_i x_hat_i
    dx_i   = gamma * invstd / m * (m dy_i - sum dy - x_hat_i sum(dy x_hat))

The variance is computed in two passes around the mean (never E[x^2] - E[x]^2, which
cancels catastrophically when |mean| >> std), corrected for the rounding of the mean.
The output is the affine map about that rounded mean c, ``(x - c) * scale + shift``
with ``shift = beta - (mu - c) * scale``: ``x * scale + (beta - mu * scale)`` would
round at the size of ``x * scale``, which far from zero (1e4 +- 1e-2 in float32) is
an error of 0.1 in an output of unit spread. float16/bfloat16 inputs are upcast to
float32 for every reduction and the result is cast back.

Two users:

* :data:`BACKEND` — runs on any device and dtype; the fallback when no compiled
  kernel applies (CPU half precision, CUDA without Triton, ...).
* :func:`differentiable_backward` — the closed-form backward written so that autograd
  can differentiate through it again (double backward). It recomputes the statistics
  from ``x`` because the saved ``mean``/``invstd`` carry no graph.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim but the channel dim (1): the dims the statistics are taken over."""
    return [0, *range(2, x.dim())]


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``x`` (N, C, *)."""
    return t.reshape(1, -1, *([1] * (x.dim() - 2)))


def stats_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def centred_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel ``(centre, offset, var, centred)`` in :func:`stats_dtype`.

    ``centre`` is the mean as the dtype computes it and ``offset = mean(x - centre)``
    how far the data's mean is from it (its rounding, ~ulp), so ``centre + offset`` is
    the mean to twice the dtype's digits; ``var = mean((x - centre)^2) - offset^2`` is
    the corrected two-pass biased variance; ``centred = x - centre``, x's shape.
    """
    xs = x.to(stats_dtype(x))
    dims = reduce_dims(x)
    centre = xs.mean(dim=dims)
    centred = xs - channel_view(centre, x)
    offset = centred.mean(dim=dims)
    var = ((centred * centred).mean(dim=dims) - offset * offset).clamp_min(0.0)
    return centre, offset, var, centred


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance (:func:`centred_stats`), in
    :func:`stats_dtype`."""
    centre, offset, var, _ = centred_stats(x)
    return centre + offset, var


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    m: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> None:
    """The guarded in-place EMA / cumulative update (see :mod:`batchnorm._backends`).

    The finiteness decision stays a device tensor: ``torch.where`` keeps the old
    values for a bad batch, so nothing waits for the host.
    """
    ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / (num_batches_tracked.to(mean.dtype) + 1.0)
    else:
        factor = torch.tensor(momentum, dtype=mean.dtype, device=mean.device)
    unbiased = var * (m / (m - 1))
    new_mean = torch.lerp(running_mean.to(mean.dtype), mean, factor)
    new_var = torch.lerp(running_var.to(var.dtype), unbiased, factor)
    commit_running_stats(
        running_mean, running_var, new_mean, new_var, ok, num_batches_tracked,
        num_batches_skipped,
    )


def update_from_centred_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    centre: Tensor,
    offset: Tensor,
    var: Tensor,
    m: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> None:
    """:func:`update_running_stats` with the batch statistics of :func:`centred_stats`
    (``mean = centre + offset`` in the statistics dtype).

    Detached and without grad: the statistics come from differentiable ops, and the
    update also runs outside an autograd Function (under torch.compile and torch.func),
    where the buffers must not join the graph. float64 running statistics for a
    narrower input (the scratch buffers of ghost batch norm's chunks) get every digit
    of the mean, centre + offset in float64, which ``mean`` has rounded away.
    """
    with torch.no_grad():
        batch_mean, batch_var = mean.detach(), var.detach()
        if running_mean.dtype == torch.float64 and batch_mean.dtype != torch.float64:
            batch_mean = centre.detach().double() + offset.detach().double()
            batch_var = batch_var.double()
        update_running_stats(
            running_mean, running_var, batch_mean, batch_var, m, momentum,
            num_batches_tracked, num_batches_skipped,
        )


def commit_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    new_mean: Tensor,
    new_var: Tensor,
    ok: Tensor,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> None:
    """Write the updated statistics into the running ones where ``ok`` (a 0-dim bool
    tensor: the batch was finite), keep the old values otherwise, and count the batch
    as tracked or skipped; all on the device. (Also compiled by torch.jit.script, for
    the scripted layers: see :mod:`batchnorm.nn._script`.)"""
    running_mean.copy_(torch.where(ok, new_mean, running_mean.to(new_mean.dtype)))
    running_var.copy_(torch.where(ok, new_var, running_var.to(new_var.dtype)))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
    if num_batches_skipped is not None:
        num_batches_skipped.add_((~ok).to(num_batches_skipped.dtype))


def affine_coefficients(
    weight: Tensor | None, bias: Tensor | None, offset: Tensor | None, invstd: Tensor
) -> tuple[Tensor, Tensor]:
    """``scale = gamma * invstd`` and ``shift = beta - offset * scale`` per channel: the
    map ``y = (x - centre) * scale + shift`` about a centre near the mean, ``offset``
    being mean - centre (None: 0)."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(scale) if offset is None else -offset.to(scale.dtype) * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    return scale, shift


def apply_affine(x: Tensor, centre: Tensor | None, scale: Tensor, shift: Tensor) -> Tensor:
    """``(x - centre) * scale + shift`` (``centre`` None: 0), in the statistics dtype,
    cast back to x's. A ``centre`` in the statistics dtype makes ``x - centre`` exact
    for x near it, see the module docstring."""
    xs = x.to(scale.dtype)
    if centre is not None:
        xs = xs - channel_view(centre.to(scale.dtype), x)
    return apply_centred(xs, x, scale, shift)


def normalized(centred: Tensor, offset: Tensor, invstd: Tensor, x: Tensor) -> Tensor:
    """``x_hat = (centred - offset) * invstd`` in one pass (``centred = x - centre``,
    ``offset`` = mean − centre per channel): about the mean itself, although the
    centre is its rounded value, so far from zero x_hat keeps its digits."""
    return torch.addcmul(channel_view(-offset * invstd, x), centred, channel_view(invstd, x))


def apply_centred(centred: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``centred * scale + shift`` in one pass, cast to x's dtype (``centred = x -
    centre`` from :func:`centred_stats` or :func:`apply_affine`)."""
    y = torch.addcmul(channel_view(shift, x), centred, channel_view(scale, x))
    return y.to(x.dtype)


class _ReferenceBackend:
    """The :class:`batchnorm._backends.Backend` made of torch ops; any device, any dtype."""

    name = "reference"

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        centre, offset, var, centred = centred_stats(x)
        mean = centre + offset
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None and running_var is not None:
            update_from_centred_stats(
                running_mean, running_var, mean, centre, offset, var, x.numel() // x.shape[1],
                momentum, num_batches_tracked, num_batches_skipped,
            )
        scale, shift = affine_coefficients(weight, bias, offset, invstd)
        return apply_centred(centred, x, scale, shift), mean, invstd

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dims = reduce_dims(x)
        m = x.numel() // x.shape[1]
        dys = dy.to(mean.dtype)
        centred = x.to(mean.dtype) - channel_view(mean, x)
        # The saved mean is rounded to its dtype; far from zero that rounding, offset =
        # mean(x - mean), would show in sum(dy * x_hat) as offset * invstd * sum(dy)
        # (torch's backward has that error: ~1e-2 in dgamma at 1e4 +- 1e-2), so x_hat
        # is taken about the data's own mean.
        x_hat = normalized(centred, centred.mean(dim=dims), invstd, x)
        sum_dy = dys.sum(dim=dims)
        sum_dy_xhat = (dys * x_hat).sum(dim=dims)
        k = invstd if weight is None else weight.to(invstd.dtype) * invstd
        # dx = k * (dy - sum_dy/m - x_hat * sum_dy_xhat/m), written as two fused passes.
        dx = torch.addcmul(
            channel_view(-sum_dy / m, x), x_hat, channel_view(-sum_dy_xhat / m, x)
        ).add_(dys).mul_(channel_view(k, x))
        return dx.to(x.dtype), sum_dy_xhat, sum_dy

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        return inference_affine(x, weight, bias, running_mean, running_var, eps)


BACKEND = _ReferenceBackend()


def inference_affine(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> Tensor:
    """The inference map ``(x - c) * scale + shift``, c the running mean in the
    statistics dtype and ``shift = beta - (running_mean - c) * scale`` (0 when the
    running mean is in that dtype); differentiable in every argument."""
    dtype = stats_dtype(x)
    centre = running_mean.to(dtype)
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    offset = None if running_mean.dtype == dtype else running_mean.to(torch.float64) - centre
    scale, shift = affine_coefficients(weight, bias, offset, invstd)
    return apply_affine(x, centre, scale, shift)


def differentiable_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float, centre: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The closed-form backward as differentiable ops on ``x``, ``weight`` and ``dy``.

    Used when autograd asks for a graph of the backward (``create_graph=True``), so
    second derivatives (gradgradcheck, gradient penalties) are exact.

    x̂ is taken about the data's mean, as in the first-order backward: x is first
    shifted by ``centre`` (the forward's saved batch mean, or x's mean when None), a
    constant of the graph, and then by the mean of what is left, ``x − centre −
    mean(x − centre)``, which is x − mean(x) for any constant centre: the same function
    of x, so the same derivatives, but computed about a centre near the data and so
    exact far from zero, where x̂ about the mean rounded to float32 put ~1e-3 into dx
    and ~2e-2 into dγ (at 1e4 ± 1e-2). Given the centre, the graph has the passes of
    the plain two-pass form.
    """
    dims = reduce_dims(x)
    m = x.numel() // x.shape[1]
    dtype = stats_dtype(x)
    xs = x.to(dtype)
    c = xs.detach().mean(dim=dims) if centre is None else centre.detach().to(dtype)
    shifted = xs - channel_view(c, x)
    centred = shifted - shifted.mean(dim=dims, keepdim=True)
    invstd = torch.rsqrt((centred * centred).mean(dim=dims, keepdim=True) + eps)
    x_hat = centred * invstd
    dys = dy.to(dtype)
    sum_dy = dys.sum(dim=dims, keepdim=True)
    sum_dy_xhat = (dys * x_hat).sum(dim=dims, keepdim=True)
    k = invstd if weight is None else channel_view(weight.to(dtype), x) * invstd
    dx = k * (dys - sum_dy / m - x_hat * (sum_dy_xhat / m))
    return dx.to(x.dtype), sum_dy_xhat.reshape(-1), sum_dy.reshape(-1)
