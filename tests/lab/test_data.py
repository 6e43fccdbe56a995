"""Data loading: embedded sets, IDX and CIFAR-10 files written here, broken files, cache."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab import data
from batchnorm.lab.data import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train: int = 30, n_test: int = 10, gz: bool = False,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


def write_cifar(root: Path, n: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))


def cache_files(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip_and_cache(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_set(tmp_path / "mnist", gz=gz)
    cache = tmp_path / "cache"
    ds = data.load(f"fashion:{tmp_path / 'mnist'}", cache=cache)
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (10, 784)
    assert ds.x_train.dtype == torch.float32 and float(ds.x_train.max()) <= 1.0
    expected = arrays["train-images-idx3-ubyte"].reshape(30, -1) / 255.0
    np.testing.assert_allclose(ds.x_train.numpy(), expected, rtol=1e-6)
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert ds.example_shape == (28, 28) and ds.num_classes <= 10
    (entry,) = cache_files(cache)
    assert entry.suffix == ".npz"
    again = data.load(f"fashion:{tmp_path / 'mnist'}", cache=cache)  # from the cache
    assert torch.equal(again.x_train, ds.x_train)


def test_idx_in_raw_subdir(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "d" / "raw")
    assert len(data.load(f"mnist:{tmp_path / 'd'}", cache=tmp_path / "c").y_train) == 30


def _break(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif how == "magic":
        path.write_bytes(struct.pack(">I", 0x0000_0999) + raw[4:])
    elif how == "trailing":
        path.write_bytes(raw + b"\x00" * 5)
    elif how == "header":
        path.write_bytes(raw[:10])


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated",
         "truncated: the header promises 30 x 28 x 28 = 23520 bytes of data, found 23420"),
        ("magic", "wrong magic number: expected 0x00000803"),
        ("trailing", "5 unexpected bytes"),
        ("header", "truncated header: expected 16 bytes, found 10"),
    ],
)
def test_broken_idx_file_is_named_and_not_cached(tmp_path: Path, how: str, message: str) -> None:
    write_idx_set(tmp_path / "m")
    bad = tmp_path / "m" / "train-images-idx3-ubyte"
    _break(bad, how)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        data.load(f"mnist:{tmp_path / 'm'}", cache=cache)
    assert str(bad) in str(err.value) and message in str(err.value)
    assert cache_files(cache) == []


def test_truncated_gzip(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "m", gz=True)
    bad = tmp_path / "m" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-12])
    with pytest.raises(DataError, match="truncated or corrupt gzip") as err:
        data.load(f"mnist:{tmp_path / 'm'}", cache=tmp_path / "cache")
    assert str(bad) in str(err.value)
    assert cache_files(tmp_path / "cache") == []


def test_missing_file_and_label_mismatch(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "m")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    expected = r"missing test labels: expected a file named t10k-labels-idx1-ubyte\[\.gz\]"
    with pytest.raises(DataError, match=expected):
        data.load(f"mnist:{tmp_path / 'm'}", cache=tmp_path / "c")
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9)))
    with pytest.raises(DataError, match="9 labels, but .* holds 10 images"):
        data.load(f"mnist:{tmp_path / 'm'}", cache=tmp_path / "c")
    with pytest.raises(DataError, match="directory not found"):
        data.load(f"mnist:{tmp_path / 'nowhere'}", cache=tmp_path / "c")


def test_cifar10_roundtrip(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    ds = data.load(f"cifar10:{tmp_path}", cache=tmp_path / "cache")
    assert ds.x_train.shape == (40, 3072) and ds.x_test.shape == (8, 3072)
    assert ds.example_shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or not a pickle"),
        (lambda raw: pickle.dumps({b"labels": [1]}), "missing 'data'"),
        (lambda raw: pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [1, 2]}),
         "expected 'data' as N x 3072 uint8, found 2 x 10 uint8"),
        (lambda raw: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
         "expected 2 labels"),
        (lambda raw: pickle.dumps([1, 2]), "expected a dict"),
    ],
)
def test_broken_cifar_batch(tmp_path: Path, content, message: str) -> None:
    write_cifar(tmp_path)
    bad = tmp_path / "data_batch_3"
    bad.write_bytes(content(bad.read_bytes()))
    with pytest.raises(DataError) as err:
        data.load(f"cifar10:{tmp_path}", cache=tmp_path / "cache")
    assert str(bad) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "cache").exists() or cache_files(tmp_path / "cache") == []


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        data.load(f"cifar10:{tmp_path}", cache=tmp_path / "cache")


def test_missing_cifar_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 batch file.*data_batch_5"):
        data.load(f"cifar10:{tmp_path}", cache=tmp_path / "cache")


def test_failed_cache_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "m")

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", explode)
    with pytest.raises(OSError, match="disk full"):
        data.load(f"mnist:{tmp_path / 'm'}", cache=tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == []


def test_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "m")
    spec, cache = f"mnist:{tmp_path / 'm'}", tmp_path / "cache"
    first = data.load(spec, cache=cache)
    (entry,) = cache_files(cache)
    entry.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="damaged cache"):
        second = data.load(spec, cache=cache)
    assert torch.equal(first.x_train, second.x_train)
    assert len(entry.read_bytes()) > 100


def test_changed_files_are_decoded_again(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "m", seed=0)
    spec, cache = f"mnist:{tmp_path / 'm'}", tmp_path / "cache"
    first = data.load(spec, cache=cache)
    write_idx_set(tmp_path / "m", n_train=20, seed=1)
    assert len(data.load(spec, cache=cache).y_train) == 20 != len(first.y_train)


def test_spec_errors() -> None:
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        data.parse_spec("imagenet")
    with pytest.raises(DataError, match="unknown data kind 'svhn'"):
        data.parse_spec("svhn:/x")
    with pytest.raises(DataError, match="names no directory"):
        data.parse_spec("mnist:")


def test_embedded_small_sets(cache_dir: Path) -> None:
    digits = data.load("digits")
    assert (len(digits.y_train), len(digits.y_test), digits.num_features) == (1437, 360, 64)
    assert 0.0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1.0
    synthetic = data.load("synthetic")
    assert synthetic.num_classes == 10 and synthetic.num_features == 64
    assert torch.equal(data.load("synthetic").x_train, synthetic.x_train)
    assert any(p.name.startswith("digits-") for p in cache_dir.iterdir())


def test_embedded_mnist_split(cache_dir: Path) -> None:
    mnist = data.load("mnist")
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    assert float(mnist.x_train.max()) == 1.0 and float(mnist.x_train.min()) == 0.0


def test_mnist1d_is_generated_without_touching_global_rng(cache_dir: Path) -> None:
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    ds = data.load("mnist1d")
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
    assert np.array_equal(np.random.get_state()[1], state)
