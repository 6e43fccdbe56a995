"""The contract every compute path of batch normalization fulfils, and how one is chosen.

A *backend* computes the three pieces of the layer on tensors that
:mod:`batchnorm.functional` has already validated:

``forward_train(x, weight, bias, eps, running_mean, running_var, momentum,
num_batches_tracked, num_batches_skipped) -> (y, mean, invstd)``
    Per-channel batch statistics over every dim but 1, the normalized and affine
    output ``y`` (dtype and memory format of ``x``), and, when ``running_mean`` is
    given, the in-place running-statistics update::

        f = momentum                      (or 1 / (num_batches_tracked + 1) if None)
        running_mean <- (1 - f) * running_mean + f * mean
        running_var  <- (1 - f) * running_var  + f * var * m / (m - 1)

    The update happens only when the batch's mean and variance are finite in every
    channel; the decision is made on the device (no host synchronization): a good
    batch adds 1 to ``num_batches_tracked``, a skipped one adds 1 to
    ``num_batches_skipped`` (each when given). ``mean`` and ``invstd`` come back in
    float32 (float64 for float64 input) and are what backward needs; a backend may
    return a more exact float64 ``mean`` (the Triton one does: its float32 mean plus
    that value's rounding error), so callers cast it where they need the stats dtype.
    The batch is never empty here (the functional handles m == 0).

``backward_train(dy, x, weight, mean, invstd) -> (dx, dweight, dbias)``
    The closed form, per channel with x_hat = (x - mean) * invstd::

        dbias   = sum(dy)
        dweight = sum(dy * x_hat)
        dx      = weight * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

``forward_eval(x, weight, bias, running_mean, running_var, eps) -> y``
    The fixed affine map ``y = x * scale + shift`` with
    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    Only used when no gradient is needed; with gradients the functional composes
    differentiable torch ops instead.

``weight`` and ``bias`` may be ``None`` (meaning 1 and 0).

Optional fused kernels
----------------------
A backend may also provide fused versions of the family's layers; callers look them up
(:func:`act_kernels`, ``getattr``) and compose the plain methods above otherwise.

**act** (:class:`ActKernels`; BatchNormAct), with ``act`` one of ``"identity"``,
``"relu"``, ``"leaky_relu"`` (``negative_slope``) and ``"silu"``:

``act_forward_train(x, weight, bias, eps, running_mean, running_var, momentum,
num_batches_tracked, num_batches_skipped, residual, activation, negative_slope, sign)
-> (out, mean, invstd, sign)``
    ``out = act(y + residual)`` with ``y`` and everything else as ``forward_train``
    (``residual``: x's shape, or None). ``sign``: for relu and leaky ReLU with a
    slope >= 0, what their backward reads act' from, a tensor whose positive entries
    are those of z = y + residual: a bool mask ``z > 0`` (the numba kernels write
    one, a byte per value) or ``out`` itself (the Triton kernels); None otherwise,
    and None may come back when the caller passes ``sign=False`` (no backward will
    run: the numba kernels then write no mask).

``act_backward_train(dout, out, x, weight, bias, mean, invstd, residual, activation,
negative_slope, has_residual) -> (dx, dweight, dbias, dresidual)``
    With ``dz = dout * act'(z)``, z = y + residual, the batch-norm backward of dz, and
    ``dresidual = dz`` when ``has_residual`` (else None). relu and leaky ReLU with a
    slope >= 0 read the mask off ``out``: the forward's ``sign``, or any tensor with
    z's positive entries (the output itself, say); silu and a negative slope (``out``
    None) rebuild z from ``x``, the statistics, ``weight``, ``bias`` and ``residual``.

``act_forward_eval(x, weight, bias, running_mean, running_var, eps, residual,
activation, negative_slope) -> out``
    ``act(forward_eval(...) + residual)`` in one pass.

**ghost** (GhostBatchNorm), ``sizes`` being the chunks' sizes along N (sum N):

``ghost_forward_train(x, weight, bias, eps, sizes, running_mean, running_var,
momentum, num_batches_tracked, num_batches_skipped) -> (y, mean, invstd)``
    Each chunk normalized with its own statistics; ``mean``/``invstd`` of shape
    (K·C,), chunk j's channel c at ``j*C + c``. The running statistics get one guarded
    update with the *whole* batch's mean and variance (merged exactly from the chunks).

``ghost_backward_train(dy, x, weight, mean, invstd, sizes) -> (dx, dweight, dbias)``
    The batch-norm backward per chunk; dweight and dbias summed over the chunks.

**renorm** (BatchRenorm):

``renorm_forward_train(x, weight, bias, eps, running_mean, running_var, momentum,
num_batches_tracked, num_batches_skipped, r_max, d_max) -> (y, mean, invstd, r, d)``
    ``y = x_hat * (weight * r) + (weight * d + bias)`` with r, d (C,) computed from the
    batch statistics and the running statistics *before* this step's update (see
    :mod:`batchnorm.nn.renorm`); then the update as ``forward_train``. The backward
    is ``backward_train`` with weight ``weight * r``, and ``dweight = r·Σdy·x̂ +
    d·Σdy``, ``dbias = Σdy``.

``renorm_backward_train(dy, x, weight, mean, invstd, r, d) -> (dx, dweight, dbias)``
    That backward in one call; a backend with ``renorm_forward_train`` has it too
    (the numba backend's keeps the (C,) arithmetic in numpy).
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

BACKEND_NAMES = ("auto", "reference", "numba", "aten", "triton")


class Backend(Protocol):
    """A compute path; see the module docstring for the exact semantics."""

    name: str

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None,
        num_batches_skipped: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor: ...


class ActKernels(Protocol):
    """The fused ``act(BN(x) + residual)`` kernels; see the module docstring."""

    def act_forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | None,
        num_batches_tracked: Tensor | None = None,
        num_batches_skipped: Tensor | None = None,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        sign: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...

    def act_backward_train(
        self,
        dout: Tensor,
        out: Tensor | None,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
        has_residual: bool | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]: ...

    def act_forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        residual: Tensor | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> Tensor: ...


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (gradients leaving a backend or an autograd Function):
    ``t`` itself when it already is. A gradient usually is, and ``Tensor.to`` costs
    ~0.9 µs even as a no-op (argument parsing), against ~0.1 µs for the dtype test:
    on a small layer's backward that is a visible share."""
    return t if t.dtype == dtype else t.to(dtype)


def reads_sign(activation: str, negative_slope: float) -> bool:
    """Whether the act kernels' backward takes act' from a ``sign`` (see
    ``act_forward_train`` above): relu and leaky ReLU with a slope >= 0, whose act' is
    fixed by z > 0, rather than from z itself."""
    return activation == "relu" or (activation == "leaky_relu" and negative_slope >= 0)


def act_kernels(backend: Backend) -> ActKernels | None:
    """The fused act kernels of ``backend``, or None when it has none (the reference).

    The numba backend carries them as methods; the Triton ones are functions of the
    module :mod:`batchnorm.kernels.triton_host`, which fulfils the protocol as is.
    """
    if backend.name == "triton":
        from batchnorm.kernels import triton_host

        return triton_host  # type: ignore[return-value]
    if hasattr(backend, "act_forward_train"):
        return backend  # type: ignore[return-value]
    return None


def _numba_supports(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _numba_usable(backend: Backend) -> bool:
    usable = getattr(backend, "usable", None)
    return usable is None or bool(usable())


def _triton_supports(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _load_numba() -> Backend | None:
    try:
        from batchnorm.kernels import numba_cpu
    except ImportError:
        return None
    return numba_cpu.BACKEND


def _load_aten() -> Backend | None:
    try:  # its running-statistics update is a numba kernel
        from batchnorm import _aten
    except ImportError:
        return None
    return _aten.BACKEND


def _load_triton() -> Backend | None:
    try:
        from batchnorm.kernels import triton_host
    except ImportError:
        return None
    return triton_host.BACKEND


_loaded: dict[str, Backend | None] = {}


def _get(name: str) -> Backend | None:
    if name not in _loaded:
        if name == "reference":
            from batchnorm import _reference

            _loaded[name] = _reference.BACKEND
        elif name == "numba":
            _loaded[name] = _load_numba()
        elif name == "aten":
            _loaded[name] = _load_aten()
        else:
            _loaded[name] = _load_triton()
    return _loaded[name]


# Choices already made, by (name, is_cpu, is_cuda, dtype): a dict lookup per call
# instead of the device and import checks. Cleared in a forked child, where the numba
# backend may become unusable.
_chosen: dict[tuple[str, bool, bool, torch.dtype], Backend] = {}
os.register_at_fork(after_in_child=_chosen.clear)


def under_transform() -> bool:
    """Whether torch.compile or torch.jit.trace is tracing, or a torch.func transform
    (grad, vmap, ...) or forward-mode AD is active.

    Then only plain torch ops work: the compiled kernels read raw data pointers, which
    neither a tracer nor a functorch wrapper has (and jit.trace records none of their
    work), and the autograd Functions define no forward-mode or vmap rules and take
    arguments jit.trace cannot record. ``"auto"`` takes the reference then.
    """
    return (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
        or _forward_ad._current_level >= 0
    )


def records_ops(*tensors: Tensor | None) -> bool:
    """Whether torch.jit.trace is tracing, torch.export is exporting, a torch.func
    transform is active, or one of ``tensors`` carries a forward-mode tangent:
    under_transform() without plain torch.compile, which runs what it cannot trace
    eagerly (after a graph break); an exported program has no eager part.
    (Inside ``fwAD.dual_level()`` a call on plain tensors records nothing.)"""
    if (
        torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch.compiler.is_exporting()
    ):
        return True
    if _forward_ad._current_level >= 0:
        return any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors
        )
    return False


def check_recordable(name: str, *tensors: Tensor | None) -> None:
    """Raise a clear error for the kernels of backend ``name`` where
    :func:`records_ops` (``tensors``: the call's inputs)."""
    if records_ops(*tensors):
        raise RuntimeError(
            f"batch_norm: backend={name!r} runs compiled kernels, which torch.jit.trace, torch.export, "
            "torch.func transforms and forward-mode AD cannot see into; use backend='auto' (plain "
            "torch ops there) or 'reference'"
        )


def select_backend(
    name: str, x: Tensor, *params: Tensor | None, transform_safe: bool = False
) -> Backend:
    """Return the backend ``name`` for input ``x`` (see :func:`_select`) that can also
    take ``params``, the call's weight, bias and running statistics (see
    :func:`_for_params`).

    Under a transform (:func:`under_transform`) ``"auto"`` is the reference, unless the
    caller says it has dealt with transforms itself (``transform_safe=True``: plain
    batch norm's eval, which lands on aten's kernel, a torch op, and its training,
    which has taken its composed path by then). The check costs ~0.2 µs, a visible
    share of a small layer's call, so it runs once per call, not twice.
    """
    if name == "auto" and not transform_safe and under_transform():
        return _get("reference")  # type: ignore[return-value]
    if name in ("numba", "triton"):
        check_recordable(name, x, *params)
    key = (name, x.is_cpu, x.is_cuda, x.dtype)
    backend = _chosen.get(key)
    if backend is None:
        backend = _select(name, x)
        _chosen[key] = backend
    return _for_params(name, backend, params) if params else backend


def _select(name: str, x: Tensor) -> Backend:
    """Return the backend ``name`` for input ``x``.

    ``"auto"`` takes Triton for CUDA tensors when Triton is installed, the numba CPU
    kernels for float32/float64 CPU tensors, and the pure-torch reference otherwise.
    (:func:`select_backend` then checks the call's parameters, :func:`_for_params`,
    and for plain batch norm the functional refines a numba choice per call:
    :func:`prefer_aten`, :func:`prefer_composed_act`.)
    Naming a backend that cannot run on ``x`` is an error, never a silent fallback. Its
    message begins ``"batch_norm: "``, the functional API's prefix, which a layer's
    forward replaces with its own name (:func:`batchnorm.nn._base.name_the_layer`).
    """
    if name == "auto":
        if _triton_supports(x):
            backend = _get("triton")
            if backend is not None:
                return backend
        if _numba_supports(x):
            backend = _get("numba")
            if backend is not None and _numba_usable(backend):
                return backend
        return _get("reference")  # type: ignore[return-value]
    if name == "reference":
        return _get("reference")  # type: ignore[return-value]
    if name == "numba":
        if not _numba_supports(x):
            raise ValueError(
                f"batch_norm: backend='numba' runs on float32/float64 CPU tensors, "
                f"got a {x.dtype} tensor on {x.device}"
            )
        backend = _get("numba")
        if backend is None:
            raise RuntimeError(
                "batch_norm: backend='numba' was requested but numba is not installed"
            )
        if not _numba_usable(backend):
            raise RuntimeError(
                "batch_norm: backend='numba' cannot run in this forked child process: its parent already "
                "started numba's OpenMP runtime, which does not survive fork(); use "
                "backend='auto' (falls back to the reference) or the 'spawn' start method"
            )
        return backend
    if name == "aten":
        if not _numba_supports(x):
            raise ValueError(
                f"batch_norm: backend='aten' runs on float32/float64 CPU tensors, "
                f"got a {x.dtype} tensor on {x.device}"
            )
        backend = _get("aten")
        if backend is None:
            raise RuntimeError(
                "batch_norm: backend='aten' needs numba (for its running-statistics update)"
            )
        return backend
    if name == "triton":
        if not (x.device.type == "cuda" or _triton_interpreting()):
            raise ValueError(
                f"batch_norm: backend='triton' runs on CUDA tensors (or CPU tensors with "
                f"TRITON_INTERPRET=1), got a tensor on {x.device}"
            )
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"batch_norm: backend='triton' supports float16, bfloat16 and float32, got "
                f"{x.dtype}"
            )
        backend = _get("triton")
        if backend is None:
            raise RuntimeError(
                "batch_norm: backend='triton' was requested but triton is not installed"
            )
        return backend
    raise ValueError(f"batch_norm: backend must be one of {BACKEND_NAMES}, got {name!r}")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Below this many elements a channel-major (NCHW-like) training call goes to aten under
# "auto": the numba kernels' per-element gain does not cover the Python host code and
# autograd glue around them. Measured on the 2-core CPU of docs/benchmarks.md (forward+backward
# against torch): 16x32x16x16 (131 072) 1.19x on numba, 1.00x on aten; 16x64x16x16
# (262 144) 0.91x on numba. Channel-minor inputs ((N, C), channels_last) go to aten,
# but see NUMBA_CHANNELS_LAST_MIN.
ATEN_CHANNEL_MAJOR_MAX = 1 << 18

# channels_last training under "auto": which kernels are faster depends on the CPU, so
# the choice is keyed on its vendor (deterministic on a given machine, unlike a timing
# taken at run time). On the AMD VMs of docs/benchmarks.md (Zen 3, 4 and 5) aten's
# channel-minor kernels are as fast as numba's or faster (Zen 5 0.97-1.15x at ResNet
# sizes; Zen 4 numba/aten 1.24-1.39x with inputs from memory) and carry no glue: aten
# at every size. On the Intel Xeon VM (AVX-512, AMX), kernels alone, numba/aten is
# 0.61-0.86 forward and 0.65-0.87 backward at every size measured; the whole layer
# (two runs) 0.71-0.76 at 16x256x56x56, 0.75-0.87 at 16x512x28x28, 0.86-0.87 at
# 16x64x56x56, 0.85-0.94 at 32x64x32x32, 0.92-0.96 at 16x1024x14x14 (2^21 values and
# up), but a tie or worse below: 16x128x28x28 0.93-0.95, 16x2048x7x7 0.99-1.10,
# 16x64x32x32 1.01, 16x64x16x16 1.02, and (N, C) 1.00-1.10 at every size up to
# 65536x32: numba for channels_last from 2^21 values (then 0.74-0.94x torch's time on
# those shapes, and a whole channels_last training step of the small ResNets of
# benchmarks/bench_network.py 0.91-0.98x). A vendor not listed keeps aten.
NUMBA_CHANNELS_LAST_MIN: dict[str, int] = {"GenuineIntel": 1 << 21}


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id as /proc/cpuinfo gives it (``"GenuineIntel"``,
    ``"AuthenticAMD"``), or ``""`` where it cannot be read (not Linux, say)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def numba_takes_channels_last(x: Tensor) -> bool:
    """True when "auto" runs plain batch norm's training on ``x`` with numba's kernels
    rather than aten's because ``x`` is a large channels_last tensor and this CPU's
    numba kernels are the faster there (see NUMBA_CHANNELS_LAST_MIN)."""
    threshold = NUMBA_CHANNELS_LAST_MIN.get(cpu_vendor())
    return threshold is not None and x.numel() >= threshold and is_channels_last(x)


def is_channels_last(x: Tensor) -> bool:
    """True for a 4-d channels_last or 5-d channels_last_3d tensor that is not also
    contiguous (a tensor that is both is treated as contiguous everywhere)."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def channel_minor(x: Tensor) -> bool:
    """True when a dense ``x``'s memory is (M, C) with C varying fastest: (N, C),
    channels_last, and contiguous (N, C, 1, ...) with N > 0. Else it is (A, C, L)."""
    if x.dim() == 2 or is_channels_last(x):
        return True
    return x.shape[0] > 0 and x.numel() == x.shape[0] * x.shape[1]


# In a forked child, torch's own parallel kernels hang if the parent had started
# torch's OpenMP pool (GNU OpenMP does not survive fork(); plain torch.batch_norm hangs
# there too). "auto" then keeps to the numba or reference paths, as before the fork.
_IN_FORKED_CHILD = False


def _mark_forked() -> None:
    global _IN_FORKED_CHILD
    _IN_FORKED_CHILD = True


os.register_at_fork(after_in_child=_mark_forked)


# Under "auto", a batch with some channel more than 16 standard deviations from zero
# (|mean|·invstd > 16) is run on the numba kernels instead of aten's, which lose
# digits there (README, "Exact"): in training the aten backend's statistics are tested
# first (``exact_far``) and, after numba's forward, before aten's backward
# (SplitBackend); in eval the running statistics (_aten.eval_far_from_zero, cached).
# False turns the tests off (benchmarks/ab_far.py measures what they cost).
AUTO_EXACT_FAR = True


def keeps_far_off_aten(chosen: Backend, own: Backend) -> bool:
    """Whether a training call should ask the aten backend ``chosen`` to hand a batch
    far from zero back (``exact_far``): when "auto" put it in place of ``own``."""
    return AUTO_EXACT_FAR and chosen is not own


def prefer_aten(chosen: Backend, x: Tensor, training: bool) -> Backend:
    """Under ``backend="auto"``, the backend for plain batch norm on ``x``: ``chosen``
    unless it is numba and aten is as fast or faster (eval always: a single streaming
    pass, whose threads torch's pool has awake after a convolution; training on small
    channel-major inputs, see ``ATEN_CHANNEL_MAJOR_MAX``, and on channel-minor ones
    unless the CPU's vendor says otherwise, see ``NUMBA_CHANNELS_LAST_MIN``). Large
    channel-major training keeps numba's forward with aten's backward
    (:func:`prefer_aten_backward`).
    The family's fused kernels (Ghost, Renorm, BatchNormAct) are numba's and ask
    ``select_backend``."""
    if chosen.name != "numba" or _IN_FORKED_CHILD:
        return chosen
    if training and not channel_minor(x) and x.numel() >= ATEN_CHANNEL_MAJOR_MAX:
        return prefer_aten_backward(chosen, x)
    if training and numba_takes_channels_last(x):
        return chosen
    aten = _get("aten")
    return chosen if aten is None else aten


class SplitBackend:
    """One backend's forward kernels (and fused family kernels) with another's plain
    training backward: what "auto" runs where numba's forward and aten's backward are
    each the faster of the two. Every attribute but ``backward_train`` and ``name``
    is the forward backend's."""

    def __init__(self, forward: Backend, backward: Backend) -> None:
        self._forward = forward
        self._backward = backward
        self.name = f"{forward.name}+{backward.name}"

    def __getattr__(self, attribute: str) -> object:
        # Only called for attributes not found on the instance: forward_train,
        # forward_eval, the fused kernels, usable. Private names are never delegated
        # (while copying or unpickling, _forward itself is not set yet).
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self._forward, attribute)

    def _backward_for(self, mean: Tensor, invstd: Tensor) -> Backend:
        """The backward backend, or the forward's own for a batch that it says is far
        from zero (``far_from_zero``, numba's): aten's backward centres x on the
        float32 mean, which there is off the data's by a visible share of the spread."""
        far = getattr(self._forward, "far_from_zero", None) if AUTO_EXACT_FAR else None
        return self._forward if far is not None and far(mean, invstd) else self._backward

    def backward_train(
        self, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self._backward_for(mean, invstd).backward_train(dy, x, weight, mean, invstd)

    def renorm_backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        r: Tensor,
        d: Tensor,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Batch renorm's backward (the forward backend's) on the backward backend's
        batch-norm kernel."""
        backward = self._backward_for(mean, invstd)
        return self._forward.renorm_backward_train(  # type: ignore[attr-defined]
            dy, x, weight, mean, invstd, r, d,
            backward=None if backward is self._forward else backward,  # None: its own
        )


# The batch-norm backward under "auto" goes to aten's kernel (a plain C++ call, no
# autograd node of its own) where it beats numba's: channel-major (NCHW-like) inputs
# with short rows (spatial size L below ATEN_BACKWARD_MAX_ROW), where numba's per-row
# overhead shows. Backward alone, float32, the 2-core CPU of docs/benchmarks.md, aten
# / numba: 16x2048x7x7 0.78, 16x1024x14x14 0.91, 16x64x16x16 0.72, 8x16x8x8 10 / 31 us;
# but 16x128x28x28 1.03, 16x512x28x28 1.08, 16x64x56x56 1.05, 16x256x56x56 1.20.
# Channel-minor inputs keep numba's: alone, aten's looked faster on the smallest
# ((60, 100): 19 / 26 us), but in a whole batch-renorm step it was slower (1.23 against
# 1.11-1.16 the core layer's time, two runs of 1500 steps) and no faster at 8x16x8x8
# channels_last. Its precision matches numba's (tests pin it). Used by plain batch
# norm's large channel-major training (smaller inputs take aten whole) and by batch
# renorm, whose backward is batch norm's. Not by BatchNormAct: since its backward reads
# the forward's one-byte mask, the fused kernel beats dz = dout·mask plus aten's
# backward on short rows too (forward+backward against the plain layer, same process:
# 16x2048x7x7 1.12-1.18 against 1.64-1.73, 64x64x8x8 1.31 against 1.56-1.61).
ATEN_BACKWARD_MAX_ROW = 512
_split: dict[str, Backend] = {}


def prefer_aten_backward(
    chosen: Backend, x: Tensor, max_row: int = ATEN_BACKWARD_MAX_ROW
) -> Backend:
    """Under ``backend="auto"``: ``chosen`` with aten's ``backward_train`` (a
    :class:`SplitBackend`) where that is faster: channel-major rows (spatial size)
    shorter than ``max_row`` (see ATEN_BACKWARD_MAX_ROW); ``chosen`` itself when it
    is not numba, in a forked child, or elsewhere."""
    if chosen.name != "numba" or _IN_FORKED_CHILD or channel_minor(x):
        return chosen
    if x.numel() >= max_row * x.shape[0] * x.shape[1]:  # rows of max_row or more
        return chosen
    split = _split.get(chosen.name)
    if split is None:
        aten = _get("aten")
        if aten is None:
            return chosen
        split = _split[chosen.name] = SplitBackend(chosen, aten)  # type: ignore[assignment]
    return split


# Batch renorm under "auto": on 3d+ inputs below RENORM_ATEN_MAX values the aten
# backend's composition (r and d from a statistics-only numba pass, then aten's batch
# norm with weight γr and bias γd + β, all in autograd's C++ graph) beats the fused
# numba kernels behind a Python Function, whose per-call cost (~15 us each way) is
# most of a small step. Forward+backward against the core layer, the 2-core CPU of
# docs/benchmarks.md, composed vs fused: 8x16x8x8 1.35-1.38 vs 1.56-1.59 (NCHW),
# 1.38 vs 1.52-1.53 (channels_last); 16x16x8x8 1.36 vs 1.53; (16, 32, 16) 1.39 vs 1.57;
# at 2^15 NCHW a tie (8x64x8x8 1.33 vs 1.34), channels_last still ahead (8x16x16x16
# 1.42 vs 1.57, hence a higher limit for channels_last); 16x32x16x16 NCHW 1.23 vs 0.91,
# channels_last a tie (1.38 vs 1.36); 16x64x16x16 channels_last 1.35 vs 1.23. (N, C)
# stays fused: (60, 100) 1.32 vs 1.15, (128, 32) 1.35 vs 1.39 (aten's 2-d kernel costs
# more there).
RENORM_ATEN_MAX = 1 << 15
RENORM_ATEN_CHANNELS_LAST_MAX = 1 << 17


def prefer_aten_renorm(chosen: Backend, x: Tensor) -> Backend:
    """Under ``backend="auto"``, the backend for batch renorm's training step on ``x``:
    aten's composition (:meth:`batchnorm._aten._AtenBackend.renorm_autograd_train`)
    for 3d+ inputs below RENORM_ATEN_MAX values (RENORM_ATEN_CHANNELS_LAST_MAX for
    channels_last), else
    ``chosen`` with aten's backward kernel where that is faster
    (:func:`prefer_aten_backward`); ``chosen`` itself when it is not numba or in a
    forked child."""
    if chosen.name != "numba" or _IN_FORKED_CHILD:
        return chosen
    limit = RENORM_ATEN_CHANNELS_LAST_MAX if is_channels_last(x) else RENORM_ATEN_MAX
    if x.dim() > 2 and x.numel() < limit:
        aten = _get("aten")
        return chosen if aten is None else aten
    return prefer_aten_backward(chosen, x)


# BatchNormAct under "auto": below these sizes the composition aten batch norm + in-place
# add + in-place activation (three C++ autograd nodes) beats the fused numba kernels
# behind a Python Function. Measured (forward+backward, relu with a residual, against
# the plain layer): (60, 100) 1.26x composed vs 1.61x fused; 16x128x16x16 channels_last
# 1.52 vs 1.85; 16x64x32x32 channels_last (2^20) 1.56 vs 1.61; 16x64x16x16 NCHW (2^18)
# 1.45 vs 1.33; 16x64x56x56 1.70 vs 1.36.
ACT_COMPOSED_CHANNEL_MINOR_MAX = 1 << 20


def prefer_composed_act(chosen: Backend, x: Tensor) -> bool:
    """Under ``backend="auto"``: compose BatchNormAct from aten's batch norm and
    in-place torch ops instead of ``chosen``'s fused act kernels (numba only)."""
    if chosen.name != "numba" or _IN_FORKED_CHILD:
        return False
    limit = ACT_COMPOSED_CHANNEL_MINOR_MAX if channel_minor(x) else ATEN_CHANNEL_MAJOR_MAX
    return x.numel() < limit


_CPU_KERNEL_BACKENDS = ("numba", "aten")
_CPU_KERNEL_PARAM_DTYPES = (torch.float32, torch.float64)


def _for_params(name: str, chosen: Backend, params: tuple[Tensor | None, ...]) -> Backend:
    """``chosen`` if it can take these weight/bias/running-statistics tensors, else:
    the reference under ``"auto"`` (a float32 input with float16 running statistics,
    say), a clear error when the backend was named. The numba and aten backends read
    parameters and statistics through numpy, which has no bfloat16, in float32 or
    float64 only."""
    if chosen.name not in _CPU_KERNEL_BACKENDS:
        return chosen
    for t in params:
        if t is not None and (t.dtype not in _CPU_KERNEL_PARAM_DTYPES or not t.is_cpu):
            if name == "auto":
                return _get("reference")  # type: ignore[return-value]
            raise ValueError(
                f"batch_norm: backend={name!r} takes float32/float64 CPU weight, bias and running "
                f"statistics, got a {t.dtype} tensor on {t.device}; use backend='auto' "
                "or 'reference', or convert them"
            )
    return chosen
