"""The convolution twins' CUDA source (vae_np._twins_cuda.CONV_SOURCE) compiled by NVRTC
without a GPU, as CuPy's RawModule compiles it (CuPy's options around the package's), for
compute capabilities 8.0 and 9.0, in float32 and float64; float32 code has no double
arithmetic. The NVRTC loader and the CuPy options are tests/test_cuda_sources.py's.
Then the same source runs on the CPU (the host C++ compiler, one thread) under the CUDA
twins' own host code, against the references: the kernels' index arithmetic is checked
without a GPU (tests/test_conv.py's gpu tests check them on one).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_sources import _F64, ARCHS, DTYPES, cupy, cupy_options, nvrtc  # noqa: F401

from vae_np import _twins_cuda


def _source(dtype: str) -> str:
    return f"typedef {_twins_cuda.CONV_CTYPES[dtype]} T;\n{_twins_cuda.CONV_SOURCE}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_conv_source_compiles(nvrtc, arch, dtype):  # noqa: F811
    options = cupy_options() if cupy is not None else ()
    options = (*options, *_twins_cuda.CONV_OPTIONS, f"--gpu-architecture={arch}")
    ok, log, ptx = nvrtc.compile(_source(dtype), options, "vae_np_conv.cu")
    assert ok, f"CONV_SOURCE does not compile for {arch}, {dtype}:\n{log}"
    for name in _twins_cuda.CONV_KERNELS:
        assert f".entry {name}(" in ptx, name
    if dtype == "float32":
        doubles = [m.group(0).strip() for m in _F64.finditer(ptx)]
        assert doubles == [], f"float32 kernels compute in double: {doubles[:3]}"


def test_a_broken_conv_source_fails(nvrtc, monkeypatch):  # noqa: F811
    """Self-test: the compile test above sees an error in the source."""
    monkeypatch.setattr(_twins_cuda, "CONV_SOURCE",
                        _twins_cuda.CONV_SOURCE.replace("T total = (T)0;", "T total = ;"))
    with pytest.raises(AssertionError, match="does not compile"):
        test_conv_source_compiles(nvrtc, "compute_80", "float64")


# ------------------------------------------------------------------------------------------
# The kernels run on the CPU: CONV_SOURCE compiled by the host C++ compiler with one block of
# one thread (the grid-stride loops then visit every index in order), and the CUDA twins'
# host code run with NumPy standing in for CuPy (it calls only functions the two share:
# empty, matmul, add, sum, ascontiguousarray). The index arithmetic of every kernel and the
# twins' layout are checked against the references without a GPU.

_HOST_PRELUDE = r"""
struct vae_np_dim { long long x; };
static const vae_np_dim blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};
#define __global__
#define __device__
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no host C++ compiler to run the CUDA sources on the CPU")
    kernels = {}
    folder = tmp_path_factory.mktemp("conv_host")
    for dtype, ctype in _twins_cuda.CONV_CTYPES.items():
        source = folder / f"conv_{dtype}.cpp"
        source.write_text(_HOST_PRELUDE + f"typedef {ctype} T;\n" + _twins_cuda.CONV_SOURCE)
        library = folder / f"conv_{dtype}.so"
        subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
                       check=True, capture_output=True)
        lib = ctypes.CDLL(str(library))
        for name in _twins_cuda.CONV_KERNELS:
            function = getattr(lib, name)
            function.restype = None
            kernels[dtype, name] = function
    return kernels


def _emulated(function):
    import ctypes

    def launch(grid, block, args):
        function(*(ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray)
                   else ctypes.c_longlong(int(a)) for a in args))
    return launch


@pytest.fixture
def cuda_twins_on_numpy(host_kernels, monkeypatch):
    monkeypatch.setattr(_twins_cuda, "_conv_cupy", lambda *arrays: np)
    monkeypatch.setattr(_twins_cuda, "_conv_kernel",
                        lambda cupy, dtype, name: _emulated(host_kernels[str(dtype), name]))
    return _twins_cuda


CASES = [(2, 1, 5, 7, 2, (3, 3), (1, 1), (0, 0)), (2, 3, 7, 6, 4, (3, 3), (2, 2), (1, 1)),
         (1, 3, 6, 9, 2, (2, 3), (2, 1), (0, 2)), (1, 1, 3, 3, 2, (5, 5), (3, 3), (1, 1))]


@pytest.mark.parametrize("case", CASES)
def test_cuda_conv_twin_on_the_cpu_matches_the_reference(cuda_twins_on_numpy, case):
    from vae_np import conv
    from vae_np.backend import use_fast_paths

    n, c, h, w, o, k, s, p = case
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, *k))
    bias = rng.standard_normal(o)
    with use_fast_paths(False):
        y0 = conv.conv2d_forward(x, weight, bias, s, p)
        dout = rng.standard_normal(y0.shape)
        dx0, dw0, db0 = conv.conv2d_backward(dout, x, weight, s, p)
    twins = cuda_twins_on_numpy
    y = twins.conv2d_forward(x, weight, bias, s, p)
    dx, dw, db = twins.conv2d_backward(dout, x, weight, s, p)
    # the same terms in another order (tests/test_conv.py's bound, loosely: 1e-12)
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, db0, rtol=1e-12, atol=1e-12)
    assert twins.conv2d_backward(dout, x, weight, s, p, input_grad=False)[0] is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_maxpool_twin_on_the_cpu_is_the_reference(cuda_twins_on_numpy, dtype):
    from vae_np import conv
    from vae_np.backend import use_fast_paths

    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((2, 3, 6, 9)), 1).astype(dtype)     # with ties
    dout = rng.standard_normal((2, 3, 2, 3)).astype(dtype)
    with use_fast_paths(False):
        y0, dx0 = conv.maxpool2d_forward(x, 3), conv.maxpool2d_backward(dout, x, 3)
    np.testing.assert_array_equal(cuda_twins_on_numpy.maxpool2d_forward(x, 3), y0)
    np.testing.assert_array_equal(cuda_twins_on_numpy.maxpool2d_backward(dout, x, 3), dx0)
    y, first = cuda_twins_on_numpy.maxpool2d_forward(x, 3, with_index=True)
    with use_fast_paths(False):
        first0 = conv.maxpool2d_forward(x, 3, with_index=True)[1]
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(first, first0)
    np.testing.assert_array_equal(cuda_twins_on_numpy.maxpool2d_backward(dout, x, 3, first), dx0)
