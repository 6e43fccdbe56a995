"""Model rewriting around batch norm: convert, fold, recalibrate, freeze, drop biases.

Every function walks an arbitrary :class:`torch.nn.Module` tree and treats torch's
batch-norm layers (``torch.nn.modules.batchnorm._BatchNorm`` subclasses, SyncBatchNorm
included) and this package's alike. Layers are replaced in place in their parents; a
function returns the model (a new object only when the root itself was replaced).
Replaced layers are new modules: build optimizers after rewriting, and re-register
any hooks that were on the old layers.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn._base import _BatchNormBase
from batchnorm.nn.act import _BatchNormAct
from batchnorm.nn.batchnorm import BatchNorm1d
from batchnorm.nn.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    _FrozenBatchNorm,
)
from batchnorm.nn.ghost import _GhostBatchNorm
from batchnorm.nn.lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from batchnorm.nn.recurrent import RecurrentBatchNorm
from batchnorm.nn.registry import get_norm_layer, norm_names
from batchnorm.nn.renorm import _BatchRenorm
from batchnorm.nn.sync import (
    SyncBatchNorm,
    _all_gather_rows,
    group_and_size,
    layer_rank,
    merge_stats,
)

__all__ = [
    "Recalibrated",
    "Rewritten",
    "convert",
    "drop_redundant_bias",
    "fold",
    "freeze",
    "recalibrate",
    "unfreeze",
]


class Rewritten(NamedTuple):
    """What :func:`fold` and :func:`drop_redundant_bias` return: ``model, count = ...``."""

    model: nn.Module
    count: int


class Recalibrated(NamedTuple):
    """What :func:`recalibrate` returns: the model, layers recalibrated, batches used."""

    model: nn.Module
    layers: int
    batches: int


# ----------------------------------------------------------------------------------------
# which modules are batch norm, and of which dimensionality
# ----------------------------------------------------------------------------------------
_TORCH: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_FROZEN: dict[int, type[_FrozenBatchNorm]] = {
    1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d,
}
# The lazy layer each kind of plain batch norm has: what convert() makes of a lazy layer
# that has not seen an input yet (no other kind can be built without num_features).
_LAZY: dict[str, dict[int, type[nn.Module]]] = {
    "batchnorm": {1: LazyBatchNorm1d, 2: LazyBatchNorm2d, 3: LazyBatchNorm3d},
    "torch": {1: nn.LazyBatchNorm1d, 2: nn.LazyBatchNorm2d, 3: nn.LazyBatchNorm3d},
}
_LAZY["batch"] = _LAZY["batchnorm"]
# Kinds that convert() can build from a batch-norm layer's state; "sync" only when registered.
_KINDS = ("batchnorm", "torch", "ghost", "renorm", "frozen", "batch_act", "sync")
_ALIASES = {"batch": "batchnorm"}


# The forwards whose effect is exactly "normalize the input per channel": a subclass
# that overrides forward (timm's BatchNormAct2d adds an activation, for instance) may
# compute something else, so rewriting it as plain batch norm could change the model.
_KNOWN_FORWARDS = frozenset(
    cls.forward for cls in (
        _BatchNorm, nn.SyncBatchNorm, BatchNorm1d, _GhostBatchNorm, _BatchRenorm,
        _BatchNormAct, _FrozenBatchNorm, SyncBatchNorm,
    )
)


def _has_channel_statistics(module: nn.Module) -> bool:
    """A batch-norm layer (torch's, ours or frozen, subclasses included) with (C,) statistics.

    Layers with other statistics (per time step, ...) are not plain batch norm.
    """
    if not isinstance(module, (_BatchNorm, _BatchNormBase, _FrozenBatchNorm)):
        return False
    running_mean = getattr(module, "running_mean", None)
    if isinstance(running_mean, Tensor) and not isinstance(
        running_mean, nn.parameter.UninitializedBuffer
    ):
        return tuple(running_mean.shape) == (module.num_features,)
    return True


def _is_batch_norm(module: nn.Module) -> bool:
    """A per-channel batch-norm layer whose forward is one of the known ones.

    These are the layers that convert, freeze and fold rewrite.
    """
    return _has_channel_statistics(module) and type(module).forward in _KNOWN_FORWARDS


def _left_alone(model: nn.Module, select: Callable[[nn.Module], bool]) -> list[str]:
    """Batch-norm-like layers of ``model`` that ``select`` does not take, with the reason."""
    notes = []
    for name, m in model.named_modules():
        if select(m):
            continue
        if isinstance(m, RecurrentBatchNorm):
            notes.append(f"{name or '<root>'} ({type(m).__name__}: per-time-step statistics)")
        elif _has_channel_statistics(m) and not _is_batch_norm(m):
            notes.append(
                f"{name or '<root>'} ({type(m).__name__}: a batch-norm subclass with its own "
                "forward, which the new layer would not reproduce)"
            )
    return notes


def _is_uninitialized(module: nn.Module) -> bool:
    """A lazy layer that has not seen an input (nor a state_dict) yet."""
    return any(
        nn.parameter.is_lazy(t)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    )


def _check_initialized(module: nn.Module, name: str, what: str | None = None) -> None:
    """A clear error for a lazy layer without its shapes; ``what``: the tool called, for
    tools that need the layer's statistics (else the rewriting tools' message)."""
    if not _is_uninitialized(module):
        return
    layer = f"{name or 'model'} ({type(module).__name__}) is a lazy layer that has not seen an input yet"
    if what is not None:
        raise ValueError(f"{what}: {layer}; run one forward pass first, so it has its statistics")
    raise ValueError(
        f"{layer}; run one forward pass before rewriting the model (convert "
        f"to {', '.join(repr(k) for k in _LAZY)} makes it the lazy layer of that kind)"
    )


def _build_lazy(
    old: nn.Module, kind: str, dim: int, kwargs: dict[str, Any], name: str, what: str
) -> nn.Module:
    """The lazy layer of ``kind`` (plain batch norm) with ``old``'s settings and mode;
    ``old`` is itself lazy and uninitialized, so there is no state to copy but the
    counters."""
    config: dict[str, Any] = {
        "eps": old.eps, "momentum": old.momentum, "affine": old.affine,
        "track_running_stats": old.track_running_stats,
    }
    if old.affine and getattr(old, "bias", None) is None:
        config["bias"] = False
    cls = _LAZY[kind][dim]
    if isinstance(old, _BatchNormBase) and issubclass(cls, _BatchNormBase):
        config.update(backend=old.backend, check_finite=old.check_finite)
    try:
        new = cls(**{**_factory_of(old), **config, **kwargs})
    except TypeError as e:
        where = name or "the model's root"
        raise TypeError(f"{what}: cannot build a {kind!r} layer for {where}: {e}") from e
    _copy_state(old, new)  # the counters: the uninitialized tensors are skipped
    new.train(old.training)
    return new


# ----------------------------------------------------------------------------------------
# convert, freeze, unfreeze
# ----------------------------------------------------------------------------------------
def _valid_kinds() -> list[str]:
    registered = set(norm_names())
    return [k for k in _KINDS if k in ("batchnorm", "torch", "frozen") or k in registered]


def _target_class(kind: str, dim: int) -> Callable[..., nn.Module]:
    if kind == "torch":
        return _TORCH[dim]
    if kind == "frozen":
        return _FROZEN[dim]
    return get_norm_layer("batch" if kind == "batchnorm" else kind, dim)


def _family_kwargs(old: nn.Module, cls: Any) -> dict[str, Any]:
    """Settings a layer carries over to a layer of the same family (ghost to ghost, ...)."""
    if not isinstance(cls, type):
        return {}
    if isinstance(old, _GhostBatchNorm) and issubclass(cls, _GhostBatchNorm):
        return {"virtual_batch_size": old.virtual_batch_size}
    if isinstance(old, _BatchRenorm) and issubclass(cls, _BatchRenorm):
        return {"r_max": old.r_max, "d_max": old.d_max}
    if isinstance(old, _BatchNormAct) and issubclass(cls, _BatchNormAct):
        return {"activation": old.activation, "negative_slope": old.negative_slope}
    group = getattr(old, "process_group", None)
    if group is not None and issubclass(cls, (nn.SyncBatchNorm, SyncBatchNorm)):
        return {"process_group": group}
    return {}


def _factory_of(old: nn.Module) -> dict[str, Any]:
    """Device and dtype of a layer's floating-point state."""
    for t in [*old.parameters(recurse=False), *old.buffers(recurse=False)]:
        if t is not None and t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _build(
    old: nn.Module, kind: str, dim: int, kwargs: dict[str, Any], name: str, what: str = "convert"
) -> nn.Module:
    """A new layer of ``kind`` with ``old``'s configuration, state and mode; errors name
    ``what`` (the public tool called)."""
    if kind in _LAZY and _is_uninitialized(old):
        return _build_lazy(old, kind, dim, kwargs, name, what)
    _check_initialized(old, name)
    where = name or "the model's root"
    cls = _target_class(kind, dim)
    target_has_act = isinstance(cls, type) and issubclass(cls, _BatchNormAct)
    if isinstance(old, _BatchNormAct) and old.activation != "identity" and not target_has_act:
        raise ValueError(
            f"{what}: {where} is {type(old).__name__} with activation={old.activation!r}; "
            f"a {kind!r} layer has no activation, so converting it would change the model "
            "(convert to 'batch_act', or build the model with a separate activation)"
        )
    factory = _factory_of(old)
    frozen_source = isinstance(old, _FrozenBatchNorm)
    if kind == "frozen":
        if not frozen_source and getattr(old, "running_mean", None) is None:
            raise ValueError(
                f"{what}: {where} ({type(old).__name__}) keeps no running statistics "
                "(track_running_stats=False), so it has no fixed form to freeze"
            )
        config: dict[str, Any] = {"eps": old.eps}
    else:
        config = {"eps": old.eps}
        if not frozen_source:
            config.update(_trainable_config(old, cls))
        if kind == "batch_act":
            # A plain BN becomes BN + identity: the model computes the same function.
            config["activation"] = "identity"
        config.update(_family_kwargs(old, cls))
    # What the caller passes wins over what is carried over, device and dtype included.
    config = {**factory, **config, **kwargs}
    try:
        new: nn.Module = cls(old.num_features, **config)
    except TypeError as e:
        raise TypeError(f"convert: cannot build a {kind!r} layer for {where}: {e}") from e
    _copy_state(old, new)
    if kind == "frozen" and not frozen_source:
        new._thawed = _Thawed.of(old)  # so that unfreeze can give the layer back
    _carry_rank_and_mode(old, new)
    return new


def _carry_rank_and_mode(old: nn.Module, new: nn.Module) -> None:
    """``new`` (built to replace ``old``) gets ``old``'s train/eval mode and, when it has
    no rank of its own (SyncBatchNorm), the rank of ``old``, so that a later convert
    back knows it."""
    source = layer_rank(old)
    if layer_rank(new) is None and source is not None:
        new._source_dim = source
    new.train(old.training)


def _trainable_config(old: nn.Module, cls: Any) -> dict[str, Any]:
    """The settings of a trainable layer that a trainable layer of class ``cls`` takes."""
    config: dict[str, Any] = {
        "momentum": old.momentum, "affine": old.affine,
        "track_running_stats": old.track_running_stats,
    }
    if old.affine and getattr(old, "bias", None) is None:
        config["bias"] = False
    if isinstance(old, _BatchNormBase) and isinstance(cls, type) and issubclass(cls, _BatchNormBase):
        config.update(backend=old.backend, check_finite=old.check_finite)
    return config


class _Thawed(NamedTuple):
    """What :func:`freeze` keeps on a frozen layer of the trainable layer it replaced, so
    that :func:`unfreeze` builds that layer again: its class, its settings (eps aside,
    which the frozen layer has), its parameters' ``requires_grad`` and its counter."""

    cls: type[nn.Module]
    config: dict[str, Any]
    requires_grad: dict[str, bool]
    num_batches_tracked: int | None

    @staticmethod
    def of(old: nn.Module) -> _Thawed:
        cls = type(old)
        config = {**_trainable_config(old, cls), **_family_kwargs(old, cls)}
        # A process group is a live handle of this run, not a setting to keep.
        config.pop("process_group", None)
        flags = {
            key: p.requires_grad for key in ("weight", "bias")
            if isinstance(p := getattr(old, key, None), nn.Parameter)
        }
        tracked = getattr(old, "num_batches_tracked", None)
        return _Thawed(cls, config, flags, None if tracked is None else int(tracked))


def _thaw(old: _FrozenBatchNorm, record: _Thawed, name: str) -> nn.Module:
    """The layer ``record`` describes, with the frozen layer's state and mode."""
    try:
        new = record.cls(old.num_features, eps=old.eps, **_factory_of(old), **record.config)
    except TypeError as e:
        where = name or "the model's root"
        raise TypeError(f"unfreeze: cannot rebuild {record.cls.__name__} for {where}: {e}") from e
    _copy_state(old, new)
    with torch.no_grad():
        for key, flag in record.requires_grad.items():
            getattr(new, key).requires_grad_(flag)
        tracked = getattr(new, "num_batches_tracked", None)
        if isinstance(tracked, Tensor) and record.num_batches_tracked is not None:
            tracked.fill_(record.num_batches_tracked)
    _carry_rank_and_mode(old, new)
    return new


def _copy_state(old: nn.Module, new: nn.Module) -> None:
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                    "num_batches_skipped"):
            src, dst = getattr(old, key, None), getattr(new, key, None)
            if (
                isinstance(src, Tensor) and dst is None and key in new._buffers
                and not nn.parameter.is_lazy(src)
            ):
                # Statistics kept with track_running_stats switched off after training
                # (to stop updating them): eval still normalizes with them, as torch's
                # layers do, so the new layer keeps them too.
                setattr(new, key, src.detach().clone())
                continue
            if isinstance(src, Tensor) and isinstance(dst, Tensor) and not (
                nn.parameter.is_lazy(src) or nn.parameter.is_lazy(dst)
            ):
                dst.copy_(src)
                if isinstance(dst, nn.Parameter) and isinstance(src, nn.Parameter):
                    dst.requires_grad_(src.requires_grad)


def _replace(
    model: nn.Module,
    select: Callable[[nn.Module], bool],
    build: Callable[[nn.Module, str], nn.Module],
) -> nn.Module:
    """Replace every selected module (root included) by ``build(old, qualified_name)``.

    All replacements are built before the first is put in, so a layer that cannot be
    built leaves the model as it was. A module shared by several parents is built
    once and stays shared.
    """
    if select(model):
        return build(model, "")
    built: dict[int, nn.Module] = {}
    slots: list[tuple[nn.Module, str, nn.Module]] = []
    visited: set[int] = set()

    def walk(parent: nn.Module, prefix: str) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        # _modules, not named_children(): the latter yields a shared child only once.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{prefix}{child_name}"
            if select(child):
                if id(child) not in built:
                    built[id(child)] = build(child, name)
                slots.append((parent, child_name, child))
            else:
                walk(child, name + ".")

    walk(model, "")
    for parent, child_name, child in slots:
        parent.add_module(child_name, built[id(child)])
    return model


def _warn_left_alone(model: nn.Module, what: str, select: Callable[[nn.Module], bool]) -> None:
    notes = _left_alone(model, select)
    if notes:
        warnings.warn(
            f"{what}: left {len(notes)} layer(s) as they were: " + "; ".join(notes[:5])
            + ("; ..." if len(notes) > 5 else ""),
            stacklevel=3,
        )


def convert(model: nn.Module, to: str, *, default_dim: int = 2, **kwargs: Any) -> nn.Module:
    """Replace every batch-norm layer of ``model`` with one of kind ``to``.

    Kinds: ``"batchnorm"`` (this package's BatchNormXd), ``"torch"``
    (torch.nn.BatchNormXd), ``"ghost"``, ``"renorm"``, ``"frozen"``, ``"batch_act"``
    and ``"sync"`` (when registered). Each new layer gets the old one's configuration
    (eps, momentum, affine, bias, track_running_stats; backend and check_finite
    between this package's layers; virtual_batch_size, r_max/d_max, activation within
    a family), its parameters, buffers and counters, ``requires_grad`` flags,
    train/eval mode, device and dtype. ``kwargs`` go to the new layers' constructors
    and override what is carried over (``convert(m, "ghost", virtual_batch_size=16)``,
    ``dtype=torch.float64``).

    * ``"batch_act"`` from a plain layer uses ``activation="identity"`` unless told
      otherwise, so the model computes the same function.
    * A BatchNormAct layer with an activation cannot become a kind without one
      (that would drop the activation): ValueError.
    * ``"frozen"`` needs running statistics; a frozen source gives layers with
      ``momentum=0.1``, affine, tracking statistics, ``num_batches_tracked = 0``.
    * Rank-agnostic layers (SyncBatchNorm) become the form of the rank they were
      converted from (``convert`` and ``SyncBatchNorm.convert_sync_batchnorm``
      remember it), else the ``default_dim`` form.
    * Layers that are not plain batch norm are left as they are, with a warning
      naming them: :class:`~batchnorm.RecurrentBatchNorm` (per-step statistics) and
      subclasses of the batch-norm classes that override ``forward``.

    Every new layer is built before any is put in, so when one cannot be converted
    the error leaves the model unchanged. Converting torch -> ours -> torch gives back
    identical state: the state_dict keys are the same. Returns the model (the new
    layer when the root itself is a batch norm); children are replaced in place.

    Raises:
        ValueError: unknown kind (the message lists the valid ones), bad
            ``default_dim``, a layer that cannot be converted (see above).
        TypeError: a keyword argument that the new layers do not take.
    """
    kind = _ALIASES.get(to, to) if isinstance(to, str) else to
    valid = _valid_kinds()
    if kind not in valid:
        raise ValueError(f"convert: unknown kind {to!r}; valid kinds: {', '.join(valid)}")
    return _convert(model, kind, default_dim, kwargs, "convert")


def _convert(
    model: nn.Module, kind: str, default_dim: int, kwargs: dict[str, Any], what: str
) -> nn.Module:
    if default_dim not in (1, 2, 3):
        raise ValueError(f"{what}: default_dim must be 1, 2 or 3, got {default_dim!r}")

    def build(old: nn.Module, name: str) -> nn.Module:
        dim = layer_rank(old) or default_dim
        return _build(old, kind, dim, kwargs, name, what)

    cls = _target_class(kind, default_dim)
    if not (isinstance(cls, type) and issubclass(cls, _BatchNormAct)):
        _check_no_residual(model, what, kind)
    _warn_left_alone(model, what, _is_batch_norm)
    return _replace(model, _is_batch_norm, build)


def _check_no_residual(model: nn.Module, what: str, kind: str) -> None:
    """ValueError if the model calls a BatchNormAct layer with a residual, which a layer
    of ``kind`` (no residual input) could not take. Seen in the model's fx graph; a
    model fx cannot trace is not checked here, and the new layer then raises TypeError
    at its first call with a residual."""
    if not any(isinstance(m, _BatchNormAct) for m in model.modules()):
        return
    submodules = dict(model.named_modules())
    for graph in _traces_or_none(model) or []:
        for node in graph.nodes:
            if node.op != "call_module" or not isinstance(submodules[node.target], _BatchNormAct):
                continue
            if len(node.args) > 1 or set(node.kwargs) - {"input"}:
                raise ValueError(
                    f"{what}: {node.target} ({type(submodules[node.target]).__name__}) is "
                    f"called with a residual, which a {kind!r} layer does not take, so "
                    "converting it would change the model (convert to 'batch_act', or add "
                    "the residual outside the layer)"
                )


def freeze(model: nn.Module, *, default_dim: int = 2) -> nn.Module:
    """Replace every batch-norm layer with a :class:`FrozenBatchNorm2d` (1d/3d by rank).

    For fine-tuning: the statistics and the affine parameters stop changing and stop
    being parameters. Same as ``convert(model, "frozen", default_dim=default_dim)``
    (``default_dim``: the rank for SyncBatchNorm layers whose source rank is unknown).
    Layers with no frozen form (RecurrentBatchNorm, subclasses that override
    ``forward``) are left as they are, with a warning naming them. A layer that cannot
    be frozen without changing the model raises ValueError, and the model is left
    unchanged: one without running statistics (``track_running_stats=False``), or a
    BatchNormAct layer with an activation (the frozen layer has none).
    """
    return _convert(model, "frozen", default_dim, {}, "freeze")


def unfreeze(model: nn.Module, *, default_dim: int = 2) -> nn.Module:
    """Replace every frozen layer with a trainable one, with the frozen weight, bias and
    statistics and the frozen layer's train/eval mode.

    A layer that :func:`freeze` (or ``convert(..., "frozen")``) made becomes the layer it
    replaced again: the same class (torch's, this package's, Ghost, Renorm, ...), the
    same settings (momentum, affine, bias, track_running_stats, backend, the family's
    own), ``requires_grad`` flags and ``num_batches_tracked`` (which ``momentum=None``
    averages by). ``unfreeze(freeze(m))`` is ``m`` with the statistics and affine of the
    frozen layers. A frozen layer built or loaded as such becomes this package's
    :class:`BatchNorm2d` (1d/3d) with ``momentum=0.1`` and ``num_batches_tracked = 0``;
    ``default_dim`` is the rank for one of no fixed rank. The record of the source
    layer is kept on the frozen module (through ``copy.deepcopy`` and pickling), not in
    its state_dict.
    """
    if default_dim not in (1, 2, 3):
        raise ValueError(f"unfreeze: default_dim must be 1, 2 or 3, got {default_dim!r}")

    def build(old: nn.Module, name: str) -> nn.Module:
        record = getattr(old, "_thawed", None)
        if isinstance(record, _Thawed):
            return _thaw(old, record, name)
        return _build(old, "batchnorm", layer_rank(old) or default_dim, {}, name, "unfreeze")

    return _replace(model, lambda m: isinstance(m, _FrozenBatchNorm), build)


# ----------------------------------------------------------------------------------------
# finding "producer -> batch norm" pairs
# ----------------------------------------------------------------------------------------
_PRODUCERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear,
)


def _is_producer(module: nn.Module) -> bool:
    # Exact types: a subclass may change forward (weight standardization, LoRA, ...),
    # and then scaling its weight would not scale its output.
    return type(module) in _PRODUCERS


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


class _LeafTracer(torch.fx.Tracer):
    """symbolic_trace's tracer, but batch-norm layers and producers are never traced into,
    nor (with ``children_as_leaves``) the traced module's direct children."""

    def __init__(self, children_as_leaves: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.children_as_leaves = children_as_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            _has_channel_statistics(m) or _is_producer(m)
            or module_qualified_name in self.children_as_leaves
            or super().is_leaf_module(m, module_qualified_name)
        )


def _traces(module: nn.Module, children_as_leaves: bool = False) -> list[torch.fx.Graph]:
    """The fx graphs of ``module.forward``: every argument symbolic, and, when forward has
    optional arguments, once more with those at their defaults.

    Under tracing an optional argument is a Proxy, so ``if skip is None: skip = y``
    takes the branch a real call with the default would not; a pair counts only if it
    is a pair in both graphs. With ``children_as_leaves`` the direct children are not
    traced into (a child fx cannot trace then does not stop the trace).
    """
    leaves = frozenset(module._modules) if children_as_leaves else frozenset()
    graphs = [_LeafTracer(leaves).trace(module)]
    defaults = {
        name: p.default for name, p in inspect.signature(module.forward).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    if defaults:
        graphs.append(_LeafTracer(leaves).trace(module, concrete_args=defaults))
    return graphs


def _graph_pairs(module: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """(producer, bn) targets in one graph where the bn's only input is the producer's
    output, nothing else reads that output, each is called once, and the graph reads
    neither module's tensors directly (``F.conv2d(x, self.conv.weight)`` elsewhere)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    submodules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batch_norm(submodules[node.target]):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue  # e.g. BatchNormAct called with a residual
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if not _is_producer(submodules[src.target]) or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue  # a module applied twice would be changed for both uses
        if src.target in read or node.target in read:
            continue
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _traces_or_none(
    module: nn.Module, children_as_leaves: bool = False
) -> list[torch.fx.Graph] | None:
    """_traces, or None where fx cannot trace the module."""
    try:
        return _traces(module, children_as_leaves)
    except Exception:  # noqa: BLE001 - fx raises many kinds of errors for untraceable code
        return None


def _common_pairs(module: nn.Module, graphs: list[torch.fx.Graph]) -> list[tuple[str, str]]:
    common = set.intersection(*(set(_graph_pairs(module, g)) for g in graphs))
    return [pair for pair in _graph_pairs(module, graphs[0]) if pair in common]


# The names through which a method reaches a module's children without naming one.
_CHILD_ACCESSORS = frozenset({
    "_modules", "__dict__", "children", "named_children", "modules", "named_modules",
    "get_submodule", "apply", "__getattr__", "__getitem__", "__iter__",
})


def _whole_called_children(module: nn.Module) -> set[str]:
    """The children that every method of ``module``'s classes uses only as ``self.child(...)``.

    For a module whose forward fx cannot trace, its source is the only account of how
    it uses its children: a child also reached another way (``for m in self.body``,
    ``self.body[0](x)``, kept in a list, handed to a function) may have its
    intermediate outputs read, so no pair inside it is safe. ``self`` itself used
    other than through an attribute (``getattr(self, name)``, ``f(self)``), or source
    that cannot be read, makes every child unsafe.
    """
    names = set(module._modules)
    safe = set(names)
    for cls in type(module).__mro__:
        if cls in (nn.Module, object):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            return set()
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            arguments = function.args.posonlyargs + function.args.args
            if not arguments:
                continue
            me = arguments[0].arg
            for node in ast.walk(function):
                if not (isinstance(node, ast.Name) and node.id == me) or node is arguments[0]:
                    continue
                use = parents.get(node)
                if not isinstance(use, ast.Attribute):
                    return set()  # self passed on or iterated: any child may be reached
                if use.attr in _CHILD_ACCESSORS:
                    return set()
                if use.attr in names and isinstance(use.ctx, ast.Load) and not (
                    isinstance(parents.get(use), ast.Call) and parents[use].func is use
                ):
                    safe.discard(use.attr)
    return safe


def _traced_pairs(
    module: nn.Module, prefix: str, untraced: list[str]
) -> list[tuple[str, str]]:
    """(producer, bn) qualified names found in the module's fx graphs (see _graph_pairs).

    When fx cannot trace the module, the search goes by what is known of how it uses
    its children, and only into children it calls as a whole (whose inside no one else
    reads):

    1. Traced with its children as leaves (a child fx cannot trace stopped the trace):
       the graph gives the pairs among the children, and shows which children are only
       called (nothing inside one is called or read directly).
    2. An nn.Sequential: the order of the children is the data flow, so consecutive
       children pair up, and each child is called as a whole.
    3. Otherwise (its own forward has data-dependent control flow, say), the children
       that its source only ever calls (see _whole_called_children).

    The qualified names of modules left unsearched because of that go to ``untraced``.
    """
    graphs = _traces_or_none(module)
    if graphs is not None:
        return [(prefix + p, prefix + b) for p, b in _common_pairs(module, graphs)]
    pairs: list[tuple[str, str]] = []
    children = dict(module.named_children())
    graphs = _traces_or_none(module, children_as_leaves=True)
    if graphs is not None:
        pairs += [(prefix + p, prefix + b) for p, b in _common_pairs(module, graphs)]
        # A child is used whole when no node calls or reads anything inside it.
        reached_inside = {
            str(n.target).partition(".")[0] for g in graphs for n in g.nodes
            if n.op in ("call_module", "get_attr") and "." in str(n.target)
        }
        whole = set(children) - reached_inside
    elif type(module).forward is nn.Sequential.forward:
        for (n1, a), (n2, b) in itertools.pairwise(children.items()):
            if _is_producer(a) and _is_batch_norm(b):
                pairs.append((prefix + n1, prefix + n2))
        whole = set(children)
    else:
        whole = _whole_called_children(module)
    for name, child in children.items():
        if name in whole:
            pairs += _traced_pairs(child, f"{prefix}{name}.", untraced)
        elif any(_is_batch_norm(m) for m in child.modules()):
            untraced.append(f"{prefix}{name}")
    return pairs


def _require_rows(module: nn.Module, args: tuple[Tensor]) -> None:
    """Forward pre-hook on a Linear that fold or drop_redundant_bias rewrote together
    with the batch norm after it.

    The rewrite holds for (N, features) inputs only: on (N, L, features) the Linear acts
    on the last dim, a BatchNorm1d on dim 1, and the folded scale (or the dropped bias)
    is wrong. Which ranks a model feeds cannot be seen without running it, so the
    rewritten Linear checks each call. A plain function of the input tuple, so that
    torch.jit.script compiles it with the model.
    """
    if len(args) > 0 and args[0].dim() != 2:  # no args: called as linear(input=x)
        raise ValueError(
            "Linear: fold or drop_redundant_bias rewrote it together with the batch norm "
            "after it, which holds for (N, features) inputs only, but got input of shape "
            + str(list(args[0].shape)) + "; rewrite a copy of the model from before with "
            "the batch norm kept (or reshape to 2-d around the pair)"
        )


def _guard_rows(producer: nn.Module) -> None:
    if isinstance(producer, nn.Linear) and _require_rows not in producer._forward_pre_hooks.values():
        producer.register_forward_pre_hook(_require_rows)


def _has_hooks(module: nn.Module) -> bool:
    # A forward pre-hook may recompute the weight (torch.nn.utils.weight_norm,
    # spectral_norm), undoing a fold; a forward hook may change the output. The rank
    # guard of an earlier fold or drop_redundant_bias changes nothing.
    pre = [h for h in module._forward_pre_hooks.values() if h is not _require_rows]
    return bool(pre or module._forward_hooks)


def _warn_untraced(untraced: list[str], what: str) -> None:
    if untraced:
        shown = ", ".join(untraced[:5]) + (", ..." if len(untraced) > 5 else "")
        warnings.warn(
            f"{what}: left the batch norms in {shown} alone: fx cannot trace the module "
            "that holds each, and that module reaches it other than by calling it whole "
            "(iterating over it, indexing it, ...), so a rewrite there could change what "
            f"it reads; call {what} on a part it calls whole (it rewrites in place)",
            stacklevel=4  # the caller of fold / drop_redundant_bias,
        )


def _feeding_pairs(
    model: nn.Module, what: str
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """Every producer -> batch-norm pair of the model that can be rewritten on its own.

    Each module is used exactly once, has no forward hooks, and the producer's
    parameters belong to it alone (a tied weight would change the other user too).
    A Linear pairs only with a 1-d (or rank-agnostic) batch norm. Parts of the model
    that could not be searched are named in a warning from ``what``.
    """
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    found: list[tuple[str, nn.Module, str, nn.Module]] = []
    seen: set[str] = set()
    untraced: list[str] = []
    pairs = _traced_pairs(model, "", untraced)
    _warn_untraced(untraced, what)
    for producer_name, bn_name in pairs:
        if bn_name in seen:
            continue
        seen.add(bn_name)
        producer = model.get_submodule(producer_name)
        layer = model.get_submodule(bn_name)
        if occurrences[id(producer)] != 1 or occurrences[id(layer)] != 1:
            continue
        if _has_hooks(producer) or _has_hooks(layer):
            continue
        if any(owners[id(p)] != 1 for p in producer.parameters(recurse=False)):
            continue
        if isinstance(producer, nn.Linear) and layer_rank(layer) not in (1, None):
            continue  # Linear's features are the last dim, a 2-d/3-d BN's channels dim 1
        if _out_channels(producer) != layer.num_features:
            continue
        found.append((producer_name, producer, bn_name, layer))
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent.add_module(child, module)


# ----------------------------------------------------------------------------------------
# fold
# ----------------------------------------------------------------------------------------
def _eval_affine(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """The float64 ``(scale, shift)`` of a layer's eval-mode map, or None if it has none."""
    if layer.running_mean is None or layer.running_var is None:
        return None  # normalizes with batch statistics even in eval mode
    c = layer.num_features
    device = layer.running_mean.device
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    w = torch.ones(c, dtype=torch.float64, device=device) if weight is None else weight.double()
    b = torch.zeros(c, dtype=torch.float64, device=device) if bias is None else bias.double()
    scale = w / torch.sqrt(layer.running_var.double() + layer.eps)
    return scale, b - layer.running_mean.double() * scale


def _scale_output_channels(producer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """weight <- weight·scale per output channel, bias <- bias·scale + shift."""
    weight = producer.weight
    w = weight.detach().double()
    k = w.dim() - 2
    if isinstance(producer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # weight is (in, out/groups, *kernel): output channel g·(out/groups) + j is
        # column j of group g's block of rows.
        groups = producer.groups
        blocks = w.reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        folded = blocks * scale.reshape(groups, 1, w.shape[1], *([1] * k))
        folded = folded.reshape(w.shape)
    else:
        # Conv (out, in/groups, *kernel) and Linear (out, in): output channels are rows.
        folded = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    old_bias = producer.bias
    b = torch.zeros_like(scale) if old_bias is None else old_bias.detach().double()
    new_bias = b * scale + shift
    with torch.no_grad():
        weight.copy_(folded.to(weight.dtype))
        if old_bias is None:
            producer.bias = nn.Parameter(
                new_bias.to(weight.dtype), requires_grad=weight.requires_grad
            )
        else:
            old_bias.copy_(new_bias.to(old_bias.dtype))


def fold(model: nn.Module) -> Rewritten:
    """Merge each eval-mode batch norm into the Conv/ConvTranspose/Linear that feeds it.

    In eval mode a batch-norm layer is a fixed affine map per channel,
    ``y = x·s + t`` with ``s = γ/sqrt(running_var + ε)`` and ``t = β − running_mean·s``,
    so the producer can absorb it:

        W' = W·s (per output channel),   b' = (b − μ)·s + β = b·s + t

    (a bias is created when the producer has none). The batch norm is replaced by
    ``nn.Identity`` — or by its activation for a BatchNormAct layer. The arithmetic is
    float64, rounded once to the weight's dtype.

    Pairs are found in the model's torch.fx graph (Conv1d/2d/3d, ConvTranspose1d/2d/3d
    and Linear — exact types — whose output has the batch norm as its only user). Where
    fx cannot trace a module, the search goes only into the children it is known to
    call whole: those its graph with the children kept opaque shows only called, every
    child of an nn.Sequential (whose consecutive children pair up), or else those its
    source only ever calls as ``self.child(...)``; the batch norms in the other
    children are left alone, with a warning naming them. Left alone, since folding them could change the model: layers used more than
    once; producers whose parameters are shared with another module or read directly
    elsewhere in the forward; modules with forward hooks (``weight_norm`` and
    ``spectral_norm`` recompute the weight in one); layers without running
    statistics; batch norms called with a residual; batch-norm subclasses that
    override ``forward``. A Linear pairs only with a 1-d (or rank-agnostic) batch
    norm, and the pair holds only for (N, features) activations, whose dim 1 is the
    batch norm's channel dim: the folded Linear gets a forward pre-hook that raises
    ValueError on an input of another rank, where the fold would be wrong.
    A forward with optional arguments is traced with them symbolic and at their
    defaults, and only pairs found in both count.

    The model is changed in place (``fold(copy.deepcopy(model))`` keeps the original).

    Returns:
        ``Rewritten(model, count)``: the model and the number of layers folded.

    Raises:
        ValueError: the model, or a module in it, is in training mode.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (", ..." if len(training) > 5 else "")
        raise ValueError(
            f"fold: the model must be in eval mode (folding uses the running statistics), "
            f"but {len(training)} module(s) are in training mode: {shown}; call model.eval()"
        )
    for name, m in model.named_modules():
        _check_initialized(m, name)
    count = 0
    for producer_name, producer, bn_name, layer in _feeding_pairs(model, "fold"):
        affine = _eval_affine(layer)
        if affine is None:
            continue
        _scale_output_channels(producer, *affine)
        _guard_rows(producer)
        rest = layer.activation_module() if isinstance(layer, _BatchNormAct) else nn.Identity()
        _set_submodule(model, bn_name, rest.train(False))
        count += 1
    return Rewritten(model, count)


# ----------------------------------------------------------------------------------------
# drop_redundant_bias
# ----------------------------------------------------------------------------------------
def drop_redundant_bias(model: nn.Module) -> Rewritten:
    """Remove the bias of each Conv/ConvTranspose/Linear that directly feeds a batch norm.

    With batch statistics the mean subtraction cancels a per-channel bias exactly
    (Ioffe & Szegedy 2015, section 3.2), so the bias is a wasted parameter. The running
    mean estimated the mean of the biased output, so it is shifted by the bias
    (``running_mean -= bias``): eval-mode outputs stay the same, and the estimate stays
    consistent with the unbiased outputs training will now produce. Batch renorm's d
    and ghost batch norm's chunks are unchanged by the shift too. The pairs are those
    :func:`fold` finds; the model can be in either mode and is changed in place. As
    there, a Linear whose bias was removed gets a forward pre-hook that raises
    ValueError on an input that is not (N, features), where the bias was not redundant.

    Returns:
        ``Rewritten(model, count)``: the number of biases removed.
    """
    for name, m in model.named_modules():
        _check_initialized(m, name)
    count = 0
    for producer_name, producer, _, layer in _feeding_pairs(model, "drop_redundant_bias"):
        bias = producer.bias
        if bias is None:
            continue
        with torch.no_grad():
            if layer.running_mean is not None:
                layer.running_mean.sub_(bias.detach().to(layer.running_mean.dtype))
        producer.bias = None
        _guard_rows(producer)
        count += 1
    return Rewritten(model, count)


# ----------------------------------------------------------------------------------------
# recalibrate
# ----------------------------------------------------------------------------------------
class _Accumulator:
    """Count, mean and M2 = Σ(x − mean)² per channel, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    @staticmethod
    def stats_of(x: Tensor) -> tuple[int, Tensor, Tensor] | None:
        """(n, mean, M2) per channel (dim 1) of one input, in float64; None if empty."""
        c = x.shape[1]
        n = x.numel() // c if c else 0
        if n == 0:
            return None
        xs = x.detach().double()
        dims = [0, *range(2, x.dim())]
        mean = xs.mean(dim=dims)
        m2 = (xs - mean.reshape(1, c, *([1] * (x.dim() - 2)))).square().sum(dim=dims)
        return n, mean, m2

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if n == 0:
            return
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        # Chan, Golub & LeVeque's pairwise merge: exact, no E[x²] − E[x]² cancellation.
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def merge_ranks(self, group: Any, world_size: int, channels: int, device: Any) -> None:
        """Replace the statistics by those of every rank's together (Chan's K-way merge)."""
        local = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=device)
        if self.mean is not None and self.m2 is not None:
            local[0] = self.count
            local[1:1 + channels] = self.mean
            local[1 + channels:] = self.m2
        rows = _all_gather_rows(local, group, world_size)
        n, mean, m2 = merge_stats(rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:])
        total = int(n.item())
        self.count, self.mean, self.m2 = (total, mean, m2) if total else (0, None, None)


class _TooFewValues(Exception):
    """A batch in which a layer would normalize a single value per channel."""


def _inputs(
    batches: Iterable[Any], num_batches: int | None
) -> Iterator[tuple[tuple[Tensor, ...], dict[str, Any]]]:
    """Each batch as the model's call arguments: a tensor, or the first item of a
    tuple/list (input, target, ...), positionally; a mapping as keyword arguments."""
    # islice stops before fetching batch num_batches + 1: the caller's iterator keeps it.
    for i, batch in enumerate(itertools.islice(batches, num_batches)):
        if isinstance(batch, Mapping):
            yield (), dict(batch)
            continue
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise TypeError(
                f"recalibrate: batch {i} must be a tensor, an (input, target) tuple or a "
                f"mapping of keyword arguments, got {type(batch).__name__}"
                + (f" of {type(x).__name__}" if x is not batch else "")
            )
        yield (x,), {}


def _to_device(value: Any, device: Any) -> Any:
    return value.to(device) if isinstance(value, Tensor) and device is not None else value


def recalibrate(
    model: nn.Module, batches: Iterable[Any], num_batches: int | None = None
) -> Recalibrated:
    """Recompute every batch norm's running statistics as population statistics ("precise BN").

    The running averages of training mix statistics from many past versions of the
    weights. Here each batch-norm layer's running mean and variance are replaced by the
    exact statistics of its inputs over ``batches``: with n_b values per channel in
    batch b (mean μ_b, sum of squared deviations M2_b), merged pairwise in float64,

        n = Σ n_b,   running_mean = μ = Σ n_b μ_b / n,
        running_var = (Σ M2_b + Σ n_b (μ_b − μ)²) / (n − 1)      (unbiased)

    i.e. within- plus between-batch variance — the statistics of the concatenated data,
    not an average of per-batch ones.

    The pass: forward pre-hooks record each layer's input under ``torch.no_grad``; the
    batch-norm layers run in training mode, so every layer normalizes with its batch's
    statistics and the layers downstream see inputs normalized that way (as fvcore's
    precise BN does; with reasonably large batches these approach the population-
    normalized inputs). That holds for the family too: during the pass a Ghost layer
    normalizes the whole batch at once, not chunk by chunk, and a Batch Renorm layer
    uses r = 1 and d = 0 (its r and d come from the running statistics that the pass
    replaces, so the layers after it would otherwise record inputs scaled by the old
    statistics). Every other module runs in eval mode: dropout is off, so the
    statistics match what the layers see at inference. Momentum is set to 0 during the
    pass so no layer's running statistics drift; the parameters are never touched.

    :class:`~batchnorm.RecurrentBatchNorm` (and so the BN-LSTM) gets the same per time
    step: slot k's statistics are those of the inputs of the steps that use slot k
    (``min(t, max_timesteps - 1)``), padded rows left out.

    A batch in which some layer would normalize a single value per channel (a last
    batch of one example before a BatchNorm1d, say), which training mode cannot do, is
    skipped whole, with a warning; it is not counted in ``batches``. Under
    torch.distributed, each SyncBatchNorm layer (this package's or torch's) whose
    process group has several ranks merges every rank's statistics, so all ranks end
    with the same population statistics of all ranks' batches; every rank must then
    call recalibrate with the same number of batches, as in training.

    Afterwards every module's train/eval mode, every momentum and the counters
    (``num_batches_tracked``) are as before; on an exception the running statistics
    are restored too. Layers (and time-step slots) that saw fewer than 2 values per
    channel keep their statistics; frozen layers and layers without running statistics
    are skipped. Batch-norm subclasses that override ``forward`` (timm's
    BatchNormAct2d, ...) are recalibrated from their inputs like the others.

    Args:
        model: any module tree.
        batches: an iterable of input tensors, of (input, target, ...) tuples/lists
            (the model gets the input), or of mappings, passed as keyword arguments
            (``model(**batch)``, as dictionary-fed models take them); tensors are moved
            to the model's device.
        num_batches: use at most this many batches (default: all).

    Returns:
        ``Recalibrated(model, layers, batches)``: layers updated and batches used.

    Raises:
        ValueError: ``num_batches`` < 1, no batches at all, or every batch skipped.
        TypeError: a batch that is not a tensor, a tuple/list starting with one, or a
            mapping.
    """
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}")
    plain = [
        m for m in model.modules()
        if _has_channel_statistics(m) and not isinstance(m, _FrozenBatchNorm)
        and m.running_mean is not None and m.running_var is not None
    ]
    recurrent = [
        m for m in model.modules()
        if isinstance(m, RecurrentBatchNorm) and m.running_mean is not None
        and m.running_var is not None
    ]
    layers = [*plain, *recurrent]
    recalibrated = {id(m) for m in layers}
    for name, m in model.named_modules():
        if id(m) in recalibrated:
            _check_initialized(m, name, "recalibrate")
    modes = [(m, m.training) for m in model.modules()]
    # Settings that make the family's layers normalize with their batch's statistics
    # during the pass (see above), restored afterwards.
    settings = [(m, m.virtual_batch_size) for m in plain if isinstance(m, _GhostBatchNorm)]
    limits = [(m, m.r_max, m.d_max) for m in plain if isinstance(m, _BatchRenorm)]
    saved = [
        (m, m.momentum, m.running_mean.clone(), m.running_var.clone(),
         None if m.num_batches_tracked is None else m.num_batches_tracked.clone(),
         getattr(m, "num_batches_skipped", None))
        for m in layers
    ]
    skipped = [None if s is None else s.clone() for *_, s in saved]
    # id -> (process group, world size) of the SyncBatchNorm layers with several ranks
    groups = {id(m): g for m in plain if (g := _sync_group(m)) is not None}
    # (layer, slot) -> accumulator; slot None for plain batch norm. A batch's statistics
    # wait in ``pending`` until its forward has run through, so that a skipped batch
    # leaves no trace in the layers before the one that stopped it.
    accumulators: dict[tuple[int, int | None], _Accumulator] = {}
    pending: list[tuple[tuple[int, int | None], tuple[int, Tensor, Tensor]]] = []

    def stage(key: tuple[int, int | None], x: Tensor, rank_local: bool) -> None:
        stats = _Accumulator.stats_of(x)
        if stats is not None and stats[0] == 1 and rank_local:
            raise _TooFewValues  # the layer's training forward would raise on it
        if stats is not None:
            pending.append((key, stats))

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor):
            stage((id(module), None), x, id(module) not in groups)

    def record_step(
        module: RecurrentBatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # forward(x, t, mask=None): slot and mask are read by the layer's own helpers,
        # which raise what the layer would.
        x = args[0] if args else kwargs.get("x")
        t = args[1] if len(args) > 1 else kwargs.get("t")
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        if not isinstance(x, Tensor) or t is None:
            return
        if mask is not None:
            x = x[module._check_mask(mask, x)]  # the layer's own reading of a mask
        stage((id(module), module.slot(t)), x, True)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in plain]
    hooks += [m.register_forward_pre_hook(record_step, with_kwargs=True) for m in recurrent]
    # Inputs go to the device of the model's first parameter (or buffer), if any.
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = None if first is None else first.device
    used = skipped_batches = 0
    ok = False
    try:
        model.eval()
        for m in layers:
            m.train()
            m.momentum = 0.0
        for m, _ in settings:
            m.virtual_batch_size = sys.maxsize  # one chunk: plain batch norm
        for m, _, _ in limits:
            m.r_max, m.d_max = 1.0, 0.0  # r = 1, d = 0: plain batch norm
        with torch.no_grad():
            for args, kwargs in _inputs(batches, num_batches):
                pending.clear()
                try:
                    model(
                        *(_to_device(a, device) for a in args),
                        **{k: _to_device(v, device) for k, v in kwargs.items()},
                    )
                except _TooFewValues:
                    skipped_batches += 1
                    continue
                for key, stats in pending:
                    accumulators.setdefault(key, _Accumulator()).merge(*stats)
                used += 1
        if used == 0:
            raise ValueError(
                "recalibrate: got no batches; pass at least one" if not skipped_batches else
                f"recalibrate: all {skipped_batches} batches were skipped: in each some "
                "batch-norm layer would normalize a single value per channel"
            )
        for m in plain:
            if id(m) in groups:
                acc = accumulators.setdefault((id(m), None), _Accumulator())
                acc.merge_ranks(*groups[id(m)], m.num_features, m.running_mean.device)
        ok = True
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes:
            m.training = mode
        for m, size in settings:
            m.virtual_batch_size = size
        for m, r_max, d_max in limits:
            m.r_max, m.d_max = r_max, d_max
        with torch.no_grad():
            for (m, momentum, rm, rv, tracked, skipped_buf), skipped_val in zip(saved, skipped):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
                if skipped_buf is not None and skipped_val is not None:
                    skipped_buf.copy_(skipped_val)
                if not ok:
                    m.running_mean.copy_(rm)
                    m.running_var.copy_(rv)
    updated = 0
    with torch.no_grad():
        for m, (_, _, rm, rv, *_) in zip(layers, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            slots: list[int | None] = (
                list(range(m.max_timesteps)) if isinstance(m, RecurrentBatchNorm) else [None])
            changed = False
            for slot in slots:
                acc = accumulators.get((id(m), slot))
                if acc is None or acc.count < 2 or acc.mean is None or acc.m2 is None:
                    continue  # too few values: the slot keeps its statistics
                mean_out = m.running_mean if slot is None else m.running_mean[slot]
                var_out = m.running_var if slot is None else m.running_var[slot]
                mean_out.copy_(acc.mean.to(m.running_mean.dtype))
                var_out.copy_((acc.m2 / (acc.count - 1)).to(m.running_var.dtype))
                changed = True
            updated += changed
    if skipped_batches:
        warnings.warn(
            f"recalibrate: skipped {skipped_batches} batch(es) in which a batch-norm layer "
            "would normalize a single value per channel (a last batch of one example before "
            "a BatchNorm1d, say); the statistics come from the other "
            f"{used} batch(es)",
            stacklevel=2,
        )
    return Recalibrated(model, updated, used)


def _sync_group(module: nn.Module) -> tuple[Any, int] | None:
    """(process group, world size) of a SyncBatchNorm layer with more than one rank,
    else None."""
    if not isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        return None
    group, size = group_and_size(module.process_group)
    return (group, size) if size > 1 else None
