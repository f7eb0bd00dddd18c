"""Hypothesis property tests: reparameterisation (and the starting example's bug failing
it), KL >= 0 and zero at the prior, densities equal to scipy, KL equal to a Monte-Carlo
estimate, finiteness for extreme logits and variances, and shapes.

Run reproducibly under the "ci" profile of conftest.py (derandomised, no deadline);
``HYPOTHESIS_PROFILE=dev`` explores fresh examples.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import special, stats

from vae_np import VAE, reparameterize
from vae_np.backend import get_backend
from vae_np.layers import ACTIVATIONS, MLP
from vae_np.losses import (
    bernoulli_nll,
    gaussian_fixed_nll,
    gaussian_nll,
    kl_diagonal_gaussians,
    kl_standard_normal,
)
from vae_np.ops import sigmoid, softplus

np64 = get_backend("numpy", "float64")
XP = np64.xp


def floats(low, high):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@st.composite
def matrices(draw, low, high, shape=None, dtype=np.float64):
    """An (N, d) array, N in 1..4, d in 1..6 unless ``shape`` is given."""
    if shape is None:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    return draw(arrays(dtype, shape, elements=st.floats(low, high, allow_nan=False,
                                                        allow_infinity=False,
                                                        width=np.dtype(dtype).itemsize * 8)))


@st.composite
def same_shape(draw, *ranges, dtype=np.float64):
    """Several arrays of one random (N, d) shape, each with entries in its (low, high)."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    return [draw(matrices(low, high, shape, dtype)) for low, high in ranges]


@pytest.fixture
def fp_errors_raise():
    """Overflow, invalid operations and division by zero raise (underflow to 0 is fine)."""
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"), \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ------------------------------------------------------------------------------------------
# Reparameterisation: z = mu + exp(logvar / 2) * eps


@st.composite
def reparam_inputs(draw):
    s, n, d = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    mu = draw(matrices(-1e3, 1e3, (n, d)))
    logvar = draw(matrices(-30.0, 30.0, (n, d)))
    eps = draw(arrays(np.float64, (s, n, d), elements=floats(-10.0, 10.0)))
    return mu, logvar, eps


def assert_reparameterizes(fn, mu, logvar, eps):
    """The property: fn(mu, logvar, eps) == mu + sigma * eps with sigma = sqrt(exp(logvar)),
    to 1e-12 relative to the size of the two terms (exp(lv / 2) and sqrt(exp(lv)) differ by
    an ulp or two, 2e-16)."""
    z = np.asarray(fn(mu, logvar, eps))
    sigma = np.sqrt(np.exp(logvar))
    expected = mu + sigma * eps
    assert z.shape == eps.shape
    scale = np.abs(mu) + np.abs(sigma * eps)
    assert np.all(np.abs(z - expected) <= 1e-12 * scale), np.max(np.abs(z - expected) - 1e-12 * scale)


def reparameterization_property(fn):
    @settings(max_examples=60)
    @given(reparam_inputs())
    def check(inputs):
        assert_reparameterizes(fn, *inputs)

    return check


def starting_example_reparameterize(mu, logvar, eps):
    """The PyTorch example's bug: exp(0.5 ** logvar), a power, for exp(0.5 * logvar)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return mu + np.exp(0.5 ** logvar) * eps


def test_reparameterize_is_mu_plus_sigma_eps():
    reparameterization_property(reparameterize)()


def test_the_starting_examples_bug_fails_the_same_property():
    """The same property check, run on exp(0.5 ** logvar), must find a counterexample.
    (The two agree only where 0.5 ** logvar == logvar / 2, e.g. logvar = 1, or eps = 0.)"""
    with pytest.raises(AssertionError):
        reparameterization_property(starting_example_reparameterize)()
    # and a concrete counterexample, at the prior itself: sigma should be 1, the bug gives e.
    with pytest.raises(AssertionError):
        assert_reparameterizes(starting_example_reparameterize, np.zeros((1, 1)),
                               np.zeros((1, 1)), np.ones((1, 1, 1)))


def test_reparameterize_on_array_api_strict():
    strict = get_backend("array_api_strict", "float64")
    rng = np.random.default_rng(0)
    mu, logvar, eps = rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng.standard_normal((2, 3, 4))
    z = reparameterize(strict.asarray(mu), strict.asarray(logvar), strict.asarray(eps))
    assert_reparameterizes(lambda *_: strict.to_numpy(z), mu, logvar, eps)


# ------------------------------------------------------------------------------------------
# KL: non-negative, zero exactly at the prior, equal to Monte Carlo


@settings(max_examples=80)
@given(same_shape((-1e3, 1e3), (-50.0, 50.0)))
def test_kl_standard_normal_is_non_negative(inputs):
    mu, logvar = inputs
    kl, dmu, dlogvar = kl_standard_normal(mu, logvar)
    assert kl.shape == (mu.shape[0],) and dmu.shape == mu.shape and dlogvar.shape == mu.shape
    # KL >= 0 exactly: written with expm1, each term expm1(lv) - lv + mu^2 is >= 0 in
    # floating point too (test_losses.py::test_kl_is_never_negative_for_tiny_logvar).
    assert np.all(kl >= 0)


@settings(max_examples=30)
@given(st.integers(1, 8), st.integers(1, 40))
def test_kl_is_exactly_zero_at_the_prior(n, d):
    zeros = np.zeros((n, d))
    kl, dmu, dlogvar = kl_standard_normal(zeros, zeros)
    assert np.all(kl == 0.0) and np.all(dmu == 0.0) and np.all(dlogvar == 0.0)
    kl_general = kl_diagonal_gaussians(zeros, zeros, zeros, zeros)[0]
    assert np.all(kl_general == 0.0)


@settings(max_examples=60)
@given(same_shape((-100.0, 100.0), (-30.0, 30.0), (-100.0, 100.0), (-30.0, 30.0)))
def test_kl_diagonal_is_non_negative_and_zero_between_equal_gaussians(inputs):
    mu_q, lv_q, mu_p, lv_p = inputs
    kl = kl_diagonal_gaussians(mu_q, lv_q, mu_p, lv_p)[0]
    terms = np.abs(lv_p) + np.abs(lv_q) + 1 + np.exp(lv_q - lv_p) + (mu_q - mu_p) ** 2 * np.exp(-lv_p)
    assert np.all(kl >= -1e-15 * terms.sum(axis=1))  # >= 0 up to rounding of the terms
    assert np.all(kl_diagonal_gaussians(mu_q, lv_q, mu_q, lv_q)[0] == 0.0)


@settings(max_examples=40)
@given(same_shape((-5.0, 5.0), (-3.0, 3.0), (-5.0, 5.0), (-3.0, 3.0)))
def test_kl_diagonal_equals_the_matrix_formula(inputs):
    """Wikipedia: 1/2 [tr(S_p^-1 S_q) + (m_p - m_q)^T S_p^-1 (m_p - m_q) - d + ln det S_p / det S_q]."""
    mu_q, lv_q, mu_p, lv_p = inputs
    kl = kl_diagonal_gaussians(mu_q, lv_q, mu_p, lv_p)[0]
    for n in range(mu_q.shape[0]):
        cov_q, cov_p = np.diag(np.exp(lv_q[n])), np.diag(np.exp(lv_p[n]))
        inv_p = np.linalg.inv(cov_p)
        diff = mu_p[n] - mu_q[n]
        expected = 0.5 * (np.trace(inv_p @ cov_q) + diff @ inv_p @ diff - len(diff)
                          + np.linalg.slogdet(cov_p)[1] - np.linalg.slogdet(cov_q)[1])
        scale = 0.5 * (np.trace(inv_p @ cov_q) + diff @ inv_p @ diff + len(diff)
                       + np.abs(lv_p[n]).sum() + np.abs(lv_q[n]).sum())
        assert abs(kl[n] - expected) <= 1e-12 * scale


@settings(max_examples=20)
@given(same_shape((-3.0, 3.0), (-2.0, 2.0)))
def test_kl_equals_a_monte_carlo_estimate(inputs):
    """E_q[ln q(z) - ln p(z)] from 20,000 draws (fixed seed): the closed form lies within
    5 standard errors (plus 1e-12 for the case q = p, where the estimate has no spread)."""
    mu, logvar = inputs
    closed = kl_standard_normal(mu, logvar)[0]
    std = np.exp(logvar / 2)
    n = 20_000
    z = mu + std * np.random.default_rng(0).standard_normal((n, *mu.shape))
    log_ratio = (stats.norm.logpdf(z, mu, std) - stats.norm.logpdf(z)).sum(axis=2)
    estimate, se = log_ratio.mean(axis=0), log_ratio.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(closed - estimate) <= 5 * se + 1e-12)


# ------------------------------------------------------------------------------------------
# Densities equal scipy


@settings(max_examples=60)
@given(same_shape((-100.0, 100.0), (-100.0, 100.0), (-20.0, 20.0)))
def test_gaussian_nll_equals_scipy(inputs):
    x, mu, logvar = inputs
    nll = gaussian_nll(x, mu, logvar)[0]
    expected = -stats.norm.logpdf(x, mu, np.exp(logvar / 2)).sum(axis=1)
    # relative to the size of the terms (the sum can cancel to ~0)
    scale = (math.log(2 * math.pi) + np.abs(logvar) + (x - mu) ** 2 / np.exp(logvar)).sum(axis=1)
    assert np.all(np.abs(nll - expected) <= 1e-12 * scale)


@settings(max_examples=60)
@given(same_shape((-100.0, 100.0), (-100.0, 100.0)), floats(1e-3, 1e3))
def test_gaussian_fixed_nll_equals_scipy(inputs, variance):
    x, mu = inputs
    nll = gaussian_fixed_nll(x, mu, variance)[0]
    expected = -stats.norm.logpdf(x, mu, math.sqrt(variance)).sum(axis=1)
    scale = (abs(math.log(2 * math.pi * variance)) + (x - mu) ** 2 / variance).sum(axis=1)
    assert np.all(np.abs(nll - expected) <= 1e-12 * scale)


@settings(max_examples=60)
@given(same_shape((-15.0, 15.0), (0.0, 1.0)))
def test_bernoulli_nll_equals_scipy_for_binary_targets(inputs):
    logits, u = inputs
    x = (u > 0.5).astype(np.float64)
    nll = bernoulli_nll(x, logits)[0]
    # scipy's logpmf goes through p = expit(l), which rounds 1 - p: 1e-9 absolute per pixel
    # is that rounding at |l| = 15, far below any formula error.
    expected = -stats.bernoulli.logpmf(x, special.expit(logits)).sum(axis=1)
    assert np.all(np.abs(nll - expected) <= 1e-12 * np.abs(expected) + 1e-9 * x.shape[1])


@settings(max_examples=60)
@given(same_shape((-1e4, 1e4), (0.0, 1.0)))
def test_bernoulli_nll_equals_the_cross_entropy(inputs):
    """-(x ln sigmoid(l) + (1 - x) ln sigmoid(-l)) with scipy's stable log_expit, for
    logits up to 1e4 and targets anywhere in [0, 1]."""
    logits, x = inputs
    nll, grad = bernoulli_nll(x, logits)
    expected = -(x * special.log_expit(logits) + (1 - x) * special.log_expit(-logits)).sum(axis=1)
    scale = (np.abs(logits) + 1).sum(axis=1)
    assert np.all(np.abs(nll - expected) <= 1e-13 * scale)
    assert np.all(np.abs(grad - (special.expit(logits) - x)) <= 5e-16)
    assert np.all(nll >= 0.0)  # softplus(l) >= max(l, 0) >= x l for x in [0, 1]


# ------------------------------------------------------------------------------------------
# Extreme values: finite, no overflow / invalid operations


LOGIT_BOUNDS = {np.float32: 2.0 ** 100, np.float64: 1e300}  # 2^100 ~ 1.3e30, exact in float32


@settings(max_examples=60)
@given(st.sampled_from([np.float32, np.float64]).flatmap(
    lambda dt: same_shape((-LOGIT_BOUNDS[dt], LOGIT_BOUNDS[dt]), (0.0, 1.0), dtype=dt)))
def test_bernoulli_nll_is_finite_for_any_logits(inputs):
    logits, x = inputs
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        nll, grad = bernoulli_nll(x, logits)
    assert np.all(np.isfinite(nll)) and np.all(np.isfinite(grad))
    assert np.all(np.abs(grad) <= 1.0)


@settings(max_examples=60)
@given(st.sampled_from([(np.float64, 300.0), (np.float32, 40.0)]).flatmap(
    lambda cfg: same_shape((-1e3, 1e3), (-1e3, 1e3), (-cfg[1], cfg[1]), (-cfg[1], cfg[1]),
                           dtype=cfg[0])))
def test_gaussian_losses_are_finite_for_extreme_variances(inputs):
    """log-variances up to +-300 in float64 (variances 1e-130 .. 1e130), +-40 in float32."""
    x, mu, logvar, logvar_p = inputs
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        outputs = [*kl_standard_normal(mu, logvar), *gaussian_nll(x, mu, logvar),
                   *kl_diagonal_gaussians(mu, logvar, x, logvar_p)]
    for out in outputs:
        assert np.all(np.isfinite(out))
        assert out.dtype == x.dtype


@settings(max_examples=40)
@given(matrices(-1e300, 1e300))
def test_sigmoid_and_softplus_identities(x):
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        s, s_neg = sigmoid(XP, x), sigmoid(XP, -x)
        sp, sp_neg = softplus(XP, x), softplus(XP, -x)
    assert np.all((s >= 0) & (s <= 1))
    assert np.all(np.abs(s + s_neg - 1.0) <= 2.3e-16)
    assert np.all(sp >= np.maximum(x, 0.0))
    # softplus(x) - softplus(-x) = x
    assert np.all(np.abs((sp - sp_neg) - x) <= 4.5e-16 * np.maximum(np.abs(x), 1.0))


# ------------------------------------------------------------------------------------------
# Shapes


@settings(max_examples=40)
@given(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=2, max_size=5),
       st.sampled_from(sorted(ACTIVATIONS)))
def test_mlp_shapes(batch, sizes, activation):
    mlp = MLP(sizes, np64, np.random.default_rng(0), activation=activation)
    out = mlp.forward(np.ones((batch, sizes[0])))
    assert out.shape == (batch, sizes[-1])
    dx = mlp.backward(np.ones((batch, sizes[-1])))
    assert dx.shape == (batch, sizes[0])
    assert len(mlp.linears) == len(sizes) - 1
    for linear in mlp.linears:
        for key, value in linear.params.items():
            assert linear.grads[key].shape == value.shape


@settings(max_examples=40)
@given(st.sampled_from(["sum", "mean", "none"]), same_shape((-3.0, 3.0), (-3.0, 3.0), (0.0, 1.0)))
def test_loss_shapes(reduction, inputs):
    a, b, x = inputs
    n = a.shape[0]
    for value, *grads in (kl_standard_normal(a, b, reduction),
                          kl_diagonal_gaussians(a, b, b, a, reduction),
                          gaussian_nll(x, a, b, reduction),
                          gaussian_fixed_nll(x, a, 0.5, reduction),
                          bernoulli_nll(x, a, reduction)):
        assert value.shape == ((n,) if reduction == "none" else ())
        assert all(g.shape == a.shape for g in grads)


@settings(max_examples=25)
@given(input_dim=st.integers(1, 6), hidden=st.lists(st.integers(1, 5), max_size=2),
       latent_dim=st.integers(1, 3), samples=st.integers(1, 3), n=st.integers(1, 4),
       decoder=st.sampled_from(["bernoulli", "gaussian", "gaussian-fixed"]))
def test_vae_shapes(input_dim, hidden, latent_dim, samples, n, decoder):
    model = VAE(input_dim=input_dim, hidden=hidden, latent_dim=latent_dim, decoder=decoder,
                samples=samples, dtype="float64")
    x = np.random.default_rng(0).uniform(size=(n, input_dim))
    rng = model.backend.rng(0)
    terms = model.loss(x, rng=rng)
    for value in (terms.loss, terms.kl, terms.recon):
        assert np.ndim(value) == 0 and np.isfinite(value)
    model.backward()
    assert model.parameters.grad.shape == (model.num_parameters,)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (n, latent_dim)
    assert model.reconstruct(x).shape == (n, input_dim)
    assert model.decode(np.zeros((n + 1, latent_dim))).shape == (n + 1, input_dim)
    assert model.sample(3, rng).shape == (3, input_dim)
    assert model.sample(3, rng, mean=False).shape == (3, input_dim)
    assert model.log_likelihood(x, 4, rng, chunk_size=3).shape == (n,)
    assert model.log_importance_weights(x, rng.normal((5, n, latent_dim))).shape == (5, n)
