"""BatchNormAct through the fused Triton kernels (interpreted on the CPU) against the
composed path: outputs, every gradient, running statistics."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cases import assert_close

import batchnorm as bn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_matches_composed(activation: str, with_residual: bool, channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    shape = (3, 5, 4, 6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 2 + 1).contiguous(memory_format=fmt).to(DEVICE)
    res = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).to(DEVICE)
    dout = torch.randn(shape, generator=gen).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        layer = bn.BatchNormAct2d(5, activation, backend=backend, device=DEVICE)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.fill_(0.1)
        xi = x.clone().requires_grad_()
        ri = res.clone().requires_grad_() if with_residual else None
        out = layer(xi, ri)
        out.backward(dout)
        results.append((out, xi.grad, layer.weight.grad, layer.bias.grad,
                        ri.grad if ri is not None else torch.zeros(()), layer.running_mean,
                        layer.running_var, layer.num_batches_tracked))
        assert out.is_contiguous(memory_format=fmt)
    for a, b, what in zip(*results, ["out", "dx", "dw", "db", "dres", "rm", "rv", "tracked"]):
        assert_close(a, b, 1e-4, 1e-4, f"{activation} {what}")


def test_fused_eval_matches_composed() -> None:
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    res = torch.randn(4, 3, 5, 5, device=DEVICE)
    outs = []
    for backend in ("triton", "reference"):
        layer = bn.BatchNormAct2d(3, "relu", backend=backend, device=DEVICE)
        with torch.no_grad():
            layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            layer.running_var.copy_(torch.tensor([1.5, 0.5, 3.0]))
        layer.eval()
        with torch.no_grad():
            outs.append(layer(x, res))
    assert_close(outs[0], outs[1], 1e-5, 1e-5, "eval out")


def test_fused_skips_nonfinite_batch() -> None:
    layer = bn.BatchNormAct1d(3, backend="triton", device=DEVICE)
    x = torch.randn(6, 3, device=DEVICE)
    x[2, 1] = float("nan")
    layer(x)
    assert torch.equal(layer.running_mean.cpu(), torch.zeros(3))
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 0
