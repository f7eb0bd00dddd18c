"""The decoder's likelihoods p(x | z): how decoder outputs become a distribution over x.

Each likelihood knows how many numbers the decoder must output per pixel, the negative
log-likelihood with its gradient with respect to those outputs (from ``vae_np.losses``),
the distribution's mean (the usual picture) and how to draw a true sample.
Shapes: M rows (examples times samples), c pixels; decoder outputs are (M, c * outputs).
"""

from __future__ import annotations

import math

from .backend import namespace_of
from .losses import bernoulli_nll, gaussian_fixed_nll, gaussian_nll
from .ops import sigmoid

LIKELIHOOD_NAMES = ("bernoulli", "gaussian", "gaussian-fixed")


class Bernoulli:
    """p(x | z) = prod_i Bernoulli(x_i | sigmoid(l_i)); the decoder outputs logits l."""

    name = "bernoulli"
    outputs_per_pixel = 1

    def nll(self, x, out):
        """(nll (M,), d nll / d out (M, c))."""
        return bernoulli_nll(x, out)

    def mean(self, xp, out):
        return sigmoid(xp, out)

    def sample(self, xp, out, rng):
        p = sigmoid(xp, out)
        return xp.astype(rng.uniform(p.shape) < p, p.dtype)


class Gaussian:
    """p(x | z) = N(x | mu_x, diag exp(logvar_x)); the decoder outputs [mu_x, logvar_x]."""

    name = "gaussian"
    outputs_per_pixel = 2

    def _split(self, out):
        c = out.shape[1] // 2
        return out[:, :c], out[:, c:]

    def nll(self, x, out):
        """(nll (M,), d nll / d out (M, 2c)): the mu and logvar gradients side by side."""
        mu, logvar = self._split(out)
        value, dmu, dlogvar = gaussian_nll(x, mu, logvar)
        return value, namespace_of(out).concat([dmu, dlogvar], axis=1)

    def mean(self, xp, out):
        return self._split(out)[0]

    def sample(self, xp, out, rng):
        mu, logvar = self._split(out)
        return mu + xp.exp(0.5 * logvar) * rng.normal(mu.shape)


class FixedGaussian:
    """p(x | z) = N(x | mu_x, lambda I) with a fixed variance lambda; outputs mu_x."""

    name = "gaussian-fixed"
    outputs_per_pixel = 1

    def __init__(self, variance: float):
        if not isinstance(variance, (int, float)) or isinstance(variance, bool) \
                or not math.isfinite(variance) or variance <= 0:
            raise ValueError(f"variance: expected a finite number > 0, got {variance!r}")
        self.variance = float(variance)

    def nll(self, x, out):
        return gaussian_fixed_nll(x, out, self.variance)

    def mean(self, xp, out):
        return out

    def sample(self, xp, out, rng):
        return out + math.sqrt(self.variance) * rng.normal(out.shape)


# The starting example's loss 1/2 sum (x - mu)^2 + lambda KL with lambda = 0.00025 * 784 / 2.
DEFAULT_FIXED_VARIANCE = 0.00025 * 784 / 2


def make_likelihood(name: str, variance: float | None = None):
    """A likelihood by name: ``bernoulli``, ``gaussian`` or ``gaussian-fixed``."""
    if name not in LIKELIHOOD_NAMES:
        raise ValueError(f"decoder: expected one of {', '.join(LIKELIHOOD_NAMES)}, got {name!r}")
    if name == "gaussian-fixed":
        return FixedGaussian(DEFAULT_FIXED_VARIANCE if variance is None else variance)
    if variance is not None:
        raise ValueError(f"variance: only used by the 'gaussian-fixed' decoder, got "
                         f"variance={variance!r} with decoder={name!r}")
    return Bernoulli() if name == "bernoulli" else Gaussian()
