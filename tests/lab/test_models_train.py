"""Models from the library's registry, the training loop's determinism and divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.lab.diagnostics import layer_inputs
from batchnorm.lab.models import MLPSpec, build, log_space
from batchnorm.lab.runner import dataset
from batchnorm.lab.train import RunSpec, TrainSpec, train


def test_bn_layers_come_from_the_library_and_bias_is_dropped() -> None:
    model = build(MLPSpec(64, (16, 16), 10, norm="batch"), seed=0)
    for block in model.blocks:
        assert isinstance(block.norm, batchnorm.BatchNorm1d)
        assert block.linear.bias is None
    assert model.head.bias is not None
    info = model.describe()
    assert info["linear_bias"] == [False, False]
    assert info["norm_class"].startswith("batchnorm.")
    assert "Linear(64->16, bias=False) -> BatchNorm1d -> Sigmoid" in info["layers"][0]


def test_bias_kept_without_bn_or_after_activation() -> None:
    base = build(MLPSpec(64, (16,), 10, norm="none"), seed=0)
    assert isinstance(base.blocks[0].norm, nn.Identity) and base.blocks[0].linear.bias is not None
    after = build(MLPSpec(64, (16,), 10, norm="batch", placement="after", activation="relu"), 0)
    assert after.blocks[0].linear.bias is not None
    assert after.describe()["layers"][0].endswith("ReLU -> BatchNorm1d")


def test_gaussian_init_and_seed() -> None:
    spec = MLPSpec(784, (100, 100), 10, init_std=0.05)
    a, b = build(spec, 3), build(spec, 3)
    w = a.blocks[1].linear.weight.detach()
    assert abs(float(w.std()) - 0.05) < 0.005
    assert float(a.blocks[0].linear.bias.detach().abs().max()) == 0
    assert torch.equal(w, b.blocks[1].linear.weight)
    assert not torch.equal(w, build(spec, 4).blocks[1].linear.weight)


def test_log_space() -> None:
    scales = log_space(1e-4, 1.0, 12)
    assert len(scales) == 12 and scales[0] == pytest.approx(1e-4) and scales[-1] == pytest.approx(1)


def _spec(lr: float = 0.1, norm: str = "batch", steps: int = 30) -> RunSpec:
    return RunSpec("t", seed=1, data="synthetic",
                   model=MLPSpec(64, (16, 16), 10, norm=norm, activation="relu",
                                 norm_backend="reference"),
                   train=TrainSpec(steps=steps, lr=lr, batch_size=32, eval_every=10))


def test_same_spec_same_numbers(cache_dir: Path) -> None:
    data = dataset("synthetic")
    a, b = train(_spec(), data), train(_spec(), data)
    assert a.rows == b.rows
    assert [r["step"] for r in a.rows if r["split"] == "test"] == [0, 10, 20, 30]
    assert all(math.isfinite(r["loss"]) for r in a.rows)


def test_divergence_is_an_outcome(cache_dir: Path) -> None:
    result = train(_spec(lr=1e6, norm="none", steps=200), dataset("synthetic"))
    assert result.outcome == "diverged"
    assert result.diverged_step is not None and 1 <= result.diverged_step <= 200
    assert result.extra["end"] == {}


def test_layer_inputs_with_batch_stats_leaves_running_stats(cache_dir: Path) -> None:
    model = build(MLPSpec(64, (16,), 10, norm="batch"), seed=0).eval()
    before = {k: v.clone() for k, v in model.named_buffers()}
    x = dataset("synthetic").x_test[:50]
    seen = layer_inputs(model, x, {"act": model.blocks[0].act}, batch_stats=True)
    z = seen["act"]
    assert z.mean(0).abs().max() < 1e-5  # normalized with the batch's own statistics
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert not model.training
