"""vae_np.backend: resolving backends by name, the CuPy error messages, RNG reproducibility,
and moving arrays between the host and a backend."""

from __future__ import annotations

import json
import sys
import types

import array_api_strict
import numpy as np
import pytest

from vae_np.backend import (
    Backend,
    BackendUnavailableError,
    cuda_available,
    get_backend,
    namespace_of,
)

# ------------------------------------------------------------------------------------------
# Resolving a backend


@pytest.mark.parametrize("name, native", [("numpy", np), ("array_api_strict", array_api_strict)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_get_backend_name_native_and_dtype(name, native, dtype):
    backend = get_backend(name, dtype)
    assert backend.name == name
    assert backend.native is native
    assert backend.dtype_name == dtype
    assert backend.numpy_dtype == np.dtype(dtype)
    assert backend.dtype == getattr(backend.xp, dtype)
    zeros = backend.zeros((2, 3))
    assert zeros.dtype == backend.dtype and tuple(zeros.shape) == (2, 3)


def test_default_is_numpy_float32():
    backend = get_backend()
    assert backend.name == "numpy" and backend.dtype_name == "float32"


def test_numpy_backend_computes_on_plain_ndarrays():
    backend = get_backend("numpy", "float64")
    a = backend.asarray([[1.0, 2.0]])
    assert type(a) is np.ndarray
    assert type(backend.xp.exp(a)) is np.ndarray


def test_backend_instance_is_returned_unchanged():
    backend = get_backend("array_api_strict", "float64")
    assert get_backend(backend) is backend


@pytest.mark.parametrize("name", ["torch", "NumPy", "", "gpu", None, 3])
def test_unknown_backend_is_a_value_error_naming_the_argument(name):
    with pytest.raises(ValueError, match=r"^backend: expected one of numpy, cupy"):
        get_backend(name)


@pytest.mark.parametrize("dtype", ["float16", "int32", "double", np.float64])
def test_unknown_dtype_is_a_value_error_naming_the_argument(dtype):
    with pytest.raises(ValueError, match=r"^dtype: expected one of float32, float64"):
        get_backend("numpy", dtype)


def test_dtype_defaults_to_float32_for_a_name():
    assert get_backend("numpy").dtype_name == "float32"
    assert get_backend("numpy", None).dtype_name == "float32"


def test_a_dtype_contradicting_a_given_backend_is_refused():
    # VAE(backend=get_backend("numpy"), dtype="float64") once ran silently in float32.
    backend = get_backend("numpy", "float32")
    assert get_backend(backend) is backend
    assert get_backend(backend, "float32") is backend
    with pytest.raises(ValueError, match=r"^dtype: 'float64' contradicts"):
        get_backend(backend, "float64")


# ------------------------------------------------------------------------------------------
# CuPy: missing package, no GPU, auto fallback


@pytest.fixture
def no_cupy(monkeypatch):
    """Make ``import cupy`` fail even where CuPy is installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # None in sys.modules -> ImportError


def _fake_cupy(device_count):
    """A stand-in CuPy module whose device query returns ``device_count`` or raises it."""

    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=runtime)
    return module


def test_cupy_without_cupy_says_what_to_install(no_cupy):
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    message = str(info.value)
    assert "cupy" in message.lower()
    assert 'pip install -e ".[gpu]"' in message
    assert not cuda_available()


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_cupy_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(RuntimeError("cudaErrorNoDevice")))
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU.*cudaErrorNoDevice"):
        get_backend("cupy")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU"):
        get_backend("cupy")


def test_cupy_that_fails_to_import_points_at_cuda(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken_import(name, *args, **kwargs):
        if name == "cupy":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken_import)
    with pytest.raises(BackendUnavailableError, match="CUDA installation"):
        get_backend("cupy")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_auto_falls_back_to_numpy_without_cupy(no_cupy, dtype):
    backend = get_backend("auto", dtype)
    assert backend.name == "numpy" and backend.dtype_name == dtype


def test_auto_falls_back_to_numpy_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    assert get_backend("auto").name == "numpy"


# ------------------------------------------------------------------------------------------
# Random numbers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rng_draws_have_backend_dtype_and_shape(backend_name, dtype):
    backend = get_backend(backend_name, dtype)
    rng = backend.rng(0)
    for draw in (rng.normal((3, 4, 2)), rng.uniform((5,))):
        assert draw.dtype == backend.dtype
        assert tuple(draw.shape) in ((3, 4, 2), (5,))
        if backend_name == "array_api_strict":
            assert isinstance(draw, array_api_strict._array_object.Array)
    assert tuple(rng.normal([2, 2]).shape) == (2, 2)  # any sequence of ints


def test_same_seed_same_draws_different_seed_different_draws(backend):
    a, b, c = backend.rng(7), backend.rng(7), backend.rng(8)
    draws_a = [backend.to_numpy(a.normal((4, 3))), backend.to_numpy(a.uniform((6,)))]
    draws_b = [backend.to_numpy(b.normal((4, 3))), backend.to_numpy(b.uniform((6,)))]
    for x, y in zip(draws_a, draws_b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(draws_a[0], backend.to_numpy(c.normal((4, 3))))
    # Successive draws of one stream differ.
    assert not np.array_equal(draws_a[0], backend.to_numpy(a.normal((4, 3))))


def test_numpy_and_strict_draw_identical_numbers():
    """The host backends share one generator, so a seed means the same noise on both."""
    np_rng = get_backend("numpy", "float64").rng(3)
    strict = get_backend("array_api_strict", "float64")
    strict_rng = strict.rng(3)
    np.testing.assert_array_equal(np_rng.normal((5, 2)), strict.to_numpy(strict_rng.normal((5, 2))))


def test_state_round_trip_reproduces_subsequent_draws(backend):
    rng = backend.rng(11)
    rng.normal((10,))  # move away from the start
    state = rng.state()
    expected = [backend.to_numpy(rng.normal((3, 2))), backend.to_numpy(rng.uniform((4,)))]
    rng.normal((100,))  # move on
    rng.set_state(state)
    again = [backend.to_numpy(rng.normal((3, 2))), backend.to_numpy(rng.uniform((4,)))]
    for x, y in zip(expected, again):
        np.testing.assert_array_equal(x, y)


def test_state_is_json_serialisable_and_restores_a_fresh_rng(backend):
    rng = backend.rng(5)
    rng.uniform((17,))
    state = json.loads(json.dumps(rng.state()))
    expected = backend.to_numpy(rng.normal((8,)))
    other = backend.rng(999)  # another seed: the state alone determines the stream
    other.set_state(state)
    np.testing.assert_array_equal(backend.to_numpy(other.normal((8,))), expected)


@pytest.mark.parametrize("bad", [None, {}, [1, 2], {"kind": "philox-calls", "calls": 3}])
def test_set_state_rejects_foreign_states(backend, bad):
    with pytest.raises(ValueError, match=r"^state: "):
        backend.rng(0).set_state(bad)


def test_normal_and_uniform_have_the_right_moments(np64):
    """Standard normal: mean 0, variance 1; uniform [0, 1): mean 1/2, variance 1/12.
    n = 200,000: the standard errors are 1/sqrt(n) ~ 2.2e-3 (normal mean), sqrt(2/n) ~ 3.2e-3
    (normal variance); we allow 5 standard errors (fixed seed, so no flakiness)."""
    n = 200_000
    rng = np64.rng(2024)
    z = rng.normal((n,))
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0 / n)
    u = rng.uniform((n,))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/180


# ------------------------------------------------------------------------------------------
# Host <-> backend


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_asarray_to_numpy_round_trip(backend_name, dtype):
    backend = get_backend(backend_name, dtype)
    host = np.random.default_rng(0).standard_normal((3, 4))
    arr = backend.asarray(host)
    assert arr.dtype == backend.dtype
    back = backend.to_numpy(arr)
    assert type(back) is np.ndarray and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, host.astype(dtype))
    # Non-contiguous host data (a transposed view) keeps its values.
    np.testing.assert_array_equal(backend.to_numpy(backend.asarray(host.T)), host.T.astype(dtype))
    # An explicit dtype wins over the backend dtype.
    ints = backend.asarray(np.arange(3), dtype=backend.xp.int64)
    assert ints.dtype == backend.xp.int64


def test_to_float_of_a_0d_array(backend):
    value = backend.xp.sum(backend.asarray(np.array([1.25, 2.5])))
    out = backend.to_float(value)
    assert type(out) is float and out == 3.75


def test_to_numpy_passes_host_arrays_through(backend):
    host = np.ones(3)
    assert backend.to_numpy(host) is host


def test_namespace_of_identifies_the_backend(backend):
    arr = backend.asarray(np.zeros(2))
    xp = namespace_of(arr)
    if backend.name == "array_api_strict":
        assert xp is array_api_strict
    else:
        assert xp.__name__.startswith("array_api_compat.numpy")


def test_synchronize_is_a_noop_on_the_cpu(backend):
    assert backend.synchronize() is None


def test_backend_is_immutable():
    backend = get_backend("numpy")
    assert isinstance(backend, Backend)
    with pytest.raises(Exception):
        backend.name = "cupy"  # frozen dataclass
