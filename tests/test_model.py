"""vae_np.model: the whole VAE.

- the forward pass against a plain-NumPy/scipy re-implementation built from state_dict();
- every parameter gradient against central differences (element-wise and directional), for
  each decoder, S in {1, 3}, beta != 1, on NumPy and array-api-strict; deliberately wrong
  gradients fail both checks;
- reparameterisation: backward vs central differences, Monte-Carlo moments;
- the importance-sampled ln p(x): against an independent logsumexp, chunking, Jensen's
  inequality, and the exact marginal of a linear-Gaussian VAE (scipy multivariate_normal);
- encode / decode / reconstruct / sample; reproducibility; bad input; state_dict.

Gradient tolerance: vae_np.gradcheck.DEFAULT_TOLERANCE = 1e-6 (norm-wise relative error per
parameter array, float64, h = 1e-6). The model is a composition of smooth pieces and ReLUs;
central differences agree with a right gradient to ~1e-9 (the ReLU kinks are never within h
of a pre-activation for these seeds), a 1% error in one array shows up as ~5e-3.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

import vae_np.model as model_module
from vae_np import VAE, gradcheck, reparameterize, reparameterize_backward
from vae_np.backend import get_backend
from vae_np.losses import kl_standard_normal

from helpers import C, D, H, N, batch, jitter_biases, noise, reference_mlp

TOL = gradcheck.DEFAULT_TOLERANCE
DECODERS = ["bernoulli", "gaussian", "gaussian-fixed"]


def tiny(decoder="bernoulli", samples=1, beta=1.0, backend="numpy", dtype="float64", seed=0,
         **kwargs):
    """A small float64 VAE with random (not zero) biases.

    Biases start at exactly 0, so wherever a whole hidden layer is dead (all ReLUs off) the
    next pre-activation is exactly 0: the ReLU kink, where a central difference sees half a
    slope and any gradient check fails for a right gradient. Random biases keep every
    pre-activation away from the kink (and make the forward reference see the biases).
    """
    kwargs.setdefault("input_dim", C)
    kwargs.setdefault("hidden", (H,))
    kwargs.setdefault("latent_dim", D)
    if decoder == "gaussian-fixed":
        kwargs.setdefault("variance", 0.3)
    model = VAE(decoder=decoder, samples=samples, beta=beta, backend=backend, dtype=dtype,
                seed=seed, **kwargs)
    return jitter_biases(model, seed)








# ------------------------------------------------------------------------------------------
# An independent re-implementation of the forward pass, from the documented layout:
# encoder output = [mu, logvar]; Gaussian decoder output = [mu_x, logvar_x]; ReLU between
# Linear layers; the encoder sees x - input_shift, the likelihood scores x.




def reference_posterior(model, x):
    h = reference_mlp(model.state_dict(), "encoder.", x - model.input_shift)
    return h[:, :model.latent_dim], h[:, model.latent_dim:]


def reference_log_px_given_z(model, x, out):
    """ln p(x | z) per row, from scipy.stats / scipy.special; out (..., width)."""
    c = x.shape[-1]
    name = model.likelihood.name
    if name == "bernoulli":  # x ln sigmoid(l) + (1 - x) ln sigmoid(-l), valid for x in [0, 1]
        return (x * special.log_expit(out) + (1 - x) * special.log_expit(-out)).sum(-1)
    if name == "gaussian":
        return stats.norm.logpdf(x, out[..., :c], np.exp(out[..., c:] / 2)).sum(-1)
    return stats.norm.logpdf(x, out, math.sqrt(model.likelihood.variance)).sum(-1)


def reference_terms(model, x, eps):
    """(recon, kl, per-sample nll (S, N)) of the negative ELBO, computed independently."""
    mu, logvar = reference_posterior(model, x)
    z = mu + np.sqrt(np.exp(logvar)) * eps  # (S, N, d)
    nll = -reference_log_px_given_z(model, x, reference_mlp(model.state_dict(), "decoder.", z))
    kl = 0.5 * (np.exp(logvar) - logvar - 1 + mu ** 2).sum(axis=1)
    return nll.mean(), kl.mean(), nll


def reference_log_weights(model, x, eps):
    """ln p(x|z_k) + ln N(z_k; 0, I) - ln N(z_k; mu, sigma^2), (K, N), with scipy."""
    mu, logvar = reference_posterior(model, x)
    std = np.exp(logvar / 2)
    z = mu + std * eps
    out = reference_mlp(model.state_dict(), "decoder.", z)
    return (reference_log_px_given_z(model, x, out) + stats.norm.logpdf(z).sum(-1)
            - stats.norm.logpdf(z, mu, std).sum(-1))


# ------------------------------------------------------------------------------------------
# The loss: values


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("beta", [1.0, 0.37])
def test_loss_matches_independent_forward(decoder, samples, beta, code_path):
    model = tiny(decoder, samples, beta)
    x, eps = batch(), noise(samples)
    terms = model.loss(x, eps=eps)
    recon, kl, _ = reference_terms(model, x, eps)
    assert float(terms.recon) == pytest.approx(recon, rel=1e-12)
    assert float(terms.kl) == pytest.approx(kl, rel=1e-12)
    assert float(terms.loss) == pytest.approx(recon + beta * kl, rel=1e-12)
    # The decomposition the trainer reports: loss = recon + beta * kl, in the model's own terms.
    assert float(terms.loss) == pytest.approx(float(terms.recon) + beta * float(terms.kl),
                                              rel=1e-15)


@pytest.mark.parametrize("decoder", DECODERS)
def test_recon_of_s_samples_is_the_average_of_single_sample_recons(decoder):
    """recon with S = 3 equals the mean of three S = 1 recons on the same noise slices,
    and kl does not depend on the noise."""
    x, eps = batch(), noise(3)
    three = tiny(decoder, samples=3).loss(x, eps=eps)
    one = tiny(decoder, samples=1)
    singles = [one.loss(x, eps=eps[s:s + 1]) for s in range(3)]
    assert float(three.recon) == pytest.approx(np.mean([float(t.recon) for t in singles]),
                                               rel=1e-13)
    for t in singles:
        assert float(t.kl) == pytest.approx(float(three.kl), rel=1e-15)


def test_beta_zero_is_pure_reconstruction_and_weights_kl_linearly():
    x, eps = batch(), noise(1)
    losses = {b: float(tiny("gaussian", beta=b).loss(x, eps=eps).loss) for b in (0.0, 1.0, 4.0)}
    kl = float(tiny("gaussian").loss(x, eps=eps).kl)
    assert losses[1.0] - losses[0.0] == pytest.approx(kl, rel=1e-12)
    assert losses[4.0] - losses[0.0] == pytest.approx(4 * kl, rel=1e-12)


# ------------------------------------------------------------------------------------------
# The loss: gradients


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_vae_gradients(decoder, samples, beta, code_path, record_check):
    model = tiny(decoder, samples, beta)
    x, eps = batch(), noise(samples)
    report = gradcheck.check_vae(model, x, eps, max_entries=None)  # every entry: ~200
    record_check("VAE element-wise (numpy)", report.max_rel_error)
    assert report.passed, report.table()
    assert report.path == code_path and f"{code_path} path" in report.title
    assert {row.name for row in report.rows} == set(model.parameters.names)
    directional = gradcheck.check_vae_directional(model, x, eps, seed=3)
    record_check("VAE directional (numpy)", directional.rel_error)
    assert directional.passed, directional
    assert directional.path == code_path


@pytest.mark.parametrize("decoder", DECODERS)
def test_vae_gradients_sampled_on_a_bigger_model(decoder, code_path, record_check):
    """Two hidden layers, tanh, 20 pixels: max_entries samples 12 entries per array."""
    model = tiny(decoder, samples=2, beta=0.5, input_dim=20, hidden=(16, 12), latent_dim=4,
                 activation="tanh", seed=5)
    x, eps = batch(6, 20, seed=2), noise(2, 6, 4, seed=3)
    report = gradcheck.check_vae(model, x, eps, max_entries=12, seed=1)
    record_check("VAE element-wise (numpy)", report.max_rel_error)
    assert report.passed, report.table()
    assert all(row.entries == min(12, math.prod(row.shape)) for row in report.rows)
    directional = gradcheck.check_vae_directional(model, x, eps, seed=4)
    record_check("VAE directional (numpy)", directional.rel_error)
    assert directional.passed, directional


@pytest.mark.parametrize("decoder, samples", [("gaussian", 3), ("bernoulli", 1)])
def test_vae_gradients_on_array_api_strict(decoder, samples, record_check):
    model = tiny(decoder, samples, beta=1.5, backend="array_api_strict")
    x = model.backend.asarray(batch())
    eps = model.backend.asarray(noise(samples))
    report = gradcheck.check_vae(model, x, eps, max_entries=8)
    record_check("VAE element-wise (array_api_strict)", report.max_rel_error)
    assert report.passed, report.table()
    directional = gradcheck.check_vae_directional(model, x, eps)
    record_check("VAE directional (array_api_strict)", directional.rel_error)
    assert directional.passed, directional


def test_backward_overwrites_instead_of_accumulating(code_path):
    model = tiny("gaussian", samples=2)
    x, eps = batch(), noise(2)
    model.loss(x, eps=eps)
    model.backward()
    first = model.parameters.grad.copy()
    model.loss(x, eps=eps)
    model.backward()
    np.testing.assert_array_equal(model.parameters.grad, first)
    assert np.any(first != 0)


# Deliberately wrong model gradients must fail both checks.


def _both_checks(model, x, eps):
    return (gradcheck.check_vae(model, x, eps, max_entries=None),
            gradcheck.check_vae_directional(model, x, eps, seed=3))


def test_reparameterize_backward_without_the_half_fails(monkeypatch, reference_path,
                                                        record_check):
    """(On the reference code, which the monkeypatch reaches; the subclass test below breaks
    a gradient on whichever code path runs.)"""
    calls = []

    def wrong(dz, logvar, eps):  # dz/dlogvar = exp(logvar / 2) eps: the 1/2 dropped
        calls.append(1)
        dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
        return dmu, 2.0 * dlogvar

    monkeypatch.setattr(model_module, "reparameterize_backward", wrong)
    model = tiny("gaussian", samples=3)
    report, directional = _both_checks(model, batch(), noise(3))
    assert calls, "VAE.backward no longer calls model.reparameterize_backward; update this test"
    record_check("VAE element-wise", report.max_rel_error, wrong=True)
    record_check("VAE directional", directional.rel_error, wrong=True)
    assert not report.passed and report.worst().name.startswith("encoder.")
    assert not directional.passed and directional.rel_error > 100 * TOL
    # The decoder's gradients do not depend on the sampling's backward and still pass.
    assert all(row.rel_error <= TOL for row in report.rows if row.name.startswith("decoder."))


def test_kl_gradient_without_the_half_fails(monkeypatch, reference_path, record_check):
    calls = []

    def wrong(mu, logvar, reduction="none"):
        calls.append(1)
        value, dmu, dlogvar = kl_standard_normal(mu, logvar, reduction)
        return value, dmu, 2.0 * dlogvar

    monkeypatch.setattr(model_module, "kl_standard_normal", wrong)
    report, directional = _both_checks(tiny("bernoulli"), batch(), noise(1))
    assert calls, "VAE.loss no longer calls model.kl_standard_normal; update this test"
    record_check("VAE element-wise", report.max_rel_error, wrong=True)
    record_check("VAE directional", directional.rel_error, wrong=True)
    assert not report.passed and not directional.passed


class OneLayerOffVAE(VAE):
    """The decoder's first weight gradient 1% too large, every other gradient right."""

    def backward(self):
        super().backward()
        grad = self.parameters.grads["decoder.linear0.W"]
        grad[...] = grad * 1.01


def test_one_wrong_parameter_array_fails_and_is_named(code_path, record_check):
    model = jitter_biases(OneLayerOffVAE(input_dim=C, hidden=(H,), latent_dim=D,
                                         decoder="gaussian", samples=3, dtype="float64"))
    report, directional = _both_checks(model, batch(), noise(3))
    record_check("VAE element-wise", report.max_rel_error, wrong=True)
    record_check("VAE directional", directional.rel_error, wrong=True)
    assert not report.passed
    assert [row.name for row in report.rows if row.rel_error > TOL] == ["decoder.linear0.W"]
    assert report.worst().rel_error == pytest.approx(0.01 / 2.01, rel=1e-3)
    assert not directional.passed


# ------------------------------------------------------------------------------------------
# Reparameterisation


def test_reparameterize_backward_matches_central_differences(record_check):
    rng = np.random.default_rng(0)
    mu, logvar = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    eps, dz = rng.standard_normal((5, 4, 3)), rng.standard_normal((5, 4, 3))
    dmu, dlogvar = reparameterize_backward(dz, logvar, eps)

    def f():
        return float(np.sum(reparameterize(mu, logvar, eps) * dz))

    report = gradcheck.check_gradients(f, {"mu": mu, "logvar": logvar},
                                       {"mu": dmu, "logvar": dlogvar})
    record_check("reparameterize_backward", report.max_rel_error)
    assert report.passed, report.table()
    assert dmu.shape == (4, 3) and dlogvar.shape == (4, 3)


def buggy_reparameterize(mu, logvar, eps):
    """The starting example's bug: exp(0.5 ** logvar), a power."""
    return mu + np.exp(0.5 ** logvar) * eps


@pytest.mark.parametrize("fn, should_pass", [(reparameterize, True),
                                             (buggy_reparameterize, False)])
def test_reparameterized_samples_have_the_encoder_moments(fn, should_pass):
    """z = reparameterize(mu, logvar, eps) must be distributed N(mu, exp(logvar)):
    over n = 100,000 draws the sample mean is within 5 standard errors of mu and the sample
    variance within 5 standard errors (sigma^2 sqrt(2 / n)) of exp(logvar). The starting
    example's exp(0.5 ** logvar) fails the same check."""
    mu = np.array([[0.0, 1.5, -2.0, 0.3]])
    logvar = np.array([[0.0, -1.0, 1.2, -3.0]])
    n = 100_000
    eps = np.random.default_rng(7).standard_normal((n, 1, 4))
    z = fn(mu, logvar, eps)[:, 0, :]
    var = np.exp(logvar[0])
    mean_ok = np.abs(z.mean(axis=0) - mu[0]) < 5 * np.sqrt(var / n)
    var_ok = np.abs(z.var(axis=0) - var) < 5 * var * np.sqrt(2.0 / n)
    assert bool(np.all(mean_ok & var_ok)) == should_pass, (z.mean(0), z.var(0), var)


# ------------------------------------------------------------------------------------------
# Noise: injected or drawn, always reproducible


def test_same_eps_same_loss_and_gradients():
    model = tiny("gaussian", samples=2)
    x, eps = batch(), noise(2)
    first = float(model.loss(x, eps=eps).loss)
    model.backward()
    g = model.parameters.grad.copy()
    again = float(model.loss(x, eps=eps.copy()).loss)
    model.backward()
    assert first == again
    np.testing.assert_array_equal(g, model.parameters.grad)


def test_rng_seed_reproduces_the_loss_and_matches_injected_noise(backend):
    model = tiny("bernoulli", samples=2, backend=backend)
    x = batch()
    a = backend.to_float(model.loss(x, rng=backend.rng(9)).loss)
    b = backend.to_float(model.loss(x, rng=backend.rng(9)).loss)
    c = backend.to_float(model.loss(x, rng=backend.rng(10)).loss)
    assert a == b and a != c
    # The rng path draws eps of shape (S, N, d) from the stream: the same as injecting it.
    eps = backend.rng(9).normal((2, N, D))
    assert backend.to_float(model.loss(x, eps=eps).loss) == a


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    for name in a.parameters.names:
        np.testing.assert_array_equal(a.state_dict()[name], b.state_dict()[name])
    assert not np.array_equal(a.state_dict()["encoder.linear0.W"],
                              c.state_dict()["encoder.linear0.W"])


# ------------------------------------------------------------------------------------------
# encode / decode / reconstruct / sample


@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_and_means(decoder, backend):
    model = tiny(decoder, backend=backend)
    x = batch()
    mu, logvar = model.encode(x)
    assert tuple(mu.shape) == (N, D) and tuple(logvar.shape) == (N, D)
    ref_mu, ref_logvar = reference_posterior(model, x)
    np.testing.assert_allclose(backend.to_numpy(mu), ref_mu, rtol=1e-13)
    np.testing.assert_allclose(backend.to_numpy(logvar), ref_logvar, rtol=1e-13)

    z = np.random.default_rng(0).standard_normal((7, D))
    width = C * (2 if decoder == "gaussian" else 1)
    assert tuple(model.decoder_outputs(backend.asarray(z)).shape) == (7, width)
    mean = backend.to_numpy(model.decode(z))
    out = reference_mlp(model.state_dict(), "decoder.", z)
    expected = {"bernoulli": special.expit(out), "gaussian": out[:, :C],
                "gaussian-fixed": out}[decoder]
    np.testing.assert_allclose(mean, expected, rtol=1e-12, atol=1e-15)

    rec = backend.to_numpy(model.reconstruct(x))
    assert rec.shape == (N, C)
    np.testing.assert_array_equal(rec, backend.to_numpy(model.decode(mu)))  # deterministic

    for as_mean in (True, False):
        draws = model.sample(5, backend.rng(0), mean=as_mean)
        assert tuple(draws.shape) == (5, C) and draws.dtype == backend.dtype
    if decoder == "bernoulli":
        assert np.all((mean > 0) & (mean < 1))
        binary = backend.to_numpy(model.sample(50, backend.rng(1), mean=False))
        assert set(np.unique(binary)) <= {0.0, 1.0}


@pytest.mark.parametrize("decoder", DECODERS)
def test_sample_mean_false_is_a_true_draw(decoder):
    """Marginal moments over z ~ N(0, I): E[x] = E[mean(z)] and, for Gaussian decoders,
    Var[x] = Var[mean(z)] + E[sigma^2(z)] (law of total variance). n = 40,000 draws; means
    within 5 standard errors, variances within 6% (the sampling error of a variance of a
    non-normal mixture is about sqrt(kurtosis - 1) / sqrt(n) ~ 1% here). A 'sample' that
    returned the decoder mean would miss sigma^2 (variance 1 with lambda = 1)."""
    model = tiny(decoder, variance=1.0) if decoder == "gaussian-fixed" else tiny(decoder)
    n = 40_000
    draws = model.sample(n, model.backend.rng(1), mean=False)
    out = model.decoder_outputs(model.backend.rng(2).normal((n, D)))  # independent z
    if decoder == "bernoulli":
        p = special.expit(out)
        np.testing.assert_array_less(np.abs(draws.mean(0) - p.mean(0)),
                                     5 * np.sqrt(p.mean(0) * (1 - p.mean(0)) / n))
        return
    if decoder == "gaussian":
        mean, var_noise = out[:, :C], np.exp(out[:, C:])
    else:
        mean, var_noise = out, np.full_like(out, 1.0)
    total_var = mean.var(0) + var_noise.mean(0)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean.mean(0)),
                                 5 * np.sqrt(total_var / n) + 5 * np.sqrt(mean.var(0) / n))
    np.testing.assert_allclose(draws.var(0), total_var, rtol=0.06)
    assert np.all(var_noise.mean(0) > 0.2 * total_var)  # the noise is a visible share


# ------------------------------------------------------------------------------------------
# The importance-sampled ln p(x)


@pytest.mark.parametrize("decoder", DECODERS)
def test_log_likelihood_equals_an_independent_logsumexp(decoder, backend):
    model = tiny(decoder, backend=backend)
    x, K = batch(), 23
    eps = backend.rng(4).normal((K, N, D))  # the draws log_likelihood makes
    log_w = reference_log_weights(model, x, backend.to_numpy(eps))
    expected = special.logsumexp(log_w, axis=0) - math.log(K)
    np.testing.assert_allclose(backend.to_numpy(model.log_importance_weights(x, eps)), log_w,
                               rtol=1e-12)
    for chunk_size in (None, 1, 7, K, 100):
        got = backend.to_numpy(model.log_likelihood(x, K, backend.rng(4), chunk_size=chunk_size))
        assert got.shape == (N,)
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=f"chunk_size={chunk_size}")


def test_log_importance_weights_accepts_host_noise_like_loss():
    model = tiny("gaussian", backend="array_api_strict")
    eps = noise(5)
    log_w = model.backend.to_numpy(model.log_importance_weights(batch(), eps))
    np.testing.assert_allclose(log_w, reference_log_weights(model, batch(), eps), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^eps: "):
        model.log_importance_weights(batch(), model.backend.asarray(noise(5, d=D + 1)))


def test_log_likelihood_is_at_least_the_mean_log_weight():
    """logsumexp - ln K >= mean (Jensen, for the very same samples), and E_q[ln w] is the
    ELBO: the mean log weight matches -loss of an S = K model on the same noise within the
    Monte-Carlo error of ln p(z) - ln q(z) (which loss replaces by the closed-form KL)."""
    K = 3000
    model = tiny("bernoulli", samples=K)
    x = batch()
    eps = model.backend.rng(6).normal((K, N, D))
    log_w = model.log_importance_weights(x, eps)
    iwae = model.log_likelihood(x, K, model.backend.rng(6))
    assert np.all(iwae >= log_w.mean(axis=0))
    assert np.all(iwae > log_w.mean(axis=0) + 1e-3)  # strictly better here, not by rounding
    elbo_estimate = log_w.mean()  # over k and n
    mu, logvar = model.encode(x)
    z = mu + np.exp(logvar / 2) * eps
    log_prior_ratio = stats.norm.logpdf(z).sum(-1) - stats.norm.logpdf(z, mu, np.exp(logvar / 2)).sum(-1)
    se = log_prior_ratio.std() / math.sqrt(K * N)
    assert abs(elbo_estimate - (-float(model.loss(x, eps=eps).loss))) < 5 * se


def _linear_gaussian_vae(decoder, exact=True, samples=1):
    """hidden=(): decoder x = z W + b + noise(lambda); rows of W orthogonal, so the true
    posterior p(z | x) is a diagonal Gaussian, linear in x, which the one-layer encoder
    represents exactly. Returns (model, marginal mean, marginal covariance, posterior map)."""
    c, d, lam, shift = 4, 2, 0.5, 0.5
    W = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, -1.0]])
    b = np.array([0.1, -0.2, 0.3, 0.0])
    post_cov = np.linalg.inv(np.eye(d) + W @ W.T / lam)
    assert np.allclose(post_cov, np.diag(np.diag(post_cov)))
    A = W.T @ post_cov / lam  # posterior mean = (x - b) A
    log_post_var = np.log(np.diag(post_cov))
    if not exact:
        A = A + 0.1
        log_post_var = log_post_var + 0.5  # over-dispersed: a sound IS proposal
    model = VAE(input_dim=c, hidden=(), latent_dim=d, decoder=decoder,
                variance=lam if decoder == "gaussian-fixed" else None, input_shift=shift,
                samples=samples, dtype="float64", seed=0)
    state = {"encoder.linear0.W": np.concatenate([A, np.zeros((c, d))], axis=1),
             "encoder.linear0.b": np.concatenate([(shift - b) @ A, log_post_var])}
    if decoder == "gaussian":
        state["decoder.linear0.W"] = np.concatenate([W, np.zeros((d, c))], axis=1)
        state["decoder.linear0.b"] = np.concatenate([b, np.full(c, math.log(lam))])
    else:
        state["decoder.linear0.W"], state["decoder.linear0.b"] = W, b
    model.load_state_dict(state)
    posterior = (A if exact else W.T @ post_cov / lam, post_cov)
    return model, b, W.T @ W + lam * np.eye(c), posterior


@pytest.mark.parametrize("decoder", ["gaussian-fixed", "gaussian"])
def test_exact_posterior_gives_the_exact_marginal_likelihood(decoder):
    """With q(z|x) = p(z|x) every importance weight equals p(x): the estimate is exact for
    any K, and equals scipy's multivariate normal log-density of the marginal."""
    model, mean, cov, _ = _linear_gaussian_vae(decoder)
    x = np.random.default_rng(0).multivariate_normal(mean, cov, size=5)
    log_px = stats.multivariate_normal(mean, cov).logpdf(x)
    for K, chunk in ((1, None), (37, 5)):
        got = model.log_likelihood(x, K, model.backend.rng(K), chunk_size=chunk)
        np.testing.assert_allclose(got, log_px, rtol=1e-11)
    log_w = model.log_importance_weights(x, model.backend.rng(0).normal((9, 5, 2)))
    np.testing.assert_allclose(log_w, np.broadcast_to(log_px, (9, 5)), rtol=1e-11)


def test_elbo_gap_is_the_kl_to_the_true_posterior():
    """ln p(x) = ELBO + KL(q(z|x) || p(z|x)) (the identity behind the ELBO). For a
    misspecified encoder: -loss with S = 4000 (Monte Carlo) equals the mean of
    ln p(x) - KL(q || p(z|x)) within 5 standard errors, and K = 4000 importance samples
    recover ln p(x) within 5 of their standard errors (< 0.02 nats)."""
    S = 4000
    model, mean, cov, (A_true, post_cov) = _linear_gaussian_vae("gaussian-fixed", exact=False,
                                                                samples=S)
    x = np.random.default_rng(1).multivariate_normal(mean, cov, size=3)
    log_px = stats.multivariate_normal(mean, cov).logpdf(x)
    mu_q, logvar_q = model.encode(x)
    mu_post = (x - mean) @ A_true
    var_q, var_post = np.exp(logvar_q), np.diag(post_cov)
    kl_q_post = 0.5 * (np.log(var_post / var_q) + (var_q + (mu_q - mu_post) ** 2) / var_post
                       - 1).sum(axis=1)
    assert np.all(kl_q_post > 0.05)  # a real gap

    eps = model.backend.rng(2).normal((S, 3, 2))
    elbo = -float(model.loss(x, eps=eps).loss)
    _, _, nll = reference_terms(model, x, eps)
    se = nll.std() / math.sqrt(nll.size)
    assert abs(elbo - np.mean(log_px - kl_q_post)) < 5 * se, (elbo, np.mean(log_px - kl_q_post), se)

    iwae = model.log_likelihood(x, S, model.backend.rng(3), chunk_size=512)
    # Its standard error by the delta method: sd(w) / (mean(w) sqrt(K)), from the same draws.
    log_w = reference_log_weights(model, x, model.backend.rng(3).normal((S, 3, 2)))
    w = np.exp(log_w - log_w.max(axis=0))
    se_iwae = w.std(axis=0) / (w.mean(axis=0) * math.sqrt(S))
    assert np.all(se_iwae < 0.02)
    assert np.all(np.abs(iwae - log_px) < 5 * se_iwae), (iwae, log_px, se_iwae)
    assert np.all(iwae > log_px - kl_q_post + 0.03)  # far better than the ELBO


# ------------------------------------------------------------------------------------------
# Bad input: a ValueError or TypeError naming the argument; nothing broadcast


@pytest.fixture(scope="module")
def model3():
    return tiny("bernoulli", samples=3)


@pytest.mark.parametrize("x, error, pattern", [
    (np.zeros((N, C - 1)), ValueError, rf"^x: expected shape \(N >= 1, {C}\)"),
    (np.zeros((N, C + 1)), ValueError, r"^x: expected shape"),
    (np.zeros((C,)), ValueError, r"^x: expected shape"),
    (np.zeros((0, C)), ValueError, r"^x: expected shape"),
    (np.zeros((1, N, C)), ValueError, r"^x: expected shape"),
    (np.zeros((N, C), dtype=np.int64), TypeError, r"^x: expected a floating-point array"),
    (np.zeros((N, C), dtype=bool), TypeError, r"^x: expected a floating-point array"),
    ([[0.0] * C] * N, TypeError, r"^x: expected"),
    (np.full((N, C), np.nan), ValueError, r"^x: contains NaN or inf"),
    (np.where(np.eye(N, C) > 0, np.inf, 0.5), ValueError, r"^x: contains NaN or inf"),
])
def test_bad_x(model3, x, error, pattern):
    for call in (lambda: model3.loss(x, eps=noise(3)),
                 lambda: model3.encode(x),
                 lambda: model3.reconstruct(x),
                 lambda: model3.log_likelihood(x, 2, model3.backend.rng(0))):
        with pytest.raises(error, match=pattern):
            call()


def test_mnist_width_off_by_one_is_not_broadcast():
    model = VAE(input_dim=784, hidden=(8,), latent_dim=2, dtype="float64")
    with pytest.raises(ValueError, match=r"^x: expected shape \(N >= 1, 784\), got \(3, 783\)"):
        model.loss(np.zeros((3, 783)), rng=model.backend.rng(0))


def test_array_of_another_backend_is_a_type_error():
    model = tiny("bernoulli")
    strict = get_backend("array_api_strict", "float64")
    with pytest.raises(TypeError, match=r"^x: "):
        model.loss(strict.asarray(batch()), eps=noise(1))


def test_bad_z(model3):
    with pytest.raises(ValueError, match=r"^z: expected shape"):
        model3.decode(np.zeros((2, D + 1)))
    with pytest.raises(ValueError, match=r"^z: contains NaN or inf"):
        model3.decode(np.full((2, D), np.inf))
    with pytest.raises(TypeError, match=r"^z: "):
        model3.decode(np.zeros((2, D), dtype=np.int32))


@pytest.mark.parametrize("eps_shape", [(1, N, D), (3, N, D + 1), (3, N + 1, D), (N, D), (3 * N, D)])
def test_eps_of_the_wrong_shape(model3, eps_shape):
    with pytest.raises(ValueError, match=r"^eps: expected shape \(3, 4, 3\)"):
        model3.loss(batch(), eps=np.zeros(eps_shape))


def test_loss_without_rng_or_eps(model3):
    with pytest.raises(ValueError, match=r"^rng: "):
        model3.loss(batch())


def test_eps_with_nan_is_rejected(model3):
    eps = noise(3)
    eps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^eps: "):
        model3.loss(batch(), eps=eps)


def test_eps_as_a_list_is_a_type_error(model3):
    with pytest.raises(TypeError, match=r"^eps: "):
        model3.loss(batch(), eps=noise(3).tolist())


def test_numpy_generator_as_rng_is_rejected():
    model = tiny("bernoulli", samples=1)  # d = 3 = len((S, N, d))
    with pytest.raises((TypeError, ValueError), match=r"^rng: "):
        model.loss(batch(), rng=np.random.default_rng(0))


def test_numpy_generator_in_sample_is_rejected():
    model = tiny("gaussian", latent_dim=2)
    with pytest.raises((TypeError, ValueError), match=r"^rng: "):
        model.sample(3, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"samples": 0}, ValueError, r"^samples: expected a positive integer"),
    ({"samples": -1}, ValueError, r"^samples: "),
    ({"samples": 1.5}, ValueError, r"^samples: "),
    ({"samples": True}, ValueError, r"^samples: "),
    ({"decoder": "poisson"}, ValueError, r"^decoder: expected one of bernoulli, gaussian"),
    ({"decoder": "Gaussian"}, ValueError, r"^decoder: "),
    ({"backend": "torch"}, ValueError, r"^backend: expected one of"),
    ({"dtype": "float16"}, ValueError, r"^dtype: expected one of"),
    ({"beta": -0.1}, ValueError, r"^beta: expected a finite number >= 0"),
    ({"beta": float("nan")}, ValueError, r"^beta: "),
    ({"beta": float("inf")}, ValueError, r"^beta: "),
    ({"beta": "1"}, ValueError, r"^beta: "),
    ({"input_shift": float("nan")}, ValueError, r"^input_shift: "),
    ({"input_dim": 0}, ValueError, r"^input_dim: "),
    ({"latent_dim": 0}, ValueError, r"^latent_dim: "),
    ({"latent_dim": 2.0}, ValueError, r"^latent_dim: "),
    ({"hidden": (5, 0)}, ValueError, r"^hidden: "),
    ({"activation": "gelu"}, ValueError, r"^activation: "),
    ({"decoder": "bernoulli", "variance": 0.1}, ValueError, r"^variance: only used by"),
    ({"decoder": "gaussian", "variance": 0.1}, ValueError, r"^variance: only used by"),
    ({"decoder": "gaussian-fixed", "variance": 0.0}, ValueError, r"^variance: expected"),
    ({"decoder": "gaussian-fixed", "variance": -1.0}, ValueError, r"^variance: expected"),
])
def test_bad_configuration(kwargs, error, pattern):
    kwargs = {"input_dim": C, "hidden": (H,), "latent_dim": D, **kwargs}
    with pytest.raises(error, match=pattern):
        VAE(**kwargs)


@pytest.mark.parametrize("call, pattern", [
    (lambda m: m.log_likelihood(batch(), 0, m.backend.rng(0)), r"^num_samples: "),
    (lambda m: m.log_likelihood(batch(), 5, m.backend.rng(0), chunk_size=0), r"^chunk_size: "),
    (lambda m: m.sample(0, m.backend.rng(0)), r"^n: "),
    (lambda m: m.sample(2.5, m.backend.rng(0)), r"^n: "),
])
def test_bad_evaluation_arguments(model3, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(model3)


def test_backward_before_loss_and_twice_is_a_runtime_error():
    model = tiny()
    with pytest.raises(RuntimeError, match="before VAE.loss"):
        model.backward()
    model.loss(batch(), eps=noise(1))
    model.backward()
    with pytest.raises(RuntimeError, match="before VAE.loss"):
        model.backward()


# ------------------------------------------------------------------------------------------
# Parameters: state_dict round trip, dtypes


def test_state_dict_round_trip():
    a, b = tiny("gaussian", seed=1), tiny("gaussian", seed=2)
    x, eps = batch(), noise(1)
    assert float(a.loss(x, eps=eps).loss) != float(b.loss(x, eps=eps).loss)
    state = a.state_dict()
    assert set(state) == set(a.parameters.names)
    assert all(type(v) is np.ndarray for v in state.values())
    b.load_state_dict(state)
    assert float(a.loss(x, eps=eps).loss) == float(b.loss(x, eps=eps).loss)
    # state_dict returns copies: editing them does not touch the model
    state["decoder.linear0.W"][...] = 0.0
    assert np.any(a.state_dict()["decoder.linear0.W"] != 0.0)


def test_load_state_dict_writes_through_to_the_layers():
    model = tiny("bernoulli")
    state = {name: np.full(shape, 0.01 * i) for i, (name, shape) in
             enumerate(model.parameters.shapes.items())}
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.encoder.linears[0].params["W"], 0.0)
    np.testing.assert_array_equal(model.decoder.linears[1].params["b"], 0.07)
    assert model.num_parameters == sum(v.size for v in state.values())


@pytest.mark.parametrize("mutate, error, pattern", [
    (lambda s: s.pop("encoder.linear0.b"), ValueError, r"^arrays: parameter names differ"),
    (lambda s: s.update({"extra.W": np.zeros(2)}), ValueError, r"^arrays: parameter names differ"),
    (lambda s: s.update({"encoder.linear0.W": np.zeros((C, H + 1))}), ValueError,
     r"^arrays\['encoder.linear0.W'\]: expected shape"),
    (lambda s: s.update({"encoder.linear0.W": np.zeros((H, C))}), ValueError,
     r"^arrays\['encoder.linear0.W'\]: expected shape"),
    (lambda s: s.update({"decoder.linear0.b": np.zeros(H, dtype=np.int64)}), TypeError,
     r"^arrays\['decoder.linear0.b'\]: expected a floating dtype"),
    (lambda s: s.update({"decoder.linear0.b": np.full(H, np.nan)}), ValueError,
     r"^arrays\['decoder.linear0.b'\]: contains NaN"),
])
def test_load_state_dict_rejects_mismatches(mutate, error, pattern):
    model = tiny("bernoulli")
    before = model.state_dict()
    state = model.state_dict()
    mutate(state)
    with pytest.raises(error, match=pattern):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():  # nothing half-loaded
        np.testing.assert_array_equal(value, before[name])


def test_float32_model_runs_in_float32_and_gradcheck_refuses_it():
    model = tiny("gaussian", dtype="float32")
    terms = model.loss(batch(), eps=noise(1))  # float64 data is cast to the model dtype
    assert terms.loss.dtype == np.float32 and np.isfinite(float(terms.loss))
    model.backward()
    assert model.parameters.grad.dtype == np.float32
    reference = tiny("gaussian").loss(batch(), eps=noise(1))
    assert float(terms.loss) == pytest.approx(float(reference.loss), rel=1e-5)
    with pytest.raises(ValueError, match="float64"):
        gradcheck.check_vae(model, batch(), noise(1))


# ------------------------------------------------------------------------------------------
# One model: the op chooses its variant, a cache belongs to the backward that reads it


PATHS = ("numba", "numpy-only", "reference", "array_api_strict")


@pytest.fixture(params=PATHS)
def every_path(request, monkeypatch):
    """Each way a step can run: NumPy with its compiled kernels, NumPy's fast variants
    without numba, the readable reference, and array-api-strict (reference only)."""
    import vae_np.backend as backend_module
    from vae_np.backend import use_fast_paths
    if request.param == "numba":
        pytest.importorskip("numba")
        yield "numpy"
    elif request.param == "numpy-only":
        monkeypatch.setattr(backend_module, "_numba_module", None)
        yield "numpy"
    elif request.param == "reference":
        with use_fast_paths(False):
            yield "numpy"
    else:
        yield "array_api_strict"


def gradients(model, x, eps):
    model.loss(x, eps=eps)
    model.backward()
    return model.backend.to_numpy(model.parameters.grad).copy()


@pytest.mark.parametrize("decoder", DECODERS)
def test_inference_between_loss_and_backward_changes_no_gradient(decoder, every_path):
    """encode, decode, reconstruct, sample and log_likelihood between loss() and
    backward(), with other batch sizes, leave the training step's gradients exact."""
    model = tiny(decoder, samples=2, backend=every_path)
    x, eps = model.backend.asarray(batch()), model.backend.asarray(noise(2))
    clean = gradients(model, x, eps)
    other = model.backend.asarray(batch(n=7, seed=4))
    rng = model.backend.rng(3)
    model.loss(x, eps=eps)
    model.encode(other)
    model.decode(model.backend.asarray(np.ones((3, D))))
    model.reconstruct(other)
    model.sample(2, rng)
    model.log_likelihood(other, num_samples=3, rng=rng)
    model.decoder_outputs(model.backend.asarray(np.zeros((9, D))))
    model.backward()
    assert np.array_equal(model.backend.to_numpy(model.parameters.grad), clean)


def test_an_inference_call_keeps_the_layer_caches(np64):
    from vae_np.layers import MLP
    mlp = MLP((4, 5, 3), np64, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((6, 4))
    dout = np.random.default_rng(2).standard_normal((6, 3))
    mlp.forward(x)
    expected = mlp.backward(dout).copy()
    mlp.forward(x)
    mlp(np.ones((2, 4)))                     # inference, another batch size
    mlp.linears[0](np.ones((9, 4)))
    assert np.array_equal(mlp.backward(dout), expected)


def test_a_failed_loss_leaves_nothing_to_backward():
    model = tiny()
    x = batch()
    model.loss(x, eps=noise(1))
    with pytest.raises(ValueError):
        model.loss(x, eps=noise(2))          # the wrong shape for S = 1
    model.loss(x, eps=noise(1))
    model.backward()
    with pytest.raises(RuntimeError, match="before VAE.loss"):
        model.backward()


def test_a_linear_subclass_runs_its_own_code_on_every_path(every_path):
    """The fused MLP must not bypass a subclass: a Linear that doubles its output changes
    the loss, and its gradients still pass the check, on the fast path and the reference."""
    from vae_np.layers import Linear

    class DoubledLinear(Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

        def backward(self, dout, input_grad=True):
            return super().backward(2.0 * dout, input_grad=input_grad)

    model = tiny(backend=every_path)
    x, eps = model.backend.asarray(batch()), model.backend.asarray(noise(1))
    plain = float(model.loss(x, eps=eps).loss)
    first = model.encoder.layers[2]              # the encoder's second Linear
    doubled = DoubledLinear.__new__(DoubledLinear)
    doubled.__dict__.update(first.__dict__)
    model.encoder.layers[2] = model.encoder.linears[1] = doubled
    assert float(model.loss(x, eps=eps).loss) != plain
    model.backward()
    assert gradcheck.check_vae(model, x, eps, max_entries=4).passed


def test_patching_a_function_of_the_model_reaches_the_default_path(monkeypatch):
    """VAE.backward is one method: a function it calls, patched in vae_np.model, is seen
    with the fast paths on (the default)."""
    model = tiny()
    x, eps = batch(), noise(1)
    clean = gradients(model, x, eps)
    calls = []

    def doubled(dz, logvar, eps):
        calls.append(1)
        dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
        return 2.0 * dmu, dlogvar

    monkeypatch.setattr(model_module, "reparameterize_backward", doubled)
    assert model.backend.fast
    patched = gradients(model, x, eps)
    assert calls and not np.array_equal(patched, clean)


# ------------------------------------------------------------------------------------------
# Defects found by trying the library as a hostile user would


def test_bernoulli_targets_outside_the_unit_interval_are_refused():
    model = tiny("bernoulli")
    for bad in (batch() * 2.0, batch() - 0.5):
        with pytest.raises(ValueError, match=r"x: the bernoulli decoder needs targets in \[0, 1\]"):
            model.loss(bad, eps=noise(1))
    model.loss(np.round(batch()), eps=noise(1))            # 0 and 1 themselves are fine
    tiny("gaussian").loss(batch() * 3.0 - 1.0, eps=noise(1))  # real-valued data: fine there


@pytest.mark.parametrize("chunk_size", (1, 2, None))
def test_log_likelihood_is_minus_infinity_where_every_weight_is_zero(chunk_size):
    """Every importance weight -inf (a Gaussian decoder whose variance underflows to 0 at a
    target it misses) gives ln p(x) = -inf, not the NaN of -inf - -inf."""
    model = tiny("gaussian")
    state = model.state_dict()
    state["decoder.linear1.W"][...] = 0.0
    state["decoder.linear1.b"][...] = np.concatenate([np.full(C, 50.0), np.full(C, -1e4)])
    model.load_state_dict(state)          # mu_x = 50 everywhere, variance exp(-1e4) = 0
    with np.errstate(all="ignore"):
        values = model.log_likelihood(batch(), num_samples=3, rng=model.backend.rng(0),
                                      chunk_size=chunk_size)
    assert np.all(values == -np.inf), values


def test_a_loss_that_overflows_is_a_clear_error():
    model = tiny()
    state = model.state_dict()
    state["encoder.linear1.b"][D:] = 800.0          # logvar ~ 800: exp overflows
    model.load_state_dict(state)
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError,
                                                  match="not finite.*largest encoder logvar"):
        model.loss(batch(), eps=noise(1))
    with pytest.raises(RuntimeError):
        model.backward()                            # nothing was kept for it


def test_load_state_dict_checks_finiteness_in_the_model_dtype():
    model = VAE(6, (5,), 2, dtype="float32")
    before = model.parameters.data.copy()
    state = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    state["decoder.linear0.W"][0, 0] = 1e300          # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"decoder.linear0.W.*too large for float32"):
        model.load_state_dict(state)
    assert np.array_equal(model.parameters.data, before)   # nothing half-loaded


@pytest.mark.parametrize("t, message", [(-5, "integer >= 0"), (2.7, "integer >= 0"),
                                        (float("nan"), "integer >= 0"), ("3", "integer >= 0")])
def test_adam_refuses_a_bad_step_count(t, message):
    from vae_np import Adam
    model = tiny()
    opt = Adam(model.parameters)
    state = opt.state_dict()
    state["t"] = t
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert opt.t == 0


@pytest.mark.parametrize("name, value, message", [("m", np.nan, "NaN or inf"),
                                                  ("v", np.inf, "NaN or inf"),
                                                  ("v", -1e-3, "cannot be negative")])
def test_adam_refuses_bad_moments(name, value, message):
    from vae_np import Adam
    model = tiny()
    opt = Adam(model.parameters)
    state = opt.state_dict()
    state[name][3] = value
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert not np.any(opt.m) and not np.any(opt.v)
    state = opt.state_dict()
    state["t"] = np.int64(7)
    opt.load_state_dict(state)                      # a good state still loads
    assert opt.t == 7


def test_clear_messages_for_common_mistakes(np64):
    model = tiny()
    with pytest.raises(TypeError, match=r"rng: expected an RNG of the model's backend "
                                        r"\(numpy/float64\).*got an RNG of numpy/float32"):
        model.sample(2, get_backend("numpy", "float32").rng(0))
    with pytest.raises(TypeError, match=r"got numpy.random._generator.Generator"):
        model.sample(2, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"hidden: expected a sequence of layer widths"):
        VAE(4, hidden=8, latent_dim=2)
    with pytest.raises(ValueError, match=r"seed: expected an integer >= 0, got -1"):
        VAE(4, (3,), 2, seed=-1)


def test_gradient_checks_refuse_settings_that_check_nothing():
    model = tiny()
    x, eps = batch(), noise(1)
    with pytest.raises(ValueError, match="h: expected a finite number > 0"):
        gradcheck.check_vae(model, x, eps, h=0)
    with pytest.raises(ValueError, match="max_entries: expected an integer >= 1"):
        gradcheck.check_vae(model, x, eps, max_entries=0)
    with pytest.raises(ValueError, match="h: expected"):
        gradcheck.check_vae_directional(model, x, eps, h=float("nan"))
    with pytest.raises(ValueError, match="path: expected one of"):
        gradcheck.check_vae(model, x, eps, path="numba")
    strict = tiny(backend="array_api_strict")
    with pytest.raises(ValueError, match="no fast path"):
        gradcheck.check_vae(strict, strict.backend.asarray(x), strict.backend.asarray(eps),
                            path="fast")
    assert gradcheck.check_vae(strict, strict.backend.asarray(x), strict.backend.asarray(eps),
                               max_entries=2).path == "reference"
