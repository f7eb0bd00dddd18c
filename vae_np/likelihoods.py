"""The decoder's likelihoods p(x | z): how decoder outputs become a distribution over x.

Each likelihood knows how many numbers the decoder must output per pixel, the negative
log-likelihood with its gradient with respect to those outputs (from ``vae_np.losses``),
the distribution's mean (the usual picture) and how to draw a true sample.
Shapes: M rows (examples times samples), c pixels; decoder outputs are (M, c * outputs).

``nll(x, out, grad_scale)`` returns the gradient of ``grad_scale * sum(nll)``: the model
passes its 1 / (S N) so that the gradient comes back as d loss / d out. ``grad_scale`` may
also be an (M,) array, one factor per row (the gradient of ``sum_r grad_scale_r nll_r``):
the importance-weighted objective weights each sample's row by its normalised importance
weight. :func:`scale_rows` applies such factors to a gradient already computed (the IWAE
weights depend on the nll values, so they are known only after ``nll`` has returned).
"""

from __future__ import annotations

import math

from .backend import namespace_of
from .losses import bernoulli_nll, gaussian_fixed_nll, gaussian_nll
from .ops import sigmoid
from .validation import check_number

LIKELIHOOD_NAMES = ("bernoulli", "gaussian", "gaussian-fixed")


class Bernoulli:
    """p(x | z) = prod_i Bernoulli(x_i | sigmoid(l_i)); the decoder outputs logits l."""

    name = "bernoulli"
    outputs_per_pixel = 1

    def nll(self, x, out, grad_scale=None):
        """(nll (M,), grad_scale * d nll / d out (M, c)); ``grad_scale``: None, a number,
        or an (M,) array (one factor per row)."""
        if grad_scale is None or type(grad_scale) in (int, float):  # scaled in the loss
            return bernoulli_nll(x, out, grad_scale=1.0 if grad_scale is None else grad_scale)
        value, grad = bernoulli_nll(x, out)
        return value, _scaled(grad, grad_scale)

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

    def nll(self, x, out, grad_scale=None):
        """(nll (M,), grad_scale * d nll / d out (M, 2c)): the mu and logvar gradients
        side by side; ``grad_scale``: None, a number, or an (M,) array (one per row)."""
        mu, logvar = self._split(out)
        value, dmu, dlogvar = gaussian_nll(x, mu, logvar)
        return value, _scaled(namespace_of(out).concat([dmu, dlogvar], axis=1), grad_scale)

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
        self.variance = check_number("variance", variance, low=0.0, low_open=True)

    def nll(self, x, out, grad_scale=None):
        """(nll (M,), grad_scale * d nll / d out (M, c)); ``grad_scale``: None, a number,
        or an (M,) array (one factor per row)."""
        value, grad = gaussian_fixed_nll(x, out, self.variance)
        return value, _scaled(grad, grad_scale)

    def mean(self, xp, out):
        return out

    def sample(self, xp, out, rng):
        return out + math.sqrt(self.variance) * rng.normal(out.shape)


def _scaled(grad, grad_scale):
    """``grad * grad_scale``, or ``grad`` itself for None. An (M,) ``grad_scale``
    multiplies row r by grad_scale[r]."""
    if grad_scale is None:
        return grad
    return grad * _broadcastable_scale(grad, grad_scale)


def scale_rows(grad, scale):
    """Row r of an (M, width) gradient times ``scale[r]``, ``scale`` (M,): the gradient of
    ``sum_r scale_r nll_r`` from that of ``sum_r nll_r``: ``grad * scale[:, None]``."""
    if getattr(scale, "ndim", None) != 1:
        raise ValueError(f"scale: expected an array of shape ({grad.shape[0]},), one factor "
                         f"per row, got {type(scale).__name__} of shape "
                         f"{getattr(scale, 'shape', None)}")
    return _scaled(grad, scale)


def _broadcastable_scale(grad, grad_scale):
    """``grad_scale`` in a form ``grad`` (M, width) multiplies by: None or a number as it
    is, an (M,) array as an (M, 1) column of grad's dtype (one factor per row)."""
    if grad_scale is None or getattr(grad_scale, "ndim", 0) == 0:
        return grad_scale
    shape = tuple(grad_scale.shape)
    if shape != (grad.shape[0],):
        raise ValueError(f"grad_scale: expected a number or an array of shape "
                         f"({grad.shape[0]},), one factor per row, got shape {shape}")
    xp = namespace_of(grad)
    if grad_scale.dtype != grad.dtype:
        grad_scale = xp.astype(grad_scale, grad.dtype)
    return xp.reshape(grad_scale, (grad.shape[0], 1))


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
