"""batchnorm.functional.batch_norm: torch.nn.functional's semantics, errors and safety."""

from __future__ import annotations

import copy
import inspect

import pytest
import reference
import torch
from cases import assert_close

import batchnorm as bn

F = bn.functional
BACKENDS = ["reference", "numba", "aten"]


def test_signature_matches_torch() -> None:
    ours = inspect.signature(F.batch_norm).parameters
    theirs = inspect.signature(torch.nn.functional.batch_norm).parameters
    positional = [p for p in ours.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in positional] == list(theirs)
    for p in positional:
        assert p.default == theirs[p.name].default


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_as_torch_functional(backend: str) -> None:
    x = torch.randn(6, 4, 5) * 3 + 1
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_t, rv_t = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-3, backend=backend)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, True, 0.3, 1e-3)
    assert_close(y, y_t, 1e-5, 1e-5, "y")
    assert_close(rm, rm_t, 1e-6, 1e-6, "running_mean")
    assert_close(rv, rv_t, 1e-6, 1e-6, "running_var")
    y = F.batch_norm(x, rm, rv, w, b, False, 0.3, 1e-3, backend=backend)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, False, 0.3, 1e-3)
    assert_close(y, y_t, 1e-5, 1e-5, "y eval")


def test_training_without_running_stats() -> None:
    x = torch.randn(5, 3)
    y = F.batch_norm(x, None, None, training=True)
    assert_close(y, reference.forward(x, None, None, None, None, True, 0.1, 1e-5).y, 1e-5, 1e-5, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_batch_never_touches_running_stats(backend: str, bad: float) -> None:
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    tracked, skipped = torch.tensor(2), torch.tensor(0)
    x = torch.randn(4, 3, 5)
    x[1, 2, 3] = bad
    y = F.batch_norm(x, rm, rv, training=True, backend=backend,
                     num_batches_tracked=tracked, num_batches_skipped=skipped)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert int(tracked) == 2 and int(skipped) == 1
    assert not torch.isfinite(y[:, 2]).all()  # the bad channel shows it; nothing is hidden
    # A good batch afterwards is applied and counted.
    F.batch_norm(torch.randn(4, 3, 5), rm, rv, training=True, backend=backend,
                 num_batches_tracked=tracked, num_batches_skipped=skipped)
    assert int(tracked) == 3 and int(skipped) == 1
    assert not torch.equal(rm, rm0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_raises_and_keeps_stats(backend: str) -> None:
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        F.batch_norm(x, rm, rv, training=True, backend=backend, check_finite=True)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_overflowing_variance_is_skipped() -> None:
    """Finite inputs whose variance overflows float32 are not written into the buffers."""
    rm, rv = torch.zeros(2), torch.ones(2)
    x = torch.tensor([[3e38, 1.0], [-3e38, 2.0]])
    skipped = torch.tensor(0)
    F.batch_norm(x, rm, rv, training=True, num_batches_skipped=skipped)
    assert torch.isfinite(rv).all() and int(skipped) == 1


def test_cumulative_average_needs_counter() -> None:
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend: str) -> None:
    rm, rv = torch.zeros(3), torch.ones(3)
    w = torch.ones(3, requires_grad=True)
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = F.batch_norm(x, rm, rv, w, None, training=True, backend=backend)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(3))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_large_offset_is_stable(backend: str, fmt: str) -> None:
    """float32 input 1e4 + N(0, 1): variance within 1e-3 relative of float64."""
    gen = torch.Generator().manual_seed(3)
    x64 = 1e4 + torch.randn(32, 4, 16, 16, generator=gen, dtype=torch.float64)
    x = x64.float()
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4), torch.zeros(4)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
    expected = x.double().transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True)
    rel = ((rv.double() - expected).abs() / expected).max().item()
    assert rel < 1e-3, rel
    # The output is normalized: unit variance per channel.
    y = F.batch_norm(x, None, None, training=True, backend=backend)
    assert_close(y.double().transpose(0, 1).reshape(4, -1).std(dim=1, unbiased=False),
                 torch.ones(4), 1e-3, 0, "output std")


PRECISION_CASES = [
    # (backend, bound on the running variance's relative error) for float32 input
    # 1e4 + 0.1·N(0, 1): the numba kernels' corrected two-pass (pieces of a row summed
    # in float32, everything else in float64), and aten's float32 accumulation
    # (torch's own precision), as docs/benchmarks.md says.
    ("numba", 1e-6),
    ("aten", 1e-3),
]


@pytest.mark.parametrize(("backend", "bound"), PRECISION_CASES)
@pytest.mark.parametrize(
    "shape", [(4096, 8), (60, 100), (64, 8, 16, 16), (4, 3, 65536)]  # the last: long rows
)
def test_variance_precision_far_from_zero(backend: str, bound: float, shape) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    C = shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0, backend=backend)
    dims = [0, *range(2, x.dim())]
    expected = x.double().var(dims, unbiased=True)
    rel = ((rv.double() - expected).abs() / expected).max().item()
    assert rel < bound, rel


@pytest.mark.parametrize("rows", [2, 3, 255, 256, 257, 1000, 4099])
@pytest.mark.parametrize("pattern", ["steps", "ramp", "outlier_first"])
def test_channel_minor_statistics_when_the_mean_moves_along_rows(rows: int, pattern: str) -> None:
    """The channel-minor statistics pass works in blocks of 256 rows, each centred on
    its own mean and merged with Chan's formula. Inputs whose mean jumps between blocks
    (steps of 1e4), drifts (a ramp) or whose first row is an outlier: batch mean
    within 1e-6 standard deviations and variance within 1e-6 relative of float64, for
    row counts about the block size. With the outlier the bound on the variance is
    2e-5: its square, 1e6 times the others', sits in a float32 block sum, and each
    later add into that accumulator rounds at its ulp (up to 64 adds of eps32/2)."""
    gen = torch.Generator().manual_seed(5)
    r = torch.arange(rows, dtype=torch.float64)[:, None]
    noise = 0.1 * torch.randn(rows, 6, generator=gen, dtype=torch.float64)
    if pattern == "steps":
        x64 = 1e4 * ((r // 256) % 2) + noise
    elif pattern == "ramp":
        x64 = 50.0 * r + noise
    else:
        x64 = noise.clone()
        x64[0] = 1e5
    x = x64.float()
    rm, rv = torch.zeros(6), torch.ones(6)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0, backend="numba")
    xd = x.double()
    mean, var = xd.mean(0), xd.var(0, unbiased=True)
    assert ((rm.double() - mean).abs() / var.sqrt()).max().item() < 1e-6
    bound = 2e-5 if pattern == "outlier_first" else 1e-6
    assert ((rv.double() - var).abs() / var).max().item() < bound


def _float32_and_float64_grads(make, x: torch.Tensor, dy: torch.Tensor):
    """(dx, dγ, dβ) of the layer ``make()`` in float32 and of the same layer (same
    parameters) in float64 on the same float32-rounded input."""
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.fill_(1e4)  # (batch renorm's r and d read them)
        layer.running_var.fill_(1e-4)
    grads = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(layer).to(dtype)
        xi = x.detach().to(dtype).clone().requires_grad_()
        m(xi).backward(dy.to(dtype))
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    return grads


CL = torch.channels_last
PRECISE_BACKWARD_CASES = {
    "batchnorm-NCHW": (lambda: bn.BatchNorm2d(3, backend="numba"), (8, 3, 32, 32)),
    "batchnorm-NHWC": (lambda: bn.BatchNorm2d(3, backend="numba"), (8, 3, 32, 32), CL),
    "batchnorm-NC": (lambda: bn.BatchNorm1d(3, backend="numba"), (8192, 3)),
    "ghost-NHWC": (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
                   (8, 3, 32, 32), CL),
    "renorm-NHWC": (lambda: bn.BatchRenorm2d(3, backend="numba"), (8, 3, 32, 32), CL),
    "renorm-NC": (lambda: bn.BatchRenorm1d(3, backend="numba"), (8192, 3)),
    "batchnorm-NCL": (lambda: bn.BatchNorm1d(3, backend="numba"), (8, 3, 1024)),
    "ghost-NCHW": (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
                   (8, 3, 32, 32)),
    "renorm-NCHW": (lambda: bn.BatchRenorm2d(3, backend="numba"), (8, 3, 32, 32)),
    "renorm-NCL": (lambda: bn.BatchRenorm1d(3, backend="numba"), (8, 3, 1024)),
    # the reference backend's backward takes x̂ about the data's mean too
    "reference-NCHW": (lambda: bn.BatchNorm2d(3, backend="reference"), (8, 3, 32, 32)),
    "reference-NC": (lambda: bn.BatchNorm1d(3, backend="reference"), (8192, 3)),
    # BatchNormAct whose backward rebuilds z (silu, a negative slope): about the saved
    # mean, with the mean's rounding summed first (numba_cpu._SHIFT_MIN)
    "act-silu-NCHW": (lambda: bn.BatchNormAct2d(3, "silu", backend="numba"), (8, 3, 32, 32)),
    "act-silu-NHWC": (lambda: bn.BatchNormAct2d(3, "silu", backend="numba"), (8, 3, 32, 32),
                      CL),
    "act-leaky-NHWC": (
        lambda: bn.BatchNormAct2d(3, "leaky_relu", negative_slope=-0.5, backend="numba"),
        (8, 3, 32, 32), CL,
    ),
}


@pytest.mark.parametrize("case", list(PRECISE_BACKWARD_CASES))
def test_numba_gradients_precise_far_from_zero(case: str) -> None:
    """The numba backward centres x on the float32-rounded mean and corrects the sums
    by how far that is from the data's mean (channel-minor inputs where |mean|·invstd
    is large, see numba_cpu._SHIFT_MIN), and so does the reference's: at 1e4 ± 1e-2
    dx and dγ keep ~1e-7, where torch's backward (centred on the rounded mean) is off
    by ~1e-2 in dγ."""
    make, shape, *fmt = PRECISE_BACKWARD_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=fmt[0] if fmt else torch.contiguous_format)
    dy = torch.randn(shape, generator=gen)
    ours, exact = _float32_and_float64_grads(make, x, dy)
    for name, a, b in zip(("dx", "dweight", "dbias"), ours, exact):
        rel = float((a.double() - b).abs().max() / b.abs().max())
        assert rel < 2e-6, (name, rel)
    # torch's own float32 backward, for scale: the correction is what makes the difference
    torch_layer = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    theirs, plain = _float32_and_float64_grads(lambda: torch_layer(3), x, dy)
    assert float((theirs[1].double() - plain[1]).abs().max() / plain[1].abs().max()) > 1e-4


# (layer factory, shape, memory format): the paths whose create_graph backward is
# _reference.differentiable_backward
DOUBLE_BACKWARD_CASES = {
    "numba-NCHW": (lambda: bn.BatchNorm2d(3, backend="numba"), (8, 3, 16, 16)),
    "reference-NHWC": (lambda: bn.BatchNorm2d(3, backend="reference"), (8, 3, 16, 16), CL),
    "auto-NC": (lambda: bn.BatchNorm1d(3), (2048, 3)),
    "ghost-NCHW": (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
                   (8, 3, 16, 16)),
    "renorm-NCHW": (lambda: bn.BatchRenorm2d(3, backend="numba"), (8, 3, 16, 16)),
    "act-silu-NCHW": (lambda: bn.BatchNormAct2d(3, "silu", backend="numba"), (8, 3, 16, 16)),
    "act-relu-NHWC": (lambda: bn.BatchNormAct2d(3, "relu", backend="numba"), (8, 3, 16, 16),
                      CL),
}


@pytest.mark.parametrize("case", list(DOUBLE_BACKWARD_CASES))
def test_double_backward_precise_far_from_zero(case: str) -> None:
    """With create_graph=True the backward is a graph of differentiable ops, x̂ about the
    data's mean (centre + offset, _reference.differentiable_backward): at 1e4 ± 1e-2 dx,
    dγ and a second derivative (of |dx|² + Σdγ) keep ~1e-7 of the float64 layer's.
    About the float32 mean alone they were off by ~1e-3, ~2e-2 and ~2e-3."""
    make, shape, *fmt = DOUBLE_BACKWARD_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=fmt[0] if fmt else torch.contiguous_format)
    dy = torch.randn(shape, generator=gen)
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    results = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(layer).to(dtype)
        xi = x.to(dtype, copy=True).requires_grad_()
        dx, dw = torch.autograd.grad(m(xi), (xi, m.weight), dy.to(dtype), create_graph=True)
        (second,) = torch.autograd.grad((dx * dx).sum() + dw.sum(), xi)
        results.append((dx.detach(), dw.detach(), second))
    for name, a, b in zip(("dx", "dweight", "second"), *results):
        rel = float((a.double() - b).abs().max() / b.abs().max())
        assert rel < 2e-6, (name, rel)


def _act(activation: str, backend: str):
    return lambda: bn.BatchNormAct2d(3, activation, backend=backend)


# (layer factory, shape, memory format): the paths that own their output pass
PRECISE_OUTPUT_CASES = {
    "numba-NCHW": (lambda: bn.BatchNorm2d(3, backend="numba"), (8, 3, 32, 32)),
    "numba-NHWC": (lambda: bn.BatchNorm2d(3, backend="numba"), (8, 3, 32, 32), CL),
    "numba-NC": (lambda: bn.BatchNorm1d(3, backend="numba"), (8192, 3)),
    "numba-NCL": (lambda: bn.BatchNorm1d(3, backend="numba"), (8, 3, 1024)),
    "ghost-NCHW": (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
                   (8, 3, 32, 32)),
    "ghost-NHWC": (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
                   (8, 3, 32, 32), CL),
    "renorm-NCHW": (lambda: bn.BatchRenorm2d(3, backend="numba"), (8, 3, 32, 32)),
    "renorm-NC": (lambda: bn.BatchRenorm1d(3, backend="numba"), (8192, 3)),
    "act-relu-NCHW": (_act("relu", "numba"), (8, 3, 32, 32)),
    "act-silu-NHWC": (_act("silu", "numba"), (8, 3, 32, 32), CL),
    "act-leaky-NCHW": (_act("leaky_relu", "numba"), (8, 3, 32, 32)),
    "reference-NCHW": (lambda: bn.BatchNorm2d(3, backend="reference"), (8, 3, 32, 32)),
    "reference-NC": (lambda: bn.BatchNorm1d(3, backend="reference"), (8192, 3)),
    "reference-act-silu": (_act("silu", "reference"), (8, 3, 32, 32)),
    # "auto", which runs aten's kernels on these near zero (small, channel-minor, eval)
    "auto-NCHW": (lambda: bn.BatchNorm2d(3), (8, 3, 8, 8)),
    "auto-NHWC": (lambda: bn.BatchNorm2d(3), (8, 3, 32, 32), CL),
    "auto-NC": (lambda: bn.BatchNorm1d(3), (4096, 3)),
    "auto-act-composed": (lambda: bn.BatchNormAct2d(3, "relu"), (8, 3, 8, 8)),
}


def _float32_and_float64_outputs(
    layer: torch.nn.Module, x: torch.Tensor, training: bool
) -> list[torch.Tensor]:
    """The outputs (as float64) of ``layer`` in float32 and of the same layer in float64
    on the float32 input ``x``: random γ and β, running statistics those of x rounded
    to float32 (the same values in both; batch renorm's r and d read them too)."""
    dims = [0, *range(2, x.dim())]
    torch.manual_seed(1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.copy_(x.double().mean(dims))
        layer.running_var.copy_(x.double().var(dims))
    layer.train(training)
    ys = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(layer).to(dtype)
        with torch.no_grad():
            m.running_mean.copy_(layer.running_mean.float())  # the same float32 value
            m.running_var.copy_(layer.running_var.float())
            ys.append(m(x.to(dtype)).double())
    return ys


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(PRECISE_OUTPUT_CASES))
def test_output_precise_far_from_zero(case: str, training: bool) -> None:
    """The output passes compute (x − c)·k + (β − (μ − c)·k) about c, the mean rounded
    to float32 (the running mean in eval): at 1e4 ± 1e-2 the float32 output keeps
    ~1e-7 of the float64 layer's on the same input, where torch's x·k + (β − μ·k),
    rounded at the size of x·k (1e6), is off by ~1e-2."""
    make, shape, *fmt = PRECISE_OUTPUT_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=fmt[0] if fmt else torch.contiguous_format)
    ours, exact = _float32_and_float64_outputs(make(), x, training)
    assert float((ours - exact).abs().max()) < 2e-6
    # torch's own float32 layer, for scale
    torch_layer = torch.nn.BatchNorm2d(3) if len(shape) == 4 else torch.nn.BatchNorm1d(3)
    theirs, plain = _float32_and_float64_outputs(torch_layer, x, training)
    assert float((theirs - plain).abs().max()) > 1e-3


# (layer factory, shape, memory format): training steps that "auto" sends to aten's
# kernels (whole, or for the backward) when the data are near zero
AUTO_FAR_CASES = {
    "small-NCHW": (lambda: bn.BatchNorm2d(3), (8, 3, 8, 8)),
    "NHWC": (lambda: bn.BatchNorm2d(3), (8, 3, 32, 32), CL),
    "NC": (lambda: bn.BatchNorm1d(3), (4096, 3)),
    "untracked": (lambda: bn.BatchNorm2d(3, track_running_stats=False), (8, 3, 8, 8)),
    "cumulative": (lambda: bn.BatchNorm2d(3, momentum=None), (8, 3, 8, 8)),
    # numba's forward, aten's backward (SplitBackend): channel-major rows under 512
    "split-NCHW": (lambda: bn.BatchNorm2d(16), (64, 16, 16, 16)),  # 2^18 values
    "split-renorm": (lambda: bn.BatchRenorm2d(3), (64, 3, 16, 16)),
    # batch renorm's composition: numba's r, d and update, then aten's batch norm
    "renorm-composed": (lambda: bn.BatchRenorm2d(3), (8, 3, 8, 8)),
    "renorm-composed-NHWC": (lambda: bn.BatchRenorm2d(3), (8, 3, 16, 16), CL),
    # composed BatchNormAct: batch norm through the functional, then add and relu
    "act-composed": (lambda: bn.BatchNormAct2d(3, "relu"), (8, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(AUTO_FAR_CASES))
def test_auto_training_precise_far_from_zero(case: str) -> None:
    """Under "auto" a training batch with some channel more than 16 standard deviations
    from zero runs on the numba kernels instead of aten's (numba_cpu._far_from_zero):
    at 1e4 ± 1e-2 output, dx, dγ and the running statistics keep ~1e-7 of the float64
    layer's (aten's own: ~1e-2 in the output and dγ), and the batch is counted once."""
    make, shape, *fmt = AUTO_FAR_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=fmt[0] if fmt else torch.contiguous_format)
    dy = torch.randn(shape, generator=gen)
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    results = []
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(layer).to(dtype)
        xi = x.to(dtype, copy=True).requires_grad_()
        y = m(xi)
        y.backward(dy.to(dtype))
        stats = [] if m.running_mean is None else [m.running_mean, m.running_var]
        results.append([y.detach(), xi.grad, m.weight.grad, m.bias.grad, *stats])
        if m.num_batches_tracked is not None:
            assert int(m.num_batches_tracked) == 1 and int(m.num_batches_skipped) == 0
    for i, (a, b) in enumerate(zip(*results)):
        rel = float((a.double() - b).abs().max() / b.abs().max())
        assert rel < 2e-6, (i, rel)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_auto_eval_follows_its_running_statistics(grad: bool) -> None:
    """"auto"'s eval test (aten.eval_far_from_zero) is cached per running_mean and
    redone when the statistics change: by an in-place torch op (their versions) and by
    a training step whose numba kernels write them through pointers (the write count).
    Each eval below must keep ~1e-7 of the float64 layer's output."""
    gen = torch.Generator().manual_seed(0)
    far = (1e4 + 1e-2 * torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64)).float()
    near = torch.randn(8, 3, 8, 8, generator=gen)
    layer = bn.BatchNorm2d(3, momentum=1.0)  # a training step sets the running stats

    def eval_error(x: torch.Tensor) -> float:
        layer.eval()
        exact = copy.deepcopy(layer).double()
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y, e = layer(xi), exact(x.double())
        return float(((y.double() - e).abs().max() / e.abs().max()).detach())

    assert eval_error(near) < 2e-6  # near zero: cached "not far"
    layer.train()
    layer(far)  # numba's kernels write the running statistics: versions unchanged
    assert eval_error(far) < 2e-6
    layer.train()
    layer(near)  # back near zero (aten's statistics, written by a numba kernel)
    assert eval_error(near) < 2e-6
    with torch.no_grad():  # in place, through torch: versions change
        layer.running_mean.fill_(1e4)
        layer.running_var.fill_(1e-4)
    assert eval_error(far) < 2e-6


def test_auto_near_zero_training_stays_on_aten() -> None:
    """The test that keeps far-from-zero batches off aten leaves ordinary ones on it: a
    small NCHW step's output carries aten's autograd node."""
    layer = bn.BatchNorm2d(3)
    y = layer(torch.randn(8, 3, 8, 8, requires_grad=True))
    assert "NativeBatchNorm" in type(y.grad_fn).__name__, y.grad_fn


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("shape", "fmt"), [((8, 3, 32, 32), CL), ((8192, 3), None)])
def test_channel_minor_output_just_below_the_centring_threshold(shape, fmt, training) -> None:
    """Plain batch norm's channel-minor output loop drops the centre where no channel has
    |mean|·invstd > 16 (numba_cpu._uncentre): just below that, at 15 ± 1, the output
    still keeps ~1e-6 of the float64 layer's."""
    gen = torch.Generator().manual_seed(0)
    x = (15.0 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    layer = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(3, backend="numba")
    ours, exact = _float32_and_float64_outputs(layer, x, training)
    assert float((ours - exact).abs().max()) < 2e-6


def test_noncontiguous_input() -> None:
    x = torch.randn(6, 5, 8).permute(0, 2, 1)  # (6, 8, 5), not contiguous
    assert not x.is_contiguous()
    y = F.batch_norm(x, None, None, training=True)
    assert_close(y, reference.forward(x, None, None, None, None, True, 0.1, 1e-5).y, 1e-5, 1e-5, "y")


def test_eval_with_grad_is_differentiable() -> None:
    """In eval mode with grads, every input gets the fixed-affine-map gradient."""
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    torch.autograd.gradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False), (x, w, b))
    torch.autograd.gradgradcheck(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False), (x, w, b))


# (dtype, memory format, weight, bias, running statistics want a gradient, aten expected)
EVAL_GRAD_CASES = [
    (torch.float32, torch.contiguous_format, True, True, False, True),
    (torch.float32, torch.channels_last, True, True, False, True),
    (torch.float64, torch.contiguous_format, True, False, False, True),
    (torch.float64, torch.contiguous_format, False, False, False, True),
    (torch.float64, torch.contiguous_format, False, True, False, False),  # bias alone
    (torch.float64, torch.contiguous_format, True, True, True, False),  # stats with grad
    (torch.bfloat16, torch.contiguous_format, True, True, False, False),
]


@pytest.mark.parametrize(("dtype", "fmt", "has_w", "has_b", "stats_grad", "on_aten"), EVAL_GRAD_CASES)
def test_eval_with_grad_runs_aten_where_it_can(dtype, fmt, has_w, has_b, stats_grad, on_aten) -> None:
    """Eval with autograd recording is aten's one-node batch norm where it applies, the
    composed affine map elsewhere; both give the float64 closed form's gradients."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    stats = torch.float32 if dtype == torch.bfloat16 else dtype
    rm = torch.randn(3, generator=gen, dtype=torch.float64).to(stats)
    rv = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).to(stats)
    rv_in = rv.clone().requires_grad_() if stats_grad else rv
    y = F.batch_norm(x, rm, rv_in, w if has_w else None, b if has_b else None, False)
    assert ("NativeBatchNorm" in type(y.grad_fn).__name__) == on_aten, type(y.grad_fn).__name__
    assert y.is_contiguous(memory_format=fmt)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    y.backward(dy)
    expected = reference.forward(x.detach(), w.detach() if has_w else None,
                                 b.detach() if has_b else None, rm, rv, False, None, 1e-5)
    dx, dw, db = reference.backward_eval(dy, x.detach(), w.detach() if has_w else None, rm, rv, 1e-5)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert_close(y, expected.y, tol, tol, "output")
    assert_close(x.grad, dx, tol, tol, "dx")
    if has_w:
        assert_close(w.grad, dw, tol * 10, tol * 10, "dweight")
    if has_b:
        assert_close(b.grad, db, tol * 10, tol * 10, "dbias")
    if stats_grad:
        assert rv_in.grad is not None and bool(torch.isfinite(rv_in.grad).all())


def test_eval_with_grad_on_a_named_backend_stays_off_aten() -> None:
    """Only "auto" hands eval-with-gradients to aten: "reference" stays plain torch ops
    (the fused BatchNormAct's eval-with-gradients path keeps the caller's name too)."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, rm, rv, w, b, False, backend="reference")
    assert "NativeBatchNorm" not in type(y.grad_fn).__name__
    big = torch.randn(16, 64, 16, 16, requires_grad=True)
    w64, b64 = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    for backend, on_aten in (("auto", True), ("numba", False)):
        y = F.batch_norm_act(big, torch.zeros(64), torch.ones(64), w64, b64, False,
                             activation="identity", backend=backend)
        assert ("NativeBatchNorm" in type(y.grad_fn).__name__) == on_aten, backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 3, 2)])
def test_gradcheck_training(backend: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, w, b, True, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradcheck_channels_last_numba() -> None:
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: F.batch_norm(x, None, None, w, None, True, backend="numba"), (x, w))


def test_half_precision_statistics_in_float32() -> None:
    """bfloat16 input: output bfloat16, running statistics stay float32."""
    x = (torch.randn(8, 4, 3) * 2 + 100).bfloat16()
    rm, rv = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.float32
    expected_mean = x.double().mean(dim=(0, 2))
    assert_close(rm, expected_mean, 1e-4, 1e-6, "running_mean")


def test_float64_running_stats_stay_float64() -> None:
    x = torch.randn(8, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert rm.dtype == torch.float64
    assert_close(rm, x.mean(0), 1e-14, 1e-14, "running_mean")


EVAL_DTYPE_CASES = [
    # (input, weight/bias, running stats): the numba eval kernel with equal and mixed
    # dtypes must give the float64 reference's answer.
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),
    (torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float64),
    (torch.float64, None, torch.float32),
]


@pytest.mark.parametrize(("x_dtype", "p_dtype", "s_dtype"), EVAL_DTYPE_CASES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_numba_eval_with_mixed_dtypes(x_dtype, p_dtype, s_dtype, fmt: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=x_dtype) * 2 + 1
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = None if p_dtype is None else (torch.rand(5) + 0.5).to(p_dtype)
    b = None if p_dtype is None else torch.randn(5).to(p_dtype)
    rm, rv = torch.randn(5).to(s_dtype), (torch.rand(5) + 0.5).to(s_dtype)
    with torch.no_grad():
        y = F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3, backend="numba")
    xd = x.double()
    scale = (rv.double() + 1e-3).rsqrt() * (1.0 if w is None else w.double())
    shift = (0.0 if b is None else b.double()) - rm.double() * scale
    expected = xd * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    tol = 1e-12 if x_dtype == torch.float64 and s_dtype == torch.float64 else 2e-6
    assert y.dtype == x_dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == (fmt == "channels_last")
    assert_close(y, expected, tol, tol, "eval output")


def test_backend_choice_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        F.batch_norm(x, None, None, training=True, backend="cudnn")
    with pytest.raises(ValueError, match="numba.*float32/float64"):
        F.batch_norm(x.bfloat16(), None, None, training=True, backend="numba")


def test_auto_backend_picks_numba_on_cpu_float32() -> None:
    from batchnorm._backends import select_backend

    assert select_backend("auto", torch.randn(2, 2)).name == "numba"
    assert select_backend("auto", torch.randn(2, 2).half()).name == "reference"


AUTO_POLICY_CASES = [
    # (CPU vendor, shape, channels_last, training, expected backend under "auto")
    ("AuthenticAMD", (60, 100), False, True, "aten"),  # (N, C): channel-minor, aten
    ("AuthenticAMD", (4096, 512), False, True, "aten"),
    ("AuthenticAMD", (16, 32, 16, 16), False, True, "aten"),  # NCHW below ATEN_CHANNEL_MAJOR_MAX
    # NCHW at the threshold: numba's forward, aten's backward
    ("AuthenticAMD", (16, 64, 16, 16), False, True, "numba+aten"),
    ("AuthenticAMD", (16, 64, 16, 16), True, True, "aten"),  # channels_last: aten
    ("AuthenticAMD", (32, 64, 32, 32), True, True, "aten"),  # at any size
    ("AuthenticAMD", (16, 64, 16, 16), False, False, "aten"),  # eval: aten
    ("AuthenticAMD", (4, 64, 1, 1), False, True, "aten"),  # spatial size 1 is (N, C)
    ("", (32, 64, 32, 32), True, True, "aten"),  # vendor unknown: as AMD
    # Intel: numba for channels_last training from NUMBA_CHANNELS_LAST_MIN values
    ("GenuineIntel", (32, 64, 32, 32), True, True, "numba"),  # 2^21
    ("GenuineIntel", (16, 256, 56, 56), True, True, "numba"),
    ("GenuineIntel", (2, 64, 16, 32, 32), True, True, "numba"),  # channels_last_3d
    ("GenuineIntel", (31, 64, 32, 32), True, True, "aten"),  # just below
    ("GenuineIntel", (32, 64, 32, 32), True, False, "aten"),  # eval: aten
    ("GenuineIntel", (65536, 32), False, True, "aten"),  # (N, C): aten at any size
    ("GenuineIntel", (16, 64, 16, 16), False, True, "numba+aten"),  # NCHW as on AMD
]


@pytest.mark.parametrize(
    ("vendor", "shape", "channels_last", "training", "expected"), AUTO_POLICY_CASES
)
def test_auto_policy_on_cpu(vendor, shape, channels_last, training, expected, monkeypatch) -> None:
    from batchnorm import _backends
    from batchnorm._backends import prefer_aten, select_backend

    monkeypatch.setattr(_backends, "cpu_vendor", lambda: vendor)
    x = torch.empty(shape)
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    assert prefer_aten(select_backend("auto", x), x, training).name == expected
    # Named backends are never redirected, and other dtypes keep the reference.
    assert select_backend("numba", x).name == "numba"
    assert prefer_aten(select_backend("auto", x.half()), x.half(), training).name == "reference"


def test_cpu_vendor_reads_proc_cpuinfo() -> None:
    from batchnorm._backends import cpu_vendor

    vendor = cpu_vendor()
    assert isinstance(vendor, str)
    try:
        with open("/proc/cpuinfo") as f:
            listed = "vendor_id" in f.read()
    except OSError:
        listed = False
    assert bool(vendor) == listed


@pytest.mark.parametrize(("vendor", "twin"), [("GenuineIntel", "numba"), ("AuthenticAMD", "aten")])
def test_auto_channels_last_training_runs_the_vendor_choice(vendor: str, twin: str, monkeypatch) -> None:
    """A large channels_last training step under "auto" is the named backend's step
    exactly: output, input and parameter gradients, running statistics."""
    from batchnorm import _backends

    monkeypatch.setattr(_backends, "cpu_vendor", lambda: vendor)
    gen = torch.Generator().manual_seed(5)
    shape = (32, 64, 32, 32)  # 2^21 values, NUMBA_CHANNELS_LAST_MIN on Intel
    x = (torch.randn(shape, generator=gen) * 3 + 1).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).contiguous(memory_format=torch.channels_last)
    outputs = {}
    for name in ("auto", twin):
        layer = bn.BatchNorm2d(64, backend=name)
        gen.manual_seed(6)  # the same parameters for both
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=gen)
            layer.bias.uniform_(-1, 1, generator=gen)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        outputs[name] = (y, xi.grad, layer.weight.grad, layer.bias.grad,
                         layer.running_mean, layer.running_var)
    for got, want in zip(outputs["auto"], outputs[twin], strict=True):
        assert torch.equal(got, want)
    assert outputs["auto"][0].is_contiguous(memory_format=torch.channels_last)


BACKWARD_POLICY_CASES = [
    # (shape, channels_last, backend whose backward "auto" runs after numba's forward)
    ((8, 16, 8, 8), False, "numba+aten"),  # channel-major, rows below ATEN_BACKWARD_MAX_ROW
    ((16, 1024, 14, 14), False, "numba+aten"),
    ((6, 4, 7), False, "numba+aten"),
    ((16, 64, 56, 56), False, "numba"),  # long rows: numba's
    ((4, 3, 512), False, "numba"),
    ((60, 100), False, "numba"),  # channel-minor: numba's
    ((8, 16, 8, 8), True, "numba"),
    ((16, 32, 16, 16), True, "numba"),
]


@pytest.mark.parametrize(("shape", "channels_last", "expected"), BACKWARD_POLICY_CASES)
def test_auto_backward_policy_on_cpu(shape, channels_last, expected) -> None:
    from batchnorm._backends import prefer_aten_backward, select_backend

    x = torch.empty(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    split = prefer_aten_backward(select_backend("auto", x), x)
    assert split.name == expected
    # Everything but the plain backward is numba's: forward, eval and fused kernels.
    numba = select_backend("numba", x)
    assert split.forward_train == numba.forward_train
    assert split.renorm_forward_train == numba.renorm_forward_train
    if expected == "numba+aten":  # renorm's backward runs on aten's kernel
        assert split.renorm_backward_train != numba.renorm_backward_train
    # Other backends are never redirected.
    reference_backend = select_backend("reference", x)
    assert prefer_aten_backward(reference_backend, x) is reference_backend


@pytest.mark.parametrize("shape", [(16, 64, 16, 16), (32, 64, 128)], ids=["nchw", "ncl"])
@pytest.mark.parametrize("loc", [0.5, 1e3])
def test_split_backward_matches_reference(shape: tuple[int, ...], loc: float) -> None:
    """Large channel-major training under "auto" (numba forward, aten backward)
    against the float64 closed form: within float32 tolerances and as precise as
    numba's own backward near zero; far from zero as precise as torch's (aten's
    backward carries the rounding of the saved float32 mean, which numba's own
    backward corrects: see test_numba_gradients_precise_far_from_zero)."""
    from batchnorm._backends import prefer_aten, select_backend

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * 2 + loc
    dy = torch.randn(x.shape, generator=gen) + 0.3
    assert prefer_aten(select_backend("auto", x), x, training=True).name == "numba+aten"
    weight = torch.rand(64, generator=gen) + 0.5
    expected = reference.backward_train(dy, x, weight, 1e-5)
    errors = {}
    two_d = len(shape) == 4
    for backend in ("auto", "numba", "torch"):
        if backend == "torch":
            layer = (torch.nn.BatchNorm2d if two_d else torch.nn.BatchNorm1d)(64)
        else:
            layer = (bn.BatchNorm2d if two_d else bn.BatchNorm1d)(64, backend=backend)
        with torch.no_grad():
            layer.weight.copy_(weight)
        xg = x.clone().requires_grad_()
        layer(xg).backward(dy)
        got = (xg.grad, layer.weight.grad, layer.bias.grad)
        errors[backend] = [float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, expected)]
    for name, auto, numba, theirs in zip(
        ("dx", "dweight", "dbias"), errors["auto"], errors["numba"], errors["torch"]
    ):
        assert auto <= 2 * theirs + 1e-6, f"{name}: auto {auto:.2e} against torch {theirs:.2e}"
        assert numba <= 2 * auto + 1e-6, f"{name}: numba {numba:.2e} against auto {auto:.2e}"
        if loc < 1:
            assert auto <= 2 * numba + 1e-6, f"{name}: auto {auto:.2e} against numba {numba:.2e}"
            assert auto < 1e-5, f"{name}: {auto:.2e}"


@pytest.mark.parametrize("backend", ["numba", "aten"])
def test_backward_precision_on_long_runs(backend: str) -> None:
    """The channel-major backward sums each run (one row of one channel: here 65536
    values) in float32 and the runs in float64: against the float64 closed form its
    error stays that of float32 data (measured <= 2.4e-6 relative to the largest
    gradient, aten's <= 1.9e-6)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 65536, generator=gen) * 2 + 0.5
    dy = torch.randn(x.shape, generator=gen) + 0.3
    weight = torch.rand(3, generator=gen) + 0.5
    layer = bn.BatchNorm1d(3, backend=backend)
    with torch.no_grad():
        layer.weight.copy_(weight)
    xg = x.clone().requires_grad_()
    layer(xg).backward(dy)
    expected = reference.backward_train(dy, x, weight, 1e-5)
    got = (xg.grad, layer.weight.grad, layer.bias.grad)
    for name, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        error = float((g.double() - e).abs().max() / e.abs().max())
        assert error < 1e-5, f"{name}: {error:.2e}"


def test_aten_backend_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="backend='aten' runs on float32/float64 CPU tensors"):
        F.batch_norm(torch.randn(4, 3).half(), None, None, training=True, backend="aten")


def _forked_child(queue) -> None:  # pragma: no cover - runs in the child
    from batchnorm._backends import prefer_aten, select_backend

    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        y = bn.BatchNorm2d(3)(x)
    chosen = select_backend("auto", x)
    preferred = prefer_aten(chosen, x, training=True).name
    queue.put((chosen.name, preferred, float(y.mean()), float(y.std())))


def test_forked_child_after_parallel_kernels() -> None:
    """A child forked after the parent ran the parallel kernels still normalizes."""
    import multiprocessing as mp

    # Large enough for the threaded kernels: starts the parallel runtime in the parent.
    bn.BatchNorm2d(3, backend="numba")(torch.randn(16, 3, 64, 64))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_child, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    name, preferred, mean, std = queue.get(timeout=5)
    assert abs(mean) < 1e-5 and abs(std - 1) < 1e-2
    import numba

    if numba.threading_layer() == "omp":
        assert name == "reference"
    # "auto" never takes aten in a forked child: torch's own pool may not survive fork.
    assert "aten" not in preferred


def test_threads_launch_concurrently() -> None:
    """Several Python threads running the CPU kernels at once give correct results."""
    from concurrent.futures import ThreadPoolExecutor

    layers = [bn.BatchNorm2d(4) for _ in range(4)]
    inputs = [torch.randn(8, 4, 16, 16) * (i + 1) for i in range(4)]

    def run(i: int) -> float:
        with torch.no_grad():
            return float(layers[i](inputs[i]).std())

    with ThreadPoolExecutor(4) as pool:
        stds = list(pool.map(run, range(4)))
    assert all(abs(s - 1) < 1e-2 for s in stds)


@pytest.mark.parametrize("stats_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_precision_statistics_with_float32_input(stats_dtype, training) -> None:
    """numpy has no bfloat16 and the CPU kernels take float32/float64 parameters:
    "auto" falls back to the reference for such statistics; named kernels say why."""
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    rm, rv = torch.zeros(3, dtype=stats_dtype), torch.ones(3, dtype=stats_dtype)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, None, None, training, 0.5, 1e-5)
    y_ref = F.batch_norm(x, rm_ref, rv_ref, None, None, training, 0.5, 1e-5, backend="reference")
    assert_close(y, y_ref, 1e-6, 1e-6, "output")
    assert torch.equal(rm, rm_ref) and torch.equal(rv, rv_ref)
    for backend in ("numba", "aten"):
        with pytest.raises(ValueError, match=f"backend='{backend}' takes float32/float64 CPU"):
            F.batch_norm(x, rm, rv, None, None, training, backend=backend)


@pytest.mark.parametrize("kind", ["ghost", "renorm", "batch_act"])
def test_family_layers_with_half_precision_statistics(kind) -> None:
    kwargs = {"ghost": {"virtual_batch_size": 4}, "renorm": {}, "batch_act": {}}[kind]
    layer = bn.create_norm(kind, 3, **kwargs)
    layer.running_mean = layer.running_mean.half()
    layer.running_var = layer.running_var.half()
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    layer(x).sum().backward()
    assert layer.running_mean.dtype == torch.float16 and int(layer.num_batches_tracked) == 1
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_split_backend_copies_and_keeps_private_names() -> None:
    """SplitBackend delegates public attributes only: copying works (no recursion
    through __getattr__ before _forward exists) and private lookups fail cleanly."""
    import copy

    from batchnorm._backends import prefer_aten_backward, select_backend

    x = torch.empty(8, 16, 8, 8)
    split = prefer_aten_backward(select_backend("auto", x), x)
    assert copy.copy(split).name == "numba+aten"
    assert copy.deepcopy(split).name == "numba+aten"
    assert not hasattr(split, "_not_there")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_zero_dim_tensor_eps_and_momentum(backend) -> None:
    """torch.nn.functional.batch_norm takes 0-dim tensors for both; so does ours."""
    x = torch.randn(6, 3, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    y = bn.functional.batch_norm(x, rm, rv, training=True, momentum=torch.tensor(0.3),
                                 eps=torch.tensor(1e-3), backend=backend)
    expected = torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True, momentum=0.3, eps=1e-3)
    assert_close(y, expected, 1e-5, 1e-5, "output")
    assert_close(rv, rv_t, 1e-6, 1e-6, "running_var")
    with pytest.raises(ValueError, match="eps must be a number or a 0-dim real tensor"):
        bn.functional.batch_norm(x, rm, rv, training=True, eps=torch.ones(2))


def test_numpy_integer_num_features() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.BatchNorm2d(np.int64(3))
    assert layer(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_double_backward_with_a_bias_and_no_weight_under_auto() -> None:
    """aten's double backward fails for weight=None with a bias; "auto" keeps off it."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(inp, bias):
        return bn.functional.batch_norm(inp, None, None, None, bias, training=True)

    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("function", ["batch_norm", "batch_norm_act"])
@pytest.mark.parametrize(("counter", "got"), [
    (torch.zeros(1, dtype=torch.long), r"shape \(1,\)"),
    (torch.zeros((), dtype=torch.int32), "torch.int32"),
    (torch.zeros(()), "torch.float32"),
    (0, "int 0"),
], ids=["shape", "int32", "float", "python-int"])
def test_bad_counters_are_named(function: str, counter, got: str) -> None:
    call = getattr(F, function)
    mean, var = torch.zeros(3), torch.ones(3)
    for key in ("num_batches_tracked", "num_batches_skipped"):
        with pytest.raises(ValueError, match=rf"{function}: {key} must be a 0-dim int64 .*{got}"):
            call(torch.randn(4, 3), mean, var, training=True, **{key: counter})
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
