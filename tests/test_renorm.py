"""BatchRenorm: the paper's formula with stop-gradient r, d against a float64 reference."""

from __future__ import annotations

import io

import pytest
import reference
import torch
import torch.autograd.forward_ad as fwAD
from cases import TOLERANCES, assert_close, triton_device

import batchnorm as bn

RENORM = {1: bn.BatchRenorm1d, 2: bn.BatchRenorm2d, 3: bn.BatchRenorm3d}
PLAIN = {1: bn.BatchNorm1d, 2: bn.BatchNorm2d, 3: bn.BatchNorm3d}


def _dim(shape: tuple[int, ...]) -> int:
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def renorm_reference(x, weight, bias, running_mean, running_var, r_max, d_max, eps, stop_gradient=True):
    """y in float64 from Ioffe (2017), Algorithm 1; differentiable in x, weight, bias."""
    C = x.shape[1]
    shape = [1, C] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    mu = x.mean(dims, keepdim=True)
    sigma_b = torch.sqrt(((x - mu) ** 2).mean(dims, keepdim=True) + eps)
    sigma = torch.sqrt(running_var.double().view(shape) + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max)
    d = ((mu - running_mean.double().view(shape)) / sigma).clamp(-d_max, d_max)
    if stop_gradient:
        r, d = r.detach(), d.detach()
    x_hat = (x - mu) / sigma_b
    w = torch.ones(shape, dtype=torch.float64) if weight is None else weight.view(shape)
    b = torch.zeros(shape, dtype=torch.float64) if bias is None else bias.view(shape)
    return w * (x_hat * r + d) + b


def _setup(shape, dtype, r_max=2.0, d_max=1.0, seed=0, **kwargs):
    """A layer whose channels hit every clipping regime: r clipped low and high, d
    clipped, and nothing clipped."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    layer = RENORM[_dim(shape)](C, r_max=r_max, d_max=d_max, dtype=param_dtype, **kwargs)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5)
    dims = [0, *range(2, x.dim())]
    var = x.var(dims)
    mean = x.mean(dims)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        rv = var.clone()
        rm = mean.clone() + 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
        rv[0] = var[0] * 100  # sigma_B / sigma = 0.1 -> r clipped at 1/r_max
        rv[1 % C] = var[1 % C] / 100  # ratio 10 -> r clipped at r_max
        rm[2 % C] = mean[2 % C] + 10 * var[2 % C].sqrt()  # d = -10 -> clipped
        layer.running_mean.copy_(rm)
        layer.running_var.copy_(rv)
        layer.num_batches_tracked.fill_(2)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return layer, x.to(dtype), dy


CASES = [
    ("2d", (16, 5), False),
    ("3d", (6, 4, 7), False),
    ("4d", (4, 5, 3, 3), False),
    ("4d_channels_last", (4, 6, 3, 5), True),
    ("5d", (3, 4, 2, 3, 2), False),
    # "auto" takes numba's fused kernels here (NCHW: with aten's backward, rows of 256).
    ("4d_large", (16, 8, 16, 16), False),
    ("4d_large_channels_last", (8, 16, 32, 32), True),
    # 2^16 values: the threaded kernels (statistics pass of the aten path included).
    ("4d_threaded", (8, 8, 32, 32), False),
]


# "auto" on the small 3d+ cases: the aten composition (prefer_aten_renorm); on 2d and
# the large cases numba's fused kernels.
@pytest.mark.parametrize("backend", ["reference", "numba", "aten", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "shape", "cl"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference_with_stop_gradient(name, shape, cl, dtype, backend) -> None:
    tol = TOLERANCES[dtype]
    layer, x, dy = _setup(shape, dtype, backend=backend)
    if cl:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    w0 = layer.weight.detach().double().clone().requires_grad_()
    b0 = layer.bias.detach().double().clone().requires_grad_()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()

    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    assert y.dtype == x.dtype and y.shape == x.shape
    if cl:
        assert y.is_contiguous(memory_format=torch.channels_last)

    xd = x.double().requires_grad_()
    y_ref = renorm_reference(xd, w0, b0, rm0, rv0, 2.0, 1.0, layer.eps)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, tol.atol, tol.rtol, f"{name}: output")
    assert_close(xg.grad, xd.grad, tol.grad_atol, tol.grad_rtol, f"{name}: dx")
    scale = max(1.0, (x.numel() / shape[1]) ** 0.5)
    assert_close(layer.weight.grad, w0.grad, tol.grad_atol * scale, tol.grad_rtol, f"{name}: dweight")
    assert_close(layer.bias.grad, b0.grad, tol.grad_atol * scale, tol.grad_rtol, f"{name}: dbias")
    # Running statistics: updated exactly as batch norm does.
    ref = reference.forward(x, None, None, rm0, rv0, True, 0.1, layer.eps)
    assert_close(layer.running_mean, ref.running_mean, tol.atol, tol.rtol, f"{name}: running_mean")
    assert_close(layer.running_var, ref.running_var, tol.atol, tol.rtol, f"{name}: running_var")
    assert int(layer.num_batches_tracked) == 3


def test_stop_gradient_matters() -> None:
    """The reference is sensitive to the stop-gradient: differentiating through r and d
    gives other gradients, and the layer agrees with the stop-gradient version."""
    layer, x, dy = _setup((8, 4), torch.float64, r_max=100.0, d_max=100.0)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    xg = x.clone().requires_grad_()
    layer(xg).backward(dy)
    grads = []
    for stop in (True, False):
        xd = x.clone().requires_grad_()
        renorm_reference(xd, layer.weight.detach(), layer.bias.detach(), rm0, rv0, 100.0, 100.0,
                         layer.eps, stop_gradient=stop).backward(dy)
        grads.append(xd.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-2
    assert_close(xg.grad, grads[0], 1e-10, 1e-9, "dx with stop-gradient")


@pytest.mark.parametrize("backend", ["reference", "numba", "aten"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 5)])
def test_r_max_1_d_max_0_is_batch_norm_exactly(shape, backend) -> None:
    layer, x, dy = _setup(shape, torch.float32, r_max=1.0, d_max=0.0, backend=backend)
    plain = PLAIN[_dim(shape)](shape[1], backend=backend)
    plain.load_state_dict(layer.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = layer(xa), plain(xb)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    assert torch.equal(layer.bias.grad, plain.bias.grad)
    for key, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_unclipped_renorm_is_the_inference_function() -> None:
    """With limits that never bind, training output is (x − μ)/σ·γ + β with the
    running statistics: what eval mode computes."""
    layer, x, _ = _setup((16, 4), torch.float64, r_max=1e9, d_max=1e9)
    expected = layer.eval()(x)
    layer.train()
    layer.momentum = 0.0
    assert_close(layer(x), expected, 1e-10, 1e-9, "training output vs eval output")


def test_eval_is_batch_norm() -> None:
    layer, x, _ = _setup((4, 5, 3, 3), torch.float32)
    plain = bn.BatchNorm2d(5)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer.eval()(x), plain.eval()(x))


def test_affine_false_and_no_bias() -> None:
    for kwargs in ({"affine": False}, {"bias": False}):
        layer, x, _ = _setup((12, 3), torch.float64, **kwargs)
        w = None if layer.weight is None else layer.weight.detach()
        y_ref = renorm_reference(x, w, None, layer.running_mean.clone(), layer.running_var.clone(),
                                 2.0, 1.0, layer.eps)
        assert_close(layer(x), y_ref, 1e-10, 1e-9, f"output with {kwargs}")


def test_without_running_stats_is_batch_norm() -> None:
    layer = bn.BatchRenorm2d(3, track_running_stats=False)
    plain = bn.BatchNorm2d(3, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(layer(x), plain(x))


@pytest.mark.parametrize("backend", ["numba", "aten", "reference"])
def test_gradcheck_and_gradgradcheck(backend) -> None:
    """The renorm path's autograd (stop-gradient r and d) is exact where r and d are
    locally constant, i.e. clipped in every channel, so finite differences agree."""
    layer, x, _ = _setup(
        (6, 4, 2, 2), torch.float64, r_max=1.5, d_max=1.0, momentum=0.0, backend=backend
    )
    dims = [0, 2, 3]
    with torch.no_grad():
        layer.running_var.copy_(x.var(dims, unbiased=False) * 4)  # r = 0.5 -> clipped at 1/1.5
        layer.running_mean.copy_(x.mean(dims) + 3 * x.std(dims) * 2)  # d = -3 -> clipped at -1
    x.requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def fn(inp, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_bfloat16_input_float32_statistics() -> None:
    layer, x, dy = _setup((8, 6, 4, 4), torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert layer.running_var.dtype == torch.float32 and xg.grad.dtype == torch.bfloat16
    tol = TOLERANCES[torch.bfloat16]
    y_ref = renorm_reference(x.double(), layer.weight.detach().double(), layer.bias.detach().double(),
                             rm0, rv0, 2.0, 1.0, layer.eps)
    assert_close(y, y_ref, tol.atol, tol.rtol, "bf16 output")
    ref = reference.forward(x, None, None, rm0, rv0, True, 0.1, layer.eps)
    assert_close(layer.running_var, ref.running_var, 1e-5, 1e-5, "float32 running_var")


def test_non_finite_batch_is_skipped() -> None:
    layer = bn.BatchRenorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("inf")
    layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 1
    with pytest.raises(FloatingPointError, match="BatchRenorm2d"):
        bn.BatchRenorm2d(3, check_finite=True)(x)


@pytest.mark.parametrize(("r_max", "d_max", "match"), [
    (0.5, 1.0, "r_max must be a number >= 1"),
    (float("nan"), 1.0, "r_max"),
    (2.0, -0.1, "d_max must be a number >= 0"),
    (2.0, float("nan"), "d_max"),
])
def test_bad_limits(r_max, d_max, match) -> None:
    with pytest.raises(ValueError, match=match):
        bn.BatchRenorm2d(4, r_max=r_max, d_max=d_max)
    layer = bn.BatchRenorm2d(4)
    with pytest.raises(ValueError, match=match):
        layer.set_limits(r_max, d_max)
    with pytest.raises(ValueError, match=match):
        bn.set_renorm_limits(torch.nn.Sequential(layer), r_max, d_max)
    assert (layer.r_max, layer.d_max) == (3.0, 5.0)


def test_numpy_numbers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.BatchRenorm2d(4, r_max=np.float32(2.0), d_max=np.int64(1))
    assert (layer.r_max, layer.d_max) == (2.0, 1.0) and type(layer.r_max) is float
    assert bn.renorm_schedule(np.int64(40000)) == (3.0, 5.0)


def test_schedule_follows_the_paper() -> None:
    assert bn.renorm_schedule(0) == (1.0, 0.0)
    assert bn.renorm_schedule(5000) == (1.0, 0.0)
    r, d = bn.renorm_schedule(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert bn.renorm_schedule(25000)[1] == 5.0  # d_max reached at 25k steps
    assert bn.renorm_schedule(40000) == (3.0, 5.0)  # r_max reached at 40k steps
    assert bn.renorm_schedule(10**6) == (3.0, 5.0)
    assert bn.renorm_schedule(15, warmup_steps=10, r_ramp_steps=10, d_ramp_steps=0, r_max=2, d_max=1) == (1.5, 1.0)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        bn.renorm_schedule(-1)
    with pytest.raises(ValueError, match="r_max"):
        bn.renorm_schedule(10, r_max=0.9)


def test_set_renorm_limits_reaches_every_layer() -> None:
    model = torch.nn.Sequential(bn.BatchRenorm2d(3), torch.nn.ReLU(),
                                torch.nn.Sequential(bn.BatchRenorm1d(3)), bn.BatchNorm2d(3))
    assert bn.set_renorm_limits(model, *bn.renorm_schedule(20000)) == 2
    assert model[0].r_max == model[2][0].r_max == pytest.approx(1 + 2 * 15000 / 35000)
    assert model[0].d_max == pytest.approx(5 * 15000 / 20000)


def test_state_dict_is_torch_batch_norm() -> None:
    layer = bn.BatchRenorm2d(4)
    theirs = torch.nn.BatchNorm2d(4)
    assert list(layer.state_dict()) == list(theirs.state_dict())
    theirs(torch.randn(6, 4, 3, 3) + 2)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    layer.load_state_dict(torch.load(buffer), strict=True)
    layer(torch.randn(6, 4, 3, 3))
    torch.nn.BatchNorm2d(4).load_state_dict(layer.state_dict(), strict=True)
    assert "r_max=3.0, d_max=5.0" in repr(layer)
    assert isinstance(bn.create_norm("renorm", 4, dim=1, r_max=2.0), bn.BatchRenorm1d)


def test_auto_policy_for_renorm() -> None:
    """Under "auto": aten's composition for 3d+ inputs below RENORM_ATEN_MAX values, the
    numba kernels (with aten's backward on short rows) above, and on (N, C)."""
    from batchnorm import _backends

    numba = _backends.select_backend("numba", torch.empty(1, 1))
    small = torch.empty(8, 16, 8, 8)
    assert _backends.prefer_aten_renorm(numba, small).name == "aten"
    assert _backends.prefer_aten_renorm(numba, small.to(memory_format=torch.channels_last)).name == "aten"
    assert _backends.prefer_aten_renorm(numba, torch.empty(16, 8, 16, 16)).name == "numba+aten"
    mid = torch.empty(8, 16, 16, 16)  # 2^15: channels_last keeps the composition longer
    assert _backends.prefer_aten_renorm(numba, mid).name == "numba+aten"
    assert _backends.prefer_aten_renorm(numba, mid.to(memory_format=torch.channels_last)).name == "aten"
    big = torch.empty(16, 64, 16, 16).to(memory_format=torch.channels_last)
    assert _backends.prefer_aten_renorm(numba, big).name == "numba"
    assert _backends.prefer_aten_renorm(numba, torch.empty(60, 100)).name == "numba"
    reference = _backends.select_backend("reference", small)
    assert _backends.prefer_aten_renorm(reference, small) is reference


@pytest.mark.parametrize("shape", [(8, 6, 4, 4), (16, 6)])
def test_aten_path_with_float64_parameters(shape) -> None:
    """float32 input, float64 weight/bias/statistics on the aten composition: gradients
    come back in the parameters' dtype and match the float64 reference."""
    layer, x, dy = _setup(shape, torch.float64, backend="aten")
    x, dy = x.float(), dy.float()
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    xg = x.clone().requires_grad_()
    y = layer(xg)
    y.backward(dy)
    assert y.dtype == torch.float32 and layer.weight.grad.dtype == torch.float64
    w0 = layer.weight.detach().clone().requires_grad_()
    b0 = layer.bias.detach().clone().requires_grad_()
    y_ref = renorm_reference(x.double(), w0, b0, rm0, rv0, 2.0, 1.0, layer.eps)
    y_ref.backward(dy.double())
    tol = TOLERANCES[torch.float32]
    assert_close(y, y_ref, tol.atol, tol.rtol, "output")
    assert_close(layer.weight.grad, w0.grad, tol.grad_atol * 4, tol.grad_rtol, "dweight")
    assert_close(layer.bias.grad, b0.grad, tol.grad_atol * 4, tol.grad_rtol, "dbias")


@pytest.mark.parametrize("backend", ["aten", "auto", "numba"])
def test_non_finite_batch_is_skipped_on_every_path(backend) -> None:
    layer = bn.BatchRenorm2d(3, backend=backend)
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 1]).all()
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0 and int(layer.num_batches_skipped) == 1
    layer(torch.randn(4, 3, 2, 2))
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_batches_skipped) == 1


# ----------------------------------------------------------------------------------------
# half precision: the output is computed in float32 and rounded once
# ----------------------------------------------------------------------------------------
# Significand bits and smallest normal exponent (of 2) per half dtype.
_HALF_FORMAT = {torch.bfloat16: (8, -126), torch.float16: (11, -14)}


def _ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at each |value| (its binade's, subnormals' below)."""
    bits, min_exponent = _HALF_FORMAT[dtype]
    _, exponent = torch.frexp(value.abs())  # |v| = m·2^e, m in [0.5, 1): binade 2^(e−1)
    binade = torch.clamp(exponent - 1, min=min_exponent)
    return torch.pow(2.0, (binade - (bits - 1)).double())


# (running_mean, running_var, bias, r_max, d_max) for 2 channels of x ~ N(0, 1):
#  r_clipped: σ_B/σ ≈ 10 clipped to r = 3, d = 0 and β = −6: y = 3x̂ − 6, which cancels
#             near x̂ = 2, where a first rounding of x̂ is amplified;
#  d_clipped: σ_B/σ ≈ 2 and |μ_B − μ|/σ = 6 clipped to d = ±5, β = ∓6 (the same).
_HALF_CASES = {
    "r_clipped": ([0.0, 0.0], [0.01, 0.01], [-6.0, -6.0], 3.0, 0.0),
    "d_clipped": ([3.0, -3.0], [0.25, 0.25], [6.0, -6.0], 3.0, 5.0),
}


def _half_backend_device(backend: str) -> str:
    return triton_device() if backend == "triton" else "cpu"


# "auto" on CPU half precision is the reference; "traceable" is "auto" inside forward-mode
# AD (the torch.compile / torch.func path); Triton without a GPU runs interpreted.
@pytest.mark.parametrize("case", list(_HALF_CASES))
@pytest.mark.parametrize("backend", ["reference", "auto", "traceable", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_output_is_rounded_once(dtype, backend, case) -> None:
    """Every output within one ulp of the float64 formula on the same (rounded) input,
    near zero too, where y = γ(x̂·r + d) + β cancels: x̂ rounded to half precision and
    then mapped again was off by several ulps there (28% at |y| < 0.25 in bfloat16).
    (Correct rounding is within half an ulp; one ulp leaves room for the interpreted
    Triton kernels, whose bfloat16 stores truncate.)"""
    device = _half_backend_device(backend)
    rm, rv, beta, r_max, d_max = _HALF_CASES[case]
    layer = bn.BatchRenorm2d(
        2, r_max=r_max, d_max=d_max, backend="auto" if backend == "traceable" else backend
    ).to(device)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor(rm))
        layer.running_var.copy_(torch.tensor(rv))
        layer.bias.copy_(torch.tensor(beta))
    rm0, rv0 = layer.running_mean.cpu().clone(), layer.running_var.cpu().clone()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 4, 4, generator=gen).to(dtype)
    if backend == "traceable":
        with fwAD.dual_level():
            y = fwAD.unpack_dual(layer(fwAD.make_dual(x, torch.ones_like(x)))).primal
    else:
        y = layer(x.to(device)).cpu()
    assert y.dtype == dtype
    expected = renorm_reference(x.double(), None, torch.tensor(beta, dtype=torch.float64),
                                rm0, rv0, r_max, d_max, layer.eps)
    err = (y.double() - expected).abs()
    # float32 arithmetic's own error, far below a half-precision ulp
    allowed = _ulp(expected, dtype) + 1e-6 * float(expected.abs().max())
    worst = int((err / allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"{case}: |y - formula| = {float(err.flatten()[worst]):.3g} at y = "
        f"{float(expected.flatten()[worst]):.4g}, more than one ulp ({float(allowed.flatten()[worst]):.3g})"
    )


# ----------------------------------------------------------------------------------------
# far from zero: d from the batch mean to every digit
# ----------------------------------------------------------------------------------------
def _far_layer(backend: str) -> bn.BatchRenorm2d:
    """Running statistics at 1e4 with σ = 0.01: r ≈ 0.95 and |d| < 1, neither clipped
    (so a gradient or tangent through r or d would show)."""
    layer = bn.BatchRenorm2d(3, r_max=3.0, d_max=5.0, backend=backend)
    with torch.no_grad():
        layer.running_mean.fill_(1e4)
        layer.running_var.fill_(1e-4)
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def _far_input() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + 0.01 * torch.randn(32, 3, 4, 4, generator=gen)
    return x, torch.randn(x.shape, generator=gen)


# "traceable": "auto" inside forward-mode AD, the plain-ops path that torch.compile,
# torch.export and torch.func run.
@pytest.mark.parametrize("backend", ["reference", "numba", "auto", "traceable"])
def test_far_from_zero_output_keeps_its_digits(backend) -> None:
    """x = 1e4 ± 0.01 in float32: d = (μ_B − μ)/σ from the batch mean rounded to
    float32 is off by up to ulp(1e4)/2/σ ≈ 0.05; taken as (c − μ) + offset it keeps
    float32's digits, and y is within 1e-6 of the float64 formula (spread ~1)."""
    layer = _far_layer("auto" if backend == "traceable" else backend)
    rm0, rv0 = layer.running_mean.clone(), layer.running_var.clone()
    x, tangent = _far_input()
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    if backend == "traceable":
        with fwAD.dual_level():
            out = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent)))
        y = out.primal
        # The tangent with r and d constant: the float64 formula's jvp.
        _, expected_tangent = torch.func.jvp(
            lambda t: renorm_reference(t, weight, bias, rm0, rv0, 3.0, 5.0, layer.eps),
            (x.double(),), (tangent.double(),),
        )
        scale = float(expected_tangent.abs().max())
        assert_close(out.tangent, expected_tangent, 1e-6 * scale, 0.0, "tangent (jvp)")
    else:
        y = layer(x)
    expected = renorm_reference(x.double(), weight, bias, rm0, rv0, 3.0, 5.0, layer.eps)
    assert_close(y, expected, 1e-6, 0.0, f"{backend}: output far from zero")
    ref = reference.forward(x, None, None, rm0, rv0, True, 0.1, layer.eps)
    assert_close(layer.running_mean, ref.running_mean, 1e-3, 1e-7, "running_mean")


def test_compiled_training_step_matches_eager_in_every_gradient() -> None:
    """torch.compile (its partitioner included) gives the eager layer's output, running
    statistics and dx, dγ, dβ. r is needed by the backward and depends on the running
    variance, which the step updates in place: recomputed there instead of saved, it
    came out of the updated value (dγ off by ~6 at this size)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, 6, generator=gen) + 0.5
    dy = torch.randn(x.shape, generator=gen)
    results = []
    for compiled in (False, True):
        layer = bn.BatchRenorm2d(8, r_max=3.0, d_max=5.0)
        with torch.no_grad():
            layer.running_var.fill_(4.0)  # r = σ_B/σ ≈ 0.5, unclipped
            layer.running_mean.fill_(0.3)
        run = torch.compile(layer, backend="aot_eager") if compiled else layer
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(dy)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
                        layer.running_var))
    for what, got, expected in zip(
        ("output", "dx", "dweight", "dbias", "running_mean", "running_var"), *reversed(results)
    ):
        assert_close(got, expected, 1e-4, 1e-4, f"compiled {what}")
