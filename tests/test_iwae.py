"""The importance-weighted bound as a training objective (``VAE(objective="iwae")``).

- values: the loss against an independent scipy computation of ln w and its logsumexp, the
  weighted recon / kl decomposition, equality with ``VAE.log_likelihood`` on the same draws;
- k = 1: the ELBO with a *sampled* KL term (ln q(z|x) - ln p(z) at the drawn z), and the
  decoder gradients of the "vae" objective with S = 1, to the bit;
- the bound's expectation rises with k towards the exact ln p(x) of a linear-Gaussian VAE;
- stability: ln w of -1e4 in float32, examples whose weights all vanish (-inf);
- gradients: element-wise and directional central differences in float64, every decoder,
  k in {1, 2, 5}, on the fast path and the reference (``code_path``), on array-api-strict;
  the three-path derivative of ln q against the collapsed form ``iwae_latent_backward``
  uses; deliberately wrong latent gradients fail;
- fast paths: the whole IWAE step (several Adam steps) fast against
  ``use_fast_paths(False)``, bit for bit, both dtypes, every
  decoder, k in {1, 2, 5}; the per-row ``grad_scale`` of every likelihood; no host read;
- configuration: the objective is checked, recorded, and refuses beta != 1.

docs/09-iwae.md derives what these tests check.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from scipy import special, stats

import vae_np.backend as backend_module
import vae_np.objectives as objectives_module
from vae_np import VAE, gradcheck
from vae_np.backend import get_backend, use_fast_paths
from vae_np.likelihoods import make_likelihood, scale_rows
from vae_np.objectives import iwae_bound, iwae_latent_backward, iwae_log_weights
from vae_np.ops import logsumexp_and_softmax

from helpers import (C, D, H, assert_identical, batch, noise, reference_mlp, run_training,
                     tiny_vae)

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")
DTYPES = ("float32", "float64")
KS = (1, 2, 5)
TOL = gradcheck.DEFAULT_TOLERANCE


# this file's models: the IWAE objective, k importance samples (tiny(decoder, k))
tiny = partial(tiny_vae, objective="iwae")


# ------------------------------------------------------------------------------------------
# An independent forward pass from state_dict(): NumPy and scipy densities, written from the
# documented layout (encoder output [mu, logvar], ReLU between Linear layers, the encoder
# sees x - input_shift, the Gaussian decoder outputs [mu_x, logvar_x]).




def reference_densities(model, x, eps):
    """(ln p(x|z), ln p(z), ln q(z|x)), each (k, N), at z = mu + sigma eps, from scipy."""
    state = model.state_dict()
    h = reference_mlp(state, "encoder.", x - model.input_shift)
    mu, logvar = h[:, :model.latent_dim], h[:, model.latent_dim:]
    std = np.exp(logvar / 2)
    z = mu + std * eps
    out = reference_mlp(state, "decoder.", z)
    c = x.shape[-1]
    name = model.likelihood.name
    if name == "bernoulli":
        log_px = (x * special.log_expit(out) + (1 - x) * special.log_expit(-out)).sum(-1)
    elif name == "gaussian":
        log_px = stats.norm.logpdf(x, out[..., :c], np.exp(out[..., c:] / 2)).sum(-1)
    else:
        log_px = stats.norm.logpdf(x, out, math.sqrt(model.likelihood.variance)).sum(-1)
    return log_px, stats.norm.logpdf(z).sum(-1), stats.norm.logpdf(z, mu, std).sum(-1)


def host(model, value) -> float:
    return float(model.backend.to_numpy(value))


# ------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("k", (2, 5))
@pytest.mark.parametrize("decoder", DECODERS)
def test_loss_matches_an_independent_logsumexp(decoder, k, code_path):
    """loss = -1/N sum_n [logsumexp_s ln w - ln k], and the decomposition of ELBOTerms:
    recon = sum w~ (-ln p(x|z)), kl = sum w~ (ln q - ln p(z) + ln(k w~)), loss = recon + kl."""
    model = tiny(decoder, k)
    x, eps = batch(), noise(k)
    terms = model.loss(x, eps=eps)
    log_px, log_pz, log_qz = reference_densities(model, x, eps)
    log_w = log_px + log_pz - log_qz
    bound = special.logsumexp(log_w, axis=0) - math.log(k)
    w = special.softmax(log_w, axis=0)
    assert float(terms.loss) == pytest.approx(-bound.mean(), rel=1e-12)
    assert float(terms.recon) == pytest.approx((w * -log_px).sum(0).mean(), rel=1e-12)
    kl = (w * (log_qz - log_pz + np.log(k * w))).sum(0).mean()
    assert float(terms.kl) == pytest.approx(kl, rel=1e-10, abs=1e-12)
    assert float(terms.loss) == pytest.approx(float(terms.recon) + float(terms.kl), rel=1e-15)
    assert float(terms.kl) >= (w * (log_qz - log_pz)).sum(0).mean()  # + KL(w~ || uniform)


@pytest.mark.parametrize("decoder", DECODERS)
def test_k1_bound_is_the_elbo_with_a_sampled_kl(decoder, code_path):
    """k = 1: w~ = 1, the bound is ln w = ln p(x|z) - (ln q(z|x) - ln p(z)) at the drawn z:
    the ELBO with the KL term sampled, not the closed form that objective="vae" uses."""
    model = tiny(decoder, 1)
    x, eps = batch(), noise(1)
    terms = model.loss(x, eps=eps)
    log_px, log_pz, log_qz = reference_densities(model, x, eps)
    sampled_kl = (log_qz - log_pz).mean()
    assert float(terms.recon) == pytest.approx(-log_px.mean(), rel=1e-12)
    assert float(terms.kl) == pytest.approx(sampled_kl, rel=1e-11)
    assert float(terms.loss) == pytest.approx(-log_px.mean() + sampled_kl, rel=1e-12)
    # the "vae" objective on the same eps differs only by closed-form KL against sampled KL
    vae = VAE(input_dim=C, hidden=(H,), latent_dim=D, decoder=decoder, dtype="float64",
              variance=0.3 if decoder == "gaussian-fixed" else None)
    vae.load_state_dict(model.state_dict())
    closed = vae.loss(x, eps=eps)
    assert float(closed.recon) == pytest.approx(float(terms.recon), rel=1e-14)
    assert float(closed.kl) != pytest.approx(float(terms.kl), rel=1e-3)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_k1_decoder_gradients_equal_the_vae_objective(decoder, dtype, code_path):
    """With k = 1 the weight is exactly 1, so the decoder sees the gradient of the "vae"
    objective with S = 1, to the bit; the encoder's differs (sampled against closed-form KL)."""
    model = tiny(decoder, 1, dtype=dtype)
    vae = VAE(input_dim=C, hidden=(H,), latent_dim=D, decoder=decoder, dtype=dtype,
              variance=0.3 if decoder == "gaussian-fixed" else None)
    vae.load_state_dict(model.state_dict())
    x, eps = batch().astype(dtype), noise(1).astype(dtype)
    grads = []
    for m in (model, vae):
        m.loss(x, eps=eps)
        m.backward()
        grads.append({k: v.copy() for k, v in m.parameters.grads.items()})
    for name in grads[0]:
        same = np.array_equal(grads[0][name], grads[1][name])
        assert same == name.startswith("decoder."), name


@pytest.mark.parametrize("decoder", DECODERS)
def test_bound_equals_log_likelihood_on_the_same_draws(decoder, code_path):
    """-loss with k samples is the mean of VAE.log_likelihood with K = k importance samples
    from the same generator: the same estimator, once as a training loss. Both evaluate
    ln w and the shifted logsumexp with the same operations (iwae_log_weights follows
    log_likelihood's expression), so the two agree to the bit."""
    k = 7
    model = tiny(decoder, k)
    x = batch()
    loss = model.loss(x, rng=model.backend.rng(5)).loss
    log_px = model.log_likelihood(x, k, model.backend.rng(5), chunk_size=k)
    assert float(loss) == -float(np.mean(log_px))


def _linear_gaussian(k):
    """hidden=(): the decoder x = z W + b + noise(lambda), ln p(x) Gaussian in closed form;
    the encoder is the exact posterior map shifted and over-dispersed (as
    tests/test_model.py's ``_linear_gaussian_vae(exact=False)``), so q != p(z|x) and the
    bound has room to rise. Returns (model, marginal mean, marginal cov, (A, posterior cov))."""
    c, d, lam, shift = 4, 2, 0.5, 0.5
    W = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, -1.0]])
    b = np.array([0.1, -0.2, 0.3, 0.0])
    post_cov = np.linalg.inv(np.eye(d) + W @ W.T / lam)
    A_true = W.T @ post_cov / lam                       # posterior mean = (x - b) A
    A = A_true + 0.1
    log_var = np.log(np.diag(post_cov)) + 0.5
    model = VAE(input_dim=c, hidden=(), latent_dim=d, decoder="gaussian-fixed", variance=lam,
                input_shift=shift, samples=k, dtype="float64", objective="iwae")
    model.load_state_dict({
        "encoder.linear0.W": np.concatenate([A, np.zeros((c, d))], axis=1),
        "encoder.linear0.b": np.concatenate([(shift - b) @ A, log_var]),
        "decoder.linear0.W": W, "decoder.linear0.b": b})
    return model, b, W.T @ W + lam * np.eye(c), (A_true, post_cov)


def test_bound_rises_with_k_towards_the_exact_log_likelihood():
    """E[-loss] for k = 1, 2, 5, 50 on a linear-Gaussian VAE whose ln p(x) is known: each
    estimate from 10 independent batches of 1,000 copies of three images (its standard
    error from their spread). k = 1 is the ELBO, ln p(x) - KL(q || p(z|x)) in closed form;
    the bound rises strictly with k (every step by more than 5 standard errors) and k = 50
    is within 0.02 nats, and 5 standard errors, below ln p(x)."""
    x = np.random.default_rng(1).multivariate_normal(
        *_linear_gaussian(1)[1:3], size=3)
    copies, batches = 1000, 10
    xs = np.repeat(x, copies, axis=0)
    estimates = {}
    for k in (1, 2, 5, 50):
        model, mean, cov, (A_true, post_cov) = _linear_gaussian(k)
        values = [-host(model, model.loss(xs, rng=model.backend.rng([k, b])).loss)
                  for b in range(batches)]
        estimates[k] = (np.mean(values), np.std(values, ddof=1) / math.sqrt(batches))
    log_px = stats.multivariate_normal(mean, cov).logpdf(x).mean()
    mu_q, logvar_q = model.encode(x)
    var_q, var_post = np.exp(logvar_q), np.diag(post_cov)
    mu_post = (x - mean) @ A_true
    kl_q_post = 0.5 * (np.log(var_post / var_q) + (var_q + (mu_q - mu_post) ** 2) / var_post
                       - 1).sum(axis=1).mean()
    assert kl_q_post > 0.2                               # a real gap to close

    elbo, se = estimates[1]
    assert abs(elbo - (log_px - kl_q_post)) < 5 * se, (elbo, log_px - kl_q_post, se)
    ks = sorted(estimates)
    for small, large in zip(ks, ks[1:]):
        (lo, se_lo), (hi, se_hi) = estimates[small], estimates[large]
        assert hi - lo > 5 * math.hypot(se_lo, se_hi), (small, large, estimates)
    best, se_best = estimates[50]
    assert best < log_px + 5 * se_best                   # still a lower bound
    assert log_px - best < 0.02                          # from a gap of kl_q_post > 0.2


# ------------------------------------------------------------------------------------------
# Stability: ln w of -1e4, and examples whose weights all vanish


@pytest.mark.parametrize("fast", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_is_stable_for_log_weights_of_minus_1e4(dtype, fast):
    """exp(-1e4) is 0 in any float: a naive ln mean exp gives -inf. Shifted by the largest,
    the bound and the weights match scipy's float64 logsumexp and softmax."""
    log_w = np.array([[-1e4, -1e4 - 3.0, 0.5, -1e4],
                      [-1e4 + 1.0, -1e4 - 1.0, -1e4, -1e4],
                      [-1e4 - 50.0, -1e4 - 2.0, -2.0, -1e4]])     # (k = 3, N = 4)
    lw = get_backend("numpy", dtype).asarray(log_w)
    with use_fast_paths(fast):
        bound, weights = iwae_bound(lw)
    assert bound.dtype == weights.dtype == np.dtype(dtype)
    rtol = 1e-6 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(bound, special.logsumexp(log_w, axis=0) - math.log(3), rtol=rtol)
    np.testing.assert_allclose(weights, special.softmax(log_w, axis=0), rtol=rtol, atol=1e-30)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=rtol)
    # three equal ln w of -1e4: each e^0 = 1 exactly, each weight 1 / 3 correctly rounded
    assert np.all(weights[:, 3] == np.dtype(dtype).type(1) / np.dtype(dtype).type(3))


@pytest.mark.parametrize("fast", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_example_whose_weights_all_vanish_gets_minus_inf_and_zero_weights(dtype, fast):
    """Every ln w = -inf (p(x | z) = 0 for every sample): the bound is -inf and the weights
    are 0, not NaN, so the example adds nothing to the weights' sum over others; the other
    examples are untouched. NaN stays NaN."""
    log_w = np.array([[-np.inf, 0.0, np.nan], [-np.inf, -1.0, 0.0]])
    lw = get_backend("numpy", dtype).asarray(log_w)
    with use_fast_paths(fast), np.errstate(divide="ignore", invalid="ignore"):
        bound, weights = iwae_bound(lw)
    assert bound[0] == -np.inf and np.all(weights[:, 0] == 0) and not np.signbit(weights[0, 0])
    np.testing.assert_allclose(bound[1], special.logsumexp([0.0, -1.0]) - math.log(2), rtol=1e-6)
    np.testing.assert_allclose(weights[:, 1], special.softmax([0.0, -1.0]), rtol=1e-6)
    assert np.isnan(bound[2]) and np.isnan(weights[0, 2])


def test_a_model_whose_weights_all_vanish_refuses_the_step():
    """A Gaussian decoder whose variance underflows to 0 at targets it misses: every ln w is
    -inf, the loss +inf. With check_finite (the default) loss() raises FloatingPointError and
    keeps nothing for backward; without, the loss is +inf for the caller to see."""
    model = tiny("gaussian", 3)
    state = model.state_dict()
    state["decoder.linear1.W"][...] = 0.0
    state["decoder.linear1.b"][...] = np.concatenate([np.full(C, 50.0), np.full(C, -1e4)])
    model.load_state_dict(state)
    with np.errstate(all="ignore"):
        with pytest.raises(FloatingPointError, match="not finite"):
            model.loss(batch(), eps=noise(3))
        with pytest.raises(RuntimeError, match="before VAE.loss"):
            model.backward()
        assert float(model.loss(batch(), eps=noise(3), check_finite=False).loss) == np.inf


@pytest.mark.parametrize("code", ("fast", "reference"))
def test_log_weights_near_minus_1e4_train_in_float32(code):
    """A fixed-variance Gaussian decoder far from its targets: ln p(x | z) is about -1e4
    (e^-1e4 underflows float32 and float64 alike); the float32 loss matches the float64 one
    and every gradient is finite."""
    results = {}
    for dtype in DTYPES:
        model = tiny("gaussian-fixed", 5, dtype=dtype, variance=1e-3)
        state = model.state_dict()
        state["decoder.linear1.b"][...] = 4.0                 # x in [0, 1], mean ~ 4
        model.load_state_dict(state)
        with use_fast_paths(code == "fast"):
            terms = model.loss(batch().astype(dtype), eps=noise(5).astype(dtype))
            model.backward()
        results[dtype] = float(terms.loss), model.parameters.grad.copy()
    loss32, grad32 = results["float32"]
    loss64, grad64 = results["float64"]
    assert loss64 > 1e4 and loss32 == pytest.approx(loss64, rel=1e-5)
    assert np.all(np.isfinite(grad32))
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-3 * np.abs(grad64).max())


# ------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_iwae_gradients(decoder, k, code_path, record_check):
    model = tiny(decoder, k)
    x, eps = batch(), noise(k)
    report = gradcheck.check_vae(model, x, eps, max_entries=None)  # every entry
    record_check("IWAE element-wise (numpy)", report.max_rel_error)
    assert report.passed, report.table()
    assert report.path == code_path
    assert {row.name for row in report.rows} == set(model.parameters.names)
    directional = gradcheck.check_vae_directional(model, x, eps, seed=3)
    record_check("IWAE directional (numpy)", directional.rel_error)
    assert directional.passed, directional
    assert directional.path == code_path


@pytest.mark.parametrize("decoder", DECODERS)
def test_iwae_gradients_on_a_bigger_model(decoder, code_path, record_check):
    """Two tanh hidden layers, 20 pixels, k = 5, weights far from uniform: 12 entries per array."""
    model = tiny(decoder, 5, input_dim=20, hidden=(16, 12), latent_dim=4, activation="tanh",
                 seed=5)
    x, eps = batch(6, 20, seed=2), noise(5, 6, 4, seed=3)
    report = gradcheck.check_vae(model, x, eps, max_entries=12, seed=1)
    record_check("IWAE element-wise (numpy)", report.max_rel_error)
    assert report.passed, report.table()
    directional = gradcheck.check_vae_directional(model, x, eps, seed=4)
    record_check("IWAE directional (numpy)", directional.rel_error)
    assert directional.passed, directional


def test_iwae_gradients_on_array_api_strict(record_check):
    """The reference code is portable array-API code: the same checks under array-api-strict."""
    model = tiny("gaussian", 3, backend="array_api_strict")
    x, eps = model.backend.asarray(batch()), model.backend.asarray(noise(3))
    report = gradcheck.check_vae(model, x, eps, max_entries=8)
    record_check("IWAE element-wise (array_api_strict)", report.max_rel_error)
    assert report.passed, report.table()
    directional = gradcheck.check_vae_directional(model, x, eps)
    record_check("IWAE directional (array_api_strict)", directional.rel_error)
    assert directional.passed, directional


def test_latent_gradient_three_paths_equal_the_collapsed_form(np64):
    """ln q(z | x) as a function of (mu, logvar, z), -1/2 sum ((z - mu)^2 e^-logvar + logvar
    + ln 2 pi): its gradient along z = mu + sigma eps has three paths, through z and direct in
    mu and in logvar. Written out here, they sum to what iwae_latent_backward computes (the
    eps form, where mu drops out and logvar keeps only -1/2)."""
    rng = np.random.default_rng(0)
    k, n, d = 5, 4, 3
    mu, logvar = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    eps, dz_dec = rng.standard_normal((k, n, d)), rng.standard_normal((k, n, d))
    a = special.softmax(rng.standard_normal((k, n)), axis=0) / n        # w~ / N
    sigma = np.exp(logvar / 2)
    z = mu + sigma * eps
    g = -a[..., None]                                   # d loss / d ln w
    # ln w = ln p(x|z) + ln p(z) - ln q(z | x; mu, logvar)
    dz = dz_dec + g * (-z) - g * (-(z - mu) / sigma ** 2)   # through z: decoder, prior, q
    dmu_direct = -g * ((z - mu) / sigma ** 2)               # -d ln q / d mu at fixed z
    dlogvar_direct = -g * (0.5 * (z - mu) ** 2 / sigma ** 2 - 0.5)
    dmu = dz.sum(0) + dmu_direct.sum(0)
    dlogvar = (dz * 0.5 * sigma * eps).sum(0) + dlogvar_direct.sum(0)
    got_mu, got_logvar = iwae_latent_backward(dz_dec, a, z, logvar, eps)
    np.testing.assert_allclose(got_mu, dmu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_logvar, dlogvar, rtol=1e-12, atol=1e-15)


def _wrong_without_prior(dz, dloss_dnll, z, logvar, eps):
    """The prior's path into z forgotten."""
    return objectives_module.reparameterize_backward(dz, logvar, eps)


def _wrong_without_half_logvar(dz, dloss_dnll, z, logvar, eps):
    """ln q's direct -1/2 logvar forgotten (as if q's density did not change with sigma)."""
    xp = objectives_module.namespace_of(dz)
    return objectives_module.reparameterize_backward(dz + xp.expand_dims(dloss_dnll, axis=2) * z,
                                                logvar, eps)


@pytest.mark.parametrize("wrong", (_wrong_without_prior, _wrong_without_half_logvar))
def test_a_wrong_latent_gradient_fails_and_points_at_the_encoder(wrong, monkeypatch,
                                                                 record_check):
    monkeypatch.setattr(objectives_module, "iwae_latent_backward", wrong)
    model = tiny("gaussian", 3)
    x, eps = batch(), noise(3)
    report = gradcheck.check_vae(model, x, eps, max_entries=None)
    directional = gradcheck.check_vae_directional(model, x, eps, seed=3)
    record_check("IWAE element-wise", report.max_rel_error, wrong=True)
    record_check("IWAE directional", directional.rel_error, wrong=True)
    assert not report.passed and not directional.passed
    assert all(row.rel_error <= TOL for row in report.rows if row.name.startswith("decoder."))
    assert report.worst().name.startswith("encoder.")


def test_weights_not_held_at_the_softmax_fail():
    """Uniform weights 1/k in place of w~ (the gradient of the average of ln w, i.e. of the
    S-sample ELBO with a sampled KL) are not the gradient of the bound: the check says so."""
    model = tiny("bernoulli", 5)
    x, eps = batch(), noise(5)
    original = objectives_module.iwae_bound

    def uniform(log_w):
        bound, weights = original(log_w)
        return bound, weights * 0.0 + 1.0 / log_w.shape[0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objectives_module, "iwae_bound", uniform)
        assert not gradcheck.check_vae(model, x, eps, max_entries=6).passed


def test_same_eps_same_loss_and_gradients_and_backward_once():
    model = tiny("gaussian", 4)
    x, eps = batch(), noise(4)
    runs = []
    for _ in range(2):
        loss = float(model.loss(x, eps=eps).loss)
        model.backward()
        runs.append((loss, model.parameters.grad.copy()))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    with pytest.raises(RuntimeError, match="before VAE.loss"):
        model.backward()


@pytest.mark.parametrize("decoder", DECODERS)
def test_inference_between_loss_and_backward_changes_no_gradient(decoder):
    model = tiny(decoder, 3)
    x, eps = batch(), noise(3)
    model.loss(x, eps=eps)
    model.backward()
    clean = model.parameters.grad.copy()
    model.loss(x, eps=eps)
    other = batch(7, seed=4)
    model.encode(other)
    model.reconstruct(other)
    model.sample(2, model.backend.rng(3))
    model.log_likelihood(other, 4, model.backend.rng(3))
    model.backward()
    assert np.array_equal(model.parameters.grad, clean)


# ------------------------------------------------------------------------------------------
# Fast paths: bit for bit against the reference


def run_iwae(fast: bool, dtype: str, decoder: str, k: int, **kwargs) -> dict:
    """``helpers.run_training`` for the IWAE (k = samples), on a 40-24-16-5 model."""
    kwargs = {"input_dim": 40, "hidden": (24, 16), "latent_dim": 5, **kwargs}
    return run_training(fast, dtype, decoder, k, objective="iwae", **kwargs)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_iwae_step_is_bit_identical_to_the_reference(dtype, decoder, k):
    pytest.importorskip("numba")
    assert_identical(run_iwae(True, dtype, decoder, k), run_iwae(False, dtype, decoder, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_iwae_step_with_many_samples_and_a_batch_of_one(dtype):
    """k = 50 (NumPy's sums over 50 samples regroup past eight terms: both paths must use
    the same ones) and N = 1 (an (S, 1) column)."""
    for batch_size, k in ((3, 50), (1, 9)):
        kw = dict(batch=batch_size, steps=2)
        assert_identical(run_iwae(True, dtype, "bernoulli", k, **kw),
                         run_iwae(False, dtype, "bernoulli", k, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_bound_and_latent_backward_match_the_reference(dtype):
    """The two IWAE functions alone, on awkward values: -inf columns, -1e4, signed zeros."""
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(2)
    log_w = rng.standard_normal((6, 5)) * 30
    log_w[:, 1] = -np.inf
    log_w[:, 2] -= 1e4
    log_w[0, 3] = -0.0
    lw = backend.asarray(log_w)
    dz, z, eps = (backend.asarray(rng.standard_normal((6, 5, 3))) for _ in range(3))
    logvar = backend.asarray(rng.standard_normal((5, 3)))
    results = []
    for fast in (True, False):
        with use_fast_paths(fast), np.errstate(divide="ignore"):
            bound, weights = iwae_bound(lw)
            dmu, dlogvar = iwae_latent_backward(dz, weights * (1.0 / 5), z, logvar, eps)
        results.append([bound, weights, dmu, dlogvar])
    bits = f"u{np.dtype(dtype).itemsize}"
    for fast_array, reference_array in zip(*results):
        assert fast_array.dtype == reference_array.dtype == np.dtype(dtype)
        assert np.array_equal(fast_array.view(bits), reference_array.view(bits))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_row_grad_scale_is_bit_identical_on_every_path(dtype, decoder, monkeypatch):
    """nll(x, out, grad_scale=(M,) array) multiplies row r of the gradient by grad_scale[r]:
    on the fast path (the Bernoulli twin's row blocks included) the reference's
    grad * scale[:, None] to the bit; scale_rows does the same to a gradient in hand."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    monkeypatch.setattr(twins, "BERNOULLI_BLOCK", 20)   # several blocks of rows
    backend = get_backend("numpy", dtype)
    likelihood = make_likelihood(decoder, 0.3 if decoder == "gaussian-fixed" else None)
    rng = np.random.default_rng(4)
    m, c = 9, 7
    out = backend.asarray(rng.standard_normal((m, c * likelihood.outputs_per_pixel)) * 3)
    x = backend.asarray((rng.random((m, c)) < 0.5).astype(dtype))
    scale = backend.asarray(rng.random(m))
    bits = f"u{np.dtype(dtype).itemsize}"
    with use_fast_paths(False):
        nll, grad = likelihood.nll(x, out)
        expected = grad * scale[:, None]
        ref_nll, ref_scaled = likelihood.nll(x, out, grad_scale=scale)
    fast_nll, fast_scaled = likelihood.nll(x, out, grad_scale=scale)
    fast_plain = likelihood.nll(x, out)[1]
    for got in (ref_scaled, fast_scaled, scale_rows(fast_plain, scale)):
        assert got.dtype == np.dtype(dtype)
        assert np.array_equal(got.view(bits), expected.view(bits))
    assert np.array_equal(nll, ref_nll) and np.array_equal(nll, fast_nll)


def test_a_grad_scale_of_the_wrong_shape_is_refused(np64):
    likelihood = make_likelihood("bernoulli")
    x = np64.asarray(np.zeros((4, 3)))
    out = np64.asarray(np.zeros((4, 3)))
    for fast in (True, False):
        with use_fast_paths(fast):
            with pytest.raises(ValueError, match=r"^grad_scale: expected a number or an "
                                                 r"array of shape \(4,\)"):
                likelihood.nll(x, out, grad_scale=np.ones(5))
    with pytest.raises(ValueError, match=r"^scale: expected an array of shape \(4,\)"):
        scale_rows(np64.asarray(np.zeros((4, 3))), 0.5)




def test_ops_logsumexp_and_softmax_matches_scipy_on_both_axes(np64):
    a = np.random.default_rng(0).standard_normal((4, 6)) * 5
    for axis in (0, 1):
        lse, w = logsumexp_and_softmax(np64.xp, np64.asarray(a), axis=axis)
        np.testing.assert_allclose(lse, special.logsumexp(a, axis=axis), rtol=1e-14)
        np.testing.assert_allclose(w, special.softmax(a, axis=axis), rtol=1e-14)


def test_log_weights_are_the_densities_written_out(np64):
    """iwae_log_weights (the 2 pi terms cancelled) against ln p(x|z) + ln N(z; 0, I) -
    ln N(z; mu, sigma^2) from scipy."""
    model = tiny("gaussian", 3)
    x, eps = batch(), noise(3)
    log_px, log_pz, log_qz = reference_densities(model, x, eps)
    mu, logvar = model.encode(x)
    z = mu + np.exp(logvar / 2) * eps
    np.testing.assert_allclose(iwae_log_weights(-log_px, z, logvar, eps),
                               log_px + log_pz - log_qz, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Configuration


def test_objective_is_recorded_and_vae_stays_the_default():
    assert VAE(6, (5,), 2).config["objective"] == "vae"
    model = VAE(6, (5,), 2, samples=5, objective="iwae")
    assert model.objective == "iwae" and model.config["objective"] == "iwae"
    assert model.config["samples"] == 5


@pytest.mark.parametrize("kwargs, pattern", [
    ({"objective": "elbo"}, r"^objective: expected one of vae, iwae, got 'elbo'"),
    ({"objective": "IWAE"}, r"^objective: "),
    ({"objective": None}, r"^objective: "),
    ({"objective": "iwae", "beta": 0.5}, r"^beta: the iwae objective has no KL term"),
    ({"objective": "iwae", "beta": 0.0}, r"^beta: the iwae objective"),
    ({"objective": "iwae", "samples": 0}, r"^samples: expected an integer >= 1"),
])
def test_bad_objective_configuration(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VAE(6, (5,), 2, **kwargs)


# ------------------------------------------------------------------------------------------
# The CuPy kernels (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("decoder", DECODERS)
def test_cupy_iwae_step_matches_numpy(decoder):
    """The fused CuPy kernels (iwae_shifted_exp, iwae_log_total, iwae_normalize,
    iwae_prior_grad) in a float64 step against NumPy's; CUDA's exp and log differ from
    NumPy's in the last bits, hence a tolerance."""
    cupy_backend = get_backend("cupy", "float64")
    results = []
    for backend in (cupy_backend, get_backend("numpy", "float64")):
        model = tiny(decoder, 5, backend=backend, input_dim=30, hidden=(20,))
        x = backend.asarray(batch(8, 30))
        eps = backend.asarray(noise(5, 8))
        terms = model.loss(x, eps=eps)
        model.backward()
        results.append((backend.to_float(terms.loss), backend.to_float(terms.kl),
                        backend.to_numpy(model.parameters.grad)))
    (l0, k0, g0), (l1, k1, g1) = results
    assert l0 == pytest.approx(l1, rel=1e-12) and k0 == pytest.approx(k1, rel=1e-9)
    np.testing.assert_allclose(g0, g1, rtol=1e-9, atol=1e-12 * np.abs(g1).max())
    lw = cupy_backend.asarray(np.array([[-np.inf, -1e4, 0.0], [-np.inf, -1e4 - 1, 2.0]]))
    bound, weights = iwae_bound(lw)
    bound, weights = cupy_backend.to_numpy(bound), cupy_backend.to_numpy(weights)
    assert bound[0] == -np.inf and np.all(weights[:, 0] == 0)
    np.testing.assert_allclose(weights[:, 1:], special.softmax([[-1e4, 0.0], [-1e4 - 1, 2.0]],
                                                               axis=0), rtol=1e-12)
