"""The state every batch-norm layer shares: parameters, buffers, reset, repr, migration."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import functional as F
from batchnorm._backends import BACKEND_NAMES
from batchnorm.nn import _script


def check_positive_int(owner: str, what: str, value: object) -> None:
    """ValueError naming ``owner`` unless ``value`` is an integer >= 1 (numbers.Integral:
    NumPy integers too, as torch's layers take them; never a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {what} must be a positive int, got {value!r}")


def check_layer_args(
    owner: str, num_features: object, eps: float, momentum: float | None, backend: str
) -> None:
    """The constructor checks every batch-norm layer shares; errors name ``owner``."""
    check_positive_int(owner, "num_features", num_features)
    for name, value in (("eps", eps), ("momentum", momentum)):
        if not isinstance(value, (numbers.Real, Tensor)) and not (name == "momentum" and value is None):
            raise TypeError(
                f"{owner}: {name} must be a real number{' or None' if name == 'momentum' else ''}"
                f", got {type(value).__name__} {value!r}"
            )
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"{owner}: eps must be >= 0 and finite, got {eps}")
    if momentum is not None and not (0.0 <= momentum <= 1.0):
        raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{owner}: backend must be one of {BACKEND_NAMES}, got {backend!r}")


def register_state(
    module: nn.Module,
    num_features: int,
    affine: bool,
    bias: bool,
    track_running_stats: bool,
    stats_shape: tuple[int, ...],
    counter_shape: tuple[int, ...],
    device: Any,
    dtype: torch.dtype | None,
) -> None:
    """γ/β (``num_features`` each) as parameters, the running statistics
    (``stats_shape``) and the counters (int64, ``counter_shape``) as buffers, with
    ``None`` registered for what is off, as in PyTorch. ``num_batches_skipped`` is not
    persistent, so state_dicts stay interchangeable with PyTorch's. Values are set by
    the caller's ``reset_parameters``."""
    factory: dict[str, Any] = {"device": device, "dtype": dtype}
    if affine:
        module.weight = nn.Parameter(torch.empty(num_features, **factory))
        if bias:
            module.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            module.register_parameter("bias", None)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
    if track_running_stats:
        counter: dict[str, Any] = {"dtype": torch.long, "device": device}
        module.register_buffer("running_mean", torch.zeros(stats_shape, **factory))
        module.register_buffer("running_var", torch.ones(stats_shape, **factory))
        module.register_buffer("num_batches_tracked", torch.zeros(counter_shape, **counter))
        module.register_buffer(
            "num_batches_skipped", torch.zeros(counter_shape, **counter), persistent=False
        )
    else:
        module.register_buffer("running_mean", None)
        module.register_buffer("running_var", None)
        module.register_buffer("num_batches_tracked", None)
        module.register_buffer("num_batches_skipped", None, persistent=False)


def reset_state(module: nn.Module) -> None:
    """Running mean 0, running variance 1, counters 0 (where tracked)."""
    if module.running_mean is not None:
        module.running_mean.zero_()
        module.running_var.fill_(1)
        module.num_batches_tracked.zero_()
        module.num_batches_skipped.zero_()


def fx_leaf(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """Under ``torch.fx.symbolic_trace`` (an input is an fx Proxy): record ``module`` as
    one ``call_module`` node, as fx records torch.nn's own layers, and return its Proxy.

    fx traces into every module outside ``torch.nn``; the layers' input checks and
    kernels cannot run on a Proxy, and the graph would lose the layer (its backend,
    running statistics, counters) anyway. As a leaf the traced GraphModule calls the
    layer itself. A layer traced as the root has no parent to call it from: TypeError.
    """
    kwargs = kwargs or {}
    proxy = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy))
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(
            f"{type(module).__name__}: torch.fx traces this layer as a leaf, one call of "
            "the module, so it cannot be the root of symbolic_trace; trace a module that "
            "contains it"
        )
    return tracer.create_proxy("call_module", path, args, kwargs)


def non_tensor_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
) -> Any:
    """What a layer's forward does when its input, ``args[0]``, is not a tensor: under
    torch.fx, the leaf node of :func:`fx_leaf`; otherwise a TypeError naming the layer."""
    if isinstance(args[0], torch.fx.Proxy):
        return fx_leaf(module, args, kwargs)
    raise TypeError(
        f"{type(module).__name__}: input must be a torch.Tensor, got {type(args[0]).__name__}"
    )


def resolve_annotations(cls: type) -> type:
    """Replace the class's own annotations, strings under ``from __future__ import
    annotations``, by the types they name, for TorchScript, which reads a module
    class's ``__annotations__`` to type its attributes and cannot parse a string.

    Annotations of tensors (parameters and buffers, ``Tensor | None``) are dropped, as
    torch's own layers leave them out: TorchScript would take an attribute annotated
    ``Optional[Tensor]`` for a plain attribute, and the compiled module would lose the
    parameter or buffer (from its state_dict too). It types those from their values."""
    hints = typing.get_type_hints(cls)
    kept = {}
    for name in inspect.get_annotations(cls):
        hint = hints[name]
        types = typing.get_args(hint) or (hint,)
        if not any(isinstance(t, type) and issubclass(t, Tensor) for t in types):
            kept[name] = hint
    cls.__annotations__ = kept
    return cls


def check_scriptable(module: nn.Module, reason: str | None, numbers_: dict[str, Any]) -> None:
    """What ``__prepare_scriptable__`` checks before torch.jit.script compiles a layer:
    TypeError naming the layer when its kind has no TorchScript form (``reason`` says
    why and what to use instead) or when ``eps``/``momentum`` (``numbers_``) are not
    Python numbers, which TorchScript needs as constants."""
    name = type(module).__name__
    if reason is not None:
        raise TypeError(f"{name}: torch.jit.script is not supported: {reason}")
    for key, value in numbers_.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"{name}: torch.jit.script needs {key} as a Python number, got "
                f"{type(value).__name__} {value!r}"
            )


# Why a layer kind has no TorchScript form: the message of check_scriptable.
NOT_SCRIPTABLE_HINT = (
    "use torch.jit.trace, torch.compile or torch.export, which run the layer as plain "
    "torch ops"
)


_Forward = TypeVar("_Forward", bound=Callable[..., Any])

# The prefixes of the functional API's error messages (batchnorm.functional).
_FUNCTIONAL_PREFIXES = ("batch_norm: ", "batch_norm_act: ")


def name_the_layer(error: BaseException, module: nn.Module) -> None:
    """Make an error of the functional API raised under ``module``'s forward name the
    layer: a message beginning ``"batch_norm: "`` begins with the class name instead
    (``"BatchNorm2d: expected more than 1 value per channel ..."``). The exception
    object, and so its traceback, is kept; only its message changes."""
    message = error.args[0] if error.args else None
    if isinstance(message, str):
        for prefix in _FUNCTIONAL_PREFIXES:
            if message.startswith(prefix):
                error.args = (f"{type(module).__name__}: {message[len(prefix):]}", *error.args[1:])
                return


def names_its_errors(forward: _Forward) -> _Forward:
    """Decorate a layer's ``forward`` with :func:`name_the_layer`. The wrapper costs
    ~0.5 µs a call; the forwards of eval's fast path (plain and frozen batch norm, ~10 µs
    at small sizes) write the ``try`` inline instead, which costs nothing."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            return forward(self, *args, **kwargs)
        except Exception as error:
            name_the_layer(error, self)
            raise

    return wrapper  # type: ignore[return-value]


class _BatchNormBase(_BatchNorm):
    """Owns γ/β, the running statistics and their counters; subclasses check dims.

    A subclass of torch's ``_BatchNorm`` (and each BatchNormXd of torch's BatchNormXd),
    so that code finding batch-norm layers by ``isinstance`` treats these as batch norm
    too. That is how
    ``torch.optim.swa_utils.update_bn`` recomputes their statistics, FSDP's mixed
    precision keeps them in float32, ``torch.func.replace_all_batch_norm_modules_``
    turns their running statistics off, and training recipes exempt them from weight
    decay. Every method torch's layers define is overridden here or in the subclasses;
    only the state_dict loading calls torch's (for checkpoints of version 1).

    Parameters and buffers carry the same names, shapes and dtypes as
    :class:`torch.nn.BatchNorm2d`'s (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so a state_dict loads into either.
    A feature that is off registers ``None`` under its name, as in PyTorch.

    One extra buffer, ``num_batches_skipped``, counts training batches whose
    statistics were not finite and were therefore kept out of the running statistics.
    It is not persistent: it stays out of the state_dict, which keeps checkpoints
    interchangeable with PyTorch's.
    """

    _version = 2
    # TorchScript bakes these into the compiled forward (torch's layers list the first
    # five); _layer_name is set per class by __init_subclass__ for the errors' text, and
    # the dims (with their words) by each public class.
    __constants__ = (
        "track_running_stats", "momentum", "eps", "num_features", "affine", "check_finite",
        "_layer_name", "_min_dim", "_max_dim", "_dims_text",
    )
    # TorchScript keeps every buffer in the compiled module's state_dict (it has no
    # non-persistent buffers), so this one stays out of it: a scripted layer's
    # state_dict then loads into torch's layers, as the eager one's does. The scripted
    # forward still skips non-finite batches; it does not count them.
    __jit_ignored_attributes__ = ("num_batches_skipped",)
    _layer_name = "_BatchNormBase"
    _min_dim = 2
    _max_dim = 5
    _dims_text = "2D to 5D (N, C, *)"
    # None where the kind has a TorchScript form; else why not (check_scriptable).
    _not_scriptable: str | None = None
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    backend: str
    check_finite: bool
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
        check_finite: bool = False,
    ) -> None:
        # nn.Module's, not _BatchNorm's: the state is registered here (register_state),
        # with this package's checks and its extra counter.
        nn.Module.__init__(self)
        check_layer_args(type(self).__name__, num_features, eps, momentum, backend)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.check_finite = check_finite
        register_state(
            self, num_features, affine, bias, track_running_stats, (num_features,), (),
            device, dtype,
        )
        self.reset_parameters()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._layer_name = cls.__name__

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counters 0."""
        reset_state(self)

    def reset_parameters(self) -> None:
        """Reset the running statistics, then γ = 1 and β = 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        _script.check_dims(self._layer_name, input, self._min_dim, self._max_dim, self._dims_text)

    def _check_num_channels(self, input: Tensor) -> None:
        _script.check_channels(self._layer_name, input, self.num_features)

    def _affine(self) -> tuple[Tensor | None, Tensor | None]:
        """(weight, bias), read from the parameter registry when both are plain
        parameters there: nn.Module's attribute lookup costs more than the arithmetic of
        a small layer. A parametrization (``torch.nn.utils.parametrize``,
        ``parametrizations.weight_norm``), the old ``weight_norm``/``spectral_norm``
        hooks and anything else that takes ``weight`` or ``bias`` out of the registry
        are honoured through the attributes, as torch's layers read them."""
        params = self._parameters
        if "weight" in params and "bias" in params:
            return params["weight"], params["bias"]
        return self.weight, self.bias

    def _uses_batch_stats(self) -> bool:
        """Batch statistics in training, and in eval when no running ones are kept."""
        return self.training or self.running_mean is None

    def _functional_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`batchnorm.functional.batch_norm` (and of
        ``batch_norm_act``) for this layer's state, the registries read once:
        nn.Module's attribute lookup costs more than the arithmetic of a small layer.

        Running statistics are passed only to be updated (training with tracking) or
        to normalize (eval with tracking); eval without them uses batch statistics."""
        weight, bias = self._affine()
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training = self.training
        update = training and self.track_running_stats
        use_running = update or not training
        return {
            "running_mean": running_mean if use_running else None,
            "running_var": running_var if use_running else None,
            "weight": weight,
            "bias": bias,
            "training": training or running_mean is None,  # as _uses_batch_stats()
            "momentum": self.momentum,
            "eps": self.eps,
            "backend": self.backend,
            "num_batches_tracked": buffers["num_batches_tracked"] if update else None,
            "num_batches_skipped": buffers["num_batches_skipped"] if update else None,
            "check_finite": self.check_finite,
        }

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(input)
        return self._forward_eager(input)

    def _forward_scripted(self, input: Tensor) -> Tensor:
        """The forward under torch.jit.script: aten's batch norm (see :mod:`._script`)."""
        self._check_input_dim(input)
        self._check_num_channels(input)
        return self._batch_norm_scripted(input)

    def _batch_norm_scripted(self, input: Tensor) -> Tensor:
        update = self.training and self.track_running_stats
        use_running = update or not self.training
        return _script.batch_norm(
            self._layer_name, input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight, self.bias, self.training or self.running_mean is None,
            self.momentum, self.eps,
            self.num_batches_tracked if update else None,
            self.check_finite,
        )

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by torch.jit.script before it compiles the layer: a clear TypeError
        for what has no TorchScript form; the layer itself otherwise (a replacement
        would be put into the caller's eager model, which torch.jit.script edits in
        place)."""
        check_scriptable(
            self, self._not_scriptable, {"eps": self.eps, "momentum": self.momentum}
        )
        # The compiled forward types eps and momentum as floats; an int (eps=1,
        # momentum=1) is the same number.
        if isinstance(self.eps, int):
            self.eps = float(self.eps)
        if isinstance(self.momentum, int):
            self.momentum = float(self.momentum)
        return self

    @torch.jit.unused
    def _forward_eager(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input,))
        try:
            self._check_input_dim(input)
            self._check_num_channels(input)
            kwargs = self._functional_kwargs()
            if (
                not kwargs["training"]
                and kwargs["running_var"] is not None
                and kwargs["backend"] == "auto"
            ):
                y = F.eval_on_aten(
                    input, kwargs["running_mean"], kwargs["running_var"], kwargs["weight"],
                    kwargs["bias"], kwargs["eps"],
                )
                if y is not None:
                    return y
            return F.batch_norm(input, **kwargs)
        except Exception as error:
            name_the_layer(error, self)
            raise

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if self.check_finite:
            text += ", check_finite=True"
        return text

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # (Version 1 checkpoints, without num_batches_tracked, are torch's _NormBase's
        # to handle, below: the module's own count stays.)
        # num_batches_skipped is not persistent; a state_dict that carries one (saved by a
        # variant that made it persistent) is accepted rather than rejected.
        skipped = state_dict.pop(prefix + "num_batches_skipped", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if skipped is not None and self.num_batches_skipped is not None:
            with torch.no_grad():
                self.num_batches_skipped.copy_(skipped)


resolve_annotations(_BatchNormBase)
