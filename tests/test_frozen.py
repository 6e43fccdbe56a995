"""FrozenBatchNorm: a fixed affine map that loads BatchNormXd checkpoints."""

from __future__ import annotations

import pytest
import reference
import torch
from cases import TOLERANCES, assert_close

import batchnorm as bn


def _trained_torch_bn(C: int = 4) -> torch.nn.BatchNorm2d:
    layer = torch.nn.BatchNorm2d(C)
    for _ in range(3):
        layer(torch.randn(6, C, 3, 3) * 3 + 1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer.eval()


def test_buffers_not_parameters() -> None:
    frozen = bn.FrozenBatchNorm2d(4)
    assert list(frozen.parameters()) == []
    assert sorted(dict(frozen.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"


def test_loads_batch_norm_state_dict_and_matches_eval() -> None:
    trained = _trained_torch_bn()
    frozen = bn.FrozenBatchNorm2d(4)
    result = frozen.load_state_dict(trained.state_dict(), strict=True)  # num_batches_tracked ignored
    assert not result.missing_keys and not result.unexpected_keys
    ours = bn.BatchNorm2d(4)
    ours.load_state_dict(trained.state_dict())
    frozen.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(5, 4, 3, 3)
    expected = trained(x)
    for mode in (True, False):  # the same fixed map in both modes
        frozen.train(mode)
        assert_close(frozen(x), expected, 1e-6, 1e-6, f"output, training={mode}")
    assert torch.equal(frozen.running_mean, trained.running_mean)


def test_gradient_reaches_the_input_only() -> None:
    frozen = bn.FrozenBatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        frozen.running_var.uniform_(0.5, 2.0)
        frozen.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(frozen, (x,))
    dy = torch.randn_like(x)
    x.grad = None
    frozen.train()(x).backward(dy)
    dx_ref, _, _ = reference.backward_eval(dy, x.detach(), frozen.weight, frozen.running_mean,
                                           frozen.running_var, frozen.eps)
    assert_close(x.grad, dx_ref, 1e-12, 1e-10, "dx")


def test_channels_last_and_bfloat16() -> None:
    frozen = bn.FrozenBatchNorm2d(6)
    frozen.load_state_dict(_trained_torch_bn(6).state_dict())
    x = torch.randn(2, 6, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = frozen(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    expected = reference.forward(x, frozen.weight, frozen.bias, frozen.running_mean,
                                 frozen.running_var, False, 0.1, frozen.eps).y
    tol = TOLERANCES[torch.bfloat16]
    assert_close(y, expected, tol.atol, tol.rtol, "bf16 output")
    assert frozen.running_mean.dtype == torch.float32


def test_other_ranks_and_errors() -> None:
    assert bn.FrozenBatchNorm1d(3)(torch.randn(4, 3)).shape == (4, 3)
    assert bn.FrozenBatchNorm3d(3)(torch.randn(1, 3, 2, 2, 2)).shape == (1, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="expected 4D"):
        bn.FrozenBatchNorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        bn.FrozenBatchNorm2d(3)(torch.randn(1, 4, 2, 2))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        bn.FrozenBatchNorm2d(3)([1.0])
    with pytest.raises(ValueError, match="num_features"):
        bn.FrozenBatchNorm2d(0)
    assert isinstance(bn.create_norm("frozen", 8), bn.FrozenBatchNorm2d)


@pytest.mark.parametrize("eps", [-1e-5, float("inf"), float("nan")])
def test_bad_eps_is_refused_at_construction(eps) -> None:
    with pytest.raises(ValueError, match="FrozenBatchNorm2d: eps must be finite and >= 0"):
        bn.FrozenBatchNorm2d(3, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, [1e-5]])
def test_eps_of_the_wrong_type_is_a_named_error(eps) -> None:
    with pytest.raises(TypeError, match=r"^FrozenBatchNorm2d: eps must be a real number, got "):
        bn.FrozenBatchNorm2d(4, eps=eps)


def test_numpy_numbers_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.FrozenBatchNorm2d(np.int64(4), eps=np.float32(1e-3))
    assert layer.num_features == 4 and type(layer.num_features) is int
    assert type(layer.eps) is float and layer.eps == pytest.approx(1e-3)
    assert layer(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match="num_features must be a positive int, got True"):
        bn.FrozenBatchNorm2d(True)
