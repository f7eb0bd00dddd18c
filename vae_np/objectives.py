"""The training objectives of the VAE, each an object owning its forward and its backward.

Both start from the encoder's output (mu, logvar), each (N, d), the noise eps (S, N, d)
and the decoder, and end in d loss / d (mu, logvar); both sample z by reparameterisation:

    z_s = mu + exp(logvar / 2) * eps_s               (S, N, d), eps ~ N(0, I)
    out_s = decoder(z_s)                             (S N, c * outputs_per_pixel)

:class:`ELBO` (``objective="vae"``), the negative ELBO with the closed-form KL
(docs/05-whole-model.md derives every line):

    recon_n = 1/S sum_s -ln p(x_n | z_{s,n})         (N,)  nats
    kl_n = KL(q(z | x_n) || N(0, I))                 (N,)  nats
    loss = 1/N sum_n (recon_n + beta * kl_n)         nats per example

:class:`IWAE` (``objective="iwae"``), the negative importance-weighted bound of Burda,
Grosse & Salakhutdinov (2015) with k = S samples (docs/09-iwae.md derives every term):

    ln w_{s,n} = ln p(x_n | z_{s,n}) + ln p(z_{s,n}) - ln q(z_{s,n} | x_n)     (S, N)
    loss = -1/N sum_n [ logsumexp_s ln w_{s,n} - ln S ]                     nats per example

whose backward sends the softmax weight w~_{s,n} / N (held constant) into each ln w_{s,n}:
into the decoder (the likelihood's gradient, row by row), into z through ln p(z), and
into logvar through ln q. k = 1 gives the ELBO with a sampled KL term, ln q(z|x) - ln p(z)
at the drawn z, instead of the closed form. ln w (:func:`iwae_log_weights`) is also what
``VAE.log_likelihood`` averages to estimate ln p(x).

``reparameterize``, ``iwae_bound`` and ``iwae_latent_backward`` are references with a fast
twin per device (``backend.fast_twin``) giving their results to the last bit on NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .backend import fast_twin, namespace_of
from .likelihoods import scale_rows
from .losses import kl_standard_normal
from .ops import logsumexp_and_softmax
from .validation import check_choice

#: The training objectives: the negative ELBO with the closed-form KL ("vae"), and the
#: negative importance-weighted bound of Burda et al. (2015) ("iwae").
OBJECTIVES = ("vae", "iwae")


@dataclass
class ELBOTerms:
    """The loss of one batch, each a 0-d backend array in nats per example (batch mean).

    ``objective="vae"``: ``loss = recon + beta * kl`` is the negative ELBO when beta = 1,
    with ``recon`` the average of the S sampled -ln p(x|z) and ``kl`` the closed-form KL.

    ``objective="iwae"``: ``loss`` is the negative importance-weighted bound, and
    ``loss = recon + kl`` with the weighted terms (w~ the normalised importance weights)

        recon = 1/N sum_n sum_s w~_{s,n} (-ln p(x_n | z_{s,n}))
        kl    = 1/N sum_n sum_s w~_{s,n} (ln q(z_{s,n} | x_n) - ln p(z_{s,n}) + ln(S w~_{s,n}))

    i.e. ``kl`` is the weighted sampled KL plus KL(w~ || uniform) >= 0, what the bound
    charges beyond the weighted reconstruction. For S = 1 (w~ = 1) they are the sampled
    reconstruction and the sampled KL, ln q(z|x) - ln p(z) at the drawn z.
    """

    loss: object
    kl: object
    recon: object


# ------------------------------------------------------------------------------------------
# Reparameterisation: docs/02-reparameterization.md


@fast_twin
def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps: a draw from N(mu, diag exp(logvar)).

    Args:
        mu, logvar: (N, d). eps: (S, N, d) standard normal noise.
    Returns:
        z: (S, N, d).

    Note ``exp(0.5 * logvar)``: the starting example wrote ``exp(0.5 ** logvar)``, a
    power, whose noise scale has nothing to do with the encoder's variance.
    """
    return mu + namespace_of(mu).exp(0.5 * logvar) * eps


def reparameterize_backward(dz, logvar, eps):
    """Gradients through :func:`reparameterize`, summed over the S samples.

        dz/dmu = 1,   dz/dlogvar = 1/2 exp(logvar / 2) eps

    Args:
        dz: (S, N, d) upstream gradient; logvar: (N, d); eps: (S, N, d).
    Returns:
        (dmu, dlogvar): (N, d) each.
    """
    xp = namespace_of(dz)
    dmu = xp.sum(dz, axis=0)
    dlogvar = xp.sum(dz * eps, axis=0) * (0.5 * xp.exp(0.5 * logvar))
    return dmu, dlogvar


def repeat_over_samples(xp, rows, s: int):
    """``rows`` (N, w) repeated for each of S sample blocks: (S N, w), row s N + n being
    row n (``rows`` itself for S = 1), to line up with z (S, N, d) reshaped to (S N, d)."""
    if s == 1:
        return rows
    return xp.reshape(xp.broadcast_to(rows, (s, *rows.shape)), (s * rows.shape[0], -1))


# ------------------------------------------------------------------------------------------
# The importance weights and the bound: docs/09-iwae.md


def iwae_log_weights(nll, z, logvar, eps):
    """ln w_{s,n} = ln p(x_n | z_{s,n}) + ln p(z_{s,n}) - ln q(z_{s,n} | x_n), in nats, at
    the reparameterised z = mu + exp(logvar / 2) eps:

        ln p(x | z) = -nll
        ln p(z)     = -1/2 sum_i z_i^2 - d/2 ln 2 pi
        ln q(z | x) = -1/2 sum_i (eps_i^2 + logvar_i + ln 2 pi)    ((z - mu)^2 / sigma^2 = eps^2)

    The two d/2 ln 2 pi cancel and are left out. The one expression of ln w: the IWAE
    bound and ``VAE.log_likelihood`` (ln p(x)) both evaluate it.

    Args:
        nll: (S, N) -ln p(x_n | z_{s,n}); z, eps: (S, N, d); logvar: (N, d).
    Returns:
        (S, N).
    """
    xp = namespace_of(z)
    return -nll - 0.5 * xp.sum(z * z, axis=2) \
        + 0.5 * (xp.sum(logvar, axis=1) + xp.sum(eps * eps, axis=2))


@fast_twin
def iwae_bound(log_w):
    """The importance-weighted bound of each example and its normalised weights.

        bound_n = ln (1/S) sum_s w_{s,n} = logsumexp_s ln w_{s,n} - ln S          (N,) nats
        w~_{s,n} = w_{s,n} / sum_j w_{j,n} = softmax_s ln w_{s,n}               (S, N)

    Stable for any finite ln w (-1e4 included: the shift by the largest makes it e^0 = 1).
    An example whose weights all vanish (every ln w = -inf) gets bound -inf and weights 0,
    not NaN (``ops.logsumexp_and_softmax``); NaN stays NaN.

    Args:
        log_w: (S, N) from :func:`iwae_log_weights`.
    """
    lse, weights = logsumexp_and_softmax(namespace_of(log_w), log_w, axis=0)
    return lse - math.log(log_w.shape[0]), weights


@fast_twin
def iwae_latent_backward(dz, dloss_dnll, z, logvar, eps):
    """d loss / d (mu, logvar) of the IWAE loss, from the decoder's d loss / d z.

    With a_{s,n} = w~_{s,n} / N = d loss / d nll_{s,n} = -d loss / d ln w_{s,n} (the
    weights held constant) and ln w as in :func:`iwae_log_weights`:

        d loss / d z_{s,n}       = dz_{s,n} + a_{s,n} z_{s,n}          ln p(z): d/dz = -z
        then through z = mu + exp(logvar / 2) eps (:func:`reparameterize_backward`), and
        d loss / d logvar_n     += -1/2 sum_s a_{s,n}                  ln q: d/dlogvar = -1/2

    ln q(z | x) at the reparameterised z, -1/2 sum (eps^2 + logvar + ln 2 pi), does not
    depend on mu at all, and on logvar only through the -1/2 logvar: its path through z
    (-(z - mu) / sigma^2) and its direct partials at fixed z cancel exactly, for mu and
    for the eps^2 part of logvar (docs/09-iwae.md works it out).

    Args:
        dz: (S, N, d) d loss / d z through the decoder (ln p(x | z));
        dloss_dnll: (S, N) the weights a; z, eps: (S, N, d); logvar: (N, d).
    Returns:
        (dmu, dlogvar): (N, d) each.
    """
    xp = namespace_of(dz)
    dz = dz + xp.expand_dims(dloss_dnll, axis=2) * z
    dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
    dlogvar = dlogvar - 0.5 * xp.expand_dims(xp.sum(dloss_dnll, axis=0), axis=1)
    return dmu, dlogvar


# ------------------------------------------------------------------------------------------
# The objectives. ``forward(x, mu, logvar, eps, decode)`` returns (ELBOTerms, step), x
# (N, c) the batch: ``decode`` maps latent rows (S N, d), z (S, N, d) reshaped, to the
# decoder output (S N, outputs), keeping what the decoder's backward needs; ``step`` is
# what ``backward`` reads. ``backward(step, decode_backward)`` hands d loss / d decoder
# output to ``decode_backward``, which returns d loss / d latent rows (S N, d), and returns
# d loss / d (mu, logvar), (N, d) each.


@dataclass(frozen=True)
class _ELBOStep:
    """What :meth:`ELBO.forward` keeps: (S, N, d) eps, (N, d) logvar and KL gradients,
    (S N, outputs) d loss / d decoder output, already scaled by 1 / (S N)."""

    logvar: object
    eps: object
    dloss_dout: object
    dkl_dmu: object
    dkl_dlogvar: object


class ELBO:
    """The negative ELBO, S reparameterised samples averaged, the KL in closed form, weighted
    by ``beta`` (1 gives the ELBO; docs/05-whole-model.md)."""

    name = "vae"

    def __init__(self, likelihood, beta: float = 1.0):
        self.likelihood, self.beta = likelihood, float(beta)

    def forward(self, x, mu, logvar, eps, decode):
        xp = namespace_of(mu)
        s, n, d = eps.shape
        z = reparameterize(mu, logvar, eps)                                   # (S, N, d)
        out = decode(xp.reshape(z, (s * n, d)))                         # (S N, outputs)
        # loss = 1/(S N) sum_{s,n} nll_{s,n} + beta/N sum_n kl_n
        nll, dloss_dout = self.likelihood.nll(repeat_over_samples(xp, x, s), out,
                                              grad_scale=1.0 / (s * n))
        kl, dkl_dmu, dkl_dlogvar = kl_standard_normal(mu, logvar)
        recon = xp.mean(nll)  # = 1/N sum_n 1/S sum_s nll_{s,n}
        kl_mean = xp.mean(kl)
        terms = ELBOTerms(loss=recon + self.beta * kl_mean, kl=kl_mean, recon=recon)
        return terms, _ELBOStep(logvar, eps, dloss_dout, dkl_dmu, dkl_dlogvar)

    def backward(self, step: _ELBOStep, decode_backward):
        xp = namespace_of(step.eps)
        s, n, d = step.eps.shape
        dz = xp.reshape(decode_backward(step.dloss_dout), (s, n, d))         # decoder
        dmu, dlogvar = reparameterize_backward(dz, step.logvar, step.eps)
        dmu = dmu + (self.beta / n) * step.dkl_dmu
        dlogvar = dlogvar + (self.beta / n) * step.dkl_dlogvar
        return dmu, dlogvar


@dataclass(frozen=True)
class _IWAEStep:
    """What :meth:`IWAE.forward` keeps: (S, N, d) eps and z, (N, d) logvar, (S N, outputs)
    d loss / d decoder output (weighted row by row), (S, N) the weights w~ / N."""

    logvar: object
    eps: object
    dloss_dout: object
    z: object
    dloss_dnll: object


class IWAE:
    """The negative importance-weighted bound with k = S samples (Burda et al. 2015;
    docs/09-iwae.md)."""

    name = "iwae"

    def __init__(self, likelihood):
        self.likelihood = likelihood

    def forward(self, x, mu, logvar, eps, decode):
        """loss = -1/N sum_n bound_n, so d loss / d ln w_{s,n} = -w~_{s,n} / N, and since
        ln p(x | z) = -nll, d loss / d nll_{s,n} = +w~_{s,n} / N: the row weight of the
        likelihood's gradient. The weights need every nll first, so the likelihood
        returns its gradient unscaled and the rows are weighted after (one pass)."""
        xp = namespace_of(mu)
        s, n, d = eps.shape
        z = reparameterize(mu, logvar, eps)                                   # (S, N, d)
        out = decode(xp.reshape(z, (s * n, d)))                         # (S N, outputs)
        nll, dnll_dout = self.likelihood.nll(repeat_over_samples(xp, x, s), out)
        nll = xp.reshape(nll, (s, n))
        bound, weights = iwae_bound(iwae_log_weights(nll, z, logvar, eps))   # (N,), (S, N)
        dloss_dnll = weights * (1.0 / n)
        dloss_dout = scale_rows(dnll_dout, xp.reshape(dloss_dnll, (s * n,)))
        loss = -xp.mean(bound)
        recon = xp.sum(dloss_dnll * nll)          # 1/N sum_n sum_s w~_{s,n} nll_{s,n}
        terms = ELBOTerms(loss=loss, kl=loss - recon, recon=recon)
        return terms, _IWAEStep(logvar, eps, dloss_dout, z, dloss_dnll)

    def backward(self, step: _IWAEStep, decode_backward):
        xp = namespace_of(step.z)
        dz = xp.reshape(decode_backward(step.dloss_dout), step.z.shape)       # decoder
        # + the prior's path into z, + ln q's -1/2 logvar (docs/09-iwae.md)
        return iwae_latent_backward(dz, step.dloss_dnll, step.z, step.logvar, step.eps)


def make_objective(name: str, likelihood, beta: float = 1.0):
    """The objective called ``name`` (one of :data:`OBJECTIVES`) for ``likelihood``."""
    check_choice("objective", name, OBJECTIVES)
    if name == "vae":
        return ELBO(likelihood, beta)
    if beta != 1:
        # The bound is ln of an average of p(x|z) p(z) / q(z|x): there is no KL term to
        # weight, and any way of inserting beta would be a different objective.
        raise ValueError(f"beta: the iwae objective has no KL term to weight; leave beta "
                         f"at 1 (got beta={beta!r} with objective='iwae')")
    return IWAE(likelihood)
