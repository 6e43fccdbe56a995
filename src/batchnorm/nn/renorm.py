"""Batch renormalization (Ioffe, 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models").

In training, batch norm's output depends on the batch's statistics while inference uses
the population's; with small or non-i.i.d. batches the two differ. Batch renorm corrects
the training output towards the running statistics with two per-channel factors that
are treated as constants by backprop, so training and inference compute the same
function in expectation.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from batchnorm import _reference
from batchnorm import functional as F
from batchnorm._autograd import _memory_format
from batchnorm._backends import (
    Backend,
    as_dtype,
    keeps_far_off_aten,
    prefer_aten_renorm,
    select_backend,
    under_transform,
)
from batchnorm._reference import channel_view, stats_dtype
from batchnorm.nn._base import _BatchNormBase, names_its_errors, non_tensor_input
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_schedule",
    "set_renorm_limits",
]


def _check_limits(owner: str, r_max: float, d_max: float) -> None:
    # "not (x >= bound)" also rejects NaN.
    # numbers.Real takes Python and NumPy numbers alike.
    if isinstance(r_max, bool) or not isinstance(r_max, numbers.Real) or not (r_max >= 1.0):
        raise ValueError(f"{owner}: r_max must be a number >= 1 (1 = plain batch norm), got {r_max!r}")
    if isinstance(d_max, bool) or not isinstance(d_max, numbers.Real) or not (d_max >= 0.0):
        raise ValueError(f"{owner}: d_max must be a number >= 0 (0 = plain batch norm), got {d_max!r}")


class _RenormSpec(NamedTuple):
    """The non-differentiated arguments of one training step: one argument to
    ``Function.apply`` instead of nine keeps its per-call cost down."""

    running_mean: Tensor
    running_var: Tensor
    momentum: float | None
    eps: float
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None
    r_max: float
    d_max: float
    backend: Backend


def _renorm_constants(
    mean_diff: Tensor, invstd: Tensor, sigma: Tensor, r_max: float, d_max: float
) -> tuple[Tensor, Tensor]:
    """r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), from
    ``mean_diff`` = μ_B − μ, the batch's invstd = 1/σ_B and the running σ, all from
    before the update."""
    r = (1.0 / (invstd * sigma)).clamp(1.0 / r_max, r_max)
    d = (mean_diff / sigma).clamp(-d_max, d_max)
    return r, d


def _renorm_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """The affine map of batch renorm over x̂: scale γr and shift γd + β (r and d when
    there is no γ), in r's dtype."""
    scale = r if weight is None else weight.to(r.dtype) * r
    shift = d if weight is None else weight.to(d.dtype) * d
    if bias is not None:
        shift = shift + bias.to(d.dtype)
    return scale, shift


def _renorm_constants_centred(
    centre: Tensor,
    offset: Tensor,
    invstd: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor]:
    """r and d of :func:`_renorm_constants` from :func:`batchnorm._reference.centred_stats`'
    batch mean ``centre + offset``, in invstd's dtype.

    μ_B − μ is formed as ``(centre − μ) + offset``: where the batch and running means
    are within a factor 2 of each other ``centre − μ`` is exact (Sterbenz), so d keeps
    its digits far from zero, where the mean rounded to float32 is off by up to
    ulp(μ_B)/2 (5e-4 at 1e4: d off by 0.05 for σ = 0.01). Computed in the wider of
    the statistics' and the running mean's dtypes, so no float64 is needed for a
    float32 layer (which MPS, say, does not have).
    """
    dtype = invstd.dtype
    work = torch.promote_types(dtype, running_mean.dtype)
    diff = (centre.to(work) - running_mean.to(work)) + offset.to(work)
    sigma = torch.sqrt(running_var.to(dtype) + eps)
    r, d = _renorm_constants(diff.to(dtype), invstd, sigma, r_max, d_max)
    # One stacked tensor, which the compilers' partitioner never recomputes (stack/cat
    # are not on its list of ops to recompute): it saves r and d for the backward.
    # Left to it, it recomputes r from the running variance there, which the forward
    # has updated in place by then, and γ's gradient comes out wrong.
    rd = torch.stack((r, d))
    return rd[0], rd[1]


def _renorm_centred(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch renorm's training forward in plain torch ops: the reference backend's, and
    the traceable form (torch.compile, torch.func). Returns (y, mean, invstd, r, d).

    With the batch statistics of :func:`batchnorm._reference.centred_stats` (``centred
    = x − c``, c the mean rounded to the statistics dtype, ``offset = μ_B − c``), r and
    d from them and the running statistics from before the (guarded) update, and
    ``y = γ(x̂·r + d) + β`` as one affine map about c::

        y = centred·k + (γd + β − offset·k),   k = γr·invstd

    in the statistics dtype (float32 for half-precision input), rounded once to x's
    dtype. Differentiable in x, γ and β, with r and d constants: computed from
    detached statistics (no_grad alone would leave them forward-mode tangents).
    """
    centre, offset, var, centred = _reference.centred_stats(x)
    invstd = torch.rsqrt(var + eps)
    r, d = _renorm_constants_centred(
        centre.detach(), offset.detach(), invstd.detach(), running_mean, running_var, eps,
        r_max, d_max,
    )
    mean = centre + offset
    _reference.update_from_centred_stats(
        running_mean, running_var, mean, centre, offset, var, x.numel() // x.shape[1],
        momentum, num_batches_tracked, num_batches_skipped,
    )
    folded_weight, folded_bias = _renorm_affine(weight, bias, r, d)
    scale, shift = _reference.affine_coefficients(folded_weight, folded_bias, offset, invstd)
    return _reference.apply_centred(centred, x, scale, shift), mean, invstd, r, d


class _RenormTrain(torch.autograd.Function):
    """Training-mode batch renorm on a backend; r and d are constants for backprop.

    (The aten backend does not come here: its ``renorm_autograd_train`` composes the
    same formulas in autograd's own graph, see :mod:`batchnorm._aten`.)

    Forward: on a backend with a renorm kernel (numba), r and d are folded into the
    affine coefficients, ``y = x̂·(γr) + (γd + β)``, computed in the same pass as batch
    norm's output, from the batch statistics and the running statistics from before
    the (guarded) update. The reference does the same in torch ops
    (:func:`_renorm_centred`). Elsewhere (Triton) the backend normalizes and updates
    the running statistics, and r and d come from the batch ``mean`` and ``invstd`` it
    returns (:func:`_renorm_composed`).

    Backward: with r and d constant, ``y = γ'·x̂ + β'`` with ``γ' = γr`` is batch norm,
    so the backend's backward with weight γr gives dx, ``Σ dy·x̂`` and ``Σ dy``, and
    ``dγ = r·Σ dy·x̂ + d·Σ dy``, ``dβ = Σ dy``: no pass beyond batch norm's. Under
    "auto" that backward may be aten's kernel (:func:`batchnorm._backends.
    prefer_aten_renorm`). Under ``create_graph`` the same formulas run on
    differentiable ops (double backward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, spec: _RenormSpec
    ) -> Tensor:
        backend = spec.backend
        fused = getattr(backend, "renorm_forward_train", None)
        args = (
            x, weight, bias, spec.eps, spec.running_mean, spec.running_var, spec.momentum,
            spec.num_batches_tracked, spec.num_batches_skipped, spec.r_max, spec.d_max,
        )
        if fused is not None:
            y, mean, invstd, r, d = fused(*args)
        elif backend is _reference.BACKEND:
            y, mean, invstd, r, d = _renorm_centred(*args)
        else:
            y, mean, invstd, r, d = _renorm_composed(*args, backend)
        ctx.save_for_backward(x, weight)
        # Our own (C,) tensors, never handed out, so never modified in place: kept as
        # plain attributes, which is cheaper than saved tensors' unpacking.
        ctx.stats = (mean, invstd, r, d)
        ctx.backend = backend
        ctx.eps = spec.eps
        # A backend with a renorm forward kernel has the backward too (numba's, or
        # numba's with aten's batch-norm kernel under "auto").
        ctx.fused_backward = fused is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        mean, invstd, r, d = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            # create_graph=True: differentiable ops, so second derivatives are exact.
            effective = r if weight is None else weight.to(r.dtype) * r
            dx, sum_dy_xhat, sum_dy = _reference.differentiable_backward(
                dy, x, effective, ctx.eps, mean
            )
        else:
            dy = dy.contiguous(memory_format=_memory_format(x))
            if ctx.fused_backward:
                dx, dweight, sum_dy = ctx.backend.renorm_backward_train(
                    dy, x, weight, mean, invstd, r, d
                )
                return (
                    dx if need_x else None,
                    dweight if need_w else None,
                    as_dtype(sum_dy, ctx.bias_dtype) if need_b else None,
                    None,
                )
            effective = r if weight is None else weight.to(r.dtype) * r
            dx, sum_dy_xhat, sum_dy = ctx.backend.backward_train(dy, x, effective, mean, invstd)
        dweight = r * sum_dy_xhat.to(r.dtype) + d * sum_dy.to(r.dtype) if need_w else None
        return (
            dx if need_x else None,
            None if dweight is None else as_dtype(dweight, weight.dtype),
            as_dtype(sum_dy, ctx.bias_dtype) if need_b else None,
            None,
        )


def _renorm_composed(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    r_max: float,
    d_max: float,
    backend: Backend,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch renorm's forward on a backend without a renorm kernel: the batch
    statistics (and the running update) from its ``forward_train``, then
    ``y = x̂·(γr) + (γd + β)``. Returns (y, mean, invstd, r, d).

    float32/float64 input: the backend's ``x̂`` (no affine) and one more in-place pass
    for the affine map. Half precision: x̂ rounded to float16/bfloat16 and mapped again
    would round twice, and where γd + β cancels x̂·γr the first rounding shows (bf16:
    0.05 where a correctly rounded output is off by 0.03, 28% relative near zero), so
    the output comes from the backend's ``forward_eval`` with the batch statistics
    (μ_B, σ²_B = invstd⁻² − ε) and weight γr, bias γd + β: computed in float32 and
    rounded once, one pass as the in-place one is.
    """
    dtype = stats_dtype(x)
    old_mean = running_mean.to(dtype, copy=True)
    sigma = torch.sqrt(running_var.to(dtype) + eps)
    y, mean, invstd = backend.forward_train(
        x, None, None, eps, running_mean, running_var, momentum,
        num_batches_tracked, num_batches_skipped,
    )
    r, d = _renorm_constants(mean - old_mean, invstd, sigma, r_max, d_max)
    # (a backend may return the mean in float64, Triton's does: d in the stats dtype)
    r, d = r.to(dtype), d.to(dtype)
    scale, shift = _renorm_affine(
        None if weight is None else weight.detach(), None if bias is None else bias.detach(),
        r, d,
    )
    if y.dtype == dtype:
        y = torch.addcmul(channel_view(shift, x), y, channel_view(scale, x), out=y)
    else:
        var = invstd.to(dtype).pow(-2) - eps
        y = backend.forward_eval(x, scale, shift, mean, var, eps)
    return y, mean, invstd, r, d


class _BatchRenorm(_BatchNormBase):
    """Batch renorm for any input rank; the public classes add the dim check."""

    _not_scriptable = (
        "its r and d are computed through Python; torch.jit.trace, torch.compile and "
        "torch.export run it as plain torch ops"
    )
    r_max: float
    d_max: float

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
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
        _check_limits(type(self).__name__, r_max, d_max)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, check_finite=check_finite,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)

    def set_limits(self, r_max: float, d_max: float) -> None:
        """Set the clipping limits (e.g. from :func:`renorm_schedule` every step)."""
        _check_limits(type(self).__name__, r_max, d_max)
        self.r_max = float(r_max)
        self.d_max = float(d_max)

    @names_its_errors
    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        self._check_input_dim(input)
        self._check_num_channels(input)
        plain = (
            not self.training
            or not self.track_running_stats
            # r = 1 and d = 0 for every batch: batch renorm is batch norm.
            or (self.r_max == 1.0 and self.d_max == 0.0)
            or input.numel() == 0
        )
        if plain:
            return super().forward(input)
        return self._renorm_forward(input)

    def _renorm_forward(self, input: Tensor) -> Tensor:
        if not input.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}: input must be a floating-point tensor, got dtype "
                f"{input.dtype}"
            )
        F.check_training_eps(type(self).__name__, self.eps)
        if input.numel() // input.shape[1] == 1:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when "
                f"training, got input of shape {tuple(input.shape)}"
            )
        x = F._dense(input)
        # Read the registries once: nn.Module's attribute lookup costs more than the
        # arithmetic of a small layer.
        weight, bias = self._affine()
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        assert running_mean is not None and running_var is not None
        skipped = buffers["num_batches_skipped"]
        # check_finite waits for the device anyway: read the skip counter around the step.
        skipped_before = int(skipped) if self.check_finite and skipped is not None else 0
        y = self._train_output(
            x, weight, bias, running_mean, running_var, buffers["num_batches_tracked"], skipped
        )
        if self.check_finite and skipped is not None and int(skipped) > skipped_before:
            raise FloatingPointError(
                f"{type(self).__name__}: the training batch of shape {tuple(input.shape)} has "
                "non-finite statistics (NaN or Inf in the input); the running statistics "
                "were left unchanged"
            )
        return y

    def _train_output(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        tracked: Tensor | None,
        skipped: Tensor | None,
    ) -> Tensor:
        args = (
            x, weight, bias, self.eps, running_mean, running_var, self.momentum, tracked,
            skipped, self.r_max, self.d_max,
        )
        if self.backend in ("auto", "reference") and under_transform():
            # Plain torch ops for torch.compile and torch.func (see
            # batchnorm._backends.under_transform); their autograd, with r and d
            # constant, gives batch norm's dx with weight γr, dγ = r·Σdy·x̂ + d·Σdy
            # and dβ = Σdy.
            return _renorm_centred(*args)[0]
        backend = own = select_backend(self.backend, x, weight, bias, running_mean, running_var)
        if self.backend == "auto":
            backend = prefer_aten_renorm(backend, x)
        composed = getattr(backend, "renorm_autograd_train", None)
        if composed is not None:
            # aten's batch norm with γr and γd + β: autograd's own graph, no Function.
            # When "auto" chose it, a batch far from zero comes back None (nothing
            # updated) and runs on the fused kernels it replaced, which keep its digits.
            y = composed(*args, exact_far=keeps_far_off_aten(backend, own))
            if y is not None:
                return y
            backend = own
        spec = _RenormSpec(
            running_mean, running_var, self.momentum, self.eps, tracked, skipped,
            self.r_max, self.d_max, backend,
        )
        return _RenormTrain.apply(x, weight, bias, spec)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"


_DOC_COMMON = r"""

    In training, with the batch statistics μ_B, σ_B = sqrt(σ²_B + ε) (biased variance)
    and the running ones μ, σ = sqrt(running_var + ε) from before this step:

    .. math::
        r = \mathrm{clip}\!\left(\frac{\sigma_B}{\sigma}, \frac1{r_{max}}, r_{max}\right),\quad
        d = \mathrm{clip}\!\left(\frac{\mu_B-\mu}{\sigma}, -d_{max}, d_{max}\right),\quad
        y = \gamma\left(\frac{x-\mu_B}{\sigma_B}\,r + d\right) + \beta

    where r and d are constants for backprop (stop-gradient). Without clipping,
    ``y = γ·(x − μ)/σ + β``: the inference function. The running statistics are
    updated as batch norm updates them, and eval mode is batch norm with them.
    ``r_max = 1, d_max = 0`` (and training without running statistics) is plain batch
    norm, through the same code path. The paper starts with ``r_max = 1, d_max = 0``
    and relaxes them; see :func:`renorm_schedule` and :func:`set_renorm_limits`.

    The limits are plain attributes, not state: the state_dict is BatchNormXd's, so
    checkpoints load into and from :class:`torch.nn.BatchNorm2d`.

    Args:
        num_features: C, the number of channels.
        r_max: upper clip of r (lower clip 1/r_max); >= 1. Default: 3.0.
        d_max: clip of |d|; >= 0. Default: 5.0.
        eps, momentum, affine, track_running_stats, bias, backend, check_finite: as in
            :class:`batchnorm.BatchNorm2d`.

    Raises:
        ValueError: ``r_max < 1`` or ``d_max < 0`` (or NaN); wrong dims or channels.
"""


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    __doc__ = (
        "Batch renormalization over a 2D (N, C) or 3D (N, C, L) input." + _DOC_COMMON + """
    Examples::

        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchRenorm1d(100, r_max=2.0, d_max=1.0)
        >>> layer(torch.randn(8, 100)).shape
        torch.Size([8, 100])
    """
    )


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    __doc__ = (
        "Batch renormalization over a 4D (N, C, H, W) input." + _DOC_COMMON + """
    Shape:
        Input (N, C, H, W), contiguous or channels_last; output the same.
    """
    )


class BatchRenorm3d(_BatchRenorm, BatchNorm3d):
    __doc__ = "Batch renormalization over a 5D (N, C, D, H, W) input." + _DOC_COMMON


def renorm_schedule(
    step: int,
    warmup_steps: int = 5000,
    r_ramp_steps: int = 35000,
    d_ramp_steps: int = 20000,
    r_max: float = 3.0,
    d_max: float = 5.0,
) -> tuple[float, float]:
    """The clipping limits ``(r_max, d_max)`` at training step ``step``.

    Ioffe (2017), section 4: plain batch norm (``r_max = 1, d_max = 0``) for the first
    5000 steps, then the limits are relaxed to reach ``r_max = 3`` at 40k steps and
    ``d_max = 5`` at 25k steps. Here the relaxation is linear: for ``t = step −
    warmup_steps > 0``,

        r_max(t) = 1 + (r_max − 1)·min(1, t / r_ramp_steps)
        d_max(t) = d_max·min(1, t / d_ramp_steps)

    The defaults reproduce the paper's numbers; scale the steps to your run length.
    A ramp of 0 steps jumps to the final value right after the warmup.

    Raises:
        ValueError: a negative step count, ``r_max < 1`` or ``d_max < 0``.
    """
    for name, value in (("step", step), ("warmup_steps", warmup_steps),
                        ("r_ramp_steps", r_ramp_steps), ("d_ramp_steps", d_ramp_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"renorm_schedule: {name} must be an int >= 0, got {value!r}")
    _check_limits("renorm_schedule", r_max, d_max)
    t = step - warmup_steps
    if t <= 0:
        return 1.0, 0.0
    r_frac = 1.0 if r_ramp_steps == 0 else min(1.0, t / r_ramp_steps)
    d_frac = 1.0 if d_ramp_steps == 0 else min(1.0, t / d_ramp_steps)
    return 1.0 + (float(r_max) - 1.0) * r_frac, float(d_max) * d_frac


def set_renorm_limits(model: nn.Module, r_max: float, d_max: float) -> int:
    """Set ``r_max`` and ``d_max`` of every batch-renorm layer in ``model``.

    Typical use, once per step: ``set_renorm_limits(model, *renorm_schedule(step))``.

    Returns:
        The number of layers changed.

    Raises:
        ValueError: ``r_max < 1`` or ``d_max < 0`` (nothing is changed then).
    """
    _check_limits("set_renorm_limits", r_max, d_max)
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchRenorm):
            module.set_limits(r_max, d_max)
            count += 1
    return count
