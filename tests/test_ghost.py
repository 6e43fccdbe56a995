"""GhostBatchNorm: per-chunk batch norm against a float64 reference, BN at full chunk."""

from __future__ import annotations

import io

import pytest
import reference
import torch
from cases import TOLERANCES, assert_close, triton_device

import batchnorm as bn
import batchnorm.nn.ghost as ghost_module

GHOST = {1: bn.GhostBatchNorm1d, 2: bn.GhostBatchNorm2d, 3: bn.GhostBatchNorm3d}
PLAIN = {1: bn.BatchNorm1d, 2: bn.BatchNorm2d, 3: bn.BatchNorm3d}


def _dim(shape: tuple[int, ...]) -> int:
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def _chunk_sizes(n: int, v: int, per_example: int) -> list[int]:
    """The documented chunking: full chunks, then a smaller last one unless it would hold
    a single value per channel, in which case it joins the previous chunk."""
    sizes = [v] * (n // v)
    tail = n % v
    if tail:
        if tail * per_example < 2:
            sizes[-1] += tail
        else:
            sizes.append(tail)
    return sizes


def _layer(shape, v, dtype=torch.float64, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    layer = GHOST[_dim(shape)](C, virtual_batch_size=v, dtype=dtype, **kwargs)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
    return layer


def _data(shape, dtype, channels_last=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    return x, dy


CHUNK_CASES = [
    # (name, shape, virtual_batch_size, channels_last)
    ("2d_equal", (12, 5), 3, False),
    ("2d_tail", (11, 5), 4, False),
    ("2d_single_row_tail_merged", (9, 5), 4, False),
    ("3d_tail", (7, 3, 6), 3, False),
    ("4d_equal", (8, 3, 4, 5), 2, False),
    ("4d_tail_of_one_example", (9, 4, 3, 3), 4, False),
    ("4d_channels_last", (8, 6, 3, 5), 2, True),
    ("4d_channels_last_tail", (7, 6, 3, 3), 3, True),
    ("4d_one_per_chunk", (4, 3, 2, 2), 1, False),
    ("5d_channels_last", (6, 3, 2, 3, 2), 2, True),
]


@pytest.fixture(params=["one_call", "call_per_chunk"])
def path(request, monkeypatch):
    """Run a test through either way of normalizing equal chunks."""
    threshold = 1 << 62 if request.param == "one_call" else 0
    monkeypatch.setattr(ghost_module, "_LOOP_MIN_VALUES", threshold)
    return request.param


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "shape", "v", "cl"), CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunks_equal_separate_batch_norm(name, shape, v, cl, dtype, backend, path) -> None:
    """Each chunk is normalized with its own statistics; one running update per step with
    the whole batch's statistics; gradients of the chunked map; against float64."""
    tol = TOLERANCES[dtype]
    layer = _layer(shape, v, dtype, backend=backend)
    layer.num_batches_tracked.fill_(3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x, dy = _data(shape, dtype, cl)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    if cl:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        assert y.is_contiguous(memory_format=fmt), "output keeps channels_last"

    per_example = x.numel() // (shape[0] * shape[1])
    sizes = _chunk_sizes(shape[0], v, per_example)
    ys, dxs, dw, db = [], [], torch.zeros_like(w0, dtype=torch.float64), torch.zeros_like(b0, dtype=torch.float64)
    for xc, dyc in zip(x.split(sizes), dy.split(sizes)):
        ys.append(reference.forward(xc, w0, b0, None, None, True, 0.1, layer.eps).y)
        dx_c, dw_c, db_c = reference.backward_train(dyc, xc, w0, layer.eps)
        dxs.append(dx_c)
        dw += dw_c
        db += db_c
    assert_close(y, torch.cat(ys), tol.atol, tol.rtol, f"{name}: output vs per-chunk reference")
    assert_close(xg.grad, torch.cat(dxs), tol.grad_atol, tol.grad_rtol, f"{name}: dx")
    scale = max(1.0, (x.numel() / shape[1]) ** 0.5)
    assert_close(layer.weight.grad, dw, tol.grad_atol * scale, tol.grad_rtol, f"{name}: dweight")
    assert_close(layer.bias.grad, db, tol.grad_atol * scale, tol.grad_rtol, f"{name}: dbias")
    # Running statistics: the whole batch's, exactly BN's update.
    whole = reference.forward(x, w0, b0, rm0, rv0, True, 0.1, layer.eps)
    assert_close(layer.running_mean, whole.running_mean, tol.atol, tol.rtol, f"{name}: running_mean")
    assert_close(layer.running_var, whole.running_var, tol.atol, tol.rtol, f"{name}: running_var")
    assert int(layer.num_batches_tracked) == 4


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize(
    ("shape", "v"), [((6, 4), 6), ((6, 4), 100), ((5, 3, 4, 4), 5), ((5, 3, 7), 8)]
)
def test_full_chunk_is_batch_norm_exactly(shape, v, backend) -> None:
    """virtual_batch_size >= N: identical outputs, gradients and running statistics."""
    ghost = _layer(shape, v, torch.float32, backend=backend)
    plain = PLAIN[_dim(shape)](shape[1], backend=backend)
    plain.load_state_dict(ghost.state_dict())
    x, dy = _data(shape, torch.float32)
    for _ in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ghost(xa), plain(xb)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(ghost.weight.grad, plain.weight.grad)
    assert torch.equal(ghost.bias.grad, plain.bias.grad)
    for key, value in plain.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value), key


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_follow_batch_norm_over_steps(momentum) -> None:
    """Several chunked steps of varying size: running statistics track plain BN's."""
    ghost = bn.GhostBatchNorm2d(5, virtual_batch_size=3, momentum=momentum)
    plain = torch.nn.BatchNorm2d(5, momentum=momentum)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x = torch.randn(7 + step, 5, 3, 3, generator=gen) * (1 + step) + step
        ghost(x)
        plain(x)
    assert_close(ghost.running_mean, plain.running_mean, 1e-5, 1e-5, "running_mean")
    assert_close(ghost.running_var, plain.running_var, 1e-5, 1e-5, "running_var")
    assert int(ghost.num_batches_tracked) == 6


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["reference", "numba", "triton"])
def test_running_stats_precise_far_from_zero(backend, layout, path) -> None:
    """At 1e4 ± 1e-2 the chunks' means differ by less than a float32 mean's rounding
    (~5e-4), so the between-chunk part of the merged variance needs the chunks' means
    to more digits: the unfused paths take them in float64 from the backend (float32
    means gave 3.5e-3 relative error in running_var). The fused numba kernel merges
    in float64 itself."""
    device = triton_device() if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(4)
    x = (1e4 + 1e-2 * torch.randn(32, 3, 8, 8, generator=gen, dtype=torch.float64)).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ghost = bn.GhostBatchNorm2d(3, virtual_batch_size=8, momentum=1.0, backend=backend)
    ghost.to(device)(x.to(device))
    ghost.cpu()
    exact = x.double()
    mean, var = exact.mean((0, 2, 3)), exact.var((0, 2, 3))
    mean_err = ((ghost.running_mean.double() - mean).abs() / mean).max().item()
    var_err = ((ghost.running_var.double() - var).abs() / var).max().item()
    assert mean_err < 1e-7, f"running_mean relative error {mean_err:.3g}"
    # 1e-5: the Triton interpreter sums a tile row after row (~2e-6 here, see
    # test_triton); reference and numba give ~5e-8.
    assert var_err < 1e-5, f"running_var relative error {var_err:.3g}"


def test_eval_is_batch_norm() -> None:
    ghost = _layer((8, 4, 3, 3), 2, torch.float32).eval()
    plain = bn.BatchNorm2d(4).eval()
    plain.load_state_dict(ghost.state_dict())
    x, _ = _data((8, 4, 3, 3), torch.float32)
    assert torch.equal(ghost(x), plain(x))
    assert torch.equal(ghost(x[:1]), plain(x[:1]))


def test_without_running_stats_eval_uses_ghost_batches() -> None:
    ghost = bn.GhostBatchNorm1d(3, virtual_batch_size=2, track_running_stats=False, dtype=torch.float64)
    x, _ = _data((4, 3), torch.float64)
    expected = torch.cat([reference.forward(c, None, None, None, None, True, 0.1, 1e-5).y for c in x.split(2)])
    assert_close(ghost.eval()(x), expected, 1e-12, 1e-10, "eval with batch statistics")


def test_state_dict_is_torch_batch_norm() -> None:
    ghost = bn.GhostBatchNorm2d(4, virtual_batch_size=2)
    theirs = torch.nn.BatchNorm2d(4)
    assert list(ghost.state_dict()) == list(theirs.state_dict())
    theirs(torch.randn(6, 4, 3, 3) + 2)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ghost.load_state_dict(torch.load(buffer), strict=True)
    ghost(torch.randn(6, 4, 3, 3))
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ghost.state_dict(), strict=True)
    assert torch.equal(back.running_var, ghost.running_var)


def test_bfloat16_input_float32_statistics(path) -> None:
    ghost = _layer((8, 6, 4, 4), 2, torch.float32)
    rm0, rv0 = ghost.running_mean.clone(), ghost.running_var.clone()
    x, dy = _data((8, 6, 4, 4), torch.bfloat16, channels_last=True)
    xg = x.clone().requires_grad_()
    y = ghost(xg)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert ghost.running_mean.dtype == torch.float32 and xg.grad.dtype == torch.bfloat16
    tol = TOLERANCES[torch.bfloat16]
    w, b = ghost.weight.detach(), ghost.bias.detach()
    expected = torch.cat([reference.forward(c, w, b, None, None, True, 0.1, 1e-5).y for c in x.split(2)])
    assert_close(y, expected, tol.atol, tol.rtol, "bf16 output")
    whole = reference.forward(x, w, b, rm0, rv0, True, 0.1, 1e-5)
    assert_close(ghost.running_var, whole.running_var, 1e-5, 1e-5, "float32 running_var from bf16 input")


def test_gradcheck_and_gradgradcheck(path) -> None:
    ghost = _layer((7, 3, 2, 2), 3, torch.float64, momentum=0.0)  # tail chunk of 1 example
    x, _ = _data((7, 3, 2, 2), torch.float64)
    x.requires_grad_()

    def fn(inp, w, b):
        return torch.func.functional_call(ghost, {"weight": w, "bias": b}, (inp,))

    w = ghost.weight.detach().clone().requires_grad_()
    b = ghost.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_non_finite_batch_is_skipped(path) -> None:
    ghost = bn.GhostBatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(6, 3, 2, 2)
    x[5, 1, 0, 0] = float("nan")  # only the last chunk is bad
    ghost(x)
    assert torch.equal(ghost.running_mean, torch.zeros(3))
    assert torch.equal(ghost.running_var, torch.ones(3))
    assert int(ghost.num_batches_tracked) == 0 and int(ghost.num_batches_skipped) == 1
    strict = bn.GhostBatchNorm2d(3, virtual_batch_size=2, check_finite=True)
    with pytest.raises(FloatingPointError, match="GhostBatchNorm2d"):
        strict(x)
    assert torch.equal(strict.running_mean, torch.zeros(3))
    assert int(strict.num_batches_skipped) == 1  # counted, as by the other layers
    # The unfused path (bfloat16 input) counts it too.
    strict = bn.GhostBatchNorm2d(3, virtual_batch_size=2, check_finite=True)
    with pytest.raises(FloatingPointError, match="GhostBatchNorm2d"):
        strict(x.bfloat16())
    assert torch.equal(strict.running_var, torch.ones(3)) and int(strict.num_batches_skipped) == 1


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_bad_virtual_batch_size(bad) -> None:
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bn.GhostBatchNorm2d(4, virtual_batch_size=bad)


def test_one_value_per_chunk_is_an_error() -> None:
    ghost = bn.GhostBatchNorm1d(4, virtual_batch_size=1)
    with pytest.raises(ValueError, match="virtual_batch_size=1 leaves one value per channel"):
        ghost(torch.randn(6, 4))
    with pytest.raises(ValueError, match="expected 4D"):
        bn.GhostBatchNorm2d(4)(torch.randn(6, 4))


def test_registry_and_repr() -> None:
    layer = bn.create_norm("ghost", 8, virtual_batch_size=4)
    assert isinstance(layer, bn.GhostBatchNorm2d) and isinstance(layer, bn.BatchNorm2d)
    assert "virtual_batch_size=4" in repr(layer)
    assert isinstance(bn.create_norm("ghost", 8, dim=1), bn.GhostBatchNorm1d)


def test_numpy_virtual_batch_size_is_accepted() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.GhostBatchNorm2d(3, virtual_batch_size=np.int64(4))
    assert layer.virtual_batch_size == 4 and type(layer.virtual_batch_size) is int
    assert layer(torch.randn(8, 3, 2, 2)).shape == (8, 3, 2, 2)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        bn.GhostBatchNorm2d(3, virtual_batch_size=np.float64(4.0))
