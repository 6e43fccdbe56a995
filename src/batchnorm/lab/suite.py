"""Running experiments end to end: configs checked first, then training, then one
``result.json`` per experiment.
"""

from __future__ import annotations

import json
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


Plan = list[tuple[Experiment, LabConfig]]


def prepare(names: Sequence[str], preset: str, overrides: dict[str, Any]) -> Plan:
    """Each named experiment with its checked config, every data spec loaded and every
    config checked against its data: whatever can be wrong fails here, before training.

    Raises:
        KeyError: an unknown experiment name.
        ConfigError: an unknown key, a bad value, or a config that does not fit its data.
        DataError: a data spec that cannot be loaded.
    """
    experiments = resolve(names)
    configs = configure(experiments, preset, overrides)
    for exp, config in zip(experiments, configs):
        exp.check_data(config, dataset(config.data))
    return list(zip(experiments, configs))


def replaced_difference(
    saved: Any, preset: str, config: LabConfig, overrides: dict[str, Any]
) -> str | None:
    """How the saved record ``saved`` differs from a run of ``config`` under ``preset``
    and ``overrides``, in words (the first difference); None if it is a rerun of the
    same command.

    The same command means the same preset and, for every key set on the command line
    of either run (``--seeds`` and ``--data`` included), the same value. Keys set on
    neither are not compared: a default that changed with the code is not the user's
    choice, and a rerun after an update should replace its results.
    """
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        return "not a lab result"
    if saved.get("preset") != preset:
        return f"saved: preset {saved.get('preset')}; this run: preset {preset}"
    saved_overrides = saved.get("overrides")
    keys = set(valid_keys(type(config)))
    set_keys = {*(saved_overrides if isinstance(saved_overrides, dict) else {}), *overrides}
    new = results.clean(to_dict(config))
    for key in sorted(set_keys & keys):
        old = saved["config"].get(key)
        if old != new[key]:
            return f"saved: {key}={_show(old)}; this run: {key}={_show(new[key])}"
    return None


def _show(value: Any) -> str:
    """A config value as a command line spells it."""
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return "none" if value is None else str(value)


def check_replace(
    plan: Plan, preset: str, overrides: dict[str, Any], out_dir: Path, overwrite: bool = False,
) -> None:
    """Refuse to replace a saved result of a different run unless ``overwrite``.

    A rerun of the same command replaces its results (see :func:`replaced_difference`);
    a run with another preset, seed count, data set or override would silently destroy
    a record that may have taken hours (a ``full`` one replaced by a stray ``tiny``),
    so it needs ``overwrite``. Checked before training, so a refused run trains nothing.

    Raises:
        ValueError: one or more results would be replaced; the message names each file
            and how it differs.
    """
    if overwrite:
        return
    conflicts: list[tuple[Path, str]] = []
    for exp, config in plan:
        path = out_dir / exp.name / results.RESULT_FILE
        if not path.exists():
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # a damaged file may still be worth a look
            difference: str | None = f"cannot be read ({exc})"
        else:
            difference = replaced_difference(saved, preset, config, overrides)
        if difference is not None:
            conflicts.append((path, difference))
    if len(conflicts) == 1:
        path, difference = conflicts[0]
        raise ValueError(f"--out: {path} holds a different run ({difference}); pass "
                         "--overwrite to replace it, or choose another --out")
    if conflicts:
        raise ValueError(
            f"--out: {len(conflicts)} saved results hold a different run; pass --overwrite "
            "to replace them, or choose another --out:"
            + "".join(f"\n  {path} ({difference})" for path, difference in conflicts))


def run_plan(
    plan: Plan, preset: str, overrides: dict[str, Any], out_dir: Path, runner: Runner,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run prepared experiments one after another, saving each record as it ends."""
    records = []
    for exp, config in plan:
        log(f"{exp.name}: {exp.title} [{preset}, {config.seeds} seeds, data {config.data}]")
        record = run_experiment(exp, config, preset, runner, out_dir, overrides)
        n_div = sum(r["outcome"] == "diverged" for r in record["runs"])
        log(f"  {len(record['runs'])} runs ({n_div} diverged) in {record['wall_s']:.1f} s "
            f"-> {out_dir / exp.name / results.RESULT_FILE}")
        for v in record["analysis"]["verdicts"]:
            check = " (check)" if v.get("check") else ""
            log(f"  claim {v['claim']}{check}: {v['verdict'].upper()}: {v['measured']}")
        records.append(record)
    return records


def run_all(
    names: Sequence[str], preset: str, overrides: dict[str, Any], out_dir: Path,
    runner: Runner, log: Callable[[str], None] = print, overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Check every config, data spec and saved result that would be replaced (see
    :func:`check_replace`), then run the experiments one after another."""
    plan = prepare(names, preset, overrides)
    check_replace(plan, preset, overrides, out_dir, overwrite)
    return run_plan(plan, preset, overrides, out_dir, runner, log)
