"""Drop-in replacements for :class:`torch.nn.BatchNorm1d`, ``2d`` and ``3d``."""

from __future__ import annotations

from torch import nn

from batchnorm.nn._base import _BatchNormBase

_DOC_COMMON = r"""

    In training, each channel is normalized with the statistics of the batch over
    every dim but 1 (m values per channel):

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    with the biased variance. The running estimates follow PyTorch's convention,
    ``running = (1 - momentum) * running + momentum * batch`` (Keras's 0.99 is
    ``1 - 0.1``), with the unbiased variance ``m/(m-1)·Var[x]``; ``momentum=None``
    is the cumulative average. In eval mode the running estimates normalize, so any
    batch size works, a single example included. A training batch with non-finite
    statistics is kept out of the running estimates (counted in
    ``num_batches_skipped``), or raises :class:`FloatingPointError` with
    ``check_finite=True``.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for stability. Default: 1e-5.
        momentum: EMA factor, or ``None`` for the cumulative average. Default: 0.1.
        affine: learn γ and β. Default: True.
        track_running_stats: keep running estimates; if False, batch statistics are
            used in eval mode too. Default: True.
        bias: learn β (with ``affine``). Default: True.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"aten"`` or ``"triton"``.
        check_finite: also raise FloatingPointError on non-finite batch statistics
            (the batch is still skipped and counted in ``num_batches_skipped``).

    Raises:
        ValueError: wrong number of dims, channel count not equal to ``num_features``,
            or one value per channel in training.
        TypeError: integer or bool input.
"""


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
    __doc__ = (
        "Batch normalization over a 2D (N, C) or 3D (N, C, L) input." + _DOC_COMMON + """
    Shape:
        Input (N, C) or (N, C, L); output the same.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm1d(100)
        >>> layer(torch.randn(60, 100)).shape
        torch.Size([60, 100])
    """
    )

    _min_dim = 2
    _max_dim = 3
    _dims_text = "2D (N, C) or 3D (N, C, L)"


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
    __doc__ = (
        "Batch normalization over a 4D (N, C, H, W) input." + _DOC_COMMON + """
    Shape:
        Input (N, C, H, W), contiguous or channels_last; output the same shape and
        memory format.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm2d(64)
        >>> layer(torch.randn(8, 64, 14, 14)).shape
        torch.Size([8, 64, 14, 14])
    """
    )

    _min_dim = 4
    _max_dim = 4
    _dims_text = "4D (N, C, H, W)"


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
    __doc__ = (
        "Batch normalization over a 5D (N, C, D, H, W) input." + _DOC_COMMON + """
    Shape:
        Input (N, C, D, H, W), contiguous or channels_last_3d; output the same.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm3d(16)
        >>> layer(torch.randn(2, 16, 4, 8, 8)).shape
        torch.Size([2, 16, 4, 8, 8])
    """
    )

    _min_dim = 5
    _max_dim = 5
    _dims_text = "5D (N, C, D, H, W)"

