"""Properties of batch normalization, checked on generated inputs (hypothesis)."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from cases import assert_close
from hypothesis import given, settings

import batchnorm as bn

F = bn.functional
BACKENDS = st.sampled_from(["reference", "numba", "aten"])


@st.composite
def batches(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.integers(2, 9))
    c = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 10.0))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()) and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@settings(max_examples=60, deadline=None)
@given(x=batches(), a=st.floats(0.01, 100.0), c=st.floats(-100.0, 100.0), backend=BACKENDS)
def test_invariant_to_positive_affine_input(x: torch.Tensor, a: float, c: float, backend: str) -> None:
    """BN(a·x + c) = BN(x) for a > 0 in training (up to eps's effect, 1e-30 here: it
    must be positive in training, and next to variances of 1e-6 and up it is nothing)."""
    # Channels with (near-)constant values are degenerate: skip those draws.
    if x.transpose(0, 1).reshape(x.shape[1], -1).std(dim=1).min() < 1e-3:
        return
    y1 = F.batch_norm(x, None, None, training=True, eps=1e-30, backend=backend)
    y2 = F.batch_norm(a * x + c, None, None, training=True, eps=1e-30, backend=backend)
    assert_close(y2, y1, 1e-8, 1e-7, "BN(a x + c) vs BN(x)")


@settings(max_examples=60, deadline=None)
@given(x=batches(), seed=st.integers(0, 1000), backend=BACKENDS)
def test_output_mean_beta_std_gamma(x: torch.Tensor, seed: int, backend: str) -> None:
    """Per channel, the training output has mean β and standard deviation ≈ γ."""
    gen = torch.Generator().manual_seed(seed)
    C = x.shape[1]
    w = torch.rand(C, generator=gen, dtype=torch.float64) * 3 + 0.1
    b = torch.randn(C, generator=gen, dtype=torch.float64) * 5
    y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5, backend=backend)
    rows = y.transpose(0, 1).reshape(C, -1)
    xrows = x.transpose(0, 1).reshape(C, -1)
    var = xrows.var(dim=1, unbiased=False)
    # With eps, the std shrinks by sqrt(var / (var + eps)): exactly what is expected.
    assert_close(rows.mean(dim=1), b, 1e-9, 1e-9, "mean")
    assert_close(rows.std(dim=1, unbiased=False), w * torch.sqrt(var / (var + 1e-5)), 1e-8, 1e-7, "std")


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 8), seed=st.integers(0, 1000), backend=BACKENDS)
def test_cumulative_average_is_mean_of_batch_means(k: int, seed: int, backend: str) -> None:
    """With momentum=None, after k batches running_mean is the mean of their means and
    running_var the mean of their unbiased variances (starting from a fresh layer)."""
    gen = torch.Generator().manual_seed(seed)
    layer = bn.BatchNorm1d(3, momentum=None, backend=backend, dtype=torch.float64)
    means, variances = [], []
    for _ in range(k):
        x = torch.randn(int(torch.randint(2, 10, (1,), generator=gen)), 3, generator=gen,
                        dtype=torch.float64) * 3 + 1
        layer(x)
        means.append(x.mean(0))
        variances.append(x.var(0, unbiased=True))
    assert_close(layer.running_mean, torch.stack(means).mean(0), 1e-12, 1e-10, "running_mean")
    assert_close(layer.running_var, torch.stack(variances).mean(0), 1e-12, 1e-10, "running_var")
    assert int(layer.num_batches_tracked) == k
