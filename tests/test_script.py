"""The layers under torch.jit.script: the compiled forward (aten's batch norm with this
package's semantics) against the float64 reference and the eager layer, its errors, its
state_dict, and the layer kinds that refuse to be scripted."""

from __future__ import annotations

import copy
import io

import pytest
import reference as ref
import torch
from cases import CASES, TOLERANCES, Case, assert_close, memory_format
from torch import nn

import batchnorm as bn
from batchnorm import nn as bnn

# torch 2.13 deprecates torch.jit.script in favour of torch.compile and torch.export; the
# layers still script, as torch's own do.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

_LAYERS = {1: bn.BatchNorm1d, 2: bn.BatchNorm2d, 3: bn.BatchNorm3d}
_ACTS = {1: bn.BatchNormAct1d, 2: bn.BatchNormAct2d, 3: bn.BatchNormAct3d}
_FROZEN = {1: bnn.FrozenBatchNorm1d, 2: bnn.FrozenBatchNorm2d, 3: bnn.FrozenBatchNorm3d}
# Large enough for the eager layer to run the numba kernels, not aten's.
LARGE = (16, 64, 16, 16)


def _randomize(layer: nn.Module, seed: int = 1) -> None:
    """γ, β and the running statistics away from their initial 1, 0, 0, 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
                if name in ("bias", "running_mean"):
                    values = values - 1.0
                t.copy_(values)


def _input(shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0 + 0.5
    return x.to(dtype).contiguous(memory_format=fmt).requires_grad_()


def _jit_error(fn, *args) -> str:
    with pytest.raises(torch.jit.Error) as info:
        fn(*args)
    return str(info.value)


def _eager_error(fn, *args) -> BaseException:
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_scripted_layer_matches_the_float64_reference(case: Case, dtype: torch.dtype) -> None:
    layer = _LAYERS[case.module_dim](
        case.shape[1], momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, dtype=dtype,
    )
    _randomize(layer)
    layer.train(case.training)
    scripted = torch.jit.script(layer)
    tol = TOLERANCES[dtype]
    w = layer.weight.detach().clone() if case.affine else None
    b = layer.bias.detach().clone() if case.affine else None
    for step in range(2):  # two steps: the cumulative average's second factor is 1/2
        rm = None if layer.running_mean is None else layer.running_mean.clone()
        rv = None if layer.running_var is None else layer.running_var.clone()
        batch_stats = case.training or rm is None
        tracked = 0 if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
        x = _input(case.shape, dtype, memory_format(case), seed=step)
        expected = ref.forward(x.detach(), w, b, rm, rv, batch_stats, case.momentum, layer.eps, tracked)
        y = scripted(x)
        assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format(case))
        assert_close(y, expected.y, tol.atol, tol.rtol, f"{case.name} output, step {step}")
        dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
        y.backward(dy)
        if batch_stats:
            dx, dw, db = ref.backward_train(dy, x.detach(), w, layer.eps)
        else:
            dx, dw, db = ref.backward_eval(dy, x.detach(), w, rm, rv, layer.eps)
        assert_close(x.grad, dx, tol.grad_atol, tol.grad_rtol, f"{case.name} dx")
        if case.affine:
            assert_close(layer.weight.grad, dw, tol.grad_atol, tol.grad_rtol, f"{case.name} dweight")
            assert_close(layer.bias.grad, db, tol.grad_atol, tol.grad_rtol, f"{case.name} dbias")
            layer.weight.grad = layer.bias.grad = None
        if case.training and case.track_running_stats:
            assert_close(layer.running_mean, expected.running_mean, tol.atol, tol.rtol, "running_mean")
            assert_close(layer.running_var, expected.running_var, tol.atol, tol.rtol, "running_var")
            assert int(layer.num_batches_tracked) == tracked + 1
        elif rm is not None:
            assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)


# (dtype of the layer, dtype of the input): reduced precision keeps float32 state, and a
# float64 layer normalizes float32 input, as the eager layer does.
_MIXED = [
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
    (torch.float32, torch.float32),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("layer_dtype", "input_dtype"), _MIXED, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_scripted_layer_matches_the_eager_layer(
    layer_dtype: torch.dtype, input_dtype: torch.dtype, training: bool, channels_last: bool
) -> None:
    eager = bn.BatchNorm2d(LARGE[1], dtype=layer_dtype).train(training)
    _randomize(eager)
    twin = copy.deepcopy(eager)
    scripted = torch.jit.script(twin)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tol = TOLERANCES[input_dtype]
    for step in range(2):
        x = _input(LARGE, input_dtype, fmt, seed=step)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = eager(x), scripted(x2)
        assert y2.dtype == y.dtype and y2.is_contiguous(memory_format=fmt)
        assert_close(y2, y, tol.atol, tol.rtol, "output")
        dy = torch.randn(LARGE, dtype=torch.float64).to(input_dtype)
        y.backward(dy)
        y2.backward(dy)
        assert_close(x2.grad, x.grad, tol.grad_atol, tol.grad_rtol, "dx")
        for name in ("weight", "bias"):
            grads = getattr(twin, name).grad, getattr(eager, name).grad
            assert grads[0].dtype == layer_dtype
            assert_close(*grads, tol.grad_atol, tol.grad_rtol * 10, f"d{name}")
    for key, value in eager.state_dict().items():
        assert twin.state_dict()[key].dtype == value.dtype
        assert_close(twin.state_dict()[key], value, 1e-6, 1e-5, key)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(6, 5), (4, 8, 5, 5), LARGE, (2, 4, 3, 3, 3)], ids=str)
def test_scripted_batch_norm_act_matches_the_eager_layer(
    activation: str, with_residual: bool, shape: tuple[int, ...]
) -> None:
    dim = {2: 1, 4: 2, 5: 3}[len(shape)]
    eager = _ACTS[dim](shape[1], activation, negative_slope=0.2)
    _randomize(eager)
    twin = copy.deepcopy(eager)
    scripted = torch.jit.script(twin)
    for training in (True, False):
        eager.train(training)
        scripted.train(training)
        x = _input(shape, torch.float32, torch.contiguous_format, seed=3)
        x2 = x.detach().clone().requires_grad_()
        res = _input(shape, torch.float32, torch.contiguous_format, seed=4) if with_residual else None
        res2 = None if res is None else res.detach().clone().requires_grad_()
        y, y2 = eager(x, res), scripted(x2, res2)
        assert_close(y2, y, 2e-5, 1e-4, f"output ({'train' if training else 'eval'})")
        dy = torch.randn(shape)
        y.backward(dy)
        y2.backward(dy)
        assert_close(x2.grad, x.grad, 1e-4, 1e-3, "dx")
        if res is not None:
            assert_close(res2.grad, res.grad, 1e-6, 1e-6, "dresidual")
    for key, value in eager.state_dict().items():
        assert_close(twin.state_dict()[key], value, 1e-6, 1e-5, key)


@pytest.mark.parametrize(("dim", "shape"), [(1, (5, 4)), (1, (5, 4, 6)), (2, (3, 4, 5, 5)), (3, (2, 4, 2, 3, 3))])
def test_scripted_frozen_layer_matches_the_eager_layer(dim: int, shape: tuple[int, ...]) -> None:
    frozen = _FROZEN[dim](shape[1])
    _randomize(frozen)
    scripted = torch.jit.script(frozen)
    x = _input(shape, torch.float32, torch.contiguous_format, seed=0)
    x2 = x.detach().clone().requires_grad_()
    for mode in (True, False):  # the same fixed map in both modes
        scripted.train(mode)
        assert_close(scripted(x2), frozen(x), 1e-6, 1e-6, "output")
    frozen(x).sum().backward()
    scripted(x2).sum().backward()
    assert_close(x2.grad, x.grad, 1e-6, 1e-6, "dx")
    assert list(scripted.state_dict()) == list(frozen.state_dict())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_scripted_layer_keeps_a_non_finite_batch_out_of_the_running_statistics(momentum) -> None:
    layer = bn.BatchNorm2d(3, momentum=momentum)
    scripted = torch.jit.script(layer)
    scripted(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 4] = float("nan")
    x[0, 0, 0, 0] = float("inf")
    scripted(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key  # num_batches_tracked included
    y = scripted(torch.randn(4, 3, 5, 5))  # a finite batch is applied again
    assert int(layer.num_batches_tracked) == 2 and bool(torch.isfinite(y).all())


def test_scripted_check_finite_raises_and_leaves_the_statistics() -> None:
    layer = bn.BatchNorm2d(3, check_finite=True)
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 4] = float("nan")
    message = _jit_error(scripted, x)
    eager = _eager_error(bn.BatchNorm2d(3, check_finite=True), x)
    assert isinstance(eager, FloatingPointError)
    assert "FloatingPointError" in message and str(eager) in message
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0


def test_scripted_empty_batch_updates_nothing() -> None:
    layer = bn.BatchNorm2d(3, momentum=None)
    scripted = torch.jit.script(layer)
    y = scripted(torch.randn(0, 3, 5, 5))
    assert y.shape == (0, 3, 5, 5)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))


def _bad_inputs() -> list[tuple[str, nn.Module, tuple]]:
    x = torch.randn(4, 3, 5, 5)
    return [
        ("rank", bn.BatchNorm2d(3), (torch.randn(4, 3),)),
        ("rank_1d", bn.BatchNorm1d(3), (torch.randn(4, 3, 2, 2),)),
        ("rank_3d", bn.BatchNorm3d(3), (x,)),
        ("channels", bn.BatchNorm2d(4), (x,)),
        ("one_value", bn.BatchNorm2d(3), (torch.randn(1, 3, 1, 1),)),
        ("eps_0", bn.BatchNorm2d(3, eps=0.0), (x,)),
        ("rank_eval_no_stats", bn.BatchNorm2d(3, track_running_stats=False).eval(), (torch.randn(3),)),
        ("residual_shape", bn.BatchNormAct2d(3), (x, torch.randn(4, 3, 5, 4))),
        ("residual_dtype", bn.BatchNormAct2d(3), (x, torch.randn(4, 3, 5, 5, dtype=torch.float64))),
        ("frozen_rank", bnn.FrozenBatchNorm2d(3), (torch.randn(4, 3),)),
        ("frozen_channels", bnn.FrozenBatchNorm2d(5), (x,)),
    ]


@pytest.mark.parametrize(("name", "layer", "args"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_scripted_errors_carry_the_eager_message(name: str, layer: nn.Module, args: tuple) -> None:
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    eager = _eager_error(copy.deepcopy(layer), *args)
    assert isinstance(eager, (ValueError, TypeError)), repr(eager)
    message = _jit_error(torch.jit.script(layer), *args)
    assert type(eager).__name__ in message
    # (Up to the value a float prints as: TorchScript writes 0.0 as "0.".)
    text = str(eager) if name != "eps_0" else str(eager).removesuffix("0.0")
    assert text in message
    assert str(eager).startswith(type(layer).__name__ + ": ")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{name}: {key} changed"


def test_scripted_state_dict_is_torch_s_and_survives_save_and_load() -> None:
    layer = bn.BatchNorm2d(6)
    _randomize(layer)
    scripted = torch.jit.script(layer)
    scripted(torch.randn(4, 6, 3, 3))
    state = scripted.state_dict()
    assert list(state) == list(nn.BatchNorm2d(6).state_dict())
    theirs = nn.BatchNorm2d(6)
    theirs.load_state_dict(state)  # strict
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(5, 6, 3, 3)
    scripted.eval()
    loaded.eval()
    theirs.eval()
    assert_close(loaded(x), scripted(x), 0.0, 0.0, "loaded output")
    assert_close(theirs(x), scripted(x), 1e-6, 1e-6, "torch's layer with the scripted state")


class _Block(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN + residual -> ReLU, with an eval-only branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = bn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = bn.BatchNormAct2d(4, "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))), x)


def test_scripted_model_trains_like_the_eager_one_and_leaves_it_unchanged() -> None:
    torch.manual_seed(0)
    eager = _Block()
    twin = copy.deepcopy(eager)
    layers = dict(twin.named_modules())
    scripted = torch.jit.script(twin)
    # torch.jit.script edits the model it is given where a layer offers a replacement;
    # these layers offer none, so the eager model keeps its own layers.
    assert dict(twin.named_modules()) == layers
    assert type(twin.bn1) is bn.BatchNorm2d and type(twin.bn2) is bn.BatchNormAct2d
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(twin.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((eager, opt_e), (scripted, opt_s)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for key, value in eager.state_dict().items():
        assert_close(twin.state_dict()[key], value, 1e-5, 1e-4, key)
    eager.eval()
    scripted.eval()
    x = torch.randn(2, 4, 6, 6)
    assert_close(scripted(x), eager(x), 1e-5, 1e-4, "eval output")
    frozen = torch.jit.freeze(scripted)
    assert_close(frozen(x), eager(x), 1e-5, 1e-4, "frozen output")
    # For inference, fold first (torch.jit.freeze does not fold these layers into the
    # convolutions): the scripted folded model computes the same map. (bn2 takes a
    # residual, so fold keeps it.)
    folded = copy.deepcopy(eager)
    assert bn.fold(folded).count == 1 and isinstance(folded.bn1, nn.Identity)
    assert_close(torch.jit.script(folded)(x), eager(x), 1e-5, 1e-4, "folded, scripted output")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("ghost", lambda: bn.GhostBatchNorm2d(4, virtual_batch_size=2)),
        ("renorm", lambda: bn.BatchRenorm2d(4)),
        ("sync", lambda: bnn.SyncBatchNorm(4)),
        ("recurrent", lambda: bnn.RecurrentBatchNorm(4, 3)),
        ("bnlstm_cell", lambda: bnn.BNLSTMCell(3, 4, max_timesteps=3)),
        ("bnlstm", lambda: bnn.BNLSTM(3, 4, max_timesteps=3)),
        ("lazy", lambda: bn.LazyBatchNorm2d()),
        ("tensor_eps", lambda: bn.BatchNorm2d(4, eps=torch.tensor(1e-5))),
        ("tensor_momentum", lambda: bn.BatchNorm2d(4, momentum=torch.tensor(0.1))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_layers_without_a_script_form_refuse_by_name(name: str, make) -> None:
    layer = make()
    model = nn.Sequential(nn.Identity(), layer)
    with pytest.raises(TypeError, match=rf"^{type(layer).__name__}: torch\.jit\.script"):
        torch.jit.script(model)
    assert model[1] is layer  # the model is left as it was


@pytest.mark.parametrize(("layer_dtype", "input_dtype"), [
    (torch.float64, torch.bfloat16), (torch.float64, torch.float16),
    (torch.float16, torch.bfloat16),
])
def test_scripted_statistics_of_half_input_are_float32_precise(layer_dtype, input_dtype) -> None:
    # aten takes float32 statistics with half-precision input: a layer of another dtype
    # is updated through float32 copies, never through the input's 8 or 11 bits.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 4, 4, generator=gen) * 1.7 + 3.3).to(input_dtype)
    layer = bn.BatchNorm2d(3, dtype=layer_dtype)
    scripted = torch.jit.script(copy.deepcopy(layer))
    scripted(x)
    data = x.double()
    expected_mean = 0.1 * data.mean(dim=(0, 2, 3))
    expected_var = 0.9 + 0.1 * data.var(dim=(0, 2, 3))
    # float32 rounding of the update, then the layer's own dtype.
    tol = 1e-6 if layer_dtype == torch.float64 else 1e-3
    assert_close(scripted.running_mean.double(), expected_mean, tol, tol, "running_mean")
    assert_close(scripted.running_var.double(), expected_var, tol, tol, "running_var")


def test_integer_eps_and_momentum_script() -> None:
    layer = bn.BatchNorm2d(3, eps=1, momentum=1)
    twin = copy.deepcopy(layer)
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 3, 2, 2)
    assert_close(scripted(x), twin(x), 1e-5, 1e-5, "output")
    assert_close(scripted.running_mean, twin.running_mean, 1e-6, 1e-6, "running_mean")


@pytest.mark.parametrize("initialize", ["forward", "load_state_dict"])
def test_initialized_lazy_layer_scripts_as_the_plain_layer(initialize: str) -> None:
    lazy = bn.LazyBatchNorm2d()
    if initialize == "forward":
        lazy(torch.randn(4, 5, 3, 3))
    else:
        # Initialized without a forward: still the lazy class, with its pre-hook.
        source = bn.BatchNorm2d(5)
        _randomize(source)
        lazy.load_state_dict(source.state_dict())
    scripted = torch.jit.script(lazy)
    assert type(lazy) is bn.BatchNorm2d
    x = torch.randn(4, 5, 3, 3)
    assert_close(scripted(x), copy.deepcopy(lazy)(x), 1e-5, 1e-5, "output")
