"""A learned-variance Gaussian VAE started at the scale of its training data.

A fresh model's layers expect features of order 1. On real-valued data of scale s the
encoder's outputs grow with s (exp(logvar) overflows for s ~ 1e2) and the decoder's mean,
of order 1, is s^-1 standard deviations off for s ~ 1e-2, so the first loss ranged from
1e2 to 1e35 over seeds (issue 19). :func:`init_gaussian_from_data` folds the data's
per-feature mean m and standard deviation s into the first and the last Linear, so the
fresh model sees standardised features and predicts in data units:

    encoder, first Linear:  h = ((x - m) / s) W + b  =  (x - shift) W' + b',
                            W' = W / s (its rows of x),  b' = b - (m - shift) W'
    encoder, logvar half of the last Linear: zero, so q(z | x) starts at unit variance
    decoder, mean half:     mu_x = m + s * (h W_mu)       (bias m, columns scaled by s)
    decoder, logvar half:   logvar_x = ln s^2              (zero weights, bias ln s^2)

Its loss then starts near the data's own Gaussian NLL, D/2 ln(2 pi s^2) + D/2 per example,
whatever the scale and seed (tests/test_reliability.py).
"""

from __future__ import annotations

import numpy as np

__all__ = ["init_gaussian_from_data"]


def init_gaussian_from_data(model, mean: np.ndarray, var: np.ndarray) -> None:
    """Rescale a fresh ``decoder="gaussian"`` ``model``'s first and last layers to its
    training features' per-feature ``mean`` and ``var`` (D,) host (see the module
    docstring). In place."""
    backend = model.backend
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    # a constant feature has no spread: floor its variance far below the others'
    var = np.maximum(var, max(1e-6 * float(var.mean()), 1e-12))
    std = np.sqrt(var)
    d, n_in = model.latent_dim, model.input_dim

    first = model.encoder.linears[0].params
    w = backend.to_numpy(first["W"]).astype(np.float64)
    b = backend.to_numpy(first["b"]).astype(np.float64)
    w[:n_in] /= std[:, None]                    # label columns (conditional) stay as they are
    b -= ((mean - model.input_shift)) @ w[:n_in]
    first["W"][...] = backend.asarray(w)
    first["b"][...] = backend.asarray(b)

    last_enc = model.encoder.linears[-1].params
    last_enc["W"][:, d:] = 0.0
    last_enc["b"][d:] = 0.0

    last = model.decoder.linears[-1].params
    w = backend.to_numpy(last["W"]).astype(np.float64)
    w[:, :n_in] *= std[None, :]
    w[:, n_in:] = 0.0
    last["W"][...] = backend.asarray(w)
    last["b"][...] = backend.asarray(np.concatenate([mean, np.log(var)]))
