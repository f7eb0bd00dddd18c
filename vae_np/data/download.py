"""Where MNIST's four files come from: names, published SHA-256 sums, mirrors, download.

Downloads go to a temporary file beside the target, are verified, then renamed into
place, so a reader never sees a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import BinaryIO, Sequence

__all__ = [
    "MNIST_FILES", "MNIST_SHA256", "MIRRORS", "ChecksumError", "DownloadError",
    "sha256_file", "verify_file", "default_data_dir", "download_mnist",
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
