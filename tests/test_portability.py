"""Backend parity: the same VAE (same seed) on NumPy and on array-api-strict, in float64,
gives the same loss, gradients, Adam updates, encodings, samples and ln p(x) estimates.

array-api-strict implements the Python array API standard and nothing more, so a model
that runs on it uses nothing NumPy-only: the evidence, on a CPU-only CI, that the same code
runs on CuPy. Agreement is to 1e-12 relative: the two run the same float64 operations
(strict wraps NumPy), so differences can only come from a different order of operations
inside a NumPy fast path, i.e. a few ulps. Tests taking ``code_path`` run the NumPy model
both with its fast paths (each op's fused variant) and on the reference code; strict
always runs the reference.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest

from vae_np import SGD, VAE, Adam
from vae_np.backend import get_backend

DECODERS = ["bernoulli", "gaussian", "gaussian-fixed"]
RTOL, ATOL = 1e-12, 1e-14


def pair(decoder, samples=1, **kwargs):
    """The same model on both backends: (numpy model, strict model)."""
    config = dict(input_dim=7, hidden=(6, 5), latent_dim=3, decoder=decoder, samples=samples,
                  dtype="float64", seed=11, **kwargs)
    if decoder == "gaussian-fixed":
        config.setdefault("variance", 0.2)
    return VAE(backend="numpy", **config), VAE(backend="array_api_strict", **config)


def host(model, array):
    out = model.backend.to_numpy(array)
    assert type(out) is np.ndarray
    return out


def assert_strict(array):
    """A result of the strict model is a strict array: it was computed in that namespace."""
    assert isinstance(array, array_api_strict._array_object.Array), type(array)


def data(n=5, c=7, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, c))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("samples", [1, 3])
def test_same_loss_and_gradients(decoder, samples, code_path):
    np_model, strict_model = pair(decoder, samples, beta=0.7)
    for name, value in np_model.state_dict().items():  # same initial weights, bit for bit
        np.testing.assert_array_equal(value, strict_model.state_dict()[name])
    x, eps = data(), np.random.default_rng(1).standard_normal((samples, 5, 3))
    a = np_model.loss(x, eps=eps)
    b = strict_model.loss(x, eps=eps)  # host inputs are accepted on any backend
    assert_strict(b.loss)
    for term in ("loss", "kl", "recon"):
        np.testing.assert_allclose(host(strict_model, getattr(b, term)),
                                   getattr(a, term), rtol=RTOL)
    np_model.backward()
    strict_model.backward()
    assert_strict(strict_model.parameters.grad)
    for name in np_model.parameters.names:
        np.testing.assert_allclose(host(strict_model, strict_model.parameters.grads[name]),
                                   np_model.parameters.grads[name], rtol=RTOL, atol=ATOL,
                                   err_msg=name)


@pytest.mark.parametrize("decoder", DECODERS)
def test_same_noise_from_the_same_seed(decoder):
    np_model, strict_model = pair(decoder, samples=2)
    x = data()
    a = np_model.loss(x, rng=np_model.backend.rng(5)).loss
    b = strict_model.loss(strict_model.backend.asarray(x), rng=strict_model.backend.rng(5)).loss
    np.testing.assert_allclose(host(strict_model, b), a, rtol=RTOL)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("make_opt", [lambda p: Adam(p, lr=1e-2, clip_norm=5.0),
                                      lambda p: SGD(p, lr=1e-2, momentum=0.9)],
                         ids=["adam", "sgd"])
def test_same_optimizer_trajectory(decoder, make_opt, code_path):
    np_model, strict_model = pair(decoder, samples=2)
    np_opt, strict_opt = make_opt(np_model.parameters), make_opt(strict_model.parameters)
    x = data()
    for step in range(4):
        eps = np.random.default_rng(10 + step).standard_normal((2, 5, 3))
        for model, opt in ((np_model, np_opt), (strict_model, strict_opt)):
            model.loss(x, eps=eps)
            model.backward()
            opt.step()
    assert_strict(strict_model.parameters.data)
    np.testing.assert_allclose(host(strict_model, strict_model.parameters.data),
                               np_model.parameters.data, rtol=RTOL, atol=ATOL)
    for name, value in np_opt.state_dict().items():
        np.testing.assert_allclose(strict_opt.state_dict()[name], value, rtol=RTOL, atol=1e-300)
    # The layers see the optimizer's updates on both backends (views of the flat buffer).
    np.testing.assert_allclose(host(strict_model, strict_model.encoder.linears[0].params["W"]),
                               np_model.encoder.linears[0].params["W"], rtol=RTOL)


@pytest.mark.parametrize("decoder", DECODERS)
def test_same_evaluation_outputs(decoder):
    np_model, strict_model = pair(decoder)
    x = data()
    for a, b in zip(np_model.encode(x), strict_model.encode(x)):
        assert_strict(b)
        np.testing.assert_allclose(host(strict_model, b), a, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(host(strict_model, strict_model.reconstruct(x)),
                               np_model.reconstruct(x), rtol=RTOL, atol=ATOL)
    z = np.random.default_rng(2).standard_normal((4, 3))
    np.testing.assert_allclose(host(strict_model, strict_model.decode(z)), np_model.decode(z),
                               rtol=RTOL, atol=ATOL)
    for mean in (True, False):
        a = np_model.sample(6, np_model.backend.rng(3), mean=mean)
        b = strict_model.sample(6, strict_model.backend.rng(3), mean=mean)
        assert_strict(b)
        np.testing.assert_allclose(host(strict_model, b), a, rtol=RTOL, atol=ATOL)
    a = np_model.log_likelihood(x, 20, np_model.backend.rng(4), chunk_size=6)
    b = strict_model.log_likelihood(x, 20, strict_model.backend.rng(4), chunk_size=6)
    assert_strict(b)
    np.testing.assert_allclose(host(strict_model, b), a, rtol=RTOL)


def test_state_dicts_move_between_backends():
    np_model, strict_model = pair("gaussian")
    trained = VAE(input_dim=7, hidden=(6, 5), latent_dim=3, decoder="gaussian", dtype="float64",
                  seed=99)
    strict_model.load_state_dict(trained.state_dict())
    np_model.load_state_dict(strict_model.state_dict())
    x, eps = data(), np.random.default_rng(1).standard_normal((1, 5, 3))
    expected = float(trained.loss(x, eps=eps).loss)
    assert float(np_model.loss(x, eps=eps).loss) == pytest.approx(expected, rel=RTOL)
    assert float(host(strict_model, strict_model.loss(x, eps=eps).loss)) == pytest.approx(
        expected, rel=RTOL)


def test_float32_runs_on_strict_and_stays_float32():
    strict = get_backend("array_api_strict", "float32")
    model = VAE(input_dim=7, hidden=(6,), latent_dim=3, decoder="gaussian", backend=strict,
                seed=0)
    terms = model.loss(data(), rng=strict.rng(0))
    model.backward()
    Adam(model.parameters).step()
    assert terms.loss.dtype == array_api_strict.float32
    assert model.parameters.data.dtype == array_api_strict.float32
    assert model.sample(2, strict.rng(1), mean=False).dtype == array_api_strict.float32
    # Same (float32-rounded) weights and noise as a float64 model: agreement to ~1e-6.
    # (NumPy draws float32 normals with another algorithm, so inject the noise.)
    eps = np.random.default_rng(3).standard_normal((1, 5, 3))
    fresh = VAE(input_dim=7, hidden=(6,), latent_dim=3, decoder="gaussian", backend=strict, seed=0)
    reference = VAE(input_dim=7, hidden=(6,), latent_dim=3, decoder="gaussian", dtype="float64",
                    seed=0).loss(data(), eps=eps)
    assert float(host(fresh, fresh.loss(data(), eps=eps).loss)) == pytest.approx(
        float(reference.loss), rel=1e-5)
