"""Checkpoints as plain ``.npz`` files: no pickle, written atomically, checksummed.

A checkpoint holds named NumPy arrays (parameters, optimiser moments, RNG
state words, ...) plus JSON metadata (epoch, config, history, ...).  On disk it
is an ordinary uncompressed ``.npz`` archive, so ``numpy.load(path,
allow_pickle=False)`` can read it without this module:

* every array is stored as ``<name>.npy`` under its own name;
* one extra member, :data:`HEADER_KEY` (``"__metadata__"``), is a 1-D
  ``uint8`` array holding UTF-8 JSON::

      {"format_version": 1,
       "arrays_sha256": "<hex digest, see arrays_digest()>",
       "metadata": {...the caller's metadata...}}

Writing goes to a temporary file in the target's directory that is fsynced and
then renamed over the target with :func:`os.replace`, so a crash or an error
mid-write leaves the previous checkpoint untouched.  Loading verifies the
format version and a SHA-256 digest over all array contents, so a damaged
file raises :class:`CheckpointError` instead of yielding wrong numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "arrays_digest",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
]

#: Version of the on-disk layout described in the module docstring.
FORMAT_VERSION = 1

#: Reserved archive member holding the JSON header (format version, digest, metadata).
HEADER_KEY = "__metadata__"


class CheckpointError(ValueError):
    """A checkpoint file exists but is truncated, corrupt or of an unknown format."""


# --------------------------------------------------------------------------
# Atomic file writing (shared with vae_np.plotting)
# --------------------------------------------------------------------------


def _umask() -> int:
    # Linux exposes the umask without having to change it; os.umask() is the
    # portable fallback but briefly changes process-wide state.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so readers see either the old contents or the complete new ones.

    ``write(fh)`` is called with a binary file object for a temporary file in
    the same directory as *path*; the data are then flushed, fsynced and the
    temporary file is renamed onto *path* with :func:`os.replace` (atomic on
    POSIX and Windows for same-directory renames).  If anything raises,
    including ``KeyboardInterrupt``, the temporary file is removed and any
    existing file at *path* is left as it was.  Parent directories are created.

    Returns *path* as a :class:`pathlib.Path`. An OSError (disk full, a directory in the
    way, no permission) is raised again, of the same class and errno, naming *path* (not
    the temporary file) and what went wrong, on one line.
    """
    target = Path(path)
    try:
        return _atomic_write(target, write)
    except OSError as exc:
        named = type(exc)(f"{target}: could not be written "
                          f"({exc.strerror or ' '.join(str(exc).split())})")
        named.errno = exc.errno
        raise named from exc


def _atomic_write(target: Path, write: Callable[[IO[bytes]], None]) -> Path:
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates mode 0600; give the file the permissions a plain
        # open() would (or keep those of the file being replaced).
        try:
            mode = os.stat(target).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        with contextlib.suppress(OSError, AttributeError):  # no fchmod on Windows
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fd = -1  # now owned (and closed) by fh
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable; not possible (or needed) everywhere.
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


# --------------------------------------------------------------------------
# Validation and digest
# --------------------------------------------------------------------------


def _check_json_value(value: Any, where: str) -> None:
    """Raise TypeError (naming *where*) unless *value* round-trips through JSON."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):  # includes numpy.float64, a float subclass
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                # json.dumps would silently turn 1 into "1"; refuse instead.
                raise TypeError(
                    f"metadata key {key!r} in {where} must be a str, not {type(key).__name__}"
                )
            _check_json_value(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):  # tuples come back as lists
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    hint = " (use .item() or .tolist())" if isinstance(value, (np.generic, np.ndarray)) else ""
    raise TypeError(
        f"metadata value at {where} is not JSON-serialisable: "
        f"{type(value).__module__}.{type(value).__qualname__}{hint}"
    )


def _validate_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of name -> numpy.ndarray, got {type(arrays).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array names must be str, got {name!r} ({type(name).__name__})")
        if name == HEADER_KEY:
            raise ValueError(f"array name {HEADER_KEY!r} is reserved for checkpoint metadata")
        if not name or "\x00" in name:
            raise ValueError(f"invalid array name {name!r}")
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"arrays[{name!r}] must be a numpy.ndarray, got {type(value).__module__}."
                f"{type(value).__qualname__} (convert device arrays to host first; "
                "wrap scalars with numpy.asarray)"
            )
        if value.dtype.hasobject:
            raise TypeError(
                f"arrays[{name!r}] has dtype {value.dtype}, which contains Python objects "
                "and could only be stored with pickle"
            )
        out[name] = np.asarray(value)  # drop ndarray subclasses (matrix, masked, ...)
    # Array "x" is stored as the member "x.npy", and numpy.load finds an array by its name
    # or by its member's name; so "x" and "x.npy" (or HEADER_KEY and HEADER_KEY + ".npy")
    # would read back as the same member and fail the digest. Refuse them here instead.
    for name in out:
        if name.endswith(".npy") and (name[:-4] in out or name[:-4] == HEADER_KEY):
            other = name[:-4]
            what = "the reserved metadata member" if other == HEADER_KEY else "array"
            raise ValueError(
                f"array names {other!r} and {name!r} collide inside the .npz ({what} {other!r} "
                f"is stored as the member {name!r}); rename one of them"
            )
    return out


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over names, dtypes, shapes and C-order bytes of *arrays*.

    Arrays are visited in sorted name order and every field is length-prefixed,
    so the digest is independent of mapping order and memory layout
    (C/Fortran/strided) and cannot be fooled by shifting bytes between fields.
    """
    h = hashlib.sha256()

    def put(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        put(name.encode("utf-8"))
        # descr (not dtype.str) keeps structured field names and byte order.
        put(repr(np.lib.format.dtype_to_descr(arr.dtype)).encode("utf-8"))
        put(repr(tuple(int(n) for n in arr.shape)).encode("ascii"))
        data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        h.update(int(data.size).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any],
) -> None:
    """Atomically write *arrays* and *metadata* to the ``.npz`` file *path*.

    Parameters
    ----------
    path:
        Target file; parent directories are created.  An existing file is
        replaced only once the new one is completely written and fsynced.
    arrays:
        ``name -> numpy.ndarray`` (host arrays, any shape incl. 0-d, any
        non-object dtype).  Names are non-empty ``str`` other than
        :data:`HEADER_KEY`.  Values are stored bit-exactly.
    metadata:
        JSON-serialisable mapping: nested dicts (``str`` keys), lists/tuples,
        ``str``, ``int``, ``float`` (NaN/inf allowed), ``bool``, ``None``.
        Tuples load back as lists.

    Raises
    ------
    TypeError
        Non-``str`` array name, non-ndarray value, object dtype, or a metadata
        value that is not JSON-serialisable (the message names its key path).
    ValueError
        Reserved or empty array name, or two names that collide inside the
        archive (``"x"`` and ``"x.npy"``: the first is stored as ``x.npy``).
    """
    checked = _validate_arrays(arrays)
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    _check_json_value(metadata, "metadata")

    header = {
        "format_version": FORMAT_VERSION,
        "arrays_sha256": arrays_digest(checked),
        "metadata": metadata,
    }
    header_bytes = json.dumps(header, ensure_ascii=False).encode("utf-8")
    members = dict(checked)
    members[HEADER_KEY] = np.frombuffer(header_bytes, dtype=np.uint8)

    def write(fh: IO[bytes]) -> None:
        # The same layout numpy.savez produces, written directly because
        # numpy.savez(file, **arrays) breaks on arrays named "file" or "allow_pickle".
        with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in members.items():
                with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, arr, allow_pickle=False)

    atomic_write(path, write)


# Everything a damaged archive can make numpy.load / zipfile / json raise.
_CORRUPTION_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    ValueError,  # includes json.JSONDecodeError, UnicodeDecodeError, npy header errors
    EOFError,
    KeyError,
    OSError,
    NotImplementedError,  # unknown zip compression method / features
    RuntimeError,  # zipfile: member flagged as encrypted
    OverflowError,
)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``(arrays, metadata)``: a dict of in-memory numpy arrays (the file
    is closed on return) and the metadata dict.  Nothing is returned unless
    the whole file was read and verified.

    Raises
    ------
    FileNotFoundError
        *path* does not exist (the exception's ``filename`` is *path*).
    CheckpointError
        The file is truncated or corrupt (not a zip, CRC error, damaged npy
        header, missing or invalid JSON header, unknown format version, or a
        SHA-256 mismatch).  The message names the path and the problem.
    """
    fspath = os.fspath(path)
    with open(fspath, "rb") as fh:  # FileNotFoundError / PermissionError propagate as-is
        if not zipfile.is_zipfile(fh):  # else NumPy reads any other bytes as a pickle
            raise CheckpointError(f"{fspath}: not a .npz checkpoint (not a zip archive; "
                                  f"truncated, or another kind of file)")
        fh.seek(0)
        try:
            loaded = np.load(fh, allow_pickle=False)
        except _CORRUPTION_ERRORS as exc:
            raise CheckpointError(f"{fspath}: not a readable .npz checkpoint ({exc!r})") from exc
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{fspath}: is a single .npy array, not an .npz checkpoint")
        with loaded:
            try:
                contents = {name: loaded[name] for name in loaded.files}
            except _CORRUPTION_ERRORS as exc:
                raise CheckpointError(f"{fspath}: corrupt archive member ({exc!r})") from exc

    if HEADER_KEY not in contents:
        raise CheckpointError(f"{fspath}: no {HEADER_KEY!r} member; not a vae_np checkpoint")
    raw_header = contents.pop(HEADER_KEY)
    if not isinstance(raw_header, np.ndarray) or raw_header.dtype != np.uint8 or raw_header.ndim != 1:
        raise CheckpointError(f"{fspath}: {HEADER_KEY!r} member is not a 1-D uint8 array")
    try:
        header = json.loads(raw_header.tobytes().decode("utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{fspath}: metadata is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{fspath}: metadata header is not a JSON object")

    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(
            f"{fspath}: unknown checkpoint format version {version!r} "
            f"(this vae_np reads version {FORMAT_VERSION})"
        )
    metadata = header.get("metadata")
    expected = header.get("arrays_sha256")
    if not isinstance(metadata, dict) or not isinstance(expected, str):
        raise CheckpointError(f"{fspath}: metadata header lacks 'metadata' or 'arrays_sha256'")

    for name, value in contents.items():
        # Non-.npy members come back from NpzFile as raw bytes.
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{fspath}: archive member {name!r} is not a .npy array")
    actual = arrays_digest(contents)
    if actual != expected:
        raise CheckpointError(
            f"{fspath}: array data do not match the stored SHA-256 "
            f"(expected {expected[:16]}..., got {actual[:16]}...); the file is corrupt"
        )
    return contents, metadata

