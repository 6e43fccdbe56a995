"""batchnorm: batch normalization for PyTorch, exact, drop-in and fast."""
from batchnorm import functional
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, create_norm, register_norm

__version__ = "0.1.0"
__all__ = [
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "create_norm",
    "register_norm",
    "__version__",
]
