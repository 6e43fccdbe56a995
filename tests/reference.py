"""Float64 ground truth for batch normalization, written directly from the formulas.

Nothing here shares code with the package: statistics are explicit sums, the running
update is the textbook EMA/cumulative formula, and the backward is the closed form
of Ioffe & Szegedy (2015), Algorithm 1's derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _per_channel(x: Tensor) -> Tensor:
    """(N, C, *) -> (C, m): every value of each channel in one row, float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


@dataclass
class RefOut:
    y: Tensor
    mean: Tensor  # batch mean (training) or running mean (eval)
    var: Tensor  # biased batch variance (training) or running var (eval)
    running_mean: Tensor | None
    running_var: Tensor | None


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: int = 0,
) -> RefOut:
    """y (float64, x's shape) and the updated running statistics (float64)."""
    C = x.shape[1]
    rows = _per_channel(x)
    m = rows.shape[1]
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    b = torch.zeros(C, dtype=torch.float64) if bias is None else bias.double()
    new_rm = None if running_mean is None else running_mean.double().clone()
    new_rv = None if running_var is None else running_var.double().clone()
    if training:
        mean = rows.sum(1) / m
        var = ((rows - mean[:, None]) ** 2).sum(1) / m
        if new_rm is not None and new_rv is not None:
            f = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
            new_rm = (1 - f) * new_rm + f * mean
            new_rv = (1 - f) * new_rv + f * var * m / (m - 1)
    else:
        assert running_mean is not None and running_var is not None
        mean, var = running_mean.double(), running_var.double()
    shape = [1, C] + [1] * (x.dim() - 2)
    x_hat = (x.double() - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return RefOut(x_hat * w.view(shape) + b.view(shape), mean, var, new_rm, new_rv)


def backward_train(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias in training mode from the closed form, float64."""
    C = x.shape[1]
    shape = [1, C] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    xd, dyd = x.double(), dy.double()
    m = x.numel() // C
    mean = xd.mean(dims, keepdim=True)
    var = ((xd - mean) ** 2).mean(dims, keepdim=True)
    invstd = 1 / torch.sqrt(var + eps)
    x_hat = (xd - mean) * invstd
    w = torch.ones(shape, dtype=torch.float64) if weight is None else weight.double().view(shape)
    sum_dy = dyd.sum(dims, keepdim=True)
    sum_dy_xhat = (dyd * x_hat).sum(dims, keepdim=True)
    dx = w * invstd / m * (m * dyd - sum_dy - x_hat * sum_dy_xhat)
    return dx, sum_dy_xhat.reshape(C), sum_dy.reshape(C)


def backward_eval(
    dy: Tensor, x: Tensor, weight: Tensor | None, running_mean: Tensor, running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight, dbias of the fixed affine map used in eval mode, float64."""
    C = x.shape[1]
    shape = [1, C] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    invstd = 1 / torch.sqrt(running_var.double() + eps)
    x_hat = (x.double() - running_mean.double().view(shape)) * invstd.view(shape)
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    dyd = dy.double()
    return dyd * (w * invstd).view(shape), (dyd * x_hat).sum(dims), dyd.sum(dims)
