"""The array backend: the one place that knows which array library runs the math.

Every other module computes with ``backend.xp``, a namespace that follows the Python
array API standard, so the same model code runs on

- ``"numpy"``: the CPU, through ``array_api_compat.numpy`` (plain ``numpy.ndarray``),
- ``"cupy"``: an NVIDIA GPU, through ``array_api_compat.cupy`` (``cupy.ndarray``),
- ``"array_api_strict"``: a deliberately minimal implementation of the standard, used by
  the tests to prove that the model code uses nothing NumPy-only (and so runs on CuPy).

The backend also owns what the standard leaves out: random numbers, moving arrays to and
from the host, and the choice of floating dtype.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

BACKEND_NAMES = ("numpy", "cupy", "array_api_strict", "auto")
DTYPE_NAMES = ("float32", "float64")

# The fast paths (every op's twin, see "Fast twins" below) are on unless switched off here
# or with the environment variable.
_fast_paths_on = os.environ.get("VAE_NP_FAST_PATHS", "1").strip().lower() not in (
    "0", "false", "no", "off")


@contextlib.contextmanager
def use_fast_paths(on: bool = True):
    """Switch the fast paths on or off inside a ``with`` block (process-wide), e.g. to run
    the readable reference: ``with use_fast_paths(False): model.loss(x, eps=eps)``. The
    environment variable ``VAE_NP_FAST_PATHS=0`` switches them off for a whole process."""
    global _fast_paths_on
    previous, _fast_paths_on = _fast_paths_on, bool(on)
    try:
        yield
    finally:
        _fast_paths_on = previous


def _blas_requested() -> str:
    """The BLAS the environment variable VAE_NP_BLAS asks the CPU ops' products to run
    through: "numpy" (the default: NumPy's own) or "mkl" (see ``_twins_cpu.product``)."""
    return os.environ.get("VAE_NP_BLAS", "").strip().lower() or "numpy"


def fast_paths_enabled(backend: "Backend | None" = None) -> bool:
    """True when the ops run their fast twins: not switched off (:func:`use_fast_paths`,
    ``VAE_NP_FAST_PATHS=0``) and, given a ``backend``, one whose arrays have twins (NumPy
    with numba installed, CuPy; array-api-strict runs the references)."""
    if not _fast_paths_on:
        return False
    if backend is None:
        return True
    kind = {"numpy": "cpu", "cupy": "cuda"}.get(backend.name)
    return kind is not None and bool(_twin_table(kind))


# ------------------------------------------------------------------------------------------
# Fast twins: one reference per op, and at most one fast twin of it per device kind.
#
# An op is a function on arrays written as its math (the reference) and decorated with
# ``@fast_twin``. Its twins live in one module per device kind, leaves that import nothing
# from the package: ``_twins_cpu`` (compiled with numba, for NumPy arrays) and
# ``_twins_cuda`` (CUDA kernels, for CuPy arrays). Each has ``TWINS``, a dict from the op's
# name (``"module.qualname"``, e.g. ``"losses.kl_standard_normal"``) to a function taking
# the same arguments and returning the same results, to the bit on NumPy
# (tests/test_fast_paths.py), or ``NotImplemented`` for arguments it does not serve (then
# the reference runs). A twin validates nothing: arguments of the wrong shape or of mixed
# dtypes are outside what it serves, so the reference runs and raises the error (or
# promotes) as documented. The math modules name no backend: the device of the op's first
# array argument picks the table, and ``use_fast_paths(False)``, a missing numba or an
# array-api-strict array pick the reference.

#: Every op decorated with :func:`fast_twin`: name -> the undecorated reference.
FAST_OPS: dict[str, Callable] = {}
_TWIN_TABLES: dict[str, dict[str, Callable]] = {}


def _twin_table(kind: str) -> dict[str, Callable]:
    """The twins of device kind ``kind`` (``"cpu"`` or ``"cuda"``), loaded on first use
    ({} for the CPU when numba is not installed: the references run)."""
    table = _TWIN_TABLES.get(kind)
    if table is None:
        if kind == "cpu":
            blas = _blas_requested()
            try:
                from . import _twins_cpu as module
            except ImportError as exc:
                if exc.name != "numba":   # a broken twin module is an error, not a fallback
                    raise
                if blas != "numpy":
                    raise BackendUnavailableError(
                        f"VAE_NP_BLAS={blas}: the products run through it in the compiled "
                        f'CPU ops, which need numba (`pip install -e ".[fast]"`)') from None
                module = None
            if module is not None:
                try:
                    module.use_blas(blas)
                except (ValueError, LookupError) as exc:
                    raise BackendUnavailableError(f"VAE_NP_BLAS={blas}: {exc}") from None
        else:
            from . import _twins_cuda as module
        table = _TWIN_TABLES[kind] = dict(module.TWINS) if module is not None else {}
    return table


def _device_kind(array) -> str | None:
    """``"cpu"`` for a NumPy array, ``"cuda"`` for a CuPy one, else None (no twins)."""
    if type(array) is np.ndarray:
        return "cpu"
    module = type(array).__module__
    return "cuda" if module.startswith("cupy") else None


def twin_of(name: str, array) -> Callable | None:
    """The fast twin of op ``name`` for the device ``array`` lives on, or None when the
    reference runs there (fast paths off, array-api-strict, no numba, no such twin)."""
    if not _fast_paths_on:
        return None
    kind = _device_kind(array)
    return None if kind is None else _twin_table(kind).get(name)


def fast_twin(reference: Callable) -> Callable:
    """Decorator: ``reference`` is an op's math; calls run its fast twin for the device of
    the first array argument when there is one (see the comment above), else it.

    The decorated function keeps the reference as ``.reference`` (for tests and for
    learners who want the math alone) and its docstring.
    """
    name = f"{reference.__module__.rsplit('.', 1)[-1]}.{reference.__qualname__}"
    if name in FAST_OPS:
        raise ValueError(f"reference: an op named {name!r} is already registered")
    FAST_OPS[name] = reference

    @functools.wraps(reference)
    def op(*args, **kwargs):
        if _fast_paths_on:
            for arg in args:
                kind = _device_kind(arg)
                if kind is not None:
                    twin = _twin_table(kind).get(name)
                    if twin is not None:
                        result = twin(*args, **kwargs)
                        if result is not NotImplemented:
                            return result
                    break
                if hasattr(arg, "__array_namespace__"):   # array-api-strict: the reference
                    break
        return reference(*args, **kwargs)

    op.reference = reference
    op.op_name = name
    return op


class BackendUnavailableError(RuntimeError):
    """Raised when a requested backend cannot run here (missing package or GPU)."""


# What to install for the GPU backend, by the CUDA major version of the driver
# (``nvidia-smi`` prints it top right): setup.cfg's extras bring CuPy together with the
# CUDA libraries it loads (cuRAND, cuBLAS, NVRTC and the CUDA headers NVRTC needs).
GPU_INSTALL_HINT = '`pip install -e ".[gpu]"` (`".[cuda13]"` with a CUDA 13 driver)'


def _install_hint(cupy) -> str:
    """The extra that matches the CUDA major CuPy was built for (cuda12 when unknown)."""
    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        major = 12
    extra = "cuda13" if major >= 13 else "cuda12"
    return f'`pip install -e ".[{extra}]"` (CuPy for CUDA {max(major, 12)} with its libraries)'


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as one short line (NVRTC logs and CUDA errors run to many lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _probe_gpu(cupy) -> str | None:
    """Run once what a training run needs from the CUDA libraries, on a few numbers: a
    Philox draw (cuRAND, as :class:`RNG` draws), a matrix product (cuBLAS, as every layer
    does) and one elementwise kernel compiled with the package's NVRTC options and read
    back (NVRTC and the CUDA headers, as the fused kernels are built; the read-back makes
    a launch failure, e.g. no kernel image for this GPU, surface here). None when all
    work, else one line naming the library that failed and what to install."""
    from ._twins_cuda import OPTIONS

    try:
        philox = cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10
        noise = cupy.random.RandomState(1, method=philox).standard_normal(
            (4, 4), dtype=cupy.float32)
    except Exception as exc:
        return (f"CuPy sees the GPU but cannot use cuRAND, the CUDA random number library "
                f"({_one_line(exc)}); install CuPy with its CUDA libraries: "
                f"{_install_hint(cupy)}")
    try:
        product = cupy.matmul(noise, noise)
    except Exception as exc:
        return (f"CuPy sees the GPU but cannot use cuBLAS, the CUDA matrix library "
                f"({_one_line(exc)}); install CuPy with its CUDA libraries: "
                f"{_install_hint(cupy)}")
    try:
        probe = cupy.ElementwiseKernel("T x", "T y", "y = x + (T)1;", "vae_np_probe",
                                       options=OPTIONS)
        value = float(probe(product).sum())
    except Exception as exc:
        return (f"CuPy sees the GPU but cannot compile and run a kernel with NVRTC, the "
                f"CUDA runtime compiler, and the CUDA headers ({_one_line(exc)}); install "
                f"CuPy with its CUDA libraries: {_install_hint(cupy)}")
    if value != value:  # NaN: the GPU computed garbage
        return "CuPy's first kernel on this GPU returned NaN; check the driver and the GPU"
    return None


# The probe compiles a kernel (about a second the first time, then cached on disk by
# CuPy): run it once per process, per CuPy module (the tests substitute stand-ins).
_PROBED: dict[int, tuple[Any, str | None]] = {}


def _cupy_or_reason() -> tuple[Any, str | None]:
    """Return (cupy module, None) when CuPy and a GPU are usable, else (None, why).

    Usable means: CuPy imports, sees at least one device, and can draw random numbers
    (cuRAND), multiply matrices (cuBLAS) and compile and run a kernel (NVRTC), so that a
    missing CUDA library is reported here, before any data is loaded, and not as a
    traceback in the middle of training."""
    try:
        import cupy
    except ImportError:
        return None, ('CuPy is not installed; the cupy backend needs an NVIDIA GPU and its '
                      f'driver, and the GPU extra: {GPU_INSTALL_HINT}')
    except Exception as exc:  # broken CUDA libraries raise all sorts of errors on import
        return None, (f"CuPy failed to import ({_one_line(exc)}); check the CUDA "
                      f"installation, or reinstall with {GPU_INSTALL_HINT}")
    no_gpu = ("the cupy backend needs an NVIDIA GPU and its driver (`nvidia-smi` lists "
              f"them) plus {GPU_INSTALL_HINT}; use the numpy backend here")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, (f"CuPy is installed but no usable NVIDIA GPU was found "
                      f"({_one_line(exc)}): {no_gpu}")
    if count < 1:
        return None, f"CuPy is installed but no NVIDIA GPU was found: {no_gpu}"
    probed = _PROBED.get(id(cupy))
    if probed is None or probed[0] is not cupy:
        probed = _PROBED[id(cupy)] = (cupy, _probe_gpu(cupy))
    if probed[1] is not None:
        return None, probed[1]
    return cupy, None


def cuda_available() -> bool:
    """True when CuPy is installed, sees a GPU, and its CUDA libraries work."""
    return _cupy_or_reason()[0] is not None


def cuda_unavailable_reason() -> str | None:
    """Why the cupy backend cannot run here (one line), or None when it can."""
    return _cupy_or_reason()[1]


class RNG:
    """A seeded random stream that draws arrays on a backend.

    ``normal`` and ``uniform`` return arrays of shape ``shape`` and the backend dtype.
    ``state()`` is a JSON-serialisable snapshot and ``set_state`` restores it, so a
    training run can be checkpointed and resumed draw for draw.

    NumPy and array-api-strict draw with NumPy's PCG64 on the host (strict then wraps
    the result). CuPy draws on the device; each call draws from a Philox stream keyed by
    (seed, call number) (one cuRAND generator, re-seeded per call), so the state is two
    integers and no draw leaves the GPU.
    """

    def __init__(self, backend: "Backend", seed: int | Sequence[int]):
        self.backend = backend
        self._seed_sequence = np.random.SeedSequence(seed)
        if backend.name == "cupy":
            self._calls = 0
            self._philox = None  # cupy.random.RandomState, made at the first draw
        else:
            self._generator = np.random.Generator(np.random.PCG64(self._seed_sequence))

    def _cupy_stream(self):
        """The Philox generator, seeded for this draw with the key (seed, call number).

        One cuRAND generator per RNG, created at the first draw and re-seeded at each
        later one (a training run draws once per batch: thousands of draws). CuPy's
        ``RandomState.seed`` sets the cuRAND seed and resets the offset to 0, which is
        exactly the state a new generator with that seed starts in, so the draws are the
        same bits as with a fresh generator per draw (tests/test_gpu.py checks it)."""
        cupy = self.backend.native
        key = int(np.random.SeedSequence(
            self._seed_sequence.entropy, spawn_key=(*self._seed_sequence.spawn_key, self._calls)
        ).generate_state(1, np.uint64)[0])
        self._calls += 1
        if self._philox is None:
            self._philox = cupy.random.RandomState(
                key, method=cupy.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
        else:
            self._philox.seed(key)
        return self._philox

    def normal(self, shape: Sequence[int]):
        """Standard normal draws, shape ``shape``."""
        shape = tuple(int(s) for s in shape)
        if self.backend.name == "cupy":
            return self._cupy_stream().standard_normal(shape, dtype=self.backend.dtype)
        draws = self._generator.standard_normal(shape, dtype=self.backend.numpy_dtype)
        return self.backend.asarray(draws)

    def uniform(self, shape: Sequence[int], out=None):
        """Uniform draws on [0, 1), shape ``shape``.

        ``out``: a backend array of that shape and the backend dtype to write them into
        (and return), the same draws as without it. On NumPy they are drawn in place, so
        a buffer kept from an earlier call costs no fresh memory."""
        shape = tuple(int(s) for s in shape)
        if out is not None:
            try:
                where = backend_of(out)
            except TypeError:
                raise TypeError(f"out: expected a {self.backend.name} array, got "
                                f"{type(out).__module__}.{type(out).__name__}") from None
            if where.name != self.backend.name or out.dtype != self.backend.dtype:
                raise TypeError(f"out: expected a {self.backend.name} array of dtype "
                                f"{self.backend.dtype_name}, got a {where.name} array of "
                                f"dtype {out.dtype}")
            if tuple(out.shape) != shape:
                raise ValueError(f"out: expected shape {shape}, got {tuple(out.shape)}")
            if self.backend.name == "numpy" and not out.flags.writeable:
                raise ValueError("out: expected a writable array, got a read-only one")
            if self.backend.name == "numpy" and out.flags.c_contiguous:
                return self._generator.random(dtype=self.backend.numpy_dtype, out=out)
            out[...] = self.uniform(shape)
            return out
        if self.backend.name == "cupy":
            return self._cupy_stream().random_sample(shape, dtype=self.backend.dtype)
        draws = self._generator.random(shape, dtype=self.backend.numpy_dtype)
        return self.backend.asarray(draws)

    def state(self) -> dict:
        """A JSON-serialisable snapshot of the stream position."""
        if self.backend.name == "cupy":
            return {"kind": "philox-calls", "calls": self._calls}
        return {"kind": "pcg64", "state": self._generator.bit_generator.state}

    def set_state(self, state: dict) -> None:
        """Restore a snapshot taken by :meth:`state` (same seed, same backend kind)."""
        if not isinstance(state, dict) or "kind" not in state:
            raise ValueError(f"state: expected a dict from RNG.state(), got {state!r}")
        if self.backend.name == "cupy":
            if state["kind"] != "philox-calls":
                raise ValueError(f"state: a {state['kind']!r} state cannot restore a CuPy RNG")
            self._calls = int(state["calls"])
        else:
            if state["kind"] != "pcg64":
                raise ValueError(f"state: a {state['kind']!r} state cannot restore a host RNG")
            self._generator.bit_generator.state = state["state"]


@dataclass(frozen=True)
class Backend:
    """An array library plus a floating dtype.

    Attributes:
        name: ``"numpy"``, ``"cupy"`` or ``"array_api_strict"``.
        xp: the array-API namespace all model code computes with.
        native: the underlying module (``numpy``, ``cupy`` or ``array_api_strict``).
        dtype: the floating dtype of parameters and activations, as an ``xp`` dtype.
    """

    name: str
    xp: Any = field(repr=False)
    native: Any = field(repr=False)
    dtype: Any

    @property
    def dtype_name(self) -> str:
        return "float64" if self.dtype == self.xp.float64 else "float32"

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype_name)

    def asarray(self, array, dtype=None):
        """Copy or view host data (or an array of this backend) as a backend array."""
        dtype = self.dtype if dtype is None else dtype
        if self.name == "array_api_strict" and isinstance(array, np.ndarray):
            array = np.ascontiguousarray(array)
        return self.xp.asarray(array, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        """Move an array of this backend to the host as a ``numpy.ndarray``."""
        if isinstance(array, np.ndarray):
            return array
        if self.name == "cupy":
            return self.native.asnumpy(array)
        return np.asarray(array)

    def to_float(self, scalar) -> float:
        """A 0-d backend array as a Python float (a device-to-host copy on GPUs)."""
        return float(self.to_numpy(scalar))

    def rng(self, seed: int | Sequence[int]) -> RNG:
        """A seeded random stream drawing arrays of this backend's dtype."""
        return RNG(self, seed)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on the CPU."""
        if self.name == "cupy":
            self.native.cuda.Device().synchronize()

    def zeros(self, shape: Sequence[int]):
        return self.xp.zeros(tuple(shape), dtype=self.dtype)


def get_backend(name: str | Backend = "numpy", dtype: str | None = None) -> Backend:
    """Resolve a backend by name.

    Args:
        name: ``"numpy"``, ``"cupy"``, ``"array_api_strict"``, or ``"auto"`` (CuPy when a
            GPU is usable, else NumPy). A :class:`Backend` is returned unchanged.
        dtype: ``"float32"`` (the default for a name) or ``"float64"``. With a
            :class:`Backend`, ``None`` or that backend's own dtype.

    Raises:
        ValueError: unknown ``name`` or ``dtype``, or a dtype that contradicts a Backend.
        BackendUnavailableError: CuPy requested but not installed or no GPU; NumPy with
            VAE_NP_BLAS set to anything but "numpy" or "mkl", or to "mkl" without MKL's
            runtime library or without numba.
    """
    if isinstance(name, Backend):
        if dtype is not None and dtype != name.dtype_name:
            raise ValueError(f"dtype: {dtype!r} contradicts the given backend's "
                             f"{name.dtype_name!r}; pass one or the other")
        return name
    dtype = "float32" if dtype is None else dtype
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {name!r}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    if name == "auto":
        name = "cupy" if cuda_available() else "numpy"
    if name == "numpy":
        native = np
        xp = importlib.import_module("array_api_compat.numpy")
        if _blas_requested() != "numpy":
            _twin_table("cpu")            # a BLAS that cannot be had is refused here, first
    elif name == "cupy":
        native, reason = _cupy_or_reason()
        if native is None:
            raise BackendUnavailableError(f"backend 'cupy' is unavailable: {reason}")
        xp = importlib.import_module("array_api_compat.cupy")
    else:
        try:
            native = xp = importlib.import_module("array_api_strict")
        except ImportError as exc:
            raise BackendUnavailableError(
                'backend \'array_api_strict\' needs `pip install array-api-strict` '
                '(included in the test extra: `pip install -e ".[test]"`)'
            ) from exc
    return Backend(name=name, xp=xp, native=native, dtype=getattr(xp, dtype))


def namespace_of(*arrays):
    """The array-API namespace of ``arrays`` (for functions that take arrays, not a backend)."""
    from array_api_compat import array_namespace

    return array_namespace(*arrays)


_BACKENDS_OF: dict = {}


def backend_of(array) -> Backend:
    """The :class:`Backend` an array lives on (its library and its floating dtype), for
    functions that take arrays rather than a backend."""
    if type(array) is np.ndarray:               # the hot case, without array_namespace
        backend = _BACKENDS_OF.get(array.dtype)
        if backend is not None:
            return backend
    xp = namespace_of(array)
    key = (xp.__name__, str(array.dtype))
    backend = _BACKENDS_OF.get(key)
    if backend is None:
        name = xp.__name__.rsplit(".", 1)[-1]
        if name not in ("numpy", "cupy", "array_api_strict"):
            raise TypeError(f"array: expected a NumPy, CuPy or array-api-strict array, got "
                            f"{type(array).__module__}.{type(array).__name__}")
        native = importlib.import_module(name)
        backend = Backend(name=name, xp=xp, native=native, dtype=array.dtype)
        _BACKENDS_OF[key] = backend
        if type(array) is np.ndarray:
            _BACKENDS_OF[array.dtype] = backend
    return backend
