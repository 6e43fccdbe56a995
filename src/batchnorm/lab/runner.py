"""Executes an experiment's runs, in this process or in worker processes.

Runs are independent, so with ``jobs > 1`` they go to a pool of spawned worker
processes, each with ``threads`` torch threads. The numbers do not depend on
``jobs``: every run builds its own model and batch order from its seed. Small
MLPs use one core poorly with several threads, so one thread per run, one run per
core is the fast arrangement on a small machine.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from types import TracebackType
from typing import Any

import torch

from batchnorm.lab import data as data_module
from batchnorm.lab.models import RNNSpec
from batchnorm.lab.train import RunResult, RunSpec, train

_LOADED: dict[str, data_module.Dataset] = {}


def dataset(spec: str) -> data_module.Dataset:
    """Load a data set once per process."""
    if spec not in _LOADED:
        _LOADED[spec] = data_module.load(spec)
    return _LOADED[spec]


def default_jobs() -> int:
    """One worker per available core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _cost(spec: RunSpec) -> int:
    """A rough run time: steps times layers (times time steps) times batch size."""
    model = spec.model
    depth = (model.sequence_length if isinstance(model, RNNSpec)
             else len(model.hidden) + 1)
    return spec.train.steps * depth * spec.train.batch_size


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    # numba (one of the library's CPU backends) gets the same count, or parallel
    # workers oversubscribe the cores. Set at run time, not through NUMBA_NUM_THREADS:
    # changing that variable in a process whose numba pool already runs makes numba's
    # next compilation raise.
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _run_in_worker(spec: RunSpec) -> RunResult:
    return train(spec, dataset(spec.data))


def check_workers(jobs: int, threads: int, prefix: str = "") -> None:
    """ValueError unless ``jobs`` and ``threads`` are at least 1; the message names
    each as ``prefix + name`` (the command line's ``--jobs``)."""
    for name, value in (("jobs", jobs), ("threads", threads)):
        if value < 1:
            raise ValueError(f"{prefix}{name}: expected an int >= 1, got {value}")


class Runner:
    """Runs :class:`RunSpec` lists and shows one progress bar per call.

    Use as a context manager so the worker pool is shut down::

        with Runner(jobs=2) as runner:
            results = runner.run(specs, desc="fig1")

    Args:
        jobs: worker processes; 1 runs everything in this process.
        threads: torch threads per run.
        progress: show a bar; default only when stdout is a terminal.
    """

    def __init__(self, jobs: int = 1, threads: int = 1, progress: bool | None = None):
        check_workers(jobs, threads)
        self.jobs = jobs
        self.threads = threads
        self.progress = sys.stdout.isatty() if progress is None else progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:  # noqa: PYI034 - Runner is final
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Shut the worker pool down (if one was started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", disable=not self.progress,
                    dynamic_ncols=True, leave=False)

    def run(self, specs: Sequence[RunSpec], desc: str = "") -> list[RunResult]:
        """Run every spec; results come back in the order of ``specs``."""
        total = sum(s.train.steps for s in specs)
        with self._bar(total, desc) as bar:
            if self.jobs == 1 or len(specs) == 1:
                previous = torch.get_num_threads()
                torch.set_num_threads(self.threads)
                try:
                    return [train(s, dataset(s.data), on_steps=bar.update) for s in specs]
                finally:
                    torch.set_num_threads(previous)
            # Load (and cache) the data here first, so workers only read the cache.
            for spec_data in {s.data for s in specs}:
                dataset(spec_data)
            pool = self._get_pool()
            # Longest runs first, so no worker is left with a long run at the end.
            order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))
            futures: dict[int, Future[RunResult]] = {}
            for i in order:
                futures[i] = pool.submit(_run_in_worker, specs[i])
                futures[i].add_done_callback(lambda _f, n=specs[i].train.steps: bar.update(n))
            return [futures[i].result() for i in range(len(specs))]

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: a forked child of a process that has used OpenMP threads
            # can deadlock.
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )
        return self._pool
