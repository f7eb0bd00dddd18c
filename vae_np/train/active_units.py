"""Active units (Burda, Grosse & Salakhutdinov 2015, sec. 5.2): how many latent dimensions
the encoder uses.

Latent dimension u is active when A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01: the variance, over
the images x, of the encoder mean mu_u(x). A dimension whose mean hardly moves with x
carries no information about x (its posterior is the same for every image, and the KL
term pushes it to the prior). The variance is the population one (divided by N, as the
authors' ``np.var``), accumulated batch by batch on the host in float64.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["ACTIVE_UNIT_THRESHOLD", "active_units", "active_units_line",
           "encoder_mean_variances"]

#: The paper's threshold on A_u (nats are not involved: it is a variance of latent means).
ACTIVE_UNIT_THRESHOLD = 0.01


def encoder_mean_variances(model, batches: Iterable,
                           labels: Iterable | None = None) -> tuple[np.ndarray, int]:
    """(variances, n): the variance over all images of ``batches`` of each dimension of
    the encoder mean mu(x), float64 (d,), and the number of images n.

    ``batches``: (n_b, D) arrays (host or the model's backend), binarized as the model is
    scored; ``labels``: a conditional model's labels, one (n_b,) host array per batch
    (the mean is then that of q(z | x, y)). Batches are merged with Chan et al.'s
    update of the mean and the sum of squared deviations, so no (N, d) array is kept.
    Raises ValueError for no images, FloatingPointError for a non-finite encoder mean.
    """
    labels = iter(labels) if labels is not None else None
    n, mean, m2 = 0, None, None
    for batch in batches:
        y = next(labels) if labels is not None else None
        mu, _ = model.encode(batch, check_finite=False, y=y)
        mu = np.asarray(model.backend.to_numpy(mu), dtype=np.float64)
        if not np.isfinite(mu).all():
            raise FloatingPointError("active units: the encoder mean is not finite on "
                                     "some image (a diverged model?)")
        nb = mu.shape[0]
        if nb == 0:
            continue
        mean_b = mu.mean(axis=0)
        m2_b = ((mu - mean_b) ** 2).sum(axis=0)
        if mean is None:
            n, mean, m2 = nb, mean_b, m2_b
            continue
        delta, total = mean_b - mean, n + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2_b + delta ** 2 * (n * nb / total)
        n = total
    if mean is None:
        raise ValueError("batches: active units need at least one image, got none")
    return m2 / n, n


def active_units(model, batches: Iterable, labels: Iterable | None = None,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict[str, Any]:
    """The number of active latent dimensions of ``model`` on the images of ``batches``
    (see :func:`encoder_mean_variances` for ``batches`` and ``labels``).

    Returns ``{"count", "latent_dim", "threshold", "n_images", "variances"}``: ``count``
    dimensions have a variance strictly above ``threshold`` (the paper's A_u > 0.01);
    ``variances`` is the list of all d of them, float (JSON-able).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    variances, n = encoder_mean_variances(model, batches, labels)
    return {"count": int(np.count_nonzero(variances > threshold)),
            "latent_dim": int(variances.shape[0]), "threshold": float(threshold),
            "n_images": int(n), "variances": variances.tolist()}


def active_units_line(result: Mapping[str, Any], images: str = "test images") -> str:
    """The line for :func:`active_units`'s ``result``, e.g. ``active units: 19 of 50
    (variance of the encoder mean over the 10,000 test images > 0.01)``."""
    return (f"active units: {result['count']} of {result['latent_dim']} (variance of the "
            f"encoder mean over the {result['n_images']:,} {images} > "
            f"{result['threshold']:g}, Burda et al. 2015)")
