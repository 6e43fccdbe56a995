"""Where a small family layer's training step spends its time: the kernel calls or the rest.

On inputs of a few thousand values a training step is almost all fixed cost, and the
family's layers (GhostBatchNorm, BatchRenorm on the fused numba path) stay above the
core layer's time there. This script splits their step into the backend's two kernel
calls (host preparation, numba dispatch and the kernel itself, forward and backward)
and everything else (module code, the autograd Function, the engine, the gradient
accumulation), by timing, interleaved in one process:

* ``step``: the layer's real forward+backward;
* ``no_fwd`` / ``no_bwd`` / ``no_kernels``: the same with the forward call, the
  backward call or both replaced by a stub that returns empty tensors of the right
  shapes (the output is garbage; only the time counts);
* ``core``: the core ``batchnorm.BatchNorm`` on the same input (its "auto" path there
  is aten's batch norm, one C++ autograd node);
* ``fwd_alone`` / ``bwd_alone``: the two backend calls by themselves in a tight loop
  (warm caches), for comparison with their cost inside the step
  (``step − no_kernels``).

Prints a table and writes JSON/CSV (default: benchmarks/results/host_split.*).

    python benchmarks/host_split.py [--repeats 400] [--pin-allocator] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _harness import (
    add_run_arguments,
    median_ms,
    pin_allocator,
    print_table,
    time_interleaved,
    write_results,
)

import batchnorm as bn
from batchnorm.kernels import numba_cpu

COLUMNS = ["layer", "shape", "layout", "core_ms", "step_ms", "ratio", "no_kernels_ms",
           "kernels_in_step_ms", "fwd_alone_ms", "bwd_alone_ms"]

#: (layer kind, create_norm keywords, the backend methods of its forward and backward)
LAYERS: dict[str, tuple[str, Callable[[int], dict[str, Any]], str, str]] = {
    "Ghost(N/4)": ("ghost", lambda n: {"virtual_batch_size": max(1, n // 4)},
                   "ghost_forward_train", "ghost_backward_train"),
    "Renorm": ("renorm", lambda n: {"r_max": 3.0, "d_max": 5.0},
               "renorm_forward_train", "renorm_backward_train"),
}

#: Shapes where a step is mostly fixed cost. Batch renorm's "auto" runs 3-d and wider
#: inputs of this size on aten's composition (no numba Function), so it is split on
#: the (N, C) shapes only, where it keeps the fused kernels.
SHAPES = [(8, 16, 8, 8), (256, 128), (60, 100)]


class _Recorder:
    """Wraps a backend method: calls it and keeps its last arguments and result, from
    which the stub builds outputs of the same shapes and the ``*_alone`` loop its
    inputs."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.args: tuple[Any, ...] = ()
        self.result: Any = None

    def __call__(self, *args: Any) -> Any:
        self.args = args
        self.result = self.fn(*args)
        return self.result


def _stub_for(result: tuple[Any, ...]) -> Callable[..., Any]:
    """A stand-in for a backend method: fresh uninitialized tensors shaped like
    ``result``'s (None stays None), so the caller's allocation pattern is kept."""
    shapes = [None if t is None else (t.shape, t.dtype) for t in result]

    def stub(*_: Any) -> tuple[Any, ...]:
        return tuple(None if s is None else torch.empty(s[0], dtype=s[1]) for s in shapes)

    return stub


def _alone_ms(fn: Callable[..., Any], args: tuple[Any, ...], calls: int = 3000) -> float:
    """Median ms of ``fn(*args)`` over seven tight loops of ``calls``, caches warm."""
    samples = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        samples.append((time.perf_counter() - t0) / calls)
    return median_ms(samples)


def _restore(backend: Any, *names: str) -> None:
    """Drop the instance attributes that hid the backend's methods."""
    for attribute in names:
        vars(backend).pop(attribute, None)


def bench(name: str, shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    kind, keywords, fwd_name, bwd_name = LAYERS[name]
    C, n = shape[1], shape[0]
    dim = 1 if len(shape) == 2 else 2
    layer = bn.create_norm(kind, C, dim=dim, **keywords(n))
    core = bn.create_norm("batch", C, dim=dim)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    # Patched on the backend instance (an instance attribute hides the class's method;
    # "auto" reaches the instance directly or through a SplitBackend's delegation).
    backend = numba_cpu.BACKEND
    real_fwd, real_bwd = getattr(backend, fwd_name), getattr(backend, bwd_name)  # bound

    # One real step through recorders: the arguments and outputs the stubs copy.
    rec_fwd, rec_bwd = _Recorder(real_fwd), _Recorder(real_bwd)
    setattr(backend, fwd_name, rec_fwd)
    setattr(backend, bwd_name, rec_bwd)
    try:
        layer(x).backward(dy)
    finally:
        _restore(backend, fwd_name, bwd_name)
    if rec_fwd.result is None or rec_bwd.result is None:
        raise RuntimeError(f"{name} at {shape} did not run the fused numba kernels")
    stub_fwd, stub_bwd = _stub_for(rec_fwd.result), _stub_for(rec_bwd.result)

    def step(module: torch.nn.Module, fwd: Callable[..., Any], bwd: Callable[..., Any]):
        def run() -> None:
            # Both attributes are set in every variant, so each pays the same.
            setattr(backend, fwd_name, fwd)
            setattr(backend, bwd_name, bwd)
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)
        return run

    fns = {
        "core": step(core, real_fwd, real_bwd),
        "step": step(layer, real_fwd, real_bwd),
        "no_fwd": step(layer, stub_fwd, real_bwd),
        "no_bwd": step(layer, real_fwd, stub_bwd),
        "no_kernels": step(layer, stub_fwd, stub_bwd),
    }
    try:
        # A stubbed forward hands the real backward uninitialized statistics: its
        # numpy arithmetic may overflow, which is of no interest here.
        with np.errstate(all="ignore"):
            times = time_interleaved(fns, repeats, warmup=50)
    finally:
        _restore(backend, fwd_name, bwd_name)
    ms = {key: median_ms(samples) for key, samples in times.items()}
    return {
        "layer": name, "shape": "x".join(map(str, shape)),
        "layout": "NC" if len(shape) == 2 else "NCHW", "dtype": "float32",
        "core_ms": ms["core"], "step_ms": ms["step"], "ratio": ms["step"] / ms["core"],
        "no_fwd_ms": ms["no_fwd"], "no_bwd_ms": ms["no_bwd"],
        "no_kernels_ms": ms["no_kernels"],
        "kernels_in_step_ms": ms["step"] - ms["no_kernels"],
        "fwd_in_step_ms": ms["step"] - ms["no_fwd"],
        "bwd_in_step_ms": ms["step"] - ms["no_bwd"],
        "fwd_alone_ms": _alone_ms(real_fwd, rec_fwd.args),
        "bwd_alone_ms": _alone_ms(real_bwd, rec_bwd.args),
        "repeats": len(times["step"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=400)
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = args.pin_allocator and pin_allocator()
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        for name in LAYERS:
            if name == "Renorm" and len(shape) > 2:
                continue
            rows.append({**bench(name, shape, args.repeats), "allocator_pinned": pinned})
            print_table(rows[-1:], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    print_table(rows, ["layer", "shape", "fwd_in_step_ms", "bwd_in_step_ms",
                       "fwd_alone_ms", "bwd_alone_ms"])
    json_path, csv_path = write_results(rows, args.out, "host_split")
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
