"""Tests for vae_np.checkpoint: bit-exact round trips, atomic writes, corruption detection."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

try:
    import vae_np  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_np import checkpoint as ckpt
from vae_np.checkpoint import (
    HEADER_KEY,
    CheckpointError,
    arrays_digest,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "enc.W1": rng.standard_normal((784, 16)).astype(np.float32),
        "enc.b1": rng.standard_normal(16),  # float64
        "adam.t": np.array(17, dtype=np.int64),  # 0-d
        "step": np.array(0.125),  # 0-d float64
        "rng.state": rng.integers(0, 2**32, size=624, dtype=np.uint32),  # MT19937-like key
        "counts": np.arange(-5, 5, dtype=np.int64).reshape(2, 5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 4))),
        "mask": np.array([True, False, True]),
        "half": np.array([1.5, -2.0], dtype=np.float16),
        # Names that would collide with numpy.savez's own parameters.
        "file": np.arange(3),
        "allow_pickle": np.array(1.0),
    }


def sample_metadata() -> dict:
    return {
        "epoch": 12,
        "config": {"latent_dim": 2, "hidden": [512, 256], "lr": 1e-3, "bias": None},
        "history": [{"epoch": 1, "train_loss": 164.25, "test_loss": float("nan")}],
        "flags": {"warmup": True, "note": "ünïcødé ✓"},
        "rng_bit_generator": "PCG64",
    }


def assert_arrays_identical(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, arr in expected.items():
        assert isinstance(got[name], np.ndarray), name
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        # Bit-exact, including NaN payloads and -0.0.
        assert np.ascontiguousarray(got[name]).tobytes() == np.ascontiguousarray(arr).tobytes(), name


def dir_entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------


def test_round_trip_bit_exact(tmp_path):
    arrays, meta = sample_arrays(), sample_metadata()
    path = tmp_path / "run" / "nested" / "ckpt.npz"  # parent dirs are created
    save_checkpoint(path, arrays, meta)

    got_arrays, got_meta = load_checkpoint(path)
    assert_arrays_identical(got_arrays, arrays)
    assert got_arrays["adam.t"].ndim == 0 and int(got_arrays["adam.t"]) == 17
    nan_loss = got_meta["history"][0].pop("test_loss")
    assert np.isnan(nan_loss)
    expected_meta = sample_metadata()
    expected_meta["history"][0].pop("test_loss")
    assert got_meta == expected_meta
    assert dir_entries(path.parent) == {"ckpt.npz"}  # no stray temp files


def test_round_trip_special_float_bits(tmp_path):
    a = np.array([-0.0, np.inf, -np.inf, np.nan, 5e-324], dtype=np.float64)
    save_checkpoint(tmp_path / "c.npz", {"a": a}, {})
    got, meta = load_checkpoint(tmp_path / "c.npz")
    assert got["a"].tobytes() == a.tobytes()
    assert meta == {}


def test_tuples_in_metadata_load_as_lists(tmp_path):
    save_checkpoint(tmp_path / "c.npz", {}, {"shape": (28, 28)})
    _, meta = load_checkpoint(tmp_path / "c.npz")
    assert meta == {"shape": [28, 28]}


def test_loaded_arrays_are_in_memory_and_writable(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(4)}, {})
    arrays, _ = load_checkpoint(path)
    os.remove(path)  # file is closed and not memory-mapped
    arrays["w"] += 1
    assert np.array_equal(arrays["w"], np.full(4, 2.0))


def test_plain_numpy_load_without_pickle(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "c.npz"
    save_checkpoint(path, arrays, sample_metadata())
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == set(arrays) | {HEADER_KEY}
        contents = {name: npz[name] for name in npz.files}
    for arr in contents.values():
        assert not arr.dtype.hasobject
    header = json.loads(contents.pop(HEADER_KEY).tobytes().decode("utf-8"))
    assert header["format_version"] == ckpt.FORMAT_VERSION
    assert header["arrays_sha256"] == arrays_digest(arrays)
    assert header["metadata"]["epoch"] == 12
    assert_arrays_identical(contents, arrays)


def test_overwrite_replaces_previous(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a": np.zeros(3)}, {"epoch": 1})
    save_checkpoint(path, {"b": np.ones(2)}, {"epoch": 2})
    arrays, meta = load_checkpoint(path)
    assert set(arrays) == {"b"} and meta == {"epoch": 2}
    assert dir_entries(tmp_path) == {"c.npz"}


def test_file_permissions_follow_umask(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    path = tmp_path / "c.npz"
    save_checkpoint(path, {}, {})
    old = os.umask(0o022)
    os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~old  # not mkstemp's 0600


def test_digest_independent_of_order_and_layout():
    a = np.arange(12.0).reshape(3, 4)
    d1 = arrays_digest({"x": a, "y": np.arange(3)})
    d2 = arrays_digest({"y": np.arange(3), "x": np.asfortranarray(a)})
    assert d1 == d2
    assert arrays_digest({"x": a.astype(np.float32)}) != arrays_digest({"x": a})
    assert arrays_digest({"x": a.reshape(4, 3)}) != arrays_digest({"x": a})
    assert arrays_digest({"x": a}) != arrays_digest({"z": a})


# --------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _save_old(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"w": np.arange(5.0)}, {"epoch": 1})
    return path


def _assert_old_intact(path: Path) -> None:
    arrays, meta = load_checkpoint(path)
    assert meta == {"epoch": 1}
    assert np.array_equal(arrays["w"], np.arange(5.0))
    assert dir_entries(path.parent) == {path.name}  # temp file cleaned up


def test_failure_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = _save_old(tmp_path)
    real_write_array = np.lib.format.write_array
    calls = []

    def flaky_write_array(fp, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after one member is already in the temp file
            raise Boom("disk full")
        return real_write_array(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", flaky_write_array)
    with pytest.raises(Boom):
        save_checkpoint(path, {"w": np.zeros(5), "v": np.ones(5)}, {"epoch": 2})
    monkeypatch.undo()
    _assert_old_intact(path)


def test_failure_in_replace_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = _save_old(tmp_path)

    def failing_replace(src, dst):
        raise Boom("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(Boom):
        save_checkpoint(path, {"w": np.zeros(5)}, {"epoch": 2})
    monkeypatch.undo()
    _assert_old_intact(path)


def test_failure_in_fsync_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = _save_old(tmp_path)

    def failing_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_checkpoint(path, {"w": np.zeros(5)}, {"epoch": 2})
    monkeypatch.undo()
    _assert_old_intact(path)


def test_keyboard_interrupt_mid_write_cleans_up(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert dir_entries(tmp_path) == {"out.bin"}


def test_validation_errors_write_nothing(tmp_path):
    path = _save_old(tmp_path)
    with pytest.raises(TypeError):
        save_checkpoint(path, {"w": np.zeros(5)}, {"bad": object()})
    _assert_old_intact(path)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, key",
    [
        ({"lr": np.float32(1e-3)}, "lr"),
        ({"config": {"hidden": [512, np.int64(256)]}}, "hidden"),
        ({"weights": np.zeros(3)}, "weights"),
        ({"when": object()}, "when"),
        ({"s": {1, 2}}, "'s'"),
        ({"b": b"bytes"}, "'b'"),
    ],
)
def test_non_json_metadata_raises_type_error(tmp_path, metadata, key):
    with pytest.raises(TypeError, match=key):
        save_checkpoint(tmp_path / "c.npz", {}, metadata)
    assert not any(tmp_path.iterdir())


def test_non_str_metadata_key_raises(tmp_path):
    with pytest.raises(TypeError, match="key 1"):
        save_checkpoint(tmp_path / "c.npz", {}, {"per_epoch": {1: 0.5}})


def test_metadata_must_be_mapping(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(tmp_path / "c.npz", {}, [1, 2])


def test_object_dtype_array_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="obj"):
        save_checkpoint(tmp_path / "c.npz", {"obj": np.array([{"a": 1}], dtype=object)}, {})
    structured = np.zeros(2, dtype=[("x", "f8"), ("o", "O")])
    with pytest.raises(TypeError, match="rec"):
        save_checkpoint(tmp_path / "c.npz", {"rec": structured}, {})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.0, np.float64(1.0), "x"])
def test_non_ndarray_value_raises_type_error(tmp_path, value):
    with pytest.raises(TypeError, match="val"):
        save_checkpoint(tmp_path / "c.npz", {"val": value}, {})


def test_reserved_and_invalid_names(tmp_path):
    with pytest.raises((ValueError, TypeError), match="reserved"):
        save_checkpoint(tmp_path / "c.npz", {HEADER_KEY: np.zeros(1)}, {})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.npz", {3: np.zeros(1)}, {})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "c.npz", {"": np.zeros(1)}, {})


@pytest.mark.parametrize("names", [("a", "a.npy"), ("a.npy", "a.npy.npy"),
                                   (HEADER_KEY + ".npy",)])
def test_names_that_collide_inside_the_npz_are_refused(tmp_path, names):
    """Array "x" is stored as the member "x.npy"; numpy.load finds arrays by either name,
    so "x" beside "x.npy" would be written and then called corrupt by load_checkpoint."""
    path = _save_old(tmp_path)
    arrays = {name: np.full(i + 1, float(i)) for i, name in enumerate(names)}
    with pytest.raises(ValueError, match="collide") as info:
        save_checkpoint(path, arrays, {})
    stem = names[-1][:-4]
    assert repr(stem) in str(info.value) and repr(names[-1]) in str(info.value)
    _assert_old_intact(path)


def test_a_name_ending_in_npy_alone_round_trips(tmp_path):
    arrays = {"b.npy": np.arange(3.0), "c": np.ones(2)}
    save_checkpoint(tmp_path / "c.npz", arrays, {})
    loaded, _ = load_checkpoint(tmp_path / "c.npz")
    assert loaded.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])


def test_structured_non_object_dtype_round_trips(tmp_path):
    rec = np.zeros(3, dtype=[("x", "<f4"), ("n", ">i8", (2,))])
    rec["x"] = [1, 2, 3]
    rec["n"] = [[1, 2], [3, 4], [5, 6]]
    save_checkpoint(tmp_path / "c.npz", {"rec": rec}, {})
    got, _ = load_checkpoint(tmp_path / "c.npz")
    assert got["rec"].dtype == rec.dtype
    assert got["rec"].tobytes() == rec.tobytes()


# --------------------------------------------------------------------------
# Loading damaged files
# --------------------------------------------------------------------------


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_raises_checkpoint_error(tmp_path, fraction):
    path = tmp_path / "c.npz"
    save_checkpoint(path, sample_arrays(), sample_metadata())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=str(path).replace("\\", "\\\\")):
        load_checkpoint(path)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_flipped_byte_in_array_data_raises(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"w": np.arange(1000, dtype=np.float64)}
    save_checkpoint(path, arrays, {"epoch": 3})
    data = bytearray(path.read_bytes())
    offset = data.find(arrays["w"][500:501].tobytes())
    assert offset > 0
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.npz"):
        load_checkpoint(path)


def test_every_single_byte_flip_is_detected_or_harmless(tmp_path):
    """Flipping any one byte either raises CheckpointError or changes nothing we return."""
    arrays = {"w": np.linspace(-1, 1, 6, dtype=np.float32), "t": np.array(3, dtype=np.int64)}
    meta = {"epoch": 7, "tag": "x"}
    good = tmp_path / "good.npz"
    save_checkpoint(good, arrays, meta)
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    detected = 0
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        try:
            got_arrays, got_meta = load_checkpoint(bad)
        except CheckpointError:
            detected += 1
            continue
        # Only bytes that carry no content (timestamps, zip64 extras, ...) may be harmless.
        assert_arrays_identical(got_arrays, arrays)
        assert got_meta == meta
    assert detected > len(data) // 2


def _rewrite_archive(path: Path, edit) -> None:
    """Rebuild the zip with *edit(name, bytes) -> bytes* applied, so zip CRCs stay valid."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info.filename)) for info in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, blob in members:
            zf.writestr(name, edit(name, blob))
    path.write_bytes(buf.getvalue())


def test_sha256_catches_damage_that_zip_crc_cannot(tmp_path):
    path = tmp_path / "c.npz"
    w = np.arange(64, dtype=np.float32)
    save_checkpoint(path, {"w": w}, {})

    def flip_one_value(name, blob):
        if name != "w.npy":
            return blob
        blob = bytearray(blob)
        blob[-4] ^= 0x01  # lowest mantissa bit of the last element
        return bytes(blob)

    _rewrite_archive(path, flip_one_value)  # CRC-consistent, so only the digest can tell
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def _rewrite_header(path: Path, new_header: bytes) -> None:
    def edit(name, blob):
        if name != HEADER_KEY + ".npy":
            return blob
        out = io.BytesIO()
        np.lib.format.write_array(out, np.frombuffer(new_header, dtype=np.uint8))
        return out.getvalue()

    _rewrite_archive(path, edit)


def _header(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz[HEADER_KEY].tobytes())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h: json.dumps({**h, "format_version": 99}).encode(), "format version 99"),
        (lambda h: json.dumps({k: v for k, v in h.items() if k != "format_version"}).encode(), "version"),
        (lambda h: json.dumps({k: v for k, v in h.items() if k != "arrays_sha256"}).encode(), "arrays_sha256"),
        (lambda h: json.dumps([1, 2]).encode(), "JSON object"),
        (lambda h: b"{not json", "JSON"),
        (lambda h: b"\xff\xfe", "UTF-8"),
    ],
)
def test_bad_header_raises_checkpoint_error(tmp_path, mutate, message):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(3)}, {"epoch": 1})
    _rewrite_header(path, mutate(_header(path)))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_npz_without_header_raises(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(CheckpointError, match="__metadata__"):
        load_checkpoint(path)


def test_npy_and_pickle_files_raise(tmp_path):
    npy = tmp_path / "a.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(CheckpointError, match="npy"):
        load_checkpoint(npy)
    pkl = tmp_path / "a.pkl"
    import pickle

    pkl.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError):
        load_checkpoint(pkl)


def test_pickled_member_is_refused(tmp_path):
    """A hand-made .npz with an object array must not be unpickled."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.ones(3)}, {})

    def to_object(name, blob):
        if name != "w.npy":
            return blob
        out = io.BytesIO()
        np.lib.format.write_array(out, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        return out.getvalue()

    _rewrite_archive(path, to_object)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_a_file_that_is_not_a_zip_archive_is_named_as_such(tmp_path):
    """Text or other bytes in place of a checkpoint: NumPy would call it pickled data;
    the error says what it is instead, and names the file."""
    from vae_np.checkpoint import CheckpointError, load_checkpoint
    path = tmp_path / "checkpoint.npz"
    path.write_text("garbage\n")
    with pytest.raises(CheckpointError, match=r"checkpoint.npz: not a .npz checkpoint \(not a zip"):
        load_checkpoint(path)
