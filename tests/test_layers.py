"""BatchNorm1d/2d/3d against torch.nn.BatchNormXd and the float64 reference, case by case."""

from __future__ import annotations

import pytest
import reference
import torch
from cases import CASES, TOLERANCES, Case, assert_close, memory_format

import batchnorm as bn

OURS = {1: bn.BatchNorm1d, 2: bn.BatchNorm2d, 3: bn.BatchNorm3d}
TORCH = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "numba", "aten"]


def _supported(backend: str, dtype: torch.dtype) -> bool:
    return backend == "reference" or dtype in (torch.float32, torch.float64)


def _setup(case: Case, dtype: torch.dtype, backend: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    C = case.shape[1]
    # Half-precision inputs run through a float32 module: statistics stay float32.
    param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    kwargs = {"momentum": case.momentum, "affine": case.affine,
              "track_running_stats": case.track_running_stats, "dtype": param_dtype}
    ours = OURS[case.module_dim](C, backend=backend, **kwargs)
    theirs = TORCH[case.module_dim](C, **kwargs)
    with torch.no_grad():
        if case.affine:
            w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
            b = torch.randn(C, generator=gen, dtype=torch.float64)
            for layer in (ours, theirs):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        if case.track_running_stats:
            rm = torch.randn(C, generator=gen, dtype=torch.float64)
            rv = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
            for layer in (ours, theirs):
                layer.running_mean.copy_(rm)
                layer.running_var.copy_(rv)
                layer.num_batches_tracked.fill_(3)
    ours.train(case.training)
    theirs.train(case.training)
    x = (torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    x = x.contiguous(memory_format=memory_format(case))
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(dtype)
    return ours, theirs, x, dy


# numba runs float32/float64 only; half precision on the CPU goes through the reference.
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in DTYPES if _supported(b, d)]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference_and_torch(case: Case, dtype: torch.dtype, backend: str) -> None:
    tol = TOLERANCES[dtype]
    ours, theirs, x, dy = _setup(case, dtype, backend)
    w0 = None if ours.weight is None else ours.weight.detach().clone()
    b0 = None if ours.bias is None else ours.bias.detach().clone()
    rm0 = None if ours.running_mean is None else ours.running_mean.clone()
    rv0 = None if ours.running_var is None else ours.running_var.clone()
    batch_stats = case.training or not case.track_running_stats

    x_ours = x.clone().requires_grad_()
    y = ours(x_ours)
    y.backward(dy)

    # Output: dtype, shape and memory format of the input.
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=memory_format(case))

    ref = reference.forward(
        x, w0, b0, rm0, rv0, batch_stats, case.momentum, ours.eps, num_batches_tracked=3
    )
    assert_close(y, ref.y, tol.atol, tol.rtol, "output vs reference")
    if batch_stats:
        dx_ref, dw_ref, db_ref = reference.backward_train(dy, x, w0, ours.eps)
    else:
        dx_ref, dw_ref, db_ref = reference.backward_eval(dy, x, w0, rm0, rv0, ours.eps)
    assert_close(x_ours.grad, dx_ref, tol.grad_atol, tol.grad_rtol, "dx vs reference")
    if case.affine:
        # Parameter gradients are sums over m values; scale the tolerance with m.
        m = x.numel() // x.shape[1]
        scale = max(1.0, m ** 0.5)
        assert_close(ours.weight.grad, dw_ref, tol.grad_atol * scale, tol.grad_rtol, "dweight")
        assert_close(ours.bias.grad, db_ref, tol.grad_atol * scale, tol.grad_rtol, "dbias")
    if case.track_running_stats and case.training:
        assert_close(ours.running_mean, ref.running_mean, tol.atol, tol.rtol, "running_mean")
        assert_close(ours.running_var, ref.running_var, tol.atol, tol.rtol, "running_var")
        assert ours.running_mean.dtype == rm0.dtype
        assert int(ours.num_batches_tracked) == 4
    elif case.track_running_stats:
        assert torch.equal(ours.running_mean, rm0) and torch.equal(ours.running_var, rv0)
        assert int(ours.num_batches_tracked) == 3

    # The same step through torch.nn (where torch runs this dtype combination).
    x_theirs = x.clone().requires_grad_()
    try:
        y_t = theirs(x_theirs)
    except RuntimeError as err:  # pragma: no cover - depends on torch's CPU kernels
        pytest.skip(f"torch.nn cannot run this case: {err}")
    y_t.backward(dy)
    # torch rounds through its own path: compare at twice the tolerance.
    assert_close(y, y_t, 2 * tol.atol, 2 * tol.rtol, "output vs torch")
    assert_close(x_ours.grad, x_theirs.grad, 2 * tol.grad_atol, 2 * tol.grad_rtol, "dx vs torch")
    if case.track_running_stats:
        assert_close(ours.running_mean, theirs.running_mean, 2 * tol.atol, 2 * tol.rtol, "rm vs torch")
        assert_close(ours.running_var, theirs.running_var, 2 * tol.atol, 2 * tol.rtol, "rv vs torch")
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_over_many_steps(backend: str, momentum: float | None) -> None:
    """Ten training steps with varying batches: running statistics track torch's."""
    ours = bn.BatchNorm2d(5, momentum=momentum, backend=backend)
    theirs = torch.nn.BatchNorm2d(5, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        x = torch.randn(4 + step, 5, 3, 3, generator=gen) * (1 + step) + step
        ours(x)
        theirs(x)
    assert_close(ours.running_mean, theirs.running_mean, 1e-5, 1e-5, "running_mean")
    assert_close(ours.running_var, theirs.running_var, 1e-5, 1e-5, "running_var")
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 10


def test_backends_agree_float32() -> None:
    """The numba kernels and the torch-op reference give the same numbers."""
    gen = torch.Generator().manual_seed(2)
    for shape, fmt in [((16, 8, 9, 9), torch.contiguous_format), ((16, 8, 9, 9), torch.channels_last),
                       ((300, 33), torch.contiguous_format), ((5, 3, 4000), torch.contiguous_format)]:
        x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        results = []
        for backend in ("reference", "numba"):
            layer = bn.BatchNorm1d(shape[1], backend=backend) if len(shape) < 4 else bn.BatchNorm2d(shape[1], backend=backend)
            xi = x.clone().requires_grad_()
            y = layer(xi)
            y.backward(dy)
            results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_var))
        for a, b, what in zip(*results, ["y", "dx", "dw", "db", "running_var"]):
            assert_close(a, b, 1e-4, 1e-4, f"{shape} {fmt} {what}")


def test_parallel_chunks_in_channel_minor_kernel() -> None:
    """A channels_last input large enough to be split across threads merges exactly."""
    x = torch.randn(64, 16, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last) + 3
    layer = bn.BatchNorm2d(16, backend="numba", dtype=torch.float64)
    y = layer(x)
    ref = reference.forward(x, None, None, torch.zeros(16), torch.ones(16), True, 0.1, 1e-5)
    assert_close(y, ref.y, 1e-10, 1e-9, "output")
    assert_close(layer.running_var, ref.running_var, 1e-12, 1e-10, "running_var")
