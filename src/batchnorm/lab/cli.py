"""The ``batchnorm`` command.

::

    batchnorm --version
    batchnorm lab list
    batchnorm lab run NAME... [--preset quick|full|tiny] [--seeds N] [--out DIR]
                              [--data SPEC] [--jobs N] [--threads N] [--overwrite]
                              [--key=value ...]
    batchnorm lab run all
    batchnorm lab report DIR [-o FILE]

``python -m batchnorm.lab ...`` is the same as ``batchnorm lab ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from batchnorm.lab.config import PRESETS, ConfigError, parse_override_args

DEFAULT_OUT = "lab-results"


def _version() -> str:
    try:
        import batchnorm

        version = getattr(batchnorm, "__version__", None)
    except ImportError:
        version = None
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("batchnorm")
        except Exception:  # noqa: BLE001 - no metadata (running from a source tree)
            version = "unknown"
    return f"batchnorm {version}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="Batch normalization for PyTorch, and a lab that tests "
        "its claims.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=_version())
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    lab = top.add_parser("lab", help="train networks with and without BN and report",
                         allow_abbrev=False)
    lab.add_argument("--version", action="version", version=_version())
    lab.set_defaults(lab_parser=lab)
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")

    sub.add_parser("list", help="list the experiments, their claims and config keys",
                   allow_abbrev=False)

    run = sub.add_parser(
        "run", allow_abbrev=False,
        help="run experiments (or 'all') and write the report",
        description="Run experiments and write DIR/<name>/result.json and DIR/report.html. "
        "Any config key can be set with --key=value (see 'batchnorm lab list'). Rerunning "
        "the same command into DIR replaces its results; a run that would replace a result "
        "of a different run (another --preset, --seeds, --data or --key=value) is refused "
        "before training unless --overwrite is given. Other experiments' results stay.",
    )
    run.add_argument("names", nargs="+", metavar="NAME", help="experiment names, or 'all'")
    run.add_argument("--preset", choices=PRESETS, default="quick",
                     help="tiny (seconds, for tests), quick (default), full (paper scale)")
    run.add_argument("--seeds", type=int, help="seeds per configuration (overrides the preset)")
    run.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                     help=f"results directory (default {DEFAULT_OUT})")
    run.add_argument("--data", help="data spec: mnist (default), mnist1d, digits, synthetic, "
                     "mnist:DIR, fashion:DIR, cifar10:DIR")
    run.add_argument("--jobs", type=int, default=None,
                     help="worker processes (default: one per core)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    run.add_argument("--no-report", action="store_true", help="do not write the report")
    run.add_argument("--overwrite", action="store_true",
                     help="replace saved results of a different run (another preset, seed "
                     "count, data set or --key=value); without it such a run is refused")

    report = sub.add_parser("report", help="write the HTML report of a results directory",
                            allow_abbrev=False)
    report.add_argument("dir", type=Path, help="a results directory")
    report.add_argument("-o", "--output", type=Path, default=None,
                        help="output file (default DIR/report.html)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``batchnorm`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command != "lab" or args.lab_command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "lab":
            args.lab_parser.print_help()  # the lab's own help: list, run, report
            return 2
        parser.print_help()
        return 0 if args.command is None else 2
    if extra and args.lab_command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.lab_command == "list":
            return _list()
        if args.lab_command == "report":
            return _report(args.dir, args.output)
        return _run(args, extra)
    except (ConfigError, KeyError, ValueError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"batchnorm lab: error: {message}", file=sys.stderr)
        return 2


def _check_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed; raise ValueError unless it is a directory we can write."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: expected a directory, got the file {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what}: cannot create the directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: the directory {path} is not writable")


def _list() -> int:
    from batchnorm.lab.config import field_types
    from batchnorm.lab.experiments import REGISTRY

    for exp in REGISTRY.values():
        config = exp.make_config("quick")
        print(f"{exp.name}\n  {exp.title}\n  {exp.description}")
        types = field_types(exp.Config)
        keys = ", ".join(
            f"{k}={_show(getattr(config, k))}" for k in types
        )
        print(f"  keys (quick defaults): {keys}")
        for preset in ("tiny", "full"):
            changes = exp.make_config(preset)
            diff = [f"{k}={_show(getattr(changes, k))}" for k in types
                    if getattr(changes, k) != getattr(config, k)]
            print(f"  {preset}: " + (", ".join(diff) or "same"))
        print()
    return 0


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _report(directory: Path, output: Path | None) -> int:
    from batchnorm.lab import report

    if output is not None and output.is_dir():
        raise ValueError(f"--output: expected a file name, got the directory {output}")
    if output is not None and output.parent.exists() and not output.parent.is_dir():
        raise ValueError(f"--output: {output.parent} is a file, not a directory")
    path = report.build(directory, output)
    print(f"report: {path}")
    return 0


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    from batchnorm.lab import report, suite
    from batchnorm.lab.data import DataError
    from batchnorm.lab.runner import Runner, check_workers, default_jobs

    # Everything that can be wrong with the command is checked before the results
    # directory is created: a refused command leaves nothing behind.
    overrides: dict[str, object] = dict(parse_override_args(extra))
    if args.seeds is not None:
        overrides["seeds"] = str(args.seeds)
    if args.data is not None:
        overrides["data"] = args.data
    jobs = args.jobs if args.jobs is not None else default_jobs()
    check_workers(jobs, args.threads, prefix="--")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out: expected a directory, got the file {args.out}")
    try:
        plan = suite.prepare(args.names, args.preset, overrides)
    except DataError as exc:
        print(f"batchnorm lab: data error: {exc}", file=sys.stderr)
        return 2
    suite.check_replace(plan, args.preset, overrides, args.out, args.overwrite)
    _check_writable_dir(args.out, "--out")  # before training, not after it
    t0 = time.perf_counter()
    with Runner(jobs=jobs, threads=args.threads) as runner:
        suite.run_plan(plan, args.preset, overrides, args.out, runner)
    if not args.no_report:
        path = report.build(args.out)
        print(f"report: {path.resolve()}")
    print(f"total time: {time.perf_counter() - t0:.1f} s")
    return 0
