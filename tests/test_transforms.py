"""The layers under torch.compile, torch.func and forward-mode AD, and kernel edge values.

Under a transform ``backend="auto"`` takes plain torch ops (the kernels read raw data
pointers, which tracers and functorch wrappers do not have), so the numbers must match
the eager layer and torch's own.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from cases import assert_close, trainable_2d_layers
from torch import nn
from torch.func import functional_call, grad, vmap

import batchnorm as bn

LAYERS_2D = trainable_2d_layers()

# Large enough for "auto" to pick the numba kernels outside a transform.
LARGE = (16, 64, 16, 16)


@pytest.mark.parametrize("make", [partial(f, 8) for f in LAYERS_2D.values()], ids=list(LAYERS_2D))
def test_compiled_training_step_matches_eager(make) -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), make())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(4, 3, 10, 10)
    y_eager, y_compiled = eager(x), compiled(x)
    assert_close(y_compiled, y_eager, 1e-5, 1e-5, "output")
    y_eager.square().sum().backward()
    y_compiled.square().sum().backward()
    assert_close(compiled_model[0].weight.grad, eager[0].weight.grad, 1e-4, 1e-4, "conv grad")
    for key, value in eager[1].state_dict().items():
        assert_close(compiled_model[1].state_dict()[key], value, 1e-6, 1e-6, key)


def test_func_grad_and_vmap_match_torch() -> None:
    ours = bn.BatchNorm2d(LARGE[1], track_running_stats=False)
    theirs = nn.BatchNorm2d(LARGE[1], track_running_stats=False)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    x = torch.randn(LARGE)

    def loss(module):
        return lambda p: functional_call(module, p, (x,)).pow(3).sum()

    expected = grad(loss(theirs))(params)
    for key, value in grad(loss(ours))(params).items():
        assert_close(value, expected[key], 1e-3, 1e-4, f"grad of {key}")
    xs = torch.randn(3, 4, 8, 5, 5)
    small_ours = bn.BatchNorm2d(8, track_running_stats=False)
    small_theirs = nn.BatchNorm2d(8, track_running_stats=False)
    assert_close(vmap(small_ours)(xs), vmap(small_theirs)(xs), 1e-5, 1e-5, "vmap output")


@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_matches_torch(training) -> None:
    ours, theirs = bn.BatchNorm2d(LARGE[1]), nn.BatchNorm2d(LARGE[1])
    ours.train(training)
    theirs.train(training)
    x, tangent = torch.randn(LARGE), torch.randn(LARGE)
    with fwAD.dual_level():
        jvp_ours = fwAD.unpack_dual(ours(fwAD.make_dual(x, tangent))).tangent
        jvp_theirs = fwAD.unpack_dual(theirs(fwAD.make_dual(x, tangent))).tangent
    assert_close(jvp_ours, jvp_theirs, 1e-4, 1e-4, "jvp")
    assert_close(ours.running_var, theirs.running_var, 1e-5, 1e-5, "running_var")


def test_numba_eval_with_zero_variance_and_eps_zero_is_not_an_error() -> None:
    layer = bn.BatchNorm2d(3, eps=0.0, backend="numba").eval()
    with torch.no_grad():
        layer.running_var[0] = 0.0
        x = torch.randn(2, 3, 4, 4)
        y = layer(x)
        expected = nn.functional.batch_norm(x, layer.running_mean, layer.running_var, eps=0.0)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_close(y[finite], expected[finite], 1e-6, 1e-6, "finite values")


def test_numba_eval_on_an_empty_batch() -> None:
    layer = bn.BatchNorm2d(3, backend="numba").eval()
    with torch.no_grad():
        assert layer(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("eps", [3e-5, 0.3])
def test_dead_channel_keeps_a_non_negative_running_variance(eps) -> None:
    """aten saves invstd; var = invstd⁻² − eps of a constant channel rounds around 0."""
    layer = bn.BatchNorm2d(4, eps=eps, backend="aten")
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        x = torch.relu(torch.randn(8, 4, 6, 6, generator=gen))
        x[:, 1] = 0.0
        layer(x)
    assert float(layer.running_var.min()) >= 0.0


class _Block(nn.Module):
    """Every layer kind in one traceable forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = bn.BatchNorm2d(4)
        self.act = bn.BatchNormAct2d(4, activation="relu")
        self.ghost = bn.GhostBatchNorm2d(4, virtual_batch_size=2)
        self.renorm = bn.BatchRenorm2d(4)
        self.frozen = bn.FrozenBatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.frozen(self.renorm(self.ghost(self.act(y, y))))


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = bn.BNLSTM(3, 5, batch_first=True, max_timesteps=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, _) = self.lstm(x)
        return out + h[-1].unsqueeze(1)


@pytest.mark.parametrize(("make", "shape"), [
    (_Block, (4, 3, 5, 5)), (_Recurrent, (2, 6, 3)),
], ids=["layers", "bnlstm"])
def test_fx_symbolic_trace_keeps_the_layers_as_leaves(make, shape) -> None:
    """As torch.nn's layers: one call_module node each, and the traced module computes
    what the eager one does, running statistics included."""
    torch.manual_seed(0)
    eager = make()
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    ours = {name for name, m in eager.named_children() if type(m).__module__.startswith("batchnorm")}
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert ours <= called
    x = torch.randn(shape)
    for mode in ("train", "eval"):
        eager.train(mode == "train")
        traced.train(mode == "train")
        assert torch.equal(traced(x), eager(x)), mode
    for key, value in eager.state_dict().items():
        assert torch.equal(traced.state_dict()[key], value), key


def test_fx_symbolic_trace_of_a_bare_layer_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="BatchNorm2d: torch.fx traces this layer as a leaf"):
        torch.fx.symbolic_trace(bn.BatchNorm2d(3))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_in_training_matches_torch() -> None:
    torch.manual_seed(0)
    ours, theirs = bn.BatchNorm2d(3).train(), nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    traced_ours, traced_theirs = torch.jit.trace(ours, x), torch.jit.trace(theirs, x)
    x2 = torch.randn(4, 3, 5, 5) * 3 - 1
    assert_close(traced_ours(x2), traced_theirs(x2), 1e-5, 1e-5, "output")
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 1e-6, 1e-6, key)


@pytest.mark.parametrize("backend", ["numba", "aten"])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_named_kernel_backend_under_a_recorder_is_a_clear_error(backend) -> None:
    layer = bn.BatchNorm2d(3, backend=backend, track_running_stats=True)
    x = torch.randn(4, 3, 5, 5)
    message = f"backend='{backend}' runs compiled kernels"
    with pytest.raises(RuntimeError, match=message):
        torch.jit.trace(layer, x)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with pytest.raises(RuntimeError, match=message):
        grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)


def _chunked_torch(x: torch.Tensor, p: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Ghost batch norm written with torch's functional, chunk by chunk."""
    return torch.cat([
        nn.functional.batch_norm(c, None, None, p["weight"], p["bias"], training=True)
        for c in x.split(size)
    ])


@pytest.mark.parametrize("shape", [LARGE, (8, 4, 3, 3)], ids=["large", "small"])
def test_ghost_under_func_transforms_matches_torch_by_chunks(shape) -> None:
    torch.manual_seed(0)
    layer = bn.GhostBatchNorm2d(shape[1], virtual_batch_size=4, track_running_stats=False)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(shape)
    ours = grad(lambda p: functional_call(layer, p, (x,)).pow(3).sum())(params)
    theirs = grad(lambda p: _chunked_torch(x, p, 4).pow(3).sum())(params)
    for key, value in theirs.items():
        assert_close(ours[key], value, 1e-3, 1e-4, f"grad of {key}")
    xs = torch.randn(2, *shape)
    expected = torch.stack([_chunked_torch(xi, params, 4) for xi in xs])
    assert_close(vmap(layer)(xs), expected, 1e-5, 1e-5, "vmap output")
    tangent = torch.randn(shape)
    with fwAD.dual_level():
        jvp_ours = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
        jvp_theirs = fwAD.unpack_dual(_chunked_torch(fwAD.make_dual(x, tangent), params, 4)).tangent
    assert_close(jvp_ours, jvp_theirs, 1e-4, 1e-4, "jvp")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_ghost_with_several_chunks_matches_eager() -> None:
    torch.manual_seed(0)
    eager = bn.GhostBatchNorm2d(8, virtual_batch_size=4)
    traced_layer = copy.deepcopy(eager)
    x = torch.randn(16, 8, 5, 5) + 2
    traced = torch.jit.trace(traced_layer, x)
    for _ in range(int(traced_layer.num_batches_tracked)):  # as often as tracing ran it
        eager(x)
    x2 = torch.randn(16, 8, 5, 5) * 3
    assert_close(traced(x2), eager(x2), 1e-5, 1e-5, "output")
    for key, value in eager.state_dict().items():
        assert_close(traced_layer.state_dict()[key], value, 1e-5, 1e-6, key)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("backend", ["auto", "reference", "aten"])
def test_jit_trace_in_eval_matches_eager(backend) -> None:
    """jit.trace checks its trace by running it again under no_grad: one graph both ways."""
    torch.manual_seed(0)
    layer = bn.BatchNorm2d(3, backend=backend)
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    layer.eval()
    x = torch.randn(4, 3, 5, 5)
    traced = torch.jit.trace(layer, x)
    x2 = torch.randn(4, 3, 5, 5)
    assert_close(traced(x2), layer(x2), 1e-6, 1e-6, "output")


@pytest.mark.parametrize("backend", ["numba", "aten"])
def test_named_kernel_backend_inside_dual_level_without_duals_runs(backend) -> None:
    """A dual_level context records nothing for plain tensors; a dual input raises."""
    x = torch.randn(4, 3, 5, 5)
    expected = bn.BatchNorm2d(3, backend=backend)(x)
    with fwAD.dual_level():
        assert_close(bn.BatchNorm2d(3, backend=backend)(x), expected, 0, 0, "output")
        with pytest.raises(RuntimeError, match="runs compiled kernels"):
            bn.BatchNorm2d(3, backend=backend)(fwAD.make_dual(x, torch.randn_like(x)))


# Layers whose named backend runs a compiled kernel in training.
_NAMED_KERNEL_LAYERS = {
    "bn-numba": lambda: bn.BatchNorm2d(3, backend="numba"),
    "bn-aten": lambda: bn.BatchNorm2d(3, backend="aten"),
    "ghost-numba": lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=2, backend="numba"),
    "renorm-aten": lambda: bn.BatchRenorm2d(3, backend="aten"),
    "act-numba": lambda: bn.BatchNormAct2d(3, backend="numba"),
}
_RECORDERS = {
    "jit.trace": lambda m, x: torch.jit.trace(m, x),
    # An exported program has no eager part to fall back to (as torch.compile's graph
    # breaks do): the kernels would see fake tensors.
    "torch.export": lambda m, x: torch.export.export(m, (x,)),
}


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("recorder", list(_RECORDERS))
@pytest.mark.parametrize("make", list(_NAMED_KERNEL_LAYERS.values()), ids=list(_NAMED_KERNEL_LAYERS))
def test_named_kernel_backend_under_a_recorder_names_it(make, recorder) -> None:
    match = f"runs compiled kernels, which .*{recorder}"
    with pytest.raises(RuntimeError, match=match):
        _RECORDERS[recorder](make(), torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make", [partial(f, 8) for f in LAYERS_2D.values()], ids=list(LAYERS_2D))
def test_torch_export_matches_eager_and_updates_the_running_statistics(make, training) -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3), make()).train(training)
    with torch.no_grad():  # non-trivial running statistics for eval
        eager[1].running_mean.uniform_(-1, 1)
        eager[1].running_var.uniform_(0.5, 2)
    exported_model = copy.deepcopy(eager)
    x = torch.randn(8, 3, 10, 10) * 2 + 1
    program = torch.export.export(exported_model, (x,)).module()
    for step in range(2):  # the second call sees the first one's running statistics
        x = torch.randn(8, 3, 10, 10) * (step + 2) - 1
        assert_close(program(x), eager(x), 1e-5, 1e-5, f"output {step}")
    state = program.state_dict()
    for key, value in eager.state_dict().items():
        assert_close(state[key], value, 1e-6, 1e-6, key)
