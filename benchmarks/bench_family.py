"""CPU benchmark of the batch-norm family against the core BatchNorm, and of fold().

* Training forward+backward of GhostBatchNorm (virtual_batch_size = N/4), BatchRenorm
  (r_max=3, d_max=5) and BatchNormAct (relu; and relu with a residual whose gradient
  is needed, as in a residual block) against the core batchnorm.BatchNorm on the same
  shapes as bench_cpu.py (target: <= 1.5x). The BatchNormAct rows also carry the time
  of what a torch user writes instead, torch.nn.BatchNorm then the in-place add and
  ReLU as torchvision's ResNet blocks do (``peer_ms``, ``vs_peer``).
* Eval forward of small networks before and after fold() (target: folded <= 0.8x):
  a ResNet-18-style one (basic blocks of 3x3 convolutions), a ResNet-50-style one
  (bottleneck blocks) and a MobileNet-style one (depthwise-separable convolutions,
  where batch norm is a larger share of the time). Beside each, the same network with
  its batch norms removed: the floor no fold can go below.

Timings alternate call by call in one process (see _harness.py). Prints a table and
writes JSON/CSV (default: benchmarks/results/family.*).

``--pin-allocator``: see _harness.pin_allocator; recorded in the rows.

    python benchmarks/bench_family.py [--repeats 30] [--quick] [--pin-allocator] [--out DIR]
    python benchmarks/bench_family.py --fold-only --device cuda --fold-batch 256
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
from bench_cpu import FIG1_SHAPE, RESNET_SHAPES, SMALL_SHAPES
from torch import nn

import batchnorm as bn

COLUMNS = ["layer", "shape", "layout", "mode", "ms", "baseline_ms", "ratio"]
ACT_COLUMNS = ["layer", "shape", "layout", "ms", "peer_ms", "vs_peer"]

#: The BatchNormAct rows and the torch composite each is timed against.
PEERS = {"BNAct(relu)": "torch BN, relu_", "BNAct(relu,+res)": "torch BN, add_, relu_"}


def _layers(shape: tuple[int, ...]) -> dict[str, nn.Module]:
    """The core layer (the baseline) and the family layers for ``shape``."""
    C, n = shape[1], shape[0]
    dim = 1 if len(shape) < 4 else 2
    return {
        "BatchNorm": bn.create_norm("batch", C, dim=dim),
        "Ghost(N/4)": bn.create_norm("ghost", C, dim=dim, virtual_batch_size=max(1, n // 4)),
        "Renorm": bn.create_norm("renorm", C, dim=dim, r_max=3.0, d_max=5.0),
        "BNAct(relu)": bn.create_norm("batch_act", C, dim=dim, activation="relu"),
        "BNAct(relu,+res)": bn.create_norm("batch_act", C, dim=dim, activation="relu"),
    }


def _train_step(name: str, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor,
                residual: torch.Tensor):
    def step() -> None:
        x.grad = None
        residual.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x, residual) if name.endswith("+res)") else layer(x)
        y.backward(dy)
    return step


def _peer_step(residual_in: bool, layer: nn.Module, x: torch.Tensor, dy: torch.Tensor,
               residual: torch.Tensor):
    """torch's batch norm, then (with ``residual_in``) ``y += residual`` and
    ``relu_``: a torchvision ResNet block's tail, whose in-place ops save no copy."""
    def step() -> None:
        x.grad = None
        residual.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        if residual_in:
            y += residual
        torch.relu_(y).backward(dy)
    return step


def bench_shape(shape: tuple[int, ...], layout: str, repeats: int) -> list[dict[str, Any]]:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).mul_(2).add_(0.5).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    # The skip path of a residual block requires grad: BatchNormAct's backward then
    # writes the residual's gradient too, as in a real network.
    residual = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    layers = _layers(shape)
    fns = {name: _train_step(name, layer, x, dy, residual) for name, layer in layers.items()}
    torch_bn = nn.BatchNorm1d(shape[1]) if len(shape) < 4 else nn.BatchNorm2d(shape[1])
    for name, peer in PEERS.items():
        fns[peer] = _peer_step(name.endswith("+res)"), torch_bn, x, dy, residual)
    times = time_interleaved(fns, repeats)
    base = median_ms(times["BatchNorm"])
    rows = []
    for name in layers:
        if name == "BatchNorm":
            continue
        t = median_ms(times[name])
        row = {
            "layer": name, "shape": "x".join(map(str, shape)), "layout": layout,
            "dtype": "float32", "mode": "train fwd+bwd", "ms": t, "baseline_ms": base,
            "ratio": t / base, "repeats": len(times[name]),
        }
        if name in PEERS:
            peer = median_ms(times[PEERS[name]])
            row.update(peer=PEERS[name], peer_ms=peer, vs_peer=t / peer)
        rows.append(row)
    return rows


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = bn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = bn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def small_resnet(channels: int = 32, blocks: int = 3, classes: int = 10) -> nn.Module:
    """A ResNet-style network for 32x32 images: a stem and ``blocks`` basic blocks."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), bn.BatchNorm2d(channels), nn.ReLU(),
        *[_BasicBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


class _Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), each followed by BN."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = bn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = bn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = bn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(x + self.bn3(self.conv3(y)))


def small_bottleneck_resnet(channels: int = 128, blocks: int = 3, classes: int = 10) -> nn.Module:
    """A ResNet-50-style network for 32x32 images: bottleneck blocks of width
    ``channels/4``, so three BNs per block and cheap 1x1 convolutions."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), bn.BatchNorm2d(channels), nn.ReLU(),
        *[_Bottleneck(channels, channels // 4) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes),
    )


def small_mobilenet(channels: int = 64, blocks: int = 4, classes: int = 10) -> nn.Module:
    """A depthwise-separable network (MobileNet-style): cheap convolutions, so batch
    norm is a larger share of the time than in a 3x3-conv ResNet."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, channels, 3, padding=1, bias=False), bn.BatchNorm2d(channels), nn.ReLU()
    ]
    for _ in range(blocks):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            bn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1, bias=False), bn.BatchNorm2d(channels), nn.ReLU(),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


#: The small networks of the fold benchmark (and of bench_network's training steps).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet": small_resnet,
    "bottleneck resnet": small_bottleneck_resnet,
    "mobilenet": small_mobilenet,
}


def _without_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every batch norm replaced by Identity: the time no fold
    can beat (folding leaves only a bias, which the convolution adds for free)."""
    bare = copy.deepcopy(model)
    for parent in list(bare.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, bn.BatchNorm2d):
                setattr(parent, child_name, nn.Identity())
    return bare


def bench_fold(
    name: str, model: nn.Module, batch: int, repeats: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Eval time of ``model`` folded against unfolded, with the no-BN floor beside it:
    ``floor_ratio`` = (time without BN) / (unfolded time) = 1 − BN's share of the time,
    the best ratio any fold could reach on this model. On CUDA each call ends with a
    synchronize, so the host clock sees the kernels' time."""
    torch.manual_seed(0)
    model = model.to(device)
    with torch.no_grad():  # trained-looking statistics
        for m in model.modules():
            if isinstance(m, bn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded, count = bn.fold(copy.deepcopy(model))
    bare = _without_bn(model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with torch.no_grad():
        err = float((folded(x) - model(x)).abs().max() / model(x).abs().max())
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def run(m: nn.Module):
        def step() -> None:
            with torch.no_grad():
                m(x)
            sync()
        return step

    times = time_interleaved(
        {"unfolded": run(model), "folded": run(folded), "no_bn": run(bare)}, repeats
    )
    base, t = median_ms(times["unfolded"]), median_ms(times["folded"])
    floor = median_ms(times["no_bn"])
    return [{
        "layer": f"fold {name} ({count} BN)", "shape": f"{batch}x3x32x32", "layout": "NCHW",
        "dtype": "float32", "mode": "eval fwd (model)", "device": device, "ms": t,
        "baseline_ms": base, "ratio": t / base, "floor_ms": floor, "floor_ratio": floor / base,
        "repeats": len(times["folded"]), "max_rel_error": err,
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="two shapes, 5 repeats")
    parser.add_argument("--fold-only", action="store_true", help="only the fold benchmark")
    parser.add_argument("--device", default="cpu",
                        help="device of the fold benchmark (the layer tables are CPU only)")
    parser.add_argument("--fold-batch", type=int, default=32)
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = args.pin_allocator and pin_allocator()
    torch.manual_seed(0)
    shapes = (
        [RESNET_SHAPES[0], FIG1_SHAPE] if args.quick
        else [*RESNET_SHAPES, *SMALL_SHAPES, FIG1_SHAPE]
    )
    if args.fold_only:
        shapes = []
    repeats = 5 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        layouts = ["NCHW", "channels_last"] if len(shape) == 4 else ["NC"]
        for layout in layouts:
            new = bench_shape(shape, layout, repeats)
            for row in new:
                row["allocator_pinned"] = pinned
            rows += new
            print_table(new, COLUMNS)
            print_table([row for row in new if "peer" in row], ACT_COLUMNS)
    models = {name: build() for name, build in MODELS.items()}  # all before any fold
    fold_rows = [
        row
        for name, model in models.items()
        for row in bench_fold(name, model, args.fold_batch, repeats, args.device)
    ]
    rows += fold_rows
    print()
    print_table(rows, COLUMNS)
    print()
    print_table(fold_rows, [*COLUMNS, "floor_ms", "floor_ratio"])
    stem = "family" if args.device == "cpu" and not args.fold_only else f"fold_{args.device}"
    json_path, csv_path = write_results(rows, args.out, stem)
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
