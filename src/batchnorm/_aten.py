"""The "aten" backend: PyTorch's own batch-norm kernels for the transform, with this
package's running-statistics update.

Why a backend made of torch's kernels: below a few hundred thousand elements, and for
channel-minor layouts ((N, C) and channels_last) at any size measured, a batch norm on
the CPU costs about as much in per-call overhead as in arithmetic, and torch's kernel
plus its C++ autograd node is cheaper than any Python ``autograd.Function`` around a
faster kernel (benchmarks/bench_cpu.py: 1.4–1.9x torch's time for the numba path on
such shapes, 1.0x for this one). ``backend="auto"`` therefore sends those calls here
(:func:`batchnorm._backends.prefer_aten`); ``backend="aten"`` asks for it explicitly.

What stays ours:

* The running statistics. aten's in-place update would write a NaN batch into them;
  here aten computes the batch statistics only (``running_mean=None``), and
  :func:`batchnorm.kernels.numba_cpu._update_running` applies the guarded EMA or
  cumulative update, with the unbiased variance, and counts skipped batches, exactly
  as the other backends do.
* The batch variance for that update is recovered from aten's saved
  ``invstd = 1/sqrt(var + eps)`` as ``var = invstd⁻² − eps``, in float64. Its error is
  a relative ~1e-7 of ``var + eps`` for float32 input (float64: ~1e-16), i.e. of the
  quantity that eval uses; only channels with a variance far below ``eps`` see a
  larger *relative* error in ``var`` itself.
* Weight and bias of another dtype than the input are cast to it (a differentiable
  cast), since aten wants one dtype.

Double backward works: aten's backward is itself differentiable.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from batchnorm._backends import check_recordable, under_transform
from batchnorm.kernels.numba_cpu import (
    _counters,
    _far_from_zero,
    _running_far_from_zero,
    _update_running_from_invstd,
    _vector,
    note_running_write,
    renorm_constants,
    running_writes,
)

# eval_far_from_zero's answers: id(running_mean) -> (weak references to the two
# running tensors, the key they were computed under, the answer)
_EVAL_FAR: dict[int, tuple[Any, Any, tuple[Any, ...], bool]] = {}
_EVAL_FAR_MAX = 1024  # running_mean tensors remembered (a cache, not a record)


def _recording() -> bool:
    """Whether a tracer, exporter, compiler or torch.func transform sees this call."""
    return under_transform() or torch.compiler.is_exporting()


def eval_far_from_zero(running_mean: Tensor, running_var: Tensor, eps: float) -> bool:
    """Whether eval with these running statistics normalizes some channel more than 16
    of its standard deviations from zero (|running_mean| > 16·sqrt(running_var + eps)),
    where torch's eval kernel, x·k + (β − μ·k), rounds at the size of x·k.

    The test is a numba pass over C values (~5 µs); its answer is kept per
    running_mean tensor and reused while neither tensor changes: their versions
    (torch's in-place ops, load_state_dict), the numba kernels' write count (their
    running updates go through pointers, see numba_cpu._RUNNING_WRITES) and eps are
    the key, ~0.5 µs to check. Writes torch cannot see (numpy views) keep a stale
    answer, which only picks the less precise of two correct kernels.

    False while torch.jit.trace, torch.export, torch.compile or a torch.func transform
    records the call: it then keeps to aten's one traceable op."""
    try:
        key = (running_mean._version, running_var._version, running_writes(), eps)
    except RuntimeError:  # inference-mode tensors have no version counter: no cache
        key = None
    entry = _EVAL_FAR.get(id(running_mean))
    if (
        key is not None and entry is not None and entry[2] == key
        and entry[0]() is running_mean and entry[1]() is running_var
    ):
        return entry[3] and not _recording()
    if _recording():
        return False
    shape = (running_mean.shape[0],)
    far = bool(_running_far_from_zero(
        _vector(running_mean, shape), _vector(running_var, shape), eps
    ))
    if key is not None:
        if len(_EVAL_FAR) >= _EVAL_FAR_MAX:
            _EVAL_FAR.clear()
        _EVAL_FAR[id(running_mean)] = (weakref.ref(running_mean), weakref.ref(running_var), key, far)
    return far


def _update(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    skip_far: bool = False,
) -> bool:
    """The guarded running-statistics update from aten's (mean, invstd). With
    ``skip_far``: nothing is updated for a batch far from zero (some channel with
    |mean|·invstd > 16, see numba_cpu._far_from_zero), and True says so."""
    shape = (x.shape[1],)
    if running_mean is None or running_var is None:
        if not skip_far:
            return False
        check_recordable("aten", x, mean)  # the test is a numba kernel
        return bool(_far_from_zero(_vector(mean, shape), _vector(invstd, shape)))
    check_recordable("aten", x, mean)  # the update is a numba kernel
    note_running_write()
    return bool(_update_running_from_invstd(
        _vector(running_mean, shape), _vector(running_var, shape), _vector(mean, shape),
        _vector(invstd, shape), eps, x.numel() // x.shape[1],
        0.0 if momentum is None else momentum, momentum is None,
        *_counters(num_batches_tracked, num_batches_skipped, momentum, True), skip_far,
    ))


def _like(t: Tensor | None, x: Tensor) -> Tensor | None:
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


class _AtenBackend:
    """The :class:`batchnorm._backends.Backend` on torch's native kernels (float32 and
    float64 CPU tensors), plus ``autograd_train``: a training forward whose output
    carries aten's own autograd node, so no Python Function sits in the graph."""

    name = "aten"

    def autograd_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
        exact_far: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(y, mean, invstd)`` with y differentiable (to any order) by autograd.

        ``exact_far`` (what "auto" asks): None instead, with the running statistics
        untouched, for a batch more than 16 standard deviations from zero in some
        channel, which the caller then runs on the numba kernels: there torch's
        output rounds at the size of x·k, its backward centres on the float32 mean
        and its channels_last variance loses digits (see docs/benchmarks.md, "Output
        about the rounded mean"). Finding that out costs nothing more when the
        running statistics are updated (the same kernel looks), one small numba call
        when they are not."""
        y, mean, invstd = torch.native_batch_norm(
            x, _like(weight, x), _like(bias, x), None, None, True, 0.0, eps
        )
        if _update(
            x, mean, invstd, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, exact_far,
        ):
            return None
        return y, mean.detach(), invstd.detach()

    def renorm_autograd_train(
        self,
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
        exact_far: bool = False,
    ) -> Tensor | None:
        """Batch renorm's training output, differentiable by autograd (to any order),
        with r and d constants (see :mod:`batchnorm.nn.renorm`). ``exact_far`` (what
        "auto" asks): None instead, with nothing updated, for a batch far from zero
        (as :meth:`autograd_train`), which the caller runs on numba's fused kernels.

        With r and d fixed, ``y = γ(x̂·r + d) + β`` is batch norm with weight ``γr``
        and bias ``γd + β``. r and d come first, from this package's statistics pass
        (:func:`batchnorm.kernels.numba_cpu.renorm_constants`, which also makes the
        guarded running-statistics update); aten's batch norm then normalizes with
        those coefficients, and autograd carries ``dγ = r·Σdy·x̂ + d·Σdy``, ``dβ =
        Σdy`` through the two (C,) products. No Python Function sits in the graph: on
        small inputs its per-call cost (~15 µs each way) is most of the step.
        """
        check_recordable("aten", x, weight, bias)  # r, d and the update: a numba pass
        rd = renorm_constants(
            x, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, r_max, d_max, skip_far=exact_far,
        )
        if rd is None:
            return None
        C = x.shape[1]
        r, d = torch.from_numpy(rd[:C]), torch.from_numpy(rd[C:])
        if weight is None:
            scale = r
            shift = d if bias is None else bias + d
        else:
            scale = weight * r
            shift = weight * d if bias is None else torch.addcmul(bias, weight, d)
        return torch.native_batch_norm(
            x, _like(scale, x), _like(shift, x), None, None, True, 0.0, eps
        )[0]

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            out = self.autograd_train(
                x, weight, bias, eps, running_mean, running_var, momentum,
                num_batches_tracked, num_batches_skipped,
            )
        assert out is not None  # (only exact_far returns None)
        return out

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        # In training mode aten reads the saved invstd; eps is not used.
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy, x, _like(weight, x), None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        return dx, dweight, dbias

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        exact_far: bool = False,
    ) -> Tensor | None:
        """torch's eval kernel; with ``exact_far`` (what "auto" asks), None instead
        where the running statistics are far from zero (:func:`eval_far_from_zero`)."""
        if exact_far and eval_far_from_zero(running_mean, running_var, eps):
            return None
        return torch.batch_norm(
            x, _like(weight, x), _like(bias, x), _like(running_mean, x),
            _like(running_var, x), False, 0.0, eps, False,
        )


BACKEND = _AtenBackend()
