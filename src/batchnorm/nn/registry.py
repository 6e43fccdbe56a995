"""Norm layers by name, so code and command lines can say ``create_norm("ghost", 64)``.

A registered *kind* maps the spatial dimensionality of the layer (1 for (N, C) or
(N, C, L), 2 for images, 3 for volumes) to a class or factory that takes the channel
count first. :func:`create_norm` accepts a registered name, a class, or a
``functools.partial`` of one.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Union

from torch import nn

from batchnorm.nn._base import check_positive_int
from batchnorm.nn.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from batchnorm.nn.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from batchnorm.nn.sync import SyncBatchNorm

NormFactory = Callable[..., nn.Module]
NormSpec = Union[str, type, "functools.partial[nn.Module]", NormFactory]

_REGISTRY: dict[str, dict[int, NormFactory]] = {}


def _key(name: str) -> str:
    # Names are looked up case-insensitively, with "-" and "_" the same.
    return name.lower().replace("-", "_")


def register_norm(name: str, by_dim: Mapping[int, NormFactory], *, overwrite: bool = False) -> None:
    """Register ``name`` with a factory per dimensionality (subset of {1, 2, 3}).

    Names are case-insensitive and "-" equals "_": ``"My-Norm"`` is stored, listed and
    found as ``"my_norm"``.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"norm name must be a non-empty str, got {name!r}")
    name = _key(name)
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    bad = [d for d in by_dim if d not in (1, 2, 3)]
    if bad or not by_dim:
        raise ValueError(f"norm {name!r}: dims must be a non-empty subset of (1, 2, 3), got {list(by_dim)}")
    for dim, factory in by_dim.items():
        # Checked here, not at the first create_norm, which may run much later.
        _check_factory(f"register_norm({name!r})", f"the factory for dim {dim}", factory)
    _REGISTRY[name] = dict(by_dim)


def _check_factory(owner: str, what: str, factory: object) -> None:
    """A factory is a class or other callable; a module instance is callable too (its
    forward), but building a layer from one would run that forward."""
    if isinstance(factory, nn.Module):
        raise TypeError(
            f"{owner}: {what} must be a class, a partial or a function that builds a layer, "
            f"got the module instance {type(factory).__name__}(...); pass its class, "
            f"{type(factory).__name__}, or functools.partial({type(factory).__name__}, ...)"
        )
    if not callable(factory):
        raise TypeError(
            f"{owner}: {what} must be a class, a partial or a function that builds a layer, "
            f"got {type(factory).__name__} {factory!r}"
        )


def _spec_text(spec: object) -> str:
    """How an error shows ``spec``: a name as written, a class or factory by its name."""
    if isinstance(spec, str):
        return repr(spec)
    func = spec.func if isinstance(spec, functools.partial) else spec
    return getattr(func, "__name__", type(func).__name__)


def _check_dim(owner: str, dim: object) -> int:
    # numbers.Integral: NumPy integers too; bool is an int but never a dimensionality.
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim not in (1, 2, 3):
        raise ValueError(
            f"{owner}: dim must be 1 (N, C) or (N, C, L), 2 (N, C, H, W) or 3 "
            f"(N, C, D, H, W), got {type(dim).__name__} {dim!r}"
        )
    return int(dim)


def _check_kwargs(owner: str, factory: NormFactory, kwargs: Mapping[str, Any]) -> None:
    """Keyword arguments the factory does not take, named against the public class or
    factory: Python's own message names the ``__init__`` that defines them, often a
    private base class (``_GhostBatchNorm.__init__()``)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (some builtins): let it raise
        return
    parameters = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    # The first positional parameter takes num_features.
    taken = [
        p.name for p in parameters[1:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [key for key in kwargs if key not in taken]
    if unknown:
        name = _spec_text(factory)
        raise TypeError(
            f"{owner}: {name} got an unexpected keyword argument {unknown[0]!r}; it takes "
            f"{', '.join(taken) if taken else 'no keyword arguments'}"
        )


def norm_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_norm_layer(spec: NormSpec, dim: int = 2) -> NormFactory:
    """Resolve ``spec`` (name, class or partial) to a factory taking ``num_features`` first."""
    dim = _check_dim(f"get_norm_layer({_spec_text(spec)})", dim)
    if isinstance(spec, str):
        key = _key(spec)
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {spec!r}; registered: {', '.join(norm_names())}")
        by_dim = _REGISTRY[key]
        if dim not in by_dim:
            raise ValueError(
                f"norm {spec!r} has no {dim}d form; available dims: {sorted(by_dim)}"
            )
        return by_dim[dim]
    if isinstance(spec, nn.Module):
        raise TypeError(
            f"norm spec must be a str, a class or a partial, got the module instance "
            f"{type(spec).__name__}(...); pass its class, {type(spec).__name__}, or "
            f"functools.partial({type(spec).__name__}, ...)"
        )
    if callable(spec):
        return spec
    raise TypeError(f"norm spec must be a str, a class or a partial, got {type(spec).__name__}")


def create_norm(spec: NormSpec, num_features: int, *, dim: int = 2, **kwargs: Any) -> nn.Module:
    """Build a norm layer: ``create_norm("batch", 64)`` or ``create_norm("batch", 100, dim=1)``.

    Args:
        spec: a registered name (see :func:`norm_names`), a class, or a partial.
        num_features: the channel count, always first.
        dim: 1 for (N, C)/(N, C, L) inputs, 2 for (N, C, H, W), 3 for (N, C, D, H, W);
            used only to pick a registered name's class.
        **kwargs: passed to the layer.

    Raises:
        ValueError: an unknown name, a dim not 1, 2 or 3 (or one the name has no form
            for), num_features not a positive int.
        TypeError: a spec that is not a name, class or partial (a module instance, say),
            a keyword argument the layer does not take.
    """
    dim = _check_dim(f"create_norm({_spec_text(spec)})", dim)
    factory = get_norm_layer(spec, dim)
    owner = f"create_norm({_spec_text(spec)}, dim={dim})"
    check_positive_int(owner, "num_features", num_features)
    _check_kwargs(owner, factory, kwargs)
    return factory(num_features, **kwargs)


register_norm("batch", {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d})
# SyncBatchNorm takes any (N, C, *) input, so one class serves every dimensionality.
register_norm("sync", {1: SyncBatchNorm, 2: SyncBatchNorm, 3: SyncBatchNorm})
register_norm("ghost", {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d})
register_norm("renorm", {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d})
register_norm("frozen", {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d})
register_norm("batch_act", {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d})


def layer_norm(
    num_features: int, eps: float = 1e-5, affine: bool = True, device: Any = None,
    dtype: Any = None,
) -> nn.Module:
    """Layer norm for (N, C, *) inputs: ``torch.nn.GroupNorm(1, C)``.

    Each example is normalized over all its values (every channel and position) with a
    per-channel γ and β. On (N, C) this is exactly ``torch.nn.LayerNorm(C)`` (layer
    norm over the channel dim); on images it is layer norm over (C, H, W) with
    per-channel affine, the form Wu & He (2018) compare with. One class serves every
    rank: ``LayerNorm(C)`` normalizes the *last* dim, so it would need a channels-last
    (N, L, C) layout for (N, C, L) inputs.
    """
    check_positive_int("layer_norm", "num_features", num_features)
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine, device=device, dtype=dtype)


def group_norm(
    num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
    device: Any = None, dtype: Any = None,
) -> nn.Module:
    """Group norm: ``torch.nn.GroupNorm(G, C)`` with G the largest divisor of C <= num_groups.

    ``num_groups=32`` is Wu & He's default; it is clipped so the groups divide the
    channels (C=100 -> 25 groups, C=48 -> 24). On (N, C) inputs a group of one channel
    holds a single value and normalizes to 0: use fewer groups there.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")
    check_positive_int("group_norm", "num_features", num_features)
    groups = max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)
    return nn.GroupNorm(groups, num_features, eps=eps, affine=affine, device=device, dtype=dtype)


# torch's layer and group norm, for comparison with the batch-norm family.
register_norm("layer", {1: layer_norm, 2: layer_norm, 3: layer_norm})
register_norm("group", {1: group_norm, 2: group_norm, 3: group_norm})
