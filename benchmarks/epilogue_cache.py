"""How much the residual epilogue's extra memory costs, by tensor size: bare output loops.

BatchNormAct with a residual writes ``y = relu(x·k + b + res)`` and the bool mask
``z > 0`` in its output pass, where plain batch norm writes ``y = x·k + b``: two more
tensors (the residual read, the mask written). Whether that costs the ratio of the
bytes moved, or more, depends on whether each pass's tensors stay in the last-level
cache from one call to the next. This script times the two loops alone (no statistics,
no Python glue; numba, threaded as the kernels are) on channels_last-shaped (M, C)
float32 data of several sizes, interleaved in one process, outputs allocated per call
as the kernels allocate them, and prints the ratio. Writes JSON/CSV (default:
benchmarks/results/epilogue_cache.*).

    python benchmarks/epilogue_cache.py [--repeats 40] [--pin-allocator] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile

# Scratch kernels: cached apart from the package's own (see ab_numba.py).
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="epilogue_cache_"))

import numba
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

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_pjit = numba.njit(fastmath=_FASTMATH, nogil=True, error_model="numpy", parallel=True)

#: (N, C, H, W) shapes whose tensors are 3.2 to 51 MB in float32.
SHAPES = [(16, 64, 28, 28), (16, 128, 28, 28), (32, 64, 32, 32), (16, 64, 56, 56),
          (16, 256, 56, 56)]
COLUMNS = ["shape", "tensor_mb", "plain_ms", "residual_ms", "ratio"]


@_pjit
def _plain(x, k, b, y, parts):  # pragma: no cover
    """y = x·k + b over (M, C) rows, in ``parts`` row ranges over the threads."""
    M, C = x.shape
    for p in numba.prange(parts):
        r0, r1 = p * M // parts, (p + 1) * M // parts
        kk, bb = k.copy(), b.copy()  # fresh: provably apart from y, so it vectorizes
        for r in range(r0, r1):
            for c in range(C):
                y[r, c] = x[r, c] * kk[c] + bb[c]


@_pjit
def _residual(x, k, b, res, y, mask, parts):  # pragma: no cover
    """y = relu(x·k + b + res) and mask = z > 0, as BatchNormAct's output pass."""
    M, C = x.shape
    for p in numba.prange(parts):
        r0, r1 = p * M // parts, (p + 1) * M // parts
        kk, bb = k.copy(), b.copy()
        for r in range(r0, r1):
            for c in range(C):
                z = x[r, c] * kk[c] + bb[c] + res[r, c]
                y[r, c] = z if z > 0 else 0.0
                mask[r, c] = z > 0


def _rows(t: torch.Tensor) -> np.ndarray:
    """A channels_last (N, C, H, W) tensor's memory as (N·H·W, C), no copy."""
    n, c, h, w = t.shape
    return t.numpy().transpose(0, 2, 3, 1).reshape(n * h * w, c)


def bench(shape: tuple[int, ...], repeats: int) -> dict[str, object]:
    cl = torch.channels_last
    x = torch.randn(shape).contiguous(memory_format=cl)
    res = torch.randn(shape).contiguous(memory_format=cl)
    k, b = np.random.rand(shape[1]).astype(np.float32), np.random.randn(shape[1]).astype(np.float32)
    xa, ra = _rows(x), _rows(res)
    parts = numba.get_num_threads()

    def plain() -> None:
        y = torch.empty_like(x)
        _plain(xa, k, b, _rows(y), parts)

    def residual() -> None:
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.bool)
        _residual(xa, k, b, ra, _rows(y), _rows(mask), parts)

    times = time_interleaved({"plain": plain, "residual": residual}, repeats)
    p, r = median_ms(times["plain"]), median_ms(times["residual"])
    return {
        "shape": "x".join(map(str, shape)), "layout": "channels_last", "dtype": "float32",
        "tensor_mb": x.numel() * 4 / 1e6, "plain_ms": p, "residual_ms": r, "ratio": r / p,
        "threads": parts, "repeats": len(times["plain"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    add_run_arguments(parser)
    args = parser.parse_args()
    pinned = args.pin_allocator and pin_allocator()
    torch.manual_seed(0)
    rows = [{**bench(shape, args.repeats), "allocator_pinned": pinned} for shape in SHAPES]
    print_table(rows, COLUMNS)
    json_path, csv_path = write_results(rows, args.out, "epilogue_cache")
    print(f"\nwrote {json_path} and {csv_path}")


if __name__ == "__main__":
    main()
