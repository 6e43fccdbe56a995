"""Batch norm followed by an optional residual add and an activation, as one layer.

``act(BN(x) + residual)`` is the tail of almost every convolutional block. As one layer
it can become one kernel: on a GPU the normalized value never goes back to memory
before the activation. :meth:`_BatchNormAct._forward_fused` is the single place where
such a kernel plugs in; today it composes torch ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from batchnorm.nn._base import _BatchNormBase
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "identity")


# The layer *subclasses* BatchNormXd instead of wrapping one (``self.bn = ...``): the
# parameters and buffers keep BatchNormXd's names (``weight``, ``running_mean``, ...),
# not ``bn.weight``, so checkpoints of plain batch-norm networks load unchanged when a
# BN + activation pair is replaced by this layer, and the other way round.
class _BatchNormAct(_BatchNormBase):
    """BN + residual + activation for any input rank; the public classes add the dim check."""

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
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
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
        if residual is not None:
            if not isinstance(residual, Tensor):
                raise TypeError(
                    f"{type(self).__name__}: residual must be a torch.Tensor or None, got "
                    f"{type(residual).__name__}"
                )
            if isinstance(input, Tensor):
                if residual.shape != input.shape:
                    raise ValueError(
                        f"{type(self).__name__}: residual must have the input's shape "
                        f"{tuple(input.shape)}, got {tuple(residual.shape)}"
                    )
                if residual.dtype != input.dtype or residual.device != input.device:
                    raise TypeError(
                        f"{type(self).__name__}: residual must match the input's dtype and "
                        f"device ({input.dtype} on {input.device}), got {residual.dtype} on "
                        f"{residual.device}"
                    )
        return self._forward_fused(input, residual)

    def _forward_fused(self, input: Tensor, residual: Tensor | None) -> Tensor:
        """The fused op: ``act(BN(input) + residual)``, in train or eval mode.

        This is the seam for fused kernels (``batchnorm.kernels.triton_host``'s
        ``act_forward_train`` and friends): a CUDA tensor will dispatch there. Now it
        composes torch ops. The residual add and the activation run in place on the
        fresh batch-norm output: no extra buffer, the memory format of the output
        stays the input's, and autograd allows it because batch norm's backward needs
        ``x``, not its output (ReLU's and leaky ReLU's backward use their output).
        """
        y = super().forward(input)
        if residual is not None:
            y = y.add_(residual)
        if self.activation == "relu":
            return torch.relu_(y)
        if self.activation == "leaky_relu":
            # In place only for a slope >= 0: the backward then reads the sign off the output.
            return TF.leaky_relu(y, self.negative_slope, inplace=self.negative_slope >= 0)
        if self.activation == "silu":
            return TF.silu(y)  # its backward needs the input: not in place
        return y

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
