"""The convolution twins' CUDA source (vae_np._twins_cuda.CONV_SOURCE) compiled by NVRTC
without a GPU, as CuPy's RawModule compiles it (CuPy's options around the package's), for
compute capabilities 8.0 and 9.0, in float32 and float64; float32 code has no double
arithmetic. The NVRTC loader and the CuPy options are tests/test_cuda_sources.py's.
"""

from __future__ import annotations

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
