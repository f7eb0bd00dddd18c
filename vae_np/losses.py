"""The VAE's loss terms in closed form, each with its gradient.

Every function returns ``(value, *grads)``:

- ``value`` has shape (N,) with ``reduction="none"`` (one number per example, in nats),
  or is a 0-d array with ``"sum"`` or ``"mean"`` (over the N examples);
- each gradient has the shape of the input it belongs to and is the derivative of the
  returned value (for ``"none"``: of the sum of the per-example values, which is each
  example's own gradient, since examples do not interact).

Rows are examples (N) and columns are dimensions (d latent or c pixel dimensions); the
value sums over columns. Derived in docs/04-losses.md, section "KL to the standard normal" on.
"""

from __future__ import annotations

import math

from .backend import fast_twin, namespace_of
from .ops import LOG_2PI, sigmoid, softplus
from .validation import check_number

REDUCTIONS = ("none", "sum", "mean")


def _check_pair(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} to match {name_a}, "
                         f"got {tuple(b.shape)}")
    if a.ndim != 2:
        raise ValueError(f"{name_a}: expected a 2-D (examples, dims) array, got shape "
                         f"{tuple(a.shape)}")


def _reduce(xp, per_example, grads, reduction):
    """Apply ``reduction`` to an (N,) value and rescale the gradients to match."""
    if reduction == "none":
        return (per_example, *grads)
    if reduction == "sum":
        return (xp.sum(per_example), *grads)
    if reduction == "mean":
        n = per_example.shape[0]
        return (xp.mean(per_example), *(g / n for g in grads))
    raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


@fast_twin
def kl_standard_normal(mu, logvar, reduction: str = "none"):
    """KL( N(mu, diag exp(logvar)) || N(0, I) ) and its gradient.

        KL            = 1/2 sum_i ( exp(logvar_i) - logvar_i - 1 + mu_i^2 )
        dKL/dmu_i     = mu_i
        dKL/dlogvar_i = 1/2 ( exp(logvar_i) - 1 )

    Args:
        mu, logvar: (N, d) posterior means and log-variances.
    Returns:
        (kl, dkl_dmu, dkl_dlogvar): kl (N,) nats (or reduced); grads (N, d).
    """
    _check_pair("mu", mu, "logvar", logvar)
    xp = namespace_of(mu, logvar)
    # exp(logvar) - 1 as expm1(logvar): for logvar near 0, exp(logvar) - 1 - logvar
    # cancels to round-off and can come out negative; expm1(t) - t >= 0 holds exactly.
    var_minus_one = xp.expm1(logvar)
    kl = 0.5 * xp.sum(var_minus_one - logvar + mu * mu, axis=1)
    return _reduce(xp, kl, (mu, 0.5 * var_minus_one), reduction)


def kl_diagonal_gaussians(mu_q, logvar_q, mu_p, logvar_p, reduction: str = "none"):
    """KL( N(mu_q, diag exp(logvar_q)) || N(mu_p, diag exp(logvar_p)) ) and its gradients.

        KL = 1/2 sum_i [ logvar_p,i - logvar_q,i - 1
                         + (exp(logvar_q,i) + (mu_q,i - mu_p,i)^2) / exp(logvar_p,i) ]
        dKL/dmu_q     =  (mu_q - mu_p) / exp(logvar_p)
        dKL/dlogvar_q =  1/2 ( exp(logvar_q - logvar_p) - 1 )
        dKL/dmu_p     = -(mu_q - mu_p) / exp(logvar_p)
        dKL/dlogvar_p =  1/2 ( 1 - (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) )

    With mu_p = 0 and logvar_p = 0 this is :func:`kl_standard_normal`; with mu_q = 0,
    logvar_q = 0 it is KL(N(0, I) || N(mu_p, Sigma_p)).

    Args:
        mu_q, logvar_q, mu_p, logvar_p: (N, d).
    Returns:
        (kl, dmu_q, dlogvar_q, dmu_p, dlogvar_p): kl (N,) nats (or reduced); grads (N, d).
    """
    for name, arr in (("logvar_q", logvar_q), ("mu_p", mu_p), ("logvar_p", logvar_p)):
        _check_pair("mu_q", mu_q, name, arr)
    xp = namespace_of(mu_q, logvar_q, mu_p, logvar_p)
    diff = mu_q - mu_p
    inv_var_p = xp.exp(-logvar_p)
    var_ratio = xp.exp(logvar_q - logvar_p)
    scaled_sq = diff * diff * inv_var_p
    kl = 0.5 * xp.sum(logvar_p - logvar_q - 1.0 + var_ratio + scaled_sq, axis=1)
    dmu_q = diff * inv_var_p
    grads = (dmu_q, 0.5 * (var_ratio - 1.0), -dmu_q, 0.5 * (1.0 - var_ratio - scaled_sq))
    return _reduce(xp, kl, grads, reduction)


def gaussian_nll(x, mu, logvar, reduction: str = "none"):
    """-ln N(x | mu, diag exp(logvar)), the Gaussian decoder with learned variance.

        -ln p = c/2 ln(2 pi) + 1/2 sum_i logvar_i + 1/2 sum_i (x_i - mu_i)^2 / exp(logvar_i)
        d/dmu_i     = (mu_i - x_i) / exp(logvar_i)
        d/dlogvar_i = 1/2 ( 1 - (x_i - mu_i)^2 / exp(logvar_i) )

    Args:
        x: (N, c) targets; mu, logvar: (N, c) decoder outputs.
    Returns:
        (nll, dmu, dlogvar): nll (N,) nats (or reduced); grads (N, c).
    """
    _check_pair("x", x, "mu", mu)
    _check_pair("x", x, "logvar", logvar)
    xp = namespace_of(x, mu, logvar)
    c = x.shape[1]
    inv_var = xp.exp(-logvar)
    diff = mu - x
    scaled_sq = diff * diff * inv_var
    nll = 0.5 * (c * LOG_2PI + xp.sum(logvar + scaled_sq, axis=1))
    return _reduce(xp, nll, (diff * inv_var, 0.5 * (1.0 - scaled_sq)), reduction)


def gaussian_fixed_nll(x, mu, variance: float, reduction: str = "none"):
    """-ln N(x | mu, variance I), the Gaussian decoder with a fixed variance lambda.

        -ln p = c/2 ln(2 pi lambda) + 1/(2 lambda) sum_i (x_i - mu_i)^2
        d/dmu_i = (mu_i - x_i) / lambda

    The popular loss 1/2 sum (x - mu)^2 + lambda KL is this likelihood times lambda,
    constant dropped (docs/04-losses.md, "Fixed-variance Gaussian").

    Args:
        x, mu: (N, c); variance: lambda > 0.
    Returns:
        (nll, dmu): nll (N,) nats (or reduced); dmu (N, c).
    """
    _check_pair("x", x, "mu", mu)
    variance = check_number("variance", variance, low=0.0, low_open=True)
    xp = namespace_of(x, mu)
    c = x.shape[1]
    diff = mu - x
    nll = 0.5 * c * math.log(2.0 * math.pi * variance) + xp.sum(diff * diff, axis=1) / (2.0 * variance)
    return _reduce(xp, nll, (diff / variance,), reduction)


@fast_twin
def bernoulli_nll(x, logits, reduction: str = "none", grad_scale: float = 1.0):
    """-ln Bernoulli(x | sigmoid(logits)), stable for logits of any size.

        -ln p = sum_i softplus(l_i) - x_i l_i
        d/dl_i = sigmoid(l_i) - x_i

    Written with softplus rather than -x ln s - (1 - x) ln(1 - s), which overflows exp and
    takes log(0) once |l| is large. Targets may be binary or intensities in [0, 1] (then
    it is the cross-entropy, the continuous relaxation used for non-binarised MNIST).

    Args:
        x: (N, c) targets in [0, 1]; logits: (N, c) decoder outputs.
        grad_scale: a number the gradient is multiplied by (the model's 1 / (S N), so that
            its twin scales in the same pass; 1 multiplies by nothing).
    Returns:
        (nll, dlogits): nll (N,) nats (or reduced); dlogits (N, c), times grad_scale.
    """
    _check_pair("x", x, "logits", logits)
    if type(grad_scale) not in (int, float):
        raise TypeError(f"grad_scale: expected a Python number, got {type(grad_scale).__name__}")
    xp = namespace_of(x, logits)
    nll = xp.sum(softplus(xp, logits) - x * logits, axis=1)
    grad = sigmoid(xp, logits) - x
    if grad_scale != 1:
        grad = grad * grad_scale
    return _reduce(xp, nll, (grad,), reduction)
