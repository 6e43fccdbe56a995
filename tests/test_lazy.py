"""LazyBatchNorm1d/2d/3d: num_features from the first input, then the plain layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.filterwarnings("ignore:Lazy modules are a new feature")

LAYERS = [
    # (lazy class, the plain class it becomes, torch's lazy twin, input shape)
    (bn.LazyBatchNorm1d, bn.BatchNorm1d, nn.LazyBatchNorm1d, (16, 5)),
    (bn.LazyBatchNorm1d, bn.BatchNorm1d, nn.LazyBatchNorm1d, (6, 5, 7)),
    (bn.LazyBatchNorm2d, bn.BatchNorm2d, nn.LazyBatchNorm2d, (4, 6, 5, 3)),
    (bn.LazyBatchNorm3d, bn.BatchNorm3d, nn.LazyBatchNorm3d, (2, 3, 4, 3, 2)),
]
IDS = ["1d-nc", "1d-ncl", "2d", "3d"]


def _input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5


@pytest.mark.parametrize(("lazy", "plain", "torch_lazy", "shape"), LAYERS, ids=IDS)
def test_first_input_materializes_and_becomes_the_plain_layer(lazy, plain, torch_lazy, shape) -> None:
    x = _input(shape)
    layer = lazy(momentum=0.3, dtype=torch.float64)
    assert layer.num_features == 0
    assert nn.parameter.is_lazy(layer.weight) and nn.parameter.is_lazy(layer.running_mean)
    xl = x.clone().requires_grad_()
    y = layer(xl)
    assert type(layer) is plain
    assert layer.num_features == shape[1]
    # Exactly what a plain layer built with C gives: output, gradients, statistics.
    twin = plain(shape[1], momentum=0.3, dtype=torch.float64)
    xt = x.clone().requires_grad_()
    yt = twin(xt)
    y.sum().backward()
    yt.sum().backward()
    assert torch.equal(y, yt)
    assert torch.equal(xl.grad, xt.grad)
    assert torch.equal(layer.weight.grad, twin.weight.grad)
    for key, value in twin.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    # The same state_dict as torch's lazy layer after the same input.
    reference = torch_lazy(momentum=0.3, dtype=torch.float64)
    reference(x)
    theirs = reference.state_dict()
    ours = layer.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
        {"momentum": None},
        {"eps": 1e-3, "backend": "reference", "check_finite": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_carry_over(options: dict) -> None:
    x = _input((8, 4, 3, 3)).float()
    layer = bn.LazyBatchNorm2d(**options)
    y = layer(x)
    twin = bn.BatchNorm2d(4, **options)
    assert torch.equal(y, twin(x))
    assert type(layer) is bn.BatchNorm2d and layer.num_features == 4
    assert layer.extra_repr() == twin.extra_repr()
    for key, value in twin.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_parameters_follow_the_constructor_device_and_dtype() -> None:
    layer = bn.LazyBatchNorm1d(dtype=torch.float64)
    layer(torch.randn(4, 3, dtype=torch.float64))
    assert layer.weight.dtype == layer.running_var.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.long
    assert layer.weight.requires_grad and not layer.running_mean.requires_grad


def test_load_state_dict_before_the_first_input_keeps_the_loaded_values() -> None:
    gen = torch.Generator().manual_seed(1)
    source = nn.BatchNorm2d(5)
    with torch.no_grad():
        for t in (source.weight, source.bias, source.running_mean):
            t.copy_(torch.randn(5, generator=gen))
        source.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
        source.num_batches_tracked.fill_(7)
    layer = bn.LazyBatchNorm2d()
    layer.load_state_dict(source.state_dict())
    assert layer.num_features == 5
    layer.eval()
    source.eval()
    x = torch.randn(3, 5, 4, 4, generator=gen)
    torch.testing.assert_close(layer(x), source(x))
    assert type(layer) is bn.BatchNorm2d
    for key, value in source.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_partial_load_resets_only_what_it_did_not_fill() -> None:
    layer = bn.LazyBatchNorm1d()
    weight = torch.tensor([2.0, 3.0, 4.0])
    missing, unexpected = layer.load_state_dict({"weight": weight}, strict=False)
    assert "running_mean" in missing and not unexpected
    layer(torch.randn(6, 3))
    assert torch.equal(layer.weight.detach(), weight)
    assert torch.equal(layer.bias.detach(), torch.zeros(3))
    assert layer.num_batches_tracked.item() == 1


def test_after_a_load_a_wrong_channel_count_is_refused() -> None:
    layer = bn.LazyBatchNorm2d()
    layer.load_state_dict(nn.BatchNorm2d(8).state_dict())
    with pytest.raises(ValueError, match="expected input with 8 channels"):
        layer(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize(
    ("layer", "bad", "error", "message"),
    [
        (bn.LazyBatchNorm2d, torch.randn(3, 4), ValueError, "LazyBatchNorm2d: expected 4D"),
        (bn.LazyBatchNorm1d, torch.randn(3, 4, 2, 2), ValueError, "LazyBatchNorm1d: expected 2D"),
        (bn.LazyBatchNorm3d, torch.randn(2, 3, 4, 4), ValueError, "LazyBatchNorm3d: expected 5D"),
        (bn.LazyBatchNorm2d, "not a tensor", TypeError, "must be a torch.Tensor, got str"),
        (bn.LazyBatchNorm2d, torch.randn(2, 0, 3, 3), ValueError, "must be positive"),
    ],
    ids=["2d-rank", "1d-rank", "3d-rank", "not-a-tensor", "zero-channels"],
)
def test_bad_first_input_is_refused_and_leaves_the_layer_lazy(layer, bad, error, message) -> None:
    module = layer()
    with pytest.raises(error, match=message):
        module(bad)
    assert type(module) is layer and module.num_features == 0
    assert nn.parameter.is_lazy(module.weight)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"momentum": 2.0}, r"momentum must be in \[0, 1\]"),
        ({"backend": "fast"}, "backend must be one of"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bn.LazyBatchNorm2d(**kwargs)


def test_resets_before_the_first_input_touch_only_the_counters() -> None:
    layer = bn.LazyBatchNorm2d()
    layer.num_batches_tracked.fill_(3)
    layer.reset_parameters()
    layer.reset_running_stats()
    assert layer.num_batches_tracked.item() == 0
    assert nn.parameter.is_lazy(layer.running_mean)


def test_optimizer_after_a_dry_run_trains_the_materialized_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 8, 8))  # the dry run torch's lazy modules ask for
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[1].weight.detach().clone()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert not torch.equal(model[1].weight.detach(), before)


def test_fx_tracing_needs_a_first_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match="run one batch through the model before tracing"):
        torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize(
    ("source", "kind", "expected"),
    [
        (nn.LazyBatchNorm2d, "batchnorm", bn.LazyBatchNorm2d),
        (nn.LazyBatchNorm1d, "batch", bn.LazyBatchNorm1d),
        (bn.LazyBatchNorm3d, "torch", nn.LazyBatchNorm3d),
        (bn.LazyBatchNorm2d, "batchnorm", bn.LazyBatchNorm2d),
    ],
)
def test_convert_keeps_an_uninitialized_layer_lazy(source, kind, expected) -> None:
    old = source(eps=1e-3, momentum=0.2, affine=True, bias=False, dtype=torch.float64)
    old.eval()
    model = bn.convert(nn.Sequential(old), kind)
    new = model[0]
    assert type(new) is expected
    assert nn.parameter.is_lazy(new.weight) and new.bias is None
    assert (new.eps, new.momentum, new.training) == (1e-3, 0.2, False)
    assert new.weight.dtype == torch.float64


def test_convert_to_another_kind_still_needs_a_first_input() -> None:
    with pytest.raises(ValueError, match="lazy layer that has not seen an input"):
        bn.convert(nn.Sequential(nn.LazyBatchNorm2d()), "ghost", virtual_batch_size=2)
    with pytest.raises(ValueError, match="lazy layer that has not seen an input"):
        bn.freeze(nn.Sequential(bn.LazyBatchNorm2d()))



def test_convert_of_a_lazy_layer_names_a_keyword_the_new_layer_does_not_take() -> None:
    with pytest.raises(TypeError, match="convert: cannot build a 'torch' layer for 0"):
        bn.convert(nn.Sequential(bn.LazyBatchNorm2d()), "torch", backend="numba")
