"""Batch-normalization kernels for the CPU, compiled with numba; float32 and float64.

Two memory layouts cover every input the functional passes here:

* **channel-major** ``(A, C, L)``, contiguous: NCHW, (N, C, L), NCDHW with L > 1.
  One channel's values are A runs of L contiguous elements, so the work is split by
  channel across threads and each channel is processed start to finish by one thread
  while its data is still in cache: the statistics pass, the centred second pass and
  the output pass read the same few hundred kilobytes, which is why this beats three
  separate whole-tensor passes.
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
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

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


_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)
_pjit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, parallel=True)


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

    def __call__(self, numel: int, *args: Any) -> None:
        # The size test comes first: it is free, the thread-count query is not.
        threaded = numel >= 2 * _MIN_WORK_PER_THREAD and numba.get_num_threads() > 1
        (self.parallel if threaded else self.serial)(*args)


# ----------------------------------------------------------------------------------------
# running statistics
# ----------------------------------------------------------------------------------------
@_jit
def _update_running(rm, rv, mean, var, m, momentum, cumulative, tracked, skipped):  # pragma: no cover
    """The guarded EMA / cumulative update; see batchnorm._backends. tracked, skipped:
    0-dim int64 arrays (the counters)."""
    C = rm.shape[0]
    for c in range(C):
        if not (math.isfinite(mean[c]) and math.isfinite(var[c])):
            skipped[()] += 1
            return
    f = 1.0 / (tracked[()] + 1.0) if cumulative else momentum
    correction = m / (m - 1.0)
    for c in range(C):
        rm[c] = (1.0 - f) * float(rm[c]) + f * float(mean[c])
        rv[c] = (1.0 - f) * float(rv[c]) + f * var[c] * correction
    tracked[()] += 1


# ----------------------------------------------------------------------------------------
# channel-major (A, C, L)
# ----------------------------------------------------------------------------------------
@_Kernel
def _cm_forward_train(
    x, w, b, eps, y, mean_out, invstd_out, var_out, coef,
    rm, rv, momentum, cumulative, tracked, skipped, update,
):  # pragma: no cover
    """x, y: (A, C, L); w, b: (C,); mean_out, invstd_out: (C,) stats dtype;
    var_out: (C,) float64 biased variance; coef: (C, 3) scratch of x's dtype.
    With ``update``, the running statistics rm, rv and the counters follow
    (see _update_running)."""
    A, C, L = x.shape
    m = A * L
    for c in numba.prange(C):
        s = 0.0
        for a in range(A):
            acc = x[a, c, 0] * 0
            for i in range(L):
                acc += x[a, c, i]
            s += acc
        coef[c, 0] = s / m  # provisional centre, in x's dtype
        centre = coef[c, 0]
        s1 = 0.0
        q = 0.0
        for a in range(A):
            acc1 = x[a, c, 0] * 0
            acc2 = x[a, c, 0] * 0
            for i in range(L):
                d = x[a, c, i] - centre
                acc1 += d
                acc2 += d * d
            s1 += acc1
            q += acc2
        mu = float(centre) + s1 / m
        var = max((q - s1 * s1 / m) / m, 0.0)
        r = 1.0 / math.sqrt(var + eps)
        mean_out[c] = mu
        invstd_out[c] = r
        var_out[c] = var
        k = float(w[c]) * r
        coef[c, 1] = k
        coef[c, 2] = float(b[c]) - mu * k
        kk = coef[c, 1]
        sh = coef[c, 2]
        for a in range(A):
            for i in range(L):
                y[a, c, i] = x[a, c, i] * kk + sh
    if update:
        _update_running(rm, rv, mean_out, var_out, m, momentum, cumulative, tracked, skipped)


@_Kernel
def _cm_backward_train(dy, x, w, mean, invstd, dx, dw, db, coef):  # pragma: no cover
    """dy, x, dx: (A, C, L); w, mean, invstd: (C,); dw, db: (C,) float64 outputs;
    coef: (C, 4) scratch of x's dtype."""
    A, C, L = x.shape
    m = A * L
    for c in numba.prange(C):
        coef[c, 0] = mean[c]
        mu = coef[c, 0]
        sdy = 0.0
        sdyx = 0.0
        for a in range(A):
            acc1 = x[a, c, 0] * 0
            acc2 = x[a, c, 0] * 0
            for i in range(L):
                g = dy[a, c, i]
                acc1 += g
                acc2 += g * (x[a, c, i] - mu)
            sdy += acc1
            sdyx += acc2
        r = float(invstd[c])
        db[c] = sdy
        dw[c] = sdyx * r
        # dx = k*dy + bx*(x - mu) + cx, from the closed form with x_hat = (x - mu) * r.
        k = float(w[c]) * r
        coef[c, 1] = k
        coef[c, 2] = -k * r * r * sdyx / m
        coef[c, 3] = -k * sdy / m
        kk = coef[c, 1]
        bx = coef[c, 2]
        cx = coef[c, 3]
        for a in range(A):
            for i in range(L):
                dx[a, c, i] = dy[a, c, i] * kk + (x[a, c, i] - mu) * bx + cx


@_Kernel
def _cm_forward_eval(x, w, b, rm, rv, eps, y, coef):  # pragma: no cover
    """y = x * scale + shift over (A, C, L); coef: (C, 2) scratch of x's dtype."""
    A, C, L = x.shape
    for c in range(C):
        k = float(w[c]) / math.sqrt(float(rv[c]) + eps)
        coef[c, 0] = k
        coef[c, 1] = float(b[c]) - float(rm[c]) * k
    # Split over the A*C contiguous rows, so that few channels still use every thread;
    # 2D rows keep the inner loop a plain vectorizable stream.
    x2 = x.reshape(A * C, L)
    y2 = y.reshape(A * C, L)
    for row in numba.prange(A * C):
        c = row % C
        kk = coef[c, 0]
        sh = coef[c, 1]
        for i in range(L):
            y2[row, i] = x2[row, i] * kk + sh


# ----------------------------------------------------------------------------------------
# channel-minor (M, C)
# ----------------------------------------------------------------------------------------
def _num_chunks(M: int, C: int) -> int:
    """How many row chunks (threads) a channel-minor kernel splits M rows into."""
    if M * C < 2 * _MIN_WORK_PER_THREAD:
        return 1
    chunks = min(numba.get_num_threads(), max(1, (M * C) // _MIN_WORK_PER_THREAD))
    return max(1, min(chunks, M))


@_Kernel
def _cl_forward_train(
    x, w, b, eps, y, mean_out, invstd_out, var_out, coef, T,
    rm, rv, momentum, cumulative, tracked, skipped, update,
):  # pragma: no cover
    """x, y: (M, C) split in T row chunks; coef: (C, 2) scratch of x's dtype; the other
    arguments as in the channel-major kernel."""
    M, C = x.shape
    part_mean = np.zeros((T, C))
    part_m2 = np.zeros((T, C))
    for t in numba.prange(T):
        r0 = t * M // T
        r1 = (t + 1) * M // T
        acc = np.empty(C, x.dtype)
        centre = np.empty(C, x.dtype)
        acc2 = np.empty(C, x.dtype)
        n_seen = 0
        for s0 in range(r0, r1, _ROW_BLOCK):
            s1 = min(s0 + _ROW_BLOCK, r1)
            nb = s1 - s0
            acc[:] = 0
            for r in range(s0, s1):
                for c in range(C):
                    acc[c] += x[r, c]
            for c in range(C):
                centre[c] = acc[c] / nb
            acc[:] = 0
            acc2[:] = 0
            for r in range(s0, s1):
                for c in range(C):
                    d = x[r, c] - centre[c]
                    acc[c] += d
                    acc2[c] += d * d
            # Chan et al.: merge this block (nb, mean_b, m2_b) into the running partial.
            n_new = n_seen + nb
            for c in range(C):
                sb = float(acc[c])
                mean_b = float(centre[c]) + sb / nb
                m2_b = max(float(acc2[c]) - sb * sb / nb, 0.0)
                delta = mean_b - part_mean[t, c]
                part_mean[t, c] += delta * nb / n_new
                part_m2[t, c] += m2_b + delta * delta * n_seen * nb / n_new
            n_seen = n_new
    for c in range(C):
        mu = 0.0
        m2 = 0.0
        n_seen = 0
        for t in range(T):
            nb = (t + 1) * M // T - t * M // T
            n_new = n_seen + nb
            delta = part_mean[t, c] - mu
            mu += delta * nb / n_new
            m2 += part_m2[t, c] + delta * delta * n_seen * nb / n_new
            n_seen = n_new
        var = m2 / M
        r = 1.0 / math.sqrt(var + eps)
        mean_out[c] = mu
        invstd_out[c] = r
        var_out[c] = var
        k = float(w[c]) * r
        coef[c, 0] = k
        coef[c, 1] = float(b[c]) - mu * k
    kk = coef[:, 0].copy()
    sh = coef[:, 1].copy()
    for t in numba.prange(T):
        for r in range(t * M // T, (t + 1) * M // T):
            for c in range(C):
                y[r, c] = x[r, c] * kk[c] + sh[c]
    if update:
        _update_running(rm, rv, mean_out, var_out, M, momentum, cumulative, tracked, skipped)


@_Kernel
def _cl_backward_train(dy, x, w, mean, invstd, dx, dw, db, coef, T):  # pragma: no cover
    """dy, x, dx: (M, C); dw, db: (C,) float64; coef: (C, 3) scratch of x's dtype;
    T row chunks."""
    M, C = x.shape
    part_dy = np.zeros((T, C))
    part_dyx = np.zeros((T, C))
    mu = np.empty(C, x.dtype)
    for c in range(C):
        mu[c] = mean[c]
    for t in numba.prange(T):
        r0 = t * M // T
        r1 = (t + 1) * M // T
        acc1 = np.empty(C, x.dtype)
        acc2 = np.empty(C, x.dtype)
        for s0 in range(r0, r1, _ROW_BLOCK):
            s1 = min(s0 + _ROW_BLOCK, r1)
            acc1[:] = 0
            acc2[:] = 0
            for r in range(s0, s1):
                for c in range(C):
                    g = dy[r, c]
                    acc1[c] += g
                    acc2[c] += g * (x[r, c] - mu[c])
            for c in range(C):
                part_dy[t, c] += acc1[c]
                part_dyx[t, c] += acc2[c]
    for c in range(C):
        sdy = 0.0
        sdyx = 0.0
        for t in range(T):
            sdy += part_dy[t, c]
            sdyx += part_dyx[t, c]
        r = float(invstd[c])
        db[c] = sdy
        dw[c] = sdyx * r
        k = float(w[c]) * r
        coef[c, 0] = k
        coef[c, 1] = -k * r * r * sdyx / M
        coef[c, 2] = -k * sdy / M
    kk = coef[:, 0].copy()
    bx = coef[:, 1].copy()
    cx = coef[:, 2].copy()
    for t in numba.prange(T):
        for r in range(t * M // T, (t + 1) * M // T):
            for c in range(C):
                dx[r, c] = dy[r, c] * kk[c] + (x[r, c] - mu[c]) * bx[c] + cx[c]


@_Kernel
def _cl_forward_eval(x, w, b, rm, rv, eps, y, coef, T):  # pragma: no cover
    """y = x * scale + shift over (M, C) in T row chunks; coef: (C, 2) of x's dtype."""
    M, C = x.shape
    for c in range(C):
        k = float(w[c]) / math.sqrt(float(rv[c]) + eps)
        coef[c, 0] = k
        coef[c, 1] = float(b[c]) - float(rm[c]) * k
    kk = coef[:, 0].copy()
    sh = coef[:, 1].copy()
    for t in numba.prange(T):
        for r in range(t * M // T, (t + 1) * M // T):
            for c in range(C):
                y[r, c] = x[r, c] * kk[c] + sh[c]


# ----------------------------------------------------------------------------------------
# host side: tensors in, tensors out
# ----------------------------------------------------------------------------------------
def _is_channels_last(x: Tensor) -> bool:
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _layout(x: Tensor) -> tuple[str, tuple[int, ...]]:
    """("minor", (M, C)) or ("major", (A, C, L)): how ``x``'s memory is viewed."""
    C = x.shape[1]
    if x.dim() == 2:
        return "minor", (x.shape[0], C)
    if _is_channels_last(x):
        return "minor", (x.numel() // C, C)
    spatial = x.numel() // (x.shape[0] * C) if x.shape[0] else 0
    if spatial == 1:
        return "minor", (x.shape[0], C)
    return "major", (x.shape[0], C, spatial)


def _as_array(t: Tensor, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of ``t``'s memory in the layout's shape (no copy)."""
    if layout == "minor" and t.dim() > 2:
        # channels_last memory is (N, *spatial, C): move C last to get a contiguous view.
        t = t.movedim(1, -1)
    if t.dim() != len(shape):
        t = t.reshape(shape)
    return t.numpy(force=True)


def _empty_like(
    x: Tensor, xa: np.ndarray, layout: str, shape: tuple[int, ...]
) -> tuple[Tensor, np.ndarray]:
    """An uninitialized tensor with ``x``'s shape, dtype and memory format, and its
    array view in the layout's shape. (N, C) inputs take the cheaper numpy allocation."""
    if x.dim() == 2:
        array = np.empty_like(xa)
        return torch.from_numpy(array), array
    out = torch.empty_like(x)
    return out, _as_array(out, layout, shape)


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}

_FILLS: dict[tuple[int, float], np.ndarray] = {}


def _vec(t: Tensor | None, fill: float, num_channels: int) -> np.ndarray:
    """``t`` as an array, or a constant vector (read-only, cached) when ``t`` is None."""
    if t is not None:
        return t.numpy(force=True)
    key = (num_channels, fill)
    if key not in _FILLS:
        array = np.full(num_channels, fill, dtype=np.float64)
        array.flags.writeable = False
        _FILLS[key] = array
    return _FILLS[key]


def _counter(t: Tensor | None) -> np.ndarray:
    """A 0-dim int64 counter tensor as an array, or a scratch counter when None."""
    if t is None:
        return np.zeros((), dtype=np.int64)
    return t.numpy(force=True)


class _NumbaBackend:
    """The :class:`batchnorm._backends.Backend` for float32/float64 CPU tensors."""

    name = "numba"

    @staticmethod
    def usable() -> bool:
        return usable()

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
        C = x.shape[1]
        numel = x.numel()
        layout, shape = _layout(x)
        xa = _as_array(x, layout, shape)
        y, ya = _empty_like(x, xa, layout, shape)
        # Separate tensors, not views of one: autograd saves views at extra cost.
        mean_array, invstd_array = np.empty(C, dtype=xa.dtype), np.empty(C, dtype=xa.dtype)
        mean, invstd = torch.from_numpy(mean_array), torch.from_numpy(invstd_array)
        var = np.empty(C, dtype=np.float64)
        w, b = _vec(weight, 1.0, C), _vec(bias, 0.0, C)
        update = running_mean is not None and running_var is not None
        if update:
            rm, rv = running_mean.numpy(force=True), running_var.numpy(force=True)  # type: ignore[union-attr]
        else:
            rm = rv = var  # never written: update is False
        running = (
            rm, rv, 0.0 if momentum is None else momentum, momentum is None,
            _counter(num_batches_tracked), _counter(num_batches_skipped), update,
        )
        with _LAUNCH_LOCK:
            if layout == "major":
                coef = np.empty((C, 3), dtype=xa.dtype)
                _cm_forward_train(
                    numel, xa, w, b, eps, ya, mean_array, invstd_array, var, coef, *running
                )
            else:
                coef = np.empty((C, 2), dtype=xa.dtype)
                _cl_forward_train(
                    numel, xa, w, b, eps, ya, mean_array, invstd_array, var, coef,
                    _num_chunks(shape[0], C), *running,
                )
        return y, mean, invstd

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        C = x.shape[1]
        numel = x.numel()
        layout, shape = _layout(x)
        xa, dya = _as_array(x, layout, shape), _as_array(dy, layout, shape)
        dx, dxa = _empty_like(x, xa, layout, shape)
        # dweight and dbias are written straight in the parameters' dtype.
        grad_dtype = np.float64 if weight is None else _NP_DTYPES.get(weight.dtype, np.float64)
        dw_array, db_array = np.empty(C, dtype=grad_dtype), np.empty(C, dtype=grad_dtype)
        w = _vec(weight, 1.0, C)
        mean_array, invstd_array = mean.numpy(force=True), invstd.numpy(force=True)
        with _LAUNCH_LOCK:
            if layout == "major":
                coef = np.empty((C, 4), dtype=xa.dtype)
                _cm_backward_train(
                    numel, dya, xa, w, mean_array, invstd_array, dxa, dw_array, db_array,
                    coef,
                )
            else:
                coef = np.empty((C, 3), dtype=xa.dtype)
                _cl_backward_train(
                    numel, dya, xa, w, mean_array, invstd_array, dxa, dw_array, db_array,
                    coef, _num_chunks(shape[0], C),
                )
        dw, db = torch.from_numpy(dw_array), torch.from_numpy(db_array)
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
        C = x.shape[1]
        numel = x.numel()
        layout, shape = _layout(x)
        xa = _as_array(x, layout, shape)
        y, ya = _empty_like(x, xa, layout, shape)
        w, b = _vec(weight, 1.0, C), _vec(bias, 0.0, C)
        rm, rv = running_mean.numpy(force=True), running_var.numpy(force=True)
        with _LAUNCH_LOCK:
            if layout == "major":
                _cm_forward_eval(numel, xa, w, b, rm, rv, eps, ya, np.empty((C, 2), dtype=xa.dtype))
            else:
                _cl_forward_eval(
                    numel, xa, w, b, rm, rv, eps, ya, np.empty((C, 2), dtype=xa.dtype),
                    _num_chunks(shape[0], C),
                )
        return y


BACKEND = _NumbaBackend()
