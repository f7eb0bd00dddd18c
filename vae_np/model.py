"""The variational autoencoder: encoder, reparameterised sampling, decoder, negative ELBO.

Forward (``VAE.loss``), for a batch x of N examples and S samples per example:

    h = encoder(x - input_shift)                      (N, 2d)
    mu, logvar = h[:, :d], h[:, d:]                   (N, d) each
    z_s = mu + exp(logvar / 2) * eps_s                (S, N, d), eps ~ N(0, I)
    out_s = decoder(z_s)                              (S * N, c * outputs_per_pixel)
    recon_n = 1/S sum_s -ln p(x_n | z_{s,n})          (N,)  nats
    kl_n = KL(q(z | x_n) || N(0, I))                  (N,)  nats
    loss = 1/N sum_n (recon_n + beta * kl_n)          the negative ELBO, nats per example

Backward (``VAE.backward``) runs the same chain in reverse; docs/05-whole-model.md
derives every line.

With ``objective="iwae"`` the loss is instead the negative importance-weighted bound of
Burda, Grosse & Salakhutdinov (2015), k = S samples per example:

    ln w_{s,n} = ln p(x_n | z_{s,n}) + ln p(z_{s,n}) - ln q(z_{s,n} | x_n)     (S, N)
    loss = -1/N sum_n [ logsumexp_s ln w_{s,n} - ln S ]                     nats per example

and backward sends the softmax weight w~_{s,n} / N (held constant) into each ln w_{s,n}:
into the decoder (the likelihood's gradient, row by row), into z through ln p(z), and
into logvar through ln q; docs/09-iwae.md derives every term. k = 1 gives the ELBO with
a sampled KL term, ln q(z|x) - ln p(z) at the drawn z, instead of the closed form.

There is one ``loss`` and one ``backward``. Each op they call chooses its own variant:
on NumPy and CuPy the MLPs, the Bernoulli likelihood, the KL term, reparameterisation
and Adam run fused variants that sit beside their reference code and give its results to
the last bit on NumPy (tests/test_fast_paths.py); ``vae_np.backend.use_fast_paths(False)``
runs the references. What ``backward`` reads is kept by ``loss`` on the model (and by
each MLP's ``forward`` in that MLP); the inference methods (``encode``, ``decode``,
``reconstruct``, ``sample``, ``log_likelihood``) keep nothing and disturb nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backend import RNG, Backend, backend_of, get_backend, namespace_of
from .layers import MLP
from .likelihoods import make_likelihood, scale_rows
from .losses import kl_standard_normal
from .ops import LOG_2PI, logsumexp_and_softmax
from .parameters import Parameters
from .validation import check_fits_in_memory, check_int, check_number

#: The training objectives: the negative ELBO with the closed-form KL ("vae"), and the
#: negative importance-weighted bound of Burda et al. (2015) ("iwae").
OBJECTIVES = ("vae", "iwae")


def reparameterize(mu, logvar, eps):
    """z = mu + exp(logvar / 2) * eps: a draw from N(mu, diag exp(logvar)).

    Args:
        mu, logvar: (N, d). eps: (S, N, d) standard normal noise.
    Returns:
        z: (S, N, d).

    Note ``exp(0.5 * logvar)``: the starting example wrote ``exp(0.5 ** logvar)``, a
    power, whose noise scale has nothing to do with the encoder's variance.
    """
    backend = backend_of(mu)
    if backend.fast and (backend.name == "cupy" or backend.numba):
        return _reparameterize_fused(backend, mu, logvar, eps)
    return mu + backend.xp.exp(0.5 * logvar) * eps


def _reparameterize_fused(backend, mu, logvar, eps):
    """:func:`reparameterize` in one pass, the same bits on NumPy: one kernel on CuPy;
    with numba, NumPy's own exp (whose last bits a compiled loop would not reproduce)
    and one compiled pass for the S samples."""
    if backend.name == "cupy":
        return backend.cuda_kernel("reparameterize")(mu, logvar, eps)
    nx = backend.native
    std = nx.multiply(logvar, 0.5)
    nx.exp(std, out=std)
    z = nx.empty(eps.shape, dtype=mu.dtype)
    backend.numba.mu_plus_std_eps(mu, std, eps, z)
    return z


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


# ------------------------------------------------------------------------------------------
# The importance-weighted bound (objective="iwae"); docs/09-iwae.md derives each line.


def iwae_log_weights(nll, z, logvar, eps):
    """ln w_{s,n} = ln p(x_n | z_{s,n}) + ln p(z_{s,n}) - ln q(z_{s,n} | x_n), in nats, at
    the reparameterised z = mu + exp(logvar / 2) eps:

        ln p(x | z) = -nll
        ln p(z)     = -1/2 sum_i z_i^2 - d/2 ln 2 pi
        ln q(z | x) = -1/2 sum_i (eps_i^2 + logvar_i + ln 2 pi)    ((z - mu)^2 / sigma^2 = eps^2)

    The two d/2 ln 2 pi cancel and are left out; the rest is the expression
    :meth:`VAE.log_likelihood` evaluates, operation for operation.

    Args:
        nll: (S, N) -ln p(x_n | z_{s,n}); z, eps: (S, N, d); logvar: (N, d).
    Returns:
        (S, N).
    """
    xp = namespace_of(z)
    return -nll - 0.5 * xp.sum(z * z, axis=2) \
        + 0.5 * (xp.sum(logvar, axis=1) + xp.sum(eps * eps, axis=2))


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
    backend = backend_of(log_w)
    if backend.fast:
        return _iwae_bound_fused(backend, log_w)
    lse, weights = logsumexp_and_softmax(backend.xp, log_w, axis=0)
    return lse - math.log(log_w.shape[0]), weights


def _iwae_bound_fused(backend, log_w):
    """:func:`iwae_bound` with one (S, N) array instead of four, the same bits on NumPy
    (the reference's operations in place; the arrays are a few thousand numbers, so a
    compiled loop, which could not reproduce NumPy's exp anyway, would gain nothing); on
    CuPy three small kernels around CuPy's max and sum over the samples, no host read."""
    nx = backend.native
    s = log_w.shape[0]
    peak = nx.max(log_w, axis=0, keepdims=True)                    # (1, N)
    if backend.name == "cupy":
        weights = backend.cuda_kernel("iwae_shifted_exp")(log_w, peak)
        total = nx.sum(weights, axis=0, keepdims=True)
        bound = backend.cuda_kernel("iwae_log_total")(total, peak)
        bound -= math.log(s)
        weights = backend.cuda_kernel("iwae_normalize")(weights, total)
        return nx.reshape(bound, (-1,)), weights
    peak[~nx.isfinite(peak)] = 0.0       # an all -inf example: shift by 0, not -inf
    weights = nx.subtract(log_w, peak)
    nx.exp(weights, out=weights)
    total = nx.sum(weights, axis=0, keepdims=True)
    bound = nx.log(total)
    bound += peak
    bound -= math.log(s)
    total[~(total > 0)] = 1.0            # its weights are 0 / 1 = 0
    weights /= total
    return nx.reshape(bound, (-1,)), weights


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
    backend = backend_of(dz)
    if backend.fast:
        return _iwae_latent_backward_fused(backend, dz, dloss_dnll, z, logvar, eps)
    xp = backend.xp
    dz = dz + xp.expand_dims(dloss_dnll, axis=2) * z
    dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
    dlogvar = dlogvar - 0.5 * xp.expand_dims(xp.sum(dloss_dnll, axis=0), axis=1)
    return dmu, dlogvar


def _iwae_latent_backward_fused(backend, dz, dloss_dnll, z, logvar, eps):
    """:func:`iwae_latent_backward` with the prior's term added in one pass (one kernel on
    CuPy, in place on NumPy: a z + dz is dz + a z to the bit), the same bits on NumPy."""
    nx = backend.native
    if backend.name == "cupy":
        total = backend.cuda_kernel("iwae_prior_grad")(dz, dloss_dnll[:, :, None], z)
    else:
        total = nx.multiply(dloss_dnll[:, :, None], z)
        total += dz
    dmu, dlogvar = reparameterize_backward(total, logvar, eps)
    half = nx.sum(dloss_dnll, axis=0)
    half *= 0.5
    dlogvar -= half[:, None]
    return dmu, dlogvar


@dataclass(frozen=True)
class _Step:
    """What :meth:`VAE.loss` keeps for :meth:`VAE.backward`: shapes (S, N, d) for eps,
    (N, d) for the latent arrays, (S N, outputs) for the decoder-output gradient."""

    logvar: object
    eps: object
    dloss_dout: object      # d loss / d decoder output, already scaled by 1 / (S N)
    dkl_dmu: object
    dkl_dlogvar: object


@dataclass(frozen=True)
class _IWAEStep:
    """What :meth:`VAE.loss` keeps for :meth:`VAE.backward` with ``objective="iwae"``:
    (S, N, d) for eps and z, (N, d) for logvar, (S N, outputs) for the decoder-output
    gradient (already weighted row by row), (S, N) for the weights w~ / N."""

    logvar: object
    eps: object
    dloss_dout: object      # d loss / d decoder output: w~_{s,n} / N times d nll / d out
    z: object
    dloss_dnll: object      # w~_{s,n} / N


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


class VAE:
    """A VAE with MLP encoder and decoder and hand-written backprop.

    Args:
        input_dim: c, pixels per example (784 for MNIST).
        hidden: hidden layer widths of the encoder; the decoder mirrors them.
        latent_dim: d.
        decoder: ``"bernoulli"`` (logits), ``"gaussian"`` (mean and log-variance) or
            ``"gaussian-fixed"`` (mean, with fixed ``variance``).
        variance: lambda for ``gaussian-fixed`` (default
            ``likelihoods.DEFAULT_FIXED_VARIANCE``, the starting example's).
        beta: weight of the KL term (1 gives the ELBO); must stay 1 for ``"iwae"``.
        samples: S >= 1, reparameterised samples per example in the training loss (the
            k of the importance-weighted bound with ``objective="iwae"``).
        activation: hidden activation name (``vae_np.layers.ACTIVATIONS``).
        input_shift: subtracted from x before the encoder (0.5 centres [0, 1] pixels);
            the likelihood always scores the unshifted x.
        backend: a :class:`Backend` or a backend name.
        dtype: ``"float32"`` (default) or ``"float64"``; with a :class:`Backend`, leave it
            out or repeat the backend's own (a contradiction is a ValueError).
        seed: seeds the weight initialisation (drawn on the host, identical on every
            backend); an integer >= 0.
        objective: ``"vae"`` (default): the negative ELBO, closed-form KL, S samples
            averaged; ``"iwae"``: the negative importance-weighted bound with k = S samples
            (Burda et al. 2015; docs/09-iwae.md).
        num_classes: K for a conditional VAE, None (default) for an unconditional one.
            The one-hot label (K,) of each example is appended to the encoder's input and
            to the decoder's latent input, so the model is q(z | x, y) and p(x | z, y);
            ``loss``, ``encode``, ``decode``, ``reconstruct``, ``sample`` and
            ``log_likelihood`` then take labels ``y``, (N,) integers in 0..K-1.
    """

    def __init__(self, input_dim: int = 784, hidden: Sequence[int] = (512, 512),
                 latent_dim: int = 64, decoder: str = "bernoulli",
                 variance: float | None = None, beta: float = 1.0, samples: int = 1,
                 activation: str = "relu", input_shift: float = 0.5,
                 backend: Backend | str = "numpy", dtype: str | None = None, seed: int = 0,
                 objective: str = "vae", num_classes: int | None = None):
        _check_positive_int("input_dim", input_dim)
        if num_classes is not None:
            _check_positive_int("num_classes", num_classes)
        _check_positive_int("latent_dim", latent_dim)
        _check_positive_int("samples", samples)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise TypeError(f"hidden: expected a sequence of layer widths such as (512, 512) "
                            f"(or () for none), got {hidden!r}")
        for width in hidden:
            _check_positive_int("hidden", width)
        # Python ints and floats from here on (NumPy scalars accepted): config is JSON-able.
        hidden = tuple(int(width) for width in hidden)
        seed = check_int("seed", seed, 0)
        beta = check_number("beta", beta, low=0.0)
        input_shift = check_number("input_shift", input_shift)
        if not isinstance(objective, str) or objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, "
                             f"got {objective!r}")
        if objective == "iwae" and beta != 1:
            # The bound is ln of an average of p(x|z) p(z) / q(z|x): there is no KL term
            # to weight, and any way of inserting beta would be a different objective.
            raise ValueError(f"beta: the iwae objective has no KL term to weight; leave "
                             f"beta at 1 (got beta={beta!r} with objective='iwae')")
        self.backend = get_backend(backend, dtype)
        self.likelihood = make_likelihood(decoder, variance)
        k = 0 if num_classes is None else int(num_classes)
        widths = (input_dim + k, *hidden, 2 * latent_dim, latent_dim + k, *reversed(hidden),
                  input_dim * self.likelihood.outputs_per_pixel)
        parameters = sum((a + 1) * b for i, (a, b) in enumerate(zip(widths, widths[1:]))
                         if i != len(hidden))  # no layer between the encoder and decoder
        # the weights, their gradients and an optimizer's two moments, before allocating
        check_fits_in_memory(f"VAE(input_dim={input_dim}, hidden={list(hidden)}, latent_dim="
                             f"{latent_dim}, num_classes={num_classes})", 4 * parameters,
                             self.backend.numpy_dtype.itemsize)
        self.input_dim, self.latent_dim, self.hidden = int(input_dim), int(latent_dim), hidden
        self.beta, self.samples, self.input_shift = float(beta), int(samples), float(input_shift)
        self.objective = objective
        self.num_classes = None if num_classes is None else int(num_classes)
        k = self.num_classes or 0                  # one-hot width appended to each input
        init_rng = np.random.default_rng(seed)
        self.encoder = MLP((input_dim + k, *hidden, 2 * latent_dim), self.backend, init_rng,
                           activation)
        self.decoder = MLP((latent_dim + k, *reversed(hidden),
                            input_dim * self.likelihood.outputs_per_pixel),
                           self.backend, init_rng, activation)
        if decoder == "gaussian":
            # logvar_x = 0 at the start: random weights there put exp(-logvar_x) anywhere up
            # to 1e35 on a fresh model (issue 19); they learn from zero like a bias.
            last = self.decoder.linears[-1].params
            last["W"][:, input_dim:] = 0.0
            last["b"][input_dim:] = 0.0
        self.parameters = Parameters(self.backend, [*self.encoder.named_parameters("encoder."),
                                                    *self.decoder.named_parameters("decoder.")])
        self.config = {
            "input_dim": self.input_dim, "hidden": list(hidden), "latent_dim": self.latent_dim,
            "decoder": decoder, "variance": getattr(self.likelihood, "variance", None),
            "beta": self.beta, "samples": self.samples, "activation": activation,
            "input_shift": self.input_shift, "dtype": self.backend.dtype_name, "seed": seed,
            "objective": objective, "num_classes": self.num_classes,
        }
        self._step: _Step | None = None

    # ----------------------------------------------------------------------------------
    # Input checks: shapes and dtypes are checked on every call (free); finiteness needs a
    # device-to-host read, so hot loops that checked their data once may turn it off.

    def _as_array(self, x, name: str, shape: tuple, check_finite: bool = True):
        """``x`` as a backend array of the model dtype, after checking it.

        ``shape`` gives each expected size, ``None`` for any size >= 1. Host (NumPy) data
        is accepted on every backend; arrays of another backend are refused, never copied
        behind the caller's back.
        """
        xp = self.backend.xp
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
            x = self.backend.asarray(x)
        else:
            try:
                x_xp = namespace_of(x)
            except TypeError:
                raise TypeError(f"{name}: expected an array, got {type(x).__name__}") from None
            if x_xp is not xp:
                raise TypeError(f"{name}: expected a NumPy array or an array of the "
                                f"{self.backend.name!r} backend, got {type(x).__module__}."
                                f"{type(x).__name__}")
            if not xp.isdtype(x.dtype, "real floating"):
                raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
        if x.ndim != len(shape) or any(
                size < 1 if want is None else size != want for size, want in zip(x.shape, shape)):
            expected = ", ".join("N >= 1" if want is None else str(want) for want in shape)
            raise ValueError(f"{name}: expected shape ({expected}), got {tuple(x.shape)}")
        if x.dtype != self.backend.dtype:
            x = xp.astype(x, self.backend.dtype)
        if check_finite and not bool(xp.all(xp.isfinite(x))):
            raise ValueError(f"{name}: contains NaN or inf")
        return x

    def _as_batch(self, x, name: str, width: int, check_finite: bool = True):
        """A batch (N, width) of examples or latents."""
        return self._as_array(x, name, (None, width), check_finite)

    def _check_rng(self, rng) -> None:
        # A NumPy Generator would "work" and silently misread shapes as means.
        want = f"{self.backend.name}/{self.backend.dtype_name}"
        if not isinstance(rng, RNG):
            raise TypeError(f"rng: expected an RNG of the model's backend ({want}), made by "
                            f"model.backend.rng(seed), got {type(rng).__module__}."
                            f"{type(rng).__name__}")
        got = f"{rng.backend.name}/{rng.backend.dtype_name}"
        if got != want:
            raise TypeError(f"rng: expected an RNG of the model's backend ({want}), made by "
                            f"model.backend.rng(seed), got an RNG of {got}")

    def _check_targets(self, x) -> None:
        """Bernoulli targets must lie in [0, 1]: outside it the "likelihood" is no
        probability and the reconstruction term can go negative. One reduction, one read."""
        if self.likelihood.name != "bernoulli":
            return
        xp = self.backend.xp
        low, high = (float(v) for v in self.backend.to_numpy(xp.stack([xp.min(x), xp.max(x)])))
        if low < 0.0 or high > 1.0:
            raise ValueError(f"x: the bernoulli decoder needs targets in [0, 1], got values "
                             f"in [{low:g}, {high:g}] (use a gaussian decoder for other data)")

    def _one_hot(self, y, n: int):
        """Labels y (n,) as one-hot rows (n, K) of the model dtype; None for an
        unconditional model (which refuses labels, as a conditional one needs them)."""
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y: this VAE is unconditional (num_classes=None); labels "
                                 "are for a VAE(num_classes=K)")
            return None
        if y is None:
            raise ValueError(f"y: this conditional VAE (num_classes={self.num_classes}) needs "
                             f"labels, (N,) integers in 0..{self.num_classes - 1}")
        labels = np.asarray(self.backend.to_numpy(y) if not isinstance(y, np.ndarray) else y)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise ValueError(f"y: expected ({n},) integer labels, got shape {labels.shape} "
                             f"and dtype {labels.dtype}")
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"y: expected labels in 0..{self.num_classes - 1}, got "
                             f"{labels.min()}..{labels.max()}")
        one_hot = np.zeros((n, self.num_classes), dtype=self.backend.numpy_dtype)
        one_hot[np.arange(n), labels] = 1.0
        return self.backend.asarray(one_hot)

    def _with_labels(self, h, one_hot):
        """[h, one_hot] along the features (h unchanged for an unconditional model); h is
        (M, w), one_hot (N, K) with M = S N: repeated over the S sample blocks."""
        if one_hot is None:
            return h
        xp = self.backend.xp
        if h.shape[0] != one_hot.shape[0]:
            reps = h.shape[0] // one_hot.shape[0]
            one_hot = xp.reshape(xp.broadcast_to(one_hot, (reps, *one_hot.shape)),
                                 (h.shape[0], -1))
        return xp.concat([h, one_hot], axis=1)

    # ----------------------------------------------------------------------------------
    # The pieces

    def encode(self, x, check_finite: bool = True, y=None):
        """q(z | x) (q(z | x, y) for a conditional model): (mu, logvar), each (N, d)."""
        x = self._as_batch(x, "x", self.input_dim, check_finite)
        one_hot = self._one_hot(y, x.shape[0])
        return self._split(self.encoder(self._with_labels(x - self.input_shift, one_hot)))

    def _split(self, h):
        """The encoder output (N, 2d) as (mu, logvar), (N, d) each."""
        d = self.latent_dim
        return h[:, :d], h[:, d:]

    def decoder_outputs(self, z, y=None):
        """Raw decoder outputs for latents z (M, d) (and labels y (M,) for a conditional
        model): (M, c * outputs_per_pixel)."""
        return self.decoder(self._with_labels(z, self._one_hot(y, z.shape[0])))

    def decode(self, z, check_finite: bool = True, y=None):
        """The mean of p(x | z) (p(x | z, y)) for z (M, d): (M, c) (pixel probabilities for
        Bernoulli)."""
        z = self._as_batch(z, "z", self.latent_dim, check_finite)
        return self.likelihood.mean(self.backend.xp, self.decoder_outputs(z, y))

    def reconstruct(self, x, check_finite: bool = True, y=None):
        """Decoder mean at the posterior mean, z = mu(x): (N, c). Deterministic."""
        mu, _ = self.encode(x, check_finite, y=y)
        return self.decode(mu, check_finite=False, y=y)

    def sample(self, n: int, rng, mean: bool = True, y=None):
        """n draws z ~ N(0, I) decoded: the decoder mean, or (mean=False) a true sample of
        p(x | z) (Gaussian noise for Gaussian decoders, Bernoulli pixels for Bernoulli).
        A conditional model decodes with labels y (n,). Returns (n, c)."""
        _check_positive_int("n", n)
        self._check_rng(rng)
        out = self.decoder_outputs(rng.normal((n, self.latent_dim)), y)
        if mean:
            return self.likelihood.mean(self.backend.xp, out)
        return self.likelihood.sample(self.backend.xp, out, rng)

    # ----------------------------------------------------------------------------------
    # Training: negative ELBO and its gradient

    def loss(self, x, rng=None, eps=None, check_finite: bool = True, y=None) -> ELBOTerms:
        """The negative ELBO of batch x (N, c), averaged over the N examples (nats); with
        ``objective="iwae"`` the negative importance-weighted bound (k = S samples).

        The noise comes from ``eps`` (S, N, d) when given, else from ``rng`` (an
        ``RNG`` from ``backend.rng(seed)``). Keeps what :meth:`backward` needs.

        ``check_finite`` (default True) checks x and eps for NaN and inf, the Bernoulli
        decoder's targets for the range [0, 1], and the loss itself, raising
        FloatingPointError when it is not finite (an overflowing logvar, say) rather than
        letting a step write NaN into every parameter. Each check reads a number back
        from the device: training loops that checked their data once turn them off.

        A conditional model (``num_classes``) needs the labels ``y`` (N,) of the batch.
        """
        xp = self.backend.xp
        x = self._as_batch(x, "x", self.input_dim, check_finite)
        if check_finite:
            self._check_targets(x)
        n, d, s = x.shape[0], self.latent_dim, self.samples
        one_hot = self._one_hot(y, n)
        if eps is None:
            if rng is None:
                raise ValueError("rng: expected an RNG (backend.rng(seed)) or eps, got neither")
            self._check_rng(rng)
            eps = rng.normal((s, n, d))
        else:
            eps = self._as_array(eps, "eps", (s, n, d), check_finite)
        self._step = None                          # a failed loss leaves nothing to backward
        mu, logvar = self._split(self.encoder.forward(
            self._with_labels(x - self.input_shift, one_hot)))
        z = reparameterize(mu, logvar, eps)                                   # (S, N, d)
        out = self.decoder.forward(self._with_labels(xp.reshape(z, (s * n, d)), one_hot))
        targets = x if s == 1 else xp.reshape(xp.broadcast_to(x, (s, *x.shape)), (s * n, -1))
        if self.objective == "iwae":
            terms, step = self._iwae_loss(targets, out, logvar, z, eps)
        else:
            # loss = 1/(S N) sum_{s,n} nll_{s,n} + beta/N sum_n kl_n
            nll, dloss_dout = self.likelihood.nll(targets, out, grad_scale=1.0 / (s * n))
            kl, dkl_dmu, dkl_dlogvar = kl_standard_normal(mu, logvar)
            recon = xp.mean(nll)  # = 1/N sum_n 1/S sum_s nll_{s,n}
            kl_mean = xp.mean(kl)
            terms = ELBOTerms(loss=recon + self.beta * kl_mean, kl=kl_mean, recon=recon)
            step = _Step(logvar, eps, dloss_dout, dkl_dmu, dkl_dlogvar)
        if check_finite:
            self._check_loss(terms, logvar)
        self._step = step
        return terms

    def _iwae_loss(self, targets, out, logvar, z, eps):
        """The negative importance-weighted bound and what backward needs (docs/09-iwae.md).

        loss = -1/N sum_n bound_n, so d loss / d ln w_{s,n} = -w~_{s,n} / N, and since
        ln p(x | z) = -nll, d loss / d nll_{s,n} = +w~_{s,n} / N: the row weight of the
        likelihood's gradient. The weights need every nll first, so the likelihood
        returns its gradient unscaled and the rows are weighted after (one pass).
        """
        xp = self.backend.xp
        s, n, _ = eps.shape
        nll, dnll_dout = self.likelihood.nll(targets, out)
        nll = xp.reshape(nll, (s, n))
        bound, weights = iwae_bound(iwae_log_weights(nll, z, logvar, eps))   # (N,), (S, N)
        dloss_dnll = weights * (1.0 / n)
        dloss_dout = scale_rows(dnll_dout, xp.reshape(dloss_dnll, (s * n,)))
        loss = -xp.mean(bound)
        recon = xp.sum(dloss_dnll * nll)          # 1/N sum_n sum_s w~_{s,n} nll_{s,n}
        terms = ELBOTerms(loss=loss, kl=loss - recon, recon=recon)
        return terms, _IWAEStep(logvar, eps, dloss_dout, z, dloss_dnll)

    def _check_loss(self, terms: ELBOTerms, logvar) -> None:
        values = self.backend.to_numpy(self.backend.xp.stack([terms.kl, terms.recon]))
        kl, recon = (float(v) for v in values)
        if math.isfinite(kl) and math.isfinite(recon):
            return
        largest = float(self.backend.to_numpy(self.backend.xp.max(logvar)))
        raise FloatingPointError(
            f"VAE.loss: the loss is not finite (KL {kl}, reconstruction {recon}; the "
            f"largest encoder logvar is {largest:g}, and exp() overflows above "
            f"{math.log(np.finfo(self.backend.numpy_dtype).max):.0f}); training has diverged: "
            f"lower the learning rate or clip the gradient norm")

    def backward(self) -> None:
        """Write d loss / d parameter into ``self.parameters.grads`` (all of them), from
        what the last :meth:`loss` kept; once per loss."""
        step = self._step
        if step is None:
            raise RuntimeError("VAE.backward called before VAE.loss (or twice for one loss)")
        self._step = None
        xp = self.backend.xp
        s, n, d = step.eps.shape
        dz = self.decoder.backward(step.dloss_dout)                           # (S N, d)
        if self.num_classes is not None:
            dz = dz[:, :d]             # the label columns of the decoder input are data
        if isinstance(step, _IWAEStep):
            # + the prior's path into z, + ln q's -1/2 logvar (docs/09-iwae.md)
            dmu, dlogvar = iwae_latent_backward(xp.reshape(dz, (s, n, d)), step.dloss_dnll,
                                                step.z, step.logvar, step.eps)
        else:
            dmu, dlogvar = reparameterize_backward(xp.reshape(dz, (s, n, d)), step.logvar,
                                                   step.eps)
            dmu = dmu + (self.beta / n) * step.dkl_dmu
            dlogvar = dlogvar + (self.beta / n) * step.dkl_dlogvar
        # x needs no gradient: skip the encoder's first dx, its largest backward product.
        self.encoder.backward(xp.concat([dmu, dlogvar], axis=1), input_grad=False)

    # ----------------------------------------------------------------------------------
    # Evaluation: the importance-sampled marginal likelihood

    def log_likelihood(self, x, num_samples: int, rng, chunk_size: int | None = None,
                       check_finite: bool = True, y=None):
        """Importance-sampled estimate of ln p(x), per example, in nats: (N,).

            ln p(x) ~ logsumexp_k [ ln p(x | z_k) + ln p(z_k) - ln q(z_k | x) ] - ln K

        with z_k ~ q(z | x), K = ``num_samples``. The K samples are processed
        ``chunk_size`` at a time with a running logsumexp, so memory is bounded by the
        chunk, not by K (default: about 2**22 decoder output values per chunk). A
        conditional model scores ln p(x | y) with labels ``y`` (N,).
        """
        _check_positive_int("num_samples", num_samples)
        self._check_rng(rng)
        xp = self.backend.xp
        x = self._as_batch(x, "x", self.input_dim, check_finite)
        n, d = x.shape[0], self.latent_dim
        if chunk_size is None:
            width = self.input_dim * self.likelihood.outputs_per_pixel
            chunk_size = max(1, min(num_samples, 2 ** 22 // (n * max(width, *self.hidden, 1))))
        _check_positive_int("chunk_size", chunk_size)
        mu, logvar = self.encode(x, check_finite=False, y=y)
        std = xp.exp(0.5 * logvar)
        # ln p(z) - ln q(z|x) = -1/2 sum z^2 + 1/2 sum (logvar + eps^2); the 2 pi terms cancel.
        sum_logvar = xp.sum(logvar, axis=1)
        running_max = xp.full((n,), -math.inf, dtype=self.backend.dtype)
        running_sum = xp.zeros((n,), dtype=self.backend.dtype)
        for start in range(0, num_samples, chunk_size):
            k = min(chunk_size, num_samples - start)
            eps = rng.normal((k, n, d))
            z = mu + std * eps
            log_w = self._log_px_given_z(x, z, y) - 0.5 * xp.sum(z * z, axis=2) \
                + 0.5 * (sum_logvar + xp.sum(eps * eps, axis=2))
            # Running logsumexp over chunks: rescale the old sum to the new maximum. A
            # maximum still at -inf (every weight zero so far) shifts by 0 instead, so
            # that -inf - -inf never makes a NaN: the sum stays 0 and its log -inf.
            new_max = xp.maximum(running_max, xp.max(log_w, axis=0))
            shift = xp.where(xp.isfinite(new_max), new_max, 0.0)
            running_sum = running_sum * xp.exp(running_max - shift) \
                + xp.sum(xp.exp(log_w - shift), axis=0)
            running_max = new_max
        shift = xp.where(xp.isfinite(running_max), running_max, 0.0)
        return xp.log(running_sum) + shift - math.log(num_samples)

    def log_importance_weights(self, x, eps, y=None):
        """ln w_k = ln p(x|z_k) + ln p(z_k) - ln q(z_k|x) for given noise eps (K, N, d),
        written out with every density term, as a reference for :meth:`log_likelihood`.
        Returns (K, N)."""
        xp = self.backend.xp
        x = self._as_batch(x, "x", self.input_dim)
        eps = self._as_array(eps, "eps", (None, x.shape[0], self.latent_dim))
        mu, logvar = self.encode(x, check_finite=False, y=y)
        z = reparameterize(mu, logvar, eps)
        log_px_given_z = self._log_px_given_z(x, z, y)
        log_pz = -0.5 * xp.sum(z * z + LOG_2PI, axis=2)
        log_qz = -0.5 * xp.sum((z - mu) ** 2 / xp.exp(logvar) + logvar + LOG_2PI, axis=2)
        return log_px_given_z + log_pz - log_qz

    def _log_px_given_z(self, x, z, y=None):
        """ln p(x_n | z_{k,n}) (ln p(x_n | z_{k,n}, y_n)) for x (N, c) and latents z
        (K, N, d): (K, N)."""
        xp = self.backend.xp
        k, n, d = z.shape
        out = self.decoder(self._with_labels(xp.reshape(z, (k * n, d)), self._one_hot(y, n)))
        targets = xp.reshape(xp.broadcast_to(x, (k, *x.shape)), (k * n, -1))
        return -xp.reshape(self.likelihood.nll(targets, out)[0], (k, n))

    # ----------------------------------------------------------------------------------
    # Parameters

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.parameters.state_dict()

    def load_state_dict(self, arrays) -> None:
        self.parameters.load_state_dict(arrays)

    @property
    def num_parameters(self) -> int:
        return self.parameters.size


def _check_positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")

