"""Model tools: convert, fold, recalibrate, freeze/unfreeze, drop_redundant_bias."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from cases import assert_close
from torch import nn

import batchnorm as bn


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial γ, β and running statistics in every batch-norm layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, bn.BatchNorm1d, bn.BatchNorm2d,
                              bn.BatchNorm3d, bn.FrozenBatchNorm2d)):
                C = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(C, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(C, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(C, generator=gen))
                    m.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    return model


def _close_relative(actual, expected, what, rtol=1e-5):
    scale = float(expected.detach().abs().max())
    assert_close(actual, expected, rtol * scale, rtol, what)


# ----------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------
def _torch_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=None, affine=False)),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.BatchNorm1d(6, eps=1e-3),
    )
    model.add_module("vol", nn.BatchNorm3d(2, track_running_stats=False))
    _randomize(model)
    model[1].num_batches_tracked.fill_(7)
    model[3].eval()  # mixed modes must survive
    model[6].weight.requires_grad_(False)
    return model


def test_convert_round_trip_torch_ours_torch() -> None:
    model = _torch_model()
    original = copy.deepcopy(model)
    ours = bn.convert(model, "batchnorm")
    assert ours is model
    assert type(ours[1]) is bn.BatchNorm2d and type(ours[3][1]) is bn.BatchNorm2d
    assert type(ours[6]) is bn.BatchNorm1d and type(ours.vol) is bn.BatchNorm3d
    assert ours[3][1].momentum is None and not ours[3][1].affine and ours[6].eps == 1e-3
    assert [m.training for m in ours.modules()] == [m.training for m in original.modules()]
    assert not ours[6].weight.requires_grad
    back = bn.convert(copy.deepcopy(ours), "torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back.vol) is nn.BatchNorm3d
    assert list(back.state_dict()) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert [m.training for m in back.modules()] == [m.training for m in original.modules()]
    x = torch.randn(2, 3, 6, 6)
    original.eval(), ours.eval(), back.eval()
    original.vol = ours.vol = back.vol = nn.Identity()
    assert_close(ours(x), original(x), 1e-6, 1e-5, "ours vs torch")
    assert torch.equal(back(x), original(x))


def test_convert_root_kwargs_dtype_and_sharing() -> None:
    root = nn.BatchNorm2d(3, dtype=torch.float64)
    ghost = bn.convert(root, "ghost", virtual_batch_size=2)
    assert type(ghost) is bn.GhostBatchNorm2d and ghost.virtual_batch_size == 2
    assert ghost.weight.dtype == torch.float64
    renorm = bn.convert(bn.BatchRenorm1d(3, r_max=2.0, d_max=0.5), "renorm")
    assert (renorm.r_max, renorm.d_max) == (2.0, 0.5)  # carried within the family
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    bn.convert(model, "renorm", r_max=1.5)
    assert model[1] is model[3] and isinstance(model[1], bn.BatchRenorm1d) and model[1].r_max == 1.5


def test_convert_to_batch_act_keeps_the_function() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    bn.convert(model, "batch_act")
    assert isinstance(model[1], bn.BatchNormAct2d) and model[1].activation == "identity"
    assert_close(model(x), expected, 1e-6, 1e-5, "output")
    relu = nn.Sequential(bn.BatchNormAct2d(4, "relu"))
    with pytest.raises(ValueError, match=r"0 is BatchNormAct2d with activation='relu'.*'torch'"):
        bn.convert(relu, "torch")


def test_convert_sync_and_rank_agnostic_layers() -> None:
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.BatchNorm1d(4))
    bn.convert(model, "sync")
    assert all(isinstance(m, bn.SyncBatchNorm) for m in model)
    bn.convert(model, "batchnorm", default_dim=1)
    assert type(model[0]) is bn.BatchNorm1d and type(model[1]) is bn.BatchNorm1d
    assert type(bn.convert(nn.SyncBatchNorm(4), "torch")) is nn.BatchNorm2d


def test_convert_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown kind 'gohst'; valid kinds: batchnorm, torch, ghost"):
        bn.convert(nn.BatchNorm2d(3), "gohst")
    with pytest.raises(ValueError, match="^convert: .* keeps no running statistics"):
        bn.convert(nn.BatchNorm2d(3, track_running_stats=False), "frozen")
    with pytest.raises(ValueError, match="^freeze: .* keeps no running statistics"):
        bn.freeze(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="default_dim"):
        bn.convert(nn.BatchNorm2d(3), "torch", default_dim=4)
    # (convert to plain batch norm keeps a lazy layer lazy: test_lazy.py)
    with pytest.raises(ValueError, match="lazy layer"):
        bn.convert(nn.Sequential(nn.LazyBatchNorm2d()), "renorm")


@pytest.mark.parametrize("kind", ["batchnorm", "torch", "ghost", "renorm", "sync", "batch_act",
                                  "frozen", "convert_sync_batchnorm"])
def test_convert_keeps_statistics_kept_without_tracking(kind) -> None:
    # Switching track_running_stats off after training stops the updates but keeps the
    # buffers, and eval normalizes with them (torch's rule): the new layer must too.
    model = nn.Sequential(nn.BatchNorm2d(3))
    model(torch.randn(8, 3, 2, 2) * 3 + 5)
    model[0].track_running_stats = False
    model.eval()
    x = torch.randn(4, 3, 2, 2)
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    if kind == "convert_sync_batchnorm":
        new = bn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        new = bn.convert(model, kind)
    assert_close(new(x), expected, 1e-6, 1e-6, f"eval output after convert to {kind}")
    if kind != "frozen":  # frozen layers keep no counter
        assert new.state_dict().keys() == state.keys()
        new.load_state_dict(state)


# ----------------------------------------------------------------------------------------
# freeze / unfreeze
# ----------------------------------------------------------------------------------------
def test_freeze_and_unfreeze() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(36, 5), bn.BatchNorm1d(5))).eval()
    x = torch.randn(3, 3, 5, 5)
    expected = model(x)
    bn.freeze(model)
    assert type(model[1]) is bn.FrozenBatchNorm2d and type(model[5]) is bn.FrozenBatchNorm1d
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    model.train()
    assert_close(model(x), expected, 1e-6, 1e-5, "frozen model in training mode")
    bn.unfreeze(model)
    # Each layer is the one it was frozen from: torch's stays torch's.
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is bn.BatchNorm1d
    assert model[1].momentum == 0.1 and model[1].training
    model.eval()
    assert_close(model(x), expected, 1e-6, 1e-5, "unfrozen model in eval mode")


def test_unfreeze_gives_back_the_layers_freeze_replaced() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4, momentum=0.01, affine=False),
        bn.GhostBatchNorm2d(4, virtual_batch_size=8, momentum=None),
        bn.BatchRenorm2d(4, r_max=2.0, d_max=1.0, backend="reference"),
        bn.BatchNorm2d(4, bias=False, eps=1e-3),
        bn.BatchNormAct2d(4, "identity"),
    )
    model[1].weight.requires_grad_(False)
    x = torch.randn(16, 4, 5, 5)
    model(x)
    model(x)
    model[3].eval()
    original = copy.deepcopy(model)
    # The record of each source layer survives a copy and pickling.
    frozen = pickle.loads(pickle.dumps(copy.deepcopy(bn.freeze(model))))
    restored = bn.unfreeze(frozen)
    for before, after in zip(original, restored):
        what = type(before).__name__
        assert type(after) is type(before), what
        assert after.extra_repr() == before.extra_repr(), what
        assert after.training == before.training, what
        assert [p.requires_grad for p in after.parameters()] == [
            p.requires_grad for p in before.parameters()], what
        state = after.state_dict()
        assert state.keys() == before.state_dict().keys(), what
        for key, value in before.state_dict().items():
            assert torch.equal(state[key], value), f"{what}.{key}"
    assert int(restored[1].num_batches_tracked) == 2  # momentum=None averages by it
    assert getattr(restored[2], "backend", None) == "reference"
    # A rank-agnostic layer keeps the rank it was converted from through the round trip.
    sync = bn.unfreeze(bn.freeze(bn.convert(nn.Sequential(nn.BatchNorm3d(4)), "sync")))
    assert type(sync[0]) is bn.SyncBatchNorm
    assert type(bn.convert(sync, "torch")[0]) is nn.BatchNorm3d
    # A frozen layer built as such becomes this package's layer with the defaults.
    plain = bn.unfreeze(nn.Sequential(bn.FrozenBatchNorm2d(4)))
    assert type(plain[0]) is bn.BatchNorm2d and plain[0].momentum == 0.1


# ----------------------------------------------------------------------------------------
# fold
# ----------------------------------------------------------------------------------------
class _Block(nn.Module):
    """A ResNet basic block with a projection shortcut: fx-traceable, not a Sequential."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = bn.BatchNormAct2d(cout, "relu")
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, bias=False)
        self.short_bn = nn.BatchNorm2d(cout)
        self.out = bn.BatchNormAct2d(cout, "relu")

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.out(y, self.short_bn(self.short(x)))  # called with a residual: not folded


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = _Block(8, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
                                  nn.BatchNorm1d(10))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_fold_fx_model_with_residual() -> None:
    model = _randomize(_Net()).eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    folded, count = bn.fold(model)
    assert folded is model and count == 5  # stem, bn1 (-> ReLU), bn2, short_bn, head
    assert isinstance(model.stem[1], nn.Identity) and isinstance(model.block.bn1, nn.ReLU)
    assert isinstance(model.block.out, bn.BatchNormAct2d)  # it takes a residual
    assert model.block.conv1.bias is not None  # created
    _close_relative(model(x), expected, "folded output")
    assert bn.fold(model).count == 0  # nothing left


@pytest.mark.parametrize(("conv", "norm", "shape"), [
    (nn.Conv1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv3d(2, 3, 2), bn.BatchNorm3d(3), (2, 2, 4, 4, 4)),
    (nn.ConvTranspose1d(4, 6, 3, groups=2), nn.BatchNorm1d(6), (2, 4, 5)),
    (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), bn.BatchNorm2d(4), (2, 6, 4, 4)),
    (nn.ConvTranspose2d(3, 5, 2, bias=False), nn.BatchNorm2d(5), (2, 3, 4, 4)),
    (nn.ConvTranspose3d(4, 6, 2, groups=2), nn.BatchNorm3d(6), (1, 4, 3, 3, 3)),
    (nn.Linear(7, 5), nn.BatchNorm1d(5), (6, 7)),
    (nn.Linear(7, 5, bias=False), bn.BatchNorm1d(5, affine=False), (6, 7)),
], ids=["conv1d_groups", "conv2d_no_bias", "conv3d", "convT1d_groups", "convT2d_groups",
        "convT2d_no_bias", "convT3d_groups", "linear", "linear_no_bias_not_affine"])
def test_fold_each_producer(conv, norm, shape) -> None:
    model = _randomize(nn.Sequential(conv, norm)).eval()
    x = torch.randn(shape)
    expected = model(x)
    _, count = bn.fold(model)
    assert count == 1 and isinstance(model[1], nn.Identity)
    _close_relative(model(x), expected, f"folded {type(conv).__name__}")


def test_fold_untraceable_model_falls_back_to_sequentials() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                return self.body(x)
            return self.body(-x)

    model = _randomize(Branchy()).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    assert bn.fold(model).count == 1
    _close_relative(model(x), expected, "folded output")


class _Taps(nn.Module):
    """Untraceable, and reads the Sequential's intermediate outputs (a feature tap)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: fx cannot trace this
            x = x * 0
        taps = []
        for layer in self.features:
            x = layer(x)
            taps.append(x)
        return taps[0].sum() + taps[-1].sum()


class _Indexed(nn.Module):
    """Untraceable, and calls the Sequential's children one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        y = self.body[0](x)
        return self.body[1](y) + y


class _OpaqueChild(nn.Module):
    """Traceable itself, with a child fx cannot trace and a pair of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.tail = _Untraceable(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))

    def forward(self, x):
        return self.tail(self.norm(self.conv(x)))


@pytest.mark.parametrize(("make", "folded", "warns"), [
    (_Taps, 0, True),
    (_Indexed, 0, True),
    # The child that stops the trace is kept opaque: the pair beside it folds, and so
    # does the one inside it (its untraceable forward only calls its child whole).
    (_OpaqueChild, 2, False),
], ids=["taps", "indexed", "opaque-child"])
def test_fold_untraceable_parts_only_where_the_use_is_known(make, folded, warns) -> None:
    model = _randomize(make()).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = bn.fold(copy.deepcopy(model)).count
        fold_model = bn.fold(model).model
    assert count == folded
    left_alone = [w for w in caught if "left the batch norms in" in str(w.message)]
    assert bool(left_alone) == warns, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in left_alone)  # points at the caller
    _close_relative(fold_model(x), expected, "output after fold")
    model = _randomize(make())
    expected = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bn.drop_redundant_bias(model).count == folded
    _close_relative(model(x), expected, "output after drop_redundant_bias")


@pytest.mark.parametrize("tool", ["fold", "drop_redundant_bias"])
def test_rewritten_linear_refuses_inputs_that_are_not_rows(tool) -> None:
    # On (N, L, F) a Linear acts on dim 2, a BatchNorm1d on dim 1: with L == F the pair
    # runs, but neither the fold nor the dropped bias holds.
    model = _randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    rows = torch.randn(6, 4)
    expected = model(rows)
    assert getattr(bn, tool)(model).count == 1
    _close_relative(model(rows), expected, f"(N, F) output after {tool}")
    with pytest.raises(ValueError, match=r"Linear: fold or drop_redundant_bias .* \[3, 4, 4\]"):
        model(torch.randn(3, 4, 4))
    assert torch.equal(model[0](input=rows), model[0](rows))  # a keyword call runs unchecked
    # The check is no obstacle to a later rewrite, a copy, pickling or scripting.
    if tool == "drop_redundant_bias":
        assert bn.fold(model).count == 1
        assert len(model[0]._forward_pre_hooks) == 1
    copied = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    _close_relative(copied(rows), expected, "output of a pickled copy")
    scripted = torch.jit.script(model)
    _close_relative(scripted(rows), expected, "output of the scripted model")
    with pytest.raises(Exception, match=r"holds for \(N, features\) inputs only"):
        scripted(torch.randn(3, 4, 4))


def test_convert_refuses_a_batch_act_called_with_a_residual() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 3, 1), bn.BatchNormAct2d(3, "identity")

        def forward(self, x):
            return self.norm(self.conv(x), x)

    model = Residual()
    for tool in (lambda m: bn.convert(m, "torch"), lambda m: bn.convert(m, "ghost"), bn.freeze):
        with pytest.raises(ValueError, match=r"norm \(BatchNormAct2d\) is called with a residual"):
            tool(model)
        assert type(model.norm) is bn.BatchNormAct2d
    assert type(bn.convert(model, "batch_act").norm) is bn.BatchNormAct2d
    # Without a residual an identity BatchNormAct is plain batch norm.
    plain = bn.convert(nn.Sequential(bn.BatchNormAct2d(3, "identity")), "torch")
    assert type(plain[0]) is nn.BatchNorm2d


def test_fold_leaves_unsafe_pairs_alone() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is read twice

    model = _randomize(TwoUsers()).eval()
    assert bn.fold(model).count == 0
    no_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert bn.fold(no_stats).count == 0
    shared = nn.Conv2d(3, 3, 1)
    reused = nn.Sequential(shared, nn.BatchNorm2d(3), shared, nn.BatchNorm2d(3)).eval()
    assert bn.fold(reused).count == 0


def test_fold_frozen_ghost_renorm_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          bn.GhostBatchNorm2d(4, virtual_batch_size=2), nn.Conv2d(4, 4, 1),
                          bn.BatchRenorm2d(4))
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    _randomize(model).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    assert bn.fold(model).count == 3
    _close_relative(model(x), expected, "folded output")


def test_fold_in_training_mode_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"must be in eval mode .* 3 module\(s\) are in training mode"):
        bn.fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match="training mode: 1"):
        bn.fold(model)


# ----------------------------------------------------------------------------------------
# drop_redundant_bias
# ----------------------------------------------------------------------------------------
def test_drop_redundant_bias() -> None:
    model = _randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1, bias=False),
        bn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5), bn.BatchRenorm1d(5), nn.Linear(5, 2),
    ))
    with torch.no_grad():
        model[0].bias.normal_(0, 3)
    x = torch.randn(8, 3, 5, 5)
    original = copy.deepcopy(model)
    expected_train = copy.deepcopy(original).train()(x)
    expected_eval = model.eval()(x)
    rm0 = model[1].running_mean.clone()
    bias0 = model[0].bias.detach().clone()
    _, count = bn.drop_redundant_bias(model)
    assert count == 2 and model[0].bias is None and model[6].bias is None
    assert model[8].bias is not None  # feeds no batch norm
    assert_close(model[1].running_mean, rm0 - bias0, 1e-6, 1e-6, "running_mean shifted by the bias")
    _close_relative(model(x), expected_eval, "eval output without the biases")
    # In training the mean subtraction cancels the bias (renorm's d is unchanged too).
    trained = copy.deepcopy(original).train()
    assert bn.drop_redundant_bias(trained).count == 2
    _close_relative(trained(x), expected_train, "training output without the biases", rtol=1e-4)


# ----------------------------------------------------------------------------------------
# recalibrate
# ----------------------------------------------------------------------------------------
def _batches(gen, sizes, C, dtype=torch.float64):
    return [torch.randn(n, C, generator=gen, dtype=dtype) * (1 + i) + 3 * i for i, n in enumerate(sizes)]


def test_recalibrate_gives_statistics_of_the_concatenated_data() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = bn.BatchNorm1d(4, dtype=torch.float64)
    batches = _batches(gen, [5, 9, 2, 7], 4)
    model = nn.Sequential(layer).eval()
    _, layers, used = bn.recalibrate(model, [(b, torch.zeros(len(b))) for b in batches])
    assert (layers, used) == (1, 4)
    data = torch.cat(batches)
    assert_close(layer.running_mean, data.mean(0), 1e-6, 1e-6, "running_mean")
    assert_close(layer.running_var, data.var(0, unbiased=True), 1e-6, 1e-6, "running_var")
    assert not layer.training and int(layer.num_batches_tracked) == 0
    # num_batches uses the first ones only; a generator works.
    bn.recalibrate(model, (b for b in batches), num_batches=2)
    assert_close(layer.running_var, torch.cat(batches[:2]).var(0), 1e-6, 1e-6, "first two batches")


@pytest.mark.parametrize("first", [
    lambda: bn.BatchNorm1d(4),
    # During the pass Ghost normalizes the whole batch, and Renorm uses r = 1, d = 0:
    # their r and d (chunks) would otherwise come from the statistics being replaced.
    lambda: bn.GhostBatchNorm1d(4, virtual_batch_size=2),
    lambda: bn.BatchRenorm1d(4, r_max=3.0, d_max=5.0),
], ids=["batch", "ghost", "renorm"])
def test_recalibrate_downstream_layers_see_batch_normalized_inputs(first) -> None:
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(first(), nn.Dropout(0.5), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model = _randomize(model).double()
    settings = (getattr(model[0], "virtual_batch_size", None), getattr(model[0], "r_max", None),
                getattr(model[0], "d_max", None))
    model.train()
    model[3].eval()
    modes = [m.training for m in model.modules()]
    model[0].momentum = None
    params = [p.detach().clone() for p in model.parameters()]
    model[3].num_batches_tracked.fill_(5)
    batches = _batches(gen, [6, 10, 4], 4)
    bn.recalibrate(model, batches)
    # Expected for layer 3: its inputs when layer 0 normalizes with batch statistics and
    # dropout is off.
    w, b = model[0].weight.detach(), model[0].bias.detach()
    hidden = []
    for x in batches:
        h = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5) * w + b
        hidden.append(model[2](h).detach())
    data = torch.cat(hidden)
    assert_close(model[3].running_mean, data.mean(0), 1e-6, 1e-6, "downstream running_mean")
    assert_close(model[3].running_var, data.var(0), 1e-6, 1e-6, "downstream running_var")
    assert [m.training for m in model.modules()] == modes
    assert model[0].momentum is None and model[3].momentum == 0.1
    assert int(model[3].num_batches_tracked) == 5
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert settings == (getattr(model[0], "virtual_batch_size", None),
                        getattr(model[0], "r_max", None), getattr(model[0], "d_max", None))


def test_recalibrate_layer_called_with_keyword_input_and_lazy_layers() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = bn.BatchNorm1d(3, dtype=torch.float64)

        def forward(self, x):
            return self.norm(input=x)

    gen = torch.Generator().manual_seed(4)
    batches = _batches(gen, [5, 7], 3)
    model = Keyword()
    assert bn.recalibrate(model, batches).layers == 1
    data = torch.cat(batches)
    assert_close(model.norm.running_mean, data.mean(0), 1e-12, 1e-12, "keyword-input running_mean")
    assert_close(model.norm.running_var, data.var(0), 1e-12, 1e-12, "keyword-input running_var")
    for lazy in (nn.LazyBatchNorm1d(), bn.LazyBatchNorm1d()):
        with pytest.raises(ValueError, match=r"recalibrate: 0 \(Lazy.*has not seen an input"):
            bn.recalibrate(nn.Sequential(lazy), batches)


def test_recalibrate_mapping_batches_are_keyword_arguments() -> None:
    class Fed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = bn.BatchNorm1d(3, dtype=torch.float64)

        def forward(self, features, labels=None):
            return self.norm(features)

    gen = torch.Generator().manual_seed(5)
    data = _batches(gen, [4, 6], 3)
    model = Fed()
    used = bn.recalibrate(model, [{"features": x, "labels": torch.zeros(len(x))} for x in data])
    assert (used.layers, used.batches) == (1, 2)
    assert_close(model.norm.running_mean, torch.cat(data).mean(0), 1e-12, 1e-12, "running_mean")
    assert_close(model.norm.running_var, torch.cat(data).var(0), 1e-12, 1e-12, "running_var")
    with pytest.raises(TypeError, match="batch 0 must be a tensor, an .* or a mapping"):
        bn.recalibrate(model, [3.0])


def test_recalibrate_torch_layers_and_errors() -> None:
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.BatchNorm1d(4).double(), bn.FrozenBatchNorm1d(4, dtype=torch.float64))
    batches = _batches(gen, [3, 8], 4)
    assert bn.recalibrate(model, batches).layers == 1  # the frozen layer is skipped
    assert_close(model[0].running_var, torch.cat(batches).var(0), 1e-6, 1e-6, "torch layer")
    before = model[0].running_mean.clone()
    with pytest.raises(ValueError, match="got no batches"):
        bn.recalibrate(model, [])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        bn.recalibrate(model, batches, num_batches=0)
    with pytest.raises(TypeError, match="batch 1 must be a tensor"):
        bn.recalibrate(model, [batches[0], "oops"])
    assert torch.equal(model[0].running_mean, before)  # restored after the failed pass


class _Steps(nn.Module):
    """Runs a RecurrentBatchNorm over (T, N, C) sequences step by step, with a mask."""

    def __init__(self, norm: bn.RecurrentBatchNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, :, 0] > -10  # rows with a first channel below -10 are padding
        return torch.stack([self.norm(x[t], t, mask=mask[t]) for t in range(x.shape[0])])


def test_recalibrate_recurrent_batch_norm_per_time_step() -> None:
    gen = torch.Generator().manual_seed(3)
    norm = bn.RecurrentBatchNorm(3, max_timesteps=3, momentum=None, dtype=torch.float64)
    norm.num_batches_tracked.fill_(4)
    model = _Steps(norm).eval()
    # 5 steps: steps 2, 3 and 4 share the last slot; each step has its own offset.
    batches = [torch.randn(5, n, 3, generator=gen, dtype=torch.float64)
               + torch.arange(5, dtype=torch.float64).reshape(5, 1, 1) * 2 for n in (4, 7)]
    batches[1][3, :2, 0] = -100.0  # padded rows of step 3: never in the statistics
    assert bn.recalibrate(model, batches).layers == 1
    for slot, steps in ((0, [0]), (1, [1]), (2, [2, 3, 4])):
        rows = torch.cat([b[t][b[t][:, 0] > -10] for b in batches for t in steps])
        assert_close(norm.running_mean[slot], rows.mean(0), 1e-6, 1e-6, f"slot {slot} mean")
        assert_close(norm.running_var[slot], rows.var(0), 1e-6, 1e-6, f"slot {slot} var")
    assert norm.momentum is None and not norm.training
    assert norm.num_batches_tracked.tolist() == [4, 4, 4]


def test_recalibrate_bn_lstm() -> None:
    torch.manual_seed(0)
    lstm = bn.BNLSTM(2, 4, max_timesteps=6, backend="reference").double()
    x = torch.randn(6, 500, 2, dtype=torch.float64)
    expected = lstm.train()(x)[0].detach()  # batch statistics of the one batch
    lstm.eval()
    assert bn.recalibrate(lstm, [x]).layers == 3  # bn_ih, bn_hh and bn_c
    # Population statistics of that batch are its batch statistics (up to the unbiased
    # variance, a factor 500/499), so eval now reproduces the training-mode output; the
    # running averages of the one training pass (momentum 0.1) missed it by ~100%.
    _close_relative(lstm(x)[0], expected, "BN-LSTM eval after recalibration", rtol=0.01)


# ----------------------------------------------------------------------------------------
# torch's layer and group norm in the registry
# ----------------------------------------------------------------------------------------
def test_layer_and_group_norm_in_the_registry() -> None:
    x = torch.randn(6, 10)
    layer = bn.create_norm("layer", 10, dim=1)
    reference_ln = nn.LayerNorm(10)
    assert_close(layer(x), reference_ln(x), 1e-6, 1e-5, "layer norm on (N, C)")
    image = torch.randn(2, 8, 3, 3)
    assert_close(bn.create_norm("layer", 8)(image), nn.functional.layer_norm(image, (8, 3, 3)),
                 1e-6, 1e-5, "layer norm on images")
    assert bn.create_norm("group", 100, dim=1).num_groups == 25  # largest divisor <= 32
    assert bn.create_norm("group", 64).num_groups == 32
    assert bn.create_norm("group", 48, num_groups=16).num_groups == 16
    assert bn.create_norm("group", 7).num_groups == 7
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        bn.create_norm("group", 8, num_groups=0)



# ----------------------------------------------------------------------------------------
# rewrites that would change the model are refused or skipped
# ----------------------------------------------------------------------------------------
class _TiedConvs(nn.Module):
    """Two convolutions sharing one weight, each with its own batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


class _WeightReadElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        branch = nn.functional.conv2d(x, self.conv.weight, padding=2, dilation=2)
        return self.bn(self.conv(x)) + branch


class _OptionalSkip(nn.Module):
    """With the default skip=None the conv output is read twice; a Proxy hides that."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, skip=None):
        y = self.conv(x)
        if skip is None:
            skip = y
        return self.bn(y) + skip


class _Untraceable(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: fx cannot trace this module
            x = x * 0
        return self.inner(x)


class _BatchNormWithAct(nn.BatchNorm2d):
    """A subclass with its own forward, like timm's BatchNormAct2d."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def _weight_normed() -> nn.Module:
    return nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize(("make", "shape"), [
    (_TiedConvs, (2, 3, 8, 8)),
    (_WeightReadElsewhere, (2, 3, 8, 8)),
    (_OptionalSkip, (2, 4, 5, 5)),
    (lambda: _Untraceable(_OptionalSkip()), (2, 4, 5, 5)),
    (_weight_normed, (2, 3, 6, 6)),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), _BatchNormWithAct(4)), (2, 3, 5, 5)),
    # Linear on (N, C, H, W) acts on the last dim; a BatchNorm2d normalizes dim 1.
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4)), (2, 4, 3, 4)),
], ids=["tied-weight", "weight-read-in-forward", "optional-arg", "optional-arg-child",
        "weight-norm-hook", "subclass-forward", "linear-then-bn2d"])
def test_fold_and_drop_bias_leave_unsafe_pairs_unchanged(make, shape) -> None:
    model = _randomize(make()).eval()
    if isinstance(model, _TiedConvs):
        with torch.no_grad():
            model.bn_b.weight.mul_(3)  # the two convs would need different scales
    x = torch.randn(*shape)
    expected = model(x).detach()
    assert bn.fold(model).count == 0
    assert bn.drop_redundant_bias(model).count == 0
    assert_close(model(x), expected, 0, 0, "output after fold and drop_redundant_bias")


def test_fold_optional_argument_pairs_found_when_both_traces_agree() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, scale=None):
            y = self.bn(self.conv(x))
            return y if scale is None else y * scale

    model = _randomize(Block()).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    assert bn.fold(model).count == 1
    _close_relative(model(x), expected, "folded output")


def test_convert_and_freeze_warn_about_layers_they_leave() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _BatchNormWithAct(4), bn.BNLSTM(4, 4, max_timesteps=3))
    with pytest.warns(UserWarning, match=r"left 4 layer\(s\).*1 \(_BatchNormWithAct.*"
                                         r"RecurrentBatchNorm: per-time-step"):
        bn.freeze(model)
    assert type(model[1]) is _BatchNormWithAct
    with pytest.warns(UserWarning, match="convert: left 4 layer"):
        bn.convert(model, "ghost", virtual_batch_size=2)


def test_failed_convert_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="keeps no running statistics"):
        bn.freeze(model)
    assert type(model[1]) is nn.BatchNorm2d
    mixed = nn.Sequential(nn.BatchNorm2d(4), bn.BatchNormAct2d(4, activation="relu"))
    with pytest.raises(ValueError, match="has no activation"):
        bn.convert(mixed, "ghost")
    assert type(mixed[0]) is nn.BatchNorm2d


def test_convert_keyword_arguments() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4))
    bn.convert(model, "frozen", eps=0.5)
    assert model[0].eps == 0.5
    bn.convert(model, "batchnorm", dtype=torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[0].eps == 0.5
    with pytest.raises(TypeError, match="cannot build a 'frozen' layer for 0.*no_such_option"):
        bn.convert(model, "frozen", no_such_option=1)
    assert type(model[0]) is bn.BatchNorm2d


def test_sync_round_trip_keeps_each_layer_rank() -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                     nn.Linear(64, 5), nn.BatchNorm1d(5))).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    bn.convert(model, "sync")
    bn.convert(model, "torch")
    assert type(model[1]) is nn.BatchNorm2d and type(model[4]) is nn.BatchNorm1d
    assert_close(model(x), expected, 0, 0, "round-trip output")
    # Layers from SyncBatchNorm.convert_sync_batchnorm remember the rank too.
    head = bn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(8, 5), bn.BatchNorm1d(5)))
    bn.freeze(head)
    assert type(head[1]) is bn.FrozenBatchNorm1d
    # torch's convert_sync_batchnorm does not: default_dim says which rank.
    head = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)))
    bn.freeze(head, default_dim=1)
    assert type(head[1]) is bn.FrozenBatchNorm1d
    with pytest.raises(ValueError, match="default_dim must be 1, 2 or 3"):
        bn.unfreeze(head, default_dim=4)


def test_recalibrate_skips_batches_of_one_example() -> None:
    gen = torch.Generator().manual_seed(5)
    batches = _batches(gen, [8, 8, 1], 4)
    model = nn.Sequential(bn.BatchNorm1d(4, dtype=torch.float64))
    with pytest.warns(UserWarning, match="skipped 1 batch"):
        result = bn.recalibrate(model, batches)
    assert result.batches == 2
    data = torch.cat(batches[:2])
    assert_close(model[0].running_mean, data.mean(0), 1e-12, 1e-12, "running_mean")
    assert_close(model[0].running_var, data.var(0), 1e-12, 1e-12, "running_var")
    # A skipped batch leaves nothing in the layers before the one that stopped it.
    deep = nn.Sequential(nn.BatchNorm1d(4).double(), nn.Linear(4, 4).double(),
                         nn.BatchNorm1d(4).double())
    with pytest.warns(UserWarning):
        bn.recalibrate(deep, batches)
    assert_close(deep[0].running_mean, data.mean(0), 1e-12, 1e-12, "first layer")
    with pytest.raises(ValueError, match="all 1 batches were skipped"):
        bn.recalibrate(model, batches[2:])


def test_recalibrate_takes_only_num_batches_from_an_iterator() -> None:
    gen = torch.Generator().manual_seed(6)
    it = iter(_batches(gen, [4, 4, 4, 4], 3))
    model = nn.Sequential(bn.BatchNorm1d(3, dtype=torch.float64))
    assert bn.recalibrate(model, it, num_batches=2).batches == 2
    assert len(list(it)) == 2  # the caller's iterator keeps the rest


def test_recalibrate_subclass_with_own_forward() -> None:
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    model = nn.Sequential(_BatchNormWithAct(3).double())
    assert bn.recalibrate(model, batches).layers == 1
    data = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    assert_close(model[0].running_var, data.var(1), 1e-12, 1e-12, "running_var")
