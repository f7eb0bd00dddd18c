"""The CuPy backend on a GPU: the step against NumPy float64, the fused kernels against the
CuPy reference, and no host-device synchronisation inside a step.

Skipped as a whole where CuPy is missing or sees no GPU (``importorskip`` plus a device
check), so the CPU suite stays green; run ``pytest -m gpu`` on a machine with one.

Tolerances. CuPy float64 against NumPy float64: cuBLAS sums in another order than OpenBLAS
and CUDA's exp/tanh/log1p differ from NumPy's by an ulp or two, so values agree to about
1e-15 relative; gradients (sums of many such terms, some near zero) are compared with rtol
1e-9 and an absolute floor of 1e-12 times the largest gradient. The fused kernels against
CuPy's own ufuncs: the same operations in the same order (compiled without FMA
contraction), differing only where CUDA's inlined math functions round differently, so
rtol 1e-10 in float64. float32 against float64: rtol 1e-3. Adam's kernel alone uses only
correctly rounded operations and matches NumPy bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from vae_np import VAE, Adam, kernels  # noqa: E402
from vae_np.backend import cuda_available, get_backend  # noqa: E402

pytestmark = pytest.mark.gpu

if not cuda_available():
    pytest.skip("CuPy is installed but no usable GPU was found", allow_module_level=True)

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")


def run(backend_name, dtype, decoder="bernoulli", samples=1, steps=3, fast=True,
        batch=16, input_dim=784, hidden=(128, 64), latent_dim=8):
    """Loss terms, gradients and final parameters (host arrays) of ``steps`` Adam steps on
    fixed data and noise drawn on the host, identical for every backend."""
    backend = get_backend(backend_name, dtype)
    data = np.random.default_rng(0)
    with kernels.use_fast_paths(fast):
        model = VAE(input_dim, hidden, latent_dim, decoder=decoder, samples=samples,
                    backend=backend, seed=1)
        opt = Adam(model.parameters, lr=1e-3)
        losses, grads = [], []
        for _ in range(steps):
            x = data.random((batch, input_dim))
            if decoder == "bernoulli":
                x = (x < 0.4).astype(np.float64)
            eps = data.standard_normal((samples, batch, latent_dim))
            terms = model.loss(backend.asarray(x), eps=backend.asarray(eps), check_finite=False)
            model.backward()
            opt.step()
            losses.append([backend.to_float(t) for t in (terms.loss, terms.kl, terms.recon)])
            grads.append(backend.to_numpy(model.parameters.grad).astype(np.float64))
        params = backend.to_numpy(model.parameters.data).astype(np.float64)
    return np.array(losses), grads, params


def assert_close(a, b, rtol, grad_floor, param_atol):
    """Losses to ``rtol``; gradients to ``rtol`` with an absolute floor of ``grad_floor``
    times the largest gradient (entries that cancel to near zero carry only absolute
    round-off); parameters to ``rtol`` with ``param_atol`` (Adam's step lr m/sqrt(v) is at
    most lr, so gradient round-off moves a parameter by a tiny fraction of lr)."""
    (la, ga, pa), (lb, gb, pb) = a, b
    np.testing.assert_allclose(la, lb, rtol=rtol)
    for step, (x, y) in enumerate(zip(ga, gb)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=grad_floor * np.max(np.abs(y)),
                                   err_msg=f"gradient, step {step}")
    np.testing.assert_allclose(pa, pb, rtol=rtol, atol=param_atol)


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
def test_cupy_float64_step_matches_numpy_float64(decoder, samples):
    assert_close(run("cupy", "float64", decoder, samples), run("numpy", "float64", decoder, samples),
                 rtol=1e-9, grad_floor=1e-12, param_atol=1e-10)


@pytest.mark.parametrize("decoder", DECODERS)
def test_cupy_float32_step_is_close_to_numpy_float64(decoder):
    assert_close(run("cupy", "float32", decoder), run("numpy", "float64", decoder),
                 rtol=1e-3, grad_floor=1e-4, param_atol=1e-5)


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
def test_fused_kernels_match_the_cupy_reference(decoder, samples):
    assert_close(run("cupy", "float64", decoder, samples, fast=True),
                 run("cupy", "float64", decoder, samples, fast=False),
                 rtol=1e-10, grad_floor=1e-13, param_atol=1e-12)


def test_fused_adam_is_bit_identical_to_numpy():
    """Adam's kernel is compiled without FMA contraction and uses only +, -, *, / and sqrt,
    which CUDA rounds correctly: the same bits as NumPy's reference."""
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        gpu, cpu = get_backend("cupy", dtype), get_backend("numpy", dtype)
        host = [rng.standard_normal(10_007).astype(dtype) for _ in range(2)]
        state = {}
        for backend in (gpu, cpu):
            p, g = backend.asarray(host[0]), backend.asarray(host[1])
            m, v = backend.zeros((p.shape[0],)), backend.zeros((p.shape[0],))
            for t in range(1, 4):
                if backend is gpu:
                    assert kernels.adam_update(gpu, p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, t)
                else:
                    with kernels.use_fast_paths(False):  # NumPy's readable reference
                        m[...] = 0.9 * m + (1.0 - 0.9) * g
                        v[...] = 0.999 * v + (1.0 - 0.999) * (g * g)
                        p[...] = p - 1e-3 * (m / (1.0 - 0.9 ** t)) / (
                            np.sqrt(v / (1.0 - 0.999 ** t)) + 1e-8)
            state[backend.name] = [backend.to_numpy(a) for a in (p, m, v)]
        for a, b in zip(state["cupy"], state["numpy"]):
            assert np.array_equal(a, b)


def _model_and_step(decoder="bernoulli"):
    backend = get_backend("cupy", "float32")
    model = VAE(784, (256, 256), 16, decoder=decoder, backend=backend, seed=0)
    opt = Adam(model.parameters, lr=1e-3)
    rng = backend.rng(0)
    x = backend.asarray((np.random.default_rng(0).random((32, 784)) < 0.3).astype(np.float32))

    def step():
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()

    step()  # compile the kernels, fill the memory pool
    cupy.cuda.Device().synchronize()
    return backend, model, step


@pytest.mark.parametrize("decoder", DECODERS)
def test_step_does_not_synchronise_with_the_host(decoder, monkeypatch):
    """Inside ``loss(check_finite=False)``, ``backward`` and ``step`` nothing is read back
    to the host: CuPy's synchronisation detector stays silent, and the host-transfer entry
    points of CuPy and of the backend are never called."""
    backend, model, step = _model_and_step(decoder)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside a training step")

    monkeypatch.setattr(cupy, "asnumpy", forbidden)
    monkeypatch.setattr(type(backend), "to_numpy", forbidden)
    monkeypatch.setattr(type(backend), "to_float", forbidden)
    allow_synchronize = getattr(__import__("cupyx"), "allow_synchronize", None)
    if allow_synchronize is None:
        for _ in range(3):
            step()
    else:
        with allow_synchronize(False):
            for _ in range(3):
                step()
    cupy.cuda.Device().synchronize()


def test_step_without_noise_draws_captures_into_a_cuda_graph():
    """The strongest check: a stream that is capturing a CUDA graph refuses any
    synchronisation or device-to-host copy, so if loss (with given noise), backward and the
    Adam step capture, they contain none."""
    backend, model, _ = _model_and_step()
    opt = Adam(model.parameters, lr=1e-3)
    x = backend.asarray((np.random.default_rng(1).random((32, 784)) < 0.3).astype(np.float32))
    eps = backend.asarray(np.random.default_rng(2).standard_normal((1, 32, 16)))
    stream = cupy.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        pytest.skip("this CuPy cannot capture CUDA graphs")
    with stream:
        for _ in range(2):  # warm up on this stream: handles, kernels, pool blocks
            model.loss(x, eps=eps, check_finite=False)
            model.backward()
            opt.step()
        stream.synchronize()
        stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeRelaxed)
        try:
            model.loss(x, eps=eps, check_finite=False)
            model.backward()
            opt.step()
        finally:
            graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
