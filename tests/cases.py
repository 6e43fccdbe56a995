"""Named case tables shared by the tests (and usable by benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    training: bool = True
    channels_last: bool = False

    @property
    def module_dim(self) -> int:
        """1, 2 or 3: which BatchNormXd takes this shape."""
        return {2: 1, 3: 1, 4: 2, 5: 3}[len(self.shape)]


CASES: list[Case] = [
    Case("2d_basic", (8, 5)),
    Case("2d_fig1", (60, 100)),
    Case("2d_two_rows", (2, 7)),
    Case("3d_prime", (7, 3, 13)),
    Case("3d_long", (3, 2, 1023)),
    Case("4d_basic", (4, 3, 5, 5)),
    Case("4d_prime", (3, 7, 11, 13)),
    Case("4d_one_example", (1, 4, 3, 3)),
    Case("4d_spatial_1x1", (9, 6, 1, 1)),
    Case("4d_channels_last", (4, 6, 5, 7), channels_last=True),
    Case("4d_channels_last_prime", (3, 17, 3, 5), channels_last=True),
    Case("5d_basic", (2, 3, 3, 4, 5)),
    Case("5d_channels_last", (2, 5, 3, 3, 2), channels_last=True),
    Case("momentum_0.5", (6, 4, 3, 3), momentum=0.5),
    Case("momentum_none", (6, 4, 3, 3), momentum=None),
    Case("not_affine", (5, 4, 3, 3), affine=False),
    Case("not_tracking_stats", (5, 4, 3, 3), track_running_stats=False),
    Case("not_tracking_stats_eval", (5, 4, 3, 3), track_running_stats=False, training=False),
    Case("eval", (5, 4, 3, 3), training=False),
    Case("eval_single_example", (1, 4, 3, 3), training=False),
    Case("eval_2d_single", (1, 9), training=False),
    Case("eval_channels_last", (3, 8, 4, 4), training=False, channels_last=True),
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    grad_atol: float
    grad_rtol: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-10, 1e-9, 1e-9, 1e-8),
    torch.float32: Tolerance(2e-5, 1e-4, 1e-4, 1e-3),
    torch.bfloat16: Tolerance(3e-2, 2e-2, 8e-2, 5e-2),
    torch.float16: Tolerance(4e-3, 2e-3, 1e-2, 1e-2),
}


def memory_format(case: Case) -> torch.memory_format:
    if not case.channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """allclose that says where and by how much it differs."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = diff > bound
    if bool(bad.any()) or not bool(torch.isfinite(a).all() == torch.isfinite(e).all()):
        idx = int(torch.argmax((diff - bound).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements differ beyond atol={atol}, "
            f"rtol={rtol}; worst at {where}: got {a.flatten()[idx].item():.8g}, expected "
            f"{e.flatten()[idx].item():.8g} (|diff| = {diff.flatten()[idx].item():.3g})"
        )


def kernel_inputs(
    shape: tuple[int, ...], fmt: torch.memory_format, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Seeded (x, residual, dout, params) for the kernel tests: x ~ N(0.5, 2²), the other
    two ~ N(0, 1), all in ``fmt``; params holds weight in [0.5, 1.5), bias ~ N(0, 1),
    running_mean ~ N(0, 1) and running_var in [0.5, 1.5). Drawn in float64, then cast,
    so every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)

    def make(scale: float, shift: float) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(dtype).contiguous(memory_format=fmt)

    C = shape[1]
    params = {
        "weight": (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype),
        "bias": torch.randn(C, generator=gen, dtype=torch.float64).to(dtype),
        "running_mean": torch.randn(C, generator=gen, dtype=torch.float64).to(dtype),
        "running_var": (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(dtype),
    }
    return make(2.0, 0.5), make(1.0, 0.0), make(1.0, 0.0), params


def trainable_2d_layers() -> dict[str, Callable[[int], torch.nn.Module]]:
    """name -> factory (channels) of each trainable 2-d layer kind with an affine map,
    for tests that run the same check on the whole family."""
    import batchnorm as bn

    return {
        "batchnorm": lambda c: bn.BatchNorm2d(c),
        "ghost": lambda c: bn.GhostBatchNorm2d(c, virtual_batch_size=2),
        "renorm": lambda c: bn.BatchRenorm2d(c),
        "batch_act": lambda c: bn.BatchNormAct2d(c, activation="relu"),
    }


def triton_device() -> str:
    """Where the Triton backend runs here: CUDA, or CPU tensors under the interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); skip without Triton."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return "cpu"
