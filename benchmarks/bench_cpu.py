"""CPU benchmark: batchnorm's layers against torch.nn's, interleaved in one process.

Shapes are ResNet-50's batch-norm layers at N = 16 (scaled to a small machine), the
layers of small networks such as the lab's (where per-call overhead matters), and the
lab's Figure 1 layer, BatchNorm1d on (60, 100), where it dominates. The "path" column
is the backend "auto" picked (numba kernels or aten's, see batchnorm._backends).
Modes: training forward+backward, eval forward (under no_grad), and eval
forward+backward (a layer in eval mode that passes gradients on, as in fine-tuning
with fixed statistics). Prints a table and writes JSON/CSV (default:
benchmarks/results/cpu.*).

    python benchmarks/bench_cpu.py [--repeats 30] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
from typing import Any

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

RESNET_SHAPES = [(16, 64, 56, 56), (16, 256, 56, 56), (16, 128, 28, 28),
                 (16, 512, 28, 28), (16, 1024, 14, 14), (16, 2048, 7, 7)]
FIG1_SHAPE = (60, 100)
SMALL_SHAPES = [(256, 128), (4096, 64), (8, 16, 8, 8), (16, 32, 16, 16), (16, 64, 16, 16),
                (32, 64, 32, 32)]


def _layers(shape: tuple[int, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    C = shape[1]
    if len(shape) == 2:
        return bn.BatchNorm1d(C), torch.nn.BatchNorm1d(C)
    return bn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)


def _path(x: torch.Tensor, training: bool) -> str:
    """The backend ``backend="auto"`` takes for plain batch norm on ``x``."""
    from batchnorm._backends import prefer_aten, select_backend

    return prefer_aten(select_backend("auto", x), x, training).name


def _train_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
    return step


def _eval_step(layer: torch.nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            layer(x)
    return step


def bench_shape(shape: tuple[int, ...], layout: str, repeats: int) -> list[dict[str, Any]]:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).mul_(2).add_(0.5).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    ours, theirs = _layers(shape)
    rows = []
    for mode in ("train fwd+bwd", "eval fwd", "eval fwd+bwd"):
        for layer in (ours, theirs):
            layer.train(mode.startswith("train"))
        if mode.endswith("fwd+bwd"):
            fns = {"batchnorm": _train_step(ours, x, dy), "torch": _train_step(theirs, x, dy)}
        else:
            fns = {"batchnorm": _eval_step(ours, x), "torch": _eval_step(theirs, x)}
        times = time_interleaved(fns, repeats)
        t_ours, t_torch = median_ms(times["batchnorm"]), median_ms(times["torch"])
        rows.append({
            "layer": type(ours).__name__, "shape": "x".join(map(str, shape)), "layout": layout,
            "dtype": "float32", "mode": mode, "path": _path(x, mode.startswith("train")),
            "batchnorm_ms": t_ours, "torch_ms": t_torch,
            "ratio": t_ours / t_torch, "repeats": len(times["batchnorm"]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="two shapes, 5 repeats")
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = args.pin_allocator and pin_allocator()
    torch.manual_seed(0)
    shapes = (
        [RESNET_SHAPES[0], FIG1_SHAPE] if args.quick
        else [*RESNET_SHAPES, *SMALL_SHAPES, FIG1_SHAPE]
    )
    repeats = 5 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        layouts = ["NCHW", "channels_last"] if len(shape) == 4 else ["NC"]
        for layout in layouts:
            new = bench_shape(shape, layout, repeats)
            for row in new:
                row["allocator_pinned"] = pinned
            rows += new
            print_table(rows[-3:], ["shape", "layout", "mode", "path", "batchnorm_ms", "torch_ms", "ratio"])
    print()
    print_table(rows, ["layer", "shape", "layout", "mode", "path", "batchnorm_ms", "torch_ms", "ratio"])
    json_path, csv_path = write_results(rows, args.out, "cpu")
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
