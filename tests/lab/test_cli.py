"""The command line, through subprocesses as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from batchnorm.lab import suite
from batchnorm.lab.cli import main
from batchnorm.lab.config import to_dict
from batchnorm.lab.experiments import REGISTRY, get


def lab(python: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "batchnorm.lab", *args], capture_output=True, text=True,
                          check=False, env=env, timeout=300)


def test_list(python: str, lab_env: dict[str, str]) -> None:
    out = lab(python, lab_env, "list")
    assert out.returncode == 0, out.stderr
    for name in REGISTRY:
        assert f"\n{name}\n" in "\n" + out.stdout


def test_tiny_run_then_report(
    python: str, lab_env: dict[str, str], tmp_path: Path, tiny_results: Path
) -> None:
    results = tmp_path / "res"
    # Overrides equal to the tiny preset's values, so the numbers must match the
    # in-process run of the session fixture: same config and seed, same numbers,
    # whether runs go to 2 worker processes or not.
    out = lab(python, lab_env, "run", "distributions", "--preset", "tiny", "--out", str(results),
              "--jobs", "2", "--seeds", "2", "--eval_every=20")
    assert out.returncode == 0, out.stderr
    assert f"report: {(results / 'report.html').resolve()}" in out.stdout
    assert "claim 2:" in out.stdout
    record = json.loads((results / "distributions" / "result.json").read_text())
    assert record["overrides"]["eval_every"] == "20" and record["environment"]["jobs"] == 2
    here = json.loads((tiny_results / "distributions" / "result.json").read_text())
    assert [r["rows"] for r in record["runs"]] == [r["rows"] for r in here["runs"]]
    report = lab(python, lab_env, "report", str(results), "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "fig1", "--lr=fast"], "--lr: expected float, got 'fast'"),
        (["run", "fig1", "--learning_rate=1"], "unknown config key 'learning_rate'"),
        (["run", "fig1", "--steps", "5"], "expected an override of the form --key=value"),
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", "fig1", "--data", "imagenet"], "unknown data set 'imagenet'"),
        (["run", "fig1", "--data", "mnist:/does/not/exist"], "directory not found"),
        (["report", "/does/not/exist"], "results directory not found"),
        # Values that fit the type but not the experiment: refused before any training.
        (["run", "fig1", "--eval_every=0"], "--eval_every: expected values >= 1, got 0"),
        (["run", "fig1", "--eval_every=7000"], "--eval_every: expected at most --steps (6000)"),
        (["run", "fig1", "--lr=nan"], "--lr: expected finite numbers, got nan"),
        (["run", "fig1", "--lr=0"], "--lr: expected values > 0"),
        (["run", "speedup", "--bn_multipliers=1,-1"], "--bn_multipliers: expected values > 0"),
        (["run", "fig1", "--hidden=100,0"], "--hidden: expected values >= 1"),
        (["run", "fig1", "--unit=99", "--hidden=10"], "--unit: expected 0 <= unit < 10"),
        (["run", "distributions", "--layer=9"], "--layer: expected 0 <= layer < 3"),
        (["run", "speedup", "--norm_backend=bogus"], "--norm_backend: expected one of auto"),
        (["run", "smoothness", "--eval_every=1500"], "needs at least 2 evaluations"),
        (["run", "init", "--within=-5"], "--within: expected values >= 0, got -5.0"),
        (["run", "fig1", "--drift_threshold=-5"], "--drift_threshold: expected values > 0"),
        (["run", "speedup", "--tolerance=-1"], "--tolerance: expected values >= 0, got -1.0"),
        (["run", "inference", "--momenta=0.1,0.1"],
         "--momenta: expected distinct values, got 0.1,0.1"),
        (["run", "fig1", "--jobs", "0"], "--jobs: expected an int >= 1, got 0"),
        (["run", "fig1", "--jobs", "-3"], "--jobs: expected an int >= 1, got -3"),
        (["run", "fig1", "--threads", "0"], "--threads: expected an int >= 1, got 0"),
        (["run", "fig1", "--data", "digits", "--batch_size=5000"],
         "--batch_size: expected at most 1437"),
    ],
)
def test_errors_exit_2_with_a_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process: the same main() the console script calls, without a subprocess each.
    out = tmp_path / "results"
    code = main(["lab", *args, "--out", str(out)] if args[0] == "run" else ["lab", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written, no --out made


def _saved(config: dict[str, object], **changes: object) -> dict[str, object]:
    """A fig1 record as ``result.json`` holds it, enough for the replacement check."""
    return {"experiment": "fig1", "preset": "tiny", "config": config, "overrides": {},
            "runs": [], **changes}


_TINY = to_dict(get("fig1").make_config("tiny"))


@pytest.mark.parametrize(
    ("saved", "args", "difference"),
    [
        # a stray quick or tiny run into a directory of paper-scale results
        (_saved(_TINY, preset="full"), [], "saved: preset full; this run: preset tiny"),
        # the saved run set a key this one does not
        (_saved({**_TINY, "seeds": 3}, overrides={"seeds": "3"}), [],
         "saved: seeds=3; this run: seeds=2"),
        # this run sets a key the saved one did not
        (_saved(_TINY), ["--lr=0.1"], f"saved: lr={_TINY['lr']}; this run: lr=0.1"),
        (_saved(_TINY), ["--data", "synthetic"], "saved: data=digits; this run: data=synthetic"),
        ("[1, 2]", [], "not a lab result"),
        ("{not json", [], "cannot be read"),
    ],
)
def test_a_run_never_replaces_the_result_of_a_different_run(
    saved: object, args: list[str], difference: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "fig1" / "result.json"
    path.parent.mkdir()
    text = saved if isinstance(saved, str) else json.dumps(saved)
    path.write_text(text)
    code = main(["lab", "run", "fig1", "--preset", "tiny", "--out", str(tmp_path), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--out: {path} holds a different run ({difference}" in err
    assert "--overwrite" in err
    assert path.read_text() == text  # refused before training: the saved result stays
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["fig1", "result.json"]


@pytest.mark.parametrize(
    ("saved", "replaced"),
    [
        (_saved(_TINY), True),                                   # the same command again
        (_saved({**_TINY, "seeds": 2}, overrides={"seeds": "2"}), True),  # same value
        # a default that changed with the code, set on neither command line
        (_saved({**_TINY, "steps": _TINY["steps"] + 1}), True),
        (_saved(_TINY, preset="full"), False),
        (_saved({**_TINY, "lr": 0.1}, overrides={"lr": "0.1"}), False),
    ],
)
def test_replaced_difference(saved: dict[str, object], replaced: bool) -> None:
    config = get("fig1").make_config("tiny")
    assert (suite.replaced_difference(saved, "tiny", config, {}) is None) == replaced


def test_rerunning_the_same_command_replaces_and_overwrite_replaces_any(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["lab", "run", "fig1", "--preset", "tiny", "--out", str(tmp_path), "--jobs", "1",
            "--no-report", "--steps=20", "--eval_every=10"]
    path = tmp_path / "fig1" / "result.json"
    assert main(base) == 0
    first = json.loads(path.read_text())["started"]
    path.write_text(path.read_text().replace(first, "2000-01-01T00:00:00+00:00"))
    assert main(base) == 0  # a rerun of the same command
    assert json.loads(path.read_text())["started"] != "2000-01-01T00:00:00+00:00"
    assert main([*base, "--seeds", "3"]) == 2
    assert "holds a different run (saved: seeds=2; this run: seeds=3)" in capsys.readouterr().err
    assert len(json.loads(path.read_text())["runs"]) == 4
    assert main([*base, "--seeds", "3", "--overwrite"]) == 0
    assert len(json.loads(path.read_text())["runs"]) == 6


def test_output_paths_are_checked_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["lab", "run", "fig1", "--preset", "tiny", "--out", str(a_file)]) == 2
    assert "--out: expected a directory, got the file" in capsys.readouterr().err
    assert main(["lab", "report", str(tmp_path), "-o", str(tmp_path)]) == 2
    assert "--output: expected a file name, got the directory" in capsys.readouterr().err
    assert main(["lab", "report", str(tmp_path), "-o", str(a_file / "r.html")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_lab_without_a_command_shows_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab"]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in ("list", "run", "report"))


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("batchnorm ")


def test_heavy_dependencies_are_lazy(python: str, lab_env: dict[str, str]) -> None:
    code = ("import sys, batchnorm, batchnorm.lab.cli, batchnorm.lab.experiments; "
            "heavy = [m for m in ('matplotlib', 'mlxtend', 'mnist1d', 'sklearn') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False,
                         env=lab_env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
