"""Running experiments end to end: configs checked first, then training, then one
``result.json`` per experiment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batchnorm.lab import results
from batchnorm.lab.config import ConfigError, LabConfig, to_dict, valid_keys
from batchnorm.lab.experiments import REGISTRY, Experiment, get
from batchnorm.lab.runner import Runner, dataset


def resolve(names: Sequence[str]) -> list[Experiment]:
    """Experiments by name, ``all`` meaning every registered one, duplicates dropped.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    out: list[Experiment] = []
    for name in names:
        for exp in (REGISTRY.values() if name == "all" else [get(name)]):
            if exp not in out:
                out.append(exp)
    return out


def configure(
    experiments: Sequence[Experiment], preset: str, overrides: dict[str, Any]
) -> list[LabConfig]:
    """Each experiment's config from its defaults, the preset and the overrides.

    A key must belong to at least one of the experiments (it is applied where it
    does); values are type-checked.

    Raises:
        ConfigError: a key no experiment knows (listing the valid keys) or a bad value.
    """
    known = {k for exp in experiments for k in valid_keys(exp.Config)}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r} for {', '.join(e.name for e in experiments)}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    return [exp.make_config(preset, overrides, strict=False) for exp in experiments]


def run_experiment(
    experiment: Experiment, config: LabConfig, preset: str, runner: Runner, out_dir: Path,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one experiment and save its record to ``out_dir/<name>/``; return the record."""
    started = results.now()
    t0 = time.perf_counter()
    data = dataset(config.data)
    experiment.check_data(config, data)
    runs, notes = experiment.run(config, runner)
    record = results.clean({
        "experiment": experiment.name,
        "title": experiment.title,
        "preset": preset,
        "config": to_dict(config),
        "overrides": dict(overrides or {}),
        "data": data.describe(),
        "environment": {**results.environment(), "torch_threads_per_run": runner.threads,
                        "jobs": runner.jobs},
        "started": started,
        "wall_s": time.perf_counter() - t0,
        "notes": notes,
        "runs": [r.to_dict() for r in runs],
    })
    # The analysis saved alongside is the report's, computed from the same clean record.
    record["analysis"] = results.clean(experiment.analyze(record).to_dict())
    results.save_record(out_dir / experiment.name, record)
    return record


def run_all(
    names: Sequence[str], preset: str, overrides: dict[str, Any], out_dir: Path,
    runner: Runner, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Check every config and data spec, then run the experiments one after another."""
    experiments = resolve(names)
    configs = configure(experiments, preset, overrides)
    for exp, config in zip(experiments, configs):
        # a bad data spec, or a config that does not fit the data, fails here, before
        # any training
        exp.check_data(config, dataset(config.data))
    records = []
    for exp, config in zip(experiments, configs):
        log(f"{exp.name}: {exp.title} [{preset}, {config.seeds} seeds, data {config.data}]")
        record = run_experiment(exp, config, preset, runner, out_dir, overrides)
        n_div = sum(r["outcome"] == "diverged" for r in record["runs"])
        log(f"  {len(record['runs'])} runs ({n_div} diverged) in {record['wall_s']:.1f} s "
            f"-> {out_dir / exp.name / results.RESULT_FILE}")
        for v in record["analysis"]["verdicts"]:
            log(f"  claim {v['claim']}: {v['verdict'].upper()}: {v['measured']}")
        records.append(record)
    return records
