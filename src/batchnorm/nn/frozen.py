"""Batch norm with fixed statistics and affine parameters, for fine-tuning and detection.

A frozen layer is the inference form of batch norm in both modes: nothing is learned
and nothing is updated. It loads a BatchNormXd state_dict, so a trained network's
layers can be swapped for frozen ones (see :func:`batchnorm.freeze`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.nn._base import name_the_layer, non_tensor_input

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    """The fixed map for any input rank; the public classes add the dim check."""

    _dims: tuple[int, ...] = ()
    _shape_text: str = ""
    num_features: int
    eps: float
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int, got {num_features!r}"
            )
        if not (0.0 <= eps < math.inf):
            raise ValueError(f"{type(self).__name__}: eps must be finite and >= 0, got {eps}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        # Buffers, not parameters: they move with .to() and live in the state_dict, but
        # no optimizer sees them.
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        if input.dim() not in self._dims:
            raise ValueError(
                f"{type(self).__name__}: expected {self._shape_text} input, got {input.dim()}D "
                f"input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(dim 1, num_features), got {input.shape[1]} in input of shape "
                f"{tuple(input.shape)}"
            )
        # Inference-mode batch norm is exactly the fixed affine map, in either mode.
        try:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                training=False, eps=self.eps,
            )
        except Exception as error:
            name_the_layer(error, self)
            raise

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNormXd state_dict carries counters a frozen layer has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        state_dict.pop(prefix + "num_batches_skipped", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


_DOC_COMMON = r"""

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with ``weight`` (γ), ``bias`` (β), ``running_mean`` (μ) and ``running_var`` (σ²)
    all *buffers*: fixed in train and eval mode, invisible to optimizers, saved in the
    state_dict. Loads a BatchNormXd state_dict (its ``num_batches_tracked`` is
    ignored). Gradients flow to the input. The repr is torchvision's,
    e.g. ``FrozenBatchNorm2d(64, eps=1e-05)``.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default: 1e-5.
        device, dtype: of the buffers (keyword-only).
"""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm for a 2D (N, C) or 3D (N, C, L) input." + _DOC_COMMON
    _dims = (2, 3)
    _shape_text = "2D (N, C) or 3D (N, C, L)"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm for a 4D (N, C, H, W) input." + _DOC_COMMON + """
    Examples::

        >>> import torch, batchnorm as bn
        >>> frozen = bn.FrozenBatchNorm2d(64)
        >>> frozen.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
        <All keys matched successfully>
        >>> frozen
        FrozenBatchNorm2d(64, eps=1e-05)
    """
    _dims = (4,)
    _shape_text = "4D (N, C, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm for a 5D (N, C, D, H, W) input." + _DOC_COMMON
    _dims = (5,)
    _shape_text = "5D (N, C, D, H, W)"
