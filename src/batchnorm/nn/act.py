"""Batch norm followed by an optional residual add and an activation, as one layer.

``act(BN(x) + residual)`` is the tail of almost every convolutional block. As one layer
it can become one kernel in each direction: the normalized value never goes back to
memory before the activation, ReLU's backward reads a one-byte mask that the forward
writes (on the numba kernels; the Triton ones read the output's sign), and the
residual's gradient is written only when it is needed. The mask is memory kept until
backward, a quarter of a float32 output, where the output itself would usually be
kept anyway by the next layer (a convolution saves its input): the price of reading
one byte instead of four in both backward passes.
:meth:`_BatchNormAct._forward_fused` hands the op to
:func:`batchnorm.functional.batch_norm_act`: the fused numba kernels for float32/float64
CPU tensors, the fused Triton kernels on CUDA, composed torch ops elsewhere (the
reference backend, CPU half precision).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.nn import _script
from batchnorm.nn._base import (
    _BatchNormBase,
    names_its_errors,
    non_tensor_input,
    resolve_annotations,
)
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]

ACTIVATIONS = F.ACTIVATIONS


# The layer *subclasses* BatchNormXd instead of wrapping one (``self.bn = ...``): the
# parameters and buffers keep BatchNormXd's names (``weight``, ``running_mean``, ...),
# not ``bn.weight``, so checkpoints of plain batch-norm networks load unchanged when a
# BN + activation pair is replaced by this layer, and the other way round.
class _BatchNormAct(_BatchNormBase):
    """BN + residual + activation for any input rank; the public classes add the dim check."""

    __constants__ = (*_BatchNormBase.__constants__, "activation", "negative_slope")
    activation: str
    negative_slope: float

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        *,
        negative_slope: float = 0.01,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        bias: bool = True,
        backend: str = "auto",
        check_finite: bool = False,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        # numbers.Real: NumPy numbers too (stored as a Python float).
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
            raise TypeError(
                f"{type(self).__name__}: negative_slope must be a number, got "
                f"{type(negative_slope).__name__}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, check_finite=check_finite,
        )
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``act(BN(input) + residual)``; ``residual`` has ``input``'s shape, dtype, device."""
        if torch.jit.is_scripting():
            return self._forward_act_scripted(input, residual)
        return self._forward_act_eager(input, residual)

    def _forward_act_scripted(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """The forward under torch.jit.script: aten's batch norm, then torch's add and
        activation (see :mod:`._script`)."""
        self._check_input_dim(input)
        self._check_num_channels(input)
        _script.check_residual(self._layer_name, input, residual)
        y = self._batch_norm_scripted(input)
        return _script.add_and_activate(y, residual, self.activation, self.negative_slope)

    @torch.jit.unused
    @names_its_errors
    def _forward_act_eager(self, input: Tensor, residual: Tensor | None) -> Tensor:
        return self._forward_fused(input, residual)

    def _forward_fused(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """The fused op, in train or eval mode, through :func:`batchnorm.functional.batch_norm_act`:
        one kernel per direction on the numba (CPU) and Triton (CUDA) backends, composed
        torch ops elsewhere."""
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input, residual))
        self._check_input_dim(input)
        self._check_num_channels(input)
        return F.batch_norm_act(
            input, residual=residual, activation=self.activation,
            negative_slope=self.negative_slope, **self._functional_kwargs(),
        )

    def activation_module(self) -> nn.Module:
        """The activation as a standalone module (what remains when the BN is folded away)."""
        if self.activation == "relu":
            return nn.ReLU()
        if self.activation == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope)
        if self.activation == "silu":
            return nn.SiLU()
        return nn.Identity()

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation!r}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text


resolve_annotations(_BatchNormAct)

_DOC_COMMON = r"""

    .. math::
        y = \mathrm{act}\big(\mathrm{BN}(x) + \text{residual}\big)

    with BN exactly :class:`batchnorm.BatchNorm2d` (training and eval, running
    statistics, channels_last, half precision) and ``act`` one of ``"relu"``,
    ``"leaky_relu"`` (``negative_slope``), ``"silu"`` or ``"identity"``. ``residual``
    is optional. The state_dict is BatchNormXd's, so checkpoints of BN networks load.

    Args:
        num_features: C, the number of channels.
        activation: the activation's name. Default: ``"relu"``.
        negative_slope: for ``"leaky_relu"``. Default: 0.01.
        eps, momentum, affine, track_running_stats, bias, backend, check_finite: as in
            :class:`batchnorm.BatchNorm2d` (keyword-only here).

    Raises:
        ValueError: unknown activation; residual of another shape; wrong dims/channels.
        TypeError: residual not a tensor or of another dtype/device.
"""


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    __doc__ = "BN + activation over a 2D (N, C) or 3D (N, C, L) input." + _DOC_COMMON


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    __doc__ = "BN + activation over a 4D (N, C, H, W) input." + _DOC_COMMON + """
    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNormAct2d(64, "relu")
        >>> x = torch.randn(8, 64, 14, 14)
        >>> layer(x, residual=x).shape
        torch.Size([8, 64, 14, 14])
    """


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    __doc__ = "BN + activation over a 5D (N, C, D, H, W) input." + _DOC_COMMON
