"""Every CUDA source of the package compiled by NVRTC, on a machine without a GPU.

NVRTC, CUDA's runtime compiler, is a plain shared library: the ``nvidia-cuda-nvrtc-cu12``
wheel brings it, and it compiles without a driver or a device. So every kernel body in
``vae_np._twins_cuda.SOURCES`` (and every raw source in ``RAW_SOURCES``, if the module
ever holds one) is compiled here, in the ordinary suite, for compute capabilities 8.0
(A100) and 9.0 (H100/H200), in float32 and float64, with the package's ``OPTIONS``:

- as CuPy compiles it (``test_kernel_compiles_as_cupy_builds_it``): the translation unit
  comes from CuPy's own ``ElementwiseKernel`` code generator (a private but stable
  function, ``cupy._core._kernel._get_elementwise_kernel_code``, unchanged from CuPy 13
  to 14), with CuPy's headers prepended and CuPy's compiler options around ours
  (``assemble_cupy_compiler_options``: ``--std=c++17``, the bundled CCCL and CuPy include
  directories, the CUDA headers). Array arguments reach the body as ``const T &x``
  (inputs) or ``T &y`` (outputs) bound to the current element, scalar arguments as
  ``const T x`` parameters, ``T`` typedef'd to float or double: exactly what the kernel
  sees on a GPU;
- in a plain wrapper written here (``test_kernel_compiles_in_a_plain_wrapper``): the same
  parameter types over raw pointers, no CuPy header, so the bodies are checked even if
  CuPy's private generator moves;
- float32 kernels must not compute in double (checked on the PTX of the CuPy-built
  units): a bare ``0.1`` is a double and promotes the expression to double, which is slow
  on most GPUs and rounds unlike NumPy's float32 (write ``(T)0.1``).

Self-tests (``test_a_broken_...``) compile deliberately wrong bodies through the same
helpers and check that the test fails and that its message names the kernel and the line
of the body.

Where the NVRTC wheel is not installed at all (``pip install -e ".[test]"`` installs it
on Linux and Windows) the tests skip and say so; where it is installed but unusable,
they fail. CuPy (``cupy-cuda12x``, also in the test extra) is needed only for the
CuPy-generated translation units.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from vae_np import _twins_cuda

ARCHS = ("compute_80", "compute_90")
DTYPES = ("float32", "float64")
C_TYPES = {"float32": "float", "float64": "double"}
NVRTC_WHEEL = "nvidia-cuda-nvrtc-cu12"


# ------------------------------------------------------------------------------------------
# NVRTC through ctypes: the library from the wheel, else where CUDA's own locator finds it


class _Nvrtc:
    """The few NVRTC calls these tests need (nvrtc.h), on a loaded ``ctypes.CDLL``."""

    COMPILATION_ERROR = 6  # NVRTC_ERROR_COMPILATION

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self.lib.nvrtcGetErrorString(status).decode()
            raise RuntimeError(f"{what} failed: {message} ({status})")

    def compile(self, source: str, options, name: str = "vae_np_kernel.cu"):
        """(ok, log, ptx) of one translation unit."""
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(
            ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram")
        try:
            encoded = [o.encode() for o in options]
            array = (ctypes.c_char_p * len(encoded))(*encoded)
            status = self.lib.nvrtcCompileProgram(program, len(encoded), array)
            if status not in (0, self.COMPILATION_ERROR):
                self._check(status, "nvrtcCompileProgram")
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)),
                        "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
            ptx = ""
            if status == 0:
                self._check(self.lib.nvrtcGetPTXSize(program, ctypes.byref(size)),
                            "nvrtcGetPTXSize")
                buffer = ctypes.create_string_buffer(size.value)
                self._check(self.lib.nvrtcGetPTX(program, buffer), "nvrtcGetPTX")
                ptx = buffer.value.decode()
            return status == 0, log.value.decode(errors="replace"), ptx
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution(NVRTC_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _candidate_libraries() -> list[str]:
    """Where libnvrtc may be: the wheel's lib directory first (so the version is the one
    the test extra pins, not a system CUDA's), then cuda-pathfinder (CuPy 14's locator),
    then the system's library path."""
    found = []
    try:
        import nvidia.cuda_nvrtc as wheel  # a namespace package: no __file__

        for root in wheel.__path__:
            for sub in ("lib", "bin"):  # bin/ on Windows
                folder = Path(root) / sub
                if folder.is_dir():
                    names = sorted(p for p in folder.iterdir()
                                   if re.fullmatch(r"(lib)?nvrtc(64_\d+_0)?(\.so\.\d+|\.dll)",
                                                   p.name))
                    found += [str(p) for p in names]
    except ImportError:
        pass
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        found.append(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:
        pass
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return found


def _load_nvrtc() -> tuple[_Nvrtc | None, str]:
    errors = []
    for path in _candidate_libraries():
        try:
            # RTLD_GLOBAL: the library finds its builtins (libnvrtc-builtins) next to it.
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0))
            return _Nvrtc(lib, path), ""
        except (OSError, RuntimeError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors) or "no libnvrtc found"


_NVRTC, _NVRTC_ERROR = _load_nvrtc()


@pytest.fixture(scope="module")
def nvrtc() -> _Nvrtc:
    if _NVRTC is not None:
        return _NVRTC
    if _wheel_installed():  # installed but unusable: that is a failure, not a skip
        pytest.fail(f"{NVRTC_WHEEL} is installed but NVRTC cannot be loaded: {_NVRTC_ERROR}")
    pytest.skip(f"NVRTC is not installed ({NVRTC_WHEEL}; `pip install -e \".[test]\"` "
                f"installs it on Linux and Windows): {_NVRTC_ERROR}")


# ------------------------------------------------------------------------------------------
# Translation units


@dataclass(frozen=True)
class Kernel:
    """One elementwise kernel as ``cupy.ElementwiseKernel`` takes it."""

    name: str
    in_params: str
    out_params: str
    body: str
    preamble: str = ""
    scalars: tuple = ()  # inputs passed as Python scalars (by value in the kernel)

    @classmethod
    def from_sources(cls, name: str) -> "Kernel":
        in_params, out_params, body, *rest = _twins_cuda.SOURCES[name]
        extra = rest[0] if rest and isinstance(rest[0], dict) else {}
        scalars = getattr(_twins_cuda, "SCALAR_INPUTS", {}).get(name, ())
        return cls(name, in_params, out_params, body, extra.get("preamble", ""),
                   tuple(scalars))


def _params(spec: str) -> list[tuple[str, str]]:
    """'T x, float32 y, raw T z' -> [('T', 'x'), ...] (type, name); raw is not used here."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        words = part.split()
        if "raw" in words[:-2]:
            raise NotImplementedError(f"raw parameter {part!r}: extend this test")
        out.append((words[-2], words[-1]))
    return out


_CTYPES_OF_NUMPY = {"float32": "float", "float64": "double", "int32": "int",
                    "int64": "long long", "uint32": "unsigned int", "uint64": "unsigned long long",
                    "bool": "bool", "int8": "signed char", "uint8": "unsigned char"}


def plain_source(kernel: Kernel, dtype: str) -> str:
    """The body inside a ``__global__`` function written here, no CuPy header: inputs as
    ``const T &name`` (arrays) or ``const T name`` (scalars), outputs as ``T &name``,
    bound to element ``i`` of raw pointers; ``i`` and ``T`` as CuPy defines them."""
    params, binds = [], []
    for kind, spec in (("in", kernel.in_params), ("out", kernel.out_params)):
        for type_name, name in _params(spec):
            ctype = "T" if len(type_name) == 1 else _CTYPES_OF_NUMPY[type_name]
            if kind == "in" and name in kernel.scalars:
                params.append(f"const {ctype} {name}")
            elif kind == "in":
                params.append(f"const {ctype} *__restrict__ _raw_{name}")
                binds.append(f"const {ctype} &{name} = _raw_{name}[i];")
            else:
                params.append(f"{ctype} *_raw_{name}")
                binds.append(f"{ctype} &{name} = _raw_{name}[i];")
    type_vars = sorted({t for spec in (kernel.in_params, kernel.out_params)
                        for t, _ in _params(spec) if len(t) == 1})
    typedefs = "".join(f"typedef {C_TYPES[dtype]} {t};\n" for t in type_vars)
    return (f"{typedefs}{kernel.preamble}\n"
            f'extern "C" __global__ void vae_np_{kernel.name}({", ".join(params)}, '
            f"const long long _n) {{\n"
            f"  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < _n;\n"
            f"       i += (long long)blockDim.x * gridDim.x) {{\n"
            + "".join(f"    {b}\n" for b in binds)
            + f"{kernel.body}\n  }}\n}}\n")


_CUPY_REASON = None
try:
    import cupy
    from cupy._core import _kernel as _cupy_kernel
    from cupy._core import _scalar as _cupy_scalar
    from cupy._core import core as _cupy_core
    from cupy._core._carray import Indexer as _CupyIndexer

    _cupy_kernel._ArgInfo  # noqa: B018  (the private API this needs)
    _cupy_kernel._get_elementwise_kernel_code  # noqa: B018
except Exception as exc:  # not installed, or its private code generator moved
    cupy = None
    _CUPY_REASON = f"{type(exc).__name__}: {exc}"

# _ArgKind in cupy/_core/_kernel.pxd
_ARG_NDARRAY, _ARG_INDEXER, _ARG_SCALAR = 1, 2, 3


def cupy_source(kernel: Kernel, dtype: str) -> str:
    """The translation unit CuPy builds for ``kernel`` called on C-contiguous arrays of
    ``dtype`` (reduced to one dimension, as CuPy reduces contiguous arguments), with the
    inputs in ``kernel.scalars`` passed as Python scalars: CuPy's own code generator,
    with the headers CuPy prepends."""
    ek = cupy.ElementwiseKernel(kernel.in_params, kernel.out_params, kernel.body,
                                f"vae_np_{kernel.name}", preamble=kernel.preamble,
                                options=_twins_cuda.OPTIONS)
    np_dtype = np.dtype(dtype)
    in_dtypes = tuple(None if p.name in kernel.scalars else np_dtype for p in ek.in_params)
    out_dtypes = tuple(np_dtype for _ in ek.out_params)
    in_types, out_types, type_map = ek._decide_params_type(in_dtypes, out_dtypes)
    infos = []
    for p, t in zip(ek.in_params + ek.out_params, in_types + out_types):
        if p.name in kernel.scalars:
            infos.append(_cupy_kernel._ArgInfo(_ARG_SCALAR, _cupy_scalar.CScalar,
                                               np.dtype(t), 0, True, True))
        else:
            infos.append(_cupy_kernel._ArgInfo(_ARG_NDARRAY, cupy.ndarray, np.dtype(t), 1,
                                               True, True))
    infos.append(_cupy_kernel._ArgInfo(_ARG_INDEXER, _CupyIndexer, None, 1, True, True))
    code = _cupy_kernel._get_elementwise_kernel_code(
        tuple(infos), type_map, ek.params, ek.operation, ek.name, ek.preamble, **ek.kwargs)
    headers = "".join(f"#include <{h}>\n" for h in _cupy_core._cupy_header_list)
    return headers + code


def cupy_options() -> tuple[str, ...]:
    """CuPy's compiler options around the package's (what ``compile_with_cache`` passes
    NVRTC, less the architecture). Without CUDA headers CuPy itself cannot compile (it
    asks for ``cupy-cuda12x[ctk]``); the test extra brings them (nvidia-cuda-runtime-cu12)."""
    return tuple(_cupy_core.assemble_cupy_compiler_options(tuple(_twins_cuda.OPTIONS)))


# ------------------------------------------------------------------------------------------
# Compiling, and reading NVRTC's log back to lines of the body


@dataclass
class Compiled:
    kernel: str
    arch: str
    dtype: str
    ok: bool
    log: str
    ptx: str
    source: str
    body: str
    errors: list = field(default_factory=list)  # (body line or None, message)


def _body_start_line(source: str, body: str) -> int:
    """1-based line of ``source`` on which ``body`` starts."""
    at = source.index(body)
    return source.count("\n", 0, at) + 1


def compile_kernel(nvrtc: _Nvrtc, kernel: Kernel, arch: str, dtype: str, how: str) -> Compiled:
    if how == "cupy":
        source, options = cupy_source(kernel, dtype), cupy_options()
    else:
        source, options = plain_source(kernel, dtype), tuple(_twins_cuda.OPTIONS)
    options = (*options, f"--gpu-architecture={arch}")
    filename = f"vae_np_{kernel.name}.cu"
    ok, log, ptx = nvrtc.compile(source, options, filename)
    result = Compiled(kernel.name, arch, dtype, ok, log, ptx, source, kernel.body)
    start = _body_start_line(source, kernel.body)
    body_lines = kernel.body.count("\n") + 1
    for match in re.finditer(rf"^{re.escape(filename)}\((\d+)\): (error|warning)[^\n]*",
                             log, flags=re.M):
        line = int(match.group(1)) - start + 1
        result.errors.append((line if 1 <= line <= body_lines else None, match.group(0)))
    return result


def assert_compiled(result: Compiled) -> None:
    """Fail naming the kernel, the architecture, the dtype and the body's lines."""
    if result.ok:
        return
    body = result.body.split("\n")
    where = []
    for line, message in result.errors:
        if line is None:
            where.append(f"  outside the body: {message}")
        else:
            where.append(f"  body line {line}: {body[line - 1].strip()}\n    {message}")
    raise AssertionError(
        f"kernel {result.kernel!r} does not compile for {result.arch}, {result.dtype}:\n"
        + "\n".join(where or ["  (no error line in the log)"])
        + f"\nNVRTC log:\n{result.log}")


_F64 = re.compile(r"^\s*(?!//)[a-z.]*\.f64\b.*$|^\s*cvt\.[a-z.]*f64[^\n]*$", re.M)


def assert_no_double_arithmetic(result: Compiled) -> None:
    """A float32 kernel's PTX has no f64 instruction (no promotion to double)."""
    lines = [m.group(0).strip() for m in _F64.finditer(result.ptx)]
    if lines:
        raise AssertionError(
            f"kernel {result.kernel!r} computes in double in float32 "
            f"({len(lines)} f64 instructions, e.g. {lines[:3]}); a bare constant such as 0.1 "
            f"is a double: write (T)0.1")


# ------------------------------------------------------------------------------------------
# The package's kernels


def _cases():
    cases = [pytest.param(name, arch, dtype, id=f"{name}-{arch}-{dtype}")
             for name in sorted(_twins_cuda.SOURCES) for arch in ARCHS for dtype in DTYPES]
    return cases


def _needs_cupy():
    if cupy is None:
        pytest.skip(f"CuPy's ElementwiseKernel code generator is unavailable ({_CUPY_REASON}); "
                    f"the plain-wrapper test still compiles every body")


def test_the_package_has_kernels_and_options():
    assert _twins_cuda.SOURCES, "no CUDA sources to compile"
    assert "--fmad=false" in _twins_cuda.OPTIONS
    for name, entry in _twins_cuda.SOURCES.items():
        in_params, out_params, body = entry[:3]
        assert _params(in_params) and _params(out_params) and body.strip(), name
        for scalar in getattr(_twins_cuda, "SCALAR_INPUTS", {}).get(name, ()):
            assert scalar in [n for _, n in _params(in_params)], (name, scalar)


@pytest.mark.parametrize("name, arch, dtype", _cases())
def test_kernel_compiles_as_cupy_builds_it(nvrtc, name, arch, dtype):
    _needs_cupy()
    result = compile_kernel(nvrtc, Kernel.from_sources(name), arch, dtype, "cupy")
    assert_compiled(result)
    assert f".entry vae_np_{name}(" in result.ptx
    assert f".target sm_{arch[-2:]}" in result.ptx
    if dtype == "float32":
        assert_no_double_arithmetic(result)


@pytest.mark.parametrize("name, arch, dtype", _cases())
def test_kernel_compiles_in_a_plain_wrapper(nvrtc, name, arch, dtype):
    result = compile_kernel(nvrtc, Kernel.from_sources(name), arch, dtype, "plain")
    assert_compiled(result)
    assert f".entry vae_np_{name}(" in result.ptx


@pytest.mark.parametrize("arch", ARCHS)
def test_raw_sources_compile(nvrtc, arch):
    """RawKernel / RawModule sources (``RAW_SOURCES``: name -> CUDA C), compiled as CuPy
    compiles a RawModule: no CuPy header prepended, CuPy's options around the package's.
    The module holds none today; the test then checks only that NVRTC runs."""
    raw = getattr(_twins_cuda, "RAW_SOURCES", {})
    options = cupy_options() if cupy is not None else tuple(_twins_cuda.OPTIONS)
    sources = dict(raw) or {"empty": 'extern "C" __global__ void vae_np_empty() {}\n'}
    for name, source in sources.items():
        ok, log, ptx = nvrtc.compile(source, (*options, f"--gpu-architecture={arch}"),
                                     f"vae_np_raw_{name}.cu")
        assert ok, f"raw source {name!r} does not compile for {arch}:\n{log}"


def test_cupy_and_the_plain_wrapper_see_the_same_body():
    """The generated CuPy unit binds each array element exactly as the plain wrapper
    does (const T & for inputs, T & for outputs) and passes scalars by value."""
    _needs_cupy()
    kernel = Kernel.from_sources("adam")
    source = cupy_source(kernel, "float32")
    assert "typedef float T;" in source
    assert "const T &g = _raw_g[_ind.get()];" in source
    assert "T &p = _raw_p[_ind.get()];" in source
    for scalar in kernel.scalars:
        assert f"const float {scalar}," in source
    plain = plain_source(kernel, "float32")
    assert "const T &g = _raw_g[i];" in plain and "T &p = _raw_p[i];" in plain


# ------------------------------------------------------------------------------------------
# Self-tests: a broken body fails, and the message names the kernel and the line

BROKEN = Kernel("broken", "T x", "T y", "T a = x * (T)2;\nT b = a +;\ny = b;")


@pytest.mark.parametrize("how", ["cupy", "plain"])
def test_a_broken_body_fails_and_names_its_line(nvrtc, how):
    if how == "cupy":
        _needs_cupy()
    result = compile_kernel(nvrtc, BROKEN, "compute_80", "float32", how)
    assert not result.ok
    assert any(line == 2 for line, _ in result.errors), result.log
    with pytest.raises(AssertionError,
                       match=r"kernel 'broken' does not compile for compute_80, float32:\n"
                             r"  body line 2: T b = a \+;"):
        assert_compiled(result)


@pytest.mark.parametrize("how", ["cupy", "plain"])
def test_a_broken_kernel_in_sources_fails_the_suite(nvrtc, monkeypatch, how):
    """The parametrised tests above read SOURCES when they run: a body with a typo in a
    math function, put there, makes them fail."""
    if how == "cupy":
        _needs_cupy()
    in_params, out_params, _ = _twins_cuda.SOURCES["relu_backward"][:3]
    monkeypatch.setitem(_twins_cuda.SOURCES, "relu_backward",
                        (in_params, out_params, "dout = out > (T)0 ?\n  dout : expp(out);"))
    test = (test_kernel_compiles_as_cupy_builds_it if how == "cupy"
            else test_kernel_compiles_in_a_plain_wrapper)
    with pytest.raises(AssertionError, match=r"body line 2: dout : expp\(out\);"):
        test(nvrtc, "relu_backward", "compute_90", "float64")


@pytest.mark.parametrize("how", ["cupy", "plain"])
def test_inputs_are_const_as_cupy_presents_them(nvrtc, how):
    """Assigning to an input is an error in CuPy (``const T &x``): the wrappers agree."""
    if how == "cupy":
        _needs_cupy()
    result = compile_kernel(nvrtc, Kernel("writes_input", "T x", "T y", "x = (T)0;\ny = x;"),
                            "compute_80", "float64", how)
    assert not result.ok and any(line == 1 for line, _ in result.errors), result.log


def test_a_double_constant_in_a_float32_kernel_is_caught(nvrtc):
    _needs_cupy()
    promoting = Kernel("promoting", "T x", "T y", "y = x * 0.1;")
    result = compile_kernel(nvrtc, promoting, "compute_80", "float32", "cupy")
    assert_compiled(result)
    with pytest.raises(AssertionError, match="computes in double in float32"):
        assert_no_double_arithmetic(result)
    fixed = Kernel("fixed", "T x", "T y", "y = x * (T)0.1;")
    assert_no_double_arithmetic(compile_kernel(nvrtc, fixed, "compute_80", "float32", "cupy"))


def test_nvrtc_is_cuda_12_or_later(nvrtc):
    """compute_90 needs NVRTC >= 11.8; the test extra pins the CUDA 12 wheel."""
    assert nvrtc.version >= (12, 0), (nvrtc.version, nvrtc.path)
    print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} from {nvrtc.path}", file=sys.stderr)
