"""What every experiment provides: a config, presets, runs, an analysis with
verdicts, and figures drawn from saved results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from batchnorm.lab.config import PRESETS, ConfigError, LabConfig, apply_overrides

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from batchnorm.lab.data import Dataset
    from batchnorm.lab.runner import Runner
    from batchnorm.lab.train import RunResult

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
MIXED = "mixed"
VERDICTS: tuple[str, ...] = (SUPPORTED, MIXED, NOT_SUPPORTED)

#: The rule every verdict applies before its own threshold; printed in the report.
SPREAD_RULE = (
    "An effect counts only if it is larger than the variation between seeds: the range "
    "(min..max) over seeds of the side that should be better must lie entirely beyond "
    "the range of the other side. Each claim then has its own threshold on the mean "
    "over seeds. 'supported': every part of the criterion holds. 'not supported': the "
    "effect is absent or goes the other way. 'mixed': the effect points the claimed way "
    "but misses the threshold or the seed-spread rule, or only some parts hold."
)

#: What a verdict marked as a check is; printed in the report.
CHECK_RULE = (
    "A row marked 'check' verifies a property that holds by construction (an exact "
    "identity, up to float rounding): it shows that the code measures what it says, "
    "not evidence for the claim, and one run is enough to verify it, so the seed-spread "
    "rule does not apply to it."
)

#: Overrides every experiment's presets start from. ``tiny`` is for tests: seconds on
#: a small data set, with the pure-torch backend, which needs no JIT compilation.
COMMON_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"data": "digits", "seeds": 2, "norm_backend": "reference"},
    "quick": {},
    "full": {"seeds": 3},
}


@dataclass
class Verdict:
    """One claim checked against measured numbers.

    Attributes:
        claim: its number in the project's list of claims (DESIGN.md section 4).
        statement: the claim as tested here.
        measured: the number(s) behind the verdict, readable.
        verdict: ``supported``, ``mixed`` or ``not supported``.
        criterion: the rule that turned the numbers into the verdict.
        check: True for a property that holds by construction (see
            :data:`CHECK_RULE`): verified, but no evidence for the claim.
    """

    claim: int
    statement: str
    measured: str
    verdict: str
    criterion: str
    check: bool = False

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass
class Analysis:
    """Named numbers (shown as a table) and the verdicts drawn from them."""

    measures: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"measures": self.measures, "verdicts": [asdict(v) for v in self.verdicts]}


def grade(effect_ok: bool, threshold_ok: bool, direction_ok: bool) -> str:
    """The common verdict ladder.

    supported: the effect passes the seed-spread rule and the threshold;
    mixed: it points the claimed way but misses one of them;
    not supported: it does not point the claimed way.
    """
    if not direction_ok:
        return NOT_SUPPORTED
    if effect_ok and threshold_ok:
        return SUPPORTED
    return MIXED


class Experiment(ABC):
    """An experiment: subclass, fill the class attributes, implement three methods.

    ``run`` trains (through a :class:`~batchnorm.lab.runner.Runner`); ``analyze`` and
    ``figures`` read only the saved record, so a report can be rebuilt from a results
    directory without training anything.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    #: What the experiment does, one paragraph (report and ``lab list``).
    description: ClassVar[str]
    #: How the verdicts are reached, one paragraph (report).
    criterion: ClassVar[str]
    Config: ClassVar[type[LabConfig]]
    #: Overrides of the config defaults per preset (the defaults are ``quick``).
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def make_config(
        self, preset: str = "quick", overrides: dict[str, Any] | None = None, strict: bool = True
    ) -> LabConfig:
        """Defaults, then the preset, then ``overrides`` (strings or typed values)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        config = self.Config()
        preset_values = {**COMMON_PRESETS[preset], **self.presets.get(preset, {})}
        config = apply_overrides(config, preset_values)
        return apply_overrides(config, overrides or {}, strict=strict)

    def check_data(self, config: Any, data: Dataset) -> None:
        """Raise :class:`~batchnorm.lab.config.ConfigError` for a config that does not
        fit ``data`` (a batch larger than its training split, ...). Run for every
        experiment before any of them trains; a config's own checks are in its
        ``check()``. The default checks that ``batch_size``, where the config has one,
        is at most the training split; experiments that override this call it too."""
        batch_size = getattr(config, "batch_size", None)
        n_train = len(data.x_train)
        if isinstance(batch_size, int) and batch_size > n_train:
            raise ConfigError(
                f"--batch_size: expected at most {n_train} (the training examples of "
                f"{config.data}), got {batch_size}")

    @abstractmethod
    def run(self, config: Any, runner: Runner) -> tuple[list[RunResult], dict[str, Any]]:
        """Train; return the runs and notes (choices made along the way, e.g. a tuned rate)."""

    @abstractmethod
    def analyze(self, record: dict[str, Any]) -> Analysis:
        """Measures and verdicts from a saved record."""

    @abstractmethod
    def figures(self, record: dict[str, Any]) -> list[tuple[str, Figure]]:
        """(caption, figure) pairs from a saved record."""
