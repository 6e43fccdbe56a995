"""Batch norm with fixed statistics and affine parameters, for fine-tuning and detection.

A frozen layer is the inference form of batch norm in both modes: nothing is learned
and nothing is updated. It loads a BatchNormXd state_dict, so a trained network's
layers can be swapped for frozen ones (see :func:`batchnorm.freeze`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from batchnorm import functional as F
from batchnorm.nn import _script
from batchnorm.nn._base import (
    check_positive_int,
    name_the_layer,
    non_tensor_input,
    resolve_annotations,
)

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    """The fixed map for any input rank; the public classes add the dim check."""

    # TorchScript bakes these into the compiled forward (see _BatchNormBase).
    __constants__ = ("num_features", "eps", "_layer_name", "_min_dim", "_max_dim", "_dims_text")
    _layer_name = "_FrozenBatchNorm"
    _min_dim = 2
    _max_dim = 5
    _dims_text = "2D to 5D (N, C, *)"
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
        name = type(self).__name__
        check_positive_int(name, "num_features", num_features)
        # numbers.Real: NumPy numbers too, as the other layers take; a 0-dim tensor as
        # the trainable layers take (convert and freeze carry theirs).
        if isinstance(eps, bool) or not isinstance(eps, (numbers.Real, Tensor)):
            raise TypeError(f"{name}: eps must be a real number, got {type(eps).__name__} {eps!r}")
        if not (0.0 <= eps < math.inf):
            raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        # Python numbers, not NumPy ones: TorchScript bakes them in as constants.
        self.num_features = int(num_features)
        self.eps = eps if isinstance(eps, Tensor) else float(eps)
        # Buffers, not parameters: they move with .to() and live in the state_dict, but
        # no optimizer sees them.
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._layer_name = cls.__name__

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(input)
        return self._forward_eager(input)

    def _check_input(self, input: Tensor) -> None:
        """The dims and channel count, in both forwards (errors name the layer)."""
        name = self._layer_name
        _script.check_dims(name, input, self._min_dim, self._max_dim, self._dims_text)
        _script.check_channels(name, input, self.num_features)

    def _forward_scripted(self, input: Tensor) -> Tensor:
        """The forward under torch.jit.script: aten's inference batch norm."""
        self._check_input(input)
        return _script.batch_norm(
            self._layer_name, input, self.running_mean, self.running_var, self.weight,
            self.bias, False, 0.0, self.eps, None, False,
        )

    @torch.jit.unused
    def _forward_eager(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        self._check_input(input)
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


resolve_annotations(_FrozenBatchNorm)

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
    _min_dim = 2
    _max_dim = 3
    _dims_text = "2D (N, C) or 3D (N, C, L)"


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
    _min_dim = 4
    _max_dim = 4
    _dims_text = "4D (N, C, H, W)"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = "Frozen batch norm for a 5D (N, C, D, H, W) input." + _DOC_COMMON
    _min_dim = 5
    _max_dim = 5
    _dims_text = "5D (N, C, D, H, W)"
