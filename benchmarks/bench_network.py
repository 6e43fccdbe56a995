"""A whole training step of small networks with this package's batch norm against the
same networks with torch's (CPU, float32).

One step is forward, cross-entropy, backward and an SGD update, so the batch norms are
timed where they run in practice: between convolutions (oneDNN, torch's thread pool)
and ReLUs, not alone. The two networks start from the same weights
(``batchnorm.convert(model, "torch")`` of a copy) and are called interleaved in one
process (``_harness.time_interleaved``); the ratio is ours / torch's, medians.

Models (``bench_family.MODELS``): the ResNet-style network of basic blocks, the
bottleneck one and the depthwise-separable one, in NCHW and channels_last, batch 64 of
3×32×32 by default.

    python benchmarks/bench_network.py [--repeats 20] [--batch 64] [--quick]
                                       [--pin-allocator] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
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
from bench_family import COLUMNS, MODELS
from torch import nn

import batchnorm as bn


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def bench_model(name: str, layout: str, batch: int, repeats: int) -> dict[str, Any]:
    """One row: a training step of ``name`` with our batch norm and with torch's."""
    torch.manual_seed(0)
    ours = MODELS[name]()
    theirs = bn.convert(copy.deepcopy(ours), "torch")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours, theirs = ours.to(memory_format=fmt), theirs.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (batch,))
    count = sum(isinstance(m, bn.BatchNorm2d) for m in ours.modules())
    times = time_interleaved(
        {"ours": _train_step(ours, x, target), "torch": _train_step(theirs, x, target)},
        repeats,
    )
    t, base = median_ms(times["ours"]), median_ms(times["torch"])
    return {
        "layer": f"train step {name} ({count} BN)", "shape": f"{batch}x3x32x32",
        "layout": layout, "dtype": "float32", "mode": "train step (model)", "ms": t,
        "baseline_ms": base, "ratio": t / base, "repeats": len(times["ours"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="the resnet only, 5 repeats")
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = args.pin_allocator and pin_allocator()
    names = ["resnet"] if args.quick else list(MODELS)
    repeats = 5 if args.quick else args.repeats
    rows = []
    for name in names:
        for layout in ("NCHW", "channels_last"):
            row = bench_model(name, layout, args.batch, repeats)
            row["allocator_pinned"] = pinned
            rows.append(row)
            print_table([row], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    json_path, csv_path = write_results(rows, args.out, "network")
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
