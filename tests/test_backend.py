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


@pytest.mark.parametrize("device_count", [0, RuntimeError("cudaErrorInsufficientDriver")])
def test_cupy_without_a_gpu_names_the_gpu_extra_on_one_line(monkeypatch, device_count):
    """What examples/train_mnist.py prints as its one-line error (and what
    tests/test_train_mnist_cli.py expects) on a machine with CuPy and no GPU, as in CI."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(device_count))
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    message = str(info.value)
    assert 'pip install -e ".[gpu]"' in message and ".[cuda13]" in message
    assert "nvidia-smi" in message and "\n" not in message


@pytest.mark.skipif(cuda_available(), reason="CuPy and a GPU are available here")
def test_the_installed_cupy_without_a_gpu_names_the_gpu_extra():
    """The real thing where CuPy is installed and there is no GPU (the CI machine)."""
    pytest.importorskip("cupy")
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    assert 'pip install -e ".[gpu]"' in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# CuPy with a GPU but without its CUDA libraries: found at the backend check, not mid-run


class _FakeRandomState:
    """Stands in for cupy.random.RandomState: records construction and re-seeding."""

    created: list = []

    def __init__(self, seed, method=None):
        type(self).created.append((seed, method))
        self.seeds = [seed]

    def seed(self, seed):
        self.seeds.append(seed)

    def standard_normal(self, shape, dtype=None):
        return np.full(shape, float(len(self.seeds)), dtype=dtype)

    def random_sample(self, shape, dtype=None):
        return np.full(shape, 0.5, dtype=dtype)


def _gpu_cupy(fail=None, runtime_version=12090):
    """A stand-in CuPy with one GPU whose cuRAND, cuBLAS or NVRTC step raises ``fail``
    (a (library, exception) pair), counting the kernels it builds."""
    module = _fake_cupy(1)
    module.cuda.runtime.runtimeGetVersion = lambda: runtime_version
    module.float32 = np.float32
    module.kernels_built = 0

    def step(library, result):
        def run(*args, **kwargs):
            if fail is not None and fail[0] == library:
                raise fail[1]
            return result(*args, **kwargs)
        return run

    module.cuda.curand = types.SimpleNamespace(CURAND_RNG_PSEUDO_PHILOX4_32_10=4)
    module.random = types.SimpleNamespace(RandomState=step("cuRAND", _FakeRandomState))
    module.matmul = step("cuBLAS", np.matmul)

    def elementwise_kernel(in_params, out_params, body, name, options=()):
        module.kernels_built += 1
        assert options == ("--fmad=false",)
        return lambda x: x + 1

    module.ElementwiseKernel = step("NVRTC", elementwise_kernel)
    return module


def test_a_gpu_with_working_cuda_libraries_is_usable_and_probed_once(monkeypatch):
    from vae_np.backend import _cupy_or_reason

    fake = _gpu_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert _cupy_or_reason() == (fake, None)
    assert cuda_available() and cuda_available()
    assert fake.kernels_built == 1  # the probe compiles its kernel once per process


@pytest.mark.parametrize("library, exc, says", [
    ("cuRAND", ImportError("libcurand.so.10: cannot open shared object file"),
     "cannot use cuRAND.*libcurand.so.10"),
    ("cuBLAS", RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED"),
     "cannot use cuBLAS.*CUBLAS_STATUS_NOT_INITIALIZED"),
    ("NVRTC", RuntimeError("Failed to find CUDA headers. Please install CUDA toolkit\n"
                           "headers (e.g., pip install cupy-cuda12x[ctk])"),
     "NVRTC.*Failed to find CUDA headers. Please install CUDA toolkit headers"),
])
def test_a_gpu_without_a_cuda_library_names_it_and_the_extra(monkeypatch, library, exc, says):
    from vae_np.backend import cuda_unavailable_reason

    monkeypatch.setitem(sys.modules, "cupy", _gpu_cupy((library, exc)))
    assert not cuda_available()
    with pytest.raises(BackendUnavailableError, match=says) as info:
        get_backend("cupy")
    message = str(info.value)
    assert 'pip install -e ".[cuda12]"' in message and "\n" not in message
    assert cuda_unavailable_reason() == message.split("unavailable: ", 1)[1]
    assert get_backend("auto").name == "numpy"


def test_a_cuda_13_cupy_without_its_libraries_points_at_the_cuda13_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _gpu_cupy(("cuBLAS", ImportError("libcublas.so.13")),
                                                       runtime_version=13000))
    with pytest.raises(BackendUnavailableError, match=r'pip install -e "\.\[cuda13\]"'):
        get_backend("cupy")


def test_cupy_rng_keeps_one_philox_generator_and_reseeds_it_per_draw(monkeypatch):
    """One cuRAND generator per RNG (a run draws once per batch), re-seeded with the same
    per-draw keys (seed, call number) as before, so checkpointed states stay valid."""
    fake = _gpu_cupy()
    backend = Backend(name="cupy", xp=np, native=fake, dtype=np.float32)
    _FakeRandomState.created = []
    rng = backend.rng(7)
    draws = [rng.normal((2, 3)), rng.uniform((4,)), rng.normal((5,))]
    assert [d.dtype for d in draws] == [np.float32] * 3
    assert len(_FakeRandomState.created) == 1 and _FakeRandomState.created[0][1] == 4
    sequence = np.random.SeedSequence(7)
    expected = [int(np.random.SeedSequence(sequence.entropy, spawn_key=(call,))
                    .generate_state(1, np.uint64)[0]) for call in range(3)]
    assert rng._philox.seeds == expected
    assert rng.state() == {"kind": "philox-calls", "calls": 3}
    rng.set_state({"kind": "philox-calls", "calls": 1})
    rng.normal((1,))
    assert rng._philox.seeds[-1] == expected[1] and len(_FakeRandomState.created) == 1


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


def test_uniform_into_a_buffer_draws_what_a_fresh_call_draws(backend):
    """``out=`` changes where the draws go, not which: the same numbers as without it,
    the stream left at the same place, and the buffer itself handed back."""
    shape = (7, 5)
    plain, into = backend.rng(21), backend.rng(21)
    expected = backend.to_numpy(plain.uniform(shape))
    buffer = backend.zeros(shape)
    assert into.uniform(shape, out=buffer) is buffer
    np.testing.assert_array_equal(backend.to_numpy(buffer), expected)
    np.testing.assert_array_equal(backend.to_numpy(into.uniform((3,))),
                                  backend.to_numpy(plain.uniform((3,))))


def test_uniform_refuses_a_buffer_it_cannot_fill_by_name(backend):
    rng = backend.rng(0)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3\), got \(3, 2\)"):
        rng.uniform((2, 3), out=backend.zeros((3, 2)))
    other = "float32" if backend.dtype_name == "float64" else "float64"
    with pytest.raises(TypeError, match=f"out: expected a {backend.name} array of dtype"):
        rng.uniform((2, 3), out=get_backend(backend.name, other).zeros((2, 3)))
    with pytest.raises(TypeError, match="out: expected a"):
        rng.uniform((2, 3), out=[[0.0] * 3] * 2)
    if backend.name == "numpy":
        frozen = backend.zeros((2, 3))
        frozen.flags.writeable = False
        with pytest.raises(ValueError, match="out: expected a writable array"):
            rng.uniform((2, 3), out=frozen)
    if backend.name != "numpy":   # a host array is not the strict backend's
        with pytest.raises(TypeError, match="got a numpy array"):
            rng.uniform((2, 3), out=np.zeros((2, 3), backend.numpy_dtype))


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
