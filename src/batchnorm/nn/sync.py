"""Batch normalization with statistics over every process of a torch.distributed group.

In data-parallel training each process sees only its shard of the batch; plain BN
normalizes with per-shard statistics, which is a different (noisier) layer than BN on
the whole batch. :class:`SyncBatchNorm` computes the statistics of the whole global
batch instead, so N processes with batches B_1..B_N behave exactly like one process
with the concatenated batch: same outputs, same input gradients, same running
statistics, and parameter gradients whose sum over processes is the single-process
gradient.

Communication per training step and layer: one all_gather in forward (count, mean and
M2 = Σ(x − mean)² per channel from every rank, merged with Chan et al.'s parallel
formula) and one all_reduce in backward (Σdy and Σdy·x̂ per channel). The first
training forward on a group also all_gathers every rank's ``num_features`` once, so a
mismatch raises on every rank instead of hanging.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from batchnorm import _reference
from batchnorm import functional as F
from batchnorm._backends import as_dtype
from batchnorm.nn._base import _BatchNormBase, names_its_errors, non_tensor_input

__all__ = ["SyncBatchNorm"]


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_and_size(process_group: Any) -> tuple[Any, int]:
    """A SyncBatchNorm layer's process group (None: the default one) and its size, or
    (None, 1) without torch.distributed. Raises if this process is not a member."""
    if not _distributed_ready():
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if size < 1:
        raise ValueError(
            f"SyncBatchNorm: this process (global rank {dist.get_rank()}) is not a member "
            "of process_group"
        )
    return group, size


def _all_gather_rows(t: Tensor, group: Any, world_size: int) -> Tensor:
    """Every rank's 1-D ``t`` stacked into a (world_size, len(t)) tensor, rank order."""
    if dist.get_backend(group) == "gloo":
        # gloo gathers into a list of tensors (it has no single-tensor all_gather).
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty(world_size, t.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out


def merge_stats(
    count: Tensor, mean: Tensor, m2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Merge per-part statistics into those of the union (Chan, Golub & LeVeque, 1979).

    For K parts with counts n_k (K, 1), means μ_k (K, C) and sums of squared deviations
    M2_k = Σ (x − μ_k)² (K, C):

    .. math::
        n = \sum_k n_k,\qquad
        \mu = \frac{1}{n}\sum_k n_k \mu_k,\qquad
        M_2 = \sum_k M_{2,k} + \sum_k n_k (\mu_k - \mu)^2

    the K-way form of Chan et al.'s pairwise update
    M2 = M2_a + M2_b + δ² n_a n_b / n. Only deviations of part means from the overall
    mean are squared, never raw values, so it does not cancel when |μ| ≫ σ (as the
    sum-of-squares form E[x²] − E[x]² does). Empty parts (n_k = 0, μ_k = M2_k = 0)
    contribute nothing. Returns (n, μ, M2) with n of shape (1,).
    """
    total = count.sum(0)
    mean_all = (count * mean).sum(0) / total.clamp_min(1)
    m2_all = m2.sum(0) + (count * (mean - mean_all).square()).sum(0)
    return total, mean_all, m2_all


class _SyncBatchNormTrain(torch.autograd.Function):
    """y = BN(x) with statistics over all ranks; one all_gather forward, one all_reduce back."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
        momentum: float | None,
        eps: float,
        group: Any,
        world_size: int,
        stats_out: list[Tensor] | None,
    ) -> Tensor:
        C = x.shape[1]
        m = x.numel() // C
        dtype = _reference.stats_dtype(x)
        # Local (count, mean, M2). Gathered and merged in float64: the counts stay exact
        # integers and the merge loses nothing; it is 2C + 1 numbers per rank.
        if m > 0:
            # the mean as centre + offset, to twice x's digits (see centred_stats)
            centre, offset, var, _ = _reference.centred_stats(x)
            local = torch.cat([
                torch.full((1,), float(m), dtype=torch.float64, device=x.device),
                centre.double() + offset.double(),
                var.double() * m,
            ])
        else:
            local = torch.zeros(2 * C + 1, dtype=torch.float64, device=x.device)
        gathered = _all_gather_rows(local, group, world_size)  # (world, 1 + 2C)
        count, mean_k, m2_k = gathered.split([1, C, C], dim=1)
        total, mean64, m2 = merge_stats(count, mean_k, m2_k)
        var64 = m2 / total.clamp_min(1)
        mean, var = mean64.to(dtype), var64.to(dtype)
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None and running_var is not None:
            # A global batch with fewer than 2 values per channel has no unbiased
            # variance. Deciding that on the host would make it wait for the device, so
            # the variance is made NaN instead and the guarded update skips the batch
            # (and counts it in num_batches_skipped) on the device.
            var_for_update = torch.where(total > 1, var, torch.full_like(var, float("nan")))
            _reference.update_running_stats(
                running_mean, running_var, mean, var_for_update,
                total.to(dtype), momentum,  # type: ignore[arg-type]  # a device count
                num_batches_tracked, num_batches_skipped,
            )

        # about the rounded mean, with the rest of the float64 mean in the shift (the
        # backward centres on both parts too)
        dmean = (mean64 - mean).to(dtype)
        scale, shift = _reference.affine_coefficients(weight, bias, dmean, invstd)
        y = _reference.apply_affine(x, mean, scale, shift)
        ctx.save_for_backward(x, weight, mean, invstd, total.to(dtype), dmean)
        ctx.group = group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if stats_out is not None:
            # Handed out beside the graph: extra Function outputs cost time per call.
            stats_out.extend((mean, invstd))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        r"""dx_i = γ·invstd/n · (n·dy_i − Σdy − x̂_i·Σ(dy·x̂)), sums over all ranks.

        Every rank must run this (it holds a collective), even one with an empty batch
        or one whose input needs no gradient: the others wait for its sums.
        """
        x, weight, mean, invstd, total, dmean = ctx.saved_tensors
        C = x.shape[1]
        dims = _reference.reduce_dims(x)
        dys = dy.to(mean.dtype)
        # x̂ about μ = μ̃ + dmean, μ̃ the mean rounded to the stats dtype: x − μ̃ is exact
        # near the mean, so far from zero x̂ keeps its digits (about μ̃ alone it would
        # be off by dmean·invstd, ~5e-2 at 1e4 ± 1e-2).
        x_hat = _reference.normalized(
            x.to(mean.dtype) - _reference.channel_view(mean, x), dmean, invstd, x
        )
        # The local sums are this rank's dβ and dγ (DDP all-reduces those, as for any
        # parameter); their sum over ranks enters dx. An empty batch sums to zeros.
        sum_dy = dys.sum(dim=dims)
        sum_dy_xhat = (dys * x_hat).sum(dim=dims)
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        global_dy, global_dy_xhat = sums.split(C)

        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = None
        if need_x:
            n = total.clamp_min(1)
            k = invstd if weight is None else weight.to(invstd.dtype) * invstd
            dx = torch.addcmul(
                _reference.channel_view(-global_dy / n, x),
                x_hat,
                _reference.channel_view(-global_dy_xhat / n, x),
            ).add_(dys).mul_(_reference.channel_view(k, x)).to(x.dtype)
        return (
            dx,
            as_dtype(sum_dy_xhat, weight.dtype) if need_w else None,
            as_dtype(sum_dy, ctx.bias_dtype) if need_b else None,
            None, None, None, None, None, None, None, None, None,
        )


class SyncBatchNorm(_BatchNormBase):
    r"""Batch normalization over the whole batch of a data-parallel process group.

    For an input (N, C, \*) on each of the W ranks of ``process_group``, training mode
    normalizes each channel with the mean and biased variance of the *global* batch
    (the concatenation of every rank's input, m = Σ_r m_r values per channel):

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    Each rank computes its (m_r, μ_r, M2_r) with two passes, all ranks all_gather them
    and merge them with Chan et al.'s parallel formula (:func:`merge_stats`); the
    variance is never formed from sums of squares. Batch sizes may differ between
    ranks and a rank may hold an empty batch (N = 0). Every rank computes bitwise the
    same statistics, so the running estimates (updated as in
    :class:`~batchnorm.BatchNorm2d`, with the global m for the unbiased variance) stay
    identical across ranks.

    Backward: the gradient of the input needs Σdy and Σdy·x̂ over the global batch;
    they are all_reduced in one (2C,) tensor, with the global count known from forward.
    The parameter gradients returned are this rank's own sums, as for any parameter
    under data parallelism: with :class:`~torch.nn.parallel.DistributedDataParallel`
    they are averaged across ranks like every other gradient; without DDP, their sum
    over ranks is the single-process gradient on the concatenated batch.

    Falls back to plain batch normalization (:func:`batchnorm.functional.batch_norm`)
    when torch.distributed is unavailable or uninitialized, when the group has one
    rank, and in eval mode. Eval never communicates, so ranks may evaluate different
    numbers of batches; with ``track_running_stats=False`` eval normalizes with local
    batch statistics, as torch.nn.SyncBatchNorm does.

    A global batch with fewer than two values per channel (every rank empty, or one
    value in all) leaves the running estimates unchanged and is counted in
    ``num_batches_skipped``, like a non-finite batch; the single-process layer raises
    for one value instead, but here the count lives on the device and raising would
    make every rank wait for it.

    Every rank must call forward and backward of each SyncBatchNorm in the same order
    (the collectives pair up by order). The first training forward on a group checks
    that all ranks have the same ``num_features`` (one small all_gather, before any
    rank checks its own input) and raises :class:`ValueError` on every rank, listing
    each rank's value, when they differ; a rank whose first input is rejected (wrong
    rank, channel count or dtype) raises its error and the others a ValueError naming
    it. Other mismatches (a rank that skips a layer or its backward, a rank in eval mode
    while the others train) cannot be detected: the waiting ranks block until the
    process group's timeout (``init_process_group(timeout=...)``; with NCCL, also see
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING``), then raise.

    Parameters and buffers are those of :class:`torch.nn.SyncBatchNorm` (state_dict
    keys included), so checkpoints move between the two and to ``BatchNorm2d``.

    Args:
        num_features: C, the number of channels.
        eps, momentum, affine, track_running_stats: as :class:`~batchnorm.BatchNorm2d`.
        process_group: the group to synchronize over; ``None`` for the default group.
        bias, backend, check_finite: as :class:`~batchnorm.BatchNorm2d` (``backend``
            applies to the single-process fallback).

    Shape:
        Input (N, C, \*) with at least 2 dims; output the same.

    Raises:
        ValueError: fewer than 2 dims, channels not equal to ``num_features``,
            ranks disagreeing on ``num_features``, this process not in the group.
        TypeError: integer or bool input.

    Examples::

        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = bn.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> model(torch.randn(4, 3, 8, 8)).shape   # one process: plain batch norm
        torch.Size([4, 8, 6, 6])
    """

    _not_scriptable = (
        "its statistics cross processes through torch.distributed in Python; "
        "batchnorm.convert(model, \"batch\") gives plain layers, which script"
    )

    process_group: Any
    # The rank (1, 2, 3) of the BatchNormXd this layer was converted from, if any:
    # SyncBatchNorm takes any rank, and converting back needs to know which one.
    _source_dim: int | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
        check_finite: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, check_finite=check_finite,
        )
        self.process_group = process_group
        # (id of the group, its size) once all ranks were seen to agree on num_features.
        self._agreed_on: tuple[int, int] | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm: expected input of at least 2 dims (N, C, *), got "
                f"{input.dim()}D input of shape {tuple(input.shape)}"
            )

    def _group_and_size(self) -> tuple[Any, int]:
        return group_and_size(self.process_group)

    @names_its_errors
    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        if not self.training:
            return super().forward(input)  # eval never communicates
        F.check_training_eps("SyncBatchNorm", self.eps)  # the same on every rank
        group, world_size = self._group_and_size()
        if world_size == 1:
            return super().forward(input)
        problem = self._input_problem(input)
        # Ranks agree on num_features before any rank raises about its own input: a rank
        # that raised first would leave the others waiting in the gather.
        self._check_ranks_agree(group, world_size, input.device, problem)
        if problem is not None:
            raise problem
        update = self.track_running_stats
        stats: list[Tensor] | None = [] if self.check_finite else None
        y = _SyncBatchNormTrain.apply(
            input, self.weight, self.bias,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.num_batches_tracked if update else None,
            self.num_batches_skipped if update else None,
            self.momentum, self.eps, group, world_size, stats,
        )
        if stats is not None and not bool(torch.isfinite(stats[0]).all() & (stats[1] > 0).all()):
            # Every rank holds the same merged statistics, so every rank raises.
            raise FloatingPointError(
                "SyncBatchNorm: the global training batch has non-finite statistics (NaN or "
                "Inf in the input of some rank); the running statistics were left unchanged"
            )
        return y

    def _input_problem(self, input: Tensor) -> Exception | None:
        """The error this rank's input would raise (rank, channels, dtype), or None."""
        try:
            self._check_input_dim(input)
            self._check_num_channels(input)
            if not input.is_floating_point():
                raise TypeError(
                    f"SyncBatchNorm: input must be a floating-point tensor, got dtype {input.dtype}"
                )
        except (TypeError, ValueError) as err:
            return err
        return None

    def _check_ranks_agree(
        self, group: Any, world_size: int, device: torch.device, problem: Exception | None
    ) -> None:
        """All_gather (num_features, input rejected?) once per group; a mismatch raises on
        every rank.

        The statistics gather has 2C + 1 values per rank, so ranks with different C
        would call it with different sizes, which no backend reports reliably (gloo
        may hang or abort). This gather has two values per rank whatever C is, and it
        runs before any rank raises about its own input, so that every rank learns of
        the mismatch, or of a rank that rejected its first input, instead of waiting.
        Once the ranks agree it is skipped; a rank that later raises alone about its
        input leaves the others waiting until the process group's timeout.
        """
        key = (id(group), world_size)
        if self._agreed_on == key:
            return
        mine = torch.tensor([self.num_features, problem is not None], dtype=torch.long, device=device)
        rows = _all_gather_rows(mine, group, world_size).tolist()
        features = [c for c, _ in rows]
        if any(c != self.num_features for c in features):
            per_rank = ", ".join(f"rank {r}: {c}" for r, c in enumerate(features))
            raise ValueError(
                "SyncBatchNorm: every rank of the process group must have the same "
                f"num_features, got {per_rank}"
            ) from problem
        rejected = [r for r, (_, bad) in enumerate(rows) if bad]
        if rejected and problem is None:
            raise ValueError(
                f"SyncBatchNorm: rank(s) {', '.join(map(str, rejected))} rejected their input "
                "(see the error there), so no rank normalized this batch or updated statistics"
            )
        if not rejected:
            self._agreed_on = key

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every plain batch-norm layer in ``module`` by a SyncBatchNorm.

        Converts :class:`torch.nn.BatchNorm1d/2d/3d`, :class:`torch.nn.SyncBatchNorm`
        and this library's :class:`~batchnorm.BatchNorm1d/2d/3d` (exact classes: other
        variants, such as ghost or renorm layers, normalize differently and are left
        alone). The new layer shares the old one's parameters and buffers (so an
        optimizer built before keeps working) and keeps its training mode. Returns
        ``module`` itself, or the new layer when ``module`` is a batch-norm layer.
        """
        if _is_plain_batch_norm(module):
            return _to_sync(cls, module, process_group)
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module


def _is_plain_batch_norm(module: nn.Module) -> bool:
    from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

    plain = (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        BatchNorm1d, BatchNorm2d, BatchNorm3d,
    )
    return type(module) in plain


def layer_rank(module: nn.Module) -> int | None:
    """1, 2 or 3 for a batch-norm layer tied to an input rank (torch's, this package's,
    lazy and frozen BatchNormXd); for a rank-agnostic one (SyncBatchNorm) the rank it
    was converted from, remembered in ``_source_dim``; else None."""
    from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
    from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

    ranked = {
        1: (nn.BatchNorm1d, nn.LazyBatchNorm1d, BatchNorm1d, FrozenBatchNorm1d),
        2: (nn.BatchNorm2d, nn.LazyBatchNorm2d, BatchNorm2d, FrozenBatchNorm2d),
        3: (nn.BatchNorm3d, nn.LazyBatchNorm3d, BatchNorm3d, FrozenBatchNorm3d),
    }
    for dim, classes in ranked.items():
        if isinstance(module, classes):
            return dim
    source = getattr(module, "_source_dim", None)
    return source if source in (1, 2, 3) else None


def _to_sync(cls: type[SyncBatchNorm], old: Any, process_group: Any) -> SyncBatchNorm:
    has_bias = old.affine and old.bias is not None
    new = cls(
        old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
        process_group, bias=has_bias,
        backend=getattr(old, "backend", "auto"),
        check_finite=getattr(old, "check_finite", False),
    )
    if old.affine:
        new.weight = old.weight
        if has_bias:
            new.bias = old.bias
    # Statistics may outlive track_running_stats=False (switched off after training, to
    # stop updating them); eval still normalizes with them, so they come along, as
    # torch's converter brings them.
    if old.running_mean is not None:
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
        skipped = getattr(old, "num_batches_skipped", None)
        new.num_batches_skipped = (
            skipped if skipped is not None else torch.zeros_like(old.num_batches_tracked)
        )
    # The rank of the layer it replaces, so that tools.convert can give it back.
    new._source_dim = layer_rank(old)
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new
