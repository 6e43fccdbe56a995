"""Benchmark the Triton batch-norm kernels against torch.nn.functional.batch_norm on a GPU.

One run measures the device-to-device copy bandwidth (the roofline), then, for every
shape x dtype x layout x mode, times ours and torch's with CUDA events, the L2 flushed
before every timed call (a 256 MB write), the two providers interleaved, and reports
medians. Before timing each case it checks that both produce the same result.

Effective bandwidth counts the bytes a perfect kernel must move (S = bytes of x):
forward-train 2S (read x, write y), backward 3S (read dy and x, write dx), eval 2S,
act-forward 3S (read x and the residual, write out), act-backward 5S (read dout, out
and x; write dx and the residual's gradient). It is reported as GB/s, as % of the
measured copy bandwidth, and as the ratio torch time / our time (> 1: we are faster).

torch's backward is timed through autograd (``torch.autograd.grad`` on a recorded
``F.batch_norm``), which is what a training step pays; ours calls the host function.
The fused modes compare ``act_forward_train``/``act_backward_train`` with torch's
separate ``F.batch_norm`` -> ``+ residual`` -> ``F.relu`` (and autograd for backward).

Results are written to ``--out`` as CSV (rows upserted, keyed by kernel, provider, mode,
shape, dtype, layout and device; with versions and a timestamp) and JSON (this run).

    python benchmarks/bench_cuda.py               # everything (a few minutes)
    python benchmarks/bench_cuda.py --quick       # a subset, fewer iterations
    python benchmarks/bench_cuda.py --modes forward-train --dtypes bfloat16 --path split

Nothing CUDA-specific is imported at module level: ``--help`` works anywhere, and
without a GPU the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RESNET50 = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
            (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
SHAPES = (
    [("resnet50", (256, c, h, h)) for c, h in RESNET50]
    + [("bn1d", (3136, 256))]
    + [("tiny", (4, 16, 64, 4)), ("tiny", (16, 16, 8, 48)), ("tiny", (20, 6, 65536))]
)
QUICK_SHAPES = [("resnet50", (256, 64, 112, 112)), ("resnet50", (256, 256, 56, 56)),
                ("resnet50", (256, 1024, 14, 14)), ("resnet50", (256, 2048, 7, 7)),
                ("bn1d", (3136, 256)), ("tiny", (4, 16, 64, 4)), ("tiny", (20, 6, 65536))]
MODES = ("forward-train", "backward", "eval", "act-forward", "act-backward")
BYTES_PER_S = {"forward-train": 2, "backward": 3, "eval": 2, "act-forward": 3,
               "act-backward": 5}
CSV_KEY = ("kernel", "provider", "mode", "shape", "dtype", "layout", "device")
CSV_FIELDS = list(CSV_KEY) + [
    "time_us", "gbps", "pct_copy", "speedup_vs_torch", "max_abs_err", "mismatch_frac", "plan",
    "copy_gbps",
    "torch_version", "triton_version", "cuda_version", "commit", "timestamp",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the Triton batch-norm kernels against torch on a CUDA GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a subset of shapes, fewer iterations")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="directory for bench_cuda.csv (upserted) and a JSON per run")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layouts", nargs="+", default=["NCHW", "channels_last"],
                   choices=["NCHW", "channels_last"])
    p.add_argument("--shapes", default="", help="only shapes whose 'AxBxC' name contains this")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default 30, quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5, quick 2)")
    p.add_argument("--path", choices=["auto", "fused", "split"], default="auto",
                   help="force the Triton path (TUNING.force_path), for tuning")
    p.add_argument("--flush-mb", type=int, default=256, help="L2 flush buffer size")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--cpu-interpret", action="store_true",
                   help="smoke-test this script without a GPU: tiny shapes on CPU tensors "
                        "under TRITON_INTERPRET=1 (timings meaningless)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# helpers (torch is imported by main, after argument parsing)
# ----------------------------------------------------------------------------------------
def _versions(torch) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=False,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": str(torch.version.cuda),
        "commit": commit or "unknown",
    }


class Timer:
    """CUDA-event timing with an L2 flush before every call; providers interleaved.
    (On the CPU smoke-test device: wall-clock timing, same flow.)"""

    def __init__(self, torch, flush_mb: int, device: str = "cuda"):
        self.torch = torch
        self.device = device
        self.flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device=device)

    def _pair(self):
        if self.device == "cuda":
            cuda = self.torch.cuda
            return cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        return _WallEvent(), _WallEvent()

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run(self, fns: dict[str, Callable[[], object]], iters: int, warmup: int) -> dict:
        for _ in range(warmup):
            for f in fns.values():
                f()
        self._sync()
        names = list(fns)
        events = {n: [self._pair() for _ in range(iters)] for n in names}
        for i in range(iters):
            order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
            for n in order:
                self.flush.zero_()
                start, end = events[n][i]
                start.record()
                fns[n]()
                end.record()
        self._sync()
        return {n: statistics.median(s.elapsed_time(e) for s, e in events[n]) * 1e-3
                for n in names}


class _WallEvent:
    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:  # milliseconds, like torch.cuda.Event
        return (end.t - self.t) * 1e3


def copy_bandwidth(torch, timer: Timer, iters: int) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes / time)."""
    n = 1 << 30 if timer.device == "cuda" else 1 << 24
    src = torch.empty(n, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    src.fill_(1)
    t = timer.run({"copy": lambda: dst.copy_(src)}, iters, 3)["copy"]
    return 2 * n / t / 1e9


def make_case(torch, F, H, shape, dtype, layout, mode, dev="cuda"):
    """(ours, theirs, check) for one case: the two timed callables, and check() ->
    (max |ours - reference|, fraction of elements off by more than the dtype's
    tolerance), the reference being torch's ops run in float32 on the same inputs
    (so that 16-bit rounding inside torch's separate ops is not counted against us)."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(shape, device=dev, dtype=dtype, generator=g) * 2 + 0.5
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    # parameters exactly representable in x's dtype, so every provider sees the same values
    w = (torch.rand(C, device=dev, generator=g) + 0.5).to(dtype).float()
    b = torch.randn(C, device=dev, generator=g).to(dtype).float()
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    rm_t, rv_t = rm.clone(), rv.clone()
    tracked = torch.zeros((), dtype=torch.int64, device=dev)
    skipped = torch.zeros((), dtype=torch.int64, device=dev)
    eps = 1e-5
    # torch gets float32 parameters and running stats with 16-bit x (the usual mixed-
    # precision set-up, which its CUDA kernels take); its CPU kernels (the smoke test) do not
    wd, bd = (w, b) if dev == "cuda" else (w.to(dtype), b.to(dtype))
    if dev != "cuda":
        rm_t, rv_t = rm_t.to(dtype), rv_t.to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    dy = torch.empty_like(x).copy_(torch.randn(shape, device=dev, dtype=dtype, generator=g))
    res = torch.empty_like(x).copy_(torch.randn(shape, device=dev, dtype=dtype, generator=g))
    x32, dy32, res32 = x.float(), dy.float(), res.float()

    def diff(a, c):
        """(max |a - c| / scale, fraction off by more than tol), scale = max(1, max |c|)."""
        scale = c.abs().max().clamp(min=1.0)
        d = (a.float() - c) / scale
        return d.abs().max().item(), (d.abs() > tol * (1 + c.abs() / scale)).float().mean().item()

    def worst(pairs):
        return tuple(max(p[i] for p in pairs) for i in range(2))

    def grads32(act: bool):
        xr, wr, br, rr = (t.detach().clone().requires_grad_() for t in (x32, w, b, res32))
        y = F.batch_norm(xr, None, None, wr, br, True, 0.1, eps)
        if act:
            y = F.relu(y + rr)
        out = torch.autograd.grad(y, (xr, wr, br, rr) if act else (xr, wr, br), dy32)
        return [o.float() for o in out]

    if mode == "forward-train":
        def ours():
            return H.BACKEND.forward_train(x, w, b, eps, rm, rv, 0.1, tracked, skipped)[0]

        def theirs():
            return F.batch_norm(x, rm_t, rv_t, wd, bd, True, 0.1, eps)

        return ours, theirs, lambda: diff(
            ours(), F.batch_norm(x32, None, None, w, b, True, 0.1, eps))
    if mode == "eval":
        def ours():
            return H.BACKEND.forward_eval(x, w, b, rm, rv, eps)

        def theirs():
            return F.batch_norm(x, rm_t, rv_t, wd, bd, False, 0.1, eps)

        return ours, theirs, lambda: diff(
            ours(), F.batch_norm(x32, rm.float(), rv.float(), w, b, False, 0.1, eps))
    if mode == "act-forward":
        def ours():
            return H.act_forward_train(x, w, b, eps, rm, rv, 0.1, tracked, skipped,
                                       residual=res, activation="relu")[0]

        def theirs():
            return F.relu(F.batch_norm(x, rm_t, rv_t, wd, bd, True, 0.1, eps) + res)

        return ours, theirs, lambda: diff(
            ours(), F.relu(F.batch_norm(x32, None, None, w, b, True, 0.1, eps) + res32))
    if mode == "backward":
        _, mean, invstd = H.BACKEND.forward_train(x, w, b, eps, None, None, 0.1, None, None)
        xr = x.detach().requires_grad_()
        wr, br = wd.detach().requires_grad_(), bd.detach().requires_grad_()
        y = F.batch_norm(xr, None, None, wr, br, True, 0.1, eps)

        def ours():
            return H.BACKEND.backward_train(dy, x, w, mean, invstd)

        def theirs():
            return torch.autograd.grad(y, (xr, wr, br), dy, retain_graph=True)

        def check():
            return worst([diff(a, c) for a, c in zip(ours(), grads32(False))])

        return ours, theirs, check
    if mode == "act-backward":
        out, mean, invstd, _ = H.act_forward_train(x, w, b, eps, None, None, 0.1,
                                                   residual=res, activation="relu")
        xr = x.detach().requires_grad_()
        wr, br = wd.detach().requires_grad_(), bd.detach().requires_grad_()
        rr = res.detach().requires_grad_()
        yt = F.relu(F.batch_norm(xr, None, None, wr, br, True, 0.1, eps) + rr)

        def ours():
            return H.act_backward_train(dy, out, x, w, b, mean, invstd,
                                        activation="relu", has_residual=True)

        def theirs():
            return torch.autograd.grad(yt, (xr, wr, br, rr), dy, retain_graph=True)

        def check():
            # a 16-bit pre-activation within a rounding error of 0 may fall on either side
            # of the relu, so a tiny mismatch fraction is expected there
            return worst([diff(a, c) for a, c in zip(ours(), grads32(True))])

        return ours, theirs, check
    raise ValueError(mode)


def upsert_csv(path: Path, rows: list[dict]) -> None:
    old: dict[tuple, dict] = {}
    if path.exists():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                old[tuple(r.get(k, "") for k in CSV_KEY)] = r
    for r in rows:
        old[tuple(str(r[k]) for k in CSV_KEY)] = {k: r.get(k, "") for k in CSV_FIELDS}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in old.values():
            w.writerow(r)


# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    dev = "cpu" if args.cpu_interpret else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was run.",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_cuda.py needs triton (pip install triton)", file=sys.stderr)
        return 2
    try:
        from batchnorm.kernels import triton_host as H
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))
        from batchnorm.kernels import triton_host as H
    import torch.nn.functional as F

    if args.path != "auto":
        H.TUNING.force_path = args.path
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
    else:
        props = argparse.Namespace(name="cpu (TRITON_INTERPRET=1 smoke test)",
                                   multi_processor_count=4, L2_cache_size=50 << 20,
                                   total_memory=0)
    # plan_for() below probes meta tensors: give the heuristics this device's figures
    H.TUNING.num_sms = props.multi_processor_count
    H.TUNING.l2_bytes = getattr(props, "L2_cache_size", None) or None
    iters = args.iters or (10 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if dev == "cpu":
        shapes = [("resnet50", (4, 8, 6, 6)), ("bn1d", (33, 12)), ("tiny", (2, 3, 65))]
        args.flush_mb = 1
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

    device = props.name
    meta = _versions(torch)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    timer = Timer(torch, args.flush_mb, dev)
    copy_gbps = copy_bandwidth(torch, timer, 20)
    print(f"# {device}: {props.multi_processor_count} SMs, "
          f"L2 {getattr(props, 'L2_cache_size', 0) >> 20} MB, "
          f"{props.total_memory / 2**30:.0f} GiB; torch {meta['torch_version']}, "
          f"triton {meta['triton_version']}, CUDA {meta['cuda_version']}, "
          f"commit {meta['commit']}")
    print(f"# device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    print(f"# {iters} timed iterations (median), {warmup} warm-up, L2 flushed "
          f"({args.flush_mb} MB) before each call, providers interleaved")
    header = (f"{'mode':14s} {'shape':18s} {'dtype':9s} {'layout':13s} {'ours us':>9s} "
              f"{'torch us':>9s} {'ours GB/s':>9s} {'%copy':>6s} {'torch GB/s':>10s} "
              f"{'speedup':>7s} {'max err':>8s} {'mismatch':>8s}  plan")
    print(header)
    rows: list[dict] = []
    errors: list[str] = []
    for mode in args.modes:
        for family, shape in shapes:
            name = "x".join(map(str, shape))
            if args.shapes and args.shapes not in name:
                continue
            for dt_name in args.dtypes:
                for layout in args.layouts:
                    if layout == "channels_last" and len(shape) not in (4, 5):
                        continue  # no channels_last format for 2D/3D tensors
                    dtype = dtypes[dt_name]
                    try:
                        ours, theirs, check = make_case(torch, F, H, shape, dtype, layout,
                                                        mode, dev)
                        err, mism = (float("nan"),) * 2 if args.no_check else check()
                        x_probe = torch.empty(shape, device="meta", dtype=dtype)
                        if layout == "channels_last":
                            x_probe = x_probe.to(memory_format=torch.channels_last)
                        pm = {"forward-train": "forward", "act-forward": "forward",
                              "eval": "eval"}.get(mode, "backward")
                        plan = H.plan_for(x_probe, pm)
                        plan_s = (f"{plan.path}/{plan.kernels}"
                                  f"{'/single' if plan.single_tile else ''}"
                                  f" x{plan.programs} split{plan.split}")
                        t = timer.run({"ours": ours, "torch": theirs}, iters, warmup)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        msg = f"{mode} {name} {dt_name} {layout}: {type(e).__name__}: {e}"
                        errors.append(msg + "\n" + traceback.format_exc(limit=3))
                        print("ERROR " + msg, flush=True)
                        if dev == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    nbytes = BYTES_PER_S[mode] * torch.Size(shape).numel() * dtype.itemsize
                    g_ours, g_torch = nbytes / t["ours"] / 1e9, nbytes / t["torch"] / 1e9
                    speedup = t["torch"] / t["ours"]
                    print(f"{mode:14s} {name:18s} {dt_name:9s} {layout:13s} "
                          f"{t['ours'] * 1e6:9.1f} {t['torch'] * 1e6:9.1f} {g_ours:9.0f} "
                          f"{100 * g_ours / copy_gbps:6.1f} {g_torch:10.0f} {speedup:7.2f} "
                          f"{err:8.1e} {mism:8.1e}  {plan_s}", flush=True)
                    kernel = "batchnorm_add_relu" if mode.startswith("act") else "batchnorm"
                    for provider, tt, gb in (("batchnorm-triton", t["ours"], g_ours),
                                             ("torch", t["torch"], g_torch)):
                        rows.append({
                            "kernel": kernel, "provider": provider, "mode": mode,
                            "shape": name, "dtype": dt_name, "layout": layout,
                            "device": device, "time_us": round(tt * 1e6, 3),
                            "gbps": round(gb, 1), "pct_copy": round(100 * gb / copy_gbps, 1),
                            "speedup_vs_torch": round(speedup if provider != "torch" else 1.0, 3),
                            "max_abs_err": err if provider != "torch" else "",
                            "mismatch_frac": mism if provider != "torch" else "",
                            "plan": plan_s if provider != "torch" else "",
                            "copy_gbps": round(copy_gbps, 1), "family": family,
                            **meta, "timestamp": stamp,
                        })
                    if dev == "cuda":
                        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    upsert_csv(out / "bench_cuda.csv", rows)
    run_json = out / f"bench_cuda_{stamp.replace(':', '').replace('+', 'Z')}.json"
    run_json.write_text(json.dumps({
        "device": device, "sms": props.multi_processor_count,
        "l2_bytes": getattr(props, "L2_cache_size", None), "copy_gbps": copy_gbps,
        "iters": iters, "warmup": warmup, "flush_mb": args.flush_mb, "path": args.path,
        "python": platform.python_version(), **meta, "timestamp": stamp,
        "rows": rows, "errors": errors,
    }, indent=1))
    print(f"# wrote {out / 'bench_cuda.csv'} and {run_json}")
    if errors:
        print(f"# {len(errors)} case(s) failed:", file=sys.stderr)
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    sys.exit(main())
