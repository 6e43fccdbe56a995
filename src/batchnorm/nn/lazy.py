"""Lazy batch norm: BatchNorm1d/2d/3d whose ``num_features`` comes from the first input.

The twins of ``torch.nn.LazyBatchNorm1d/2d/3d``. Until a first forward (or a
``load_state_dict``) the layer holds uninitialized parameters and buffers
(``torch.nn.parameter.UninitializedParameter`` / ``UninitializedBuffer``); the first
input fixes ``C = input.shape[1]``, materializes γ, β and the running statistics with
C entries each on the device and dtype given to the constructor (as torch's lazy
layers do; not the input's), resets them (γ = 1, β = 0, mean 0, variance 1), and
turns the layer into the plain :class:`~batchnorm.nn.BatchNorm2d` (1d, 3d), which
then runs that input. Loading a state_dict into an uninitialized layer takes C from
the loaded tensors.

Where a lazy layer cannot be used before its first input, as in torch: deepcopy,
pickle, ``torch.fx.symbolic_trace`` and ``torch.jit.script`` (run one batch through the
model first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from batchnorm.nn._base import _BatchNormBase
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d


class _LazyBatchNorm(LazyModuleMixin, _BatchNormBase):
    """Uninitialized γ/β and running statistics until the first input fixes C."""

    cls_to_become: type[_BatchNormBase]

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
        check_finite: bool = False,
    ) -> None:
        # The base checks every argument and registers state for one channel (it
        # refuses 0); the tensors that depend on C are then replaced by uninitialized
        # ones, the counters kept.
        super().__init__(
            1, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, check_finite=check_finite,
        )
        self.num_features = 0
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)

    def __prepare_scriptable__(self) -> nn.Module:
        """torch.jit.script types the layer by its tensors, which an uninitialized
        layer does not have yet: TypeError (once initialized, the layer is a plain
        BatchNormXd and scripts as one)."""
        if self.has_uninitialized_params():
            raise TypeError(
                f"{type(self).__name__}: torch.jit.script cannot compile a lazy layer that "
                "has not seen an input; run one batch through the model before scripting it"
            )
        if hasattr(self, "_initialize_hook"):
            # Initialized by load_state_dict: the forward pre-hook that makes the layer
            # its plain class has not run, and script cannot compile that hook (nor
            # would it need it). Finish the change now, as a first forward would.
            self._initialize_hook.remove()
            self._load_hook.remove()
            del self._initialize_hook, self._load_hook
            if self.cls_to_become is not None:
                self.__class__ = self.cls_to_become
            return self.__prepare_scriptable__()
        return super().__prepare_scriptable__()

    def reset_running_stats(self) -> None:
        """As the plain layer's once C is known; before that only the counters exist."""
        if self.has_uninitialized_params():
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.zero_()
                self.num_batches_skipped.zero_()
            return
        super().reset_running_stats()

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params():
            super().reset_parameters()

    def initialize_parameters(self, input: object, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Called by the forward pre-hook of LazyModuleMixin, before the first forward:
        C from ``input.shape[1]``, after the plain layer's input checks (so a wrong
        input is refused with its message, naming this layer)."""
        name = type(self).__name__
        if isinstance(input, torch.fx.Proxy):
            raise TypeError(
                f"{name}: torch.fx cannot trace a lazy layer that has not seen an input; "
                "run one batch through the model before tracing it"
            )
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
        self._check_input_dim(input)
        # C is what a load_state_dict gave the tensors it filled, else the input's.
        num_features = self._known_num_features() or input.shape[1]
        if num_features < 1:
            raise ValueError(
                f"{name}: the first input fixes num_features = input.shape[1], which must be "
                f"positive, got input of shape {tuple(input.shape)}"
            )
        self.num_features = num_features
        # Only what is still uninitialized is materialized and reset (γ = 1, β = 0,
        # mean 0, variance 1): tensors loaded from a state_dict keep their values.
        for attr, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            t = getattr(self, attr)
            if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                t.materialize((num_features,))
                with torch.no_grad():
                    t.fill_(fill)

    def _known_num_features(self) -> int:
        """C of the tensors already materialized (by load_state_dict), else 0."""
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None and not isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                return t.shape[0]
        return 0

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:  # type: ignore[no-untyped-def]
        # LazyModuleMixin's pre-hook has materialized the tensors found in state_dict
        # with their shapes; C follows them, so the layer's checks see the loaded size.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.num_features = self._known_num_features()


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """:class:`~batchnorm.nn.BatchNorm1d` with ``num_features`` taken from the first
    input's dim 1 (see :mod:`batchnorm.nn.lazy`); then it is a BatchNorm1d.

    Args: those of BatchNorm1d but ``num_features``.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.LazyBatchNorm1d()
        >>> layer(torch.randn(8, 100)).shape, type(layer).__name__, layer.num_features
        (torch.Size([8, 100]), 'BatchNorm1d', 100)
    """

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """:class:`~batchnorm.nn.BatchNorm2d` with ``num_features`` taken from the first
    input's dim 1 (see :mod:`batchnorm.nn.lazy`); then it is a BatchNorm2d.

    Args: those of BatchNorm2d but ``num_features``.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.LazyBatchNorm2d()
        >>> layer(torch.randn(8, 64, 14, 14)).shape, type(layer).__name__, layer.num_features
        (torch.Size([8, 64, 14, 14]), 'BatchNorm2d', 64)
    """

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """:class:`~batchnorm.nn.BatchNorm3d` with ``num_features`` taken from the first
    input's dim 1 (see :mod:`batchnorm.nn.lazy`); then it is a BatchNorm3d.

    Args: those of BatchNorm3d but ``num_features``.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.LazyBatchNorm3d()
        >>> layer(torch.randn(2, 16, 4, 8, 8)).shape, type(layer).__name__, layer.num_features
        (torch.Size([2, 16, 4, 8, 8]), 'BatchNorm3d', 16)
    """

    cls_to_become = BatchNorm3d


__all__ = ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]
