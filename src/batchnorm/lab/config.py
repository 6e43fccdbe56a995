"""Typed experiment configs and ``--key=value`` overrides checked against them.

Every experiment's config is a dataclass whose defaults are the ``quick`` preset.
A preset is a dict of field overrides; a command line adds more, as strings, which
are converted to the field's declared type here. An unknown key lists the valid
keys; a value that does not fit names the key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

PRESETS: tuple[str, ...] = ("tiny", "quick", "full")

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value that does not fit the experiment's config dataclass."""


@dataclass(frozen=True)
class LabConfig:
    """Fields every experiment has.

    Attributes:
        data: the data spec (see :mod:`batchnorm.lab.data`), e.g. ``mnist``,
            ``digits`` or ``fashion:/path/to/idx/files``.
        seeds: how many seeds each configuration is trained with (0, 1, ...).
        norm_backend: the library's compute path for BN layers, passed to
            :func:`batchnorm.create_norm`: ``auto`` (the library's choice, as a user
            gets it), ``reference``, ``numba``, ...
    """

    data: str = "mnist"
    seeds: int = 2
    norm_backend: str = "auto"

    def check(self) -> None:
        """Raise :class:`ConfigError` for values of the right type that make no sense.

        Rules every experiment shares: no float is NaN or infinite; the fields named in
        :data:`AT_LEAST_ONE` (sizes, counts, step budgets) are >= 1, those in
        :data:`POSITIVE` (rates, multipliers, scales, ratio thresholds) > 0 and those in
        :data:`NON_NEGATIVE` (margins and tolerances) >= 0, entry by entry for lists; a
        list holds no value twice (except :data:`REPEATABLE` ones); ``eval_every <=
        steps``, so that training is evaluated at least once; and ``norm_backend`` is
        one of the library's backends. Experiments add their own.
        """
        if self.seeds < 1:
            raise ConfigError(f"--seeds: expected an int >= 1, got {self.seeds}")
        from batchnorm._backends import BACKEND_NAMES  # the library, as the lab uses it

        if self.norm_backend not in BACKEND_NAMES:
            raise ConfigError(
                f"--norm_backend: expected one of {', '.join(BACKEND_NAMES)}, "
                f"got {self.norm_backend!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"--{f.name}: expected finite numbers, got {_to_text(value)}")
            if f.name in AT_LEAST_ONE and any(v < 1 for v in numbers):
                raise ConfigError(f"--{f.name}: expected values >= 1, got {_to_text(value)}")
            if f.name in POSITIVE and any(v <= 0 for v in numbers):
                raise ConfigError(f"--{f.name}: expected values > 0, got {_to_text(value)}")
            if f.name in NON_NEGATIVE and any(v < 0 for v in numbers):
                raise ConfigError(f"--{f.name}: expected values >= 0, got {_to_text(value)}")
            if (isinstance(value, tuple) and f.name not in REPEATABLE
                    and len(set(value)) < len(value)):
                raise ConfigError(
                    f"--{f.name}: expected distinct values, got {_to_text(value)}")
        steps, every = getattr(self, "steps", None), getattr(self, "eval_every", None)
        if isinstance(steps, int) and isinstance(every, int) and every > steps:
            raise ConfigError(
                f"--eval_every: expected at most --steps ({steps}) so that training is "
                f"evaluated, got {every}"
            )


#: Field names that mean a size, a count or a step budget in every experiment.
AT_LEAST_ONE = frozenset({
    "steps", "eval_every", "batch_size", "batch_sizes", "test_batch_sizes",
    "recal_batch_size", "hidden", "deep_hidden", "hidden_size", "probe_examples",
    "probe_batches", "sample_size", "single_examples", "noise_examples", "noise_draws",
    "noise_batch_sizes", "landscape_batches", "num_scales", "num_groups", "ghost_batch",
    "evals", "train_examples", "sequence_length", "works_from",
})
#: Field names that mean a learning rate, a multiplier or a scale in every experiment,
#: and the thresholds on a ratio ("at least k times as much"): a ratio is never
#: negative, so k <= 0 would pass whatever was measured.
POSITIVE = frozenset({
    "lr", "noisy_lr", "deep_lr", "base_lr", "lr_grid", "bn_multipliers",
    "baseline_multipliers", "step_multipliers", "init_std", "scale_min", "scale_max",
    "epochs", "speedup_threshold", "drift_threshold", "unstable_ratio", "smooth_ratio",
    "grad_ratio_max",
})
#: Field names of a verdict's thresholds in points or in the measure's own units:
#: margins and gaps a difference must reach, and tolerances it may miss by. A negative
#: margin passes a difference that goes the wrong way; a negative tolerance turns
#: "within" into "beyond". Zero is a strict but meaningful threshold.
NON_NEGATIVE = frozenset({
    "tolerance", "deep_gap", "within", "count_margin", "moved", "gap_margin",
    "dropout_tolerance", "drop_threshold", "less_margin", "ghost_margin", "logit_tolerance",
    "batch_stat_drop", "recal_gain", "same_tolerance", "placement_margin", "margin",
    "noisy_margin", "noisy_gap",
})
#: List fields whose values may repeat: layer widths. In every other list each value is
#: one setting (a rate, a batch size, a momentum, ...), and a repeated one would train
#: the same configuration twice under one label and merge its runs.
REPEATABLE = frozenset({"hidden", "deep_hidden"})


def field_types(config_class: type) -> dict[str, Any]:
    """The resolved type of each dataclass field, by name."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def type_name(tp: Any) -> str:
    """A short readable name for a field type, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"comma-separated list of {type_name(args[0])}" if args else "tuple"
    return getattr(tp, "__name__", str(tp))


def convert(text: str, tp: Any) -> Any:
    """Convert a command-line string to type ``tp``; raise ValueError if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(text, arg)
            except ValueError:
                pass
        raise ValueError(text)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise ValueError(text)
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(text)
        return tuple(convert(p, args[0]) for p in parts)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)  # int("0.5") raises, as it should
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise TypeError(f"unsupported config field type {tp!r}")


def parse_override_args(args: list[str]) -> dict[str, str]:
    """Turn ``["--lr=0.1", "--steps=500"]`` into ``{"lr": "0.1", "steps": "500"}``.

    Dashes in keys become underscores, so ``--batch-size=32`` names ``batch_size``.
    """
    out: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected an override of the form --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        out[key.replace("-", "_")] = value
    return out


def valid_keys(config_class: type) -> list[str]:
    """The override keys a config accepts, sorted."""
    return sorted(f.name for f in dataclasses.fields(config_class))


def apply_overrides(config: C, overrides: dict[str, Any], *, strict: bool = True) -> C:
    """Return a copy of ``config`` with ``overrides`` applied.

    Values may be strings (converted to the field's type) or already typed values
    (checked by converting their string form, so presets and command lines follow
    one path).

    Args:
        config: a dataclass instance.
        overrides: field name to value.
        strict: raise on keys the config does not have; otherwise skip them.

    Raises:
        ConfigError: an unknown key (with the list of valid keys) or a value that does
            not convert to the field's type (with key, expected type and value).
    """
    types_by_name = field_types(type(config))
    changes: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in types_by_name:
            if strict:
                raise ConfigError(
                    f"unknown config key {key!r} for {type(config).__name__}; "
                    f"valid keys: {', '.join(valid_keys(type(config)))}"
                )
            continue
        tp = types_by_name[key]
        text = _to_text(raw)
        try:
            changes[key] = convert(text, tp)
        except (ValueError, TypeError):
            raise ConfigError(
                f"--{key}: expected {type_name(tp)}, got {text!r}"
            ) from None
    new = dataclasses.replace(config, **changes)  # type: ignore[type-var]
    check = getattr(new, "check", None)
    if callable(check):
        check()
    return new


def _to_text(value: Any) -> str:
    """The command-line spelling of a preset value (tuples comma-separated)."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
