"""Recurrent batch normalization and the BN-LSTM (Cooijmans et al., 2016).

Batch normalization inside a recurrence cannot share one set of population statistics
across time: the distribution of a hidden pre-activation at step 1 (right after a zero
initial state) is not that of step 50. "Recurrent Batch Normalization" therefore keeps
*separate statistics per time step* and shares only γ and β.

* :class:`RecurrentBatchNorm` — one BatchNorm1d per time step with shared γ/β, plus a
  mask for padded rows.
* :class:`BNLSTMCell` / :class:`BNLSTM` — the LSTM of the paper, with BN applied
  separately to the input and recurrent projections and to the cell state before the
  output tanh, γ initialized to 0.1.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from batchnorm import functional as F
from batchnorm.nn._base import (
    check_layer_args,
    check_scriptable,
    names_its_errors,
    non_tensor_input,
    register_state,
    reset_state,
)

__all__ = ["BNLSTM", "BNLSTMCell", "RecurrentBatchNorm"]


def _not_scriptable(self: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of the recurrent layers: torch.jit.script is refused
    with a TypeError naming the layer (the time step picks a statistics slot in Python,
    and the masks and sequences go through Python as well)."""
    check_scriptable(
        self, "its time steps pick their statistics through Python; run it eagerly", {}
    )
    return self


@contextlib.contextmanager
def _statistics_kept_on_error(layers: Iterable[RecurrentBatchNorm]) -> Iterator[None]:
    """On an exception, put back the running statistics and counters the layers had.

    A sequence is normalized step by step and each step updates its own slot, so a
    step that raises (one real row, a non-finite batch under check_finite) would leave
    the earlier steps' slots updated by a call that failed.
    """
    saved = [
        (buf, buf.clone())
        for m in layers if m.training and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked, m.num_batches_skipped)
        if buf is not None
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
        raise


def _time_index(name: str, t: object) -> int:
    """The time step ``t`` as a non-negative int; errors name the layer ``name``."""
    if isinstance(t, Tensor):
        if t.dim() != 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{name}: time index t must be an int or a 0-dim integer tensor, got a "
                f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
            )
        step = int(t.item())
    elif isinstance(t, bool):
        # ValueError for every bad time index or mask, type or shape alike: one
        # exception to catch (the layers' documented contract).
        raise ValueError(f"{name}: time index t must be an int, got bool {t}")  # noqa: TRY004
    else:
        try:
            step = operator.index(t)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"{name}: time index t must be an int or a 0-dim integer tensor, got "
                f"{type(t).__name__} {t!r}"
            ) from None
    if step < 0:
        raise ValueError(f"{name}: time index t must be >= 0, got {step}")
    return step


def _step_mask(name: str, mask: object, x: Tensor, training: bool) -> Tensor:
    """The mask of one time step, (N,) for the input ``x`` (N, ...), as a bool tensor."""
    if not isinstance(mask, Tensor):
        raise ValueError(  # noqa: TRY004 - see _time_index
            f"{name}: mask must be a bool or floating-point tensor of shape "
            f"({x.shape[0]},), got {type(mask).__name__}"
        )
    if tuple(mask.shape) != (x.shape[0],):
        raise ValueError(
            f"{name}: mask must have shape (N,) = ({x.shape[0]},) to match input "
            f"{tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"{name}: mask is on {mask.device} but input is on {x.device}")
    return _mask_values(name, mask, training)


def _mask_values(name: str, mask: Tensor, training: bool) -> Tensor:
    """A bool or 0/1 floating-point mask (any shape) as bool, True for real entries.

    In training a floating-point mask must hold only 0 and 1: a weight such as 0.5, or
    NaN, has no meaning as "real or padded". Eval does not check, since the check
    waits for the device and eval never does.
    """
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise ValueError(
            f"{name}: mask must be bool or floating point (1 = real, 0 = padded), "
            f"got dtype {mask.dtype}"
        )
    if training and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{name}: a floating-point mask must hold only 0 (padded) and 1 (real), "
            f"got values {mask.unique().tolist()[:8]}"
        )
    return mask != 0


def _check_positive_int(name: str, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")


def _check_dtype(name: str, what: str, tensor: Tensor, weight: Tensor) -> None:
    """``tensor`` must have the weights' dtype, as torch.nn.LSTM requires, except under
    autocast, which casts the products itself."""
    if tensor.dtype != weight.dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise ValueError(
            f"{name}: {what} dtype {tensor.dtype} does not match weight dtype "
            f"{weight.dtype}; convert the {what} (.to({weight.dtype})) or the module "
            f"(.to({tensor.dtype}))"
        )


class RecurrentBatchNorm(nn.Module):
    r"""Batch normalization with separate running statistics per time step.

    At time step t the (N, C) input of that step is normalized per channel,

    .. math::
        y = \gamma\,\frac{x - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} + \beta

    where in training μ_t, σ²_t are the statistics of the batch (biased variance) and
    the running estimates of slot t are updated from them (PyTorch's EMA convention,
    unbiased variance, ``momentum=None`` for the cumulative average); in eval mode the
    running estimates of slot t normalize. γ and β are shared by all steps.

    The layer is exactly ``max_timesteps`` :class:`~batchnorm.BatchNorm1d` layers with
    one shared γ/β, where step t uses layer ``min(t, max_timesteps - 1)``.

    **Steps past the last slot.** Steps ``t >= max_timesteps`` use the last slot, in
    training and in eval: in training they are normalized with their batch statistics
    and update the last slot's running estimates; in eval they are normalized with the
    last slot's estimates. The paper reuses the statistics of T_max for later steps at
    inference; updating that slot from the later steps during training means it
    estimates the statistics it is actually used for (the pre-activations of an RNN
    settle into a steady state after a few steps, so those steps share one
    distribution). Each later step counts as one update of the last slot.

    **Padding.** ``mask`` (N,) marks real rows (True / 1) and padded rows (False / 0).
    Padded rows never enter the statistics: in training the batch statistics are those
    of the real rows only and only they update the running estimates. The output of a
    padded row is 0 (in training and in eval) and its input receives zero gradient, so
    padded rows may hold anything, NaN included, in training; in eval, NaN in a padded
    row leaves the output and the input and β gradients clean but makes γ's gradient
    NaN (0·NaN in its sum), so zero the padding there if γ gets a gradient. A mask in training makes the host
    wait for the device once (to count the real rows); without a mask nothing waits.
    A step with no real row outputs zeros and updates nothing; a step with exactly one
    real row cannot be normalized with batch statistics and raises, as
    :class:`~batchnorm.BatchNorm1d` does for a batch of one.

    float16/bfloat16 inputs are normalized with float32 statistics; a non-finite batch
    is kept out of the running estimates (counted per slot in ``num_batches_skipped``)
    or, with ``check_finite=True``, raises.

    Args:
        num_features: C, the number of channels.
        max_timesteps: T, the number of statistics slots (time steps 0..T-1).
        eps: added to the variance. Default: 1e-5.
        momentum: EMA factor, or ``None`` for the cumulative average. Default: 0.1.
        affine: learn γ (and β when ``bias``). Default: True.
        track_running_stats: keep running estimates per step; if False, batch
            statistics are used in eval mode too. Default: True.
        bias: learn β (with ``affine``); the BN-LSTM turns it off where the LSTM's own
            bias already shifts. Default: True.
        weight_init: the initial γ (the BN-LSTM uses 0.1). Default: 1.0.
        backend: ``"auto"``, ``"reference"``, ``"numba"``, ``"aten"`` or ``"triton"``.
        check_finite: also raise FloatingPointError on non-finite batch statistics
            (the batch is still skipped and counted in ``num_batches_skipped``).

    Shape:
        ``forward(x, t, mask=None)``: x (N, C) or (N, C, L), mask (N,); output as x.
        ``forward_sequence(x, mask=None)``: x (T', N, C) or (T', N, C, L), mask (T', N).

    Buffers:
        ``running_mean``, ``running_var``: (max_timesteps, C);
        ``num_batches_tracked``, ``num_batches_skipped``: (max_timesteps,) int64, the
        latter not persistent.

    Raises:
        ValueError: a time index that is not a non-negative int or 0-dim integer
            tensor, a mask of the wrong shape, dtype or values, wrong input dims or
            channels, one real row in training.
        TypeError: a non-tensor or integer input.

    Examples::

        >>> import torch, batchnorm as bn
        >>> norm = bn.RecurrentBatchNorm(8, max_timesteps=20)
        >>> norm(torch.randn(4, 8), t=0).shape
        torch.Size([4, 8])
        >>> norm.forward_sequence(torch.randn(30, 4, 8)).shape   # steps 20..29 share slot 19
        torch.Size([30, 4, 8])
    """

    __prepare_scriptable__ = _not_scriptable

    num_features: int
    max_timesteps: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight_init: float
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
        max_timesteps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        weight_init: float = 1.0,
        backend: str = "auto",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_layer_args(name, num_features, eps, momentum, backend)
        _check_positive_int(name, "max_timesteps", max_timesteps)
        self.num_features = num_features
        self.max_timesteps = max_timesteps
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight_init = float(weight_init)
        self.backend = backend
        self.check_finite = check_finite
        register_state(
            self, num_features, affine, bias, track_running_stats,
            (max_timesteps, num_features), (max_timesteps,), device, dtype,
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Every slot: running mean 0, running variance 1, counters 0."""
        reset_state(self)

    def reset_parameters(self) -> None:
        """Reset the running statistics, then γ = ``weight_init`` and β = 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.constant_(self.weight, self.weight_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def slot(self, t: int | Tensor) -> int:
        """The statistics slot of time step ``t``: ``min(t, max_timesteps - 1)``."""
        return min(self._time_index(t), self.max_timesteps - 1)

    @names_its_errors
    def forward(self, x: Tensor, t: int | Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize the input ``x`` (N, C) or (N, C, L) of time step ``t``.

        ``t`` is a Python int or a 0-dim integer tensor (read on the host); ``mask``
        (N,) is bool or 0/1 floating point, True / 1 for real rows.
        """
        name = type(self).__name__
        if not isinstance(x, Tensor):
            return non_tensor_input(self, (x, t, mask))
        if x.dim() not in (2, 3):
            raise ValueError(
                f"{name}: expected the input of one time step, 2D (N, C) or 3D (N, C, L), "
                f"got {x.dim()}D input of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected input with {self.num_features} channels (dim 1, "
                f"num_features), got {x.shape[1]} in input of shape {tuple(x.shape)}"
            )
        step = self._time_index(t)
        real = None if mask is None else self._check_mask(mask, x)
        s = min(step, self.max_timesteps - 1)

        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        pass_running = update or not use_batch_stats

        def normalize(rows: Tensor) -> Tensor:
            # Views of one slot: the functional updates them (and the counters) in place.
            return F.batch_norm(
                rows,
                self.running_mean[s] if pass_running and self.running_mean is not None else None,
                self.running_var[s] if pass_running and self.running_var is not None else None,
                self.weight,
                self.bias,
                training=use_batch_stats,
                momentum=self.momentum,
                eps=self.eps,
                backend=self.backend,
                num_batches_tracked=(
                    self.num_batches_tracked[s]
                    if update and self.num_batches_tracked is not None else None
                ),
                num_batches_skipped=(
                    self.num_batches_skipped[s]
                    if update and self.num_batches_skipped is not None else None
                ),
                check_finite=self.check_finite,
            )

        if real is None:
            return normalize(x)
        keep = real.reshape(-1, *([1] * (x.dim() - 1)))
        if not use_batch_stats:
            # Rows are independent under the running statistics: no gather, no host sync.
            y = normalize(x)
            return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
        rows = real.nonzero().squeeze(1)  # the one host sync of a masked training step
        count = rows.numel()
        if count == x.shape[0]:
            return normalize(x)
        if count * (x.numel() // max(1, x.shape[0] * x.shape[1])) == 1:
            # Without running statistics eval normalizes with batch statistics too, and
            # "use eval mode" would not help there.
            if self.training:
                where = "in training"
                fixes = "mask it as padding too, group sequences by length, or use eval mode"
            else:
                where = "in eval mode without running statistics (track_running_stats=False)"
                fixes = "mask it as padding too or group sequences by length"
            raise ValueError(
                f"{name}: time step t={step} has 1 real (unmasked) row of shape "
                f"{tuple(x.shape[1:])} {where}; batch statistics need more than 1 value "
                f"per channel ({fixes})"
            )
        y_real = normalize(x.index_select(0, rows))
        out = torch.zeros(x.shape, dtype=y_real.dtype, device=x.device)
        return out.index_copy(0, rows, y_real)

    @names_its_errors
    def forward_sequence(
        self, x: Tensor, mask: Tensor | None = None, *, start: int = 0
    ) -> Tensor:
        """Normalize a whole sequence ``x`` (T', N, C[, L]) step by step from step ``start``.

        ``mask`` is (T', N); row n of step i is real where ``mask[i, n]`` is True / 1.
        """
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(
                f"{name}.forward_sequence: expected a sequence (T, N, C) or (T, N, C, L), got "
                f"{x.dim()}D input of shape {tuple(x.shape)}"
            )
        first = self._time_index(start)
        expected = tuple(x.shape[:2])
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != expected):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"{name}.forward_sequence: mask must have shape (T, N) = {expected} "
                f"to match input {tuple(x.shape)}, got {got}"
            )
        with _statistics_kept_on_error([self]):
            steps = [
                self(x[i], first + i, None if mask is None else mask[i])
                for i in range(x.shape[0])
            ]
        if not steps:
            return x.new_empty(x.shape)
        return torch.stack(steps)

    def _time_index(self, t: object) -> int:
        return _time_index(type(self).__name__, t)

    def _check_mask(self, mask: object, x: Tensor) -> Tensor:
        """The mask as a bool (N,) tensor on x's device."""
        return _step_mask(type(self).__name__, mask, x, self.training)

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, max_timesteps={self.max_timesteps}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
        if self.weight_init != 1.0:
            text += f", weight_init={self.weight_init}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if self.check_finite:
            text += ", check_finite=True"
        return text


class BNLSTMCell(nn.Module):
    r"""One step of the batch-normalized LSTM of Cooijmans et al. (2016), eq. (6)-(8).

    .. math::
        (\tilde\imath, \tilde f, \tilde g, \tilde o) &=
            \mathrm{BN}_t(W_h h_{t-1}; \gamma_h) + \mathrm{BN}_t(W_x x_t; \gamma_x) + b \\
        c_t &= \sigma(\tilde f) \odot c_{t-1} + \sigma(\tilde\imath) \odot \tanh(\tilde g) \\
        h_t &= \sigma(\tilde o) \odot \tanh(\mathrm{BN}_t(c_t; \gamma_c, \beta_c))

    Each :math:`\mathrm{BN}_t` is a :class:`RecurrentBatchNorm` (statistics per time
    step). The two projections are normalized *separately*, so the model controls the
    relative contribution of input and recurrence through γ_x and γ_h; their β is
    dropped (``bias=False``) because the LSTM's own bias ``b`` already shifts the
    gates. Every γ starts at 0.1 (the paper: a γ of 1 saturates tanh/σ and makes the
    gradients vanish), β_c at 0.

    Parameters follow :class:`torch.nn.LSTMCell`'s layout and gate order (i, f, g, o):
    ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), and one ``bias`` (4H,) in place of
    ``bias_ih + bias_hh``. Weights start uniform in ±1/sqrt(H) as in torch; the bias
    starts at 0 except the forget gate's, at 1 (keeps the memory open early on). With
    ``bias=False`` there is no ``b`` (``bias`` is None): the gate pre-activation is
    :math:`\mathrm{BN}_t(W_h h_{t-1}) + \mathrm{BN}_t(W_x x_t)`; β_c stays.

    With a ``mask`` (N,), padded rows keep their state (h, c unchanged), stay out of
    every batch statistic, and may hold any input (it is zeroed before use). In
    training a step needs 0 or at least 2 real rows (see :class:`RecurrentBatchNorm`).

    Args:
        input_size: I.
        hidden_size: H.
        max_timesteps: statistics slots; later steps use the last (see
            :class:`RecurrentBatchNorm`).
        eps, momentum: of the three BN layers.
        gamma_init: initial γ of the three BN layers. Default: 0.1.
        bias: learn the gate bias ``b``. Default: True.
        backend: the BN layers' backend.

    Shape:
        ``forward(input, hx=None, *, t, mask=None)``: input (N, I); hx a pair (h, c)
        of (N, H) or None for zeros; returns (h', c').

    Raises:
        ValueError: an input, h or c of the wrong shape, dtype (other than the
            weights') or device; a bad time index or mask (see
            :class:`RecurrentBatchNorm`); one real row in training.
    """

    __prepare_scriptable__ = _not_scriptable

    input_size: int
    hidden_size: int
    max_timesteps: int

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_timesteps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for what, value in (
            ("input_size", input_size), ("hidden_size", hidden_size),
            ("max_timesteps", max_timesteps),
        ):
            _check_positive_int(name, what, value)
        # hidden_size is valid by now; this checks eps, momentum and backend.
        check_layer_args(name, hidden_size, eps, momentum, backend)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.max_timesteps = max_timesteps
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size, **factory))
        # Registered in the same place either way: a bias=True state_dict keeps its order.
        if bias:
            self.bias = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias", None)
        bn: dict[str, Any] = {
            "eps": eps, "momentum": momentum, "weight_init": gamma_init, "backend": backend,
            **factory,
        }
        self.bn_ih = RecurrentBatchNorm(gates, max_timesteps, bias=False, **bn)
        self.bn_hh = RecurrentBatchNorm(gates, max_timesteps, bias=False, **bn)
        self.bn_c = RecurrentBatchNorm(hidden_size, max_timesteps, **bn)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's uniform ±1/sqrt(H) weights, bias 0 with forget gate 1, BN γ, β, stats."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()
                self.bias[self.hidden_size : 2 * self.hidden_size].fill_(1.0)
        for norm in (self.bn_ih, self.bn_hh, self.bn_c):
            norm.reset_parameters()

    def forward(
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        t: int | Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input, hx), {"t": t, "mask": mask})  # type: ignore[no-any-return]
        if input.dim() != 2 or input.shape[1] != self.input_size:
            raise ValueError(
                f"{name}: expected input of shape (N, input_size={self.input_size}), got "
                f"{tuple(input.shape)}"
            )
        # The inner BN layers check these too, but on W·x (N, 4H) and under their own
        # name: checked here, the errors show the caller's input.
        _check_dtype(name, "input", input, self.weight_ih)
        step = _time_index(name, t)
        h, c = self._state(hx, input)
        real = None if mask is None else _step_mask(name, mask, input, self.training)
        if self.training:
            count = input.shape[0] if real is None else int(real.sum())
            if count == 1:
                rows = "1 row" if real is None else "1 real (unmasked) row"
                raise ValueError(
                    f"{name}: time step t={step} has {rows} in input of shape "
                    f"{tuple(input.shape)} in training; batch statistics need more than 1 "
                    "value per channel (batch at least 2 sequences per step, or use eval mode)"
                )
        if real is not None:
            input = input.masked_fill(~real[:, None], 0)
        return self._step(input @ self.weight_ih.t(), h, c, step, real)

    def _step(
        self, x_proj: Tensor, h: Tensor, c: Tensor, t: int | Tensor, real: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One step from the input projection W_x·x (N, 4H) and the state (h, c);
        ``real`` is the step's bool mask (N,) or None."""
        recurrent = h @ self.weight_hh.t()
        gates = self.bn_ih(x_proj, t, real) + self.bn_hh(recurrent, t, real)
        if self.bias is not None:
            gates = gates + self.bias
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(self.bn_c(c_new, t, real))
        if real is None:
            return h_new, c_new
        keep = real[:, None]
        return torch.where(keep, h_new, h), torch.where(keep, c_new, c)

    def _state(self, hx: tuple[Tensor, Tensor] | None, input: Tensor) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        shape = (input.shape[0], self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=input.dtype, device=input.device)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError(f"{name}: hx must be a pair (h, c) or None, got {type(hx).__name__}")
        h, c = hx
        for what, s in (("h", h), ("c", c)):
            if not isinstance(s, Tensor) or tuple(s.shape) != shape:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"{name}: {what} must have shape {shape}, got {got}")
            if s.device != input.device:
                raise ValueError(f"{name}: {what} is on {s.device} but input is on {input.device}")
            _check_dtype(name, what, s, self.weight_hh)
        return h, c

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}, max_timesteps={self.max_timesteps}"
        if self.bias is None:
            text += ", bias=False"
        return text


class BNLSTM(nn.Module):
    r"""A multi-layer batch-normalized LSTM with :class:`torch.nn.LSTM`'s interface.

    Each layer is a :class:`BNLSTMCell` run over the sequence; the input projection
    W_x·x of a layer is computed for all steps in one matrix product, then normalized
    step by step with that step's statistics. Dropout (in training) applies to the
    outputs of every layer but the last, as in torch.

    The constructor takes torch.nn.LSTM's arguments in torch's positional order, and
    ``forward`` takes what torch.nn.LSTM's does: a batched tensor, an unbatched (T, I)
    sequence, or a :class:`~torch.nn.utils.rnn.PackedSequence`.

    Padded sequences: ``lengths`` (N,) or ``mask`` (T, N) — (N, T) with
    ``batch_first`` — mark the real steps (or pass a PackedSequence). A padded step
    leaves h and c unchanged and never enters the batch statistics, so ``h_n``/``c_n``
    are the states after each sequence's last real step (as with a packed sequence in
    torch) and the output at padded steps is 0. In training every step needs 0 or at
    least 2 real sequences (batch statistics of one row do not exist; see
    :class:`RecurrentBatchNorm`), so one sequence — unbatched input too — runs in eval
    mode only.

    Not supported (ValueError): ``bidirectional=True`` and ``proj_size > 0``. Other
    differences from torch.nn.LSTM: the parameters live in the cells
    (``cells.{k}.weight_ih``, ``weight_hh`` and one ``bias`` per layer, plus the BN
    layers), so state_dicts do not load into each other; a length-0 sequence (T = 0)
    returns h_0/c_0 where torch raises; :meth:`flatten_parameters` does nothing.

    Args:
        input_size, hidden_size, num_layers: as in :class:`torch.nn.LSTM`.
        bias: learn the gate bias ``b`` of every cell (see :class:`BNLSTMCell`).
            Default: True.
        batch_first: input and output (N, T, ·) instead of (T, N, ·). Default: False.
        dropout: between layers. Default: 0.
        bidirectional: must be False.
        proj_size: must be 0.
        max_timesteps: statistics slots per BN layer (required, keyword only); longer
            sequences reuse the last slot.
        eps, momentum, gamma_init: of every BN layer (γ starts at 0.1).
        device, dtype: of the parameters and buffers (keyword only).
        backend: the BN layers' backend.

    Shape:
        ``forward(input, hx=None, *, lengths=None, mask=None)``: input (T, N, I) (or
        (N, T, I)); hx a pair (h_0, c_0) of (num_layers, N, H) or None; returns
        ``output, (h_n, c_n)`` with output (T, N, H) (or (N, T, H)) and h_n, c_n
        (num_layers, N, H). Unbatched input (T, I), whatever ``batch_first``: hx
        (num_layers, H), output (T, H), h_n and c_n (num_layers, H), and no
        ``lengths``/``mask``. A PackedSequence input gives a PackedSequence output with
        its ``batch_sizes``, ``sorted_indices`` and ``unsorted_indices``; hx and
        h_n/c_n are in the caller's batch order, as in torch.

    Raises:
        ValueError: an input, hx, lengths or mask of the wrong shape, dtype (other than
            the weights') or device; one real sequence at a step in training; an
            unsupported argument (bidirectional, proj_size).

    Examples::

        >>> import torch, batchnorm as bn
        >>> lstm = bn.BNLSTM(10, 32, num_layers=2, max_timesteps=50)
        >>> out, (h, c) = lstm(torch.randn(50, 8, 10))
        >>> out.shape, h.shape
        (torch.Size([50, 8, 32]), torch.Size([2, 8, 32]))
    """

    __prepare_scriptable__ = _not_scriptable

    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    proj_size: int
    max_timesteps: int

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        max_timesteps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        device: Any = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for what, value in (
            ("input_size", input_size), ("hidden_size", hidden_size),
            ("num_layers", num_layers), ("max_timesteps", max_timesteps),
        ):
            _check_positive_int(name, what, value)
        # hidden_size is valid by now; this checks eps, momentum and backend.
        check_layer_args(name, hidden_size, eps, momentum, backend)
        if not (0.0 <= dropout <= 1.0):
            raise ValueError(f"{name}: dropout must be in [0, 1], got {dropout}")
        if bidirectional:
            raise ValueError(
                f"{name}: bidirectional={bidirectional!r} is not supported (one direction "
                "only; use bidirectional=False)"
            )
        if proj_size != 0:
            raise ValueError(
                f"{name}: proj_size={proj_size!r} is not supported (no projection of h; "
                "use proj_size=0)"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout applies to the outputs of every layer but the last, so a "
                f"nonzero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                UserWarning,
                stacklevel=2,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = False
        self.proj_size = 0
        self.max_timesteps = max_timesteps
        self.cells = nn.ModuleList(
            BNLSTMCell(
                input_size if layer == 0 else hidden_size, hidden_size, max_timesteps,
                eps, momentum, gamma_init, device, dtype, bias=bias, backend=backend,
            )
            for layer in range(num_layers)
        )

    def reset_parameters(self) -> None:
        """Every cell as the constructor leaves it (:meth:`BNLSTMCell.reset_parameters`):
        new weights, the bias, BN γ and β, and the running statistics."""
        for cell in self.cells:
            cell.reset_parameters()

    def flatten_parameters(self) -> None:
        """Does nothing. torch.nn.LSTM packs its weights into one cuDNN buffer here;
        the BN-LSTM runs its cells step by step and has no such buffer. It exists so
        that code written for torch.nn.LSTM, which calls it, runs unchanged."""

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, lengths, mask)
        if not isinstance(input, Tensor):
            return non_tensor_input(self, (input, hx), {"lengths": lengths, "mask": mask})  # type: ignore[no-any-return]
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            layout = "(N, T, input_size" if self.batch_first else "(T, N, input_size"
            raise ValueError(
                f"BNLSTM: expected input of shape {layout}={self.input_size}), or "
                f"(T, input_size={self.input_size}) unbatched, got {tuple(input.shape)}"
            )
        if input.dim() == 2:
            if lengths is not None or mask is not None:
                raise ValueError(
                    "BNLSTM: lengths and mask need batched input; an unbatched (T, "
                    "input_size) sequence has no padding (slice it to its length instead)"
                )
            # One sequence of a batch of one, as torch does; batch_first does not apply.
            output, (h_n, c_n) = self._sequence(input.unsqueeze(1), hx, None, unbatched=True)
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        x = input.transpose(0, 1) if self.batch_first else input  # (T, N, I)
        real = self._step_mask(lengths, mask, x.shape[0], x.shape[1], x.device)
        output, state = self._sequence(x, hx, real, unbatched=False)
        return (output.transpose(0, 1) if self.batch_first else output), state

    def _forward_packed(
        self,
        input: PackedSequence,
        hx: tuple[Tensor, Tensor] | None,
        lengths: Tensor | list[int] | None,
        mask: Tensor | None,
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        """A PackedSequence runs as the padded batch with its lengths, then its output is
        packed as the input was (same batch_sizes and indices)."""
        if lengths is not None or mask is not None:
            raise ValueError(
                "BNLSTM: a PackedSequence carries its own lengths; pass lengths or mask "
                "only with a padded tensor"
            )
        if input.data.dim() != 2 or input.data.shape[1] != self.input_size:
            raise ValueError(
                f"BNLSTM: expected a PackedSequence of data (sum of lengths, input_size="
                f"{self.input_size}), got data of shape {tuple(input.data.shape)}"
            )
        # (T, N, I) in the caller's batch order, the order of hx and of h_n/c_n in torch.
        padded, lens = pad_packed_sequence(input)
        real = self._step_mask(lens, None, padded.shape[0], padded.shape[1], padded.device)
        output, state = self._sequence(padded, hx, real, unbatched=False)
        if input.sorted_indices is not None:
            output = output.index_select(1, input.sorted_indices)
            lens = lens.index_select(0, input.sorted_indices.cpu())
        data = pack_padded_sequence(output, lens).data  # lengths sorted: the input's packing
        packed = PackedSequence(
            data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
        )
        return packed, state

    def _sequence(
        self,
        x: Tensor,
        hx: tuple[Tensor, Tensor] | None,
        real: Tensor | None,
        *,
        unbatched: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Every layer over the time-major sequence ``x`` (T, N, I); output (T, N, H)."""
        _check_dtype("BNLSTM", "input", x, self.cells[0].weight_ih)
        h0, c0 = self._initial_state(hx, x, unbatched)
        if self.training and x.shape[1] == 1 and x.shape[0] > 0:
            what = (
                "unbatched input (T, input_size) is a training batch of 1 sequence, which"
                if unbatched else "a training batch of 1 sequence"
            )
            raise ValueError(
                f"BNLSTM: {what} has 1 value per channel at each step; batch statistics "
                "need more than 1 (use eval mode for single sequences)"
            )
        if self.training and real is not None:
            counts = real.sum(1).tolist()
            if 1 in counts:
                raise ValueError(
                    f"BNLSTM: time step t={counts.index(1)} has 1 real (unpadded) sequence "
                    "in training; batch statistics need more than 1 (group sequences by "
                    "length so that at least 2 reach every step, or use eval mode)"
                )
        norms = [m for m in self.modules() if isinstance(m, RecurrentBatchNorm)]
        with _statistics_kept_on_error(norms):
            return self._layers(x, real, h0, c0)

    def _layers(
        self, x: Tensor, real: Tensor | None, h0: Tensor, c0: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        steps, batch = x.shape[0], x.shape[1]
        h_n, c_n = [], []
        layer_input = x
        for layer, cell in enumerate(self.cells):
            if layer > 0 and self.dropout > 0:
                layer_input = nn.functional.dropout(layer_input, self.dropout, self.training)
            if real is not None:
                # Padded steps may hold anything (NaN included): zero them before the product.
                layer_input = layer_input.masked_fill(~real[:, :, None], 0)
            # One matrix product for the whole sequence; BN still goes step by step.
            x_proj = layer_input @ cell.weight_ih.t()  # (T, N, 4H)
            h, c = h0[layer], c0[layer]
            outputs = []
            for t in range(steps):
                m = None if real is None else real[t]
                h, c = cell._step(x_proj[t], h, c, t, m)
                outputs.append(h if m is None else h.masked_fill(~m[:, None], 0))
            layer_input = (
                torch.stack(outputs) if outputs else x.new_zeros(0, batch, self.hidden_size)
            )
            h_n.append(h)
            c_n.append(c)
        return layer_input, (torch.stack(h_n), torch.stack(c_n))

    def _step_mask(
        self,
        lengths: Tensor | list[int] | None,
        mask: Tensor | None,
        steps: int,
        batch: int,
        device: torch.device,
    ) -> Tensor | None:
        if lengths is not None and mask is not None:
            raise ValueError("BNLSTM: pass lengths or mask, not both")
        if lengths is not None:
            lens = torch.as_tensor(lengths)
            if lens.shape != (batch,) or lens.is_floating_point() or lens.dtype == torch.bool:
                raise ValueError(
                    f"BNLSTM: lengths must be {batch} integers (one per sequence), got "
                    f"{tuple(lens.shape)} of dtype {lens.dtype}"
                )
            if bool((lens < 0).any()) or bool((lens > steps).any()):
                raise ValueError(
                    f"BNLSTM: lengths must lie in [0, {steps}] (the sequence length), got "
                    f"{lens.tolist()}"
                )
            return torch.arange(steps, device=device)[:, None] < lens.to(device)[None, :]
        if mask is None:
            return None
        expected = (batch, steps) if self.batch_first else (steps, batch)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            layout = "(N, T)" if self.batch_first else "(T, N)"
            raise ValueError(f"BNLSTM: mask must have shape {layout} = {expected}, got {got}")
        real = _mask_values("BNLSTM", mask, self.training)
        return (real.transpose(0, 1) if self.batch_first else real).to(device)

    def _initial_state(
        self, hx: tuple[Tensor, Tensor] | None, x: Tensor, unbatched: bool
    ) -> tuple[Tensor, Tensor]:
        """(h_0, c_0) as (num_layers, N, H) for the time-major ``x`` (T, N, I); the
        caller's are (num_layers, H) for unbatched input."""
        shape = (self.num_layers, x.shape[1], self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return zeros, zeros
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise ValueError(
                f"BNLSTM: hx must be a pair (h_0, c_0) or None, got {type(hx).__name__}"
            )
        if unbatched:
            shape, layout = (self.num_layers, self.hidden_size), "(num_layers, hidden_size)"
        else:
            layout = "(num_layers, N, hidden_size)"
        for what, s in zip(("h_0", "c_0"), hx, strict=True):
            if not isinstance(s, Tensor) or tuple(s.shape) != shape:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(
                    f"BNLSTM: {what} must have shape {layout} = {shape}"
                    f"{' for unbatched input' if unbatched else ''}, got {got}"
                )
            if s.device != x.device:
                raise ValueError(f"BNLSTM: {what} is on {s.device} but input is on {x.device}")
            _check_dtype("BNLSTM", what, s, self.cells[0].weight_hh)
        h0, c0 = hx
        return (h0.unsqueeze(1), c0.unsqueeze(1)) if unbatched else (h0, c0)

    def extra_repr(self) -> str:
        text = (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"max_timesteps={self.max_timesteps}"
        )
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        return text
