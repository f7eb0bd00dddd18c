"""PyTorch's ``torch.save`` file format for a state_dict, written and read without PyTorch.

A ``torch.save(state_dict, path)`` file (PyTorch >= 1.6, the zip serialization) is an
uncompressed zip archive whose members all sit under one folder (``archive/`` here):

    archive/data.pkl              the pickled OrderedDict {name: tensor}, protocol 2
    archive/data/0, data/1, ...   each tensor's storage: its raw bytes, C order
    archive/byteorder             b"little"
    archive/version               b"3\\n" (the zip format version PyTorch 2.x writes)
    archive/.format_version       b"1"
    archive/.storage_alignment    b"64" (each data/N starts at a multiple of 64 bytes)

Inside data.pkl each tensor is the call

    torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())

with ``storage`` a *persistent id*, ``("storage", torch.FloatStorage, "<N>", "cpu", numel)``:
the unpickler asks the archive for ``data/<N>``. Sizes, strides and offsets count elements.

:func:`write_state_dict` writes exactly that, the pickle opcode by opcode (no memo, which
pickle does not need): without torch there is no ``torch._utils._rebuild_tensor_v2`` object
for :mod:`pickle` to reference, so the references are written as the GLOBAL opcodes that
name them. ``torch.load(path, weights_only=True)`` reads the result (tests/test_export.py).

:func:`read_state_dict` reads such a file with a restricted :class:`pickle.Unpickler`: the
only globals it resolves are ``collections.OrderedDict``, the two rebuild functions
(``_rebuild_tensor_v2``, ``_rebuild_parameter``), emulated here with NumPy, and the
float storage types; any other global (``os.system``, a model class) is refused with
:class:`TorchFormatError` before anything runs. Pickled whole models, and the legacy
(pre-1.6, non-zip) format, are refused too.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write

__all__ = ["TorchFormatError", "read_state_dict", "write_state_dict"]

#: torch storage class name -> NumPy dtype (little-endian; the byteorder member may say big).
STORAGE_DTYPES = {"FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
                  "HalfStorage": np.dtype("<f2")}
_STORAGE_OF = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
ALIGNMENT = 64
ROOT = "archive"


class TorchFormatError(ValueError):
    """A file that is not a PyTorch state_dict this module can read (or is unsafe to)."""


# ------------------------------------------------------------------------------------------
# Writing


def write_state_dict(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` (name -> float16/32/64 array) as ``torch.save`` would write an
    OrderedDict of CPU tensors, atomically. Returns ``path``."""
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: expected str names, got {name!r}")
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<")
        if dtype not in _STORAGE_OF:
            raise TypeError(f"tensors[{name!r}]: expected float16, float32 or float64, got "
                            f"{array.dtype}")
        arrays[name] = np.asarray(array, dtype=dtype, order="C")   # 0-d stays 0-d
    pickled = _pickle_state_dict(arrays)

    def write(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as archive:
            _add(archive, fh, "data.pkl", pickled)
            _add(archive, fh, ".format_version", b"1")
            _add(archive, fh, ".storage_alignment", str(ALIGNMENT).encode())
            _add(archive, fh, "byteorder", b"little")
            for key, array in enumerate(arrays.values()):
                _add(archive, fh, f"data/{key}", array.tobytes(), align=True)
            _add(archive, fh, "version", b"3\n")

    return atomic_write(path, write)


def _add(archive: zipfile.ZipFile, fh, name: str, data: bytes, align: bool = False) -> None:
    """One stored member; with ``align``, its bytes start at a multiple of ALIGNMENT (the
    local header's extra field pads, as PyTorch's writer does, so the data can be mmapped)."""
    info = zipfile.ZipInfo(f"{ROOT}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    if align:
        start = fh.tell() + 30 + len(info.filename.encode())   # 30: the local header
        pad = -start % ALIGNMENT
        if 0 < pad < 4:                                         # an extra field needs 4
            pad += ALIGNMENT
        if pad:
            info.extra = struct.pack("<HH", 0x4654, pad - 4) + b"\0" * (pad - 4)
    archive.writestr(info, data)


def _pickle_state_dict(arrays: dict[str, np.ndarray]) -> bytes:
    """The opcodes of ``pickle.dumps(OrderedDict(...), protocol=2)`` for torch tensors."""
    out = bytearray(pickle.PROTO + b"\x02")
    out += _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    out += pickle.MARK
    for key, (name, array) in enumerate(arrays.items()):
        stride = [math.prod(array.shape[i + 1:]) for i in range(array.ndim)]
        out += _str(name) + _global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
        out += pickle.MARK + _str("storage") + _global("torch", _STORAGE_OF[array.dtype])
        out += _str(str(key)) + _str("cpu") + _int(array.size) + pickle.TUPLE
        out += pickle.BINPERSID
        out += _int(0) + _tuple(array.shape) + _tuple(stride) + pickle.NEWFALSE
        out += _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        out += pickle.TUPLE + pickle.REDUCE
    out += pickle.SETITEMS + pickle.STOP
    return bytes(out)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    data = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if 0 <= value < 2 ** 31:
        return pickle.BININT + struct.pack("<i", value)
    data = int(value).to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def _tuple(values) -> bytes:
    return pickle.MARK + b"".join(_int(int(v)) for v in values) + pickle.TUPLE


# ------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save(state_dict)`` file as NumPy arrays, by name, read
    without torch and without running anything the file names (see the module docstring).

    Raises FileNotFoundError, or :class:`TorchFormatError` naming what is wrong: not a zip
    of PyTorch's layout, a global other than a tensor's, or an object other than a flat
    {name: tensor} mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state_dict: no such file {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        legacy = " (the legacy pre-1.6 torch.save format: re-save it with a newer PyTorch)" \
            if head[:1] == pickle.PROTO else ""
        raise TorchFormatError(f"{path}: not a PyTorch zip file{legacy}")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            npz = " (a .npz archive: a vae_np model file needs no import)" if any(
                n.endswith(".npy") for n in archive.namelist()) else ""
            raise TorchFormatError(f"{path}: a zip file, but not torch.save's (expected one "
                                   f"<folder>/data.pkl, found {len(pickles)}){npz}")
        prefix = pickles[0][:-len("data.pkl")]
        names = set(archive.namelist())
        order = archive.read(prefix + "byteorder").decode().strip() \
            if prefix + "byteorder" in names else "little"
        if order not in ("little", "big"):
            raise TorchFormatError(f"{path}: byteorder {order!r}: expected little or big")
        unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), archive,
                                        prefix, "<" if order == "little" else ">", path)
        try:
            state = unpickler.load()
        except TorchFormatError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise TorchFormatError(f"{path}: {exc}") from None
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
                AttributeError, IndexError) as exc:
            raise TorchFormatError(f"{path}: data.pkl is damaged or not a state_dict "
                                   f"({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise TorchFormatError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                               f"(save model.state_dict(), not the model)")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise TorchFormatError(
                f"{path}: not a flat state_dict: entry {name!r} is a {type(value).__name__}, "
                f"not a tensor (a training checkpoint? save model.state_dict() alone)")
    return dict(state)


class _StorageType:
    """What the unpickler gives for ``torch.FloatStorage`` and its kin: the dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """NumPy's view of torch's ``_rebuild_tensor_v2``: ``size`` elements of the flat
    ``storage`` from ``storage_offset`` with ``stride`` (in elements), copied out."""
    if not isinstance(storage, np.ndarray):
        raise TorchFormatError(f"a tensor's storage is a {type(storage).__name__}, not a "
                               f"storage of the archive")
    for what, values in (("size", size), ("stride", stride)):
        if not isinstance(values, tuple) or not all(isinstance(v, int) and v >= 0
                                                    for v in values):
            raise TorchFormatError(f"a tensor's {what} {values!r}: expected a tuple of "
                                   f"integers >= 0")
    if len(size) != len(stride) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise TorchFormatError(f"a tensor's size {size}, stride {stride} and offset "
                               f"{storage_offset!r} do not fit together")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) \
        else storage_offset - 1
    if last >= storage.size:
        raise TorchFormatError(f"a tensor of size {size} (stride {stride}, offset "
                               f"{storage_offset}) reaches past its storage of "
                               f"{storage.size} elements")
    if not all(size):
        return np.zeros(size, dtype=storage.dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size,
        strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return view.astype(storage.dtype.newbyteorder("="), copy=True)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch's ``_rebuild_parameter`` (a state_dict saved with keep_vars=True): the data."""
    return data


def _fresh(function):
    """A new callable per lookup: a pickle's BUILD may set attributes (``__defaults__``)
    on what a GLOBAL gave it, and must not change this module's functions for later files."""
    return lambda: (lambda *args, **kwargs: function(*args, **kwargs))


# (module, name) -> a factory of what the unpickler hands out for that global.
_ALLOWED = {("collections", "OrderedDict"): lambda: collections.OrderedDict,   # immutable
            ("torch._utils", "_rebuild_tensor_v2"): _fresh(_rebuild_tensor_v2),
            ("torch._utils", "_rebuild_parameter"): _fresh(_rebuild_parameter),
            **{("torch", name): (lambda name=name: _StorageType(name))
               for name in STORAGE_DTYPES}}


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals of a state_dict of float tensors (``_ALLOWED``); storages
    come from the archive's ``data/<key>`` members."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, order: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.order, self.path = archive, prefix, order, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None and module == "torch" and name.endswith("Storage"):
            raise TorchFormatError(f"{self.path}: tensors of type torch.{name}: vae_np reads "
                                   f"float16, float32 and float64 tensors (convert with "
                                   f".float() before saving)")
        if found is None:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED))
            raise TorchFormatError(f"{self.path}: refusing to unpickle {module}.{name}: a "
                                   f"state_dict of float tensors needs only {allowed}")
        return found()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchFormatError(f"{self.path}: unknown persistent id {pid!r} (expected "
                                   f"('storage', type, key, location, numel))")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise TorchFormatError(f"{self.path}: storage {key!r} of type {kind!r}: expected "
                                   f"one of torch.{', torch.'.join(STORAGE_DTYPES)}")
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError:
                raise TorchFormatError(f"{self.path}: storage {member} is missing") from None
            dtype = kind.dtype.newbyteorder(self.order)
            if len(raw) != numel * dtype.itemsize:
                raise TorchFormatError(f"{self.path}: storage {member} holds {len(raw)} bytes, "
                                       f"{numel} {kind.name[:-7].lower()}s need "
                                       f"{numel * dtype.itemsize}")
            self.storages[key] = np.frombuffer(raw, dtype=dtype)
        return self.storages[key]
