"""SyncBatchNorm across 2 and 3 gloo processes against single-process BN on the whole batch.

Each world is started once (process start-up dominates the cost) and runs every
distributed check in order; each rank reports "ok" or the traceback per check, and
one test per (world, check) reads the report. Every rank builds the same global batch
from a fixed seed, takes its own slice, and compares its slice of the results with
single-process torch.nn.BatchNorm and the float64 reference on the whole batch.
"""

from __future__ import annotations

import copy
import datetime
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import reference
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cases import TOLERANCES, assert_close

import batchnorm as bn
from batchnorm.nn.sync import merge_stats

HARNESS_TIMEOUT_S = 90.0  # the whole world, start-up included; a hang fails, never blocks
GROUP_TIMEOUT_S = 20.0  # a collective that waits longer raises inside the worker

# Per-rank batch sizes of each world: uneven, and world 3 has a rank with an empty batch.
SIZES = {2: ([3, 5], [6, 2]), 3: ([4, 0, 3], [2, 5, 1])}


# ---------------------------------------------------------------------------------------
# distributed checks: each runs on every rank, in the same order, collectives first and
# assertions last, so a failing comparison never leaves a collective unmatched
# ---------------------------------------------------------------------------------------
def _slice(full: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return full[start : start + sizes[rank]]


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def _matches_whole_batch(
    rank: int, world: int, shape: tuple[int, ...], dtype: torch.dtype, momentum: float | None,
    offset: float = 0.0, torch_atol: float | None = None,
) -> None:
    """Two training steps: output, dx, Σ_r dγ/dβ, running statistics vs one process.

    The comparisons with single-process torch BN use twice the dtype's tolerance, or
    ``torch_atol`` (absolute only) when given.
    """
    tol = TOLERANCES[dtype]
    vs_torch = (2 * tol.atol, 2 * tol.rtol) if torch_atol is None else (torch_atol, 0.0)
    grad_vs_torch = (
        (2 * tol.grad_atol, 2 * tol.grad_rtol) if torch_atol is None else (torch_atol, 0.0)
    )
    C = shape[0]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    ours = bn.SyncBatchNorm(C, momentum=momentum, dtype=param_dtype)
    torch_bn = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm2d,
                4: torch.nn.BatchNorm3d}[len(shape)]
    single = torch_bn(C, momentum=momentum, dtype=param_dtype)
    gen = torch.Generator().manual_seed(100)
    with torch.no_grad():
        w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
        b = torch.randn(C, generator=gen, dtype=torch.float64)
        for layer in (ours, single):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    rm = torch.zeros(C, dtype=torch.float64)
    rv = torch.ones(C, dtype=torch.float64)
    checks: list[tuple[torch.Tensor, torch.Tensor, float, float, str]] = []
    for step, sizes in enumerate(SIZES[world]):
        total = sum(sizes)
        full = (torch.randn(total, *shape, generator=gen, dtype=torch.float64) * (step + 2)
                + offset + step).to(dtype)
        dy_full = torch.randn(total, *shape, generator=gen, dtype=torch.float64).to(dtype)
        for layer in (ours, single):
            layer.zero_grad()
        x = _slice(full, sizes, rank).clone().requires_grad_()
        y = ours(x)
        y.backward(_slice(dy_full, sizes, rank))
        dw, db = _sum_over_ranks(ours.weight.grad), _sum_over_ranks(ours.bias.grad)

        x_single = full.clone().requires_grad_()
        # torch runs half precision on the CPU only in a float32 module with float32 input.
        y_single = single(x_single.float() if param_dtype != dtype else x_single)
        y_single.backward(dy_full.to(y_single.dtype))
        ref = reference.forward(full, w, b, rm, rv, True, momentum, ours.eps, step)
        rm, rv = ref.running_mean, ref.running_var
        dx_ref, dw_ref, db_ref = reference.backward_train(dy_full, full, w, ours.eps)
        m = full.numel() // C
        scale = max(1.0, m ** 0.5)
        checks += [
            (y, _slice(ref.y, sizes, rank), tol.atol, tol.rtol, f"step {step} output vs reference"),
            (y, _slice(y_single, sizes, rank), *vs_torch, f"step {step} output vs torch"),
            (x.grad, _slice(dx_ref, sizes, rank), tol.grad_atol, tol.grad_rtol, f"step {step} dx"),
            (x.grad, _slice(x_single.grad, sizes, rank), *grad_vs_torch,
             f"step {step} dx vs torch"),
            (dw, dw_ref, tol.grad_atol * scale, tol.grad_rtol, f"step {step} sum of dweight"),
            (db, db_ref, tol.grad_atol * scale, tol.grad_rtol, f"step {step} sum of dbias"),
            (dw, single.weight.grad.clone(), *grad_vs_torch, f"step {step} dweight vs torch"),
            (db, single.bias.grad.clone(), *grad_vs_torch, f"step {step} dbias vs torch"),
            (ours.running_mean.clone(), single.running_mean.clone(), *vs_torch,
             f"step {step} running_mean vs torch"),
            (ours.running_mean.clone(), rm, tol.atol, tol.rtol, f"step {step} running_mean"),
            (ours.running_var.clone(), rv, tol.atol, tol.rtol, f"step {step} running_var"),
            (ours.running_var.clone(), single.running_var.clone(), *vs_torch,
             f"step {step} running_var vs torch"),
        ]
        assert y.dtype == dtype and y.shape == x.shape
    for actual, expected, atol, rtol, what in checks:
        assert_close(actual, expected, atol, rtol, f"rank {rank}: {what}")
    assert int(ours.num_batches_tracked) == 2 and int(ours.num_batches_skipped) == 0


def check_float32_4d(rank: int, world: int) -> None:
    _matches_whole_batch(rank, world, (3, 4, 5), torch.float32, 0.1, torch_atol=1e-5)


def check_float32_2d_within_1e5(rank: int, world: int) -> None:
    """The brief's bar: float32 (N, C) within 1e-5 of single-process torch BN."""
    _matches_whole_batch(rank, world, (7,), torch.float32, 0.1, torch_atol=1e-5)


def check_float64_3d_cumulative_large_offset(rank: int, world: int) -> None:
    """|mean| ≫ std: the M2 merge keeps float64 precision (a sum of squares would not)."""
    _matches_whole_batch(rank, world, (2, 9), torch.float64, None, offset=1e6)


def check_float32_far_from_zero(rank: int, world: int) -> None:
    """At 1e4 ± 1e-2 the float32 output, dx and Σ_r dγ keep 2e-6 of the float64
    formulas' largest values: the forward and the backward centre on the mean rounded
    to float32 and take the rest off (the backward centred on the rounded mean alone:
    dx off by ~3.5e-3 of its largest value)."""
    C = 3
    ours = bn.SyncBatchNorm(C)
    gen = torch.Generator().manual_seed(7)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.copy_(w)
        ours.bias.copy_(b)
    sizes = SIZES[world][0]
    total = sum(sizes)
    full = (1e4 + 1e-2 * torch.randn(total, C, 4, 4, generator=gen, dtype=torch.float64)).float()
    dy_full = torch.randn(total, C, 4, 4, generator=gen)
    x = _slice(full, sizes, rank).clone().requires_grad_()
    y = ours(x)
    y.backward(_slice(dy_full, sizes, rank))
    dw = _sum_over_ranks(ours.weight.grad)
    ref = reference.forward(
        full.double(), w, b, torch.zeros(C, dtype=torch.float64),
        torch.ones(C, dtype=torch.float64), True, 0.1, ours.eps, 0,
    )
    dx_ref, dw_ref, _ = reference.backward_train(dy_full.double(), full.double(), w, ours.eps)
    for what, actual, expected, scale in (
        ("output", y, _slice(ref.y, sizes, rank), ref.y.abs().max()),
        ("dx", x.grad, _slice(dx_ref, sizes, rank), dx_ref.abs().max()),
        ("sum of dweight", dw, dw_ref, dw_ref.abs().max()),
    ):
        if actual.numel():
            rel = float((actual.double() - expected).abs().max() / scale)
            assert rel < 2e-6, f"rank {rank}: {what} relative error {rel:.3g}"


def check_bfloat16_input_float32_stats(rank: int, world: int) -> None:
    _matches_whole_batch(rank, world, (3, 2, 2), torch.bfloat16, 0.1)


def check_ddp(rank: int, world: int) -> None:
    """Under DDP (gradients averaged over ranks): W · grad equals the single-process grad."""
    from torch.nn.parallel import DistributedDataParallel

    sizes = {2: [2, 3], 3: [2, 1, 3]}[world]
    torch.manual_seed(5)  # the same initial weights on every rank
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 1), bn.BatchNorm2d(3, backend="reference"),
    )
    single = copy.deepcopy(plain)
    model = DistributedDataParallel(bn.SyncBatchNorm.convert_sync_batchnorm(plain))
    assert sum(isinstance(m, bn.SyncBatchNorm) for m in model.modules()) == 2

    gen = torch.Generator().manual_seed(6)
    full = torch.randn(sum(sizes), 2, 5, 5, generator=gen) + 1
    dy_full = torch.randn(sum(sizes), 3, 5, 5, generator=gen)
    x = _slice(full, sizes, rank).clone().requires_grad_()
    y = model(x)
    (y * _slice(dy_full, sizes, rank)).sum().backward()

    x_single = full.clone().requires_grad_()
    y_single = single(x_single)
    (y_single * dy_full).sum().backward()
    assert_close(y, _slice(y_single, sizes, rank), 1e-5, 1e-5, f"rank {rank}: output")
    assert_close(x.grad, _slice(x_single.grad, sizes, rank), 1e-5, 1e-4, f"rank {rank}: dx")
    for name, p in single.named_parameters():
        ddp_grad = model.module.get_parameter(name).grad
        assert_close(world * ddp_grad, p.grad, 1e-4, 1e-4, f"rank {rank}: W * DDP grad of {name}")
    for name, buf in single.named_buffers():
        if buf.is_floating_point():
            assert_close(model.module.get_buffer(name), buf, 1e-5, 1e-5, f"rank {rank}: {name}")


def check_mismatched_num_features(rank: int, world: int) -> None:
    """Ranks with different C all raise ValueError naming each rank's C; the group survives."""
    layer = bn.SyncBatchNorm(3 + rank)
    expected = ", ".join(f"rank {r}: {3 + r}" for r in range(world))
    try:
        layer(torch.randn(4, 3 + rank, 2))
    except ValueError as err:
        assert expected in str(err), str(err)
    else:
        raise AssertionError(f"rank {rank}: no ValueError for mismatched num_features")
    ok = torch.ones(1)
    dist.all_reduce(ok)
    assert int(ok) == world, "the process group still works after the error"


def check_mismatch_when_the_input_fits_one_rank(rank: int, world: int) -> None:
    """Rank 0's input fits its layer, the others' do not: every rank gets the mismatch."""
    layer = bn.SyncBatchNorm(4 if rank == 0 else 5, backend="reference")
    try:
        layer(torch.randn(3, 4))
    except ValueError as err:
        assert "must have the same num_features" in str(err), str(err)
    else:
        raise AssertionError(f"rank {rank}: no ValueError for mismatched num_features")


def check_rejected_first_input_raises_everywhere(rank: int, world: int) -> None:
    """The last rank's first input has the wrong channel count; no rank waits, none updates."""
    layer = bn.SyncBatchNorm(3, backend="reference")
    bad = rank == world - 1
    try:
        layer(torch.randn(4, 2 if bad else 3))
    except ValueError as err:
        expected = "expected input with 3 channels" if bad else f"rank(s) {world - 1} rejected"
        assert expected in str(err), str(err)
    else:
        raise AssertionError(f"rank {rank}: no ValueError")
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_mean, torch.zeros(3))
    layer(torch.randn(4, 3))  # every rank's next input fits: the layer works
    assert int(layer.num_batches_tracked) == 1


def check_recalibrate_merges_ranks(rank: int, world: int) -> None:
    """Population statistics of all ranks' batches together, the same on every rank."""
    sizes = SIZES[world][0]
    gen = torch.Generator().manual_seed(11)
    full = [torch.randn(sum(sizes), 3, 2, generator=gen, dtype=torch.float64) * 2 + 5
            for _ in range(2)]
    model = torch.nn.Sequential(bn.SyncBatchNorm(3, dtype=torch.float64, backend="reference"))
    mine = [_slice(batch, sizes, rank) for batch in full]
    bn.recalibrate(model, mine)
    data = torch.cat(full).transpose(0, 1).reshape(3, -1)
    assert_close(model[0].running_mean, data.mean(1), 1e-12, 1e-12, f"rank {rank}: mean")
    assert_close(model[0].running_var, data.var(1), 1e-12, 1e-12, f"rank {rank}: var")


def check_eval_does_not_communicate(rank: int, world: int) -> None:
    """Eval uses the running statistics and no collective: ranks may run different counts."""
    # The reference backend: loading the numba kernels would cost each process seconds.
    layer = bn.SyncBatchNorm(3, backend="reference")
    layer.train()(torch.randn(4, 3) + rank)
    layer.eval()
    plain = torch.nn.BatchNorm1d(3).eval()
    plain.load_state_dict(layer.state_dict())
    for _ in range(rank * 2):  # rank 0 evaluates nothing, rank 2 four batches
        x = torch.randn(5, 3)
        # (float32 rounding apart: ours centres on the running mean, torch's does not)
        assert_close(layer(x), plain(x), 1e-6, 1e-6, f"rank {rank}: eval output")
    # Without running statistics, eval normalizes with local batch statistics.
    local = bn.SyncBatchNorm(3, track_running_stats=False, backend="reference").eval()
    x = torch.randn(6, 3) * 3
    expected = torch.nn.functional.batch_norm(x, None, None, local.weight, local.bias, True)
    assert_close(local(x), expected, 1e-6, 1e-6, f"rank {rank}: local batch statistics in eval")


def check_not_affine_not_tracking(rank: int, world: int) -> None:
    sizes = SIZES[world][0]
    layer = bn.SyncBatchNorm(4, affine=False, track_running_stats=False)
    gen = torch.Generator().manual_seed(7)
    full = torch.randn(sum(sizes), 4, 3, generator=gen)
    x = _slice(full, sizes, rank).clone().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y) * (rank + 1))
    ref = reference.forward(full, None, None, None, None, True, 0.1, layer.eps)
    dy_full = torch.cat([torch.full((n, 4, 3), float(r + 1)) for r, n in enumerate(sizes)])
    dx_ref, _, _ = reference.backward_train(dy_full, full, None, layer.eps)
    assert_close(y, _slice(ref.y, sizes, rank), 2e-5, 1e-4, f"rank {rank}: output")
    assert_close(x.grad, _slice(dx_ref, sizes, rank), 1e-4, 1e-3, f"rank {rank}: dx")


def check_degenerate_global_batches(rank: int, world: int) -> None:
    """One value per channel in the whole world, or none: running statistics untouched."""
    layer = bn.SyncBatchNorm(3)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(1 if rank == 0 else 0, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    empty = torch.zeros(0, 3, requires_grad=True)
    y_empty = layer(empty)
    y_empty.sum().backward()
    if rank == 0:
        # x - mean is 0, but x·scale + (β - mean·scale) rounds with scale = 1/sqrt(eps).
        assert_close(y, layer.bias.detach()[None], 1e-4, 0, "a single value normalizes to beta")
        assert torch.equal(x.grad, torch.zeros_like(x))
    assert y_empty.shape == (0, 3)
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 2


def check_non_finite_batch_on_one_rank(rank: int, world: int) -> None:
    layer = bn.SyncBatchNorm(2)
    x = torch.randn(4, 2)
    if rank == world - 1:
        x[0, 1] = float("nan")
    layer(x)
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_var, torch.ones(2)), "every rank skipped the update"
    strict = bn.SyncBatchNorm(2, check_finite=True)
    try:
        strict(x)
    except FloatingPointError:
        pass
    else:
        raise AssertionError(f"rank {rank}: check_finite=True did not raise")


def check_double_backward_is_refused(rank: int, world: int) -> None:
    layer = bn.SyncBatchNorm(2)
    x = torch.randn(3, 2, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    try:
        dx.sum().backward()
    except RuntimeError as err:
        assert "once_differentiable" in str(err), err
    else:
        raise AssertionError("double backward through the synchronized layer should raise")


CHECKS: list[Callable[[int, int], None]] = [
    check_float32_4d,
    check_float32_2d_within_1e5,
    check_float64_3d_cumulative_large_offset,
    check_float32_far_from_zero,
    check_bfloat16_input_float32_stats,
    check_not_affine_not_tracking,
    check_degenerate_global_batches,
    check_non_finite_batch_on_one_rank,
    check_mismatched_num_features,
    check_mismatch_when_the_input_fits_one_rank,
    check_rejected_first_input_raises_everywhere,
    check_recalibrate_merges_ranks,
    check_eval_does_not_communicate,
    check_double_backward_is_refused,
    check_ddp,
]
CHECK_NAMES = [c.__name__.removeprefix("check_") for c in CHECKS]


# ---------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, queue: Any) -> None:
    report: dict[str, str] = {}
    try:
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, no network
        torch.set_num_threads(1)  # the ranks share the machine's cores
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        for check, name in zip(CHECKS, CHECK_NAMES, strict=True):
            try:
                check(rank, world)
                report[name] = "ok"
            except Exception:  # noqa: BLE001 (report every failure, keep the ranks in step)
                report[name] = traceback.format_exc()
    except Exception:  # noqa: BLE001
        report["<setup>"] = traceback.format_exc()
    # Report (and flush) before the teardown: gloo may abort a process at shutdown.
    queue.put((rank, report))
    queue.close()
    queue.join_thread()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int) -> dict[int, dict[str, str]]:
    """Start ``world`` gloo processes, run CHECKS, return each rank's report."""
    ctx = mp.get_context("forkserver")
    # The fork server imports these once; every rank then starts as a fork of it instead
    # of importing torch (and DDP's torch._dynamo) again: seconds per process.
    ctx.set_forkserver_preload(
        ["torch", "torch.distributed", "torch._dynamo", "batchnorm", __name__]
    )
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    reports: dict[int, dict[str, str]] = {}
    deadline = time.monotonic() + HARNESS_TIMEOUT_S
    try:
        while len(reports) < world and time.monotonic() < deadline:
            try:
                rank, report = queue.get(timeout=0.5)
            except queue_module.Empty:
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break  # every rank exited; the silent ones crashed before reporting
                continue
            reports[rank] = report
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
    for r in range(world):
        reports.setdefault(r, {"<setup>": f"rank {r} reported nothing within {HARNESS_TIMEOUT_S}s"})
    return reports


@pytest.fixture(scope="module")
def world_reports() -> dict[int, dict[int, dict[str, str]]]:
    return {world: run_world(world) for world in (2, 3)}


@pytest.mark.parametrize("name", CHECK_NAMES)
@pytest.mark.parametrize("world", [2, 3])
def test_distributed(world_reports, world: int, name: str) -> None:
    failures = []
    for rank, report in sorted(world_reports[world].items()):
        if "<setup>" in report:
            failures.append(f"rank {rank} setup:\n{report['<setup>']}")
        elif report.get(name) != "ok":
            failures.append(f"rank {rank}:\n{report.get(name, 'did not run')}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------
def test_merge_stats_is_exact_with_a_large_offset() -> None:
    """Chan's merge in float64 with |mean| = 1e8 ≫ std = 1, empty parts included."""
    gen = torch.Generator().manual_seed(8)
    parts = [torch.randn(n, 3, generator=gen, dtype=torch.float64) + 1e8 for n in (5, 0, 17, 1, 9)]
    count = torch.tensor([[float(len(p))] for p in parts], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    mean = torch.stack([p.mean(0) if len(p) else zero for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else zero for p in parts])
    total, mu, m2_all = merge_stats(count, mean, m2)
    whole = torch.cat(parts)
    assert int(total) == 32
    assert_close(mu, whole.mean(0), 0, 1e-15, "mean")
    assert_close(m2_all, ((whole - whole.mean(0)) ** 2).sum(0), 0, 1e-7, "M2")
    # The sum-of-squares form loses every digit here; this is why the layer avoids it.
    naive = (whole ** 2).sum(0) - whole.sum(0) ** 2 / len(whole)
    assert ((naive - m2_all).abs() / m2_all).max() > 1e-3


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (3, 4, 5, 5), (2, 4, 3, 3, 3)])
def test_without_process_group_is_plain_batch_norm(shape) -> None:
    assert not dist.is_initialized()
    ours, theirs = bn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(shape) * 2 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = ours(x1)
    y2 = torch.nn.functional.batch_norm(x2, theirs.running_mean, theirs.running_var,
                                        theirs.weight, theirs.bias, True)
    y1.backward(torch.ones_like(y1) * x)
    y2.backward(torch.ones_like(y2) * x)
    assert_close(y1, y2, 1e-5, 1e-5, "output")
    assert_close(x1.grad, x2.grad, 1e-4, 1e-4, "dx")
    assert_close(ours.running_var, theirs.running_var, 1e-6, 1e-6, "running_var")
    ours.eval()
    assert ours(x[:1]).shape == x[:1].shape


def test_world_size_one_group_is_plain_batch_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        ours, plain = bn.SyncBatchNorm(3), bn.BatchNorm1d(3)
        x = torch.randn(5, 3, 2)
        assert_close(ours(x), plain(x), 0, 0, "output")
        assert torch.equal(ours.running_var, plain.running_var)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ours(torch.randn(1, 3))  # the single-process rule
    finally:
        dist.destroy_process_group()


def test_state_dict_matches_torch_sync_batch_norm() -> None:
    ours, theirs = bn.SyncBatchNorm(5), torch.nn.SyncBatchNorm(5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.extra_repr() == theirs.extra_repr()
    with torch.no_grad():
        theirs.running_mean.normal_()
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    torch.nn.BatchNorm2d(5).load_state_dict(ours.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean)


def test_convert_sync_batchnorm() -> None:
    class Ghostish(bn.BatchNorm2d):  # a variant: normalizes differently, left alone
        pass

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(bn.BatchNorm2d(4, bias=False), Ghostish(4)),
        torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False),
    )
    model[1].eval()
    weight = model[1].weight
    running_mean = model[1].running_mean
    converted = bn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert isinstance(model[1], bn.SyncBatchNorm) and not model[1].training
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert isinstance(model[2][0], bn.SyncBatchNorm) and model[2][0].bias is None
    assert type(model[2][1]) is Ghostish
    assert isinstance(model[3], bn.SyncBatchNorm) and model[3].weight is None
    assert model[3].running_mean is None
    single = bn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2))
    assert isinstance(single, bn.SyncBatchNorm)
    assert bn.create_norm("sync", 4, dim=1).num_features == 4


def test_errors() -> None:
    layer = bn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"at least 2 dims \(N, C, \*\), got 1D"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="expected input with 3 channels .* got 4"):
        layer(torch.randn(2, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0, 2.0, 3.0])  # type: ignore[arg-type]
