"""The numba backend's fused kernels (act, ghost, renorm) against float64 compositions.

* act: ``act(BN(x) + residual)`` forward, backward (every gradient) and eval against
  the same formula in float64 autograd, for every activation, with and without a
  residual, in each memory layout; the non-finite batch rule; double backward.
* ghost: one kernel per direction against batch norm run chunk by chunk (outputs,
  gradients, statistics) and the running update against the whole batch's.
* renorm: the folded coefficients against the composed path.

How the host passes tensors to these kernels is tested in test_numba_calling.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from cases import assert_close, kernel_inputs

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.kernels import numba_cpu
from batchnorm.nn.renorm import _renorm_composed

BACKEND = numba_cpu.BACKEND
EPS = 1e-5
MOMENTUM = 0.1
SLOPE = 0.2

ACTS = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z: TF.leaky_relu(z, SLOPE),
    "silu": TF.silu,
}

# (N, C, *) shapes and memory formats covering both kernel layouts: channel-major
# (NCHW, (N, C, L)) and channel-minor ((N, C), channels_last).
LAYOUTS = {
    "nchw": ((4, 5, 3, 4), torch.contiguous_format),
    "ncl": ((3, 6, 7), torch.contiguous_format),
    "channels_last": ((4, 5, 3, 4), torch.channels_last),
    "nc": ((12, 5), torch.contiguous_format),
}
# Large enough for the threaded kernels and their vectorized loops (32 channels);
# 2175 channels_last rows: two parts of 1087 and 1088, whose last blocks of rows end
# with three and with no rows beyond a multiple of four.
WIDE_LAYOUTS = {
    "nchw_wide": ((5, 32, 15, 29), torch.contiguous_format),
    "channels_last_wide": ((5, 32, 15, 29), torch.channels_last),
}
ALL_LAYOUTS = {**LAYOUTS, **WIDE_LAYOUTS}
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}


def _reference_act(x, residual, params, activation, training):
    """act(BN(x) + residual) in float64 autograd; returns (out, leaves, running)."""
    dims = [0, *range(2, x.dim())]
    view = [1, -1] + [1] * (x.dim() - 2)
    xd = x.double().requires_grad_()
    rd = None if residual is None else residual.double().requires_grad_()
    w = params["weight"].double().requires_grad_()
    b = params["bias"].double().requires_grad_()
    rm, rv = params["running_mean"].double(), params["running_var"].double()
    if training:
        mean = xd.mean(dims)
        var = ((xd - mean.view(view)) ** 2).mean(dims)
        m = x.numel() // x.shape[1]
        rm = (1 - MOMENTUM) * rm + MOMENTUM * mean.detach()
        rv = (1 - MOMENTUM) * rv + MOMENTUM * var.detach() * m / (m - 1)
    else:
        mean, var = params["running_mean"].double(), params["running_var"].double()
    z = (xd - mean.view(view)) / torch.sqrt(var.view(view) + EPS) * w.view(view) + b.view(view)
    if rd is not None:
        z = z + rd
    return ACTS[activation](z), (xd, rd, w, b), (rm, rv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", list(ALL_LAYOUTS))
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_act_train_matches_float64(activation, with_residual, layout, dtype) -> None:
    """Output, dx, dweight, dbias, dresidual, running statistics and counters."""
    shape, fmt = ALL_LAYOUTS[layout]
    atol, rtol = TOL[dtype]
    x, r, dout, params = kernel_inputs(shape, fmt, dtype)
    residual = r if with_residual else None
    xg = x.clone().requires_grad_()
    rg = None if residual is None else residual.clone().requires_grad_()
    w = params["weight"].clone().requires_grad_()
    b = params["bias"].clone().requires_grad_()
    rm, rv = params["running_mean"].clone(), params["running_var"].clone()
    tracked = torch.tensor(2)
    out = F.batch_norm_act(
        xg, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, residual=rg,
        activation=activation, negative_slope=SLOPE, backend="numba",
        num_batches_tracked=tracked,
    )
    out.backward(dout)
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)

    expected, (xd, rd, wd, bd), (rm_ref, rv_ref) = _reference_act(
        x, residual, params, activation, training=True
    )
    expected.backward(dout.double())
    assert_close(out, expected, atol, rtol, f"{activation}: output")
    assert_close(xg.grad, xd.grad, 10 * atol, 10 * rtol, f"{activation}: dx")
    assert_close(w.grad, wd.grad, 10 * atol * shape[0], 10 * rtol, f"{activation}: dweight")
    assert_close(b.grad, bd.grad, 10 * atol * shape[0], 10 * rtol, f"{activation}: dbias")
    if with_residual:
        assert_close(rg.grad, rd.grad, atol, rtol, f"{activation}: dresidual")
    assert_close(rm, rm_ref, atol, rtol, "running_mean")
    assert_close(rv, rv_ref, atol, rtol, "running_var")
    assert int(tracked) == 3


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("activation", list(ACTS))
def test_act_eval_matches_float64(activation, layout) -> None:
    shape, fmt = LAYOUTS[layout]
    x, r, _, params = kernel_inputs(shape, fmt, torch.float32, seed=1)
    with torch.no_grad():
        out = F.batch_norm_act(
            x, params["running_mean"], params["running_var"], params["weight"],
            params["bias"], training=False, eps=EPS, residual=r, activation=activation,
            negative_slope=SLOPE, backend="numba",
        )
    expected, _, _ = _reference_act(x, r, params, activation, training=False)
    assert out.is_contiguous(memory_format=fmt)
    assert_close(out, expected, 2e-5, 2e-4, f"{activation}: eval output")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_act_backward_rebuilds_z_without_output(activation, layout) -> None:
    """Without the forward's mask, relu and leaky ReLU rebuild z from x, the statistics,
    weight, bias and residual, like silu; or they read the mask off the output's sign:
    the same gradients all three ways. The mask is the bool z > 0 in x's layout."""
    shape, fmt = LAYOUTS[layout]
    x, r, dout, p = kernel_inputs(shape, fmt, torch.float64, seed=2)
    w, b = p["weight"], p["bias"]
    out, mean, invstd, sign = BACKEND.act_forward_train(
        x, w, b, EPS, None, None, None, residual=r, activation=activation,
        negative_slope=SLOPE,
    )
    if activation == "silu":
        assert sign is None
        saved_forms = [None]
    else:
        z = F.batch_norm(x, None, None, w, b, training=True, eps=EPS) + r
        assert sign.dtype == torch.bool and torch.equal(sign, z > 0)
        assert sign.is_contiguous(memory_format=fmt)
        saved_forms = [sign, out, None]
    grads = [
        BACKEND.act_backward_train(
            dout, saved, x, w, b, mean, invstd, residual=r, activation=activation,
            negative_slope=SLOPE, has_residual=True,
        )
        for saved in saved_forms
    ]
    for other in grads[1:]:
        for a, e, what in zip(grads[0], other, ["dx", "dweight", "dbias", "dresidual"]):
            assert_close(a, e, 1e-12, 1e-10, f"{activation}: {what}")


def test_act_identity_is_plain_batch_norm_and_residual_gradient_on_demand() -> None:
    """The identity without residual is the plain kernel (bitwise); the residual's
    gradient is written only when asked for (and is dout itself for the identity)."""
    x, r, dout, p = kernel_inputs((4, 5, 3, 4), torch.contiguous_format, torch.float32, seed=3)
    w, b = p["weight"], p["bias"]
    y, mean, invstd = BACKEND.forward_train(x, w, b, EPS, None, None, None, None, None)
    out, mean2, invstd2, sign = BACKEND.act_forward_train(x, w, b, EPS, None, None, None,
                                                          activation="identity")
    assert torch.equal(y, out) and torch.equal(mean, mean2) and torch.equal(invstd, invstd2)
    assert sign is None
    *_, dres = BACKEND.act_backward_train(dout, out, x, w, b, mean, invstd, residual=r,
                                          activation="identity", has_residual=True)
    assert dres is dout
    out, mean, invstd, sign = BACKEND.act_forward_train(x, w, b, EPS, None, None, None,
                                                        residual=r, activation="relu")
    *_, dres = BACKEND.act_backward_train(dout, sign, x, w, b, mean, invstd,
                                          activation="relu", has_residual=False)
    assert dres is None
    layer = bn.BatchNormAct2d(5, "relu")
    xg = x.clone().requires_grad_()
    layer(xg, r).sum().backward()  # the residual needs no gradient: none is computed
    assert r.grad is None and xg.grad is not None


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_act_forward_without_backward_writes_no_mask(layout, monkeypatch) -> None:
    """``sign=False`` (a training forward with no backward to follow, as under
    torch.no_grad or in recalibrate): no mask comes back, and the output, statistics
    and running update are the same bits as with the mask. The functional asks for it
    when no gradient is needed."""
    shape, fmt = LAYOUTS[layout]
    x, r, _, p = kernel_inputs(shape, fmt, torch.float32, seed=4)
    results = []
    for sign in (True, False):
        rm, rv = p["running_mean"].clone(), p["running_var"].clone()
        out, mean, invstd, mask = BACKEND.act_forward_train(
            x, p["weight"], p["bias"], EPS, rm, rv, MOMENTUM, residual=r, activation="relu",
            sign=sign,
        )
        assert (mask is None) == (not sign)
        results.append((out, mean, invstd, rm, rv))
    for a, e in zip(*results):
        assert torch.equal(a, e)

    asked = []
    original = BACKEND.act_forward_train

    def spy(*args, **kwargs):
        asked.append(kwargs.get("sign", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(BACKEND, "act_forward_train", spy)
    with torch.no_grad():
        F.batch_norm_act(x, None, None, training=True, residual=r, activation="relu",
                         backend="numba")
    F.batch_norm_act(x.clone().requires_grad_(), None, None, training=True, residual=r,
                     activation="relu", backend="numba")
    assert asked == [False, True]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_non_finite_batches_are_skipped(layout) -> None:
    """act, ghost and renorm: a batch with a NaN leaves the running statistics alone
    and is counted as skipped (decided inside the kernel)."""
    shape, fmt = LAYOUTS[layout]
    x, r, _, _ = kernel_inputs(shape, fmt, torch.float32, seed=4)
    x[-1, 1] = float("nan")  # in the last example: only the last ghost chunk is bad
    dim = 1 if len(shape) < 4 else 2
    layers = [
        bn.create_norm("batch_act", shape[1], dim=dim, activation="relu"),
        bn.create_norm("ghost", shape[1], dim=dim, virtual_batch_size=2),
        bn.create_norm("renorm", shape[1], dim=dim, r_max=2.0, d_max=1.0),
    ]
    for layer in layers:
        layer.backend = "numba"
        layer(x, r) if isinstance(layer, bn.BatchNormAct2d | bn.BatchNormAct1d) else layer(x)
        name = type(layer).__name__
        assert torch.equal(layer.running_mean, torch.zeros(shape[1])), name
        assert torch.equal(layer.running_var, torch.ones(shape[1])), name
        assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0, name


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
def test_act_gradcheck(activation) -> None:
    """First and second derivatives (double backward uses differentiable ops)."""
    slope = -0.3 if activation == "leaky_relu" else SLOPE  # a negative slope rebuilds z
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w, b):
        return F.batch_norm_act(x, None, None, w, b, training=True, residual=r,
                                activation=activation, negative_slope=slope, backend="numba")

    assert torch.autograd.gradcheck(fn, (x, r, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, r, w, b))


# ----------------------------------------------------------------------------------------
# ghost
# ----------------------------------------------------------------------------------------
GHOST_CASES = [
    # (name, shape, chunk sizes along N, memory format)
    ("nchw_equal", (8, 5, 3, 4), (2, 2, 2, 2), torch.contiguous_format),
    ("nchw_smaller_last", (7, 5, 3, 4), (3, 3, 1), torch.contiguous_format),
    ("channels_last_smaller_last", (7, 6, 2, 3), (3, 3, 1), torch.channels_last),
    ("nc_odd", (11, 5), (4, 4, 3), torch.contiguous_format),
    ("ncl_one_chunk", (5, 3, 6), (5,), torch.contiguous_format),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "shape", "sizes", "fmt"), GHOST_CASES,
                         ids=[c[0] for c in GHOST_CASES])
def test_ghost_kernels_equal_batch_norm_per_chunk(name, shape, sizes, fmt, dtype) -> None:
    """Each chunk exactly as the plain kernels normalize it alone (outputs, statistics,
    dx; dweight, dbias summed), and one running update with the whole batch's."""
    atol, rtol = TOL[dtype]
    x, _, dy, p = kernel_inputs(shape, fmt, dtype, seed=6)
    w, b = p["weight"], p["bias"]
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    tracked, skipped = torch.tensor(0), torch.tensor(0)
    y, mean, invstd = BACKEND.ghost_forward_train(
        x, w, b, EPS, sizes, rm, rv, MOMENTUM, tracked, skipped
    )
    dx, dw, db = BACKEND.ghost_backward_train(dy, x, w, mean, invstd, sizes)
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    assert mean.shape == (len(sizes) * shape[1],)

    ys, dxs = [], []
    dw_sum, db_sum = torch.zeros_like(dw), torch.zeros_like(db)
    for j, (xc, dyc) in enumerate(zip(x.split(sizes), dy.split(sizes))):
        xc, dyc = xc.contiguous(memory_format=fmt), dyc.contiguous(memory_format=fmt)
        yc, mc, ic = BACKEND.forward_train(xc, w, b, EPS, None, None, None, None, None)
        dxc, dwc, dbc = BACKEND.backward_train(dyc, xc, w, mc, ic)
        chunk = slice(j * shape[1], (j + 1) * shape[1])
        assert_close(mean[chunk], mc, atol, rtol, f"{name}: chunk {j} mean")
        assert_close(invstd[chunk], ic, atol, rtol, f"{name}: chunk {j} invstd")
        ys.append(yc)
        dxs.append(dxc)
        dw_sum += dwc
        db_sum += dbc
    assert_close(y, torch.cat(ys), atol, rtol, f"{name}: output")
    assert_close(dx, torch.cat(dxs), atol, rtol, f"{name}: dx")
    assert_close(dw, dw_sum, atol * 10, rtol, f"{name}: dweight")
    assert_close(db, db_sum, atol * 10, rtol, f"{name}: dbias")

    rm_ref, rv_ref = p["running_mean"].clone(), p["running_var"].clone()
    BACKEND.forward_train(x, w, b, EPS, rm_ref, rv_ref, MOMENTUM, None, None)
    assert_close(rm, rm_ref, atol, rtol, f"{name}: running_mean (whole batch)")
    assert_close(rv, rv_ref, atol, rtol, f"{name}: running_var (whole batch)")
    assert int(tracked) == 1 and int(skipped) == 0


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_ghost_layer_uses_the_kernels_and_matches_separate_layers(fmt) -> None:
    """GhostBatchNorm2d on the numba backend against one BatchNorm2d per chunk, with
    odd N (a smaller last chunk): outputs and every gradient."""
    x, _, dy, _ = kernel_inputs((7, 4, 3, 3), fmt, torch.float64, seed=7)
    ghost = bn.GhostBatchNorm2d(4, virtual_batch_size=3, dtype=torch.float64, backend="numba")
    xg = x.clone().requires_grad_()
    ghost(xg).backward(dy)
    plain = bn.BatchNorm2d(4, dtype=torch.float64, backend="numba")
    ys, dxs = [], []
    for xc, dyc in zip(x.split([3, 3, 1]), dy.split([3, 3, 1])):
        xc = xc.clone().requires_grad_()
        yc = plain(xc)
        yc.backward(dyc)
        ys.append(yc.detach())
        dxs.append(xc.grad)
    assert_close(xg.grad, torch.cat(dxs), 1e-10, 1e-9, "dx")
    assert_close(ghost.weight.grad, plain.weight.grad, 1e-10, 1e-9, "dweight")
    assert_close(ghost.bias.grad, plain.bias.grad, 1e-10, 1e-9, "dbias")


# ----------------------------------------------------------------------------------------
# renorm
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc"])
def test_renorm_kernel_matches_composed_path(layout) -> None:
    """r and d folded into the coefficients: y, statistics, r, d and the running update
    equal the composed path (plain batch norm, then y = x̂·(γr) + (γd + β))."""
    shape, fmt = LAYOUTS[layout]
    x, _, _, p = kernel_inputs(shape, fmt, torch.float64, seed=8)
    w, b = p["weight"], p["bias"]
    # Clipping in both directions: one channel far off in mean, one in variance.
    p["running_var"][0] *= 50
    p["running_mean"][1] += 20
    results = []
    for fused in (True, False):
        rm, rv = p["running_mean"].clone(), p["running_var"].clone()
        tracked = torch.tensor(4)
        args = (x, w, b, EPS, rm, rv, MOMENTUM, tracked, None, 2.0, 1.0)
        if fused:
            outputs = BACKEND.renorm_forward_train(*args)
        else:
            outputs = _renorm_composed(*args, BACKEND)
        results.append((*outputs, rm, rv, tracked))
    assert results[0][0].is_contiguous(memory_format=fmt)
    names = ["y", "mean", "invstd", "r", "d", "running_mean", "running_var", "tracked"]
    for a, e, what in zip(*results, names):
        assert_close(a, e, 1e-12, 1e-10, f"renorm {what}")
    r, d = results[0][3], results[0][4]
    assert float(r.min()) == 0.5 and float(d.abs().max()) == 1.0, "the limits were hit"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nc", *WIDE_LAYOUTS])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_act_backward_non_finite_dout_where_mask_is_off(activation, layout, dtype) -> None:
    """An Inf in dout where z <= 0: dz there is exactly 0 for relu (torch's relu
    backward, not Inf·0 = NaN) and Inf·slope for leaky ReLU, whose Inf then reaches
    that channel's dx through the batch sums: the same non-finite positions and the
    same finite values as the reference backend's composition of torch ops. (The
    wide cases run the threaded, vectorized loops.)"""
    shape, fmt = ALL_LAYOUTS[layout]
    x, r, dout, p = kernel_inputs(shape, fmt, dtype, seed=5)
    w, b = p["weight"], p["bias"]
    z = F.batch_norm(x, None, None, w, b, training=True, eps=EPS) + r
    off = (z <= 0).nonzero()[0].tolist()  # one position with the mask off
    dout = dout.clone()
    dout[tuple(off)] = float("inf")
    grads = {}
    cls = bn.BatchNormAct2d if len(shape) == 4 else bn.BatchNormAct1d
    for backend in ("numba", "reference"):
        layer = cls(shape[1], activation, negative_slope=SLOPE, backend=backend).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        layer(xi, ri).backward(dout)
        grads[backend] = (xi.grad, ri.grad, layer.weight.grad, layer.bias.grad)
    for name, a, e in zip(("dx", "dresidual", "dweight", "dbias"), *grads.values()):
        # Where both are non-finite, Inf or NaN can differ: an Inf·(x − μ) term
        # changes sign with the rounding of x − μ near 0.
        finite = a.isfinite()
        assert torch.equal(finite, e.isfinite()), name
        assert_close(a[finite], e[finite], *TOL[dtype], name)
    dres_off = grads["numba"][1][tuple(off)]
    assert dres_off == 0 if activation == "relu" else dres_off.isinf()
