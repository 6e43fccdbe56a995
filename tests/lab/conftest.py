"""Fixtures for the lab's tests: a private data cache, and the tiny preset of every
experiment run once per session (in this process) for the smoke and report tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def subprocess_env(cache: Path) -> dict[str, str]:
    """The environment for ``python -m batchnorm.lab`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH", "")]))
    env["BATCHNORM_CACHE"] = str(cache)
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache for the whole session, so the embedded sets are decoded once."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("BATCHNORM_CACHE")
    os.environ["BATCHNORM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BATCHNORM_CACHE", None)
    else:
        os.environ["BATCHNORM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_results(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """Every registered experiment on the tiny preset, in this process; the results dir."""
    from batchnorm.lab import suite
    from batchnorm.lab.runner import Runner

    out = tmp_path_factory.mktemp("results")
    with Runner(jobs=1, threads=1, progress=False) as runner:
        suite.run_all(["all"], "tiny", {}, out, runner, log=lambda _msg: None)
    return out


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def lab_env(cache_dir: Path) -> dict[str, str]:
    """Environment for subprocesses: this checkout's sources, the session's cache."""
    return subprocess_env(cache_dir)
