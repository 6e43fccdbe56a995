"""Double backward: a gradient-penalty step through our layers and torch's, interleaved.

A step is the forward, the input gradient with ``create_graph=True`` (our layers then
build :func:`batchnorm._reference.differentiable_backward`'s graph, torch its own
double-backward graph) and the backward of |dx|² (as in WGAN-GP or R1 penalties).
Our batch norm, BatchNormAct (ReLU) and Ghost against torch's batch norm (with
``relu`` for BatchNormAct), call by call in a shuffled order
(_harness.time_interleaved); prints medians and ours/torch, writes JSON/CSV (default:
benchmarks/results/double_backward.*).

    python benchmarks/bench_double_backward.py [--repeats 30] [--quick] [--pin-allocator] [--out DIR]
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

CL = torch.channels_last
# (label, our layer, torch's layer, shape, memory format)
Factory = Callable[[int], nn.Module]
CASES: list[tuple[str, Factory, Factory, tuple[int, ...], torch.memory_format | None]] = [
    ("BatchNorm", bn.BatchNorm2d, nn.BatchNorm2d, (8, 16, 8, 8), None),
    ("BatchNorm", bn.BatchNorm2d, nn.BatchNorm2d, (16, 64, 16, 16), None),
    ("BatchNorm", bn.BatchNorm2d, nn.BatchNorm2d, (16, 64, 16, 16), CL),
    ("BatchNorm", bn.BatchNorm1d, nn.BatchNorm1d, (256, 128), None),
    ("BatchNormAct relu", lambda c: bn.BatchNormAct2d(c, "relu"),
     lambda c: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), (16, 64, 16, 16), None),
    ("Ghost (N/4)", lambda c: bn.GhostBatchNorm2d(c, virtual_batch_size=4), nn.BatchNorm2d,
     (16, 64, 16, 16), None),
]


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        (dx,) = torch.autograd.grad(layer(x), x, dy, create_graph=True)
        dx.pow(2).sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="two cases, 5 repeats")
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = pin_allocator() if args.pin_allocator else False
    cases = CASES[:1] + CASES[-2:-1] if args.quick else CASES
    repeats = 5 if args.quick else args.repeats
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, ours, theirs, shape, fmt in cases:
        x = 0.5 + 2.0 * torch.randn(shape, generator=gen)
        dy = torch.randn(shape, generator=gen)
        if fmt is not None:
            x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
        x.requires_grad_()
        times = time_interleaved(
            {"ours": _step(ours(shape[1]), x, dy), "torch": _step(theirs(shape[1]), x, dy)},
            repeats,
        )
        a, b = median_ms(times["ours"]), median_ms(times["torch"])
        rows.append({
            "layer": label, "shape": "x".join(map(str, shape)),
            "layout": "channels_last" if fmt is not None else "contiguous",
            "ours_ms": a, "torch_ms": b, "ours/torch": a / b, "samples": len(times["ours"]),
            "pinned_allocator": pinned,
        })
    print_table(rows, ["layer", "shape", "layout", "ours_ms", "torch_ms", "ours/torch", "samples"])
    json_path, csv_path = write_results(rows, args.out, "double_backward")
    print(f"wrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
