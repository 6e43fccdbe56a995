"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017, "Train longer, generalize better").

A large batch is split along N into *virtual* ("ghost") batches, each normalized with
its own statistics, so the noise of the statistics — and with it the regularizing
effect of batch normalization — is that of the small batch while the step is that of
the large one.

On a backend with ghost kernels (numba, for float32/float64 CPU tensors) the whole
step is one kernel in each direction: statistics per (chunk, channel), each chunk
normalized with its own, and the whole batch's statistics merged exactly from the
chunks' for the running update, with no copy of the input. Elsewhere the chunks go
through :func:`batchnorm.functional.batch_norm`; running statistics need the batch's
statistics, which the functional does not return, and :func:`batch_norm_with_stats`
obtains them from the same pass that normalizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from batchnorm import functional as F
from batchnorm._autograd import _memory_format
from batchnorm._backends import (
    Backend,
    as_dtype,
    check_recordable,
    is_channels_last,
    records_ops,
    select_backend,
)
from batchnorm._reference import (
    batch_stats,
    differentiable_backward,
    stats_dtype,
    update_running_stats,
)
from batchnorm.nn._base import (
    _BatchNormBase,
    check_positive_int,
    names_its_errors,
    non_tensor_input,
)
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]

# Without ghost kernels, equal chunks of at least this many values are normalized one
# call per chunk, smaller ones in a single call with the chunks as channels. Measured
# on the CPU backend before it had ghost kernels: one
# layout copy costs about half of a batch-norm forward+backward, and the single call
# needs two copies more than the per-chunk calls (four against two: the concatenation
# forward and backward), while each extra call costs a fixed ~0.1 ms; below ~2^17
# values per chunk the calls cost more than the copies.
_LOOP_MIN_VALUES = 1 << 17


def batch_norm_with_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm of ``x`` plus the per-channel batch mean and biased variance.

    The output goes through :func:`batchnorm.functional.batch_norm` (the fast backends
    and their autograd). The functional returns only ``y``, but it writes the batch
    statistics into running buffers when it is given some, and with ``momentum=1`` the
    update ``(1 − f)·running + f·batch`` is exactly the batch value. So two scratch
    buffers receive the mean and the unbiased variance ``m/(m−1)·σ²`` from the same
    pass that normalizes: no second pass over ``x``. The buffers are float64 (but on
    devices without it, MPS): the backends write their float64 batch mean into a
    float64 buffer, and merging chunks far from zero (:func:`combine_stats`) needs
    it, since the spread of the chunk means is then below a float32 mean's rounding.

    A batch with non-finite statistics leaves the scratch buffers alone and is counted
    in a scratch counter; the statistics returned for it are NaN, so a guarded update
    (:func:`batchnorm._reference.update_running_stats`) skips it — all on the device.

    Args:
        x: (N, C, *) with more than one value per channel (m = N·prod(*) >= 2).

    Returns:
        ``(y, mean, var)``: ``y`` as the functional returns it; ``mean`` and the biased
        ``var`` of shape (C,) in float64 (float32 on MPS), without grad.
    """
    num_channels = x.shape[1]
    m = x.numel() // num_channels
    dtype = stats_dtype(x) if x.device.type == "mps" else torch.float64
    mean = torch.zeros(num_channels, dtype=dtype, device=x.device)
    unbiased = torch.ones(num_channels, dtype=dtype, device=x.device)
    skipped = torch.zeros((), dtype=torch.long, device=x.device)
    y = F.batch_norm(
        x, mean, unbiased, weight, bias, training=True, momentum=1.0, eps=eps,
        backend=backend, num_batches_skipped=skipped,
    )
    var = unbiased * ((m - 1) / m)
    bad = skipped > 0
    nan = torch.full_like(mean, float("nan"))
    return y, torch.where(bad, nan, mean), torch.where(bad, nan, var)


def combine_stats(
    means: Tensor, variances: Tensor, counts: Sequence[int]
) -> tuple[Tensor, Tensor]:
    r"""Mean and biased variance of the union of groups, from each group's statistics.

    For groups j with n_j values (``counts``), mean μ_j and biased variance σ²_j (rows
    of ``means``/``variances``, shape (k, C)), with n = Σ n_j:

    .. math::
        \mu = \frac1n\sum_j n_j\mu_j,\qquad
        \sigma^2 = \frac1n\sum_j n_j\left(\sigma_j^2 + (\mu_j-\mu)^2\right)

    (the law of total variance: within-group plus between-group). Exact, no
    cancellation. The counts are host integers, so nothing waits for the device.
    """
    total = sum(counts)
    weights = torch.full((len(counts), 1), counts[0] / total, dtype=means.dtype, device=means.device)
    for j, count in enumerate(counts):
        if count != counts[0]:  # the last chunk, at most; a fill, not a host-to-device copy
            weights[j] = count / total
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    return mean, var


class _SwapLeadingAxes(torch.autograd.Function):
    """(a, b, r) contiguous -> (b, a, r) contiguous, with the same single copy backward.

    Autograd's own backward of ``transpose(0, 1).reshape(...)`` zero-fills and copies
    whole tensors; as one Function each direction costs exactly one copy. The backward
    is made of differentiable ops, so double backward works.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.transpose(0, 1).contiguous()


def _swap(t: Tensor) -> Tensor:
    return _SwapLeadingAxes.apply(t)


class _GhostSpec(NamedTuple):
    """The non-differentiated arguments of one fused ghost step."""

    sizes: tuple[int, ...]  # chunk sizes along N
    eps: float
    backend: Backend  # one with ghost kernels
    running_mean: Tensor | None
    running_var: Tensor | None
    momentum: float | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None
    stats_out: list[Tensor] | None  # receives (mean, invstd) for check_finite


def _ghost_forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: _GhostSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """The backend's fused ghost forward: ``(y, mean, invstd)``, stats (K·C,)."""
    return spec.backend.ghost_forward_train(  # type: ignore[attr-defined]
        x, weight, bias, spec.eps, spec.sizes, spec.running_mean, spec.running_var,
        spec.momentum, spec.num_batches_tracked, spec.num_batches_skipped,
    )


class _GhostTrain(torch.autograd.Function):
    """Ghost batch norm through a backend's ghost kernels (training).

    Forward: one pass structure per channel (channel-major) or row part (channel-minor)
    with per-chunk statistics, and the running update from the whole batch. Backward:
    the batch-norm backward per chunk in one kernel. Under ``create_graph`` the
    backward is :func:`batchnorm._reference.differentiable_backward` per chunk, so
    double backward works.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: _GhostSpec
    ) -> Tensor:
        y, mean, invstd = _ghost_forward_train(x, weight, bias, spec)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.spec = spec
        ctx.bias_dtype = None if bias is None else bias.dtype
        if spec.stats_out is not None:
            spec.stats_out.extend((mean, invstd))
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        spec: _GhostSpec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: each chunk's backward from differentiable ops.
            # (mean is (K·C,): chunk j's means are its j-th C values)
            parts = [
                differentiable_backward(dy_j, x_j, weight, spec.eps, mean_j)
                for dy_j, x_j, mean_j in zip(
                    dy.split(spec.sizes), x.split(spec.sizes), mean.split(x.shape[1])
                )
            ]
            dx = torch.cat([p[0] for p in parts])
            dweight = torch.stack([p[1] for p in parts]).sum(0)
            dbias = torch.stack([p[2] for p in parts]).sum(0)
        else:
            dx, dweight, dbias = spec.backend.ghost_backward_train(  # type: ignore[attr-defined]
                dy.contiguous(memory_format=_memory_format(x)), x, weight, mean, invstd,
                spec.sizes,
            )
        return (
            dx if need_x else None,
            as_dtype(dweight, weight.dtype) if need_w else None,
            as_dtype(dbias, ctx.bias_dtype) if need_b else None,
            None,
        )


class _GhostBatchNorm(_BatchNormBase):
    """Ghost batch norm for any input rank; the public classes add the dim check."""

    _not_scriptable = (
        "its chunks are normalized through Python; torch.jit.trace, torch.compile and "
        "torch.export run it as plain torch ops"
    )
    virtual_batch_size: int

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
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
        check_positive_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, check_finite=check_finite,
        )
        self.virtual_batch_size = int(virtual_batch_size)

    @names_its_errors
    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        self._check_input_dim(input)
        self._check_num_channels(input)
        # One chunk (or eval with running statistics) is exactly batch norm: same path.
        if not self._uses_batch_stats() or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)
        return self._ghost_forward(input)

    def _ghost_forward(self, input: Tensor) -> Tensor:
        F.check_training_eps(type(self).__name__, self.eps)
        # int(): under torch.jit.trace sizes are 0-dim tensors; the chunking is fixed
        # by the traced shape anyway.
        n = int(input.shape[0])
        v = self.virtual_batch_size
        per_example = int(input.numel()) // (n * int(input.shape[1]))  # per channel and example
        if v * per_example < 2:
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size={v} leaves one value per channel "
                f"in each virtual batch of input {tuple(input.shape)}; its variance is 0, so "
                "it cannot be normalized (use virtual_batch_size >= 2)"
            )
        num_equal, tail = divmod(n, v)
        if tail and tail * per_example < 2:
            # A last chunk of one value per channel cannot be normalized on its own:
            # it joins the previous chunk, which then has v + tail examples.
            num_equal, tail = num_equal - 1, v + tail
        sizes = [v] * num_equal + ([tail] if tail else [])
        if records_ops(input):
            # (torch.compile traces the fused or chunked path below, and runs what it
            # cannot trace eagerly; only the recorders need plain ops here.)
            if self.backend not in ("auto", "reference"):
                check_recordable(self.backend, input)
            return self._traceable_forward(input, sizes, per_example)
        buffers = self._buffers
        backend = select_backend(
            self.backend, input, *self._affine(), buffers["running_mean"],
            buffers["running_var"],
        )
        if hasattr(backend, "ghost_forward_train"):
            return self._fused_forward(input, tuple(sizes), backend)

        outputs: list[Tensor] = []
        means: list[Tensor] = []
        variances: list[Tensor] = []
        chunk_values = v * input.shape[1] * per_example
        if num_equal > 1 and chunk_values < _LOOP_MIN_VALUES:
            # Many small chunks: one vectorized call (chunks as channels).
            parts = input.split([num_equal * v, tail]) if tail else (input,)
            y, mean, var = self._equal_chunks(parts[0], num_equal)
            outputs.append(y)
            means.append(mean)
            variances.append(var)
            rest = list(parts[1:])
        else:
            rest = list(input.split(sizes))
        for chunk in rest:
            y, mean, var = batch_norm_with_stats(
                chunk, self.weight, self.bias, self.eps, self.backend
            )
            outputs.append(y)
            means.append(mean.unsqueeze(0))
            variances.append(var.unsqueeze(0))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        self._update_from_chunks(
            input, lambda: (torch.cat(means), torch.cat(variances)),
            [size * per_example for size in sizes],
        )
        return output

    def _update_from_chunks(
        self, input: Tensor, chunk_stats: Callable[[], tuple[Tensor, Tensor]],
        counts: list[int],
    ) -> None:
        """The running-statistics update and the check_finite test of the unfused
        paths, from the whole batch's statistics merged out of the chunks' (k, C) means
        and biased variances; ``chunk_stats`` is called only when either needs them."""
        update = self.training and self.track_running_stats
        if not (update or self.check_finite):
            return
        means, variances = chunk_stats()
        mean, var = combine_stats(means, variances, counts)
        if update:
            # The guarded update skips a non-finite batch and counts it, before
            # check_finite raises: the same order as the other layers.
            assert self.running_mean is not None and self.running_var is not None
            update_running_stats(
                self.running_mean, self.running_var, mean, var, input.numel() // input.shape[1],
                self.momentum, self.num_batches_tracked, self.num_batches_skipped,
            )
        if self.check_finite and not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            raise FloatingPointError(self._non_finite_message(input))

    def _fused_forward(self, input: Tensor, sizes: tuple[int, ...], backend: Backend) -> Tensor:
        """The whole step on the backend's ghost kernels: no copies, one kernel each way."""
        x = F._dense(input)
        # Read the registries once: nn.Module's attribute lookup costs more than the
        # arithmetic of a small layer.
        weight, bias = self._affine()
        buffers = self._buffers
        update = self.training and self.track_running_stats
        spec = _GhostSpec(
            sizes, self.eps, backend, buffers["running_mean"] if update else None,
            buffers["running_var"] if update else None, self.momentum,
            buffers["num_batches_tracked"] if update else None,
            buffers["num_batches_skipped"] if update else None,
            [] if self.check_finite else None,
        )
        if torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        ):
            y = _GhostTrain.apply(x, weight, bias, spec)
        else:
            y, mean, invstd = _ghost_forward_train(x, weight, bias, spec)
            if spec.stats_out is not None:
                spec.stats_out.extend((mean, invstd))
        if spec.stats_out is not None:
            mean, invstd = spec.stats_out
            # A chunk with non-finite statistics makes the whole batch's non-finite, and
            # the kernel has then skipped the running update.
            if not bool(torch.isfinite(mean).all() & (invstd > 0).all()):
                raise FloatingPointError(self._non_finite_message(input))
        return y

    def _non_finite_message(self, input: Tensor) -> str:
        return (
            f"{type(self).__name__}: the training batch of shape {tuple(input.shape)} "
            "has non-finite statistics (NaN or Inf in the input); the running "
            "statistics were left unchanged"
        )

    def _traceable_forward(self, input: Tensor, sizes: list[int], per_example: int) -> Tensor:
        """Under torch.jit.trace, torch.func or forward-mode AD (``records_ops``): plain
        torch ops only, nothing written in place but the running statistics (which vmap and grad
        cannot transform, as with torch's layers: use track_running_stats=False there).
        Each chunk through the functional's traceable path; the statistics, when the
        update or check_finite needs them, from each chunk again, without grad."""
        weight, bias = self._affine()
        chunks = input.split(sizes)
        output = torch.cat([
            F.batch_norm(chunk, None, None, weight, bias, training=True, eps=self.eps)
            for chunk in chunks
        ])

        def chunk_stats() -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                stats = [batch_stats(chunk.detach()) for chunk in chunks]
                return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])

        self._update_from_chunks(input, chunk_stats, [size * per_example for size in sizes])
        return output

    def _equal_chunks(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize k equal chunks of ``x`` along N in one call; stats of shape (k, C).

        Chunk j's channel c becomes channel ``j·C + c`` of a (N/k, k·C, *) batch, so the
        per-chunk statistics are ordinary per-channel statistics and the whole step is
        one pass of the fast backend (with γ and β repeated k times; autograd sums their
        gradients over the chunks). The price is one layout copy on the way in and one
        on the way out (and the same two in backward).
        """
        n, c = x.shape[:2]
        v = n // k
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        if is_channels_last(x):
            # Memory is (N, *S, C): view it as (k, v·S, C) and make it (v·S, k·C).
            xm = x.movedim(1, -1)
            spatial = xm.shape[1:-1]
            rows = xm.numel() // (k * c)
            xt = _swap(xm.reshape(k, rows, c)).reshape(rows, k * c)
            yt, mean, var = batch_norm_with_stats(xt, weight, bias, self.eps, self.backend)
            y = _swap(yt.reshape(rows, k, c)).reshape(n, *spatial, c).movedim(-1, 1)
        else:
            xc = x.contiguous()
            rest = xc.shape[2:]
            per_example = xc.numel() // (n * c)
            xt = _swap(xc.reshape(k, v, c * per_example))
            xt = xt.reshape(v, k * c, *([per_example] if rest else []))
            yt, mean, var = batch_norm_with_stats(xt, weight, bias, self.eps, self.backend)
            y = _swap(yt.reshape(v, k, c * per_example)).reshape(xc.shape)
        return y, mean.view(k, c), var.view(k, c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


_DOC_COMMON = r"""

    In training, the batch is split along N into chunks of ``virtual_batch_size``
    examples and each chunk j is normalized with its own statistics, per channel over
    its m_j values:

    .. math::
        y = \frac{x - \mu_j}{\sqrt{\sigma_j^2 + \epsilon}}\,\gamma + \beta

    (biased variance; γ and β are shared by all chunks).

    * **Last chunk.** When N is not a multiple of ``virtual_batch_size``, the remaining
      examples form a smaller last chunk, normalized on its own if it holds more than
      one value per channel; otherwise (one example of an (N, C) input) it is merged
      into the previous chunk.
    * **Running statistics** are updated once per step, with the statistics of the
      whole batch — its mean and unbiased variance over all N·L values, obtained from
      the chunks' statistics by the law of total variance. That is exactly the update
      :class:`batchnorm.BatchNorm2d` makes on the same batch, so ``momentum`` means the
      same and eval mode (which normalizes with the running statistics) is plain batch
      norm.
    * ``virtual_batch_size >= N`` is plain batch norm: the same code path, so outputs,
      gradients and running statistics are identical to :class:`BatchNorm2d`'s.
    * Without running statistics (``track_running_stats=False``) eval mode also uses
      ghost-batch statistics.

    Speed: on the numba backend (float32/float64 CPU tensors) one kernel normalizes
    every chunk in each direction, with no copy: about the cost of batch norm. Other
    backends take one call per chunk of at least 2^17 values (one concatenation
    forward, one backward) and one call for many small chunks (the chunks become
    channels: two layout copies forward, two backward). The state_dict is
    BatchNormXd's: checkpoints load into and from :class:`torch.nn.BatchNorm2d`.

    Args:
        num_features: C, the number of channels.
        virtual_batch_size: examples per ghost batch. Default: 32.
        eps, momentum, affine, track_running_stats, bias, backend, check_finite: as in
            :class:`batchnorm.BatchNorm2d`.

    Raises:
        ValueError: ``virtual_batch_size`` not a positive int; wrong dims or channel
            count; chunks of one value per channel (``virtual_batch_size=1`` on (N, C)).
"""


class GhostBatchNorm1d(_GhostBatchNorm, BatchNorm1d):
    __doc__ = (
        "Ghost batch normalization over a 2D (N, C) or 3D (N, C, L) input." + _DOC_COMMON + """
    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.GhostBatchNorm1d(100, virtual_batch_size=16)
        >>> layer(torch.randn(64, 100)).shape
        torch.Size([64, 100])
    """
    )


class GhostBatchNorm2d(_GhostBatchNorm, BatchNorm2d):
    __doc__ = (
        "Ghost batch normalization over a 4D (N, C, H, W) input." + _DOC_COMMON + """
    Shape:
        Input (N, C, H, W), contiguous or channels_last; output the same.

    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.GhostBatchNorm2d(64, virtual_batch_size=8)
        >>> layer(torch.randn(32, 64, 14, 14)).shape
        torch.Size([32, 64, 14, 14])
    """
    )


class GhostBatchNorm3d(_GhostBatchNorm, BatchNorm3d):
    __doc__ = (
        "Ghost batch normalization over a 5D (N, C, D, H, W) input." + _DOC_COMMON
    )
