"""The images a run trains and tests on, on the backend: selected, binarized, batched.

The test set is binarized once (dynamic training included): every epoch, and the final
ln p(x), score the same fixed test images. The training images are binarized once
(``static``) or afresh each epoch (``dynamic``), on the device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np

from ..data import Dataset, binarize, gather_binarize, iterate_minibatches
from .config import TrainConfig
from .streams import Stream, stream_key

__all__ = ["RunData", "dataset_identity"]


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """What a run iterates, given its config: the split sizes, the features per image and
    their shape, and the data's fingerprint (``Dataset.fingerprint``, the one a checkpoint
    records). Ranks of a distributed run compare it before their first collective: a rank
    with other data would take other batches and wait in an allreduce the others never
    reach."""
    return {"n_train": dataset.n_train, "n_test": dataset.n_test,
            "n_features": dataset.n_features, "num_classes": dataset.num_classes,
            "image_shape": None if dataset.image_shape is None else list(dataset.image_shape),
            "fingerprint": dataset.fingerprint()}


class RunData:
    """A :class:`vae_np.data.Dataset` prepared for one run, moved to the backend once.

    Attributes:
        dataset: the data set as given. n_train, n_test: images kept (``limit_*``).
        x_train: (n_train, 784) backend array; binarized already for ``static``.
        x_test: (n_test, 784) backend array, binarized once unless ``binarize`` is none.
        y_train, y_test: (n_train,), (n_test,) host int64 labels (None without labels).
    """

    def __init__(self, dataset: Dataset, config: TrainConfig, backend):
        self.dataset, self.config, self.backend = dataset, config, backend
        if config.conditional and dataset.y_train is None:
            raise ValueError(f"conditional: a conditional VAE trains on labels, and the data "
                             f"set {dataset.description} ({dataset.source}) has none (an .npz "
                             f"needs y_train and y_test; a folder of images, one subfolder "
                             f"per class)")
        #: The classes of a conditional run's model (None: unconditional).
        self.num_classes = dataset.num_classes if config.conditional else None
        subset_rng = np.random.default_rng(self.key(Stream.SUBSET))
        x_train, y_train = _limit(dataset.x_train, dataset.y_train, config.limit_train,
                                  "limit_train", subset_rng)
        x_test, y_test = _limit(dataset.x_test, dataset.y_test, config.limit_test,
                                "limit_test", subset_rng)
        if len(x_train) == 0 or len(x_test) == 0:
            raise ValueError(f"dataset: needs at least one train and one test image, got "
                             f"{len(x_train)} and {len(x_test)}")
        self.n_train, self.n_test = len(x_train), len(x_test)
        self._host_x_train = x_train       # for the pixel means (output_bias)
        mode = config.binarize_mode
        self.x_train = backend.asarray(x_train)
        if mode == "static":
            self.x_train = binarize(self.x_train, "static",
                                    backend.rng(self.key(Stream.STATIC_BINARIZE)))
        self.x_test = backend.asarray(x_test)
        if mode != "none":
            self.x_test = binarize(self.x_test, mode, backend.rng(self.key(Stream.TEST_BINARIZE)))
        self.y_train, self.y_test = y_train, y_test

    def key(self, stream: Stream, *more: int) -> tuple[int, ...]:
        """The seed of ``stream`` in this run (see :mod:`vae_np.train.streams`)."""
        return stream_key(self.config.seed, stream, *more)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.config.batch_size)

    def summary(self) -> dict[str, Any]:
        """What results.json and the checkpoint record about the data."""
        return {"source": self.dataset.source, "description": self.dataset.description,
                "n_train": self.n_train, "n_test": self.n_test,
                "binarize": self.config.binarize_mode,
                # what vae_np.saving needs to draw the model's outputs as the data
                "image_shape": None if self.dataset.image_shape is None
                else list(self.dataset.image_shape),
                # what reads the data again (load_dataset(**origin)), and what they were
                "origin": self.dataset.origin, "fingerprint": self.dataset.fingerprint()}

    def epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (n_train,), bounds (B + 1,)): epoch ``epoch``'s shuffled image order and
        the offsets of its B minibatches in it."""
        batches = list(iterate_minibatches(self.n_train, self.config.batch_size,
                                           np.random.default_rng(self.key(Stream.SHUFFLE, epoch))))
        bounds = np.cumsum([0] + [len(b) for b in batches])
        return np.concatenate(batches), bounds

    def mean_pixel_logits(self):
        """``output_bias="data-logit"``: ln(p / (1 - p)) of the training set's mean pixels
        p (:meth:`train_pixel_means`), clipped to [1e-3, 1 - 1e-3], on the backend (D,):
        the decoder's output bias that makes a fresh model's Bernoulli means the average
        image, as Burda et al.'s code starts, so the first updates need not learn it."""
        p = np.clip(self.train_pixel_means(), 1e-3, 1.0 - 1e-3)
        return self.backend.asarray(np.log(p / (1.0 - p)))

    def train_pixel_means(self) -> np.ndarray:
        """The mean of each feature over the run's training images (grey levels, before
        any binarization: the probability of a 1 under dynamic binarization), float64
        (D,) on the host."""
        return np.mean(self._host_x_train, axis=0, dtype=np.float64)

    def train_feature_variances(self) -> np.ndarray:
        """The variance of each feature over the run's training images, float64 (D,) host."""
        return np.var(self._host_x_train, axis=0, dtype=np.float64)

    def epoch_train_labels(self, order: np.ndarray) -> np.ndarray | None:
        """The training labels in the epoch's ``order`` (host int64, (n_train,); batch b
        is the slice bounds[b]:bounds[b+1], as for the images); None without labels."""
        return None if self.y_train is None else self.y_train[order]

    def epoch_train_data(self, epoch: int, order: np.ndarray, reuse=None):
        """The training images of epoch ``epoch`` on the device, (n_train, 784), in
        minibatch order (so batch b is the contiguous slice bounds[b]:bounds[b+1]).

        ``reuse``: what an earlier call returned, which dynamic binarization overwrites
        with this epoch's images (the trainer keeps it across epochs: a full-MNIST epoch
        then draws into memory it has touched before, instead of two fresh 188 MB
        arrays); None, and the other modes: a fresh array. The same images either way."""
        xp, backend = self.backend.xp, self.backend
        order = backend.asarray(order, dtype=xp.int64)
        if self.config.binarize_mode != "dynamic":
            return xp.take(self.x_train, order, axis=0)
        draws = backend.rng(self.key(Stream.BINARIZE, epoch)).uniform(
            (order.shape[0], self.x_train.shape[1]), out=reuse)
        return gather_binarize(self.x_train, order, draws)

    def test_batches(self, batch_size: int, check: Callable[[], None] | None = None,
                     x=None) -> Iterator:
        """The test images (or ``x``) in batches of ``batch_size``; ``check()`` runs before
        each batch (the trainer's Ctrl-C check)."""
        x = self.x_test if x is None else x
        n = x.shape[0]
        for start in range(0, n, batch_size):
            if check is not None:
                check()
            # a stop within the axis: the array API leaves slices past the end unspecified
            yield x[start:min(start + batch_size, n), :]

    def test_label_batches(self, batch_size: int, y=None) -> Iterator:
        """The test labels (or ``y``), host int64, in the batches of :meth:`test_batches`."""
        y = self.y_test if y is None else y
        for start in range(0, len(y), batch_size):
            yield y[start:start + batch_size]


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None, name: str,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``limit`` rows of (x, y) chosen by ``rng``, in their original order (None: all)."""
    if limit is None:
        return x, y
    if limit > len(x):
        raise ValueError(f"{name}: asked for {limit} images, the data set has {len(x)}")
    keep = np.sort(rng.permutation(len(x))[:limit])
    return x[keep], None if y is None else y[keep]
