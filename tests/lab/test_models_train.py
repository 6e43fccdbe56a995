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
from batchnorm.lab.runner import Runner, dataset
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


def test_norm_options_and_dropout_reach_the_layers() -> None:
    spec = MLPSpec(64, (16, 16), 10, norm="ghost", activation="relu", dropout=0.25,
                   norm_options=(("virtual_batch_size", 8), ("momentum", None)))
    model = build(spec, seed=0)
    for block in model.blocks:
        assert isinstance(block.norm, batchnorm.GhostBatchNorm1d)
        assert block.norm.virtual_batch_size == 8 and block.norm.momentum is None
        assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.25
    assert model.describe()["layers"][0].endswith("ReLU -> Dropout(0.25)")
    assert spec.to_dict()["norm_options"] == {"virtual_batch_size": 8, "momentum": None}
    # torch's own layers take options too, and never a backend argument
    group = build(MLPSpec(64, (16,), 10, norm="group", norm_backend="reference",
                          norm_options=(("num_groups", 4),)), 0)
    assert isinstance(group.blocks[0].norm, nn.GroupNorm) and group.blocks[0].norm.num_groups == 4
    assert isinstance(build(MLPSpec(64, (16,), 10), 0).blocks[0].dropout, nn.Identity)
    with pytest.raises(ValueError, match="dropout must be in"):
        build(MLPSpec(64, (16,), 10, dropout=1.0), 0)


def test_dropout_runs_are_seeded_and_leave_the_global_generator(cache_dir: Path) -> None:
    spec = RunSpec("t", seed=1, data="synthetic",
                   model=MLPSpec(64, (16, 16), 10, activation="relu", dropout=0.5),
                   train=TrainSpec(steps=20, lr=0.1, batch_size=32, eval_every=10))
    data = dataset("synthetic")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = train(spec, data)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream is untouched
    b = train(spec, data)
    assert a.rows == b.rows
    other = train(RunSpec("t", seed=2, data="synthetic", model=spec.model, train=spec.train),
                  data)
    assert other.rows != a.rows


def test_train_examples_uses_a_prefix_of_the_training_set(cache_dir: Path) -> None:
    data = dataset("synthetic")
    spec = _spec(steps=10)
    small = RunSpec(spec.label, spec.seed, spec.data, spec.model,
                    TrainSpec(steps=10, lr=0.1, batch_size=32, eval_every=10, train_examples=64))
    assert train(small, data).outcome == "completed"
    for bad, match in ((1, "train_examples must be in"), (len(data.x_train) + 1,
                                                          "train_examples must be in"),
                       (16, "batch_size must be in")):
        with pytest.raises(ValueError, match=match):
            train(RunSpec(spec.label, spec.seed, spec.data, spec.model,
                          TrainSpec(steps=10, lr=0.1, batch_size=32, train_examples=bad)), data)


def test_renorm_ramp_sets_the_limits_each_step(cache_dir: Path) -> None:
    from batchnorm.lab import train as train_module

    seen: list[tuple[float, float]] = []
    original = train_module.set_renorm_limits

    def spy(model: nn.Module, r_max: float, d_max: float) -> int:
        seen.append((r_max, d_max))
        return original(model, r_max, d_max)

    spec = RunSpec("t", seed=0, data="synthetic",
                   model=MLPSpec(64, (16,), 10, norm="renorm", activation="relu",
                                 norm_backend="reference"),
                   train=TrainSpec(steps=6, lr=0.1, batch_size=32, eval_every=6,
                                   renorm_ramp=(2, 2, 4, 3.0, 5.0)))
    train_module.set_renorm_limits = spy
    try:
        train(spec, dataset("synthetic"))
    finally:
        train_module.set_renorm_limits = original
    # steps 0..5 before each update: plain BN through the warmup, then the ramps
    assert seen == [batchnorm.renorm_schedule(s, 2, 2, 4, 3.0, 5.0) for s in range(6)]
    assert seen[0] == (1.0, 0.0) and seen[-1] == (3.0, 3.75)


def test_rnn_classifier_reads_rows_as_steps() -> None:
    from batchnorm.lab.models import RNNClassifier, RNNSpec

    lstm = build(RNNSpec(64, 8, 12, 10), seed=0)
    assert isinstance(lstm, RNNClassifier) and isinstance(lstm.rnn, nn.LSTM)
    x = torch.randn(5, 64)
    assert lstm(x).shape == (5, 10)
    # the last step's hidden state of the rows 8 at a time is what the head reads
    out, _ = lstm.rnn(x.view(5, 8, 8))
    torch.testing.assert_close(lstm(x), lstm.head(out[:, -1]))
    bn = build(RNNSpec(64, 8, 12, 10, kind="bnlstm", max_timesteps=1, gamma_init=0.5,
                       norm_backend="reference"), seed=0)
    assert isinstance(bn.rnn, batchnorm.BNLSTM) and bn.rnn.max_timesteps == 1
    assert bn(x).shape == (5, 10)
    assert build(RNNSpec(64, 8, 12, 10, kind="bnlstm"), 0).rnn.max_timesteps == 8
    info = bn.describe()
    assert info["norm_class"] == "batchnorm.nn.recurrent.BNLSTM" and info["parameters"] > 0
    with pytest.raises(ValueError, match="multiple of sequence_length"):
        build(RNNSpec(64, 7, 12, 10), 0)
    with pytest.raises(ValueError, match="kind must be"):
        build(RNNSpec(64, 8, 12, 10, kind="gru"), 0)  # type: ignore[arg-type]


def test_rnn_runs_train(cache_dir: Path) -> None:
    from batchnorm.lab.models import RNNSpec

    spec = RunSpec("t", seed=0, data="synthetic",
                   model=RNNSpec(64, 8, 8, 10, kind="bnlstm", norm_backend="reference"),
                   train=TrainSpec(steps=10, lr=0.01, batch_size=16, optimizer="adam",
                                   eval_every=5))
    a, b = train(spec, dataset("synthetic")), train(spec, dataset("synthetic"))
    assert a.outcome == "completed" and a.rows == b.rows
    assert a.model["spec"]["kind"] == "bnlstm"


@pytest.mark.parametrize(("jobs", "threads", "message"), [
    (0, 1, "jobs: expected an int >= 1, got 0"),
    (-3, 1, "jobs: expected an int >= 1, got -3"),
    (1, 0, "threads: expected an int >= 1, got 0"),
])
def test_runner_rejects_fewer_than_one_job_or_thread(jobs: int, threads: int, message: str) -> None:
    with pytest.raises(ValueError) as err:
        Runner(jobs=jobs, threads=threads)
    assert str(err.value) == message
