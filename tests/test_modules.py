"""Module behaviour: state, state_dict compatibility with torch.nn, modes, repr."""

from __future__ import annotations

import io
from functools import partial

import pytest
import torch
from cases import assert_close, trainable_2d_layers

import batchnorm as bn

LAYERS_2D = trainable_2d_layers()

PAIRS = [(bn.BatchNorm1d, torch.nn.BatchNorm1d, (6, 4)),
         (bn.BatchNorm2d, torch.nn.BatchNorm2d, (6, 4, 3, 3)),
         (bn.BatchNorm3d, torch.nn.BatchNorm3d, (6, 4, 2, 3, 3))]
CONFIGS = [
    {},
    {"affine": False},
    {"track_running_stats": False},
    {"momentum": None},
    {"bias": False},
    {"affine": False, "track_running_stats": False},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), PAIRS, ids=["1d", "2d", "3d"])
def test_same_parameters_buffers_and_keys(ours_cls, torch_cls, shape, config) -> None:
    ours, theirs = ours_cls(4, **config), torch_cls(4, **config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert ours.extra_repr() == theirs.extra_repr()


@pytest.mark.parametrize(("ours_cls", "torch_cls", "shape"), PAIRS, ids=["1d", "2d", "3d"])
def test_state_dict_round_trips_both_ways(ours_cls, torch_cls, shape) -> None:
    trained = torch_cls(4)
    for _ in range(3):
        trained(torch.randn(shape) * 2 + 1)
    with torch.no_grad():
        trained.weight.uniform_(0.5, 1.5)
        trained.bias.normal_()
    # torch -> ours, through a file as a checkpoint would go.
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    ours = ours_cls(4)
    ours.load_state_dict(torch.load(buffer), strict=True)
    trained.eval()
    ours.eval()
    x = torch.randn(shape)
    assert_close(ours(x), trained(x), 1e-6, 1e-6, "eval output after load")
    # ours (trained further) -> torch
    ours.train()
    ours(torch.randn(shape) + 3)
    back = torch_cls(4)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_old_checkpoint_without_num_batches_tracked() -> None:
    """A version-1 state_dict has no counter: the layer keeps its own, as torch's does
    (a momentum=None layer's next step would otherwise overwrite its averages)."""
    state = torch.nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    for layer in (bn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        layer.num_batches_tracked.fill_(5)
        layer.load_state_dict(state)
        assert int(layer.num_batches_tracked) == 5, type(layer)
    meta = bn.BatchNorm2d(3, device="meta")
    meta.load_state_dict(state, assign=True)
    assert int(meta.num_batches_tracked) == 0 and meta.num_batches_tracked.device.type == "cpu"


# Each takes ``weight`` out of the parameter registry in its own way.
def _double(layer: torch.nn.Module) -> torch.nn.Module:
    class Double(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    return layer


REWEIGHTS = {
    "parametrize": _double,
    "parametrizations.weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m, dim=0),
    "weight_norm (hooks)": lambda m: torch.nn.utils.weight_norm(m, dim=0),
    "spectral_norm (hooks)": lambda m: torch.nn.utils.spectral_norm(m, dim=0),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("make", [partial(f, 3) for f in LAYERS_2D.values()], ids=list(LAYERS_2D))
@pytest.mark.parametrize("reweight", list(REWEIGHTS), ids=list(REWEIGHTS))
def test_reparametrized_weight_is_the_one_used(make, reweight) -> None:
    """The layers read ``self.weight`` as torch's do when something has replaced it."""
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    layer = REWEIGHTS[reweight](layer)
    x = torch.randn(4, 3, 5, 5)
    layer.train()
    layer(x).square().sum().backward()  # the gradient reaches the underlying parameters
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    layer.eval()
    with torch.no_grad():
        y = layer(x)  # (the old-style hooks recompute the weight here)
        expected = torch.nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps
        )
    if isinstance(layer, bn.BatchNormAct2d):
        expected = expected.relu()
    assert_close(y, expected, 1e-5, 1e-5, reweight)


def test_skipped_counter_stays_out_of_state_dict() -> None:
    layer = bn.BatchNorm2d(3)
    assert "num_batches_skipped" not in layer.state_dict()
    assert "num_batches_skipped" in dict(layer.named_buffers())
    # A state_dict that carries the counter is accepted and restores it.
    state = layer.state_dict()
    state["num_batches_skipped"] = torch.tensor(7)
    layer.load_state_dict(state)
    assert int(layer.num_batches_skipped) == 7


def test_reset() -> None:
    layer = bn.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(2)
        layer.bias.fill_(1)
    layer(torch.randn(5, 3) + 4)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.weight, torch.full((3,), 2.0))
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


def test_eval_single_example_and_train_eval_switch() -> None:
    layer = bn.BatchNorm2d(3)
    for _ in range(5):
        layer(torch.randn(8, 3, 4, 4) * 2 + 1)
    layer.eval()
    one = torch.randn(1, 3, 4, 4)
    batch = torch.cat([one, torch.randn(7, 3, 4, 4)])
    # In eval each example is normalized alone: batch composition does not matter.
    assert_close(layer(one), layer(batch)[:1], 1e-6, 1e-6, "eval is per-example")
    rm = layer.running_mean.clone()
    layer(batch)
    assert torch.equal(layer.running_mean, rm)


def test_channels_last_in_channels_last_out() -> None:
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = bn.BatchNorm2d(8)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 8, 3, 4, 4).contiguous(memory_format=torch.channels_last_3d)
    assert bn.BatchNorm3d(8)(x3).is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize(("shape", "dims"), [((8, 10, 5), (0, 2, 1)), ((2, 3, 4, 6), (0, 1, 3, 2))])
def test_eval_output_of_a_permuted_input_is_contiguous_in_grad_mode_too(shape, dims) -> None:
    """As torch's: the output's layout does not depend on whether autograd records."""
    x = torch.randn(shape).permute(dims)
    layer = (bn.BatchNorm1d if x.dim() == 3 else bn.BatchNorm2d)(x.shape[1]).eval()
    theirs = (torch.nn.BatchNorm1d if x.dim() == 3 else torch.nn.BatchNorm2d)(x.shape[1]).eval()
    with torch.no_grad():
        quiet = layer(x)
    recorded = layer(x)
    assert recorded.requires_grad
    assert recorded.stride() == quiet.stride() == theirs(x).stride()
    assert_close(recorded.detach(), quiet, 0, 0, "output")


def test_no_tracking_uses_batch_stats_in_eval() -> None:
    ours, theirs = bn.BatchNorm1d(3, track_running_stats=False), torch.nn.BatchNorm1d(3, track_running_stats=False)
    ours.eval()
    theirs.eval()
    x = torch.randn(6, 3) * 3
    assert_close(ours(x), theirs(x), 1e-6, 1e-6, "eval with batch stats")


def test_module_dtype_and_device_moves() -> None:
    layer = bn.BatchNorm2d(3).double()
    assert layer.running_mean.dtype == torch.float64 and layer.num_batches_tracked.dtype == torch.long
    y = layer(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_extra_repr_mentions_backend() -> None:
    assert "backend='reference'" in repr(bn.BatchNorm1d(3, backend="reference"))


def test_registry() -> None:
    assert isinstance(bn.create_norm("batch", 8), bn.BatchNorm2d)
    assert isinstance(bn.create_norm("batch", 8, dim=1), bn.BatchNorm1d)
    assert isinstance(bn.create_norm(bn.BatchNorm3d, 8), bn.BatchNorm3d)
    import functools

    layer = bn.create_norm(functools.partial(bn.BatchNorm1d, momentum=0.3), 8)
    assert layer.momentum == 0.3
    with pytest.raises(ValueError, match="unknown norm 'nope'; registered: .*batch"):
        bn.create_norm("nope", 8)


def test_registry_names_are_case_and_dash_insensitive() -> None:
    from batchnorm.nn.registry import _REGISTRY, norm_names, register_norm

    register_norm("My-Norm", {2: torch.nn.BatchNorm2d})
    try:
        assert "my_norm" in norm_names()
        for name in ("My-Norm", "my_norm", "MY-NORM"):
            assert isinstance(bn.create_norm(name, 4), torch.nn.BatchNorm2d)
        with pytest.raises(ValueError, match="'my_norm' is already registered"):
            register_norm("MY_norm", {1: torch.nn.BatchNorm1d})
    finally:
        _REGISTRY.pop("my_norm", None)


@pytest.mark.parametrize(("layer", "shape"), [
    (bn.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 5)),
    (bn.BatchRenorm3d(3), (4, 3, 2, 2)),
    (bn.BatchNormAct1d(3), (4, 3, 2, 2)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else None)
def test_rank_errors_name_the_layer_used(layer, shape) -> None:
    with pytest.raises(ValueError, match=rf"^{type(layer).__name__}: expected \d+D"):
        layer(torch.randn(*shape))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 5), (2, 4, 3, 3, 3)])
def test_eval_fast_path_equals_functional(shape, dtype, affine) -> None:
    """The layers' eval under "auto" (aten's kernel without the functional's checks)
    gives batch_norm's output, with and without gradients wanted."""
    layer = {2: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}[len(shape)](
        4, affine=affine, dtype=dtype
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.running_mean.normal_(generator=gen)
        layer.running_var.uniform_(0.5, 2.0, generator=gen)
        if affine:
            layer.weight.normal_(generator=gen)
            layer.bias.normal_(generator=gen)
    layer.eval()
    x = torch.randn(shape, generator=gen, dtype=dtype)
    expected = bn.functional.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False,
        backend="reference",
    )
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, expected)
    assert not fast.requires_grad
    with_grad = layer(x.requires_grad_())
    torch.testing.assert_close(with_grad, expected)
    assert with_grad.requires_grad


# Code that finds batch-norm layers by isinstance (swa_utils.update_bn, FSDP's mixed
# precision, torch.func.replace_all_batch_norm_modules_, weight-decay exemptions in
# training recipes) must find ours. SyncBatchNorm is not a torch.nn.SyncBatchNorm:
# DistributedDataParallel refuses those on CPU modules, and ours runs on gloo.
ISINSTANCE_CASES = [
    (lambda: bn.BatchNorm1d(4), torch.nn.BatchNorm1d, True),
    (lambda: bn.BatchNorm2d(4), torch.nn.BatchNorm2d, True),
    (lambda: bn.BatchNorm3d(4), torch.nn.BatchNorm3d, True),
    (lambda: bn.GhostBatchNorm2d(4, virtual_batch_size=2), torch.nn.BatchNorm2d, True),
    (lambda: bn.BatchRenorm1d(4), torch.nn.BatchNorm1d, True),
    (lambda: bn.BatchNormAct2d(4), torch.nn.BatchNorm2d, True),
    (lambda: bn.SyncBatchNorm(4), torch.nn.modules.batchnorm._BatchNorm, True),
    (lambda: bn.SyncBatchNorm(4), torch.nn.SyncBatchNorm, False),
    (lambda: bn.FrozenBatchNorm2d(4), torch.nn.modules.batchnorm._BatchNorm, False),
    (lambda: bn.RecurrentBatchNorm(4, max_timesteps=3), torch.nn.modules.batchnorm._BatchNorm, False),
]


@pytest.mark.parametrize(("make", "torch_cls", "expected"), ISINSTANCE_CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_isinstance_of_torch_batch_norm_classes(make, torch_cls, expected) -> None:
    assert isinstance(make(), torch_cls) is expected


def _two_layer_net(norm: type) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), norm(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3), norm(5)
    )


def test_swa_update_bn_recomputes_our_statistics_as_torch_s() -> None:
    torch.manual_seed(0)
    ours, theirs = _two_layer_net(bn.BatchNorm2d), _two_layer_net(torch.nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        model.eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(7.0)  # stale statistics that update_bn must replace
    loader = [torch.randn(6, 3, 8, 8) * 2 + 1 for _ in range(4)]
    torch.optim.swa_utils.update_bn(loader, ours)
    torch.optim.swa_utils.update_bn(loader, theirs)
    assert not ours.training
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 1e-5, 1e-6, key)
    assert ours[1].momentum == 0.1


def test_func_replace_all_batch_norm_modules_turns_our_statistics_off() -> None:
    model = _two_layer_net(bn.BatchNorm2d)
    torch.func.replace_all_batch_norm_modules_(model)
    layer = model[1]
    assert not layer.track_running_stats and layer.running_mean is None
    x = torch.randn(6, 3, 8, 8)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    assert grads["1.weight"].shape == (4,)


@pytest.mark.parametrize("make", [partial(f, 3) for f in LAYERS_2D.values()], ids=list(LAYERS_2D))
def test_empty_training_batch_leaves_statistics_and_counters(make) -> None:
    # num_batches_tracked counts the batches applied (torch's layers count this one too).
    layer = make()
    layer(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
