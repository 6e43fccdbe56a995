"""Stateless batch normalization with :func:`torch.nn.functional.batch_norm`'s signature.

This module validates the input, decides between batch and running statistics, and
hands the work to a backend (:mod:`batchnorm._backends`): the numba CPU kernels, the
Triton CUDA kernels, or the pure-torch reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from batchnorm import _backends, _reference
from batchnorm._aten import eval_far_from_zero
from batchnorm._autograd import (
    ActSpec,
    BatchNormActTrain,
    BatchNormTrain,
    TrainSpec,
    _memory_format,
    forward_train,
)
from batchnorm._backends import (
    BACKEND_NAMES,
    ActKernels,
    Backend,
    act_kernels,
    is_channels_last,
    keeps_far_off_aten,
    prefer_aten,
    prefer_composed_act,
    select_backend,
    under_transform,
)

__all__ = ["ACTIVATIONS", "batch_norm", "batch_norm_act", "batch_stats"]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "identity")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    check_finite: bool = False,
) -> Tensor:
    r"""Batch normalization over every dim but the channel dim 1.

    In training (``training=True``), per channel over its m = N·L values:

    .. math::
        \mu = \frac1m\sum_i x_i,\quad
        \sigma^2 = \frac1m\sum_i (x_i-\mu)^2,\quad
        y_i = \gamma\,\frac{x_i-\mu}{\sqrt{\sigma^2+\epsilon}} + \beta

    and, when ``running_mean``/``running_var`` are given, they are updated in place:
    ``running = (1 - momentum) * running + momentum * batch`` (PyTorch's convention),
    with the *unbiased* variance ``m/(m-1)·σ²``. ``momentum=None`` gives the cumulative
    average ``1/(k+1)`` where k = ``num_batches_tracked`` (required then).
    In inference (``training=False``) the running statistics normalize instead.

    A training batch whose statistics are not finite (NaN or Inf in the input) never
    touches the running statistics: the update is skipped on the device, without a
    host synchronization, ``num_batches_skipped`` (if given) counts it, and
    ``num_batches_tracked`` (if given) counts only the batches that were applied.
    ``check_finite=True`` raises :class:`FloatingPointError` for such a batch instead
    (this waits for the device).

    Args:
        input: (N, C, *) floating-point tensor; contiguous or channels_last.
        running_mean, running_var: (C,) buffers, or ``None`` to use batch statistics
            only (then ``training`` must be True).
        weight, bias: γ and β, shape (C,), or ``None`` for 1 and 0.
        training: use batch statistics (and update the running ones).
        momentum: EMA factor in [0, 1], or ``None`` for the cumulative average.
        eps: added to the variance before the square root; must be >= 0.
        backend: ``"auto"``, ``"reference"``, ``"numba"`` (CPU), ``"aten"`` (CPU:
            torch's kernels with this package's running-statistics update) or
            ``"triton"`` (CUDA). ``"auto"`` on the CPU takes aten for eval and for
            small or channel-minor training inputs, numba otherwise (see
            :func:`batchnorm._backends.prefer_aten`).
        num_batches_tracked, num_batches_skipped: 0-dim int64 counters, updated in place.
        check_finite: raise instead of skipping a non-finite batch.

    Returns:
        A tensor of ``input``'s shape, dtype and memory format. float16/bfloat16 are
        computed in float32.

    Raises:
        TypeError: for a non-tensor or integer/bool input or statistics.
        ValueError: for a shape mismatch, one value per channel in training, missing
            running statistics in inference, or a bad ``momentum``/``eps``/``backend``.
        FloatingPointError: with ``check_finite=True`` and non-finite batch statistics.
    """
    if isinstance(momentum, Tensor) or isinstance(eps, Tensor):
        momentum, eps = _plain_number("momentum", momentum), _plain_number("eps", eps)
    _validate(input, running_mean, running_var, weight, bias, momentum, eps, backend)
    if not training:
        _check_inference_stats("batch_norm", running_mean)
    return _batch_norm_validated(
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
        num_batches_tracked, num_batches_skipped, check_finite,
    )


def _batch_norm_validated(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    backend: str,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    check_finite: bool,
) -> Tensor:
    """:func:`batch_norm` after :func:`_validate` and, in inference,
    :func:`_check_inference_stats` passed (and momentum and eps are plain numbers): for
    callers that checked already, as batch_norm_act's composed path does; on a small
    layer a second validation is a visible share of the call."""
    if not training:
        assert running_mean is not None and running_var is not None
        return _inference(input, running_mean, running_var, weight, bias, eps, backend)

    check_training_eps("batch_norm", eps)
    num_channels = input.shape[1]
    m = input.numel() // num_channels
    if m == 1:
        raise ValueError(
            "batch_norm: expected more than 1 value per channel when training, got input "
            f"of shape {tuple(input.shape)}: the variance of a single value is 0, so "
            "batch statistics cannot normalize it (use eval mode for single examples)"
        )
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError(
            "batch_norm: momentum=None (cumulative average) needs num_batches_tracked"
        )
    check_counters("batch_norm", input, num_batches_tracked, num_batches_skipped)
    if m == 0:
        # An empty batch has no statistics: the output is empty and nothing is updated.
        scale = torch.ones(num_channels, dtype=input.dtype, device=input.device)
        shift = torch.zeros_like(scale)
        if weight is not None:
            scale = scale * weight
        if bias is not None:
            shift = shift + bias
        return _reference.apply_affine(input, None, scale, shift)

    if backend in ("auto", "reference") and under_transform():
        # torch.compile traces and torch.func transforms only plain torch ops: the
        # reference forward, differentiated by autograd, with no Function around it.
        y, mean, invstd = _reference.BACKEND.forward_train(
            input, weight, bias, eps, running_mean, running_var, momentum,
            num_batches_tracked, num_batches_skipped,
        )
        if check_finite:
            _raise_if_not_finite(input, mean.detach(), invstd.detach())
        return y
    chosen = select_backend(
        backend, input, weight, bias, running_mean, running_var, transform_safe=True
    )
    own = chosen
    if backend == "auto" and not (weight is None and bias is not None):
        # (A bias without a weight stays off aten: torch's native_batch_norm double
        # backward fails on that combination.)
        chosen = prefer_aten(chosen, input, training=True)
    x = _dense(input)
    autograd_train = getattr(chosen, "autograd_train", None)
    if autograd_train is not None:
        # A backend whose output carries its own (C++) autograd node: no Function here.
        # When "auto" chose it, a batch far from zero comes back None (nothing
        # updated) and runs on the backend it replaced, which keeps its digits there.
        out = autograd_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, exact_far=keeps_far_off_aten(chosen, own),
        )
        if out is not None:
            y, mean, invstd = out
            if check_finite:
                _raise_if_not_finite(input, mean, invstd)
            return y
        chosen = own
    spec = TrainSpec(
        running_mean, running_var, momentum, eps, num_batches_tracked, num_batches_skipped,
        chosen, [] if check_finite else None,
    )
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        y = BatchNormTrain.apply(x, weight, bias, spec)
        if check_finite:
            _raise_if_not_finite(input, *spec.stats_out)  # type: ignore[misc]
    else:
        y, mean, invstd = forward_train(x, weight, bias, spec)
        if check_finite:
            _raise_if_not_finite(input, mean, invstd)
    return y


def check_training_eps(owner: str, eps: float) -> None:
    """Batch statistics need eps > 0, as torch's batch norm requires in training: a
    constant channel has variance 0 and 1/sqrt(0 + eps) must stay finite (backends
    would otherwise disagree: NaN on some, a skipped update on others)."""
    if not eps > 0.0:
        raise ValueError(
            f"{owner}: eps must be positive in training (a constant channel's batch "
            f"variance is 0), got {eps}"
        )


def _check_inference_stats(owner: str, running_mean: Tensor | None) -> None:
    """Inference (training=False) normalizes with the running statistics, so they must
    be given; :func:`_validate` has checked that running_var is given with running_mean."""
    if running_mean is None:
        raise ValueError(
            f"{owner}: inference (training=False) normalizes with running_mean and "
            "running_var, but they are None; pass them or use training=True"
        )


def _plain_number(name: str, value: Any) -> Any:
    """A 0-dim tensor (torch.nn.functional.batch_norm accepts them) as a Python float."""
    if not isinstance(value, Tensor):
        return value
    if value.dim() != 0 or value.is_complex():
        raise ValueError(
            f"batch_norm: {name} must be a number or a 0-dim real tensor, got a tensor of "
            f"shape {tuple(value.shape)} and dtype {value.dtype}"
        )
    return float(value)


def check_counters(
    owner: str, input: Tensor, tracked: Tensor | None, skipped: Tensor | None
) -> None:
    """The batch counters, where given, are 0-dim int64 tensors on the input's device:
    the kernels add to them in place, and a wrong one would fail inside a kernel (or,
    on the reference backend, broadcast)."""
    device = input.get_device()
    for name, t in (("num_batches_tracked", tracked), ("num_batches_skipped", skipped)):
        if t is None or (
            isinstance(t, Tensor) and t.dim() == 0 and t.dtype == torch.long
            and t.get_device() == device
        ):
            continue
        if not isinstance(t, Tensor):
            got = f"{type(t).__name__} {t!r}"
        else:
            got = f"a tensor of shape {tuple(t.shape)} and dtype {t.dtype} on {t.device}"
        raise ValueError(
            f"{owner}: {name} must be a 0-dim int64 tensor on {input.device} (it is "
            f"counted in place), got {got}"
        )


def _validate(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    backend: str,
) -> None:
    """The argument checks shared by every functional entry point."""
    _check_input(input)
    num_channels = input.shape[1]
    shape = (num_channels,)
    device = input.get_device()  # -1 for the CPU
    is_cuda = input.is_cuda
    for t in (running_mean, running_var, weight, bias):
        # The common case, checked in one expression (few tensor attribute reads: on a
        # small layer they are a visible share of the call); the named check explains
        # a failure.
        if t is not None and not (
            isinstance(t, Tensor)
            and t.is_floating_point()
            and t.shape == shape
            and t.get_device() == device
            and t.is_cuda == is_cuda
        ):
            for name, vector in (
                ("running_mean", running_mean),
                ("running_var", running_var),
                ("weight", weight),
                ("bias", bias),
            ):
                _check_vector(name, vector, num_channels, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must be given together, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'} and "
            f"running_var={'None' if running_var is None else 'a tensor'}"
        )
    if momentum is not None and not (0.0 <= momentum <= 1.0):
        raise ValueError(f"batch_norm: momentum must be in [0, 1] or None, got {momentum}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"batch_norm: eps must be a finite number >= 0, got {eps}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"batch_norm: backend must be one of {BACKEND_NAMES}, got {backend!r}")



def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    backend: str = "auto",
    num_batches_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
    check_finite: bool = False,
) -> Tensor:
    """``act(batch_norm(input, ...) + residual)``: batch norm, residual add, activation.

    The batch-norm arguments are :func:`batch_norm`'s. ``residual`` (input's shape,
    dtype and device) is added before ``activation`` (one of :data:`ACTIVATIONS`;
    ``negative_slope`` for leaky ReLU). On a backend with act kernels (numba on the
    CPU, Triton on CUDA; see :func:`batchnorm._backends.act_kernels`) the three run as
    one fused pass structure in each direction: no intermediate tensor, ReLU's backward
    reads a mask kept by the forward (one byte per value on numba; the output's sign
    on Triton), and the residual's gradient is written only when it is needed. Elsewhere (the reference backend, and under ``"auto"`` small
    CPU inputs, see :func:`batchnorm._backends.prefer_composed_act`) they are composed,
    with the add and the activation in place on the fresh batch-norm output.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(momentum, Tensor) or isinstance(eps, Tensor):
        momentum, eps = _plain_number("momentum", momentum), _plain_number("eps", eps)
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(
                f"batch_norm_act: residual must be a torch.Tensor or None, got {type(residual).__name__}"
            )
        if isinstance(input, Tensor):
            if residual.shape != input.shape:
                raise ValueError(
                    f"batch_norm_act: residual must have the input's shape "
                    f"{tuple(input.shape)}, got {tuple(residual.shape)}"
                )
            if residual.dtype != input.dtype or residual.device != input.device:
                raise TypeError(
                    f"batch_norm_act: residual must match the input's dtype and device "
                    f"({input.dtype} on {input.device}), got {residual.dtype} on {residual.device}"
                )
    _validate(input, running_mean, running_var, weight, bias, momentum, eps, backend)
    if not training:  # before the choice of path below, which the input's size makes
        _check_inference_stats("batch_norm_act", running_mean)
    batch_stats_used = training
    if batch_stats_used:
        check_training_eps("batch_norm_act", eps)
        check_counters("batch_norm_act", input, num_batches_tracked, num_batches_skipped)
    m = input.numel() // input.shape[1]
    chosen = select_backend(backend, input, weight, bias, running_mean, running_var)
    # Small input under "auto": aten's batch norm and in-place ops cost less.
    composed = backend == "auto" and prefer_composed_act(chosen, input)
    kernels = None if composed else act_kernels(chosen)
    if kernels is not None and (m > 1 or not batch_stats_used):
        return _fused_act(
            input, running_mean, running_var, weight, bias, batch_stats_used, momentum, eps,
            residual, activation, negative_slope, chosen, kernels, num_batches_tracked,
            num_batches_skipped, check_finite, backend,
        )
    y = _batch_norm_validated(
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
        num_batches_tracked, num_batches_skipped, check_finite,
    )
    return _add_and_activate(y, residual, activation, negative_slope)


def _add_and_activate(
    y: Tensor, residual: Tensor | None, activation: str, negative_slope: float
) -> Tensor:
    """``act(y + residual)`` on batch norm's fresh output ``y``, in place where autograd
    allows: batch norm's backward needs x, not y, and relu's and leaky ReLU's
    (slope >= 0) backward need only their output."""
    if residual is not None:
        y = y.add_(residual)
    if activation == "relu":
        return torch.relu_(y)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, negative_slope, inplace=negative_slope >= 0)
    if activation == "silu":
        return torch.nn.functional.silu(y)  # its backward needs its input: not in place
    return y


def _fused_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    batch_stats_used: bool,
    momentum: float | None,
    eps: float,
    residual: Tensor | None,
    activation: str,
    negative_slope: float,
    chosen: Backend,
    kernels: ActKernels,
    num_batches_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
    check_finite: bool,
    backend: str,
) -> Tensor:
    """The fused path of :func:`batch_norm_act`, on ``chosen``'s act ``kernels``
    (``backend``: the name the caller asked for)."""
    x = _dense(input)
    res = None if residual is None else residual.contiguous(memory_format=_memory_format(x))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, res)
    )
    if not batch_stats_used:
        assert running_mean is not None and running_var is not None
        if needs_grad:  # eval with gradients: the composed, differentiable form
            y = _inference(input, running_mean, running_var, weight, bias, eps, backend)
            return _add_and_activate(y, residual, activation, negative_slope)
        return kernels.act_forward_eval(
            x, weight, bias, running_mean, running_var, eps, residual=res,
            activation=activation, negative_slope=negative_slope,
        )
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("batch_norm_act: momentum=None (cumulative average) needs num_batches_tracked")
    train = TrainSpec(
        running_mean, running_var, momentum, eps, num_batches_tracked, num_batches_skipped,
        chosen, [] if check_finite else None,
    )
    if needs_grad:
        out = BatchNormActTrain.apply(
            x, weight, bias, res, ActSpec(train, kernels, activation, negative_slope)
        )
        if check_finite:
            _raise_if_not_finite(input, *train.stats_out)  # type: ignore[misc]
    else:
        out, mean, invstd, _ = kernels.act_forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, num_batches_tracked,
            num_batches_skipped, residual=res, activation=activation,
            negative_slope=negative_slope, sign=False,  # no backward: no mask
        )
        if check_finite:
            _raise_if_not_finite(input, mean, invstd)
    return out


def _raise_if_not_finite(input: Tensor, mean: Tensor, invstd: Tensor) -> None:
    """check_finite mode: raise for non-finite statistics (waits for the device)."""
    if not bool(torch.isfinite(mean).all() & (invstd > 0).all()):
        raise FloatingPointError(
            f"batch_norm: the training batch of shape {tuple(input.shape)} has non-finite "
            "statistics (NaN or Inf in the input); the running statistics were left unchanged"
        )


def batch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (N, C, *), stable two-pass."""
    _check_input(input)
    return _reference.batch_stats(input)


def _inference(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    backend: str,
) -> Tensor:
    """``y = (x - running_mean) * scale + shift`` with the running statistics: a fixed
    affine map (aten's kernel, where "auto" takes it, uses ``x * scale + shift``)."""
    if _wants_grad(input, running_mean, running_var, weight, bias):
        if backend == "auto":
            y = _eval_with_grad_on_aten(input, running_mean, running_var, weight, bias, eps)
            if y is not None:
                return y
        # Differentiable composition: autograd derives every gradient (and higher ones).
        # A dense input, as below: the output's layout must not depend on grad mode.
        return _reference.inference_affine(
            _dense(input), weight, bias, running_mean, running_var, eps
        )
    chosen = own = select_backend(backend, input, weight, bias, running_mean, running_var)
    if backend == "auto":
        chosen = prefer_aten(chosen, input, training=False)
    x = _dense(input)
    if keeps_far_off_aten(chosen, own):
        # None where the running statistics are far from zero: the backend aten
        # replaced computes about the running mean and keeps the output's digits.
        y = chosen.forward_eval(x, weight, bias, running_mean, running_var, eps, exact_far=True)
        if y is not None:
            return y
        chosen = own
    return chosen.forward_eval(x, weight, bias, running_mean, running_var, eps)


def _eval_with_grad_on_aten(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """Inference batch norm with autograd recording under ``backend="auto"`` (plain
    and with an activation), as aten's ``batch_norm``: one op
    with its own first and second derivatives. The composed affine map (rsqrt, scale,
    shift, addcmul) is six autograd nodes, which took 2.6x torch's time at 60x100 on a
    2-core Intel VM (85 µs against 33); a layer in eval mode that passes gradients on
    (fine-tuning with the statistics kept fixed) runs this path every step.

    None where it does not apply, and the composition takes over: dtypes other than
    float32/float64 or not all the same (aten's eval kernel would cast them), running
    statistics that require a gradient (aten gives them none), and a bias without a
    weight (torch's double backward fails on it)."""
    dtype, device = input.dtype, input.device
    if dtype not in (torch.float32, torch.float64):
        return None
    if running_mean.requires_grad or running_var.requires_grad or (weight is None and bias is not None):
        return None
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (t.dtype != dtype or t.device != device):
            return None
    if _backends.AUTO_EXACT_FAR and eval_far_from_zero(running_mean, running_var, eps):
        return None  # the composition centres on the running mean (torch's does not)
    return torch.batch_norm(
        _dense(input), weight, bias, running_mean, running_var, False, 0.0, eps,
        torch.backends.cudnn.enabled,
    )


def _wants_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd is recording and any of ``tensors`` requires a gradient, or
    torch.jit.trace is recording: its check re-runs the call under no_grad, and the
    trace must be the same graph both times (the differentiable one)."""
    if torch._C._is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eval_on_aten(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """The layers' eval forward under ``backend="auto"`` when it lands on aten's
    kernel (float32/float64 CPU tensors; with a gradient wanted, as
    :func:`_eval_with_grad_on_aten` takes it), without :func:`batch_norm`'s argument
    checks; None when that does not apply.

    Why: on a small layer those Python checks were a third of the eval call (2–5 µs
    of 17–28), and aten's kernel checks the shapes and devices itself. Anything it
    rejects, and any input this path does not take, returns None, so that the caller
    goes through :func:`batch_norm` and its errors name what was wrong. The caller
    (a layer) has already checked that ``input`` is a tensor with the right number of
    dims and channels.
    """
    # aten is a CPU path: other devices go straight back, without a second backend
    # choice on their hot path.
    if not input.is_cpu or not input.is_floating_point() or not (0.0 <= eps < math.inf):
        return None
    if _wants_grad(input, running_mean, running_var, weight, bias):
        return _eval_with_grad_on_aten(input, running_mean, running_var, weight, bias, eps)
    chosen = prefer_aten(
        select_backend(
            "auto", input, weight, bias, running_mean, running_var, transform_safe=True
        ),
        input, training=False,
    )
    if chosen.name != "aten":
        return None
    try:
        # None far from zero as well: batch_norm then takes the numba kernels
        return chosen.forward_eval(
            _dense(input), weight, bias, running_mean, running_var, eps,
            exact_far=_backends.AUTO_EXACT_FAR,
        )
    except RuntimeError:  # a bad shape or device: batch_norm's checks will name it
        return None


def _check_input(input: object) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(
            f"batch_norm: input must be a floating-point tensor, got dtype {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            "batch_norm: input must have at least 2 dims (N, C, *), got shape "
            f"{tuple(input.shape)}"
        )
    if input.shape[1] == 0:
        raise ValueError(
            f"batch_norm: input has 0 channels (shape {tuple(input.shape)}); expected C >= 1"
        )


def _check_vector(name: str, t: Tensor | None, num_channels: int, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"batch_norm: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"batch_norm: {name} must be floating point, got dtype {t.dtype}")
    if t.shape != (num_channels,):
        raise ValueError(
            f"batch_norm: {name} must have shape ({num_channels},) to match the "
            f"{num_channels} channels of input {tuple(input.shape)}, got {tuple(t.shape)}"
        )
    if t.get_device() != input.get_device() or t.is_cuda != input.is_cuda:
        raise ValueError(
            f"batch_norm: {name} is on {t.device} but input is on {input.device}"
        )


def _dense(x: Tensor) -> Tensor:
    """``x`` if it is contiguous or channels_last, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()
