"""Bad input gets a clear error naming the thing, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import batchnorm as bn

F = bn.functional


@pytest.mark.parametrize(
    ("layer", "x", "match"),
    [
        (bn.BatchNorm1d(3), torch.randn(2, 3, 4, 5), r"BatchNorm1d: expected 2D .* or 3D .* got 4D"),
        (bn.BatchNorm1d(3), torch.randn(3), r"BatchNorm1d: expected 2D .* got 1D"),
        (bn.BatchNorm2d(3), torch.randn(2, 3, 4), r"BatchNorm2d: expected 4D .* got 3D"),
        (bn.BatchNorm3d(3), torch.randn(2, 3, 4, 4), r"BatchNorm3d: expected 5D .* got 4D"),
        (bn.BatchNorm2d(3), torch.randn(2, 4, 5, 5), r"expected input with 3 channels .* got 4"),
        (bn.BatchNorm1d(3), torch.randn(2, 0), r"expected input with 3 channels .* got 0"),
    ],
)
def test_wrong_dims_or_channels(layer: torch.nn.Module, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        layer(x)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training(shape: tuple[int, ...]) -> None:
    layer = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](3)
    before = layer.state_dict()
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*shape \(1, 3"):
        layer(torch.randn(shape))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape  # eval handles a single example


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=f"floating-point.*{dtype}"):
        bn.BatchNorm1d(3)(torch.zeros(4, 3, dtype=dtype))


def test_not_a_tensor() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        bn.BatchNorm1d(3)([[1.0, 2.0, 3.0]])  # type: ignore[arg-type]


def test_functional_vector_shapes() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\).*got \(4,\)"):
        F.batch_norm(x, None, None, torch.ones(4), None, True)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        F.batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="inference .* running_mean and running_var"):
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="running_mean must be floating point"):
        F.batch_norm(x, torch.zeros(3, dtype=torch.long), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="momentum must be in"):
        F.batch_norm(x, None, None, training=True, momentum=1.5)
    with pytest.raises(ValueError, match="eps must be"):
        F.batch_norm(x, None, None, training=True, eps=-1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "num_features must be a positive int"),
        ({"num_features": 3.0}, "num_features must be a positive int"),
        ({"num_features": 3, "momentum": -0.1}, "momentum must be in"),
        ({"num_features": 3, "eps": -1e-5}, "eps must be >= 0"),
        ({"num_features": 3, "backend": "cuda"}, "backend must be one of"),
    ],
)
def test_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bn.BatchNorm2d(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum": "0.1"}, "BatchNorm2d: momentum must be a real number or None, got str '0.1'"),
        ({"eps": "1e-5"}, "BatchNorm2d: eps must be a real number, got str '1e-5'"),
        ({"eps": None}, "BatchNorm2d: eps must be a real number, got NoneType None"),
    ],
)
def test_constructor_argument_types(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        bn.BatchNorm2d(3, **kwargs)


def test_nan_batch_in_module_counts_and_keeps_stats() -> None:
    layer = bn.BatchNorm2d(3)
    layer(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[2, 1, 0, 0] = float("nan")
    layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(layer.num_batches_skipped) == 1


def test_check_finite_module_raises() -> None:
    layer = bn.BatchNorm1d(3, check_finite=True)
    x = torch.randn(4, 3)
    x[0, 1] = float("inf")
    with pytest.raises(FloatingPointError):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert "check_finite=True" in repr(layer)


@pytest.mark.parametrize(
    ("buffer", "value", "match"),
    [
        ("running_mean", torch.zeros(4), r"running_mean must have shape \(3,\).*got \(4,\)"),
        ("running_var", torch.ones(2), r"running_var must have shape \(3,\).*got \(2,\)"),
        ("running_mean", torch.zeros(3, dtype=torch.long), "running_mean must be floating point"),
    ],
)
def test_bad_buffers_in_eval_are_named(buffer: str, value: torch.Tensor, match: str) -> None:
    """Eval under "auto" takes aten's kernel without the functional's checks
    (functional.eval_on_aten); a buffer it cannot take still gets the named error."""
    layer = bn.BatchNorm1d(3).eval()
    setattr(layer, buffer, value)
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=match):
        layer(torch.randn(5, 3))


@pytest.mark.parametrize("make", [
    lambda: bn.BatchNorm2d(3, eps=0.0),
    lambda: bn.GhostBatchNorm2d(3, eps=0.0, virtual_batch_size=2),
    lambda: bn.BatchRenorm2d(3, eps=0.0),
    lambda: bn.BatchNormAct2d(3, eps=0.0),
    lambda: bn.SyncBatchNorm(3, eps=0.0),
], ids=["batchnorm", "ghost", "renorm", "batch_act", "sync"])
def test_eps_zero_in_training_is_an_error_as_in_torch(make) -> None:
    """A constant channel would be NaN on some backends and a skipped update on others;
    torch refuses eps = 0 in training. Eval with running statistics is fine."""
    layer = make()
    x = torch.randn(4, 3, 5, 5)
    x[:, 0] = 3.0
    with pytest.raises(ValueError, match=r"eps must be positive in training .* got 0.0"):
        layer(x)
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_var, torch.ones(3))
    layer.eval()
    assert layer(x).isfinite().all()


def test_eps_zero_in_the_functional_training() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="batch_norm: eps must be positive in training"):
        F.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="batch_norm_act: eps must be positive in training"):
        F.batch_norm_act(x, None, None, training=True, eps=0.0)


# Errors that the functional API raises under a layer begin with the layer's name, not
# "batch_norm:" (the functional's own calls keep theirs, tested above).
_LAYER_ERRORS = [
    (lambda: bn.BatchNorm2d(3), lambda m: m(torch.randn(1, 3, 1, 1)), ValueError,
     r"^BatchNorm2d: expected more than 1 value per channel"),
    (lambda: bn.BatchNorm1d(3), lambda m: m(torch.zeros(4, 3, dtype=torch.int32)), TypeError,
     r"^BatchNorm1d: input must be a floating-point tensor"),
    (lambda: bn.BatchNorm2d(3, check_finite=True),
     lambda m: m(torch.full((2, 3, 2, 2), float("nan"))), FloatingPointError,
     r"^BatchNorm2d: the training batch .* non-finite"),
    (lambda: bn.BatchNormAct2d(3), lambda m: m(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 3)),
     ValueError, r"^BatchNormAct2d: residual must have the input's shape"),
    (lambda: bn.BatchNormAct1d(3), lambda m: m(torch.randn(1, 3)), ValueError,
     r"^BatchNormAct1d: expected more than 1 value per channel"),
    (lambda: bn.GhostBatchNorm2d(3, virtual_batch_size=4), lambda m: m(torch.randn(1, 3, 1, 1)),
     ValueError, r"^GhostBatchNorm2d: expected more than 1 value per channel"),
    (lambda: bn.FrozenBatchNorm2d(3), lambda m: m(torch.zeros(2, 3, 2, 2, dtype=torch.int64)),
     TypeError, r"^FrozenBatchNorm2d: input must be a floating-point tensor"),
    (lambda: bn.SyncBatchNorm(3), lambda m: m(torch.randn(1, 3)), ValueError,
     r"^SyncBatchNorm: expected more than 1 value per channel"),
]


@pytest.mark.parametrize(("make", "call", "error", "match"), _LAYER_ERRORS,
                         ids=[str(i) for i in range(len(_LAYER_ERRORS))])
def test_functional_errors_under_a_layer_name_the_layer(make, call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(make())


# ----------------------------------------------------------------------------------------
# a named backend that cannot run the input: the error names the layer
# ----------------------------------------------------------------------------------------
_HALF = torch.ones(7, 3, 4, 4).half()


@pytest.mark.parametrize(("make", "x", "match"), [
    (lambda: bn.BatchNorm2d(3, backend="numba"), _HALF, r"^BatchNorm2d: backend='numba' runs on float32/float64 CPU"),
    (lambda: bn.BatchNorm2d(3, backend="aten"), _HALF, r"^BatchNorm2d: backend='aten' runs on float32/float64 CPU"),
    (lambda: bn.GhostBatchNorm2d(3, backend="numba"), _HALF, r"^GhostBatchNorm2d: backend='numba' runs on"),
    (lambda: bn.BatchRenorm2d(3, backend="aten"), _HALF, r"^BatchRenorm2d: backend='aten' runs on"),
    (lambda: bn.BatchNormAct2d(3, backend="numba"), _HALF, r"^BatchNormAct2d: backend='numba' runs on"),
    (lambda: bn.BatchNorm2d(3, backend="numba").half(), torch.ones(7, 3, 4, 4),
     r"^BatchNorm2d: backend='numba' takes float32/float64 CPU weight"),
])
def test_named_backend_that_cannot_run_the_input_names_the_layer(make, x, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_the_functional_names_itself_for_a_backend_that_cannot_run() -> None:
    with pytest.raises(ValueError, match=r"^batch_norm: backend='numba' runs on float32/float64"):
        F.batch_norm(_HALF, None, None, training=True, backend="numba")


# ----------------------------------------------------------------------------------------
# the norm registry
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "error", "match"), [
    # Python's own message names the private base's __init__ (_GhostBatchNorm.__init__())
    (lambda: bn.create_norm("ghost", 8, virtual_bs=4), TypeError,
     (r"^create_norm\('ghost', dim=2\): GhostBatchNorm2d got an unexpected keyword argument "
      r"'virtual_bs'; it takes virtual_batch_size, ")),
    (lambda: bn.create_norm("frozen", 8, dim=1, momentum=0.1), TypeError,
     r"^create_norm\('frozen', dim=1\): FrozenBatchNorm1d got an unexpected keyword argument 'momentum'"),
    (lambda: bn.create_norm(bn.BatchRenorm2d, 8, rmax=2.0), TypeError,
     r"^create_norm\(BatchRenorm2d, dim=2\): BatchRenorm2d got an unexpected keyword argument 'rmax'"),
    (lambda: bn.create_norm("batch", 8, dim="2"), ValueError,
     r"^create_norm\('batch'\): dim must be 1 .*, 2 .* or 3 .*, got str '2'"),
    (lambda: bn.create_norm("batch", 8, dim=4), ValueError, r"dim must be 1 .* got int 4"),
    (lambda: bn.create_norm("batch", 8, dim=True), ValueError, r"dim must be 1 .* got bool True"),
    (lambda: bn.create_norm("group", 0), ValueError,
     r"^create_norm\('group', dim=2\): num_features must be a positive int, got 0"),
    (lambda: bn.create_norm("group", -1), ValueError, r"num_features must be a positive int, got -1"),
    (lambda: bn.create_norm("layer", 0), ValueError,
     r"^create_norm\('layer', dim=2\): num_features must be a positive int, got 0"),
    (lambda: bn.create_norm("batch", 8.0), ValueError, r"num_features must be a positive int, got 8.0"),
    (lambda: bn.create_norm(bn.BatchNorm2d(3), 8), TypeError,
     r"got the module instance BatchNorm2d\(\.\.\.\); pass its class"),
    (lambda: bn.register_norm("yy", {2: 5}), TypeError,
     r"^register_norm\('yy'\): the factory for dim 2 must be a class, a partial or a function"),
    (lambda: bn.register_norm("yy", {1: bn.BatchNorm1d, 2: bn.BatchNorm2d(3)}), TypeError,
     r"^register_norm\('yy'\): the factory for dim 2 .* got the module instance BatchNorm2d"),
])
def test_registry_arguments(call, error, match) -> None:
    from batchnorm.nn.registry import norm_names

    with pytest.raises(error, match=match):
        call()
    assert "yy" not in norm_names()  # a refused registration registers nothing


def test_registry_takes_numpy_numbers_and_factories_with_kwargs() -> None:
    np = pytest.importorskip("numpy")
    layer = bn.create_norm("batch", np.int64(8), dim=np.int64(1))
    assert isinstance(layer, bn.BatchNorm1d) and layer.num_features == 8

    def factory(num_features: int, **kwargs: object) -> torch.nn.Module:
        return bn.BatchNorm2d(num_features, **kwargs)

    assert bn.create_norm(factory, 4, momentum=0.2).momentum == 0.2
