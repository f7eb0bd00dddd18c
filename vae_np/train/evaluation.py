"""Scores of a model on test images: the negative ELBO, and ln p(x) by importance sampling.

Both take the test images as batches of backend arrays (already binarized as the model
expects), so the caller decides batch size and where to check for Ctrl-C.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

__all__ = ["log_likelihood_summary", "per_image_log_likelihood", "test_elbo"]


def test_elbo(model, backend, batches: Iterable, rng,
              labels: Iterable | None = None) -> dict[str, float]:
    """Negative ELBO, KL and reconstruction over all images of ``batches`` (each (n, D)),
    in nats per image: ``{"loss", "kl", "recon"}``. ``rng``: the reparameterisation noise.
    ``labels``: a conditional model's labels, one (n,) host array per batch. (For a model
    with ``objective="iwae"`` the loss is its negative importance-weighted bound.)

    The image-weighted sums stay on the device until the end (one transfer).
    """
    xp = backend.xp
    total, count = backend.zeros((3,)), 0
    labels = iter(labels) if labels is not None else None
    for batch in batches:
        y = next(labels) if labels is not None else None
        t = model.loss(batch, rng=rng, check_finite=False, y=y)
        total = total + xp.stack([t.loss, t.kl, t.recon]) * batch.shape[0]
        count += batch.shape[0]
    loss, kl, recon = (backend.to_numpy(total).astype(np.float64) / count).tolist()
    return {"loss": loss, "kl": kl, "recon": recon}


def per_image_log_likelihood(model, backend, batches: Iterable, num_samples: int, rng,
                             on_batch: Callable[[], object] | None = None,
                             labels: Iterable | None = None) -> np.ndarray:
    """Importance-sampled ln p(x) (``VAE.log_likelihood``, K = ``num_samples``) of every
    image of ``batches``, nats, float64 (N,). ``on_batch`` is called after each batch.
    ``labels``: a conditional model's labels, one (n,) host array per batch (it then
    scores ln p(x | y))."""
    values = []
    labels = iter(labels) if labels is not None else None
    for batch in batches:
        y = next(labels) if labels is not None else None
        values.append(backend.to_numpy(
            model.log_likelihood(batch, num_samples=num_samples, rng=rng, check_finite=False,
                                 y=y)))
        if on_batch is not None:
            on_batch()
    return np.concatenate(values).astype(np.float64)


def log_likelihood_summary(values: np.ndarray) -> dict[str, float | int | None]:
    """``{"mean", "stderr", "n_images"}`` of per-image ln p(x) estimates ``values`` (N,).

    ``stderr`` is the standard error of the mean over images, the between-image spread
    std(ddof=1) divided by sqrt(N); None for N = 1. It does not cover the downward bias
    every finite-K estimate has (docs/07-likelihood.md).
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"mean": float(values.mean()), "stderr": stderr, "n_images": n}
