"""Norm layers by name, so code and command lines can say ``create_norm("ghost", 64)``.

A registered *kind* maps the spatial dimensionality of the layer (1 for (N, C) or
(N, C, L), 2 for images, 3 for volumes) to a class or factory that takes the channel
count first. :func:`create_norm` accepts a registered name, a class, or a
``functools.partial`` of one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Union

from torch import nn

from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

NormFactory = Callable[..., nn.Module]
NormSpec = Union[str, type, "functools.partial[nn.Module]", NormFactory]

_REGISTRY: dict[str, dict[int, NormFactory]] = {}


def register_norm(name: str, by_dim: Mapping[int, NormFactory], *, overwrite: bool = False) -> None:
    """Register ``name`` with a factory per dimensionality (subset of {1, 2, 3})."""
    if not name or not isinstance(name, str):
        raise ValueError(f"norm name must be a non-empty str, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    bad = [d for d in by_dim if d not in (1, 2, 3)]
    if bad or not by_dim:
        raise ValueError(f"norm {name!r}: dims must be a non-empty subset of (1, 2, 3), got {list(by_dim)}")
    _REGISTRY[name] = dict(by_dim)


def norm_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_norm_layer(spec: NormSpec, dim: int = 2) -> NormFactory:
    """Resolve ``spec`` (name, class or partial) to a factory taking ``num_features`` first."""
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in _REGISTRY:
            raise ValueError(f"unknown norm {spec!r}; registered: {', '.join(norm_names())}")
        by_dim = _REGISTRY[key]
        if dim not in by_dim:
            raise ValueError(
                f"norm {spec!r} has no {dim}d form; available dims: {sorted(by_dim)}"
            )
        return by_dim[dim]
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
    """
    return get_norm_layer(spec, dim)(num_features, **kwargs)


register_norm("batch", {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d})
