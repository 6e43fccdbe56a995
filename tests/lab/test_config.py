"""Config overrides: typed conversion, unknown keys, bad values, presets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from batchnorm.lab.config import (
    ConfigError,
    LabConfig,
    apply_overrides,
    parse_override_args,
    valid_keys,
)
from batchnorm.lab.experiments import REGISTRY, get
from batchnorm.lab.suite import configure, resolve


@dataclass(frozen=True)
class Example(LabConfig):
    lr: float = 0.1
    steps: int = 100
    hidden: tuple[int, ...] = (10, 10)
    scales: tuple[float, ...] = (1.0,)
    init_std: float | None = None
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    flag: bool = False
    name: str = "x"


def test_converts_every_field_type() -> None:
    cfg = apply_overrides(Example(), {
        "lr": "0.5", "steps": "7", "hidden": "3,4,5", "scales": "1e-3, 2",
        "init_std": "0.01", "activation": "relu", "flag": "true", "name": "y", "seeds": "3",
    })
    assert cfg == Example(lr=0.5, steps=7, hidden=(3, 4, 5), scales=(1e-3, 2.0), init_std=0.01,
                          activation="relu", flag=True, name="y", seeds=3)
    assert apply_overrides(cfg, {"init_std": "none"}).init_std is None


def test_typed_values_follow_the_same_path() -> None:
    assert apply_overrides(Example(), {"hidden": (8, 8), "lr": 1}).hidden == (8, 8)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Example(), {"learning_rate": "0.1"})
    msg = str(err.value)
    assert "'learning_rate'" in msg
    for key in ("lr", "steps", "hidden", "seeds", "data"):
        assert key in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", "fast", "float"),
        ("steps", "1.5", "int"),
        ("hidden", "a,b", "comma-separated list of int"),
        ("activation", "gelu", "'sigmoid', 'relu'"),
        ("flag", "maybe", "bool"),
        ("init_std", "small", "float or None"),
    ],
)
def test_bad_value_names_key_type_and_value(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Example(), {key: value})
    msg = str(err.value)
    assert f"--{key}" in msg and expected in msg and repr(value) in msg


def test_check_rejects_nonsense() -> None:
    with pytest.raises(ConfigError, match="seeds"):
        apply_overrides(Example(), {"seeds": "0"})
    with pytest.raises(ConfigError, match=">= 6 layers"):
        get("init").make_config("quick", {"hidden": "10,10"})


def test_parse_override_args() -> None:
    assert parse_override_args(["--lr=0.1", "--batch-size=32", "--data=x:/a=b"]) == {
        "lr": "0.1", "batch_size": "32", "data": "x:/a=b"}
    with pytest.raises(ConfigError, match="--key=value"):
        parse_override_args(["--lr", "0.1"])


def test_presets_order_and_paper_requirements() -> None:
    for exp in REGISTRY.values():
        quick, full, tiny = (exp.make_config(p) for p in ("quick", "full", "tiny"))
        assert quick.seeds >= 2 and full.seeds >= 3 and tiny.seeds >= 2
        # the sequence experiment reads MNIST-1D; every other one the MNIST digits
        assert quick.data == ("mnist1d" if exp.name == "rnn" else "mnist")
        assert tiny.data == "digits"
        # overrides beat the preset
        assert exp.make_config("tiny", {"seeds": "1"}).seeds == 1
    assert get("fig1").make_config("full").steps == 50000
    init = get("init").make_config("quick")
    assert init.num_scales >= 12 and init.scale_min == 1e-4 and init.scale_max == 1.0
    assert len(init.hidden) >= 6
    assert len(get("speedup").make_config("quick").deep_hidden) >= 6


def test_suite_configure_applies_keys_where_they_exist() -> None:
    exps = resolve(["fig1", "init"])
    fig1, init = configure(exps, "quick", {"unit": "3", "num_scales": "13", "seeds": "2"})
    assert fig1.unit == 3 and init.num_scales == 13
    with pytest.raises(ConfigError, match="valid keys"):
        configure(exps, "quick", {"nope": "1"})
    with pytest.raises(KeyError, match="known"):
        resolve(["nope"])
    assert [e.name for e in resolve(["all", "fig1"])] == list(REGISTRY)


@pytest.mark.parametrize(("names", "overrides", "match"), [
    (["fig1", "batchsize"], {"batch_sizes": "2,8,100000"}, "--batch_sizes: expected sizes <="),
    (["fig1", "regularization"], {"train_examples": "100000"},
     "--train_examples/--validation_examples"),
    (["fig1", "rnn"], {"sequence_length": "7"}, "--sequence_length: expected a divisor"),
])
def test_configs_that_do_not_fit_the_data_fail_before_training(
    tmp_path: Path, cache_dir: Path, names: list[str], overrides: dict[str, str], match: str
) -> None:
    from batchnorm.lab import suite
    from batchnorm.lab.runner import Runner

    with Runner(jobs=1, progress=False) as runner, pytest.raises(ConfigError, match=match):
        suite.run_all(names, "tiny", overrides, tmp_path, runner, log=lambda _m: None)
    assert not any(tmp_path.iterdir())  # fig1, first in line, never trained


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    # a repeated setting would train one configuration twice under one label
    ("inference", "momenta", "0.1,0.1", "--momenta: expected distinct values, got 0.1,0.1"),
    ("speedup", "lr_grid", "0.01,0.010", "--lr_grid: expected distinct values, got 0.01,0.01"),
    ("speedup", "bn_multipliers", "1,5,1", "--bn_multipliers: expected distinct values"),
    ("placement", "activations", "relu,relu", "--activations: expected distinct values"),
    ("smoothness", "step_multipliers", "1,1", "--step_multipliers: expected distinct values"),
    ("regularization", "noise_batch_sizes", "4,16,4", "--noise_batch_sizes: expected distinct"),
    ("inference", "test_batch_sizes", "2,2", "--test_batch_sizes: expected distinct values"),
])
def test_list_options_reject_repeated_values(name: str, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        get(name).make_config("quick", {key: value})
    assert message in str(err.value)


def test_layer_widths_may_repeat() -> None:
    assert get("fig1").make_config("quick", {"hidden": "50,50,50"}).hidden == (50, 50, 50)
    assert len(get("speedup").make_config("quick", {"deep_hidden": "9,9,9,9,9,9"}).deep_hidden) == 6


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    # margins and tolerances: >= 0 (a negative one passes a difference the wrong way)
    ("fig1", "drift_threshold", "-5", "--drift_threshold: expected values > 0, got -5.0"),
    ("speedup", "tolerance", "-1", "--tolerance: expected values >= 0, got -1.0"),
    ("speedup", "deep_gap", "-10", "--deep_gap: expected values >= 0"),
    ("rnn", "margin", "-1", "--margin: expected values >= 0"),
    ("smoothness", "noisy_margin", "-1", "--noisy_margin: expected values >= 0"),
    ("smoothness", "noisy_gap", "-1", "--noisy_gap: expected values >= 0"),
    ("regularization", "gap_margin", "-0.5", "--gap_margin: expected values >= 0"),
    ("regularization", "dropout_tolerance", "-0.5", "--dropout_tolerance: expected values >= 0"),
    ("batchsize", "drop_threshold", "-5", "--drop_threshold: expected values >= 0"),
    ("batchsize", "less_margin", "-3", "--less_margin: expected values >= 0"),
    ("batchsize", "ghost_margin", "-1", "--ghost_margin: expected values >= 0"),
    ("batchsize", "within", "-2", "--within: expected values >= 0"),
    ("batchsize", "works_from", "0", "--works_from: expected values >= 1"),
    ("inference", "logit_tolerance", "-1e-4", "--logit_tolerance: expected values >= 0"),
    ("inference", "batch_stat_drop", "-2", "--batch_stat_drop: expected values >= 0"),
    ("inference", "recal_gain", "-1", "--recal_gain: expected values >= 0"),
    ("placement", "same_tolerance", "-1", "--same_tolerance: expected values >= 0"),
    ("placement", "placement_margin", "-1", "--placement_margin: expected values >= 0"),
    ("distributions", "moved", "-0.1", "--moved: expected values >= 0"),
    ("init", "count_margin", "-1", "--count_margin: expected values >= 0"),
    # ratios: > 0 (a ratio is never negative, so k <= 0 always passes "k times as much")
    ("fig1", "drift_threshold", "0", "--drift_threshold: expected values > 0"),
    ("distributions", "drift_threshold", "0", "--drift_threshold: expected values > 0"),
    ("smoothness", "unstable_ratio", "0", "--unstable_ratio: expected values > 0"),
    ("smoothness", "smooth_ratio", "-1.5", "--smooth_ratio: expected values > 0"),
    ("speedup", "speedup_threshold", "0", "--speedup_threshold: expected values > 0"),
    # a share: 0 would pass whatever moved, above 1 nothing could
    ("distributions", "moved_share", "0", "--moved_share: expected a share in (0, 1], got 0.0"),
    ("distributions", "moved_share", "1.5", "--moved_share: expected a share in (0, 1]"),
])
def test_thresholds_that_would_always_pass_are_refused(
    name: str, key: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        get(name).make_config("quick", {key: value})
    assert message in str(err.value)


@pytest.mark.parametrize(("name", "key"), [
    ("speedup", "tolerance"), ("rnn", "margin"), ("batchsize", "ghost_margin"),
    ("inference", "recal_gain"), ("distributions", "moved"),
])
def test_a_zero_margin_is_strict_but_allowed(name: str, key: str) -> None:
    assert getattr(get(name).make_config("quick", {key: "0"}), key) == 0


def test_no_numeric_key_accepts_a_negative_value() -> None:
    """Every number in every experiment's config is a size, a rate, a threshold or an
    index, none of which is meaningful below 0: a new key must be covered by a check.
    (A key whose negative values mean something would be listed here as an exception.)"""
    for exp in REGISTRY.values():
        config = exp.make_config("quick")
        for key in valid_keys(exp.Config):
            value = getattr(config, key)
            values = value if isinstance(value, tuple) else (value,)
            numeric = value is None or all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric or key in ("data", "norm_backend"):
                continue
            with pytest.raises(ConfigError, match=f"--{key}"):
                exp.make_config("quick", {key: "-1"})
