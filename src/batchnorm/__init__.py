"""batchnorm: batch normalization for PyTorch, exact, drop-in and fast."""
from batchnorm import functional
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, create_norm, register_norm
from batchnorm.nn import (
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    renorm_schedule,
    set_renorm_limits,
)
from batchnorm import tools
from batchnorm.tools import convert, drop_redundant_bias, fold, freeze, recalibrate, unfreeze
from batchnorm.nn import BNLSTM, BNLSTMCell, RecurrentBatchNorm, SyncBatchNorm

__version__ = "0.1.0"
__all__ = [
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_schedule",
    "set_renorm_limits",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "tools",
    "convert",
    "fold",
    "recalibrate",
    "freeze",
    "unfreeze",
    "drop_redundant_bias",
    "create_norm",
    "register_norm",
    "RecurrentBatchNorm",
    "BNLSTMCell",
    "BNLSTM",
    "SyncBatchNorm",
    "__version__",
]
