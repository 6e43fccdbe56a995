"""BatchNormAct: act(BN(x) + residual) equals the composed layers; checkpoints stay BN's."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as TF
from cases import TOLERANCES, assert_close

import batchnorm as bn

ACTS = {
    "relu": torch.relu,
    "leaky_relu": lambda y: TF.leaky_relu(y, 0.2),
    "silu": TF.silu,
    "identity": lambda y: y,
}


def _pair(C, activation, dtype=torch.float32, **kwargs):
    fused = bn.BatchNormAct2d(C, activation, negative_slope=0.2, dtype=dtype, **kwargs)
    plain = bn.BatchNorm2d(C, dtype=dtype, **kwargs)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.normal_()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_equals_composed_layers(activation, with_residual, training) -> None:
    fused, plain = _pair(5, activation, torch.float64)
    fused.train(training)
    plain.train(training)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    r = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
    ya = fused(xa, ra if with_residual else None)
    z = plain(xb)
    yb = ACTS[activation](z + rb if with_residual else z)
    ya.backward(dy)
    yb.backward(dy)
    assert_close(ya, yb, 1e-12, 1e-10, "output")
    assert_close(xa.grad, xb.grad, 1e-12, 1e-10, "dx")
    assert_close(fused.weight.grad, plain.weight.grad, 1e-10, 1e-10, "dweight")
    assert_close(fused.bias.grad, plain.bias.grad, 1e-10, 1e-10, "dbias")
    if with_residual:
        assert_close(ra.grad, rb.grad, 1e-12, 1e-10, "dresidual")
    # The plain layer may run on another backend ("auto": aten for small inputs): the
    # running statistics agree to float64 rounding, not bit for bit.
    assert_close(fused.running_mean, plain.running_mean, 1e-14, 1e-14, "running_mean")
    assert_close(fused.running_var, plain.running_var, 1e-13, 1e-13, "running_var")


@pytest.mark.parametrize("activation", ["leaky_relu", "silu"])
def test_gradcheck(activation) -> None:
    layer = bn.BatchNormAct1d(3, activation, negative_slope=0.1, dtype=torch.float64, momentum=0.0)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, r))
    assert torch.autograd.gradgradcheck(layer, (x, r))


def test_channels_last_and_bfloat16() -> None:
    layer = bn.BatchNormAct2d(6, "relu")
    x = torch.randn(4, 6, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 6, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_()
    y = layer(xg, r)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert layer.running_mean.dtype == torch.float32 and xg.grad.dtype == torch.bfloat16
    plain = bn.BatchNorm2d(6)
    expected = torch.relu(plain(x).float() + r.float())
    tol = TOLERANCES[torch.bfloat16]
    assert_close(y, expected, tol.atol, tol.rtol, "bf16 output")
    assert_close(layer.running_var, plain.running_var, 1e-6, 1e-6, "running_var")
    # A contiguous residual does not change the output's memory format.
    y2 = layer(x, r.contiguous())
    assert y2.is_contiguous(memory_format=torch.channels_last)


def test_state_dict_is_torch_batch_norm() -> None:
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(6, 4, 3, 3) + 2)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    layer = bn.BatchNormAct2d(4, "silu")
    assert list(layer.state_dict()) == list(theirs.state_dict())
    layer.load_state_dict(torch.load(buffer), strict=True)
    torch.nn.BatchNorm2d(4).load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 4, 3, 3)
    assert_close(layer.eval()(x), TF.silu(theirs.eval()(x)), 1e-6, 1e-6, "eval output after load")


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'.*got 'gelu'"):
        bn.BatchNormAct2d(4, "gelu")
    with pytest.raises(TypeError, match="negative_slope must be a number"):
        bn.BatchNormAct2d(4, "leaky_relu", negative_slope="0.1")
    layer = bn.BatchNormAct2d(4)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"residual must have the input's shape \(2, 4, 3, 3\)"):
        layer(x, torch.randn(2, 4, 3, 2))
    with pytest.raises(TypeError, match="residual must match the input's dtype"):
        layer(x, torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        layer(x, 1.0)
    with pytest.raises(ValueError, match="expected 4D"):
        layer(torch.randn(2, 4))


# Small inputs take the composed path, large ones the fused kernels: the functional
# must treat both alike (the fused path once normalized with batch statistics here).
@pytest.mark.parametrize("shape", [(4, 3), (6, 4, 3, 3), (64, 64, 8, 8)], ids=["nc", "small", "fused"])
def test_functional_inference_needs_running_statistics(shape) -> None:
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"batch_norm_act: inference \(training=False\).*are None"):
        bn.functional.batch_norm_act(x, None, None, training=False)
    # Without statistics in training mode: batch statistics, on either path.
    dims = [0] + list(range(2, x.dim()))
    want = torch.relu((x - x.mean(dims, keepdim=True)) / (x.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt())
    assert_close(bn.functional.batch_norm_act(x, None, None, training=True), want, 1e-5, 1e-5, "output")


def test_functional_accepts_zero_dim_tensor_momentum_and_eps() -> None:
    x = torch.randn(6, 4, 3, 3)
    # Values a float32 0-dim tensor holds exactly, so both calls see the same numbers.
    stats = [torch.zeros(4), torch.ones(4)], [torch.zeros(4), torch.ones(4)]
    outs = [
        bn.functional.batch_norm_act(x, *stats[0], training=True, momentum=0.25, eps=2.0**-10),
        bn.functional.batch_norm_act(
            x, *stats[1], training=True, momentum=torch.tensor(0.25), eps=torch.tensor(2.0**-10)
        ),
    ]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])
    with pytest.raises(ValueError, match="momentum"):
        bn.functional.batch_norm_act(x, *stats[1], training=True, momentum=torch.tensor([0.1, 0.2]))


def test_registry_repr_and_activation_module() -> None:
    layer = bn.create_norm("batch_act", 8, dim=1, activation="leaky_relu", negative_slope=0.3)
    assert isinstance(layer, bn.BatchNormAct1d) and isinstance(layer, bn.BatchNorm1d)
    assert "activation='leaky_relu', negative_slope=0.3" in repr(layer)
    assert isinstance(layer.activation_module(), torch.nn.LeakyReLU)
    assert layer.activation_module().negative_slope == 0.3
    assert isinstance(bn.BatchNormAct2d(3, "identity").activation_module(), torch.nn.Identity)


# "auto" composes small inputs from aten's batch norm (prefer_composed_act) and fuses
# large ones on the numba kernels; both must keep a NaN batch out of the statistics.
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (8, 64, 32, 32)], ids=["composed", "fused"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_non_finite_batch_is_skipped(shape, with_residual) -> None:
    from batchnorm._backends import prefer_composed_act, select_backend

    x = torch.randn(shape)
    composed = prefer_composed_act(select_backend("auto", x), x)
    assert composed == (x.numel() < 1 << 18)
    x[0, 1, 0, 0] = float("nan")
    residual = torch.randn(shape) if with_residual else None
    layer = bn.BatchNormAct2d(shape[1], "relu")
    layer(x, residual)
    assert torch.equal(layer.running_mean, torch.zeros(shape[1]))
    assert torch.equal(layer.running_var, torch.ones(shape[1]))
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 1
    with pytest.raises(FloatingPointError, match="non-finite"):
        bn.BatchNormAct2d(shape[1], "relu", check_finite=True)(x, residual)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_auto_short_rows_run_the_fused_kernels(activation: str, with_residual: bool) -> None:
    """Short rows (8x8 maps) above the composed path's size: "auto" runs the fused
    numba kernels in both directions, the same bits as backend="numba" (no aten
    backward after the forward, as plain batch norm has there)."""
    from batchnorm._backends import prefer_composed_act, select_backend

    gen = torch.Generator().manual_seed(11)
    shape = (64, 64, 8, 8)  # 2^18 values (not the composed path), rows of 64
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    res = torch.randn(shape, generator=gen)
    dout = torch.randn(shape, generator=gen)
    weight, bias = torch.rand(64, generator=gen) + 0.5, torch.randn(64, generator=gen)
    assert not prefer_composed_act(select_backend("auto", x), x)
    results = {}
    for backend in ("auto", "numba"):
        layer = bn.BatchNormAct2d(64, activation, backend=backend)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        xi = x.clone().requires_grad_()
        ri = res.clone().requires_grad_() if with_residual else None
        out = layer(xi, ri)
        out.backward(dout)
        results[backend] = [out, xi.grad, layer.weight.grad, layer.bias.grad] + (
            [ri.grad] if with_residual else []
        )
    for name, a, b in zip(("out", "dx", "dweight", "dbias", "dresidual"), *results.values()):
        assert torch.equal(a, b), name


def test_numpy_negative_slope_is_accepted() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.BatchNormAct2d(3, "leaky_relu", negative_slope=np.float32(0.25))
    assert layer.negative_slope == 0.25 and type(layer.negative_slope) is float
    assert bn.BatchNormAct2d(3, "leaky_relu", negative_slope=np.int64(0)).negative_slope == 0.0
    with pytest.raises(TypeError, match="BatchNormAct2d: negative_slope must be a number, got bool"):
        bn.BatchNormAct2d(3, "leaky_relu", negative_slope=True)
