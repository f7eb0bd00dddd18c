"""The IDX file format of MNIST: header, type codes, payload (host NumPy).

The format is documented at http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"):
two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
dimension, then the items in C order, multi-byte types big-endian.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["MNISTFormatError", "read_idx"]

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
GZIP_MAGIC = b"\x1f\x8b"


class MNISTFormatError(ValueError):
    """A data file is not a well-formed IDX file (or not the expected one)."""



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
    if buf[:2] == GZIP_MAGIC:
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
