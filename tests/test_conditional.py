"""The conditional VAE (``VAE(num_classes=K)``): q(z | x, y) and p(x | z, y), the one-hot
label appended to the encoder's input and the decoder's latent input.

Its hand-written gradients are checked by central differences (float64, every decoder,
both code paths, both objectives), and the labels are shown to matter."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from vae_np import use_fast_paths
from vae_np.gradcheck import check_gradients

from helpers import tiny_vae

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")


# this file's models: 6-5-2 with three classes, S = 2, zero biases, VAE's default variance
tiny = partial(tiny_vae, samples=2, latent_dim=2, num_classes=3, seed=1, jitter=False,
               variance=None)


def batch(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, model.input_dim))
    y = rng.integers(0, model.num_classes, n)
    eps = rng.normal(size=(model.samples, n, model.latent_dim))
    return x, y, eps


@pytest.mark.parametrize("objective", ["vae", "iwae"])
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_conditional_gradients_match_central_differences(decoder, path, objective):
    model = tiny(decoder, objective=objective)
    x, y, eps = batch(model)
    with use_fast_paths(path == "fast"):
        model.loss(x, eps=eps, y=y)
        model.backward()
        analytic = {k: np.array(g) for k, g in model.parameters.grads.items()}

        def f():
            return float(model.loss(x, eps=eps, y=y).loss)

        report = check_gradients(f, model.parameters.values, analytic, max_entries=None)
    assert report.passed, report.table()


def test_the_gradient_check_sees_a_wrong_label_gradient():
    """Self-test: gradients taken with other labels than the loss's fail the check, so the
    check above would see labels dropped from the backward pass."""
    model = tiny()
    x, y, eps = batch(model)
    model.loss(x, eps=eps, y=(y + 1) % model.num_classes)
    model.backward()
    analytic = {k: np.array(g) for k, g in model.parameters.grads.items()}
    report = check_gradients(lambda: float(model.loss(x, eps=eps, y=y).loss),
                             model.parameters.values, analytic, max_entries=None)
    assert not report.passed


def test_labels_change_encoder_and_decoder():
    model = tiny()
    x, _, _ = batch(model)
    z = np.zeros((4, 2))
    a, b = (model.decode(z, y=np.full(4, k)) for k in (0, 1))
    assert not np.allclose(a, b)
    mu0, _ = model.encode(x, y=np.zeros(4, dtype=int))
    mu1, _ = model.encode(x, y=np.ones(4, dtype=int))
    assert not np.allclose(mu0, mu1)
    rng = model.backend.rng(0)
    assert model.sample(3, rng, y=np.array([0, 1, 2])).shape == (3, 6)
    assert model.reconstruct(x, y=np.zeros(4, dtype=int)).shape == (4, 6)
    assert model.log_likelihood(x, 8, rng, y=np.zeros(4, dtype=int)).shape == (4,)


def test_encoder_and_decoder_take_the_one_hot_columns():
    model = tiny(num_classes=3)
    assert model.config["num_classes"] == 3
    plain = tiny(num_classes=None)
    assert model.num_parameters - plain.num_parameters == 3 * 5 * 2  # one K x 5 block each


def test_labels_are_checked():
    model = tiny()
    x, y, eps = batch(model)
    with pytest.raises(ValueError, match="y: this conditional VAE"):
        model.loss(x, eps=eps)
    with pytest.raises(ValueError, match=r"y: expected labels in 0\.\.2"):
        model.loss(x, eps=eps, y=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"y: expected \(4,\) integer labels"):
        model.encode(x, y=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="y: this VAE is unconditional"):
        tiny(num_classes=None).encode(x, y=y)
    with pytest.raises(ValueError, match="num_classes"):
        tiny(num_classes=0)


def test_conditional_model_on_array_api_strict_matches_numpy():
    pytest.importorskip("array_api_strict")
    a, b = tiny(), tiny(backend="array_api_strict")
    x, y, eps = batch(a)
    la = float(a.loss(x, eps=eps, y=y).loss)
    lb = float(b.backend.to_numpy(b.loss(x, eps=eps, y=y).loss))
    assert la == pytest.approx(lb, rel=1e-12)
