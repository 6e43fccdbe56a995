"""Host side of the Triton batch-norm kernels: views, plans, allocation, launches.

:data:`BACKEND` fulfils the contract of :mod:`batchnorm._backends` (``forward_train``,
``backward_train``, ``forward_eval``). The fused BN + residual add + activation used by
BatchNormAct is exposed as :func:`act_forward_train`, :func:`act_backward_train` and
:func:`act_forward_eval`. The kernels are in :mod:`batchnorm.kernels.triton_bn`;
docs/triton.md describes the passes, the grids and when each path is taken.

Nothing here synchronizes with the device: the plan depends only on shapes, dtypes and
the device's multiprocessor count, and the skip-on-non-finite decision is made by a
kernel. The functions are therefore safe to capture in a CUDA graph. No kernel is
autotuned (the ones that update running statistics must not be replayed by a tuner);
block sizes come from the shape heuristics below, which :data:`TUNING` exposes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from batchnorm.kernels import triton_bn as _k

__all__ = [
    "BACKEND",
    "TUNING",
    "TritonBackend",
    "Tuning",
    "act_backward_train",
    "act_forward_eval",
    "act_forward_train",
    "plan_for",
]

_ACTIVATIONS = {
    "identity": _k.ACT_IDENTITY,
    "none": _k.ACT_IDENTITY,
    "relu": _k.ACT_RELU,
    "leaky_relu": _k.ACT_LEAKY_RELU,
    "silu": _k.ACT_SILU,
}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Tuning:
    """Knobs of the launch heuristics (module-level :data:`TUNING`; tests and the
    benchmark change them, nothing else should need to)."""

    force_path: str | None = None  # "fused" or "split": override the choice below
    num_sms: int | None = None  # override the device's multiprocessor count
    l2_bytes: int | None = None  # override the device's L2 size
    waves: int = 8  # split path: aim for waves * SMs programs (small tail imbalance)
    fused_tile: int = 4096  # elements per loop iteration, fused loop (16 warps)
    single_tile_max: int = 8192  # padded elements one program keeps in registers (fwd);
    # 8192 fp32 values are 32 KB of registers: two or more programs per SM overlap
    single_tile_max_bwd: int = 4096  # the same for backward (dy and x live)
    l2_fraction: float = 0.6  # fused loop: resident programs' data must fit this much L2
    tiny_bytes: int = 1 << 20  # below this a launch-bound input takes the fused path...
    tiny_program_bytes: int = 128 << 10  # ...if no program has more than this to read
    stats_tile: int = 2048  # elements per loop iteration, reduction kernels
    stream_tile: int = 4096  # elements per loop iteration, eval (elementwise) kernel
    max_block_s: int = 2048  # longest contiguous run of one tile row (NCS)
    max_block_k: int = 128  # widest column block (RC)
    small_s: int = 16  # NCS with spatial size below this is viewed as (N, C*S)
    num_stages: int = 3  # software pipelining (cp.async into shared memory) of the loops
    num_stages_multi: int = 2  # the same for loops that load 3 or more tensors
    max_partials: int = 1 << 18  # bound on partial statistics (memory, merge cost)


TUNING = Tuning()


# ----------------------------------------------------------------------------------------
# views and plans
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _View:
    """How the kernels see x: NCS (N, C, S) contiguous, or RC (R, C) contiguous rows."""

    kind: str  # "ncs" or "rc"
    N: int
    C: int
    S: int  # ncs: spatial size; rc: 1
    R: int  # rc: rows (N * spatial); ncs: N
    m: int  # elements per channel


@dataclass(frozen=True)
class Plan:
    """One launch configuration (see :func:`plan_for`)."""

    path: str  # "fused" | "split" | "stream"
    kernels: str  # "ncs" | "rc" (RC with group = C*S columns when S is small)
    single_tile: bool = False
    block_a: int = 1  # BLOCK_N (ncs) or BLOCK_R (rc)
    block_b: int = 1  # BLOCK_S (ncs) or BLOCK_K / BLOCK_C (rc)
    split: int = 1  # partials per channel (ncs) or per column (rc)
    p_n: int = 1  # ncs: row groups per s-block group
    sb_per_prog: int = 1  # ncs
    rows_per_prog: int = 1  # ncs: N_PER_PROG; rc: ROWS_PER_PROG
    group: int = 1  # rc: columns per channel
    programs: int = 1  # grid size
    num_warps: int = 4


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pp2(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _warps(tile: int) -> int:
    """Warps per program: 8 elements per thread for loop tiles (2048 -> 8 warps)."""
    if tile <= 512:
        return 2
    if tile <= 1024:
        return 4
    if tile <= 2048:
        return 8
    return 16


@functools.cache
def _device_props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, int(getattr(p, "L2_cache_size", 50 << 20))


def _num_sms(x: Tensor) -> int:
    if TUNING.num_sms:
        return TUNING.num_sms
    if x.is_cuda:
        return _device_props(x.device.index if x.device.index is not None else 0)[0]
    return 4  # the interpreter: keep grids small


def _l2_bytes(x: Tensor) -> int:
    if TUNING.l2_bytes:
        return TUNING.l2_bytes
    if x.is_cuda:
        return _device_props(x.device.index if x.device.index is not None else 0)[1]
    return 50 << 20


def _is_rows_of_channels(x: Tensor) -> bool:
    """True when x is dense with the channel dim innermost (channels_last, a transposed
    (N, L, C) buffer...), so that it is a contiguous (N*S, C) matrix."""
    if x.dim() < 3 or x.stride(1) != 1:
        return False
    perm = [0, *range(2, x.dim()), 1]
    return x.permute(perm).is_contiguous()


def _prepare(x: Tensor) -> tuple[Tensor, _View]:
    """x as the kernels can read it (a contiguous copy only for odd strides) + its view."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    if x.dim() == 2 or S == 1:
        if not (x.is_contiguous() or (x.dim() > 2 and _is_rows_of_channels(x))):
            x = x.contiguous()
        return x, _View("rc", N, C, 1, N, N)
    if x.is_contiguous():
        return x, _View("ncs", N, C, S, N, N * S)
    if _is_rows_of_channels(x):
        return x, _View("rc", N, C, S, N * S, N * S)
    x = x.contiguous()
    return x, _View("ncs", N, C, S, N, N * S)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t with ref's shape, dtype and strides (copied only when they differ)."""
    if t.shape != ref.shape:
        raise ValueError(f"expected a tensor of shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype == ref.dtype and t.stride() == ref.stride() and t.device == ref.device:
        return t
    out = torch.empty_like(ref)
    out.copy_(t)
    return out


def _ncs_tiles(N: int, S: int, tile: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_S) for an NCS loop: rows of BLOCK_S contiguous elements."""
    max_bs = TUNING.max_block_s
    if S <= max_bs:
        bs = _np2(S)
    else:  # least padding among a few widths, the widest on ties
        bs = min((max_bs, max_bs // 2, max_bs // 4), key=lambda b: (_cdiv(S, b) * b, -b))
    bn = max(1, min(_np2(N), tile // bs))
    return bn, bs


def _ncs_partition(N: int, C: int, S: int, bn: int, bs: int, target: int, max_split: int):
    """Split each channel's (N, S) plane into s-block groups x row groups."""
    nsb, nnb = _cdiv(S, bs), _cdiv(N, bn)
    want = max(1, min(max_split, _cdiv(target, C)))
    p_s = min(nsb, want)
    sb_per = _cdiv(nsb, p_s)
    p_s = _cdiv(nsb, sb_per)
    p_n = max(1, min(nnb, want // p_s))
    nb_per = _cdiv(nnb, p_n)
    p_n = _cdiv(nnb, nb_per)
    return p_s * p_n, p_n, sb_per, nb_per * bn


def _rc_tiles(R: int, K: int, tile: int) -> tuple[int, int]:
    bk = min(_np2(K), TUNING.max_block_k)
    br = max(1, min(_np2(R), tile // bk))
    return br, bk


def _rc_partition(R: int, K: int, br: int, bk: int, target: int, max_split: int):
    nkb, nrb = _cdiv(K, bk), _cdiv(R, br)
    want = max(1, min(max_split, _cdiv(target, nkb)))
    rb_per = _cdiv(nrb, want)
    split = _cdiv(nrb, rb_per)
    return split, rb_per * br, nkb * split


def _split_plan(v: _View, sms: int, tile: int, bounded: bool, path: str = "split") -> Plan:
    """Partitioned grid for the reduction (bounded partial count) or elementwise passes."""
    target = TUNING.waves * sms
    if v.kind == "ncs" and v.S >= TUNING.small_s:
        bn, bs = _ncs_tiles(v.N, v.S, tile)
        max_split = max(1, TUNING.max_partials // v.C) if bounded else 1 << 20
        split, p_n, sb_per, n_per = _ncs_partition(v.N, v.C, v.S, bn, bs, target, max_split)
        return Plan(path, "ncs", block_a=bn, block_b=bs, split=split, p_n=p_n,
                    sb_per_prog=sb_per, rows_per_prog=n_per, programs=v.C * split,
                    num_warps=_warps(bn * bs))
    if v.kind == "ncs":  # tiny spatial size: rows of C*S, channel = column // S
        R, K, group = v.N, v.C * v.S, v.S
    else:
        R, K, group = v.R, v.C, 1
    br, bk = _rc_tiles(R, K, tile)
    max_split = max(1, TUNING.max_partials // K) if bounded else 1 << 20
    split, rows_per, programs = _rc_partition(R, K, br, bk, target, max_split)
    return Plan(path, "rc", block_a=br, block_b=bk, split=split, rows_per_prog=rows_per,
                group=group, programs=programs, num_warps=_warps(br * bk))


def _fused_plan(v: _View, sms: int, l2: int, elsize: int, n_tensors: int, single_max: int,
                force: bool) -> Plan | None:
    """One program per channel (NCS) or per block of channels (RC), or None when the
    shape is better served by the split path (unless ``force``). ``n_tensors``: how
    many x-sized tensors the second loop re-reads (forward 1 or 2, backward 2 to 4)."""
    x_bytes = v.m * v.C * elsize
    if v.kind == "ncs":
        programs = v.C
        single = v.S <= TUNING.max_block_s and _np2(v.N) * _np2(v.S) <= single_max
        if single:
            bn, bs = _np2(v.N), _np2(v.S)
        else:
            bn, bs = _ncs_tiles(v.N, v.S, TUNING.fused_tile)
        prog_bytes = v.m * elsize * n_tensors
        kernels = "ncs"
    else:
        # channel blocks: enough programs to fill the machine, but rows of at least one
        # 32-byte sector per program (narrower blocks waste DRAM bursts)
        bc_min = max(4, 32 // elsize)
        bc = min(max(bc_min, min(64, _pp2(max(1, v.C // sms)))), _np2(v.C))
        br_single = _np2(v.R)
        single = br_single * bc <= single_max
        if single:
            br = br_single
        else:
            br = max(1, min(_np2(v.R), TUNING.fused_tile // bc))
        bn, bs = br, bc
        programs = _cdiv(v.C, bc)
        prog_bytes = v.R * bc * elsize * n_tensors
        kernels = "rc"
    plan = Plan("fused", kernels, single_tile=single, block_a=bn, block_b=bs,
                programs=programs, num_warps=_warps(bn * bs))
    if force or single:
        # A channel (block) that fits one tile is read once and written once by one
        # program in one launch: never worse than three launches and a re-read.
        return plan
    resident = min(programs, max(1, 64 // plan.num_warps) * sms)  # 64 warps per SM
    if programs >= 2 * sms and resident * prog_bytes <= TUNING.l2_fraction * l2:
        # The second loop re-reads what this program just read; with everything the
        # resident programs touch inside L2, HBM sees one read and one write.
        return plan
    if x_bytes <= TUNING.tiny_bytes and prog_bytes <= TUNING.tiny_program_bytes:
        return plan  # launch-bound (and L2-resident): one kernel beats three
    return None


def _train_plan(v: _View, x: Tensor, n_tensors: int, single_max: int) -> Plan:
    return _cached_plan("train", v, x.element_size(), n_tensors, single_max, _num_sms(x),
                        _l2_bytes(x), tuple(vars(TUNING).values()))


def _eval_plan(v: _View, x: Tensor) -> Plan:
    return _cached_plan("eval", v, x.element_size(), 1, 0, _num_sms(x), _l2_bytes(x),
                        tuple(vars(TUNING).values()))


@functools.lru_cache(maxsize=4096)
def _cached_plan(kind: str, v: _View, elsize: int, n_tensors: int, single_max: int,
                 sms: int, l2: int, tuning: tuple) -> Plan:
    """Plans depend only on these (TUNING's values included), so they are memoized: the
    heuristics cost more host time than the launches of a small input."""
    if kind == "eval":
        return _split_plan(v, sms, TUNING.stream_tile, bounded=False, path="stream")
    force = TUNING.force_path
    if force not in (None, "fused", "split"):
        raise ValueError(f"TUNING.force_path must be None, 'fused' or 'split', got {force!r}")
    if force != "split":
        plan = _fused_plan(v, sms, l2, elsize, n_tensors, single_max, force == "fused")
        if plan is not None:
            return plan
    return _split_plan(v, sms, TUNING.stats_tile, bounded=True)


def plan_for(x: Tensor, mode: str = "forward") -> Plan:
    """The launch plan the host would use for ``x`` (``mode``: forward, backward, eval);
    for the benchmark's records and for tests."""
    xk, v = _prepare(x)
    if mode == "eval":
        return _eval_plan(v, xk)
    if mode == "backward":
        return _train_plan(v, xk, 2, TUNING.single_tile_max_bwd)
    return _train_plan(v, xk, 1, TUNING.single_tile_max)


# ----------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------
def _check(x: Tensor, **vectors: Tensor | None) -> None:
    """The input's dtype and rank, and that each given per-channel vector has C values:
    the kernels index them by channel without bounds, so a short one would be read
    and written past its end."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected a (N, C, *) input, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in vectors.items():
        if t is not None and t.shape != (C,):
            raise ValueError(
                f"{name} must have shape ({C},) to match input {tuple(x.shape)}, got "
                f"{tuple(t.shape)}"
            )


def _param(t: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """(tensor to pass, present?) for an optional per-channel vector."""
    if t is None:
        return x, False
    return t.contiguous(), True


def _stages(n_loaded: int) -> int:
    """Pipelining depth for a loop that loads ``n_loaded`` tensors (shared memory)."""
    return TUNING.num_stages if n_loaded <= 2 else TUNING.num_stages_multi


def _idx64(x: Tensor) -> bool:
    # Offsets of masked lanes run past the end by up to a tile of rows: leave headroom.
    return x.numel() * 4 >= 2**31


def _act_code(activation: str | None) -> int:
    key = "identity" if activation is None else str(activation).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(k for k in _ACTIVATIONS)}, got {activation!r}"
        )
    return _ACTIVATIONS[key]


def _reads_sign(act: int, slope: float) -> bool:
    """relu and leaky_relu with a slope >= 0 read act' off the output's sign (z's)."""
    return act == _k.ACT_RELU or (act == _k.ACT_LEAKY_RELU and slope >= 0)


def _forward_train(x, weight, bias, eps, running_mean, running_var, momentum,
                   num_batches_tracked, num_batches_skipped, residual, act, slope):
    _check(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    xk, v = _prepare(x)
    C = v.C
    dev = x.device
    y = torch.empty_like(xk)
    # float64: the float32 mean plus what its rounding dropped (the kernels' dmean),
    # so the backward centres on the exact mean too (see triton_bn._store_mean)
    mean = torch.empty(C, device=dev, dtype=torch.float64)
    invstd = torch.empty(C, device=dev, dtype=torch.float32)
    if xk.numel() == 0:
        mean.fill_(float("nan"))
        invstd.fill_(float("nan"))
        return y, mean, invstd
    res = _like(residual, xk) if residual is not None else None
    w, has_w = _param(weight, xk)
    b, has_b = _param(bias, xk)
    has_res = res is not None
    res_arg = res if has_res else xk
    idx64 = _idx64(xk)
    eps = float(eps)
    slope = float(slope)
    update = any(t is not None for t in (running_mean, running_var, num_batches_tracked,
                                          num_batches_skipped))
    plan = _train_plan(v, xk, 1 + has_res, TUNING.single_tile_max)

    rm, rv = running_mean, running_var
    tracked, skipped = num_batches_tracked, num_batches_skipped
    momentum_f = 0.0 if momentum is None else float(momentum)
    stat_flags = {"HAS_RM": rm is not None, "HAS_RV": rv is not None,
                  "HAS_TRACKED": tracked is not None, "HAS_SKIPPED": skipped is not None}
    # dummies for absent pointers (never dereferenced: their HAS_* flag is off)
    rm_arg, rv_arg = (rm if rm is not None else mean), (rv if rv is not None else mean)
    strides = (rm.stride(0) if rm is not None else 1, rv.stride(0) if rv is not None else 1)
    tracked_arg = tracked if tracked is not None else mean
    skipped_arg = skipped if skipped is not None else mean

    if plan.path == "fused":
        parts = torch.empty((2, C), device=dev, dtype=torch.float32)  # count, M2
        if plan.kernels == "ncs":
            _k.fwd_fused_ncs_kernel[(C,)](
                xk, y, res_arg, w, b, mean, invstd, parts[0], parts[1],
                v.N, C, v.S, float(v.m), eps, slope,
                HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=act,
                SINGLE_TILE=plan.single_tile, IDX64=idx64, NUM_STAGES=_stages(1 + has_res),
                BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, num_warps=plan.num_warps,
            )
        else:
            _k.fwd_fused_rc_kernel[(plan.programs,)](
                xk, y, res_arg, w, b, mean, invstd, parts[0], parts[1],
                v.R, C, float(v.m), eps, slope,
                HAS_W=has_w, HAS_B=has_b, HAS_RES=has_res, ACT=act,
                SINGLE_TILE=plan.single_tile, IDX64=idx64, NUM_STAGES=_stages(1 + has_res),
                BLOCK_R=plan.block_a, BLOCK_C=plan.block_b, num_warps=plan.num_warps,
            )
        if update:  # one program: check every channel, then update (C values: cheap)
            bc = min(_np2(C), 1024)
            _k.fwd_running_kernel[(1,)](
                parts[0], parts[1], mean, rm_arg, rv_arg, *strides,
                tracked_arg, skipped_arg, C, momentum_f, **stat_flags,
                CUMULATIVE=momentum is None, BLOCK_C=bc, num_warps=_warps(bc),
            )
        return y, mean, invstd

    # split: stats (partials) -> merge (mean, invstd; finiteness vote) -> normalize
    # (+ the running update by the first program of each channel)
    grid = (plan.programs,)
    flag = torch.empty(1, device=dev, dtype=torch.int32)
    if update:  # the unbiased variance and the factor
        aux = torch.empty(C + 1, device=dev, dtype=torch.float32)
        varu, fbuf = aux[:C], aux[C:]
    else:  # dummies, never dereferenced
        varu = fbuf = invstd
    if plan.kernels == "ncs":
        n_part, split_c, pivot_stride = C * plan.split, plan.split, v.S
    else:
        R, K = (v.N, C * v.S) if v.kind == "ncs" else (v.R, C)
        # (K, SPLIT) row-major is (C, GROUP*SPLIT): one row of partials per channel
        n_part, split_c, pivot_stride = K * plan.split, plan.group * plan.split, plan.group
    parts = torch.empty((3, n_part), device=dev, dtype=torch.float32)
    if plan.kernels == "ncs":
        _k.fwd_stats_ncs_kernel[grid](
            xk, parts[0], parts[1], parts[2], v.N, C, v.S,
            plan.split, plan.p_n, plan.sb_per_prog, plan.rows_per_prog, flag,
            IDX64=idx64, NUM_STAGES=_stages(1), BLOCK_N=plan.block_a, BLOCK_S=plan.block_b,
            num_warps=plan.num_warps,
        )
    else:
        _k.fwd_stats_rc_kernel[grid](
            xk, parts[0], parts[1], parts[2], R, K, plan.group, plan.split,
            plan.rows_per_prog, flag,
            IDX64=idx64, NUM_STAGES=_stages(1), BLOCK_R=plan.block_a, BLOCK_K=plan.block_b,
            num_warps=plan.num_warps,
        )
    bsp = min(_np2(split_c), 256)
    bc = max(1, min(_np2(C), 2048 // bsp))
    _k.fwd_merge_kernel[(_cdiv(C, bc),)](
        parts[0], parts[1], parts[2], xk, pivot_stride, mean, invstd, varu, fbuf, flag,
        tracked_arg, C, split_c, eps, momentum_f,
        UPDATE=update, HAS_TRACKED=tracked is not None, CUMULATIVE=momentum is None,
        BLOCK_C=bc, BLOCK_SP=bsp, num_warps=_warps(bc * bsp),
    )
    upd = (varu, fbuf, flag, rm_arg, rv_arg, *strides, tracked_arg, skipped_arg)
    flags = {"EVAL": False, "HAS_W": has_w, "HAS_B": has_b, "HAS_RES": has_res, "ACT": act,
             "UPDATE": update, **stat_flags, "REVERSE": True, "IDX64": idx64,
             "NUM_STAGES": _stages(1 + has_res), "num_warps": plan.num_warps}
    if plan.kernels == "ncs":
        _k.norm_ncs_kernel[grid](
            xk, y, res_arg, mean, invstd, w, b, v.N, C, v.S,
            plan.split, plan.p_n, plan.sb_per_prog, plan.rows_per_prog, plan.programs,
            eps, slope, *upd, BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, **flags,
        )
    else:
        _k.norm_rc_kernel[grid](
            xk, y, res_arg, mean, invstd, w, b, R, K, plan.group,
            plan.split, plan.rows_per_prog, plan.programs, eps, slope, *upd,
            BLOCK_R=plan.block_a, BLOCK_K=plan.block_b, **flags,
        )
    return y, mean, invstd


def _backward_train(dout, x, weight, bias, mean, invstd, out, residual, write_dres, act,
                    from_out, slope):
    """dx, dweight, dbias (float32), dres (= dz, or None) of act(BN(x) [+ residual])."""
    _check(x, weight=weight, bias=bias, mean=mean, invstd=invstd)
    xk, v = _prepare(x)
    C = v.C
    dev = x.device
    g = _like(dout, xk)
    dx = torch.empty_like(xk)
    dweight = torch.empty(C, device=dev, dtype=torch.float32)
    dbias = torch.empty(C, device=dev, dtype=torch.float32)
    dres = torch.empty_like(xk) if write_dres else None
    if xk.numel() == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias, dres
    # a float64 mean (the forward's) keeps its low part for the kernels (_affine)
    mean_dtype = torch.float64 if mean.dtype == torch.float64 else torch.float32
    mean = mean.to(device=dev, dtype=mean_dtype).contiguous()
    invstd = invstd.to(device=dev, dtype=torch.float32).contiguous()
    need_out = act != _k.ACT_IDENTITY and from_out
    need_z = act != _k.ACT_IDENTITY and not from_out
    o = _like(out, xk) if need_out else xk
    has_res = need_z and residual is not None
    r = _like(residual, xk) if has_res else xk
    w, has_w = _param(weight, xk)
    b, has_b = _param(bias if need_z else None, xk)
    dres_arg = dres if dres is not None else dx
    idx64 = _idx64(xk)
    slope = float(slope)
    n_tensors = 2 + need_out + has_res
    plan = _train_plan(v, xk, n_tensors, TUNING.single_tile_max_bwd)
    flags = {"HAS_W": has_w, "HAS_B": has_b, "HAS_RES": has_res, "ACT": act,
             "FROM_OUT": need_out, "NUM_STAGES": _stages(n_tensors)}

    if plan.path == "fused":
        kern = _k.bwd_fused_ncs_kernel if plan.kernels == "ncs" else _k.bwd_fused_rc_kernel
        sizes = (v.N, C, v.S) if plan.kernels == "ncs" else (v.R, C)
        blocks = ({"BLOCK_N": plan.block_a, "BLOCK_S": plan.block_b} if plan.kernels == "ncs"
                  else {"BLOCK_R": plan.block_a, "BLOCK_C": plan.block_b})
        kern[(plan.programs,)](
            g, xk, o, r, dx, dres_arg, mean, invstd, w, b, dbias, dweight,
            *sizes, 1.0 / v.m, slope, **flags, WRITE_DRES=write_dres,
            SINGLE_TILE=plan.single_tile, IDX64=idx64, **blocks, num_warps=plan.num_warps,
        )
        return dx, dweight, dbias, dres

    grid = (plan.programs,)
    final = plan.split == 1 and plan.group == 1
    if plan.kernels == "ncs":
        n_part = C * plan.split
        sizes = (v.N, C, v.S, plan.split, plan.p_n, plan.sb_per_prog, plan.rows_per_prog)
        blocks = {"BLOCK_N": plan.block_a, "BLOCK_S": plan.block_b}
        reduce_k, dx_k = _k.bwd_reduce_ncs_kernel, _k.bwd_dx_ncs_kernel
    else:
        R, K = (v.N, C * v.S) if v.kind == "ncs" else (v.R, C)
        n_part = K * plan.split
        sizes = (R, K, plan.group, plan.split, plan.rows_per_prog)
        blocks = {"BLOCK_R": plan.block_a, "BLOCK_K": plan.block_b}
        reduce_k, dx_k = _k.bwd_reduce_rc_kernel, _k.bwd_dx_rc_kernel
    if final:
        psum, psumx = dbias, dweight
    else:
        parts = torch.empty((2, n_part), device=dev, dtype=torch.float32)
        psum, psumx = parts[0], parts[1]
    reduce_k[grid](
        g, xk, o, r, mean, invstd, w, b, psum, psumx, *sizes, slope, **flags,
        FINAL=final, IDX64=idx64, **blocks, num_warps=plan.num_warps,
    )
    if not final:
        split = plan.group * plan.split
        bsp = min(_np2(split), 1024)
        bc = max(1, min(_np2(C), 4096 // bsp))
        _k.bwd_finalize_kernel[(_cdiv(C, bc),)](
            psum, psumx, invstd, dbias, dweight, C, split,
            BLOCK_C=bc, BLOCK_SP=bsp, num_warps=_warps(bc * bsp),
        )
    dx_k[grid](
        g, xk, o, r, dx, dres_arg, mean, invstd, w, b, dbias, dweight,
        *sizes, plan.programs, 1.0 / v.m, slope, **flags, WRITE_DRES=write_dres,
        REVERSE=True, IDX64=idx64, **blocks, num_warps=plan.num_warps,
    )
    return dx, dweight, dbias, dres


def _forward_eval(x, weight, bias, running_mean, running_var, eps, residual, act, slope):
    _check(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    xk, v = _prepare(x)
    y = torch.empty_like(xk)
    if xk.numel() == 0:
        return y
    res = _like(residual, xk) if residual is not None else None
    has_res = res is not None
    res_arg = res if has_res else xk
    w, has_w = _param(weight, xk)
    b, has_b = _param(bias, xk)
    rm = running_mean.contiguous()
    rv = running_var.contiguous()
    plan = _eval_plan(v, xk)
    flags = {"EVAL": True, "HAS_W": has_w, "HAS_B": has_b, "HAS_RES": has_res, "ACT": act,
             "UPDATE": False, "HAS_RM": False, "HAS_RV": False, "HAS_TRACKED": False,
             "HAS_SKIPPED": False, "REVERSE": False, "IDX64": _idx64(xk),
             "NUM_STAGES": _stages(1 + has_res), "num_warps": plan.num_warps}
    no_update = (rm, rm, rm, rm, rm, 1, 1, rm, rm)  # never dereferenced (UPDATE=False)
    if plan.kernels == "ncs":
        _k.norm_ncs_kernel[(plan.programs,)](
            xk, y, res_arg, rm, rv, w, b, v.N, v.C, v.S,
            plan.split, plan.p_n, plan.sb_per_prog, plan.rows_per_prog, plan.programs,
            float(eps), float(slope), *no_update,
            BLOCK_N=plan.block_a, BLOCK_S=plan.block_b, **flags,
        )
    else:
        R, K = (v.N, v.C * v.S) if v.kind == "ncs" else (v.R, v.C)
        _k.norm_rc_kernel[(plan.programs,)](
            xk, y, res_arg, rm, rv, w, b, R, K, plan.group,
            plan.split, plan.rows_per_prog, plan.programs, float(eps), float(slope),
            *no_update, BLOCK_R=plan.block_a, BLOCK_K=plan.block_b, **flags,
        )
    return y


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------
class TritonBackend:
    """The Triton compute path (see :mod:`batchnorm._backends` for the semantics)."""

    name = "triton"

    def forward_train(self, x, weight, bias, eps, running_mean, running_var, momentum,
                      num_batches_tracked=None, num_batches_skipped=None):
        """(y, mean, invstd); running statistics and counters updated in place. mean
        is float64: the float32 mean plus what its rounding dropped, which the
        backward centres on too (far from zero that keeps dx and dweight exact)."""
        return _forward_train(x, weight, bias, eps, running_mean, running_var, momentum,
                              num_batches_tracked, num_batches_skipped, None,
                              _k.ACT_IDENTITY, 0.0)

    def backward_train(self, dy, x, weight, mean, invstd):
        """(dx, dweight, dbias); dweight and dbias in float32."""
        dx, dw, db, _ = _backward_train(dy, x, weight, None, mean, invstd, None, None, False,
                                        _k.ACT_IDENTITY, False, 0.0)
        return dx, dw, db

    def forward_eval(self, x, weight, bias, running_mean, running_var, eps):
        """y = (x - running_mean) * weight / sqrt(running_var + eps) + bias."""
        return _forward_eval(x, weight, bias, running_mean, running_var, eps, None,
                             _k.ACT_IDENTITY, 0.0)

    def __repr__(self) -> str:
        return "TritonBackend()"


BACKEND = TritonBackend()


def act_forward_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                      running_mean: Tensor | None, running_var: Tensor | None,
                      momentum: float | None, num_batches_tracked: Tensor | None = None,
                      num_batches_skipped: Tensor | None = None,
                      residual: Tensor | None = None, activation: str = "relu",
                      negative_slope: float = 0.01, sign: bool = True,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``out = act(BN(x) + residual)`` in one pass, with batch statistics.

    Same statistics, running-statistics update and counters as
    ``BACKEND.forward_train``; ``residual`` (x's shape; cast to x's dtype) is added
    before the activation (``"identity"``, ``"relu"``, ``"leaky_relu"``, ``"silu"``).
    Returns ``(out, mean, invstd, sign)``, out in x's dtype and memory format,
    mean float64 (float32 value + its rounding error), invstd float32; ``sign`` is ``out`` itself for relu and leaky_relu with a
    slope >= 0 (their backward reads the mask off its sign: no mask tensor is
    written), else None, and those keep ``bias`` and ``residual`` for the backward
    (``sign=False``, no backward to come: None).
    """
    act = _act_code(activation)
    out, mean, invstd = _forward_train(x, weight, bias, eps, running_mean, running_var,
                                       momentum, num_batches_tracked, num_batches_skipped,
                                       residual, act, negative_slope)
    return out, mean, invstd, out if sign and _reads_sign(act, negative_slope) else None


def act_backward_train(dout: Tensor, out: Tensor | None, x: Tensor, weight: Tensor | None,
                       bias: Tensor | None, mean: Tensor, invstd: Tensor,
                       residual: Tensor | None = None, activation: str = "relu",
                       negative_slope: float = 0.01, has_residual: bool | None = None,
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of ``out = act(BN(x) + residual)``: ``(dx, dweight, dbias, dresidual)``.

    relu and leaky_relu (slope >= 0) take the activation's mask from the saved output
    ``out`` (``out > 0``): no mask tensor is saved and ``bias``/``residual`` are not
    read. silu and leaky_relu with a negative slope rebuild the pre-activation from
    ``x``, ``mean``, ``invstd``, ``weight``, ``bias`` and ``residual``; pass ``out=None``
    for them. ``dweight``/``dbias`` come back in float32; ``dresidual`` (the gradient
    of the pre-activation, x's dtype) is returned when ``has_residual`` (default:
    ``residual is not None``), else None.
    """
    act = _act_code(activation)
    if has_residual is None:
        has_residual = residual is not None
    from_out = out is not None and _reads_sign(act, negative_slope)
    needs_z = act != _k.ACT_IDENTITY and not from_out
    if needs_z and has_residual and residual is None:
        raise ValueError(
            f"activation={activation!r} rebuilds the pre-activation in backward: pass the "
            f"forward's residual (or the output, for relu/leaky_relu with slope >= 0)"
        )
    if act == _k.ACT_IDENTITY and has_residual:
        dx, dw, db, _ = _backward_train(dout, x, weight, bias, mean, invstd, None, None,
                                        False, act, False, negative_slope)
        return dx, dw, db, dout
    return _backward_train(dout, x, weight, bias, mean, invstd, out, residual, has_residual,
                           act, from_out, negative_slope)


def act_forward_eval(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor, running_var: Tensor, eps: float,
                     residual: Tensor | None = None, activation: str = "relu",
                     negative_slope: float = 0.01) -> Tensor:
    """``act(BN_eval(x) + residual)`` with the running statistics, one pass."""
    return _forward_eval(x, weight, bias, running_mean, running_var, eps, residual,
                         _act_code(activation), negative_slope)
