"""Triton kernels for batch normalization (forward, backward, eval, fused BN+add+act).

Only ``@triton.jit`` code lives here; :mod:`batchnorm.kernels.triton_host` allocates,
chooses the path and launches. docs/triton.md describes the design; in short:

Two views of the input cover every layout the host passes:

* **NCS** -- ``(N, C, S)`` contiguous (NCHW, NCL, NCDHW with S = spatial size). A
  channel is N runs of S contiguous elements, ``offset = n*C*S + c*S + s``. Programs
  own one channel (and, when split, a range of s-blocks and rows); tiles are
  ``[BLOCK_N, BLOCK_S]``.
* **RC** -- ``(R, K)`` contiguous rows (2D input, channels_last / channels_last_3d
  viewed as ``(N*S, C)``; NCS with a tiny S viewed as ``(N, C*S)``). Column ``k``
  belongs to channel ``k // GROUP`` (GROUP = 1 except for that last case). Programs own
  a block of columns and a range of rows; tiles are ``[BLOCK_R, BLOCK_K]``.

Numerics. Everything accumulates in float32. Statistics use Welford per lane (each
element of the tile is a lane carrying its own count/mean/M2) and Chan's parallel
formula to merge lanes, partials and segments -- never E[x^2] - E[x]^2. The tiling
keeps a lane's validity monotone along the inner loop (a lane that is masked out stays
masked), so every live lane has seen exactly t elements after t iterations and the
Welford update divides by a *scalar* t (one reciprocal per iteration, not per element).
Values are shifted by a per-channel pivot (the channel's first value) so that float32
lane and partial means keep their digits; many-way merges carry the corrected-two-pass
term. Per-channel scalars (mean, var, invstd) use round-to-nearest division and sqrt.
The output is ``(x - mean) * scale + (shift - dmean * scale)``: mean is float32 and
dmean its rounding error (the exact pivot + (mean - pivot) minus it, by TwoSum), so
x - mean is exact near the mean and the output keeps float32 rounding of its own size
far from zero too (``x * scale + (b - mean * scale)`` rounds at the size of x * scale).
The saved mean is mean + dmean in float64 (_store_mean); the backward splits it again
(_affine) and centres on both, x - mean - dmean.

Performance. Streaming loops are ``tl.range(..., num_stages=NUM_STAGES)``: Triton
pipelines their loads through shared memory (cp.async), so tiles stay in flight without
costing registers. Nothing here is autotuned (the kernels that update running statistics
must not be replayed by a tuner); the host picks block sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes (constexpr ``ACT``).
ACT_IDENTITY = 0
ACT_RELU = 1
ACT_LEAKY_RELU = 2
ACT_SILU = 3


# ----------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ----------------------------------------------------------------------------------------
@triton.jit
def _act(z, slope, ACT: tl.constexpr):
    """The activation applied to the float32 pre-activation ``z``; NaN propagates."""
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z < 0.0, z * slope, z)
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _act_grad(g, v, slope, ACT: tl.constexpr):
    """d act / d z times the incoming gradient ``g``.

    ``v`` is the pre-activation z, or, for relu and leaky_relu with slope >= 0, the saved
    output (it has z's sign, so the mask ``out > 0`` equals ``z > 0``). silu needs z.
    """
    if ACT == 1:
        g = tl.where(v > 0.0, g, 0.0)
    elif ACT == 2:
        g = tl.where(v > 0.0, g, g * slope)
    elif ACT == 3:
        sig = tl.sigmoid(v)
        g = g * sig * (1.0 + v * (1.0 - sig))
    return g


@triton.jit
def _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale, shift, slope,
            ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr):
    """dz = dL/d(pre-activation) at ``offs``, float32; zero on masked lanes.

    ``xmu = x - mean`` (float32), ``scale = weight * invstd`` and ``shift = bias``
    rebuild z = xmu*scale + shift (+ residual) when the activation needs it (silu,
    leaky_relu with a negative slope); relu and leaky_relu read the saved output.
    """
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        if FROM_OUT:
            v = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            v = xmu * scale + shift
            if HAS_RES:
                v += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_grad(g, v, slope, ACT)
    return g


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of (count, mean, M2) summaries, elementwise."""
    n = n_a + n_b
    frac = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return n, mean, m2


@triton.jit
def _merge_axis(n, mean, m2, AXIS: tl.constexpr):
    """Merge many (count, mean, M2) summaries along ``AXIS`` at once; empty summaries
    (n = 0) drop out. The parallel form M2 = sum(M2_i) + sum(n_i d_i^2), d_i = mean_i - mu,
    with the corrected-two-pass term: mu is a rounded float32 sum, so its error e adds
    total*e^2 to sum(n_i d_i^2); s = sum(n_i d_i) = -total*e measures it and is
    subtracted (s^2/total), and mu is refined by s/total."""
    total = tl.sum(n, AXIS)
    inv = 1.0 / tl.maximum(total, 1.0)
    mu = tl.sum(n * mean, AXIS) * inv
    dev = mean - tl.expand_dims(mu, AXIS)
    s = tl.sum(n * dev, AXIS)
    between = tl.maximum(tl.sum(n * dev * dev, AXIS) - s * s * inv, 0.0)
    return total, mu + s * inv, tl.sum(m2, AXIS) + between


@triton.jit
def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and e = (a + b) - s exactly (Knuth's TwoSum): the
    mean as the float32 pivot + (mean - pivot), and what its rounding dropped."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _invstd(var, eps):
    """1 / sqrt(var + eps), correctly rounded sqrt and division (a per-channel scalar)."""
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _not_finite(v):
    """1 where ``v`` is NaN or +-Inf, else 0 (int32)."""
    return (~(tl.abs(v) < float("inf"))).to(tl.int32)


@triton.jit
def _affine(c, cmask, mean_ptr, var_ptr, w_ptr, b_ptr, eps,
            EVAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (mean, dmean, invstd, scale = w*invstd, shift = b) for channel(s) ``c``.

    Training: ``mean_ptr``/``var_ptr`` hold the batch mean (float64 from the forward
    kernels, see _store_mean; float32 works too) and the float32 invstd. Eval
    (``EVAL``): they hold the running mean and running variance (any float dtype) and
    invstd is computed here. ``mean`` is the stored mean rounded to float32 and
    ``dmean`` what that rounding dropped (0 for a float32 or narrower mean): the
    kernels centre on ``mean`` and then take ``dmean`` off. ``c`` may be a scalar or a
    vector (masked by cmask).
    """
    stored = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    mean = stored.to(tl.float32)
    dmean = (stored - mean.to(stored.dtype)).to(tl.float32)
    if EVAL:
        var = tl.load(var_ptr + c, mask=cmask, other=1.0).to(tl.float32)
        istd = _invstd(var, eps)
    else:
        istd = tl.load(var_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    scale = istd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    shift = mean * 0.0
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return mean, dmean, istd, scale, shift


@triton.jit
def _store_mean(ptr, mean, dmean, mask):
    """Store the batch mean as the float64 ``mean + dmean`` (float32 mean, dmean its
    rounding error; the sum is exact in float64), so the backward and the renorm
    constants see the mean to ~1e-16 and _affine recovers both parts."""
    tl.store(ptr, mean.to(tl.float64) + dmean.to(tl.float64), mask=mask)


@triton.jit
def _scale_shift(c, cmask, istd, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(w * invstd, b) for channel(s) c, float32."""
    scale = istd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    shift = istd * 0.0
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def _ncs_split(pid, C, S, N, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, BLOCK_S: tl.constexpr):
    """Which channel and which (s-block range, row range) program ``pid`` owns (NCS)."""
    c = pid // SPLIT
    p = pid % SPLIT
    ps = p // P_N
    pn = p % P_N
    sb0 = ps * SB_PER_PROG
    sb1 = tl.minimum(sb0 + SB_PER_PROG, tl.cdiv(S, BLOCK_S))
    n0 = pn * N_PER_PROG
    n1 = tl.minimum(n0 + N_PER_PROG, N)
    return c, sb0, sb1, n0, n1


@triton.jit
def _rc_split(pid, K, R, SPLIT, ROWS_PER_PROG, BLOCK_K: tl.constexpr):
    """Which column block and which row range program ``pid`` owns (RC)."""
    kb = pid // SPLIT
    p = pid % SPLIT
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    r0 = p * ROWS_PER_PROG
    r1 = tl.minimum(r0 + ROWS_PER_PROG, R)
    return cols, cols < K, r0, r1


# ----------------------------------------------------------------------------------------
# region helpers: one program's share of a channel (NCS) or of a column block (RC)
# ----------------------------------------------------------------------------------------
@triton.jit
def _welford_step(x, mean, m2, inv):
    """One Welford update of every lane with its next value x (inv = 1/count)."""
    d = x - mean
    mean += d * inv
    m2 += d * (x - mean)
    return mean, m2


@triton.jit
def _welford_ncs(x_ptr, ch_off, stride_n, S, sb0, sb1, n0, n1,
                 IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    """(count, mean - pivot, M2) of one channel's elements with rows n in [n0, n1) and
    s-blocks [sb0, sb1); pivot = x[0, c, 0] (values are shifted by it, so that the
    float32 lane means stay small and keep their digits). Each s-block is a segment:
    every full row block updates every lane, unmasked (lanes past S compute garbage
    that their zero count drops), then one masked tail block; the Welford step divides
    by the scalar iteration count. Segments merge lane-wise (Chan), lanes at the end."""
    pivot = tl.load(x_ptr + ch_off).to(tl.float32)
    rn = tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_S)
    # How many row-blocks each row lane sees (the same in every segment).
    seen = tl.maximum((n1 - n0 - rn + BLOCK_N - 1) // BLOCK_N, 0).to(tl.float32)
    n_full = n0 + ((n1 - n0) // BLOCK_N) * BLOCK_N
    acc_n = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    acc_mean = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    acc_m2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for sb in range(sb0, sb1):
        s = sb * BLOCK_S + rs
        smask = s < S
        mean = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
        m2 = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
        t = 0.0
        for n in tl.range(n0, n_full, BLOCK_N, num_stages=NUM_STAGES):
            rows = n + rn
            if IDX64:
                rows = rows.to(tl.int64)
            offs = rows[:, None] * stride_n + ch_off + s[None, :]
            x = tl.load(x_ptr + offs, mask=smask[None, :], other=0.0).to(tl.float32) - pivot
            t += 1.0
            mean, m2 = _welford_step(x, mean, m2, 1.0 / t)
        if n_full < n1:
            rows = n_full + rn
            if IDX64:
                rows = rows.to(tl.int64)
            mask = (rows < n1)[:, None] & smask[None, :]
            offs = rows[:, None] * stride_n + ch_off + s[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot
            t += 1.0
            new_mean, new_m2 = _welford_step(x, mean, m2, 1.0 / t)
            mean = tl.where(mask, new_mean, mean)
            m2 = tl.where(mask, new_m2, m2)
        cnt = seen[:, None] * smask[None, :].to(tl.float32)
        acc_n, acc_mean, acc_m2 = _chan_merge(acc_n, acc_mean, acc_m2, cnt, mean, m2)
    n1_, mu1, q1 = _merge_axis(acc_n, acc_mean, acc_m2, 1)
    return _merge_axis(n1_, mu1, q1, 0)


@triton.jit
def _welford_rc(x_ptr, cols, cmask, K, GROUP, r0, r1,
                IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                NUM_STAGES: tl.constexpr):
    """Per-column (count, mean - pivot, M2) over rows [r0, r1); vectors of BLOCK_K.
    The pivot of column k is x[0, (k // GROUP) * GROUP]: the channel's first value.
    Full row blocks unmasked, then a masked tail, as in _welford_ncs."""
    pivot = tl.load(x_ptr + (cols // GROUP) * GROUP, mask=cmask, other=0.0).to(tl.float32)
    pivot2 = pivot[None, :]
    rr = tl.arange(0, BLOCK_R)
    r_full = r0 + ((r1 - r0) // BLOCK_R) * BLOCK_R
    mean = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    m2 = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    t = 0.0
    for r in tl.range(r0, r_full, BLOCK_R, num_stages=NUM_STAGES):
        rows = r + rr
        if IDX64:
            rows = rows.to(tl.int64)
        offs = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=cmask[None, :], other=0.0).to(tl.float32) - pivot2
        t += 1.0
        mean, m2 = _welford_step(x, mean, m2, 1.0 / t)
    if r_full < r1:
        rows = r_full + rr
        if IDX64:
            rows = rows.to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - pivot2
        t += 1.0
        new_mean, new_m2 = _welford_step(x, mean, m2, 1.0 / t)
        mean = tl.where(mask, new_mean, mean)
        m2 = tl.where(mask, new_m2, m2)
    seen = tl.maximum((r1 - r0 - rr + BLOCK_R - 1) // BLOCK_R, 0).to(tl.float32)
    cnt = seen[:, None] * cmask[None, :].to(tl.float32)
    return _merge_axis(cnt, mean, m2, 0)


@triton.jit
def _normalize_ncs(x_ptr, y_ptr, res_ptr, ch_off, stride_n, S, sb0, sb1, n0, n1,
                   mean, scale, shift, slope,
                   ACT: tl.constexpr, HAS_RES: tl.constexpr, IDX64: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, NUM_STAGES: tl.constexpr):
    """y = act((x - mean) * scale + shift [+ residual]) over one program's region."""
    rn = tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_S)
    for sb in range(sb0, sb1):
        s = sb * BLOCK_S + rs
        smask = s < S
        for n in tl.range(n0, n1, BLOCK_N, num_stages=NUM_STAGES):
            rows = n + rn
            if IDX64:
                rows = rows.to(tl.int64)
            mask = (rows < n1)[:, None] & smask[None, :]
            offs = rows[:, None] * stride_n + ch_off + s[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean) * scale + shift
            if HAS_RES:
                z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z = _act(z, slope, ACT)
            tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_rc(x_ptr, y_ptr, res_ptr, cols, cmask, K, r0, r1,
                  mean, scale, shift, slope,
                  ACT: tl.constexpr, HAS_RES: tl.constexpr, IDX64: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """y = act((x - mean) * scale + shift [+ residual]) over rows [r0, r1) of a column
    block; mean/scale/shift are per-column vectors."""
    rr = tl.arange(0, BLOCK_R)
    mean2 = mean[None, :]
    scale2 = scale[None, :]
    shift2 = shift[None, :]
    for r in tl.range(r0, r1, BLOCK_R, num_stages=NUM_STAGES):
        rows = r + rr
        if IDX64:
            rows = rows.to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean2) * scale2 + shift2
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _act(z, slope, ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, ch_off, stride_n, S, sb0, sb1, n0, n1,
                  mean, dmean, scale, shift, slope,
                  ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr,
                  IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                  NUM_STAGES: tl.constexpr):
    """(sum dz, sum dz*(x - mean)) over one program's region of a channel; x - mean is
    (x - float32 mean) - dmean (see _affine): exact near the mean, so far from zero
    x_hat, dweight and dx keep float32 accuracy."""
    rn = tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_S)
    acc_g = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    acc_gx = tl.zeros([BLOCK_N, BLOCK_S], tl.float32)
    for sb in range(sb0, sb1):
        s = sb * BLOCK_S + rs
        smask = s < S
        for n in tl.range(n0, n1, BLOCK_N, num_stages=NUM_STAGES):
            rows = n + rn
            if IDX64:
                rows = rows.to(tl.int64)
            mask = (rows < n1)[:, None] & smask[None, :]
            offs = rows[:, None] * stride_n + ch_off + s[None, :]
            xmu = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) - dmean
            g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale, shift, slope,
                        ACT, FROM_OUT, HAS_RES)
            acc_g += g
            acc_gx += g * xmu
    return tl.sum(tl.sum(acc_g, 1), 0), tl.sum(tl.sum(acc_gx, 1), 0)


@triton.jit
def _bwd_sums_rc(dout_ptr, x_ptr, out_ptr, res_ptr, cols, cmask, K, r0, r1,
                 mean, dmean, scale, shift, slope,
                 ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr,
                 IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr):
    """Per-column (sum dz, sum dz*(x - mean)) over rows [r0, r1), as _bwd_sums_ncs."""
    rr = tl.arange(0, BLOCK_R)
    mean2 = mean[None, :]
    dmean2 = dmean[None, :]
    scale2 = scale[None, :]
    shift2 = shift[None, :]
    acc_g = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    for r in tl.range(r0, r1, BLOCK_R, num_stages=NUM_STAGES):
        rows = r + rr
        if IDX64:
            rows = rows.to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        xmu = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean2) - dmean2
        g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale2, shift2, slope,
                    ACT, FROM_OUT, HAS_RES)
        acc_g += g
        acc_gx += g * xmu
    return tl.sum(acc_g, 0), tl.sum(acc_gx, 0)


@triton.jit
def _dx_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr,
            ch_off, stride_n, S, sb0, sb1, n0, n1,
            mean, dmean, scale, shift, mg, c2, slope,
            ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr,
            WRITE_DRES: tl.constexpr, IDX64: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, NUM_STAGES: tl.constexpr):
    """dx = scale*(dz - mg) - (x - mean)*c2 over one program's region (NCS);
    mg = sum(dz)/m, c2 = scale*invstd*sum(dz*x_hat)/m. Also writes dz to dres."""
    rn = tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_S)
    for sb in range(sb0, sb1):
        s = sb * BLOCK_S + rs
        smask = s < S
        for n in tl.range(n0, n1, BLOCK_N, num_stages=NUM_STAGES):
            rows = n + rn
            if IDX64:
                rows = rows.to(tl.int64)
            mask = (rows < n1)[:, None] & smask[None, :]
            offs = rows[:, None] * stride_n + ch_off + s[None, :]
            xmu = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) - dmean
            g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale, shift, slope,
                        ACT, FROM_OUT, HAS_RES)
            dx = scale * (g - mg) - xmu * c2
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WRITE_DRES:
                tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_rc(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr, cols, cmask, K, r0, r1,
           mean, dmean, scale, shift, mg, c2, slope,
           ACT: tl.constexpr, FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr,
           WRITE_DRES: tl.constexpr, IDX64: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The RC twin of :func:`_dx_ncs`; per-column coefficient vectors."""
    rr = tl.arange(0, BLOCK_R)
    mean2 = mean[None, :]
    dmean2 = dmean[None, :]
    scale2 = scale[None, :]
    shift2 = shift[None, :]
    mg2 = mg[None, :]
    c22 = c2[None, :]
    for r in tl.range(r0, r1, BLOCK_R, num_stages=NUM_STAGES):
        rows = r + rr
        if IDX64:
            rows = rows.to(tl.int64)
        mask = (rows < r1)[:, None] & cmask[None, :]
        offs = rows[:, None] * K + cols[None, :]
        xmu = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean2) - dmean2
        g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale2, shift2, slope,
                    ACT, FROM_OUT, HAS_RES)
        dx = scale2 * (g - mg2) - xmu * c22
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DRES:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# forward, training: split path (stats -> merge -> normalize + running update)
# ----------------------------------------------------------------------------------------
@triton.jit
def fwd_stats_ncs_kernel(
    x_ptr,          # (N, C, S) input, contiguous
    pcnt_ptr,       # (C, SPLIT) float32 out: element count of each partial
    pmean_ptr,      # (C, SPLIT) float32 out: mean of each partial minus x[0, c, 0]
    pm2_ptr,        # (C, SPLIT) float32 out: sum of squared deviations of each partial
    N, C, S,        # sizes of the NCS view
    SPLIT,          # partials per channel = s-block groups * row groups
    P_N,            # row groups per s-block group
    SB_PER_PROG,    # s-blocks (of BLOCK_S) per program
    N_PER_PROG,     # rows per program (a multiple of BLOCK_N)
    flag_ptr,       # () int32: zeroed here, for fwd_merge_kernel's non-finite flag
    IDX64: tl.constexpr,    # 64-bit offsets (tensors of 2**31 elements or more)
    BLOCK_N: tl.constexpr,  # rows per tile
    BLOCK_S: tl.constexpr,  # contiguous elements per tile row
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C * SPLIT,): program c*SPLIT + p writes partial p of channel c."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(flag_ptr, 0)
    c, sb0, sb1, n0, n1 = _ncs_split(pid, C, S, N, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, BLOCK_S)
    if IDX64:
        c = c.to(tl.int64)
    cnt, mean, m2 = _welford_ncs(x_ptr, c * S, (c * 0 + C) * S, S, sb0, sb1, n0, n1,
                                 IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)
    tl.store(pcnt_ptr + pid, cnt)
    tl.store(pmean_ptr + pid, mean)
    tl.store(pm2_ptr + pid, m2)


@triton.jit
def fwd_stats_rc_kernel(
    x_ptr,          # (R, K) input, contiguous rows
    pcnt_ptr,       # (K, SPLIT) float32 out: partial counts (column k, row group p)
    pmean_ptr,      # (K, SPLIT) float32 out: partial means minus the channel's pivot
    pm2_ptr,        # (K, SPLIT) float32 out: partial M2
    R, K,           # rows, columns
    GROUP,          # columns per channel (the pivot is the channel's first column)
    SPLIT,          # row groups
    ROWS_PER_PROG,  # rows per program (a multiple of BLOCK_R)
    flag_ptr,       # () int32: zeroed here, for fwd_merge_kernel's non-finite flag
    IDX64: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_K: tl.constexpr,  # contiguous columns per tile
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(K, BLOCK_K) * SPLIT,): program kb*SPLIT + p."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(flag_ptr, 0)
    cols, cmask, r0, r1 = _rc_split(pid, K, R, SPLIT, ROWS_PER_PROG, BLOCK_K)
    p = pid % SPLIT
    cnt, mean, m2 = _welford_rc(x_ptr, cols, cmask, K, GROUP, r0, r1, IDX64, BLOCK_R, BLOCK_K,
                                NUM_STAGES)
    dst = cols * SPLIT + p
    tl.store(pcnt_ptr + dst, cnt, mask=cmask)
    tl.store(pmean_ptr + dst, mean, mask=cmask)
    tl.store(pm2_ptr + dst, m2, mask=cmask)


@triton.jit
def _merge_partials(pcnt_ptr, pmean_ptr, pm2_ptr, c, cmask, SPLIT,
                    BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr):
    """Merge the SPLIT partials of channels ``c`` ((C, SPLIT) row-major buffers)."""
    rsp = tl.arange(0, BLOCK_SP)
    acc_n = tl.zeros([BLOCK_C], tl.float32)
    acc_mean = tl.zeros([BLOCK_C], tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, SPLIT, BLOCK_SP):
        sp = p0 + rsp
        mask = cmask[:, None] & (sp < SPLIT)[None, :]
        offs = c[:, None] * SPLIT + sp[None, :]
        n = tl.load(pcnt_ptr + offs, mask=mask, other=0.0)
        mu = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        bn, bmean, bm2 = _merge_axis(n, mu, q, 1)
        acc_n, acc_mean, acc_m2 = _chan_merge(acc_n, acc_mean, acc_m2, bn, bmean, bm2)
    return acc_n, acc_mean, acc_m2


@triton.jit
def fwd_merge_kernel(
    pcnt_ptr, pmean_ptr, pm2_ptr,  # (C, SPLIT) float32 partials (count, mean - pivot, M2)
    x_ptr,          # the input: pivots x[0, c, 0] at c * pivot_stride
    pivot_stride,   # S (NCS and the (N, C*S) view), 1 (rows of C)
    mean_ptr,       # (C,) float64 out: batch mean, float32 value + its rounding error
    invstd_ptr,     # (C,) float32 out: 1/sqrt(var + eps)
    varu_ptr,       # (C,) float32 out: unbiased variance, for the running update (UPDATE)
    f_ptr,          # () float32 out: the running-update factor (UPDATE)
    flag_ptr,       # () int32, zeroed by the stats kernel: atomic max of "some channel's
                    # mean or variance is not finite" (UPDATE)
    tracked_ptr,    # () int64 num_batches_tracked (read for CUMULATIVE)
    C, SPLIT,
    eps, momentum,
    UPDATE: tl.constexpr, HAS_TRACKED: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): merge the partials of a block of channels (split path).
    The running statistics are updated by the normalize kernel that follows, once every
    block has voted on finiteness (kernel boundaries order the two on the device)."""
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    cnt, mean, m2 = _merge_partials(pcnt_ptr, pmean_ptr, pm2_ptr, c, cmask, SPLIT,
                                    BLOCK_C, BLOCK_SP)
    # int64: (C - 1)·S passes 2^31 on large inputs, and this kernel sees no IDX64 flag.
    pivot = tl.load(x_ptr + c.to(tl.int64) * pivot_stride, mask=cmask, other=0.0).to(tl.float32)
    mean, dmean = _two_sum(mean, pivot)
    var = tl.div_rn(m2, tl.maximum(cnt, 1.0))
    _store_mean(mean_ptr + c, mean, dmean, cmask)
    tl.store(invstd_ptr + c, _invstd(var, eps), mask=cmask)
    if UPDATE:
        var_u = tl.div_rn(m2, cnt - 1.0)
        tl.store(varu_ptr + c, var_u, mask=cmask)
        nf = tl.where(cmask, _not_finite(mean) | _not_finite(var_u), 0)
        tl.atomic_max(flag_ptr, tl.max(nf, 0))
        if pid == 0:
            if CUMULATIVE:
                if HAS_TRACKED:
                    f = tl.div_rn(1.0, tl.load(tracked_ptr).to(tl.float32) + 1.0)
                else:
                    f = 1.0
            else:
                f = momentum
            tl.store(f_ptr, f)


@triton.jit
def _blend_mean(f, mean, rm):
    """f * mean + (1 - f) * rm for the float64 batch mean, in float64: a float64
    running mean (the scratch buffers of ghost batch norm's chunks, say) then receives
    every digit of the mean, and a float32 one is rounded once."""
    # (f stays float32, as in the float32 update; the products promote to float64)
    return f * mean + (1.0 - f) * rm.to(tl.float64)


@triton.jit
def _store_running_mean(ptr, value, mask):
    """Store the float64 ``value`` in the running mean's dtype; narrower than float64
    through float32 (a float64 -> bfloat16 conversion is not lowered everywhere)."""
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _running_update(c, umask, mean, dmean, flag_ptr, f_ptr, varu_ptr, rm_ptr, rv_ptr,
                    rm_stride, rv_stride, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr):
    """running <- (1 - f) running + f batch for channels c where umask, if the batch's
    statistics are finite everywhere (flag == 0); the batch mean is ``mean + dmean``
    (float32 and its rounding, _affine)."""
    ok = tl.load(flag_ptr + c * 0) == 0  # (c * 0: a tensor of c's shape)
    m = umask & ok
    f = tl.load(f_ptr + c * 0)
    if HAS_RM:
        rm = tl.load(rm_ptr + c * rm_stride, mask=m, other=0.0)
        rm = _blend_mean(f, mean.to(tl.float64) + dmean.to(tl.float64), rm)
        _store_running_mean(rm_ptr + c * rm_stride, rm, m)
    if HAS_RV:
        var_u = tl.load(varu_ptr + c, mask=m, other=0.0)
        rv = tl.load(rv_ptr + c * rv_stride, mask=m, other=0.0).to(tl.float32)
        rv = f * var_u + (1.0 - f) * rv
        tl.store(rv_ptr + c * rv_stride, rv.to(rv_ptr.dtype.element_ty), mask=m)


@triton.jit
def _count_batch(flag_ptr, tracked_ptr, skipped_ptr,
                 HAS_TRACKED: tl.constexpr, HAS_SKIPPED: tl.constexpr):
    """num_batches_tracked += ok; num_batches_skipped += not ok (one program calls this)."""
    ok = (tl.load(flag_ptr) == 0).to(tl.int64)
    if HAS_TRACKED:
        tl.store(tracked_ptr, tl.load(tracked_ptr) + ok)
    if HAS_SKIPPED:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + (1 - ok))


@triton.jit
def fwd_running_kernel(
    cnt_ptr, m2_ptr,  # (C,) float32 per-channel count and M2 of the batch
    mean_ptr,       # (C,) float64 batch mean (_store_mean)
    rm_ptr, rv_ptr,  # (C,) running mean / var, any float dtype, updated in place
    rm_stride, rv_stride,  # their element strides
    tracked_ptr,    # () int64 num_batches_tracked, += 1 on a good batch
    skipped_ptr,    # () int64 num_batches_skipped, += 1 on a skipped batch
    C,
    momentum,       # float EMA factor (ignored when CUMULATIVE)
    HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    HAS_TRACKED: tl.constexpr, HAS_SKIPPED: tl.constexpr,
    CUMULATIVE: tl.constexpr,   # momentum=None: factor 1/(num_batches_tracked + 1)
    BLOCK_C: tl.constexpr,
):
    """Grid (1,), after the fused kernels: if every channel's mean and unbiased variance
    is finite, the running-statistics update; the counters either way. One program reads
    2-3 values per channel twice, so the decision stays on the device without a flag."""
    rc = tl.arange(0, BLOCK_C)
    bad = 0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + rc
        cmask = c < C
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
        var_u = tl.div_rn(tl.load(m2_ptr + c, mask=cmask, other=0.0),
                          tl.load(cnt_ptr + c, mask=cmask, other=2.0) - 1.0)
        nf = tl.where(cmask, _not_finite(mean) | _not_finite(var_u), 0)
        bad = tl.maximum(bad, tl.max(nf, 0))
    if HAS_TRACKED:
        tracked = tl.load(tracked_ptr)
    if CUMULATIVE:
        if HAS_TRACKED:
            f = tl.div_rn(1.0, tracked.to(tl.float32) + 1.0)
        else:
            f = 1.0
    else:
        f = momentum
    if HAS_RM or HAS_RV:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + rc
            # (a vector compare: the interpreter mishandles bool-vector & bool-scalar)
            m = (c < C) & ((rc * 0 + bad) == 0)
            if HAS_RM:
                mean = tl.load(mean_ptr + c, mask=m, other=0.0)
                rm = _blend_mean(f, mean, tl.load(rm_ptr + c * rm_stride, mask=m, other=0.0))
                _store_running_mean(rm_ptr + c * rm_stride, rm, m)
            if HAS_RV:
                var_u = tl.div_rn(tl.load(m2_ptr + c, mask=m, other=0.0),
                                  tl.load(cnt_ptr + c, mask=m, other=2.0) - 1.0)
                rv = tl.load(rv_ptr + c * rv_stride, mask=m, other=0.0).to(tl.float32)
                rv = f * var_u + (1.0 - f) * rv
                tl.store(rv_ptr + c * rv_stride, rv.to(rv_ptr.dtype.element_ty), mask=m)
    ok = (bad == 0).to(tl.int64)
    if HAS_TRACKED:
        tl.store(tracked_ptr, tracked + ok)
    if HAS_SKIPPED:
        tl.store(skipped_ptr, tl.load(skipped_ptr) + (1 - ok))


@triton.jit
def norm_ncs_kernel(
    x_ptr,          # (N, C, S) input
    y_ptr,          # (N, C, S) out, x's dtype
    res_ptr,        # (N, C, S) residual added before the activation (HAS_RES)
    mean_ptr,       # (C,) batch mean (float64, fwd_merge_kernel), or running mean (EVAL)
    var_ptr,        # (C,) batch invstd (float32), or running var when EVAL
    w_ptr, b_ptr,   # (C,) weight / bias (HAS_W / HAS_B)
    N, C, S,
    SPLIT, P_N, SB_PER_PROG, N_PER_PROG,  # the partition (as in fwd_stats_ncs_kernel)
    NUM_PROGS,      # C * SPLIT
    eps, slope,     # eps (EVAL only); leaky_relu negative slope
    # running-statistics update (UPDATE; see fwd_merge_kernel): done by the first
    # partition program of each channel, the counters by program 0
    varu_ptr, f_ptr, flag_ptr,  # (C,) unbiased var, () factor, () int32 non-finite flag
    rm_ptr, rv_ptr, rm_stride, rv_stride,  # (C,) running mean / var (any float dtype)
    tracked_ptr, skipped_ptr,   # () int64 counters
    EVAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr,
    UPDATE: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    HAS_TRACKED: tl.constexpr, HAS_SKIPPED: tl.constexpr,
    REVERSE: tl.constexpr,  # walk the partition backwards: the stats pass just read its
                            # end, so that part is still in L2
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C * SPLIT,): y = act((x - mean) * w * invstd + b - dmean * w * invstd
    [+ residual]), mean the stored mean rounded to float32 and dmean the rest (_affine;
    0 for a float32 running mean in EVAL, which is then the centre)."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = NUM_PROGS - 1 - pid
    c, sb0, sb1, n0, n1 = _ncs_split(pid, C, S, N, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, BLOCK_S)
    mean, dmean, _, scale, shift = _affine(c, c < C, mean_ptr, var_ptr, w_ptr, b_ptr, eps,
                                           EVAL, HAS_W, HAS_B)
    shift -= dmean * scale
    if UPDATE:
        if pid % SPLIT == 0:
            _running_update(c, c < C, mean, dmean, flag_ptr, f_ptr, varu_ptr, rm_ptr,
                            rv_ptr, rm_stride, rv_stride, HAS_RM, HAS_RV)
        if pid == 0:
            _count_batch(flag_ptr, tracked_ptr, skipped_ptr, HAS_TRACKED, HAS_SKIPPED)
    if IDX64:
        c = c.to(tl.int64)
    _normalize_ncs(x_ptr, y_ptr, res_ptr, c * S, (c * 0 + C) * S, S, sb0, sb1, n0, n1,
                   mean, scale, shift, slope, ACT, HAS_RES, IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)


@triton.jit
def norm_rc_kernel(
    x_ptr,          # (R, K) input
    y_ptr,          # (R, K) out
    res_ptr,        # (R, K) residual (HAS_RES)
    mean_ptr, var_ptr,  # (C,) mean (float64) and invstd, or running mean/var when EVAL
    w_ptr, b_ptr,   # (C,) weight / bias
    R, K,
    GROUP,          # columns per channel: channel = column // GROUP
    SPLIT, ROWS_PER_PROG,
    NUM_PROGS,      # cdiv(K, BLOCK_K) * SPLIT
    eps, slope,
    varu_ptr, f_ptr, flag_ptr,  # running-statistics update, as in norm_ncs_kernel
    rm_ptr, rv_ptr, rm_stride, rv_stride,
    tracked_ptr, skipped_ptr,
    EVAL: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr,
    UPDATE: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    HAS_TRACKED: tl.constexpr, HAS_SKIPPED: tl.constexpr,
    REVERSE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(K, BLOCK_K) * SPLIT,): the RC twin of norm_ncs_kernel."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = NUM_PROGS - 1 - pid
    cols, cmask, r0, r1 = _rc_split(pid, K, R, SPLIT, ROWS_PER_PROG, BLOCK_K)
    mean, dmean, _, scale, shift = _affine(cols // GROUP, cmask, mean_ptr, var_ptr, w_ptr,
                                           b_ptr, eps, EVAL, HAS_W, HAS_B)
    shift -= dmean * scale
    if UPDATE:
        if pid % SPLIT == 0:
            # one column per channel: the first of its GROUP columns
            _running_update(cols // GROUP, cmask & (cols % GROUP == 0), mean, dmean,
                            flag_ptr, f_ptr, varu_ptr, rm_ptr, rv_ptr, rm_stride, rv_stride,
                            HAS_RM, HAS_RV)
        if pid == 0:
            _count_batch(flag_ptr, tracked_ptr, skipped_ptr, HAS_TRACKED, HAS_SKIPPED)
    _normalize_rc(x_ptr, y_ptr, res_ptr, cols, cmask, K, r0, r1, mean, scale, shift, slope,
                  ACT, HAS_RES, IDX64, BLOCK_R, BLOCK_K, NUM_STAGES)


# ----------------------------------------------------------------------------------------
# forward, training: fused path (one program per channel / column block)
# ----------------------------------------------------------------------------------------
@triton.jit
def fwd_fused_ncs_kernel(
    x_ptr,          # (N, C, S) input
    y_ptr,          # (N, C, S) out
    res_ptr,        # (N, C, S) residual (HAS_RES)
    w_ptr, b_ptr,   # (C,) weight / bias
    mean_ptr,       # (C,) float64 out: batch mean (_store_mean)
    invstd_ptr,     # (C,) float32 out: batch invstd
    pcnt_ptr, pm2_ptr,  # (C,) float32 out: count and M2 for the running-statistics
                        # update (fwd_running_kernel, which reads the mean from mean_ptr)
    N, C, S,
    m_f,            # float N*S (elements per channel)
    eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # the whole channel fits one [BLOCK_N, BLOCK_S] tile: read
                                # once, keep in registers (exact two-pass statistics);
                                # else Welford loop + normalize loop (re-read from L2)
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C,): statistics and output of channel c in one program."""
    c = tl.program_id(0)
    if IDX64:
        c = c.to(tl.int64)
    ch_off = c * S
    stride_n = (c * 0 + C) * S  # int64 when c is
    if SINGLE_TILE:
        rn = tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_S)
        if IDX64:
            rn = rn.to(tl.int64)
        mask = (rn < N)[:, None] & (rs < S)[None, :]
        offs = rn[:, None] * stride_n + ch_off + rs[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cnt = m_f
        # corrected two-pass on the tile: centre on the rounded mean, then remove the
        # centre's error d = sum(x - mean)/m from the deviations (x is dead after this)
        mean = tl.div_rn(tl.sum(tl.sum(x, 1), 0), cnt)
        xmu = tl.where(mask, x - mean, 0.0)
        d = tl.sum(tl.sum(xmu, 1), 0) / cnt
        xmu = tl.where(mask, xmu - d, 0.0)
        mean, dmean = _two_sum(mean, d)
        m2 = tl.sum(tl.sum(xmu * xmu, 1), 0)
        istd = _invstd(tl.div_rn(m2, tl.maximum(cnt, 1.0)), eps)
        scale, shift = _scale_shift(c, c < C, istd, w_ptr, b_ptr, HAS_W, HAS_B)
        z = xmu * scale + shift
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _act(z, slope, ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        nsb = tl.cdiv(S, BLOCK_S)
        cnt, mean, m2 = _welford_ncs(x_ptr, ch_off, stride_n, S, 0, nsb, 0, N,
                                     IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)
        mean, dmean = _two_sum(mean, tl.load(x_ptr + ch_off).to(tl.float32))  # + the pivot
        istd = _invstd(tl.div_rn(m2, tl.maximum(cnt, 1.0)), eps)
        scale, shift = _scale_shift(c, c < C, istd, w_ptr, b_ptr, HAS_W, HAS_B)
        _normalize_ncs(x_ptr, y_ptr, res_ptr, ch_off, stride_n, S, 0, nsb, 0, N,
                       mean, scale, shift - dmean * scale, slope, ACT, HAS_RES, IDX64,
                       BLOCK_N, BLOCK_S, NUM_STAGES)
    _store_mean(mean_ptr + c, mean, dmean, c < C)
    tl.store(invstd_ptr + c, istd)
    tl.store(pcnt_ptr + c, cnt)
    tl.store(pm2_ptr + c, m2)


@triton.jit
def fwd_fused_rc_kernel(
    x_ptr,          # (R, C) input (channels_last / 2D), contiguous rows
    y_ptr,          # (R, C) out
    res_ptr,        # (R, C) residual (HAS_RES)
    w_ptr, b_ptr,   # (C,)
    mean_ptr, invstd_ptr,          # (C,) float64 / float32 out
    pcnt_ptr, pm2_ptr,  # (C,) float32 out, for fwd_running_kernel
    R, C,
    m_f,            # float R
    eps, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # all R rows fit one [BLOCK_R, BLOCK_C] tile
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(C, BLOCK_C),): statistics and output of a block of channels."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    if SINGLE_TILE:
        rr = tl.arange(0, BLOCK_R)
        if IDX64:
            rr = rr.to(tl.int64)
        mask = (rr < R)[:, None] & cmask[None, :]
        offs = rr[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.zeros([BLOCK_C], tl.float32) + m_f
        mean = tl.div_rn(tl.sum(x, 0), cnt)
        xmu = tl.where(mask, x - mean[None, :], 0.0)
        d = tl.sum(xmu, 0) / cnt
        xmu = tl.where(mask, xmu - d[None, :], 0.0)
        mean, dmean = _two_sum(mean, d)
        m2 = tl.sum(xmu * xmu, 0)
        istd = _invstd(tl.div_rn(m2, tl.maximum(cnt, 1.0)), eps)
        scale, shift = _scale_shift(cols, cmask, istd, w_ptr, b_ptr, HAS_W, HAS_B)
        z = xmu * scale[None, :] + shift[None, :]
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _act(z, slope, ACT)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        cnt, mean, m2 = _welford_rc(x_ptr, cols, cmask, C, 1, 0, R, IDX64, BLOCK_R, BLOCK_C,
                                    NUM_STAGES)
        pivot = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        mean, dmean = _two_sum(mean, pivot)
        istd = _invstd(tl.div_rn(m2, tl.maximum(cnt, 1.0)), eps)
        scale, shift = _scale_shift(cols, cmask, istd, w_ptr, b_ptr, HAS_W, HAS_B)
        _normalize_rc(x_ptr, y_ptr, res_ptr, cols, cmask, C, 0, R, mean, scale,
                      shift - dmean * scale, slope, ACT, HAS_RES, IDX64, BLOCK_R, BLOCK_C,
                      NUM_STAGES)
    _store_mean(mean_ptr + cols, mean, dmean, cmask)
    tl.store(invstd_ptr + cols, istd, mask=cmask)
    tl.store(pcnt_ptr + cols, cnt, mask=cmask)
    tl.store(pm2_ptr + cols, m2, mask=cmask)


# ----------------------------------------------------------------------------------------
# backward, training
# ----------------------------------------------------------------------------------------
@triton.jit
def bwd_reduce_ncs_kernel(
    dout_ptr,       # (N, C, S) gradient of the output
    x_ptr,          # (N, C, S) forward input
    out_ptr,        # (N, C, S) forward output (FROM_OUT: relu / leaky_relu mask)
    res_ptr,        # (N, C, S) forward residual (to rebuild z when not FROM_OUT)
    mean_ptr, invstd_ptr,  # (C,) saved statistics: float64 mean (float32 works), invstd
    w_ptr, b_ptr,   # (C,) weight / bias (bias only to rebuild z)
    psum_ptr,       # (C, SPLIT) float32 out: partial sum(dz)  [FINAL: (C,) dbias]
    psumx_ptr,      # (C, SPLIT) float32 out: partial sum(dz*(x - mean))  [FINAL: (C,) dweight]
    N, C, S, SPLIT, P_N, SB_PER_PROG, N_PER_PROG,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr,
    FINAL: tl.constexpr,  # SPLIT == 1: write dbias and dweight = invstd*sum directly
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C * SPLIT,)."""
    pid = tl.program_id(0)
    c, sb0, sb1, n0, n1 = _ncs_split(pid, C, S, N, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, BLOCK_S)
    mean, dmean, istd, scale, shift = _affine(c, c < C, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                              0.0, False, HAS_W, HAS_B)
    if IDX64:
        c = c.to(tl.int64)
    sg, sgx = _bwd_sums_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, c * S, (c * 0 + C) * S, S,
                            sb0, sb1, n0, n1, mean, dmean, scale, shift, slope,
                            ACT, FROM_OUT, HAS_RES, IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)
    if FINAL:
        sgx = sgx * istd
    tl.store(psum_ptr + pid, sg)
    tl.store(psumx_ptr + pid, sgx)


@triton.jit
def bwd_reduce_rc_kernel(
    dout_ptr, x_ptr, out_ptr, res_ptr,  # (R, K) as in bwd_reduce_ncs_kernel
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    psum_ptr,       # (K, SPLIT) float32 out: partial sum(dz)  [FINAL: (C,) dbias]
    psumx_ptr,      # (K, SPLIT) float32 out: partial sum(dz*(x-mean))  [FINAL: dweight]
    R, K, GROUP, SPLIT, ROWS_PER_PROG,
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr,
    FINAL: tl.constexpr,  # SPLIT == 1 and GROUP == 1
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(K, BLOCK_K) * SPLIT,)."""
    pid = tl.program_id(0)
    cols, cmask, r0, r1 = _rc_split(pid, K, R, SPLIT, ROWS_PER_PROG, BLOCK_K)
    p = pid % SPLIT
    mean, dmean, istd, scale, shift = _affine(cols // GROUP, cmask, mean_ptr, invstd_ptr,
                                              w_ptr, b_ptr, 0.0, False, HAS_W, HAS_B)
    sg, sgx = _bwd_sums_rc(dout_ptr, x_ptr, out_ptr, res_ptr, cols, cmask, K, r0, r1,
                           mean, dmean, scale, shift, slope, ACT, FROM_OUT, HAS_RES,
                           IDX64, BLOCK_R, BLOCK_K, NUM_STAGES)
    if FINAL:
        sgx = sgx * istd
    dst = cols * SPLIT + p
    tl.store(psum_ptr + dst, sg, mask=cmask)
    tl.store(psumx_ptr + dst, sgx, mask=cmask)


@triton.jit
def bwd_finalize_kernel(
    psum_ptr, psumx_ptr,  # (C, SPLIT) float32 partial sums of dz and dz*(x - mean)
    invstd_ptr,     # (C,) float32
    dbias_ptr,      # (C,) float32 out: sum(dz)
    dweight_ptr,    # (C,) float32 out: sum(dz * x_hat)
    C, SPLIT,
    BLOCK_C: tl.constexpr, BLOCK_SP: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C),): sum the partials (a fixed order: deterministic)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    rsp = tl.arange(0, BLOCK_SP)
    sg = tl.zeros([BLOCK_C], tl.float32)
    sgx = tl.zeros([BLOCK_C], tl.float32)
    for p0 in range(0, SPLIT, BLOCK_SP):
        sp = p0 + rsp
        mask = cmask[:, None] & (sp < SPLIT)[None, :]
        offs = c[:, None] * SPLIT + sp[None, :]
        sg += tl.sum(tl.load(psum_ptr + offs, mask=mask, other=0.0), 1)
        sgx += tl.sum(tl.load(psumx_ptr + offs, mask=mask, other=0.0), 1)
    istd = tl.load(invstd_ptr + c, mask=cmask, other=0.0)
    tl.store(dbias_ptr + c, sg, mask=cmask)
    tl.store(dweight_ptr + c, sgx * istd, mask=cmask)


@triton.jit
def _dx_coefs(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr, dbias_ptr, dweight_ptr, inv_m,
              HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel (mean, dmean, scale, shift, mg, c2) for
    dx = scale*(dz - mg) - (x - mean - dmean)*c2."""
    mean, dmean, istd, scale, shift = _affine(c, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                              0.0, False, HAS_W, HAS_B)
    mg = tl.load(dbias_ptr + c, mask=cmask, other=0.0) * inv_m
    c2 = scale * istd * (tl.load(dweight_ptr + c, mask=cmask, other=0.0) * inv_m)
    return mean, dmean, scale, shift, mg, c2


@triton.jit
def bwd_dx_ncs_kernel(
    dout_ptr, x_ptr, out_ptr, res_ptr,  # (N, C, S) as in bwd_reduce_ncs_kernel
    dx_ptr,         # (N, C, S) out: gradient of x, x's dtype
    dres_ptr,       # (N, C, S) out: gradient of the residual = dz (WRITE_DRES)
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    dbias_ptr, dweight_ptr,  # (C,) float32: sum(dz), sum(dz*x_hat)
    N, C, S, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, NUM_PROGS,
    inv_m,          # 1 / (N*S)
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr, WRITE_DRES: tl.constexpr,
    REVERSE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C * SPLIT,)."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = NUM_PROGS - 1 - pid
    c, sb0, sb1, n0, n1 = _ncs_split(pid, C, S, N, SPLIT, P_N, SB_PER_PROG, N_PER_PROG, BLOCK_S)
    mean, dmean, scale, shift, mg, c2 = _dx_coefs(c, c < C, mean_ptr, invstd_ptr, w_ptr,
                                                  b_ptr, dbias_ptr, dweight_ptr, inv_m,
                                                  HAS_W, HAS_B)
    if IDX64:
        c = c.to(tl.int64)
    _dx_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr, c * S, (c * 0 + C) * S, S,
            sb0, sb1, n0, n1, mean, dmean, scale, shift, mg, c2, slope,
            ACT, FROM_OUT, HAS_RES, WRITE_DRES, IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)


@triton.jit
def bwd_dx_rc_kernel(
    dout_ptr, x_ptr, out_ptr, res_ptr,  # (R, K)
    dx_ptr, dres_ptr,                   # (R, K) out
    mean_ptr, invstd_ptr, w_ptr, b_ptr, dbias_ptr, dweight_ptr,  # (C,)
    R, K, GROUP, SPLIT, ROWS_PER_PROG, NUM_PROGS,
    inv_m, slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr, WRITE_DRES: tl.constexpr,
    REVERSE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(K, BLOCK_K) * SPLIT,)."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = NUM_PROGS - 1 - pid
    cols, cmask, r0, r1 = _rc_split(pid, K, R, SPLIT, ROWS_PER_PROG, BLOCK_K)
    mean, dmean, scale, shift, mg, c2 = _dx_coefs(cols // GROUP, cmask, mean_ptr, invstd_ptr,
                                                  w_ptr, b_ptr, dbias_ptr, dweight_ptr, inv_m,
                                                  HAS_W, HAS_B)
    _dx_rc(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr, cols, cmask, K, r0, r1,
           mean, dmean, scale, shift, mg, c2, slope, ACT, FROM_OUT, HAS_RES, WRITE_DRES,
           IDX64, BLOCK_R, BLOCK_K, NUM_STAGES)


@triton.jit
def bwd_fused_ncs_kernel(
    dout_ptr, x_ptr, out_ptr, res_ptr,  # (N, C, S)
    dx_ptr, dres_ptr,                   # (N, C, S) out
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    dbias_ptr, dweight_ptr,             # (C,) float32 out
    N, C, S,
    inv_m,          # float 1 / (N*S)
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr, WRITE_DRES: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # the channel fits one tile: dout and x read once
    IDX64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (C,): both reductions and dx of channel c in one program."""
    c = tl.program_id(0)
    mean, dmean, istd, scale, shift = _affine(c, c < C, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                              0.0, False, HAS_W, HAS_B)
    if IDX64:
        c = c.to(tl.int64)
    ch_off = c * S
    stride_n = (c * 0 + C) * S  # int64 when c is
    if SINGLE_TILE:
        rn = tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_S)
        if IDX64:
            rn = rn.to(tl.int64)
        mask = (rn < N)[:, None] & (rs < S)[None, :]
        offs = rn[:, None] * stride_n + ch_off + rs[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xmu = tl.where(mask, (x - mean) - dmean, 0.0)
        g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale, shift, slope,
                    ACT, FROM_OUT, HAS_RES)
        sg = tl.sum(tl.sum(g, 1), 0)
        sgx = tl.sum(tl.sum(g * xmu, 1), 0)
        dw = sgx * istd
        dx = scale * (g - sg * inv_m) - xmu * (scale * istd * (dw * inv_m))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DRES:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)
    else:
        nsb = tl.cdiv(S, BLOCK_S)
        sg, sgx = _bwd_sums_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, ch_off, stride_n, S,
                                0, nsb, 0, N, mean, dmean, scale, shift, slope,
                                ACT, FROM_OUT, HAS_RES, IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)
        dw = sgx * istd
        _dx_ncs(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr, ch_off, stride_n, S,
                0, nsb, 0, N, mean, dmean, scale, shift, sg * inv_m,
                scale * istd * (dw * inv_m),
                slope, ACT, FROM_OUT, HAS_RES, WRITE_DRES, IDX64, BLOCK_N, BLOCK_S, NUM_STAGES)
    tl.store(dbias_ptr + c, sg)
    tl.store(dweight_ptr + c, dw)


@triton.jit
def bwd_fused_rc_kernel(
    dout_ptr, x_ptr, out_ptr, res_ptr,  # (R, C)
    dx_ptr, dres_ptr,                   # (R, C) out
    mean_ptr, invstd_ptr, w_ptr, b_ptr,  # (C,)
    dbias_ptr, dweight_ptr,             # (C,) float32 out
    R, C,
    inv_m,          # float 1 / R
    slope,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    ACT: tl.constexpr, FROM_OUT: tl.constexpr, WRITE_DRES: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    IDX64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the streaming loops
):
    """Grid (cdiv(C, BLOCK_C),)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, dmean, istd, scale, shift = _affine(cols, cmask, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                              0.0, False, HAS_W, HAS_B)
    if SINGLE_TILE:
        rr = tl.arange(0, BLOCK_R)
        if IDX64:
            rr = rr.to(tl.int64)
        mask = (rr < R)[:, None] & cmask[None, :]
        offs = rr[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xmu = tl.where(mask, (x - mean[None, :]) - dmean[None, :], 0.0)
        g = _grad_z(dout_ptr, out_ptr, res_ptr, offs, mask, xmu, scale[None, :],
                    shift[None, :], slope, ACT, FROM_OUT, HAS_RES)
        sg = tl.sum(g, 0)
        sgx = tl.sum(g * xmu, 0)
        dw = sgx * istd
        c2 = scale * istd * (dw * inv_m)
        dx = scale[None, :] * (g - (sg * inv_m)[None, :]) - xmu * c2[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DRES:
            tl.store(dres_ptr + offs, g.to(dres_ptr.dtype.element_ty), mask=mask)
    else:
        sg, sgx = _bwd_sums_rc(dout_ptr, x_ptr, out_ptr, res_ptr, cols, cmask, C, 0, R,
                               mean, dmean, scale, shift, slope, ACT, FROM_OUT, HAS_RES,
                               IDX64, BLOCK_R, BLOCK_C, NUM_STAGES)
        dw = sgx * istd
        _dx_rc(dout_ptr, x_ptr, out_ptr, res_ptr, dx_ptr, dres_ptr, cols, cmask, C, 0, R,
               mean, dmean, scale, shift, sg * inv_m, scale * istd * (dw * inv_m), slope,
               ACT, FROM_OUT, HAS_RES, WRITE_DRES, IDX64, BLOCK_R, BLOCK_C, NUM_STAGES)
    tl.store(dbias_ptr + cols, sg, mask=cmask)
    tl.store(dweight_ptr + cols, dw, mask=cmask)
