"""A/B of two versions of the numba kernels in one process, interleaved per call.

Loads ``src/batchnorm/kernels/numba_cpu.py`` of this checkout ("new") and another copy
of that module ("old", e.g. ``git show REV:src/batchnorm/kernels/numba_cpu.py >
/tmp/old.py``) under separate module names, so that both compile their own kernels,
and times each backend entry point on the same tensors with
:func:`_harness.time_interleaved` (shuffled order every round). Layer-level
benchmarks (bench_cpu, bench_family) compare a layer with torch's and cannot hold
two versions of a kernel at once; between commits their ratios move by 10-20% on a
shared VM, more than most kernel changes do. Prints a table, writes JSON/CSV
(default: benchmarks/results/ab_numba.*).

    python benchmarks/ab_numba.py --old /tmp/old.py [--far] [--repeats 40] [--quick]

``--far`` draws the data at 1e4 + 0.01·N(0, 1) (every channel far from zero), else
N(0.5, 2²).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

# numba's on-disk cache is keyed by the source file, and its entries name the module
# that compiled them: kernels cached here under the A/B's module names would break the
# package's own import of the same file. So this process caches elsewhere.
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="ab_numba_")

import torch
from _harness import (
    add_run_arguments,
    median_ms,
    pin_allocator,
    print_table,
    time_interleaved,
    write_results,
)

import batchnorm  # noqa: F401  (the package the kernel modules import from)

NEW = Path(__file__).resolve().parents[1] / "src" / "batchnorm" / "kernels" / "numba_cpu.py"
CL = torch.channels_last
SHAPES: list[tuple[tuple[int, ...], torch.memory_format | None]] = [
    ((16, 64, 56, 56), None), ((16, 1024, 14, 14), None), ((16, 2048, 7, 7), None),
    ((32, 64, 32, 32), None), ((16, 64, 56, 56), CL), ((16, 128, 28, 28), CL),
    ((32, 64, 32, 32), CL), ((4096, 64), None),
]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"ab_numba: cannot load a module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _calls(m: ModuleType, x: torch.Tensor, res: torch.Tensor, dy: torch.Tensor) -> dict[str, Any]:
    """The timed entry points of kernel module ``m`` on x (running statistics of its own)."""
    C = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    dims = [0, *range(2, x.dim())]
    rm, rv = x.mean(dims), x.var(dims)
    _, mean, invstd = m.BACKEND.forward_train(x, w, b, 1e-5, None, None, 0.1, None, None)
    return {
        "train fwd": lambda: m.BACKEND.forward_train(x, w, b, 1e-5, rm, rv, 0.1, None, None),
        "train bwd": lambda: m.BACKEND.backward_train(dy, x, w, mean, invstd),
        "eval": lambda: m.BACKEND.forward_eval(x, w, b, rm, rv, 1e-5),
        "act+res fwd": lambda: m._forward_train(
            x, w, b, 1e-5, rm, rv, 0.1, None, None, residual=res, activation="relu"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the other numba_cpu.py")
    parser.add_argument("--far", action="store_true", help="data at 1e4 + 0.01·N(0, 1)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="two shapes, 5 repeats")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.pin_allocator:
        pin_allocator()
    old, new = _load(args.old, "numba_cpu_old"), _load(NEW, "numba_cpu_new")
    shapes = SHAPES[:2] if args.quick else SHAPES
    repeats = 5 if args.quick else args.repeats
    rows = []
    for shape, fmt in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen)
        x = 1e4 + 0.01 * x if args.far else 0.5 + 2.0 * x
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        res, dy = torch.randn_like(x), torch.randn_like(x)
        a, b = _calls(old, x, res, dy), _calls(new, x, res, dy)
        for mode in a:
            times = time_interleaved({"old": a[mode], "new": b[mode]}, repeats)
            t_old, t_new = median_ms(times["old"]), median_ms(times["new"])
            rows.append({
                "shape": "x".join(map(str, shape)), "layout": "channels_last" if fmt else "dense",
                "mode": mode, "old_ms": t_old, "new_ms": t_new, "new/old": t_new / t_old,
            })
            print(f"{rows[-1]['shape']} {rows[-1]['layout']} {mode}: "
                  f"old {t_old:.3f} ms, new {t_new:.3f} ms, new/old {t_new / t_old:.3f}",
                  flush=True)
    stem = "ab_numba_far" if args.far else "ab_numba"
    json_path, csv_path = write_results(rows, args.out, stem)
    print()
    print_table(rows, ["shape", "layout", "mode", "old_ms", "new_ms", "new/old"])
    print(f"wrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
