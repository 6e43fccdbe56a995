"""Shared pieces of the benchmark scripts: interleaved timing, environment, output.

Timings of two implementations are taken in the same process, alternating call by
call, so that drift of the machine (other load, frequency, cache state) hits both
alike; the figures quoted are medians and the ratio of medians.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 3,
    seed: int = 0,
    min_seconds: float = 0.1,
    max_repeats: int = 2000,
) -> dict[str, list[float]]:
    """Call each function ``warmup`` times, then ``repeats`` rounds of one call each,
    in a fresh random order every round; return the seconds per call for each name.

    Fast functions get more rounds, up to ``max_repeats``: enough for the slowest to
    run ``min_seconds`` in all (25 samples of a 100 µs call make a median that moves
    by 10 % between runs on a shared VM; a few hundred do not).

    Why random rather than rotating: a call's time depends on what ran just before it
    (on the 2-core VM of docs/benchmarks.md a layer called right after one of torch's
    ops ran ~10 us slower at 8x16x8x8 than after a numba kernel), and in a rotating
    order each function nearly always follows the same neighbour. Shuffled rounds
    give every function every predecessor equally often on average."""
    slowest = 0.0
    for i in range(warmup):
        for fn in fns.values():
            t0 = time.perf_counter()
            fn()
            if i == warmup - 1:
                # The last warm-up round only: the first call of a shape carries
                # one-time costs (a kernel's cache load, a plan) and would cut the
                # number of rounds to a fraction of the intended one.
                slowest = max(slowest, time.perf_counter() - t0)
    if slowest > 0:
        repeats = max(repeats, min(max_repeats, int(min_seconds / slowest)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every CPU benchmark script takes: ``--pin-allocator`` (see
    :func:`pin_allocator`) and ``--out``, the folder for its JSON and CSV."""
    parser.add_argument("--pin-allocator", action="store_true",
                        help="keep freed memory in the process (see _harness.py)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def pin_allocator() -> bool:
    """Ask glibc to keep freed memory in the process: no mmap'ed blocks (M_MMAP_MAX = 0)
    and no trimming of the heap (M_TRIM_THRESHOLD = 2 GiB). False where mallopt is
    unavailable or refuses.

    Without it, every large tensor (tens of MB) is a fresh mmap that the next call
    page-faults in again: on this VM that costs as much as the batch norm itself, moves
    timings by up to 2x between runs and hides the kernels' differences. Pinned, the
    process reuses its freed blocks, as a training loop's caching allocator would.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    )


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


def environment() -> dict[str, Any]:
    """Machine, date and versions, recorded with every result file."""
    import numpy

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
    }
    info.update(_cpu_model())
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    try:
        import batchnorm

        info["batchnorm"] = batchnorm.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def _cpu_model() -> dict[str, Any]:
    """The CPU's model name, family/model numbers and widest vector ISA, from
    /proc/cpuinfo (Linux; empty elsewhere). Shared VMs of one name can sit on different
    CPU generations, which moves kernel-vs-kernel ratios (AVX-512 or not)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {
        "cpu_model": fields.get("model name", ""),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cpu_vector_isa": isa,
    }


def write_results(rows: list[dict[str, Any]], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``rows`` with the environment as ``stem.json`` and the rows as ``stem.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    csv_path = out_dir / f"{stem}.csv"
    json_path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2))
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of the given columns."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
