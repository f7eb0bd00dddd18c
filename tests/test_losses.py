"""vae_np.losses (and the stable primitives of vae_np.ops): values against scipy.stats,
explicit formulas and Monte-Carlo estimates; gradients against central differences;
reductions; extreme inputs; bad input.

Gradient tolerance: vae_np.gradcheck.DEFAULT_TOLERANCE = 1e-6 (norm-wise relative error).
These losses are smooth, so central differences with h = 1e-6 in float64 agree with a right
gradient to ~1e-10; a gradient missing a factor 1/2 is off by ~30%.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, special, stats

from vae_np import gradcheck, losses, ops
from vae_np.losses import (
    bernoulli_nll,
    gaussian_fixed_nll,
    gaussian_nll,
    kl_diagonal_gaussians,
    kl_standard_normal,
)

TOL = gradcheck.DEFAULT_TOLERANCE
N, D = 4, 5


def rand(shape, seed, scale=1.0, low=None, high=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, high, shape)
    return rng.standard_normal(shape) * scale


def on(backend, *arrays):
    return [backend.asarray(a) for a in arrays]


# ------------------------------------------------------------------------------------------
# Gradient checks (float64, every input that has a gradient, numpy and array-api-strict)


def _loss_cases(backend):
    mu, logvar = on(backend, rand((N, D), 1), rand((N, D), 2, 0.7))
    mu_p, logvar_p = on(backend, rand((N, D), 3), rand((N, D), 4, 0.7))
    x01 = rand((N, D), 5, low=0.0, high=1.0)
    binary = (rand((N, D), 6, low=0.0, high=1.0) < 0.5).astype(np.float64)
    x, mu_x, logvar_x, logits = on(backend, rand((N, D), 7), rand((N, D), 8),
                                   rand((N, D), 9, 0.5), rand((N, D), 10, 3.0))
    return {
        "kl_standard_normal": (kl_standard_normal, {"mu": mu, "logvar": logvar},
                               ("mu", "logvar"), {}),
        "kl_diagonal_gaussians": (kl_diagonal_gaussians,
                                  {"mu_q": mu, "logvar_q": logvar, "mu_p": mu_p,
                                   "logvar_p": logvar_p},
                                  ("mu_q", "logvar_q", "mu_p", "logvar_p"), {}),
        "gaussian_nll": (gaussian_nll, {"x": x, "mu": mu_x, "logvar": logvar_x},
                         ("mu", "logvar"), {}),
        "gaussian_fixed_nll": (gaussian_fixed_nll, {"x": x, "mu": mu_x}, ("mu",),
                               {"variance": 0.3}),
        "bernoulli_nll (binary)": (bernoulli_nll,
                                   {"x": backend.asarray(binary), "logits": logits},
                                   ("logits",), {}),
        "bernoulli_nll ([0, 1])": (bernoulli_nll, {"x": backend.asarray(x01), "logits": logits},
                                   ("logits",), {}),
    }


LOSS_CASES = ["kl_standard_normal", "kl_diagonal_gaussians", "gaussian_nll",
              "gaussian_fixed_nll", "bernoulli_nll (binary)", "bernoulli_nll ([0, 1])"]


@pytest.mark.parametrize("case", LOSS_CASES)
def test_loss_gradients(case, backend, record_check):
    fn, inputs, wrt, kwargs = _loss_cases(backend)[case]
    report = gradcheck.check_loss(fn, inputs, wrt=wrt, **kwargs)
    record_check(f"losses ({backend.name})", report.max_rel_error)
    assert report.passed, report.table()
    assert [row.name for row in report.rows] == list(wrt)


@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_match_each_reduction(case, reduction, np64, record_check):
    """check_loss uses reduction="sum"; here the returned gradients of "mean" (divided by
    N) and "none" (each example's own gradient = gradient of the sum) are checked against
    central differences of the mean / sum of the returned values."""
    fn, inputs, wrt, kwargs = _loss_cases(np64)[case]
    grads = fn(**inputs, reduction=reduction, **kwargs)[1:]

    def f():
        value = fn(**inputs, reduction=reduction, **kwargs)[0]
        return float(np.sum(value))

    report = gradcheck.check_gradients(f, {k: inputs[k] for k in wrt}, dict(zip(wrt, grads)))
    record_check("losses (numpy)", report.max_rel_error)
    assert report.passed, report.table()


@pytest.mark.parametrize("case", LOSS_CASES)
def test_reductions_are_consistent(case, np64):
    fn, inputs, wrt, kwargs = _loss_cases(np64)[case]
    none, *g_none = fn(**inputs, reduction="none", **kwargs)
    total, *g_sum = fn(**inputs, reduction="sum", **kwargs)
    mean, *g_mean = fn(**inputs, reduction="mean", **kwargs)
    assert none.shape == (N,) and np.ndim(total) == 0 and np.ndim(mean) == 0
    assert total == pytest.approx(none.sum(), rel=1e-14)
    assert mean == pytest.approx(none.mean(), rel=1e-14)
    for a, b, c in zip(g_none, g_sum, g_mean):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(c, a / N, rtol=1e-15)
    assert fn(**inputs, **kwargs)[0].shape == (N,)  # default is "none"


def test_unknown_reduction(np64):
    with pytest.raises(ValueError, match=r"^reduction: expected one of"):
        kl_standard_normal(np.zeros((1, 2)), np.zeros((1, 2)), reduction="avg")


# A deliberately wrong loss gradient must fail the same check.


def kl_missing_half(mu, logvar, reduction="none"):
    value, dmu, dlogvar = kl_standard_normal(mu, logvar, reduction)
    return value, dmu, 2.0 * dlogvar  # exp(logvar) - 1: the 1/2 dropped


def bernoulli_sign_flip(x, logits, reduction="none"):
    value, dlogits = bernoulli_nll(x, logits, reduction)
    return value, -dlogits  # x - sigmoid(l): the sign flipped


def gaussian_missing_half(x, mu, logvar, reduction="none"):
    value, dmu, dlogvar = gaussian_nll(x, mu, logvar, reduction)
    return value, dmu, 2.0 * dlogvar


@pytest.mark.parametrize("wrong, case", [
    (kl_missing_half, "kl_standard_normal"),
    (bernoulli_sign_flip, "bernoulli_nll ([0, 1])"),
    (gaussian_missing_half, "gaussian_nll"),
])
def test_wrong_loss_gradient_fails(wrong, case, np64, record_check):
    _, inputs, wrt, kwargs = _loss_cases(np64)[case]
    report = gradcheck.check_loss(wrong, inputs, wrt=wrt, **kwargs)
    record_check("losses", report.max_rel_error, wrong=True)
    assert not report.passed
    assert report.max_rel_error > 1e3 * TOL


# ------------------------------------------------------------------------------------------
# Values against scipy.stats and explicit formulas


def test_gaussian_nll_is_minus_scipy_logpdf(backend):
    x, mu, logvar = rand((N, D), 11), rand((N, D), 12), rand((N, D), 13)
    value = backend.to_numpy(gaussian_nll(*on(backend, x, mu, logvar))[0])
    expected = -stats.norm.logpdf(x, loc=mu, scale=np.sqrt(np.exp(logvar))).sum(axis=1)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


@pytest.mark.parametrize("variance", [1e-3, 0.098, 1.0, 7])
def test_gaussian_fixed_nll_is_minus_scipy_logpdf(variance, backend):
    x, mu = rand((N, D), 14), rand((N, D), 15)
    value = backend.to_numpy(gaussian_fixed_nll(*on(backend, x, mu), variance)[0])
    expected = -stats.norm.logpdf(x, loc=mu, scale=math.sqrt(variance)).sum(axis=1)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_fixed_variance_is_learned_variance_with_constant_logvar(np64):
    x, mu = rand((N, D), 16), rand((N, D), 17)
    lam = 0.098
    fixed, dmu_fixed = gaussian_fixed_nll(x, mu, lam)
    learned, dmu_learned, _ = gaussian_nll(x, mu, np.full((N, D), math.log(lam)))
    np.testing.assert_allclose(fixed, learned, rtol=1e-12)
    np.testing.assert_allclose(dmu_fixed, dmu_learned, rtol=1e-12)


def test_popular_squared_error_loss_is_lambda_times_the_fixed_nll(np64):
    """1/2 sum (x - mu)^2 + lambda KL = lambda * (NLL_lambda + KL) - constant."""
    x, mu = rand((N, D), 18), rand((N, D), 19)
    lam = 0.00025 * 784 / 2
    nll = gaussian_fixed_nll(x, mu, lam)[0]
    constant = 0.5 * D * math.log(2 * math.pi * lam)
    np.testing.assert_allclose(lam * (nll - constant), 0.5 * ((x - mu) ** 2).sum(axis=1),
                               rtol=1e-12)


def test_bernoulli_nll_binary_is_minus_scipy_logpmf(backend):
    logits = rand((N, D), 20, 4.0)
    x = (rand((N, D), 21, low=0, high=1) < special.expit(logits)).astype(np.float64)
    value = backend.to_numpy(bernoulli_nll(*on(backend, x, logits))[0])
    expected = -stats.bernoulli.logpmf(x, special.expit(logits)).sum(axis=1)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_bernoulli_nll_is_the_cross_entropy_for_intensities(backend):
    x, logits = rand((N, D), 22, low=0, high=1), rand((N, D), 23, 3.0)
    p = special.expit(logits)
    expected = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(axis=1)
    value = backend.to_numpy(bernoulli_nll(*on(backend, x, logits))[0])
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    # and its gradient is sigmoid(l) - x
    np.testing.assert_allclose(backend.to_numpy(bernoulli_nll(*on(backend, x, logits))[1]),
                               p - x, rtol=1e-12, atol=1e-15)


def _kl_matrix_form(mu_q, var_q, mu_p, var_p):
    """Wikipedia's KL between multivariate normals, with full matrices (one example)."""
    cov_q, cov_p = np.diag(var_q), np.diag(var_p)
    inv_p = np.linalg.inv(cov_p)
    diff = mu_p - mu_q
    d = len(mu_q)
    return 0.5 * (np.trace(inv_p @ cov_q) + diff @ inv_p @ diff - d
                  + np.log(np.linalg.det(cov_p) / np.linalg.det(cov_q)))


def test_kl_diagonal_matches_the_matrix_formula(backend):
    mu_q, lv_q, mu_p, lv_p = rand((N, D), 24), rand((N, D), 25), rand((N, D), 26), rand((N, D), 27)
    value = backend.to_numpy(kl_diagonal_gaussians(*on(backend, mu_q, lv_q, mu_p, lv_p))[0])
    expected = [_kl_matrix_form(mu_q[n], np.exp(lv_q[n]), mu_p[n], np.exp(lv_p[n]))
                for n in range(N)]
    np.testing.assert_allclose(value, expected, rtol=1e-11)


def test_kl_standard_normal_matches_numerical_integration():
    """KL = integral q ln(q / p) dz, one dimension at a time, by adaptive quadrature."""
    mu, logvar = np.array([[0.3, -1.2, 2.0]]), np.array([[-0.5, 0.8, -2.0]])
    value = float(kl_standard_normal(mu, logvar)[0][0])
    total = 0.0
    for m, lv in zip(mu[0], logvar[0]):
        q = stats.norm(m, math.exp(lv / 2))
        total += integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - stats.norm.logpdf(z)),
                                m - 40 * q.std(), m + 40 * q.std(), limit=200)[0]
    assert value == pytest.approx(total, rel=1e-9)


def test_kl_standard_normal_matches_monte_carlo():
    """KL = E_q[ln q(z) - ln p(z)], estimated from n = 200,000 draws (fixed seed); the
    closed form must lie within 5 standard errors of the estimate."""
    mu = np.array([[0.5, -1.0, 0.0, 2.0], [0.0, 0.1, -0.3, 0.7]])
    logvar = np.array([[0.0, -1.0, 1.0, 0.3], [-2.0, 0.5, 0.0, -0.4]])
    closed = kl_standard_normal(mu, logvar)[0]
    rng = np.random.default_rng(12345)
    n = 200_000
    std = np.exp(logvar / 2)
    z = mu + std * rng.standard_normal((n, *mu.shape))
    log_ratio = (stats.norm.logpdf(z, mu, std) - stats.norm.logpdf(z)).sum(axis=2)  # (n, N)
    estimate, se = log_ratio.mean(axis=0), log_ratio.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(closed - estimate) < 5 * se), (closed, estimate, se)
    assert np.all(se < 0.01 * closed)  # the check is sharp enough to see a 1/2 missing


def test_kl_diagonal_matches_monte_carlo():
    mu_q, lv_q = np.array([[0.5, -1.0, 0.2]]), np.array([[0.3, -0.7, 0.0]])
    mu_p, lv_p = np.array([[-0.2, 0.4, 1.0]]), np.array([[0.5, 0.2, -0.6]])
    closed = float(kl_diagonal_gaussians(mu_q, lv_q, mu_p, lv_p)[0][0])
    n = 200_000
    std_q, std_p = np.exp(lv_q / 2), np.exp(lv_p / 2)
    z = mu_q + std_q * np.random.default_rng(54321).standard_normal((n, 3))
    log_ratio = (stats.norm.logpdf(z, mu_q, std_q) - stats.norm.logpdf(z, mu_p, std_p)).sum(axis=1)
    assert abs(closed - log_ratio.mean()) < 5 * log_ratio.std() / math.sqrt(n)


def test_kl_diagonal_with_standard_normal_prior_is_kl_standard_normal(backend):
    mu, lv = on(backend, rand((N, D), 28), rand((N, D), 29))
    zeros = backend.zeros((N, D))
    general = kl_diagonal_gaussians(mu, lv, zeros, zeros)
    special_case = kl_standard_normal(mu, lv)
    for a, b in zip(general[:3], special_case):
        np.testing.assert_allclose(backend.to_numpy(a), backend.to_numpy(b), rtol=1e-13, atol=1e-15)


def test_kl_from_standard_normal_to_a_gaussian(backend):
    """KL(N(0, I) || N(mu, diag sigma^2)) = 1/2 sum (ln sigma^2 + (1 + mu^2) / sigma^2 - 1)."""
    mu_p, lv_p = rand((N, D), 30), rand((N, D), 31)
    zeros = np.zeros((N, D))
    value = backend.to_numpy(kl_diagonal_gaussians(*on(backend, zeros, zeros, mu_p, lv_p))[0])
    expected = 0.5 * (lv_p + (1 + mu_p ** 2) / np.exp(lv_p) - 1).sum(axis=1)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_kl_is_zero_exactly_at_the_prior_and_between_equal_gaussians(backend):
    zeros = backend.zeros((3, 4))
    assert np.all(backend.to_numpy(kl_standard_normal(zeros, zeros)[0]) == 0.0)
    mu, lv = on(backend, rand((3, 4), 32), rand((3, 4), 33))
    assert np.all(backend.to_numpy(kl_diagonal_gaussians(mu, lv, mu, lv)[0]) == 0.0)
    # and the gradient vanishes there: the prior is the minimum
    _, dmu, dlv = kl_standard_normal(zeros, zeros)
    assert np.all(backend.to_numpy(dmu) == 0.0) and np.all(backend.to_numpy(dlv) == 0.0)


def test_kl_is_never_negative_for_tiny_logvar():
    logvar = np.logspace(-18, -15, 400)[None, :].T  # (400, 1): one example per value
    kl = kl_standard_normal(np.zeros_like(logvar), logvar)[0]
    assert np.all(kl >= 0.0), kl.min()


# ------------------------------------------------------------------------------------------
# Extreme inputs: finite values and gradients, and no floating-point warnings


@pytest.fixture
def fp_errors_raise():
    """Overflow, invalid operations (inf - inf, 0 * inf) and division by zero raise; any
    warning is an error. Underflow to 0 (exp(-1e4)) is the intended, stable behaviour."""
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"), \
            warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


EXTREME_LOGITS = [-1e30, -1e4, -745.0, -40.0, 0.0, 40.0, 745.0, 1e4, 1e30]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bernoulli_nll_extreme_logits(dtype, fp_errors_raise):
    logits = np.array([EXTREME_LOGITS] * 3, dtype=dtype)
    x = np.array([[0.0] * 9, [1.0] * 9, [0.25] * 9], dtype=dtype)
    nll, grad = bernoulli_nll(x, logits, reduction="none")
    assert np.all(np.isfinite(nll)) and np.all(np.isfinite(grad))
    assert nll.dtype == np.dtype(dtype) and grad.dtype == np.dtype(dtype)
    # Exact limits: softplus(l) - x l -> max(l, 0) - x l for |l| >> 1.
    big = np.abs(logits[0]) >= 1e4
    l64 = logits[0].astype(np.float64)[big]
    for row, target in enumerate((0.0, 1.0, 0.25)):
        per_pixel, g = bernoulli_nll(x[row:row + 1, big], logits[row:row + 1, big])
        np.testing.assert_allclose(per_pixel[0], np.sum(np.maximum(l64, 0) - target * l64),
                                   rtol=1e-6)
        np.testing.assert_allclose(g[0], (l64 > 0) - target, atol=1e-7)


@pytest.mark.parametrize("dtype, bound", [("float64", 300.0), ("float32", 40.0)])
def test_gaussian_losses_extreme_logvar(dtype, bound, fp_errors_raise):
    """Variances from exp(-bound) to exp(bound) (1e-130 to 1e130 in float64): every value and
    gradient stays finite."""
    logvar = np.linspace(-bound, bound, 7, dtype=dtype)[None, :]
    mu = np.array([[-5.0, -1.0, 0.0, 0.5, 1.0, 3.0, 10.0]], dtype=dtype)
    x = np.zeros_like(mu)
    zero = np.zeros_like(mu)
    for out in (kl_standard_normal(mu, logvar), gaussian_nll(x, mu, logvar),
                kl_diagonal_gaussians(mu, logvar, zero, logvar[:, ::-1].copy()),
                kl_diagonal_gaussians(mu, logvar[:, ::-1].copy(), zero, logvar)):
        for array in out:
            assert np.all(np.isfinite(array)), out
            assert array.dtype == np.dtype(dtype)


def test_fixed_variance_extremes(fp_errors_raise):
    x, mu = np.zeros((1, 3)), np.array([[1e3, -1e3, 0.0]])
    for variance in (1e-100, 1e100):
        for array in gaussian_fixed_nll(x, mu, variance):
            assert np.all(np.isfinite(array))


# ------------------------------------------------------------------------------------------
# Bad input: shapes are never broadcast; names in the message


@pytest.mark.parametrize("call, name", [
    (lambda: kl_standard_normal(np.zeros((2, 3)), np.zeros((2, 4))), "logvar"),
    (lambda: kl_standard_normal(np.zeros((2, 3)), np.zeros((2, 1))), "logvar"),
    (lambda: kl_standard_normal(np.zeros((2, 3)), np.zeros((3,))), "logvar"),
    (lambda: kl_standard_normal(np.zeros(3), np.zeros(3)), "mu"),
    (lambda: kl_standard_normal(np.zeros((1, 2, 3)), np.zeros((1, 2, 3))), "mu"),
    (lambda: kl_diagonal_gaussians(*[np.zeros((2, 3))] * 2, np.zeros((1, 3)), np.zeros((2, 3))),
     "mu_p"),
    (lambda: kl_diagonal_gaussians(*[np.zeros((2, 3))] * 3, np.zeros((2, 1))), "logvar_p"),
    (lambda: kl_diagonal_gaussians(np.zeros((2, 3)), np.zeros((2, 2)), *[np.zeros((2, 3))] * 2),
     "logvar_q"),
    (lambda: gaussian_nll(np.zeros((2, 784)), np.zeros((2, 783)), np.zeros((2, 784))), "mu"),
    (lambda: gaussian_nll(np.zeros((2, 784)), np.zeros((2, 784)), np.zeros((1, 784))), "logvar"),
    (lambda: gaussian_fixed_nll(np.zeros((2, 784)), np.zeros((2, 783)), 1.0), "mu"),
    (lambda: bernoulli_nll(np.zeros((2, 784)), np.zeros((2, 783))), "logits"),
    (lambda: bernoulli_nll(np.zeros((2, 784)), np.zeros((1, 784))), "logits"),
    (lambda: bernoulli_nll(np.zeros((784,)), np.zeros((784,))), "x"),
])
def test_shape_mismatch_is_a_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}: expected "):
        call()


@pytest.mark.parametrize("variance", [0, 0.0, -1.0, float("nan"), float("inf"), True, "1", None])
def test_invalid_variance(variance):
    with pytest.raises(ValueError, match=r"^variance: expected a finite number > 0"):
        gaussian_fixed_nll(np.zeros((1, 2)), np.zeros((1, 2)), variance)


# ------------------------------------------------------------------------------------------
# The stable primitives in vae_np.ops


def test_sigmoid_and_softplus_match_scipy(backend, fp_errors_raise):
    x = np.concatenate([np.linspace(-30, 30, 121), [-1e300, -1e30, -1e4, 1e4, 1e30, 1e300]])
    xb = backend.asarray(x)
    sig = backend.to_numpy(ops.sigmoid(backend.xp, xb))
    soft = backend.to_numpy(ops.softplus(backend.xp, xb))
    # sigmoid via tanh is accurate in absolute terms (what dlogits = sigmoid - x needs): to
    # 2 ulps of 1, though not in relative terms far in the left tail.
    np.testing.assert_allclose(sig, special.expit(x), rtol=0, atol=4.5e-16)
    np.testing.assert_allclose(soft, np.logaddexp(0.0, x), rtol=1e-15, atol=0)


def test_logsumexp_matches_scipy(backend, fp_errors_raise):
    a = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0], [-1e4, -1e4 + 1, -1e4 - 1],
                  [-np.inf, 0.0, -np.inf]])
    out = backend.to_numpy(ops.logsumexp(backend.xp, backend.asarray(a), axis=1))
    np.testing.assert_allclose(out, special.logsumexp(a, axis=1), rtol=1e-15)
    out0 = backend.to_numpy(ops.logsumexp(backend.xp, backend.asarray(a[:3]), axis=0))
    np.testing.assert_allclose(out0, special.logsumexp(a[:3], axis=0), rtol=1e-15)


def test_logsumexp_of_an_all_minus_inf_row_is_minus_inf(np64):
    # ln(0) = -inf is the right answer for that row (numpy flags it as a divide); what must
    # not happen is inf - inf = nan (invalid).
    with np.errstate(invalid="raise", divide="ignore"):
        out = ops.logsumexp(np64.xp, np.array([[-np.inf, -np.inf], [0.0, 0.0]]), axis=1)
    assert out[0] == -np.inf and out[1] == pytest.approx(math.log(2))


def test_module_exposes_the_documented_reductions():
    assert losses.REDUCTIONS == ("none", "sum", "mean")


def test_bernoulli_grad_scale_multiplies_the_gradient_only(backend):
    """grad_scale is the gradient of grad_scale * nll (the model's 1 / (S N)), the values
    unscaled; NumPy scalars are refused: float32 * numpy.float64 would promote."""
    x, logits = rand((N, D), 24, low=0, high=1), rand((N, D), 25, 3.0)
    value, grad = bernoulli_nll(*on(backend, x, logits))
    scaled_value, scaled = bernoulli_nll(*on(backend, x, logits), grad_scale=0.125)
    np.testing.assert_array_equal(backend.to_numpy(scaled_value), backend.to_numpy(value))
    np.testing.assert_array_equal(backend.to_numpy(scaled), backend.to_numpy(grad) * 0.125)
    with pytest.raises(TypeError, match="grad_scale"):
        bernoulli_nll(*on(backend, x, logits), grad_scale=np.float64(0.5))
