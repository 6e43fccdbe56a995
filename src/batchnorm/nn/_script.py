"""The layers' forwards in the language ``torch.jit.script`` compiles.

TorchScript compiles a module's ``forward`` from its source. The eager forward of these
layers picks a backend (numba, Triton, aten, the reference) in Python that TorchScript
cannot compile, so a scriptable layer's ``forward`` starts with
``if torch.jit.is_scripting():`` and calls the functions here instead; the eager path
is a method marked ``@torch.jit.unused``, which TorchScript replaces by a raise. In
eager mode the branch costs one call of ``torch.jit.is_scripting()``.

A scripted layer runs aten's batch norm (``torch.batch_norm``), as a scripted
``torch.nn.BatchNorm2d`` does, with this package's semantics on top:

* a training batch with non-finite statistics leaves the running statistics alone
  (``torch.where``, no host wait) and is not counted in ``num_batches_tracked``;
  ``check_finite`` raises ``FloatingPointError`` for it. It is not counted in
  ``num_batches_skipped`` either: that buffer is not persistent, TorchScript has no
  such buffers (it would put it into the scripted state_dict), so it stays out of the
  compiled module;
* an empty training batch updates nothing and is not counted;
* ``momentum=None`` averages over the counted batches;
* float16/bfloat16 inputs keep float32 parameters and statistics, and a float64
  layer normalizes float32 input in float32, as the eager layer does;
* bad input raises the eager layer's error, naming the layer. TorchScript surfaces
  every exception of compiled code as ``torch.jit.Error`` (a RuntimeError) whose
  message carries the original's, e.g. ``builtins.ValueError: BatchNorm2d: expected
  4D (N, C, H, W) input, got 2D input of shape (8, 3)``.

The eager layers call the shape checks here too, so both paths raise the same text.
The functions are plain Python as well and run eagerly; tests compare both forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor

from batchnorm._reference import commit_running_stats


def shape_text(shape: list[int]) -> str:
    """``shape`` as Python prints a tuple: ``(8, 3)``, ``(5,)``, ``()``."""
    if len(shape) == 1:
        return "(" + str(shape[0]) + ",)"
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def dtype_text(dtype: torch.dtype) -> str:
    """``torch.float32`` and kin as Python prints them (TorchScript's ``str`` of a dtype
    is its enum number)."""
    if dtype == torch.float32:
        return "torch.float32"
    if dtype == torch.float64:
        return "torch.float64"
    if dtype == torch.float16:
        return "torch.float16"
    if dtype == torch.bfloat16:
        return "torch.bfloat16"
    return str(dtype)


def check_dims(owner: str, input: Tensor, min_dim: int, max_dim: int, expected: str) -> None:
    """ValueError unless ``min_dim <= input.dim() <= max_dim`` (``expected`` says which)."""
    if input.dim() < min_dim or input.dim() > max_dim:
        raise ValueError(
            owner + ": expected " + expected + " input, got " + str(input.dim())
            + "D input of shape " + shape_text(input.shape)
        )


def check_channels(owner: str, input: Tensor, num_features: int) -> None:
    """ValueError unless dim 1 of ``input`` has ``num_features`` channels."""
    if input.shape[1] != num_features:
        raise ValueError(
            owner + ": expected input with " + str(num_features) + " channels (dim 1, "
            "num_features), got " + str(input.shape[1]) + " in input of shape "
            + shape_text(input.shape)
        )


def _as_input_dtype(t: Tensor | None, input: Tensor) -> Tensor | None:
    """A parameter or statistic in the dtype aten's batch norm takes with ``input``:
    float16/bfloat16 inputs take float32 ones (aten's mixed-precision kernels), so a
    float64 (or other half-precision) layer's statistics are computed and kept to
    float32, not to the input's 8 or 11 bits; any other dtype mismatch (a float64 layer
    fed float32) is cast to the input's."""
    if t is None or t.dtype == input.dtype:
        return t
    if input.dtype == torch.float16 or input.dtype == torch.bfloat16:
        return t if t.dtype == torch.float32 else t.to(torch.float32)
    return t.to(input.dtype)


def batch_norm(
    owner: str,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    check_finite: bool,
) -> Tensor:
    """:func:`batchnorm.functional.batch_norm` on aten, for scripted layers.

    In training with running statistics, aten updates copies of them and
    ``torch.where`` keeps the old values when the copies are not finite: aten's own
    in-place update would have written the NaN in.
    """
    weight = _as_input_dtype(weight, input)
    bias = _as_input_dtype(bias, input)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(owner + ": inference needs running_mean and running_var")
        return torch.batch_norm(
            input, weight, bias, _as_input_dtype(running_mean, input),
            _as_input_dtype(running_var, input), False, 0.0, eps, True,
        )
    if not eps > 0.0:
        raise ValueError(
            owner + ": eps must be positive in training (a constant channel's batch "
            "variance is 0), got " + str(eps)
        )
    m = input.numel() // input.shape[1]
    if m == 1:
        raise ValueError(
            owner + ": expected more than 1 value per channel when training, got input "
            "of shape " + shape_text(input.shape) + ": the variance of a single value is "
            "0, so batch statistics cannot normalize it (use eval mode for single examples)"
        )
    if m == 0 or running_mean is None or running_var is None:
        # Nothing to update (an empty batch has no statistics, and aten normalizes it to
        # an empty output).
        return torch.batch_norm(input, weight, bias, None, None, True, 0.0, eps, True)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(owner + ": momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / (float(num_batches_tracked.item()) + 1.0)
    else:
        factor = momentum
    new_mean = _as_input_dtype(running_mean, input)
    new_var = _as_input_dtype(running_var, input)
    assert new_mean is not None and new_var is not None
    new_mean = new_mean.clone()
    new_var = new_var.clone()
    y = torch.batch_norm(input, weight, bias, new_mean, new_var, True, factor, eps, True)
    # The updated copies are finite exactly when the batch's statistics are (given
    # finite running ones). (torch.native_batch_norm would return those statistics, but
    # TorchScript's autodiff of it fails from the second call on.)
    ok = torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
    with torch.no_grad():
        # (No skip counter: see the module docstring.)
        commit_running_stats(
            running_mean, running_var, new_mean, new_var, ok, num_batches_tracked, None
        )
    if check_finite and not bool(ok):
        raise FloatingPointError(
            owner + ": the training batch of shape " + shape_text(input.shape) + " has "
            "non-finite statistics (NaN or Inf in the input); the running statistics were "
            "left unchanged"
        )
    return y


def check_residual(owner: str, input: Tensor, residual: Tensor | None) -> None:
    """The checks :func:`batchnorm.functional.batch_norm_act` makes of ``residual``
    against ``input``, made before anything is normalized or updated."""
    if residual is not None:
        if residual.shape != input.shape:
            raise ValueError(
                owner + ": residual must have the input's shape " + shape_text(input.shape)
                + ", got " + shape_text(residual.shape)
            )
        if residual.dtype != input.dtype or residual.device != input.device:
            raise TypeError(
                owner + ": residual must match the input's dtype and device ("
                + dtype_text(input.dtype) + " on " + str(input.device) + "), got "
                + dtype_text(residual.dtype) + " on " + str(residual.device)
            )


def add_and_activate(
    y: Tensor, residual: Tensor | None, activation: str, negative_slope: float
) -> Tensor:
    """``act(y + residual)``, the tail of :func:`batchnorm.functional.batch_norm_act`."""
    if residual is not None:
        y = y + residual
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return TF.leaky_relu(y, negative_slope)
    if activation == "silu":
        return TF.silu(y)
    return y
