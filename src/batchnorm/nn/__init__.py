"""Batch-normalization modules and the norm registry."""
from batchnorm.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.registry import create_norm, get_norm_layer, norm_names, register_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "create_norm",
    "get_norm_layer",
    "norm_names",
    "register_norm",
]
