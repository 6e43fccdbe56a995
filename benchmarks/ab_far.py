"""What "auto"'s far-from-zero test costs: training steps with it on and off, interleaved.

Under ``backend="auto"`` a training batch with some channel more than 16 standard
deviations from zero leaves aten's kernels for numba's (``_backends.AUTO_EXACT_FAR``).
The test rides on the running-statistics update kernel of the aten path, costs one
small numba call where there are no running statistics, and one before aten's backward
after numba's forward (the split backend); in eval, a check of a cached answer per
running_mean (_aten.eval_far_from_zero). This script times the core layer's (and
batch renorm's) forward+backward, and the core layer's eval forward (without and with
a gradient), on ordinary data (N(0.5, 2²): no batch is far, so both variants run the
same kernels) with the flag on and off, call by call in a shuffled order
(_harness.time_interleaved), and prints the medians and on/off. Prints a table,
writes JSON/CSV (default: benchmarks/results/ab_far.*).

    python benchmarks/ab_far.py [--repeats 40] [--quick] [--pin-allocator] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _harness import (
    add_run_arguments,
    median_ms,
    pin_allocator,
    print_table,
    time_interleaved,
    write_results,
)
from torch import nn

import batchnorm as bn
from batchnorm import _backends

CL = torch.channels_last
# (label, layer factory, shape, memory format): one row per path the test touches
CASES: list[tuple[str, Callable[[int], nn.Module], tuple[int, ...], torch.memory_format | None]] = [
    ("aten, tracked", lambda c: bn.BatchNorm2d(c), (8, 16, 8, 8), None),
    ("aten, tracked", lambda c: bn.BatchNorm2d(c), (16, 64, 16, 16), None),
    ("aten, tracked", lambda c: bn.BatchNorm2d(c), (16, 64, 16, 16), CL),
    ("aten, tracked", lambda c: bn.BatchNorm1d(c), (256, 128), None),
    ("aten, untracked", lambda c: bn.BatchNorm2d(c, track_running_stats=False), (8, 16, 8, 8), None),
    ("numba+aten split", lambda c: bn.BatchNorm2d(c), (16, 1024, 14, 14), None),
    ("numba+aten split", lambda c: bn.BatchNorm2d(c), (16, 2048, 7, 7), None),
    ("renorm composed", lambda c: bn.BatchRenorm2d(c), (8, 16, 8, 8), None),
    ("renorm split", lambda c: bn.BatchRenorm2d(c), (16, 256, 14, 14), None),
    ("eval", lambda c: bn.BatchNorm2d(c).eval(), (8, 16, 8, 8), None),
    ("eval", lambda c: bn.BatchNorm2d(c).eval(), (16, 64, 16, 16), CL),
    ("eval", lambda c: bn.BatchNorm1d(c).eval(), (60, 100), None),
    ("eval with grad", lambda c: bn.BatchNorm1d(c).eval(), (60, 100), None),
]


def _step(
    label: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, flag: bool
) -> Callable[[], None]:
    def step() -> None:
        _backends.AUTO_EXACT_FAR = flag  # set in both variants: the same overhead
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)

    def inference() -> None:
        _backends.AUTO_EXACT_FAR = flag
        with torch.no_grad():
            layer(x)

    if label == "eval":
        return inference
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="three cases, 5 repeats")
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = pin_allocator() if args.pin_allocator else False
    cases = CASES[:1] + CASES[4:6] + CASES[-2:] if args.quick else CASES
    repeats = 5 if args.quick else args.repeats
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, make, shape, fmt in cases:
        x = (0.5 + 2.0 * torch.randn(shape, generator=gen)).requires_grad_()
        if fmt is not None:
            x = x.detach().contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape, generator=gen)
        if fmt is not None:
            dy = dy.contiguous(memory_format=fmt)
        layer = make(shape[1])
        times = time_interleaved(
            {"on": _step(label, layer, x, dy, True), "off": _step(label, layer, x, dy, False)},
            repeats,
        )
        _backends.AUTO_EXACT_FAR = True
        on, off = median_ms(times["on"]), median_ms(times["off"])
        rows.append({
            "path": label, "shape": "x".join(map(str, shape)),
            "layout": "channels_last" if fmt is not None else "contiguous",
            "on_ms": on, "off_ms": off, "on/off": on / off, "samples": len(times["on"]),
            "pinned_allocator": pinned,
        })
    print_table(rows, ["path", "shape", "layout", "on_ms", "off_ms", "on/off", "samples"])
    json_path, csv_path = write_results(rows, args.out, "ab_far")
    print(f"wrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
