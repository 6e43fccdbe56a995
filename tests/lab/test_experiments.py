"""Smoke tests: every experiment on the tiny preset writes finite numbers and verdicts."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from batchnorm.lab import stats
from batchnorm.lab.experiments import REGISTRY
from batchnorm.lab.experiments.base import VERDICTS, Analysis
from batchnorm.lab.results import RESULT_FILE, ROWS_FILE, load_records


@pytest.mark.parametrize("name", list(REGISTRY))
def test_tiny_run_writes_results(tiny_results: Path, name: str) -> None:
    directory = tiny_results / name
    assert (directory / RESULT_FILE).is_file() and (directory / ROWS_FILE).is_file()
    record = json.loads((directory / RESULT_FILE).read_text())
    assert record["experiment"] == name and record["preset"] == "tiny"
    env = record["environment"]
    for key in ("torch", "numpy", "batchnorm", "python"):
        assert env[key]
    assert "git_commit" in env  # None outside a git checkout
    assert record["runs"], "no runs"
    for run in record["runs"]:
        assert run["outcome"] in ("completed", "diverged")
        assert run["model"]["layers"] and run["model"]["parameters"] > 0
        for row in run["rows"]:
            assert row["split"] in ("train", "test")
            if run["outcome"] == "completed":
                assert math.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert {r["seed"] for r in record["runs"]} == set(range(record["config"]["seeds"]))
    with open(directory / ROWS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(r["rows"]) for r in record["runs"])


@pytest.mark.parametrize("name", list(REGISTRY))
def test_analysis_is_recomputed_identically(tiny_results: Path, name: str) -> None:
    (record,) = [r for r in load_records(tiny_results) if r["experiment"] == name]
    analysis = REGISTRY[name].analyze(record)
    assert isinstance(analysis, Analysis) and analysis.verdicts
    assert json.loads(json.dumps(analysis.to_dict(), default=str)) == json.loads(
        json.dumps(record["analysis"], default=str))
    for verdict in analysis.verdicts:
        assert verdict.verdict in VERDICTS
        assert verdict.measured and verdict.criterion and verdict.statement
    figures = REGISTRY[name].figures(record)
    assert figures and all(caption for caption, _ in figures)


def test_bn_runs_use_the_library(tiny_results: Path) -> None:
    record = json.loads((tiny_results / "fig1" / RESULT_FILE).read_text())
    bn = [r for r in record["runs"] if r["label"] == "BN"]
    assert bn and all(r["model"]["norm_class"].startswith("batchnorm.") for r in bn)
    assert all(r["model"]["linear_bias"] == [False] * 3 for r in bn)


def test_claims_covered(tiny_results: Path) -> None:
    claims = {v["claim"] for r in load_records(tiny_results) for v in r["analysis"]["verdicts"]}
    assert set(range(1, 12)) <= claims


def test_stats_rules() -> None:
    assert stats.separated([3, 4], [1, 2]) and not stats.separated([2, 4], [1, 3])
    run = {"outcome": "completed", "rows": [
        {"step": 0, "split": "test", "accuracy": 0.1, "loss": 2.3},
        {"step": 10, "split": "test", "accuracy": 0.5, "loss": 1.0},
        {"step": 20, "split": "test", "accuracy": 0.7, "loss": 0.8},
    ]}
    assert stats.steps_to_reach(run, 0.5) == 10 and stats.steps_to_reach(run, 0.9) is None
    # The untrained network (step 0) reaching a target does not count, nor does a run
    # that diverged later.
    assert stats.steps_to_reach(run, 0.05) == 10
    assert stats.steps_to_reach({**run, "outcome": "diverged"}, 0.5) is None
    assert stats.final_accuracy(run, 0.1) == pytest.approx((0.1 + 0.5 + 0.7) / 3)
    assert stats.final_accuracy({**run, "outcome": "diverged"}, 0.1) == 0.1


def test_divergence_everywhere_still_gives_verdicts_and_a_report(
    tmp_path: Path, cache_dir: Path
) -> None:
    from batchnorm.lab import report, suite
    from batchnorm.lab.runner import Runner

    overrides = {"data": "synthetic", "lr_grid": "1e5", "seeds": "2", "steps": "20"}
    with Runner(jobs=1, progress=False) as runner:
        (record,) = suite.run_all(["speedup"], "tiny", overrides, tmp_path, runner,
                                  log=lambda _m: None)
    assert any(r["outcome"] == "diverged" for r in record["runs"])
    assert all(v["verdict"] in VERDICTS for v in record["analysis"]["verdicts"])
    assert "diverged" in report.build(tmp_path).read_text()


def test_every_experiment_survives_rates_that_break_training(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Rates of 1e6 everywhere: runs diverge or end at chance, probes meet non-finite
    weights, and still every experiment writes verdicts and the report builds."""
    from batchnorm.lab import report, suite
    from batchnorm.lab.runner import Runner

    names = ["regularization", "batchsize", "inference", "placement", "rnn", "smoothness"]
    overrides = {"lr": "1e6", "noisy_lr": "1e6", "lr_grid": "1e6", "base_lr": "1e6"}
    with Runner(jobs=1, progress=False) as runner:
        records = suite.run_all(names, "tiny", overrides, tmp_path, runner,
                                log=lambda _m: None)
    for record in records:
        verdicts = record["analysis"]["verdicts"]
        assert verdicts and all(v["verdict"] in VERDICTS for v in verdicts)
        # nothing broken is called supported
        assert all(v["verdict"] != "supported" for v in verdicts
                   if record["experiment"] == "batchsize")
    assert report.build(tmp_path).is_file()


# Claims that credit a network's learning, by experiment: (claim, words of the statement).
_LEARNING_CLAIMS = {
    "fig1": [(1, "fewer steps")],
    "speedup": [(1, "fewer steps"), (3, "higher learning rates")],
    "init": [(4, "less sensitive")],
    "regularization": [(5, "regularizes"), (5, "need for dropout")],
    "batchsize": [(6, "degrade less")],
    "placement": [(8, "redundant")],
    "rnn": [(9, "")],
    "smoothness": [(10, "")],
}


def _at_chance(record: dict, chance: float) -> dict:
    """The record with every accuracy of every run replaced by chance."""
    import copy

    out = copy.deepcopy(record)
    for run in out["runs"]:
        for row in run["rows"]:
            if "accuracy" in row:
                row["accuracy"] = chance
    return out


def test_networks_at_chance_support_no_claim_about_learning(tiny_results: Path) -> None:
    """A network that learned nothing "reaches" chance-level targets at once, is near its
    best at every scale, has a flat landscape: none of that may read as support."""
    from batchnorm.lab.experiments import REGISTRY

    for record in load_records(tiny_results):
        claims = _LEARNING_CLAIMS.get(record["experiment"])
        if not claims:
            continue
        chance = 1.0 / record["data"]["classes"]
        analysis = REGISTRY[record["experiment"]].analyze(_at_chance(record, chance))
        for claim, words in claims:
            matched = [v for v in analysis.verdicts if v.claim == claim and words in v.statement]
            assert matched, (record["experiment"], claim, words)  # the test is not vacuous
            for v in matched:
                assert v.verdict != "supported", (record["experiment"], v.statement)


def test_seed_spread_and_training_rules() -> None:
    assert not stats.separated([0.9], [0.1])  # one seed has no spread to compare
    assert stats.separated([0.9, 0.8], [0.1, 0.2])
    rows = [{"step": 10 * i, "split": "test", "accuracy": a}
            for i, a in enumerate((0.1, 0.9, 0.9, 0.9))]
    run = {"outcome": "completed", "rows": rows}
    assert stats.trained(run, 0.1)  # final 0.9 >= 0.55, halfway from chance to 100%
    assert not stats.trained({**run, "outcome": "diverged"}, 0.1)
    at_chance = [{**r, "accuracy": 0.1} for r in rows]
    assert not stats.trained({"outcome": "completed", "rows": at_chance}, 0.1)
