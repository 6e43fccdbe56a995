"""The registry of experiments, by name, in report order.

Each module defines one :class:`~batchnorm.lab.experiments.base.Experiment` and
registers it here; ``batchnorm lab list`` and ``batchnorm lab run all`` read this.
"""

from __future__ import annotations

from batchnorm.lab.experiments.base import Experiment
from batchnorm.lab.experiments.batchsize import BatchSize
from batchnorm.lab.experiments.distributions import Distributions
from batchnorm.lab.experiments.fig1 import Fig1
from batchnorm.lab.experiments.inference import Inference
from batchnorm.lab.experiments.initialization import InitScale
from batchnorm.lab.experiments.placement import BNPlacement
from batchnorm.lab.experiments.recurrent import Recurrent
from batchnorm.lab.experiments.regularization import Regularization
from batchnorm.lab.experiments.smoothness import Smoothness
from batchnorm.lab.experiments.speedup import Speedup

REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` under its name (names are unique)."""
    if experiment.name in REGISTRY:
        raise ValueError(f"experiment {experiment.name!r} is already registered")
    REGISTRY[experiment.name] = experiment
    return experiment


def get(name: str) -> Experiment:
    """The experiment called ``name``; KeyError lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}"
        ) from None


for _experiment in (Fig1(), Speedup(), InitScale(), Distributions(), Regularization(),
                    BatchSize(), Inference(), BNPlacement(), Recurrent(), Smoothness()):
    register(_experiment)

__all__ = ["REGISTRY", "Experiment", "get", "register"]
