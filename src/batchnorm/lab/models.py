"""The networks the lab trains, built with the project's norm registry.

Norm layers come from :func:`batchnorm.create_norm`, the same entry point a user
would call, so the lab measures the library itself. The name ``"none"`` is handled
here (an :class:`torch.nn.Identity`) because "no normalization" is the baseline of
every experiment, not a layer of the library.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

import batchnorm

Activation = Literal["sigmoid", "relu", "tanh"]
Placement = Literal["before", "after"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


#: Registry names whose layers take no ``backend`` argument (torch's own layers).
_TORCH_NORMS = frozenset({"layer", "group"})


class NoisyBatchNorm(nn.Module):
    """Batch norm followed by noise that moves every unit's distribution at every step:
    Santurkar et al. (2018)'s "noisy BN", the lab's test of whether BN helps by keeping
    layer inputs stable.

    In training, each forward draws per unit j a shift m_j ~ U(−shift, shift) and a
    scale s_j ~ U(1, scale), shared by the batch, and returns s·BN(x) + m: the next
    layer sees a distribution whose mean and spread change from step to step, however
    BN normalized it. In eval mode the noise is replaced by its expectation,
    ((1 + scale) / 2)·BN(x), so test predictions are deterministic and see on
    average what training saw. The draws come from torch's global generator, which the
    lab seeds per run.

    Args:
        num_features: units.
        shift, scale: the noise's bounds (shift >= 0, scale >= 1; 0 and 1: plain BN).
        backend: passed to the batch-norm layer when given.
    """

    def __init__(self, num_features: int, shift: float = 1.0, scale: float = 2.0,
                 backend: str | None = None) -> None:
        super().__init__()
        if not (shift >= 0 and scale >= 1):
            raise ValueError(
                f"NoisyBatchNorm: expected shift >= 0 and scale >= 1, got {shift}, {scale}")
        kwargs = {} if backend is None else {"backend": backend}
        self.bn = batchnorm.create_norm("batch", num_features, dim=1, **kwargs)
        self.shift = float(shift)
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y * ((1.0 + self.scale) / 2.0)
        units = y.shape[1]
        m = torch.empty(units, dtype=y.dtype, device=y.device).uniform_(-self.shift, self.shift)
        s = torch.empty(units, dtype=y.dtype, device=y.device).uniform_(1.0, self.scale)
        return y * s + m


def make_norm(
    name: str, num_features: int, backend: str | None = None, **options: Any
) -> nn.Module:
    """A norm layer for (N, C) inputs: ``"none"``, ``"noisy_batch"`` (the lab's
    :class:`NoisyBatchNorm`) or any name the registry knows.

    ``backend`` (e.g. ``"reference"``) is passed to the library's layers when given
    (torch's layer and group norm have none); ``options`` go to the layer as keyword
    arguments (``virtual_batch_size=8``, ``affine=False``, ...).
    """
    if name == "none":
        return nn.Identity()
    if name == "noisy_batch":
        return NoisyBatchNorm(num_features, backend=backend, **options)
    kwargs = dict(options)
    if backend is not None and name not in _TORCH_NORMS:
        kwargs["backend"] = backend
    return batchnorm.create_norm(name, num_features, dim=1, **kwargs)


@dataclass(frozen=True)
class MLPSpec:
    """What to build: a fully connected classifier.

    Attributes:
        in_features: length of a flattened example.
        hidden: width of each hidden layer.
        num_classes: outputs (logits).
        norm: registry name of the norm layer in each hidden block, or ``"none"``.
        activation: ``sigmoid``, ``relu`` or ``tanh``.
        placement: the norm ``before`` the activation (the paper's choice,
            Linear → BN → act) or ``after`` it (Linear → act → BN).
        init_std: every Linear weight drawn from N(0, init_std²) with zero biases;
            ``None`` keeps PyTorch's default (uniform ±1/sqrt(fan_in)).
        drop_bias: leave out the bias of a Linear layer that feeds a norm layer
            directly; BN subtracts the mean, so that bias does nothing
            (Ioffe & Szegedy 2015, section 3.2).
        norm_backend: the library's compute path for the norm layers (``auto``,
            ``reference``, ``numba``, ...), or None for the layer's default.
        norm_options: keyword arguments of every norm layer, as ``(name, value)``
            pairs (a tuple, so the spec stays hashable), e.g.
            ``(("virtual_batch_size", 8),)``.
        dropout: the drop probability of a :class:`torch.nn.Dropout` at the end of
            every hidden block (0: none).
    """

    in_features: int
    hidden: tuple[int, ...]
    num_classes: int
    norm: str = "none"
    activation: Activation = "sigmoid"
    placement: Placement = "before"
    init_std: float | None = None
    drop_bias: bool = True
    norm_backend: str | None = None
    norm_options: tuple[tuple[str, Any], ...] = ()
    dropout: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["norm_options"] = dict(self.norm_options)
        return d


class Block(nn.Module):
    """One hidden layer: Linear, norm and activation in the order ``placement`` says,
    then dropout (an Identity when the spec has none).

    The parts stay named attributes so probes can hook the input of ``act`` (what a
    sigmoid sees) or of ``norm`` (what enters BN).
    """

    def __init__(
        self, linear: nn.Linear, norm: nn.Module, act: nn.Module, placement: Placement,
        dropout: nn.Module | None = None,
    ):
        super().__init__()
        self.linear = linear
        self.norm = norm
        self.act = act
        self.placement = placement
        self.dropout = nn.Identity() if dropout is None else dropout

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x)
        if self.placement == "before":
            return self.dropout(self.act(self.norm(x)))
        return self.dropout(self.norm(self.act(x)))


class MLP(nn.Module):
    """A stack of :class:`Block` and a final Linear layer producing logits."""

    def __init__(self, spec: MLPSpec):
        super().__init__()
        if spec.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {spec.activation!r}"
            )
        if spec.placement not in ("before", "after"):
            raise ValueError(f"placement must be 'before' or 'after', got {spec.placement!r}")
        if not 0.0 <= spec.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {spec.dropout!r}")
        self.spec = spec
        blocks = []
        width = spec.in_features
        normalized = spec.norm != "none"
        for out in spec.hidden:
            # The bias is redundant only when the Linear output goes straight into BN.
            bias = not (normalized and spec.placement == "before" and spec.drop_bias)
            blocks.append(
                Block(
                    nn.Linear(width, out, bias=bias),
                    make_norm(spec.norm, out, spec.norm_backend, **dict(spec.norm_options)),
                    _ACTIVATIONS[spec.activation](),
                    spec.placement,
                    nn.Dropout(spec.dropout) if spec.dropout > 0 else None,
                )
            )
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, spec.num_classes)
        if spec.init_std is not None:
            self._init_gaussian(spec.init_std)

    def _init_gaussian(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def describe(self) -> dict[str, object]:
        """Layers, parameter count and which Linear layers have a bias, for results files."""
        layers: list[str] = []
        for block in self.blocks:
            lin = block.linear
            parts = [f"Linear({lin.in_features}->{lin.out_features}, bias={lin.bias is not None})"]
            norm = "" if isinstance(block.norm, nn.Identity) else type(block.norm).__name__
            act = type(block.act).__name__
            parts += [p for p in ((norm, act) if block.placement == "before" else (act, norm)) if p]
            if isinstance(block.dropout, nn.Dropout):
                parts.append(f"Dropout({block.dropout.p:g})")
            layers.append(" -> ".join(parts))
        layers.append(f"Linear({self.head.in_features}->{self.head.out_features}, bias=True)")
        return {
            "spec": self.spec.to_dict(),
            "layers": layers,
            "parameters": sum(p.numel() for p in self.parameters()),
            "linear_bias": [b.linear.bias is not None for b in self.blocks],
            "norm_class": next(
                (f"{type(b.norm).__module__}.{type(b.norm).__name__}" for b in self.blocks
                 if not isinstance(b.norm, nn.Identity)),
                None,
            ),
        }


RNNKind = Literal["lstm", "bnlstm"]


@dataclass(frozen=True)
class RNNSpec:
    """A sequence classifier: each flattened example is read as ``sequence_length``
    steps of ``in_features / sequence_length`` values (an MNIST digit: 28 rows of 28
    pixels), an LSTM runs over them, and a Linear layer reads the last hidden state.

    Attributes:
        in_features: length of a flattened example (a multiple of sequence_length).
        sequence_length: T, the time steps.
        hidden_size: the LSTM's width.
        num_classes: outputs (logits).
        kind: ``lstm`` (:class:`torch.nn.LSTM`) or ``bnlstm`` (:class:`batchnorm.BNLSTM`,
            Cooijmans et al. 2016).
        max_timesteps: the BN-LSTM's statistics slots (None: one per step, T); 1 shares
            one set of population statistics across all steps.
        gamma_init: the BN-LSTM's initial γ.
        norm_backend: the BN-LSTM's backend, or None for its default.
    """

    in_features: int
    sequence_length: int
    hidden_size: int
    num_classes: int
    kind: RNNKind = "lstm"
    max_timesteps: int | None = None
    gamma_init: float = 0.1
    norm_backend: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields."""
        return asdict(self)


class RNNClassifier(nn.Module):
    """:class:`RNNSpec` built: an LSTM or BN-LSTM (one layer, batch first) and a head."""

    def __init__(self, spec: RNNSpec):
        super().__init__()
        if spec.kind not in ("lstm", "bnlstm"):
            raise ValueError(f"kind must be 'lstm' or 'bnlstm', got {spec.kind!r}")
        if spec.sequence_length < 1 or spec.in_features % spec.sequence_length:
            raise ValueError(
                f"in_features ({spec.in_features}) must be a positive multiple of "
                f"sequence_length, got {spec.sequence_length}")
        self.spec = spec
        step = spec.in_features // spec.sequence_length
        if spec.kind == "lstm":
            self.rnn: nn.Module = nn.LSTM(step, spec.hidden_size, batch_first=True)
        else:
            kwargs = {} if spec.norm_backend is None else {"backend": spec.norm_backend}
            self.rnn = batchnorm.BNLSTM(
                step, spec.hidden_size, batch_first=True,
                max_timesteps=spec.max_timesteps or spec.sequence_length,
                gamma_init=spec.gamma_init, **kwargs)
        self.head = nn.Linear(spec.hidden_size, spec.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.reshape(x.shape[0], self.spec.sequence_length, -1)
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])

    def describe(self) -> dict[str, object]:
        """Layers and parameter count, for results files."""
        rnn = type(self.rnn)
        return {
            "spec": self.spec.to_dict(),
            "layers": [repr(self.rnn).splitlines()[0].rstrip("("), repr(self.head)],
            "parameters": sum(p.numel() for p in self.parameters()),
            "norm_class": f"{rnn.__module__}.{rnn.__name__}" if self.spec.kind == "bnlstm"
            else None,
        }


def build(spec: MLPSpec | RNNSpec, seed: int) -> MLP | RNNClassifier:
    """Build ``spec`` with weights drawn from ``seed``, independent of global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RNNClassifier(spec) if isinstance(spec, RNNSpec) else MLP(spec)


def log_space(low: float, high: float, num: int) -> tuple[float, ...]:
    """``num`` values evenly spaced in log scale from ``low`` to ``high`` inclusive."""
    if num == 1:
        return (low,)
    a, b = math.log10(low), math.log10(high)
    return tuple(float(10 ** (a + (b - a) * i / (num - 1))) for i in range(num))
