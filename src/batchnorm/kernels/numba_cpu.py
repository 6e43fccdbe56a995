"""Batch-normalization kernels for the CPU, compiled with numba; float32 and float64.

Two memory layouts cover every input the functional passes here:

* **channel-major** ``(A, C, L)``, contiguous: NCHW, (N, C, L), NCDHW with L > 1.
  One channel's values are A runs of L contiguous elements, so the work is split by
  channel across threads and each block of channels is processed start to finish by
  one thread while its data is still in cache: the statistics pass, the centred second
  pass and the output pass read the same few hundred kilobytes, which is why this
  beats three separate whole-tensor passes. (A block is one channel for large maps and
  more for small ones, so that each pass streams long stretches of memory.)
* **channel-minor** ``(M, C)``, contiguous: (N, C) inputs and channels_last tensors
  viewed as (N·H·W, C). Rows are split across threads; each thread keeps per-channel
  partial statistics for its rows (vectorized along C) and the partials are merged
  with Chan's formula.

Numerics: the variance is the *corrected two-pass* estimate. With a provisional centre
c (the first-pass mean rounded to the data dtype), q = Σ(x−c)², s = Σ(x−c):
``var = (q − s²/m)/m`` and ``mean = c + s/m``. Sums over whole channels are kept in
float64; only short inner runs accumulate in the data dtype, which lets LLVM vectorize.
fastmath allows reassociation and contraction but not "no NaN/Inf", so a non-finite
input propagates and the finite check on the statistics stays meaningful.

One forward-train kernel per layout serves the whole family, with switches rather
than separate copies of the passes:

* **chunks** (ghost batch norm): x is split along N into K chunks, each normalized
  with its own statistics in the same per-channel (or per-row-part) passes; the
  whole batch's mean and variance, merged exactly from the chunks, update the running
  statistics. Batch norm is K = 1.
* **epilogue** (BatchNormAct): ``out = act((x − c)·k + sh + residual)`` in the output pass,
  for the identity, relu, leaky ReLU and silu. Plain batch norm passes no epilogue
  array (None), and numba compiles that case apart, without the epilogue's code.
* **renorm** (batch renorm): r and d are folded into the affine coefficients.

Every output pass computes the affine map about a centre c, the mean rounded to x's
dtype (the running mean in eval): ``y = (x − c)·k + sh``, sh = β − (μ − c)·k taken in
float64. x − c is exact for x within a factor of 2 of c (Sterbenz), so y keeps float32
rounding of its own size, ~1e-7, however far from zero the data lies. The form
``x·k + (β − μ·k)`` that torch uses rounds at the size of x·k: at 1e4 ± 1e-2 (k = 100)
that is 1e6, whose float32 ulp is 0.06, off by up to 0.1 in an output of unit spread.
(Plain batch norm's channel-minor output loop keeps that form where no channel is far
from zero, which it then costs nothing in accuracy: see _uncentre.)

The backward kernels mirror them: dz = dout·act'(z) on the fly (relu and leaky ReLU
read a bool mask z > 0 that the forward's output pass writes, a byte per value where
the output would be four; silu rebuilds z), per-chunk Σdz and Σdz·(x − μ), then dx
(and the residual's gradient dz when it is needed) in the second pass.

Arguments: the host passes each dense tensor by address, a ``(data pointer, shape,
dtype witness)`` triple that the kernel views as a C-contiguous array in its first
statement (``_view``), and anything else (a strided tensor, an argument that may be
None) as a numpy view: a data pointer costs a tenth of ``Tensor.numpy()``.
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload
from torch import Tensor

from batchnorm._backends import Backend, as_dtype, channel_minor, reads_sign

# Reassociate sums (vectorization) and fuse multiply-adds, but keep NaN/Inf semantics.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_ROW_BLOCK = 256  # rows per cache-resident block in the channel-minor kernels
_MIN_WORK_PER_THREAD = 1 << 15  # elements; below this, threads cost more than they give

# numba's parallel runtime has two process-level hazards, both handled here rather than
# left to users: the "workqueue" threading layer aborts when two Python threads launch
# kernels at once (so launches are serialized by a lock), and GNU OpenMP ("omp" layer)
# aborts a forked child that launches a kernel after its parent did (so a forked child
# of such a parent reports the backend unusable and "auto" falls back to the reference).
_LAUNCH_LOCK = threading.Lock()
_FORK_UNSAFE = False


def _after_fork_in_child() -> None:
    global _FORK_UNSAFE
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel ran in the parent: the child starts clean
        return
    _FORK_UNSAFE = layer == "omp"


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """False in a forked child whose parent already started numba's OpenMP runtime."""
    return not _FORK_UNSAFE


# error_model="numpy": a float division by zero gives inf/NaN, as in torch (eps = 0
# with a zero variance), where numba's default "python" model would raise.
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, error_model="numpy")
_pjit = numba.njit(
    cache=True, fastmath=_FASTMATH, nogil=True, parallel=True, error_model="numpy"
)
# Helpers called from the kernels' loops are inlined into them by numba (not only by
# LLVM): constant arguments (from_out=True) then specialize the inlined copy, and the
# views they take stay local to the kernel, their reference counts pruned away.
_inline = numba.njit(fastmath=_FASTMATH, nogil=True, inline="always", error_model="numpy")


class _Kernel:
    """A kernel compiled twice: threaded for large inputs, single-threaded for small ones.

    Waking the thread pool costs microseconds on an idle machine and milliseconds on a
    busy one, more than a small layer takes in total, so inputs below
    ``2 * _MIN_WORK_PER_THREAD`` elements run on the calling thread.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        # A renamed copy, so the two compilations get separate on-disk cache entries.
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
        serial.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = _jit(serial)
        self.parallel = _pjit(fn)
        self.__doc__ = fn.__doc__

    def __call__(self, numel: int, *args: Any) -> Any:
        # The size test comes first: it is free, the thread-count query is not.
        threaded = numel >= 2 * _MIN_WORK_PER_THREAD and numba.get_num_threads() > 1
        return (self.parallel if threaded else self.serial)(*args)


# ----------------------------------------------------------------------------------------
# shared pieces: statistics merges, coefficients, running statistics, epilogues
# ----------------------------------------------------------------------------------------
# Activation codes: runtime arguments, so one compilation serves every activation. The
# identity, relu and leaky ReLU are one code, ``z if z > 0 else z * slope``, with the
# slope the host passes: 1 for the identity, 0 for relu.
_IDENTITY = 0
_LEAKY_RELU = 1
_SILU = 2


def _at(k, i):  # pragma: no cover
    """``k[i]`` for a per-element vector of coefficients, ``k`` itself for a scalar:
    lets one helper serve channel-major runs (one channel, scalar coefficients) and
    channel-minor rows (one coefficient per channel). Compiled code only."""
    raise NotImplementedError("_at is only called from numba-compiled code")


@overload(_at, inline="always")
def _at_overload(k, i):  # pragma: no cover
    if isinstance(k, nbtypes.Array):
        return lambda k, i: k[i]
    return lambda k, i: k


# Tensors by address. ``Tensor.numpy()`` costs ~0.8 µs a tensor and a layout view
# (transpose, reshape) as much again, about a third of a small layer's host time; a
# data pointer costs 0.06 µs. So the host passes each dense tensor as a triple
# ``(address, shape, witness)``, the witness a numpy scalar of its dtype, and the kernels
# turn it into a C-contiguous array of that shape over the same memory with _view
# (their first statement). numpy arrays (and None) pass through _view unchanged, so
# every argument may also come as an array; arguments that may be None stay arrays:
# numba compiles an ``x is None`` case apart only for an argument, not for a variable
# made from one, and a triple cannot be referenced inside a parallel loop. A triple and
# an array are different argument types, each compiled apart, so the host passes the
# stand-ins for absent tensors (a missing weight, counter or mask) as triples too, and
# every call of a configuration has one specialization.
@intrinsic
def _typed_pointer(typingctx, address, witness):  # pragma: no cover
    """The integer ``address`` as a pointer to the witness's type."""
    signature = nbtypes.CPointer(witness)(address, witness)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


def _view(a):  # pragma: no cover
    """An array over the memory of an ``(address, shape, witness)`` triple; an array
    or None itself. Compiled code only."""
    raise NotImplementedError("_view is only called from numba-compiled code")


@overload(_view, inline="always")
def _view_overload(a):  # pragma: no cover
    if isinstance(a, nbtypes.BaseTuple) and len(a) == 3 and isinstance(a[1], nbtypes.BaseTuple):
        return lambda a: numba.carray(_typed_pointer(a[0], a[2]), a[1])
    return lambda a: a


@_inline
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):  # pragma: no cover
    """Chan et al.: (mean, M2) of the union of two groups of n_a and n_b values, where
    M2 = Σ(x − mean)². Exact for n_a = 0 (returns group b unchanged)."""
    if n_a == 0:
        return mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


@_inline
def _coefficients(w, b, mu, var, eps, r_max, d_max, rm, rv, centre):  # pragma: no cover
    """One channel's ``invstd = 1/sqrt(var + eps)`` and the affine map about ``centre``
    (the mean rounded to x's dtype, see the module docstring): ``y = (x − centre)·k + sh``.

    Batch norm: ``k = w·invstd``, ``sh = b − (mu − centre)·k``. Batch renorm (``r_max >
    0``; batch norm passes 0) folds its constants into the same map, with σ = sqrt(rv +
    eps) from the running statistics (read before this step's update)::

        r = clip(σ_B/σ, 1/r_max, r_max),  d = clip((mu − rm)/σ, −d_max, d_max)
        y = w·(x̂·r + d) + b  =  (x − centre)·(w·r·invstd) + (w·d + b − (mu − centre)·w·r·invstd)

    Returns (invstd, k, sh, r, d); r = 1 and d = 0 without renorm.
    """
    invstd = 1.0 / math.sqrt(var + eps)
    if r_max > 0:
        sigma = math.sqrt(rv + eps)
        r = min(max(1.0 / (invstd * sigma), 1.0 / r_max), r_max)
        d = min(max((mu - rm) / sigma, -d_max), d_max)
        k = w * invstd * r
        return invstd, k, w * d + b - (mu - centre) * k, r, d
    k = w * invstd
    return invstd, k, b - (mu - centre) * k, 1.0, 0.0


@_inline
def _eval_coefficients(w, b, rm, rv, eps, c, out):  # pragma: no cover
    """out[0:3] = (centre, k, sh) of channel c in inference: the running mean rounded
    to out's dtype (x's), k = w/sqrt(rv + eps) and sh = b − (rm − centre)·k."""
    out[0] = rm[c]
    k = float(w[c]) / math.sqrt(float(rv[c]) + eps)
    out[1] = k
    out[2] = float(b[c]) - (float(rm[c]) - float(out[0])) * k


@_jit
def _update_running(rm, rv, mean, var, m, momentum, cumulative, tracked, skipped):  # pragma: no cover
    """The guarded EMA / cumulative update; see batchnorm._backends. mean, var: (C,)
    float64 batch statistics (biased var); tracked, skipped: 0-dim int64 counters."""
    C = rm.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
            skipped[()] += 1
            return
    f = 1.0 / (tracked[()] + 1.0) if cumulative else momentum
    correction = m / (m - 1.0)
    for c in range(C):
        rm[c] = (1.0 - f) * float(rm[c]) + f * mean[c]
        rv[c] = (1.0 - f) * float(rv[c]) + f * var[c] * correction
    tracked[()] += 1


@_jit
def _update_running_from_invstd(rm, rv, mean, invstd, eps, m, momentum, cumulative, tracked, skipped, skip_far):  # pragma: no cover
    """:func:`_update_running` from (mean, invstd = 1/sqrt(var + eps)) of any float
    dtype, as aten saves them: var = invstd⁻² − eps in float64 (a NaN or zero invstd
    gives a non-finite var, and the batch is skipped). With ``skip_far``, a batch
    with some channel far from zero (:func:`_far_from_zero`) is not applied (nor
    counted) and True comes back: the caller recomputes that batch with this
    module's kernels, whose statistics keep their digits there. Else False."""
    rm, rv, mean, invstd = _view(rm), _view(rv), _view(mean), _view(invstd)
    tracked, skipped = _view(tracked), _view(skipped)
    C = rm.shape[0]
    if skip_far and _far_from_zero(mean, invstd):
        return True
    mean64 = np.empty(C, np.float64)
    var64 = np.empty(C, np.float64)
    for c in range(C):
        mean64[c] = float(mean[c])
        s = float(invstd[c])
        # Clamped at 0: invstd⁻² − eps of a (near-)constant channel can round below
        # zero, and a negative running variance would make every later sqrt NaN.
        v = (1.0 / (s * s) if s != 0.0 else math.inf) - eps
        var64[c] = 0.0 if v < 0.0 else v  # noqa: FURB136 - max() may drop a NaN, which must stay
    _update_running(rm, rv, mean64, var64, m, momentum, cumulative, tracked, skipped)
    return False


# |mean|·invstd above which the channel-minor kernels correct for the rounding of the
# mean to x's dtype: the backward's sums (see _mean_shift; the uncorrected dγ is off by
# about δ·invstd·Σdz with δ <= |mean|·2^-24 in float32), and plain batch norm's output
# pass keeps its centre (see _uncentre); and the test by which "auto" keeps such data
# off torch's kernels (_far_from_zero). Below 16 the error is under 1e-6, the size of
# float32 rounding anyway; data at 1e4 ± 1e-2 has 1e6.
_SHIFT_MIN = 16.0


@_jit
def _running_far_from_zero(rm, rv, eps):  # pragma: no cover
    """:func:`_far_from_zero` of a mean and a (biased or running) variance:
    |rm| / sqrt(rv + eps) > _SHIFT_MIN in some channel. Eval tests its running
    statistics with it, batch renorm's statistics pass its (2, C) batch rows."""
    rm, rv = _view(rm), _view(rv)
    for c in range(rm.shape[0]):
        if abs(float(rm[c])) / math.sqrt(float(rv[c]) + eps) > _SHIFT_MIN:
            return True
    return False


# How often this module's kernels have written running statistics. They write through
# raw pointers, which torch's version counters (Tensor._version) do not see, so a cache
# keyed on versions (the aten backend's eval test, _aten.eval_far_from_zero) keys on
# this count too.
_RUNNING_WRITES = 0


def note_running_write() -> None:
    """Count a write of running statistics by a kernel (see _RUNNING_WRITES)."""
    global _RUNNING_WRITES
    _RUNNING_WRITES += 1


def running_writes() -> int:
    """The count of running-statistics writes so far (see _RUNNING_WRITES)."""
    return _RUNNING_WRITES


@_jit
def _far_from_zero(mean, invstd):  # pragma: no cover
    """True when some channel has |mean|·invstd > _SHIFT_MIN: its data sit more than
    16 standard deviations from zero, where torch's kernels (the aten backend) lose
    digits that this module's keep (the forward's x·k + (β − μ·k) rounds at the size
    of x·k; the backward centres on the float32 mean; channels_last's variance is a
    float32 sum). NaN statistics compare False: that batch is skipped anyway."""
    mean, invstd = _view(mean), _view(invstd)
    for c in range(mean.shape[0]):
        if abs(float(mean[c])) * float(invstd[c]) > _SHIFT_MIN:
            return True
    return False


# How the loops are written, all measured on 2 cores:
# * Whole 3D arrays and indices, arr[a, c, i], never a view per run: on runs as short
#   as 49 values (7x7 maps) a view per run costs a visible share. The epilogue helpers
#   are shared by the layouts: channel-major runs are x[a, c, :] of (A, C, L),
#   channel-minor rows are x[r, 0, :] of an (M, 1, C) view; a scratch run is s[0, 0, :]
#   of a (1, 1, n) array.
# * Branches on the activation, the residual and the source of act' are taken per run,
#   around specialized loops, and the loops of plain batch norm are separate: a branch
#   or a "one of two arrays" variable inside a loop keeps LLVM from vectorizing it.
# * Chunk loops run over views starting at 0 (x[bounds[j]:bounds[j+1]]): an index numba
#   knows to be non-negative skips the negative-index wraparound.
@_inline
def _affine_leaky(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, slope):  # pragma: no cover
    """y[ya, yc, :] = leaky((x[xa, xc, :] − ct)·k + sh + res[ra, rc, :]) (res only if
    has_res), leaky(z) = z if z > 0 else z·slope: NaN stays NaN; slope 1 is the identity.

    ct, k, sh: scalars (channel-major) or per-channel vectors (channel-minor), x's dtype;
    ct is the centre of the module docstring.
    """
    if has_res:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i) + res[ra, rc, i]
            y[ya, yc, i] = z if z > 0 else z * slope
    else:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i)
            y[ya, yc, i] = z if z > 0 else z * slope


@intrinsic
def _hidden_zero(typingctx, witness):  # pragma: no cover
    """The integer 0 of the float witness's width, passed through an empty inline-asm
    statement, so that the optimizer cannot see that it is 0 (a black box; the
    statement emits no instruction). See _leaky_dz for why."""
    width = witness.bitwidth
    signature = getattr(nbtypes, f"int{width}")(witness)

    def codegen(context, builder, sig, args):
        int_type = ir.IntType(width)
        fn_type = ir.FunctionType(int_type, [int_type])
        return builder.asm(fn_type, "", "=r,0", [ir.Constant(int_type, 0)], side_effect=False)

    return signature, codegen


@intrinsic
def _and_bits(typingctx, value, bits):  # pragma: no cover
    """The float ``value`` with its bit pattern ANDed with the integer ``bits`` (of the
    same width, from _hidden_zero)."""
    signature = value(value, bits)

    def codegen(context, builder, sig, args):
        v, mask = args
        int_type = ir.IntType(sig.args[0].bitwidth)
        return builder.bitcast(builder.and_(builder.bitcast(v, int_type), mask), v.type)

    return signature, codegen


@_inline
def _leaky_dz(d, on, slope, zero):  # pragma: no cover
    """dz = d·act'(z) for leaky ReLU and relu, ``on`` being z > 0: d where on, else
    d·slope, and exactly +0 for relu (slope 0), as torch's relu backward gives it: not
    d·0, which is NaN for an infinite d. ``zero`` is _hidden_zero's, for x's dtype.

    Why relu's 0 is d's bits ANDed with a hidden 0 rather than the constant: with the
    constant, the select "d if on else 0" compiles on AVX-512 to a zero-masked load
    of d, a load that waits for the mask's. On Zen 5 that made the channels_last
    backward 2.2x slower than plain batch norm's (the same loop with d·slope, or with
    this AND, runs as fast as the loop without a mask). The AND keeps d's load plain
    and gives +0 whatever d is. (The slope test is loop-invariant.)"""
    if on:
        return d
    return _and_bits(d, zero) if slope == 0 else d * slope


@_inline
def _affine_leaky_mask(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, slope, m):  # pragma: no cover
    """_affine_leaky that also writes m[ya, yc, :] = z > 0 (bool): the sign the backward
    reads act' from, one byte per value instead of the output's four."""
    if has_res:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i) + res[ra, rc, i]
            y[ya, yc, i] = z if z > 0 else z * slope
            m[ya, yc, i] = z > 0
    else:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i)
            y[ya, yc, i] = z if z > 0 else z * slope
            m[ya, yc, i] = z > 0


@_inline
def _affine_silu(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res):  # pragma: no cover
    """As _affine_leaky with silu(z) = z·sigmoid(z) = z / (1 + exp(−z)), exp in x's dtype."""
    if has_res:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i) + res[ra, rc, i]
            y[ya, yc, i] = z / (1.0 + math.exp(-z))
    else:
        for i in range(y.shape[2]):
            z = (x[xa, xc, i] - _at(ct, i)) * _at(k, i) + _at(sh, i)
            y[ya, yc, i] = z / (1.0 + math.exp(-z))


@_inline
def _affine_act(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, act, slope):  # pragma: no cover
    """y[ya, yc, :] = act((x[xa, xc, :] − ct)·k + sh + res[ra, rc, :]): the forward epilogue.
    (Two helpers, not one: dead silu code in a loop body, even behind a constant
    branch, kept the backward's rebuild of z from vectorizing.)"""
    if act == _SILU:
        _affine_silu(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res)
    else:
        _affine_leaky(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, slope)


@_inline
def _affine_act_train(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, act, slope, m, write_mask):  # pragma: no cover
    """The training forward's epilogue: _affine_act, and with ``write_mask`` (relu,
    leaky ReLU with a slope >= 0) the mask as well (_affine_leaky_mask). ``m`` is an
    array here, a dummy when unused: a None would need a copy of the caller's loop."""
    if write_mask:
        _affine_leaky_mask(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, slope, m)
    else:
        _affine_act(x, xa, xc, ct, k, sh, res, ra, rc, y, ya, yc, has_res, act, slope)


@_inline
def _grad(dout, a, c, src, sa, sc, act, slope, g):  # pragma: no cover
    """g[0, 0, :] = dout[a, c, :]·act'(z) (act != identity), z being src[sa, sc, :].

    leaky ReLU / relu: see _leaky_dz; silu:
    silu'(z) = s·(1 + z·(1 − s)) with s = sigmoid(z).
    """
    n = g.shape[2]
    if act == _SILU:
        for i in range(n):
            z = src[sa, sc, i]
            s = 1.0 / (1.0 + math.exp(-z))
            g[0, 0, i] = dout[a, c, i] * (s * (1.0 + z * (1.0 - s)))
    else:
        zero = _hidden_zero(g.dtype.type(0))
        for i in range(n):
            g[0, 0, i] = _leaky_dz(dout[a, c, i], src[sa, sc, i] > 0, slope, zero)


@_inline
def _dz(dy, x, a, c, ct, k, sh, res, has_res, act, slope, g, v):  # pragma: no cover
    """g[0, 0, :] = dz = dy·act'(z) for the run (row) at [a, c] (act != identity), z
    rebuilt into the scratch run v as (x − ct)·k + sh (+ res), as the forward computed it: for
    silu and leaky ReLU with a negative slope, whose act' needs z itself, or when no
    mask was kept. (relu and leaky ReLU with a slope >= 0 read the forward's mask
    instead: _cm_sums_masked and its kin.)"""
    one = x.dtype.type(1)  # leaky ReLU with slope 1: the identity, in x's dtype
    _affine_leaky(x, a, c, ct, k, sh, res, a, c, v, 0, 0, has_res, one)  # z
    _grad(dy, a, c, v, 0, 0, act, slope, g)


@_inline
def _store(dst, a, c, src):  # pragma: no cover
    """dst[a, c, :] = src[0, 0, :] (the residual's gradient, from the scratch run)."""
    for i in range(dst.shape[2]):
        dst[a, c, i] = src[0, 0, i]


# ----------------------------------------------------------------------------------------
# channel-major (A, C, L)
# ----------------------------------------------------------------------------------------
# Every training kernel takes ``bounds``, an int64 (K+1,) array: chunk j is
# x[bounds[j]:bounds[j+1]] along A (rows along M in the channel-minor kernels), and is
# normalized with its own statistics (ghost batch norm). Batch norm is K = 1.
#
# The channel-major kernels work on blocks of B consecutive channels (B from the host,
# see _channel_block): every pass walks the block row by row, x[a, c0:c0+B, :], which
# is one contiguous stretch of memory per row. For small maps (7x7: runs of 49 values)
# one channel at a time would be A short runs far apart, too short for the hardware
# prefetcher; a block keeps the streams long while its data stays in cache across the
# passes.
_SUM_PIECE = 256  # values summed in the data dtype before a float64 accumulation


@_inline
def _run_sum(v):  # pragma: no cover
    """Σ v for a 1-d run: pieces of _SUM_PIECE in v's dtype (full-width vectors), the
    pieces in float64 (the rounding error of a short sum at any run length)."""
    n = v.shape[0]
    total = 0.0
    for p0 in range(0, n, _SUM_PIECE):
        piece = v[p0:p0 + _SUM_PIECE]
        acc = v.dtype.type(0)
        for i in range(piece.shape[0]):
            acc += piece[i]
        total += acc
    return total


@_inline
def _run_centred_sums(v, mid):  # pragma: no cover
    """(Σ(v − mid), Σ(v − mid)²) for a 1-d run, summed as in _run_sum."""
    n = v.shape[0]
    s1 = 0.0
    s2 = 0.0
    for p0 in range(0, n, _SUM_PIECE):
        piece = v[p0:p0 + _SUM_PIECE]
        acc1 = v.dtype.type(0)
        acc2 = v.dtype.type(0)
        for i in range(piece.shape[0]):
            d = piece[i] - mid
            acc1 += d
            acc2 += d * d
        s1 += acc1
        s2 += acc2
    return s1, s2


@_inline
def _cm_block_stats(x, c0, nb, centre, sums):  # pragma: no cover
    """Mean and M2 of channels c0..c0+nb−1 over x[:, c, :], corrected two-pass (see the
    module docstring): centre[cc] receives the provisional centre in x's dtype,
    sums[0, cc] the mean and sums[1, cc] the M2 (float64)."""
    A, _, L = x.shape
    n = A * L
    sums[0, :nb] = 0.0
    for a in range(A):
        for cc in range(nb):
            sums[0, cc] += _run_sum(x[a, c0 + cc])
    for cc in range(nb):
        centre[cc] = sums[0, cc] / n
    sums[0, :nb] = 0.0
    sums[1, :nb] = 0.0
    for a in range(A):
        for cc in range(nb):
            acc1, acc2 = _run_centred_sums(x[a, c0 + cc], centre[cc])
            sums[0, cc] += acc1
            sums[1, cc] += acc2
    for cc in range(nb):
        s1 = sums[0, cc]
        sums[0, cc] = float(centre[cc]) + s1 / n
        sums[1, cc] = max(sums[1, cc] - s1 * s1 / n, 0.0)


@_Kernel
def _cm_forward_train(
    x, w, b, eps, bounds, T, B, y, mean_out, invstd_out, batch_out,
    res, has_res, act, slope, mask, write_mask, r_max, d_max, rd_out,
    rm, rv, momentum, cumulative, tracked, skipped, update,
):  # pragma: no cover
    """y = act((x − c)·k + sh + res) per chunk and channel, with the chunk's statistics.

    x, y, res: (A, C, L); w, b: (C,); bounds: (K+1,) chunk starts along A; the
    channels are split in T ranges (threads), each walked in blocks of B channels.
    mean_out, invstd_out: (K·C,), chunk j's channel c at j·C + c, stats dtype;
    batch_out: (2, C) float64, receives the whole batch's mean and biased variance
    (chunks merged exactly, Chan et al.). ``res`` None: plain batch norm; else the
    epilogue of _affine_act with ``has_res``/``act``/``slope`` (res is a same-shaped
    dummy when has_res is False); with ``write_mask`` (relu and leaky ReLU with a
    slope >= 0) also mask = z > 0, a bool (A, C, L) array (a same-typed dummy
    otherwise; unread when ``res`` is None). ``r_max > 0``: batch renorm's coefficients (see
    _coefficients), r and d written to rd_out (2·C,). With ``update``, the running
    statistics rm, rv and the counters follow the whole batch (see _update_running).
    """
    x, w, b, y, mask = _view(x), _view(w), _view(b), _view(y), _view(mask)
    rm, rv, tracked, skipped = _view(rm), _view(rv), _view(tracked), _view(skipped)
    A, C, L = x.shape
    K = bounds.shape[0] - 1
    for t in numba.prange(T):
        coef = np.empty((3, B), x.dtype)  # centre, k, sh per channel, in x's dtype
        sums = np.empty((2, B))
        for j in range(K):
            xj = x[bounds[j]:bounds[j + 1]]
            yj = y[bounds[j]:bounds[j + 1]]
            n = xj.shape[0] * L
            c_end = (t + 1) * C // T
            for c0 in range(t * C // T, c_end, B):
                nb = min(B, c_end - c0)
                _cm_block_stats(xj, c0, nb, coef[0], sums)
                for cc in range(nb):
                    c = c0 + cc
                    mu = sums[0, cc]
                    m2 = sums[1, cc]
                    coef[0, cc] = mu  # the centre: the mean rounded to x's dtype
                    invstd, k, sh, r, d = _coefficients(
                        float(w[c]), float(b[c]), mu, m2 / n, eps, r_max, d_max,
                        float(rm[c]), float(rv[c]), float(coef[0, cc]),
                    )
                    mean_out[j * C + c] = mu
                    invstd_out[j * C + c] = invstd
                    if r_max > 0:
                        rd_out[c] = r
                        rd_out[C + c] = d
                    coef[1, cc] = k
                    coef[2, cc] = sh
                    # The whole batch so far: chunks 0..j-1 hold bounds[j]·L values
                    # (none for j = 0, which the merge returns unchanged).
                    batch_out[0, c], batch_out[1, c] = _chan_merge(
                        bounds[j] * L, batch_out[0, c], batch_out[1, c], n, mu, m2
                    )
                if res is None:
                    for a in range(xj.shape[0]):
                        for cc in range(nb):
                            c = c0 + cc
                            ct = coef[0, cc]
                            kk = coef[1, cc]
                            sh = coef[2, cc]
                            for i in range(L):
                                yj[a, c, i] = (xj[a, c, i] - ct) * kk + sh
                else:
                    rj = res[bounds[j]:bounds[j + 1]]
                    mj = mask[bounds[j]:bounds[j + 1]]
                    for a in range(xj.shape[0]):
                        for cc in range(nb):
                            c = c0 + cc
                            _affine_act_train(
                                xj, a, c, coef[0, cc], coef[1, cc], coef[2, cc], rj, a, c,
                                yj, a, c, has_res, act, slope, mj, write_mask,
                            )
    for c in range(C):
        batch_out[1, c] /= A * L  # M2 -> biased variance
    if update:
        _update_running(
            rm, rv, batch_out[0], batch_out[1], A * L, momentum, cumulative, tracked, skipped
        )


@_inline
def _mean_shift(sdz, sdzx, sx, n):  # pragma: no cover
    """Σdz·(x − μ), re-centred on the data's mean, and δ.

    The loops centre x on mu, the mean rounded to x's dtype (vectorized in it), which
    is off the data's mean μ by δ = Σ(x − mu)/n: for float32 data at 1e4 ± 1e-2, δ is
    ~5e-4, 5% of a standard deviation, and dγ = Σdz·x̂ would be off by δ·invstd·Σdz
    (torch's backward has that error). With δ known, Σdz·(x − μ) = Σdz·(x − mu) −
    δ·Σdz, and the dx pass, which still reads x − mu, takes −bx·δ into cx."""
    delta = sx / n
    return sdzx - delta * sdz, delta


@_inline
def _cm_sums(dz, za, zc, x, a, c, mu):  # pragma: no cover
    """(Σdz, Σdz·(x − mu), Σ(x − mu)) along the run x[a, c, :], dz being dz[za, zc, :],
    summed as in _run_sum: pieces in x's dtype, the pieces in float64. (Whole-run
    float64 accumulators, as this loop had before, halve the vector width for float32
    data and made it 10–40 % slower than aten's backward.) The third sum measures how
    far mu, the mean rounded to x's dtype, is from the data's mean (see _mean_shift)."""
    g = dz[za, zc]
    v = x[a, c]
    n = v.shape[0]
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for p0 in range(0, n, _SUM_PIECE):
        gp = g[p0:p0 + _SUM_PIECE]
        vp = v[p0:p0 + _SUM_PIECE]
        acc1 = v.dtype.type(0)
        acc2 = v.dtype.type(0)
        acc3 = v.dtype.type(0)
        for i in range(vp.shape[0]):
            d = vp[i] - mu
            acc1 += gp[i]
            acc2 += gp[i] * d
            acc3 += d
        s1 += acc1
        s2 += acc2
        s3 += acc3
    return s1, s2, s3


@_inline
def _cm_dx(dz, za, zc, x, a, c, mu, k, bx, cx, dx):  # pragma: no cover
    """dx = k·dz + bx·(x − mu) + cx along the run x[a, c, :], dz being dz[za, zc, :]."""
    for i in range(x.shape[2]):
        dx[a, c, i] = dz[za, zc, i] * k + (x[a, c, i] - mu) * bx + cx


@_inline
def _cm_sums_masked(dy, m, x, a, c, mu, slope):  # pragma: no cover
    """_cm_sums with dz = dy·act'(z) formed in the same loop from the bool mask m = z > 0
    (relu, leaky ReLU with a slope >= 0), by _leaky_dz (see _cl_sums_masked)."""
    g = dy[a, c]
    v = x[a, c]
    mm = m[a, c]
    n = v.shape[0]
    zero = _hidden_zero(v.dtype.type(0))
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for p0 in range(0, n, _SUM_PIECE):
        gp = g[p0:p0 + _SUM_PIECE]
        vp = v[p0:p0 + _SUM_PIECE]
        mp = mm[p0:p0 + _SUM_PIECE]
        acc1 = v.dtype.type(0)
        acc2 = v.dtype.type(0)
        acc3 = v.dtype.type(0)
        for i in range(vp.shape[0]):
            dz = _leaky_dz(gp[i], mp[i], slope, zero)
            d = vp[i] - mu
            acc1 += dz
            acc2 += dz * d
            acc3 += d
        s1 += acc1
        s2 += acc2
        s3 += acc3
    return s1, s2, s3


@_inline
def _cm_dx_masked(dy, m, x, a, c, mu, slope, k, bx, cx, dx, dres, write_dres):  # pragma: no cover
    """_cm_dx with dz formed as in _cm_sums_masked; dres = dz too when write_dres."""
    zero = _hidden_zero(x.dtype.type(0))
    if write_dres:
        for i in range(x.shape[2]):
            dz = _leaky_dz(dy[a, c, i], m[a, c, i], slope, zero)
            dx[a, c, i] = dz * k + (x[a, c, i] - mu) * bx + cx
            dres[a, c, i] = dz
    else:
        for i in range(x.shape[2]):
            dz = _leaky_dz(dy[a, c, i], m[a, c, i], slope, zero)
            dx[a, c, i] = dz * k + (x[a, c, i] - mu) * bx + cx


@_Kernel
def _cm_backward_train(
    dy, x, w, b, bounds, T, B, mean, invstd, dx, dw, db,
    out, res, has_res, act, slope, from_out, dres, write_dres,
):  # pragma: no cover
    """Backward of _cm_forward_train (without renorm) per chunk and channel.

    dy, x, dx, out, res, dres: (A, C, L); w, b: (C,); mean, invstd: (K·C,);
    dw, db: (C,) outputs, Σ over chunks of Σdz·x̂ and Σdz; channels in T ranges of
    blocks of B, as in forward. With dz = dy·act'(z) (see _dz), per chunk of n values::

        dx = k·dz + bx·(x − mu) + cx,  k = w·invstd,
        bx = −k·invstd²·Σdz·(x − mu)/n,  cx = −k·Σdz/n

    and dres = dz when ``write_dres``. ``out`` None: plain batch norm, dz = dy (res,
    dres None too); else act != identity and ``out``, ``res``, ``dres`` are arrays
    (dummies where unused): ``out`` is the forward's bool mask z > 0 when
    ``from_out`` (relu, leaky ReLU with a slope >= 0). dz is recomputed in the second
    pass rather than stored: a compare (or an exp) costs less than writing and
    reading a tensor.
    """
    dy, x, w, b, dx = _view(dy), _view(x), _view(w), _view(b), _view(dx)
    mean, invstd = _view(mean), _view(invstd)
    C, L = x.shape[1], x.shape[2]
    K = bounds.shape[0] - 1
    rebuild = out is not None and not from_out  # dz from z rebuilt (see _dz)
    totals = np.zeros((2, C))  # Σdz and Σdz·x̂ over the chunks
    for t in numba.prange(T):
        coef = np.empty((5, B), x.dtype)  # mu, k, z's shift, bx, cx in x's dtype
        sums = np.empty((3, B))  # Σdz, Σdz·(x − mu), Σ(x − mu) of the block's channels
        g = np.empty((1, 1, L), x.dtype)  # scratch runs: dz, z
        v = np.empty((1, 1, L), x.dtype)
        for j in range(K):
            a0 = bounds[j]
            a1 = bounds[j + 1]
            dyj, xj, dxj = dy[a0:a1], x[a0:a1], dx[a0:a1]
            if out is not None:
                rj, dresj, mj = res[a0:a1], dres[a0:a1], out[a0:a1]
            n = xj.shape[0] * L
            c_end = (t + 1) * C // T
            for c0 in range(t * C // T, c_end, B):
                nb = min(B, c_end - c0)
                for cc in range(nb):
                    c = c0 + cc
                    k = float(w[c]) * float(invstd[j * C + c])
                    coef[0, cc] = mean[j * C + c]
                    coef[1, cc] = k
                    # z's shift about the centre coef[0], as the forward took it
                    coef[2, cc] = float(b[c]) - (float(mean[j * C + c]) - float(coef[0, cc])) * k
                    if rebuild and abs(float(mean[j * C + c])) * float(invstd[j * C + c]) > _SHIFT_MIN:
                        # The forward's shift held b − (μ − mu)·k with its float64 μ,
                        # of which the saved mean keeps only mu: far from zero that
                        # rounding δ = Σ(x − mu)/n moves z by δ·k, so it is summed
                        # first (the block's runs then stay in cache for the sums).
                        sx = 0.0
                        for a in range(xj.shape[0]):
                            sx += _run_centred_sums(xj[a, c], coef[0, cc])[0]
                        coef[2, cc] -= sx / n * k
                sums[:, :nb] = 0.0
                for a in range(xj.shape[0]):
                    for cc in range(nb):
                        c = c0 + cc
                        if out is None:
                            s1, s2, s3 = _cm_sums(dyj, a, c, xj, a, c, coef[0, cc])
                        elif from_out:
                            s1, s2, s3 = _cm_sums_masked(dyj, mj, xj, a, c, coef[0, cc], slope)
                        else:
                            _dz(dyj, xj, a, c, coef[0, cc], coef[1, cc], coef[2, cc], rj,
                                has_res, act, slope, g, v)
                            s1, s2, s3 = _cm_sums(g, 0, 0, xj, a, c, coef[0, cc])
                        sums[0, cc] += s1
                        sums[1, cc] += s2
                        sums[2, cc] += s3
                for cc in range(nb):
                    c = c0 + cc
                    r = float(invstd[j * C + c])
                    k = float(w[c]) * r
                    sdz = sums[0, cc]
                    sdzx, cx_shift = _mean_shift(sdz, sums[1, cc], sums[2, cc], n)
                    totals[0, c] += sdz
                    totals[1, c] += sdzx * r
                    coef[3, cc] = -k * r * r * sdzx / n
                    coef[4, cc] = -k * sdz / n - coef[3, cc] * cx_shift
                for a in range(xj.shape[0]):
                    for cc in range(nb):
                        c = c0 + cc
                        mu, kk, bx, cx = coef[0, cc], coef[1, cc], coef[3, cc], coef[4, cc]
                        if out is None:
                            _cm_dx(dyj, a, c, xj, a, c, mu, kk, bx, cx, dxj)
                        elif from_out:
                            _cm_dx_masked(dyj, mj, xj, a, c, mu, slope, kk, bx, cx, dxj,
                                          dresj, write_dres)
                        else:
                            _dz(dyj, xj, a, c, mu, kk, coef[2, cc], rj, has_res, act,
                                slope, g, v)
                            _cm_dx(g, 0, 0, xj, a, c, mu, kk, bx, cx, dxj)
                            if write_dres:
                                _store(dresj, a, c, g)
    for c in range(C):
        db[c] = totals[0, c]
        dw[c] = totals[1, c]


@_Kernel
def _cm_forward_eval(x, w, b, rm, rv, eps, y, res, has_res, act, slope):  # pragma: no cover
    """y = act((x − c)·scale + shift + res) over (A, C, L), c the running mean rounded
    to x's dtype; ``res`` None: the plain affine map, else the epilogue of _affine_act."""
    x, w, b, rm, rv, y = _view(x), _view(w), _view(b), _view(rm), _view(rv), _view(y)
    A, C, L = x.shape
    coef = np.empty((C, 3), x.dtype)
    for c in range(C):
        _eval_coefficients(w, b, rm, rv, eps, c, coef[c])
    # Split over the A*C contiguous runs, so that few channels still use every thread;
    # (A*C, 1, L) runs keep the inner loop a plain vectorizable stream.
    x2 = x.reshape(A * C, 1, L)
    y2 = y.reshape(A * C, 1, L)
    for row in numba.prange(A * C):
        c = row % C
        ct = coef[c, 0]
        kk = coef[c, 1]
        sh = coef[c, 2]
        if res is None:
            for i in range(L):
                y2[row, 0, i] = (x2[row, 0, i] - ct) * kk + sh
        else:
            res2 = res.reshape(A * C, 1, L)
            _affine_act(x2, row, 0, ct, kk, sh, res2, row, 0, y2, row, 0, has_res, act, slope)


# ----------------------------------------------------------------------------------------
# channel-minor (M, C)
# ----------------------------------------------------------------------------------------
def _blocks(numel: int, units: int) -> int:
    """How many blocks (threads) a kernel splits ``units`` (channels or rows) of a
    ``numel``-element input into: 1 for small inputs, else one per thread, each with
    at least _MIN_WORK_PER_THREAD elements."""
    if numel < 2 * _MIN_WORK_PER_THREAD:
        return 1
    return max(1, min(numba.get_num_threads(), numel // _MIN_WORK_PER_THREAD, units))


_BLOCK_VALUES = 1 << 15  # values per array and channel block in the channel-major kernels


def _channel_block(max_rows: int, L: int) -> int:
    """B, the channels per block of a channel-major kernel: about _BLOCK_VALUES values
    of the largest chunk (``max_rows`` runs of L), so that a block's runs form long
    streams and stay in L2 between the passes; 1 for large maps."""
    return max(1, _BLOCK_VALUES // max(1, max_rows * L))


@_inline
def _part_starts(bounds, T):  # pragma: no cover
    """(K·T + 1,) row starts of the parts: chunk j split in T near-equal parts, part
    p = j·T + t. Computed once per call: integer division is slow in the loops."""
    K = bounds.shape[0] - 1
    starts = np.empty(K * T + 1, np.int64)
    for j in range(K):
        n = bounds[j + 1] - bounds[j]
        for t in range(T):
            starts[j * T + t] = bounds[j] + t * n // T
    starts[K * T] = bounds[K]
    return starts


@_inline
def _cl_part_stats(x, part_mean, part_m2):  # pragma: no cover
    """Per-channel mean and M2 of the rows of x into part_mean, part_m2 (C,) float64.

    Blocks of _ROW_BLOCK rows are read twice while in cache (corrected two-pass, short
    sums in x's dtype, vectorized along C) and merged with Chan's formula.

    Both passes add four rows an iteration into the per-channel accumulators: one
    row at a time, every row reloads and stores each accumulator, and that chain
    through memory, not the reads, bounded the pass. On Zen 5 (2 cores; 16×64×56×56,
    32×64×32×32 and 16×256×56×56 channels_last) the four-row passes took the whole
    forward from 1.06–1.76x aten's to 0.86–1.14x, in alternating runs.
    """
    M, C = x.shape
    acc = np.empty(C, x.dtype)
    centre = np.empty(C, x.dtype)
    acc2 = np.empty(C, x.dtype)
    for s0 in range(0, M, _ROW_BLOCK):
        s1 = min(s0 + _ROW_BLOCK, M)
        nb = s1 - s0
        s4 = s0 + nb // 4 * 4  # the rows after s4 (fewer than four) one at a time
        acc[:] = 0
        for r in range(s0, s4, 4):
            for c in range(C):
                acc[c] += (x[r, c] + x[r + 1, c]) + (x[r + 2, c] + x[r + 3, c])
        for r in range(s4, s1):
            for c in range(C):
                acc[c] += x[r, c]
        for c in range(C):
            centre[c] = acc[c] / nb
        acc[:] = 0
        acc2[:] = 0
        for r in range(s0, s4, 4):
            for c in range(C):
                m = centre[c]
                d0 = x[r, c] - m
                d1 = x[r + 1, c] - m
                d2 = x[r + 2, c] - m
                d3 = x[r + 3, c] - m
                acc[c] += (d0 + d1) + (d2 + d3)
                acc2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(s4, s1):
            for c in range(C):
                d = x[r, c] - centre[c]
                acc[c] += d
                acc2[c] += d * d
        for c in range(C):
            sb = float(acc[c])
            mean_b = float(centre[c]) + sb / nb
            m2_b = max(float(acc2[c]) - sb * sb / nb, 0.0)
            part_mean[c], part_m2[c] = _chan_merge(
                s0, part_mean[c], part_m2[c], nb, mean_b, m2_b
            )


@_inline
def _uncentre(ct, kk, sh):  # pragma: no cover
    """Rewrite the centred map (x − ct)·kk + sh in place (per-channel vectors) to the
    uncentred one, ct = 0 and sh − ct·kk, for plain batch norm's channel-minor output
    pass where no channel has |centre|·invstd > _SHIFT_MIN: it then rounds within
    |centre|·invstd·2^-24 <= 1e-6 of the output's spread, and saves a subtraction and a
    coefficient stream per value (3–18% of that pass on the Intel VM)."""
    for c in range(ct.shape[0]):
        sh[c] = float(sh[c]) - float(ct[c]) * float(kk[c])
        ct[c] = 0


@_inline
def _cl_output_rows(x, y, r0, r1, ct, kk, sh, centred, res, has_res, act, slope, mask, write_mask):  # pragma: no cover
    """y[r0:r1] = act((x[r0:r1] − ct)·kk + sh + res[r0:r1]) over (M, C) rows, ct, kk and
    sh per channel; ``res`` None: the plain affine map (compiled apart, see _epilogue_args),
    without ct unless ``centred`` (see _uncentre),
    else the epilogue of _affine_act, and with ``write_mask`` also mask = z > 0
    (``mask`` None: never, as in eval). Shared by the training and eval output passes."""
    M, C = x.shape
    if res is None:
        xq, yq = x[r0:r1], y[r0:r1]
        if centred:
            for r in range(xq.shape[0]):
                for c in range(C):
                    yq[r, c] = (xq[r, c] - ct[c]) * kk[c] + sh[c]
        else:
            for r in range(xq.shape[0]):
                for c in range(C):
                    yq[r, c] = xq[r, c] * kk[c] + sh[c]
    else:  # rows as runs, for the shared helpers
        xp, yp = x.reshape(M, 1, C)[r0:r1], y.reshape(M, 1, C)[r0:r1]
        rp = res.reshape(M, 1, C)[r0:r1]
        if mask is None:  # eval
            for r in range(xp.shape[0]):
                _affine_act(xp, r, 0, ct, kk, sh, rp, r, 0, yp, r, 0, has_res, act, slope)
        else:
            # the dummy (write_mask False) has one element: never reshaped to (M, 1, C)
            mp = mask.reshape(M, 1, C)[r0:r1] if write_mask else mask.reshape(1, 1, 1)[0:1]
            for r in range(xp.shape[0]):
                _affine_act_train(
                    xp, r, 0, ct, kk, sh, rp, r, 0, yp, r, 0, has_res, act, slope, mp,
                    write_mask,
                )


@_inline
def _cl_merge_parts(starts, part_mean, part_m2, p0, p1, c):  # pragma: no cover
    """(n, mean, M2) of channel c over the row parts p0..p1−1 (rows starts[p] to
    starts[p+1]), their statistics merged with Chan's formula."""
    n = 0
    mu = 0.0
    m2 = 0.0
    for p in range(p0, p1):
        rows = starts[p + 1] - starts[p]
        mu, m2 = _chan_merge(n, mu, m2, rows, part_mean[p, c], part_m2[p, c])
        n += rows
    return n, mu, m2


@_Kernel
def _cl_forward_train(
    x, w, b, eps, bounds, T, y, mean_out, invstd_out, batch_out,
    res, has_res, act, slope, mask, write_mask, r_max, d_max, rd_out,
    rm, rv, momentum, cumulative, tracked, skipped, update,
):  # pragma: no cover
    """The channel-minor _cm_forward_train: x, y, res: (M, C); chunk j is the rows
    bounds[j]:bounds[j+1], split in T parts (K·T parts in all, over the threads); the
    other arguments as there (``res`` None: plain batch norm)."""
    x, w, b, y, mask = _view(x), _view(w), _view(b), _view(y), _view(mask)
    rm, rv, tracked, skipped = _view(rm), _view(rv), _view(tracked), _view(skipped)
    M, C = x.shape
    K = bounds.shape[0] - 1
    P = K * T
    starts = _part_starts(bounds, T)
    coef = np.empty((K, 3, C), x.dtype)  # centre, k, sh per chunk and channel
    part_mean = np.zeros((P, C))
    part_m2 = np.zeros((P, C))
    centred = np.zeros(K, np.bool_)  # chunk j has a channel far from zero (see _uncentre)
    for p in numba.prange(P):
        r0, r1 = starts[p], starts[p + 1]
        _cl_part_stats(x[r0:r1], part_mean[p], part_m2[p])
    for c in range(C):
        n_all = 0
        mean_all = 0.0
        m2_all = 0.0
        for j in range(K):
            n, mu, m2 = _cl_merge_parts(starts, part_mean, part_m2, j * T, (j + 1) * T, c)
            coef[j, 0, c] = mu  # the centre: the mean rounded to x's dtype
            invstd, k, sh, r, d = _coefficients(
                float(w[c]), float(b[c]), mu, m2 / n, eps, r_max, d_max, float(rm[c]),
                float(rv[c]), float(coef[j, 0, c]),
            )
            mean_out[j * C + c] = mu
            invstd_out[j * C + c] = invstd
            if abs(mu) * invstd > _SHIFT_MIN:
                centred[j] = True
            if r_max > 0:
                rd_out[c] = r
                rd_out[C + c] = d
            coef[j, 1, c] = k
            coef[j, 2, c] = sh
            mean_all, m2_all = _chan_merge(n_all, mean_all, m2_all, n, mu, m2)
            n_all += n
        batch_out[0, c] = mean_all
        batch_out[1, c] = m2_all / n_all
    for j in range(K):
        if res is not None:
            centred[j] = True  # (the epilogue loops cost the same either way)
        elif not centred[j]:
            _uncentre(coef[j, 0], coef[j, 1], coef[j, 2])
    for p in numba.prange(P):
        j = p // T
        r0, r1 = starts[p], starts[p + 1]
        # fresh arrays: provably apart from y, so the loop vectorizes
        _cl_output_rows(
            x, y, r0, r1, coef[j, 0].copy(), coef[j, 1].copy(), coef[j, 2].copy(),
            centred[j], res, has_res, act, slope, mask, write_mask,
        )
    if update:
        _update_running(
            rm, rv, batch_out[0], batch_out[1], M, momentum, cumulative, tracked, skipped
        )


@_inline
def _cl_sums(dz, zr, x, r, mu, acc1, acc2):  # pragma: no cover
    """acc1 += dz, acc2 += dz·(x − mu) along row r, dz being dz[zr, :] (2-d: the row
    views of the scratch runs are taken once per part, not per row).

    (The third sum of x − mu that the channel-major kernel keeps for _mean_shift is
    _cl_centred_sums, taken only for data far from zero: here the sums are
    per-channel arrays, and a third one in every call cost the kernel 5–9% at
    (4096, 64).)"""
    for c in range(x.shape[1]):
        acc1[c] += dz[zr, c]
        acc2[c] += dz[zr, c] * (x[r, c] - mu[c])


@_inline
def _cl_centred_sums(x, r0, r1, mu, acc3):  # pragma: no cover
    """acc3 += Σ(x − mu) over rows r0..r1 (just summed by _cl_sums and kin, so in
    cache): how far mu, the mean rounded to x's dtype, is from the data's mean."""
    for r in range(r0, r1):
        for c in range(x.shape[1]):
            acc3[c] += x[r, c] - mu[c]


@_inline
def _cl_part_centred_sums(x, mu, out):  # pragma: no cover
    """out += Σ(x − mu) per channel over the rows of x (M, C), in blocks of _ROW_BLOCK
    rows summed in x's dtype (as _cl_centred_sums) and added in float64."""
    acc = np.empty(x.shape[1], x.dtype)
    for s0 in range(0, x.shape[0], _ROW_BLOCK):
        acc[:] = 0
        _cl_centred_sums(x, s0, min(s0 + _ROW_BLOCK, x.shape[0]), mu, acc)
        for c in range(x.shape[1]):
            out[c] += acc[c]


@_inline
def _cl_dx(dz, zr, x, r, mu, k, bx, cx, dx):  # pragma: no cover
    """dx = k·dz + bx·(x − mu) + cx along row r (per-channel vectors), dz being
    dz[zr, :] (2-d, as in _cl_sums)."""
    for c in range(x.shape[1]):
        dx[r, c] = dz[zr, c] * k[c] + (x[r, c] - mu[c]) * bx[c] + cx[c]


@_inline
def _cl_sums_masked(dy, out, r, x, mu, slope, acc1, acc2, dres, write_dres):  # pragma: no cover
    """_cl_sums with dz = dy·act'(z) formed in the same loop from ``out``, the forward's
    bool mask z > 0 (relu, leaky ReLU with a slope >= 0), by _leaky_dz; with
    ``write_dres`` dz is also stored in dres[r, :] (the residual's gradient).

    One loop over the row, no scratch row of dz (the shared _dz): in isolation, on
    AVX-512 (Zen 4), dz staged in a scratch row from the float output ran 1.3-1.7x
    slower than this loop over the bool mask. A NaN z has a False mask."""
    zero = _hidden_zero(x.dtype.type(0))
    if write_dres:
        for c in range(x.shape[1]):
            g = _leaky_dz(dy[r, c], out[r, c], slope, zero)
            dres[r, c] = g
            acc1[c] += g
            acc2[c] += g * (x[r, c] - mu[c])
    else:
        for c in range(x.shape[1]):
            g = _leaky_dz(dy[r, c], out[r, c], slope, zero)
            acc1[c] += g
            acc2[c] += g * (x[r, c] - mu[c])


@_inline
def _cl_dx_masked(dy, out, r, x, mu, slope, k, bx, cx, dx):  # pragma: no cover
    """_cl_dx with dz formed as in _cl_sums_masked."""
    zero = _hidden_zero(x.dtype.type(0))
    for c in range(x.shape[1]):
        g = _leaky_dz(dy[r, c], out[r, c], slope, zero)
        dx[r, c] = g * k[c] + (x[r, c] - mu[c]) * bx[c] + cx[c]


@_Kernel
def _cl_backward_train(
    dy, x, w, b, bounds, T, mean, invstd, dx, dw, db,
    out, res, has_res, act, slope, from_out, dres, write_dres,
):  # pragma: no cover
    """The channel-minor _cm_backward_train: (M, C) arrays, chunks of rows as in
    _cl_forward_train; ``out`` None for plain batch norm, else as there (the bool mask
    z > 0 when ``from_out``).

    One difference: when the residual's gradient is wanted (``write_dres``), the first
    pass writes dz into it and the second pass reads it back. Here the rows come from
    memory in both passes, so that read replaces two streams, dy and the mask (or the
    recomputation of z). In the channel-major kernel, whose second pass reads from
    cache, the same change made the backward slower."""
    dy, x, w, b, dx = _view(dy), _view(x), _view(w), _view(b), _view(dx)
    mean, invstd = _view(mean), _view(invstd)
    M, C = x.shape
    K = bounds.shape[0] - 1
    P = K * T
    starts = _part_starts(bounds, T)
    coef = np.empty((K, 5, C), x.dtype)
    for j in range(K):
        for c in range(C):
            k = float(w[c]) * float(invstd[j * C + c])
            coef[j, 0, c] = mean[j * C + c]
            coef[j, 1, c] = k
            # z's shift about the centre coef[j, 0], as the forward took it
            coef[j, 2, c] = float(b[c]) - (float(mean[j * C + c]) - float(coef[j, 0, c])) * k
    # Data far from zero, relative to its spread (any chunk and channel): the rounding
    # of the mean to x's dtype shows in the sums, which are then corrected for it.
    shifted = _far_from_zero(mean, invstd)
    dy3, x3 = dy.reshape(M, 1, C), x.reshape(M, 1, C)  # rows as runs, for the helpers
    part_dy = np.zeros((P, C))
    part_dyx = np.zeros((P, C))
    part_x = np.zeros((P if shifted else 1, C))
    # Far from zero, a z rebuilt for dz (see _dz) needs the forward's shift, which held
    # b − (μ − mu)·k with its float64 μ, of which the saved mean keeps only mu: that
    # rounding δ = Σ(x − mu)/n per chunk moves z by δ·k. Then Σ(x − mu) is summed in
    # a pass of its own before the others, not beside them.
    presum = shifted and out is not None and not from_out
    if presum:
        for p in numba.prange(P):
            j = p // T
            r0, r1 = starts[p], starts[p + 1]
            _cl_part_centred_sums(x[r0:r1], coef[j, 0].copy(), part_x[p])
        for j in range(K):
            n = bounds[j + 1] - bounds[j]
            for c in range(C):
                sx = 0.0
                for p in range(j * T, (j + 1) * T):
                    sx += part_x[p, c]
                coef[j, 2, c] = float(coef[j, 2, c]) - sx / n * float(coef[j, 1, c])
    for p in numba.prange(P):
        j = p // T
        r0, r1 = starts[p], starts[p + 1]
        dyp, dy2p, xp, x3p = dy3[r0:r1], dy[r0:r1], x[r0:r1], x3[r0:r1]
        mu = coef[j, 0].copy()
        if out is not None:
            kk = coef[j, 1].copy()
            zsh = coef[j, 2].copy()
            g = np.empty((1, 1, C), x.dtype)  # scratch rows: dz, z
            v = np.empty((1, 1, C), x.dtype)
            rp, outp = res.reshape(M, 1, C)[r0:r1], out[r0:r1]
            dresp, dres2p = dres.reshape(M, 1, C)[r0:r1], dres[r0:r1]
        acc1 = np.empty(C, x.dtype)
        acc2 = np.empty(C, x.dtype)
        acc3 = np.empty(C, x.dtype)
        for s0 in range(0, xp.shape[0], _ROW_BLOCK):
            s1 = min(s0 + _ROW_BLOCK, xp.shape[0])
            acc1[:] = 0
            acc2[:] = 0
            if out is None:
                for r in range(s0, s1):
                    _cl_sums(dy2p, r, xp, r, mu, acc1, acc2)
            elif from_out:
                for r in range(s0, s1):
                    _cl_sums_masked(
                        dy2p, outp, r, xp, mu, slope, acc1, acc2, dres2p, write_dres
                    )
            else:
                g2 = g.reshape(1, C)
                for r in range(s0, s1):
                    _dz(dyp, x3p, r, 0, mu, kk, zsh, rp, has_res, act, slope, g, v)
                    if write_dres:
                        _store(dresp, r, 0, g)
                    _cl_sums(g2, 0, xp, r, mu, acc1, acc2)
            for c in range(C):
                part_dy[p, c] += acc1[c]
                part_dyx[p, c] += acc2[c]
            if shifted and not presum:
                acc3[:] = 0
                _cl_centred_sums(xp, s0, s1, mu, acc3)
                for c in range(C):
                    part_x[p, c] += acc3[c]
    for c in range(C):
        sdy_all = 0.0
        sdyx_all = 0.0
        for j in range(K):
            sdy = 0.0
            sdyx = 0.0
            sx = 0.0
            for p in range(j * T, (j + 1) * T):
                sdy += part_dy[p, c]
                sdyx += part_dyx[p, c]
                if shifted:
                    sx += part_x[p, c]
            n = bounds[j + 1] - bounds[j]
            shift = 0.0
            if shifted:
                sdyx, shift = _mean_shift(sdy, sdyx, sx, n)
            r = float(invstd[j * C + c])
            k = float(w[c]) * r
            coef[j, 3, c] = -k * r * r * sdyx / n
            coef[j, 4, c] = -k * sdy / n - coef[j, 3, c] * shift
            sdy_all += sdy
            sdyx_all += sdyx * r
        db[c] = sdy_all
        dw[c] = sdyx_all
    for p in numba.prange(P):
        j = p // T
        r0, r1 = starts[p], starts[p + 1]
        dyp, dy2p, xp, x3p, dxp = dy3[r0:r1], dy[r0:r1], x[r0:r1], x3[r0:r1], dx[r0:r1]
        mu = coef[j, 0].copy()
        kk = coef[j, 1].copy()
        bx = coef[j, 3].copy()
        cx = coef[j, 4].copy()
        if out is not None:
            zsh = coef[j, 2].copy()
            g = np.empty((1, 1, C), x.dtype)
            v = np.empty((1, 1, C), x.dtype)
            rp, outp, dres2p = res.reshape(M, 1, C)[r0:r1], out[r0:r1], dres[r0:r1]
        if out is None:
            for r in range(xp.shape[0]):
                _cl_dx(dy2p, r, xp, r, mu, kk, bx, cx, dxp)
        elif write_dres:  # dz, written by the first pass
            for r in range(xp.shape[0]):
                _cl_dx(dres2p, r, xp, r, mu, kk, bx, cx, dxp)
        elif from_out:
            for r in range(xp.shape[0]):
                _cl_dx_masked(dy2p, outp, r, xp, mu, slope, kk, bx, cx, dxp)
        else:
            g2 = g.reshape(1, C)
            for r in range(xp.shape[0]):
                _dz(dyp, x3p, r, 0, mu, kk, zsh, rp, has_res, act, slope, g, v)
                _cl_dx(g2, 0, xp, r, mu, kk, bx, cx, dxp)


@_Kernel
def _cl_forward_eval(x, w, b, rm, rv, eps, T, y, res, has_res, act, slope):  # pragma: no cover
    """y = act((x − c)·scale + shift + res) over (M, C) in T row parts; c and ``res``
    as in _cm_forward_eval."""
    x, w, b, rm, rv, y = _view(x), _view(w), _view(b), _view(rm), _view(rv), _view(y)
    M, C = x.shape
    coef = np.empty((3, C), x.dtype)  # per-channel rows: centre, k, sh
    for c in range(C):
        _eval_coefficients(w, b, rm, rv, eps, c, coef[:, c])
    # (the epilogue loops cost the same either way)
    centred = res is not None or _running_far_from_zero(rm, rv, eps)
    if not centred:
        _uncentre(coef[0], coef[1], coef[2])
    for t in numba.prange(T):
        r0 = t * M // T
        r1 = (t + 1) * M // T
        _cl_output_rows(
            x, y, r0, r1, coef[0].copy(), coef[1].copy(), coef[2].copy(), centred, res,
            has_res, act, slope, None, False,
        )


# ----------------------------------------------------------------------------------------
# batch renorm's constants alone (no output pass), for a transform done elsewhere
# ----------------------------------------------------------------------------------------
@_inline
def _renorm_constants(batch, eps, r_max, d_max, rm, rv, rd_out):  # pragma: no cover
    """rd_out[:C] = r, rd_out[C:] = d from the batch's (mean, biased var) in ``batch``
    (2, C) float64 and the running statistics from before the update (_coefficients
    with w = 1, b = 0, so the clipping is the fused kernels' own)."""
    C = rm.shape[0]
    for c in range(C):
        _, _, _, r, d = _coefficients(
            1.0, 0.0, batch[0, c], batch[1, c], eps, r_max, d_max, float(rm[c]), float(rv[c]),
            0.0,
        )
        rd_out[c] = r
        rd_out[C + c] = d


@_Kernel
def _cm_renorm_stats(
    x, T, B, eps, r_max, d_max, rd_out, batch_out, rm, rv, momentum, cumulative, tracked,
    skipped, skip_far,
):  # pragma: no cover
    """Batch renorm's r and d (rd_out, (2·C,)) and the guarded running-statistics update
    for a channel-major x (A, C, L): the statistics of _cm_forward_train (corrected
    two-pass, channels in T ranges walked in blocks of B) without its output pass.
    batch_out: (2, C) float64, receives the batch's mean and biased variance. With
    ``skip_far`` a batch far from zero (_running_far_from_zero) stops there, nothing updated, and
    True comes back (else False)."""
    x, rm, rv = _view(x), _view(rm), _view(rv)
    tracked, skipped = _view(tracked), _view(skipped)
    A, C, L = x.shape
    n = A * L
    for t in numba.prange(T):
        centre = np.empty(B, x.dtype)
        sums = np.empty((2, B))
        c_end = (t + 1) * C // T
        for c0 in range(t * C // T, c_end, B):
            nb = min(B, c_end - c0)
            _cm_block_stats(x, c0, nb, centre, sums)
            for cc in range(nb):
                batch_out[0, c0 + cc] = sums[0, cc]
                batch_out[1, c0 + cc] = sums[1, cc] / n
    if skip_far and _running_far_from_zero(batch_out[0], batch_out[1], eps):
        return True
    _renorm_constants(batch_out, eps, r_max, d_max, rm, rv, rd_out)
    _update_running(rm, rv, batch_out[0], batch_out[1], n, momentum, cumulative, tracked, skipped)
    return False


@_Kernel
def _cl_renorm_stats(
    x, T, eps, r_max, d_max, rd_out, batch_out, rm, rv, momentum, cumulative, tracked,
    skipped, skip_far,
):  # pragma: no cover
    """The channel-minor _cm_renorm_stats: x (M, C), rows in T parts merged with Chan's
    formula, as in _cl_forward_train."""
    x, rm, rv = _view(x), _view(rm), _view(rv)
    tracked, skipped = _view(tracked), _view(skipped)
    M, C = x.shape
    bounds = np.zeros(2, np.int64)
    bounds[1] = M
    starts = _part_starts(bounds, T)
    part_mean = np.zeros((T, C))
    part_m2 = np.zeros((T, C))
    for p in numba.prange(T):
        _cl_part_stats(x[starts[p]:starts[p + 1]], part_mean[p], part_m2[p])
    for c in range(C):
        _, mu, m2 = _cl_merge_parts(starts, part_mean, part_m2, 0, T, c)
        batch_out[0, c] = mu
        batch_out[1, c] = m2 / M
    if skip_far and _running_far_from_zero(batch_out[0], batch_out[1], eps):
        return True
    _renorm_constants(batch_out, eps, r_max, d_max, rm, rv, rd_out)
    _update_running(rm, rv, batch_out[0], batch_out[1], M, momentum, cumulative, tracked, skipped)
    return False


# ----------------------------------------------------------------------------------------
# host side: tensors in, tensors out
# ----------------------------------------------------------------------------------------
def _layout(x: Tensor) -> tuple[str, tuple[int, ...]]:
    """("minor", (M, C)) or ("major", (A, C, L)): how ``x``'s memory is viewed."""
    C = x.shape[1]
    if channel_minor(x):
        return "minor", (x.numel() // C, C)
    spatial = x.numel() // (x.shape[0] * C) if x.shape[0] else 0
    return "major", (x.shape[0], C, spatial)


class _Plan(NamedTuple):
    """How a training kernel runs on an input: everything the host derives from x's
    shape and strides and the chunk sizes, computed once per distinct call."""

    layout: str  # "major" or "minor"
    shape: tuple[int, ...]  # (A, C, L) or (M, C)
    bounds: np.ndarray  # chunk starts along A or M, int64 (K+1,)
    T: int  # channel ranges (major) or row parts per chunk (minor)
    B: int  # channels per block (major); 0 for minor
    by_address: bool  # x (and tensors of its shape and strides) can go by address


_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLANS_MAX = 256  # distinct calls remembered (a cache, not a record)


def _plan(x: Tensor, sizes: tuple[int, ...] | None) -> _Plan:
    """The cached :class:`_Plan` for ``x`` split along N into chunks of ``sizes``
    examples (None: one chunk). The host arithmetic and layout tests cost several
    microseconds a call, a large share of a small layer's time. The thread count is
    part of the key only where it matters (inputs large enough to be threaded); the
    dtype is, since whether x can go by address depends on it."""
    numel = x.numel()
    threads = numba.get_num_threads() if numel >= 2 * _MIN_WORK_PER_THREAD else 1
    key = (x.shape, x.stride(), x.dtype, sizes, threads)
    plan = _PLANS.get(key)
    if plan is None:
        layout, shape = _layout(x)
        C = x.shape[1]
        per = shape[0] // x.shape[0]  # rows (A or M) per example
        counts = sizes or (x.shape[0],)
        bounds = _bounds(sizes or x.shape[0], per)
        if layout == "major":
            T, B = _blocks(numel, C), _channel_block(max(counts) * per, shape[2])
        else:
            T, B = _parts_per_chunk(shape[0], C, len(counts), min(counts) * per), 0
        # Dense in the layout's order (raises otherwise, as every call did before).
        by_address = x.dtype in _WITNESSES and _as_array(x, layout, shape).flags.c_contiguous
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(layout, shape, bounds, T, B, by_address)
    return plan


def _as_array(t: Tensor, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of ``t``'s memory in the layout's shape, never a copy (outputs are
    written through it). The axes are moved on the numpy side: a numpy transpose or
    reshape costs a fraction of a microsecond, torch's several."""
    a = t.numpy(force=True)
    if layout == "minor" and a.ndim > 2:
        # channels_last memory is (N, *spatial, C): C last gives a contiguous order.
        a = a.transpose(0, *range(2, a.ndim), 1)
    if a.shape != shape:
        a = a.reshape(shape)
        if a.flags.owndata:  # numpy copied: t was not dense in the layout's order
            raise RuntimeError(
                f"internal error: a tensor of shape {tuple(t.shape)} and strides "
                f"{t.stride()} has no {shape} view"
            )
    return a


# The dtypes a tensor can go by address in (see _view), with their witnesses.
_WITNESSES = {
    torch.float32: np.float32(0), torch.float64: np.float64(0),
    torch.int64: np.int64(0), torch.bool: np.bool_(False),
}
_NP_DTYPES = {
    torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
}


def _address(t: Tensor, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], Any]:
    """``t`` as a kernel argument by address: the kernel sees a C-contiguous array of
    ``shape`` over t's memory. The caller guarantees that t is dense in that order,
    that its dtype has a witness, and that t stays referenced until the kernel
    returns (a temporary's memory would be freed under the kernel)."""
    return (t.data_ptr(), shape, _WITNESSES[t.dtype])


def _input(x: Tensor, plan: _Plan) -> Any:
    """The input x as a kernel argument: by address when it is dense in the layout's
    order (every input the functional passes), else as an array view. A tensor with
    torch's lazy negation bit (``torch._neg_view``) goes as an array: its memory holds
    the values unnegated, and ``numpy(force=True)`` resolves the bit."""
    if plan.by_address and not x.is_neg():
        return _address(x, plan.shape)
    return _as_array(x, plan.layout, plan.shape)


def _like_x(t: Tensor, x: Tensor, plan: _Plan) -> Any:
    """A tensor of x's shape (dy) as a kernel argument: by address when it has x's
    strides too (so it is as dense as x), else as an array view (also with a negation
    bit, see _input)."""
    if (
        plan.by_address and t.stride() == x.stride() and t.shape == x.shape
        and t.dtype in _WITNESSES and not t.is_neg()
    ):
        return (t.data_ptr(), plan.shape, _WITNESSES[t.dtype])
    return _as_array(t, plan.layout, plan.shape)


def _empty_like(x: Tensor, plan: _Plan, boolean: bool = False) -> tuple[Tensor, Any]:
    """An uninitialized tensor with ``x``'s shape, dtype (bool with ``boolean``) and
    memory format (empty_like keeps a dense x's strides), and it as a kernel argument."""
    out = torch.empty_like(x, dtype=torch.bool) if boolean else torch.empty_like(x)
    if plan.by_address:
        return out, (out.data_ptr(), plan.shape, _WITNESSES[out.dtype])
    return out, _as_array(out, plan.layout, plan.shape)


def _vector(t: Tensor, shape: tuple[int, ...]) -> Any:
    """A (C,) or 0-dim tensor (parameters, statistics, counters) of this ``shape`` as a
    kernel argument: by address when contiguous, else as an array. (Module state and
    the kernels' own outputs: no negation bit to check, unlike inputs, see _input.)"""
    if t.dtype in _WITNESSES and t.shape == shape and t.is_contiguous():
        return (t.data_ptr(), shape, _WITNESSES[t.dtype])
    return t.numpy(force=True)


def _array_address(a: np.ndarray) -> Any:
    """A numpy array as a kernel argument: by address when C-contiguous (the caller
    keeps ``a`` alive until the kernel returns), else the array itself."""
    if not a.flags.c_contiguous:
        return a
    return (a.ctypes.data, a.shape, a.dtype.type(0))


# Stand-ins for the mask where none is written (write_mask False): bool arrays of the
# layouts' ranks, so every call has one mask type and one specialization; by address
# in the forward (module constants: always alive), as arrays in the backward (whose
# mask may be None).
_NO_MASK = {"major": np.zeros((1, 1, 1), np.bool_), "minor": np.zeros((1, 1), np.bool_)}
_NO_MASK_ARGS = {layout: _array_address(a) for layout, a in _NO_MASK.items()}

# The counter passed where a caller has none: written (incremented) by the kernels,
# never read, as _counters guarantees.
_SINK_COUNTER = np.zeros((), np.int64)
_SINK_COUNTER_ARG = _array_address(_SINK_COUNTER)

_FILLS: dict[tuple[int, float, np.dtype], tuple[np.ndarray, Any]] = {}


def _vec(t: Tensor | np.ndarray | None, fill: float, num_channels: int, dtype: np.dtype) -> Any:
    """``t`` as a kernel argument, or a cached constant vector of x's ``dtype`` when
    ``t`` is None, by address like a parameter of that dtype, so that numba compiles
    one specialization for both (the cache keeps it alive). An array passes as it is
    (batch renorm's effective weight γ·r: its own specialization, since a numpy
    array's address costs ~1 µs, more than the array)."""
    if isinstance(t, np.ndarray):
        return t
    if t is not None:
        return _vector(t, (num_channels,))
    key = (num_channels, fill, dtype)
    cached = _FILLS.get(key)
    if cached is None:
        array = np.full(num_channels, fill, dtype=dtype)
        cached = _FILLS[key] = (array, _array_address(array))
    return cached[1]


def _counters(
    tracked: Tensor | None, skipped: Tensor | None, momentum: float | None, update: bool
) -> tuple[Any, Any]:
    """The 0-dim int64 counters as kernel arguments; a missing one is the shared sink,
    which the kernels only increment. ``tracked`` is read for the cumulative average
    (momentum None), so that update needs it."""
    if update and momentum is None and tracked is None:
        raise ValueError(
            "the cumulative running average (momentum=None) needs num_batches_tracked"
        )
    return (
        _SINK_COUNTER_ARG if tracked is None else _vector(tracked, ()),
        _SINK_COUNTER_ARG if skipped is None else _vector(skipped, ()),
    )


_BOUNDS: dict[tuple[tuple[int, ...] | int, int], np.ndarray] = {}
_BOUNDS_MAX = 256  # distinct batch shapes remembered (a cache, not a record)


def _bounds(sizes: tuple[int, ...] | int, rows_per_example: int) -> np.ndarray:
    """The kernels' ``bounds``: chunk starts along A or M, int64 (K+1,), cached.

    ``sizes`` is the chunks' sizes in examples, or N alone for one chunk (batch norm).
    """
    key = (sizes, rows_per_example)
    bounds = _BOUNDS.get(key)
    if bounds is None:
        counts = (sizes,) if isinstance(sizes, int) else sizes
        bounds = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        bounds *= rows_per_example
        if len(_BOUNDS) >= _BOUNDS_MAX:
            _BOUNDS.clear()
        _BOUNDS[key] = bounds
    return bounds


def _parts_per_chunk(M: int, C: int, K: int, min_rows: int) -> int:
    """T, the row parts per chunk of a channel-minor kernel over K chunks, the smallest
    of ``min_rows`` rows: about one part per thread over all chunks, and never an
    empty part."""
    parts = _blocks(M * C, M)
    if K == 1:
        return parts
    if parts <= K:
        return 1
    return max(1, min(-(-parts // K), min_rows))


_ACT_CODES = {"identity": _IDENTITY, "relu": _LEAKY_RELU, "leaky_relu": _LEAKY_RELU,
              "silu": _SILU}
_ACT_ARGS: dict[tuple[str, float, np.dtype], tuple[int, Any]] = {}


def _act_args(activation: str, negative_slope: float, dtype: np.dtype) -> tuple[int, Any]:
    """(code, slope) for the kernels, cached: the identity is leaky ReLU with slope 1,
    relu with slope 0; the slope comes in x's dtype so that ``z * slope`` stays in it."""
    key = (activation, negative_slope, dtype)
    args = _ACT_ARGS.get(key)
    if args is None:
        if activation not in _ACT_CODES:
            raise ValueError(
                f"activation must be one of {tuple(_ACT_CODES)}, got {activation!r}"
            )
        slope = {"identity": 1.0, "relu": 0.0}.get(activation, negative_slope)
        args = _ACT_ARGS[key] = (_ACT_CODES[activation], dtype.type(slope))
    return args


def _epilogue_args(
    x: Tensor, residual: Tensor | None, activation: str, negative_slope: float, plan: _Plan
) -> tuple[np.ndarray | None, int, Any]:
    """The forward kernels' ``(res, act, slope)``. ``res`` is None for plain batch norm
    (the identity without a residual), which numba compiles apart, without the
    epilogue's code; else the residual's array, or x's as a stand-in when there is
    none (has_res is False). An array, not by address: it may be None (see _view)."""
    if residual is None and activation == "identity":
        return None, _IDENTITY, 1.0
    code, slope = _act_args(activation, negative_slope, _NP_DTYPES[x.dtype])
    res = _as_array(x if residual is None else residual, plan.layout, plan.shape)
    return res, code, slope


def _forward_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    sizes: tuple[int, ...] | None = None,
    residual: Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.0,
    limits: tuple[float, float] | None = None,
    write_mask: bool = True,
) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray | None, Tensor | None]:
    """Every training forward: ghost chunks (``sizes`` along N; None: one chunk),
    ``act(BN(x) + residual)``, and batch renorm's (r_max, d_max) ``limits``.

    Returns ``(y, mean, invstd, rd, mask)``: the (K·C,) chunk statistics, for renorm
    (2·C,) r then d (else None), and for relu and leaky ReLU with a slope >= 0 the
    bool tensor z > 0 (x's shape and memory format) that their backward reads act'
    from (else, or without ``write_mask``, None).
    """
    C = x.shape[1]
    numel = x.numel()
    plan = _plan(x, sizes)
    layout, bounds, T = plan.layout, plan.bounds, plan.T
    xa = _input(x, plan)
    y, ya = _empty_like(x, plan)
    KC = (len(bounds) - 1) * C
    dtype = _NP_DTYPES[x.dtype]
    # The kernels' own outputs are numpy arrays, in every call (one argument type).
    mean, invstd = np.empty(KC, dtype=dtype), np.empty(KC, dtype=dtype)
    batch = np.empty((2, C), dtype=np.float64)
    w, b = _vec(weight, 1.0, C, dtype), _vec(bias, 0.0, C, dtype)
    update = running_mean is not None and running_var is not None
    if update:
        rm, rv = _vector(running_mean, (C,)), _vector(running_var, (C,))  # type: ignore[arg-type]
    else:
        # Stand-ins of a parameter's type (one specialization): never written (update
        # is False) nor read (no renorm without running statistics).
        rm = rv = w
    if limits is None:
        rd, r_max, d_max = None, 0.0, 0.0  # r_max = 0: no renorm
    else:
        rd, (r_max, d_max) = np.empty(2 * C, dtype=dtype), limits
    res, code, slope = _epilogue_args(x, residual, activation, negative_slope, plan)
    if write_mask and reads_sign(activation, negative_slope):
        mask, ma = _empty_like(x, plan, boolean=True)
    else:
        mask, ma = None, _NO_MASK_ARGS[layout]
    args = (
        ya, mean, invstd, batch, res, residual is not None, code, slope, ma,
        mask is not None, r_max, d_max,
        mean if rd is None else rd,  # a same-typed stand-in, never written
        rm, rv,
        0.0 if momentum is None else momentum, momentum is None,
        *_counters(num_batches_tracked, num_batches_skipped, momentum, update), update,
    )
    if update:
        note_running_write()
    with _LAUNCH_LOCK:
        if layout == "major":
            _cm_forward_train(numel, xa, w, b, eps, bounds, T, plan.B, *args)
        else:
            _cl_forward_train(numel, xa, w, b, eps, bounds, T, *args)
    return y, mean, invstd, rd, mask


def renorm_constants(
    x: Tensor,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    r_max: float,
    d_max: float,
    skip_far: bool = False,
) -> np.ndarray | None:
    """Batch renorm's constants for a training batch ``x`` without normalizing it:
    ``rd`` (2·C,) in x's dtype, r then d (see _coefficients), from this package's
    corrected two-pass statistics and the running statistics from before the step;
    then the guarded running-statistics update, as every forward kernel does it.
    ``skip_far``: None, with nothing updated, for a batch far from zero (some channel
    with |mean|·invstd > 16, see _far_from_zero).

    For a transform computed elsewhere (the aten backend's batch renorm: aten's batch
    norm with weight γr and bias γd + β)."""
    plan = _plan(x, None)
    xa = _input(x, plan)
    C = x.shape[1]
    rd = np.empty(2 * C, dtype=_NP_DTYPES[x.dtype])
    batch = np.empty((2, C), dtype=np.float64)
    args = (
        eps, r_max, d_max, rd, batch, _vector(running_mean, (C,)),
        _vector(running_var, (C,)), 0.0 if momentum is None else momentum,
        momentum is None,
        *_counters(num_batches_tracked, num_batches_skipped, momentum, True), skip_far,
    )
    note_running_write()
    with _LAUNCH_LOCK:
        if plan.layout == "major":
            far = _cm_renorm_stats(x.numel(), xa, plan.T, plan.B, *args)
        else:
            far = _cl_renorm_stats(x.numel(), xa, plan.T, *args)
    return None if far else rd


def _backward_train(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | np.ndarray | None,
    mean: Tensor | np.ndarray,
    invstd: Tensor | np.ndarray,
    sizes: tuple[int, ...] | None = None,
    out: Tensor | None = None,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.0,
    write_dres: bool = False,
    arrays: bool = False,
) -> tuple[Tensor, Any, Any, Tensor | None]:
    """Every training backward: ``(dx, Σdz·x̂, Σdz, dres or None)``; mean, invstd:
    (K·C,) chunk statistics; the two sums as tensors, or as arrays with ``arrays``.

    relu / leaky ReLU (slope >= 0) read act' from ``out``: the forward's bool mask
    z > 0, or the output itself (its sign is z's; turned into the mask here, one
    extra pass); silu and a negative slope rebuild z from x, the statistics,
    ``weight``, ``bias`` and ``residual``.
    """
    C = x.shape[1]
    numel = x.numel()
    plan = _plan(x, sizes)
    layout, shape, bounds, T = plan.layout, plan.shape, plan.bounds, plan.T
    xa = _input(x, plan)
    dya = _like_x(dy, x, plan)
    dx, dxa = _empty_like(x, plan)
    KC = (len(bounds) - 1) * C
    if isinstance(mean, Tensor):
        mean, invstd = _vector(mean, (KC,)), _vector(invstd, (KC,))  # type: ignore[arg-type]
    dtype = _NP_DTYPES[x.dtype]
    # dweight and dbias are written straight in the parameters' dtype (x's without
    # weight: one array type, one specialization).
    if weight is None:
        grad_dtype = dtype
    elif isinstance(weight, np.ndarray):
        grad_dtype = weight.dtype
    else:
        grad_dtype = _NP_DTYPES.get(weight.dtype, np.float64)
    dw, db = np.empty(C, dtype=grad_dtype), np.empty(C, dtype=grad_dtype)
    from_out = out is not None and reads_sign(activation, negative_slope)
    has_res = residual is not None
    w = _vec(weight, 1.0, C, dtype)
    dres = None
    if activation == "identity":  # plain batch norm: compiled apart (see _epilogue_args)
        b, oa, ra, dresa, code, slope = w, None, None, None, _IDENTITY, 1.0  # b: unread
    else:
        # out, res and dres are arrays, not by address: they may be None (see _view);
        # x's and dx's arrays stand in for what is not read or written.
        b = _vec(bias, 0.0, C, dtype)
        if from_out:
            mask = out if out.dtype == torch.bool else out > 0  # type: ignore[union-attr]
            oa = _as_array(mask, layout, shape)
        else:
            oa = _NO_MASK[layout]
        ra = _as_array(residual if has_res else x, layout, shape)  # type: ignore[arg-type]
        if write_dres:
            dres, _ = _empty_like(x, plan)
        dresa = _as_array(dx if dres is None else dres, layout, shape)
        code, slope = _act_args(activation, negative_slope, dtype)
    args = (
        mean, invstd, dxa, dw, db, oa, ra, has_res, code, slope, from_out, dresa,
        dres is not None,
    )
    with _LAUNCH_LOCK:
        if layout == "major":
            _cm_backward_train(numel, dya, xa, w, b, bounds, T, plan.B, *args)
        else:
            _cl_backward_train(numel, dya, xa, w, b, bounds, T, *args)
    if arrays:
        return dx, dw, db, dres
    return dx, torch.from_numpy(dw), torch.from_numpy(db), dres


def _forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    residual: Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.0,
) -> Tensor:
    """``act(x·scale + shift + residual)`` with the running statistics, one pass."""
    C = x.shape[1]
    numel = x.numel()
    if numel == 0:
        return torch.empty_like(x)  # nothing to normalize (and no rows to plan)
    plan = _plan(x, None)
    xa = _input(x, plan)
    y, ya = _empty_like(x, plan)
    res, code, slope = _epilogue_args(x, residual, activation, negative_slope, plan)
    dtype = _NP_DTYPES[x.dtype]
    args = (
        xa, _vec(weight, 1.0, C, dtype), _vec(bias, 0.0, C, dtype),
        _vector(running_mean, (C,)), _vector(running_var, (C,)), eps,
    )
    epilogue = (ya, res, residual is not None, code, slope)
    with _LAUNCH_LOCK:
        if plan.layout == "major":
            _cm_forward_eval(numel, *args, *epilogue)
        else:
            _cl_forward_eval(numel, *args, _blocks(numel, plan.shape[0]), *epilogue)
    return y


class _NumbaBackend:
    """The :class:`batchnorm._backends.Backend` for float32/float64 CPU tensors, with
    the optional fused kernels of the contract: act, ghost and renorm."""

    name = "numba"

    @staticmethod
    def usable() -> bool:
        return usable()

    @staticmethod
    def far_from_zero(mean: Tensor, invstd: Tensor) -> bool:
        """Whether a batch with these (C,) statistics has a channel more than 16
        standard deviations from zero (:func:`_far_from_zero`): where "auto" keeps
        off torch's kernels (:class:`batchnorm._backends.SplitBackend`)."""
        C = mean.shape[0]
        return bool(_far_from_zero(_vector(mean, (C,)), _vector(invstd, (C,))))

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
        y, mean, invstd, *_ = _forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped,
        )
        # Separate tensors, not views of one: autograd saves views at extra cost.
        return y, torch.from_numpy(mean), torch.from_numpy(invstd)

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dw, db, _ = _backward_train(dy, x, weight, mean, invstd)
        return dx, dw, db

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        return _forward_eval(x, weight, bias, running_mean, running_var, eps)

    # -- act(BN(x) + residual) ----------------------------------------------------------
    def act_forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None = None,
        num_batches_skipped: Tensor | None = None,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        sign: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(out, mean, invstd, mask)``: mask, the bool tensor z > 0 that the backward
        of relu and leaky ReLU (slope >= 0) reads, in one byte per value (None for
        the other activations, and with ``sign=False``: not written)."""
        out, mean, invstd, _, mask = _forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, residual=residual, activation=activation,
            negative_slope=negative_slope, write_mask=sign,
        )
        return out, torch.from_numpy(mean), torch.from_numpy(invstd), mask

    def act_backward_train(
        self,
        dout: Tensor,
        out: Tensor | None,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        has_residual: bool | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        if has_residual is None:
            has_residual = residual is not None
        stats = (mean, invstd)
        if activation == "identity":
            # dz = dout: the residual's gradient is the incoming one, no copy.
            dx, dw, db, _ = _backward_train(dout, x, weight, *stats)
            return dx, dw, db, dout if has_residual else None
        from_out = out is not None and reads_sign(activation, negative_slope)
        if not from_out and residual is None and has_residual:
            raise ValueError(
                f"activation={activation!r} rebuilds the pre-activation in backward: pass "
                "the forward's residual (or the output, for relu/leaky_relu with slope >= 0)"
            )
        return _backward_train(
            dout, x, weight, *stats, out=out, bias=bias, residual=residual,
            activation=activation, negative_slope=negative_slope, write_dres=has_residual,
        )

    def act_forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> Tensor:
        return _forward_eval(
            x, weight, bias, running_mean, running_var, eps, residual, activation,
            negative_slope,
        )

    # -- ghost batch norm ---------------------------------------------------------------
    def ghost_forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        sizes: tuple[int, ...],
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, invstd, *_ = _forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, sizes=sizes,
        )
        return y, torch.from_numpy(mean), torch.from_numpy(invstd)

    def ghost_backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        sizes: tuple[int, ...],
    ) -> tuple[Tensor, Tensor, Tensor]:
        dx, dw, db, _ = _backward_train(dy, x, weight, mean, invstd, sizes=sizes)
        return dx, dw, db

    # -- batch renorm -------------------------------------------------------------------
    def renorm_forward_train(
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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        y, mean, invstd, rd, _ = _forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, limits=(r_max, d_max),
        )
        C = x.shape[1]
        r, d = torch.from_numpy(rd[:C]), torch.from_numpy(rd[C:])  # type: ignore[index]
        return y, torch.from_numpy(mean), torch.from_numpy(invstd), r, d

    def renorm_backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        r: Tensor,
        d: Tensor,
        backward: Backend | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Batch renorm's backward, ``(dx, dγ, dβ)``: batch norm's with weight γr, and
        ``dγ = r·Σdy·x̂ + d·Σdy``, ``dβ = Σdy``, on this backend's kernel or on
        ``backward``'s ``backward_train`` (a Backend: aten's, under "auto"). The (C,)
        arithmetic stays in numpy: on small inputs each torch↔numpy crossing or small
        torch op is a visible cost."""
        rn, dn = r.numpy(), d.numpy()
        effective = rn if weight is None else np.multiply(
            weight.numpy(force=True), rn, dtype=rn.dtype
        )
        if backward is None:
            dx, sum_dy_xhat, sum_dy, _ = _backward_train(
                dy, x, effective, mean, invstd, arrays=True
            )
        else:
            dx, s1, s2 = backward.backward_train(dy, x, torch.from_numpy(effective), mean, invstd)
            sum_dy_xhat, sum_dy = s1.numpy(), s2.numpy()
        if weight is None:
            return dx, None, torch.from_numpy(sum_dy)
        dweight = rn * sum_dy_xhat + dn * sum_dy
        return dx, as_dtype(torch.from_numpy(dweight), weight.dtype), torch.from_numpy(sum_dy)


BACKEND = _NumbaBackend()
