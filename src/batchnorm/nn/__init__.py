"""Batch-normalization modules and the norm registry."""
from batchnorm.nn.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from batchnorm.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from batchnorm.nn.lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from batchnorm.nn.recurrent import BNLSTM, BNLSTMCell, RecurrentBatchNorm
from batchnorm.nn.registry import create_norm, get_norm_layer, norm_names, register_norm
from batchnorm.nn.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    renorm_schedule,
    set_renorm_limits,
)
from batchnorm.nn.sync import SyncBatchNorm

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "RecurrentBatchNorm",
    "SyncBatchNorm",
    "create_norm",
    "get_norm_layer",
    "norm_names",
    "register_norm",
    "renorm_schedule",
    "set_renorm_limits",
]
