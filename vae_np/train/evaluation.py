"""Scores of a model on test images: the negative ELBO, and ln p(x) by importance sampling.

Both take the test images as batches of backend arrays (already binarized as the model
expects), so the caller decides batch size and where to check for Ctrl-C, and a
communicator (:mod:`vae_np.distributed`; default: one process): each batch is split over
its ranks, every rank draws the whole batch's noise (the draws of one process, whatever
the number of ranks) and scores its rows, and the sums are added up at the end. One rank
is the plain evaluation; N ranks give its numbers up to the order of the sums.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Iterable

import numpy as np

from ..distributed import Communicator, RowsOf, SingleProcess, shard_bounds
from ..model import log_likelihood_chunk_size
from .report import progress_bar
from .streams import Stream

__all__ = ["log_likelihood_summary", "per_image_log_likelihood", "run_log_likelihood",
           "run_test_elbo", "test_elbo"]


def _labels_of(labels: Iterable | None):
    """One item per batch: the batch's labels, or None for every batch without labels."""
    return iter(labels) if labels is not None else itertools.repeat(None)


def test_elbo(model, backend, batches: Iterable, rng, labels: Iterable | None = None,
              comm: Communicator | None = None) -> dict[str, float]:
    """Negative ELBO, KL and reconstruction over all images of ``batches`` (each (n, D)),
    in nats per image: ``{"loss", "kl", "recon"}``. ``rng``: the reparameterisation noise.
    ``labels``: a conditional model's labels, one (n,) host array per batch. (For a model
    with ``objective="iwae"`` the loss is its negative importance-weighted bound.)
    ``comm``: the ranks that share each batch (every rank passes the same batches).

    The image-weighted sums stay on the device until the end (one allreduce, one transfer).
    """
    comm = SingleProcess() if comm is None else comm
    xp = backend.xp
    total, count = backend.zeros((3,)), 0
    labels = _labels_of(labels)
    for batch in batches:
        y, n = next(labels), batch.shape[0]
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        eps = rng.normal((model.samples, n, model.latent_dim))
        if hi > lo:
            t = model.loss(batch[lo:hi, :], eps=eps[:, lo:hi, :], check_finite=False,
                           y=None if y is None else y[lo:hi])
            total = total + xp.stack([t.loss, t.kl, t.recon]) * (hi - lo)
        count += n
    comm.allreduce_sum(total)
    loss, kl, recon = (backend.to_numpy(total).astype(np.float64) / count).tolist()
    return {"loss": loss, "kl": kl, "recon": recon}


def per_image_log_likelihood(model, backend, batches: Iterable, num_samples: int, rng,
                             on_batch: Callable[[], object] | None = None,
                             labels: Iterable | None = None,
                             comm: Communicator | None = None) -> np.ndarray:
    """Importance-sampled ln p(x) (``VAE.log_likelihood``, K = ``num_samples``) of every
    image of ``batches``, nats, float64 (N,), in the order of ``batches``, on every rank
    of ``comm``. ``on_batch`` is called after each batch. ``labels``: a conditional
    model's labels, one (n,) host array per batch (it then scores ln p(x | y)).

    Each rank asks for the chunks of K one process would (``log_likelihood_chunk_size``)
    and takes its rows of every chunk's draws, so the samples are the single-process
    ones; a rank without rows still draws, to stay in step with the stream."""
    comm = SingleProcess() if comm is None else comm
    mine = []
    labels = _labels_of(labels)
    for batch in batches:
        y, n = next(labels), batch.shape[0]
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        chunk = log_likelihood_chunk_size(model, n, num_samples)
        if hi > lo:
            values = model.log_likelihood(batch[lo:hi, :], num_samples=num_samples,
                                          rng=RowsOf(rng, n, lo, hi), chunk_size=chunk,
                                          check_finite=False,
                                          y=None if y is None else y[lo:hi])
            mine.append(backend.to_numpy(values).astype(np.float64))
        else:
            for start in range(0, num_samples, chunk):
                rng.normal((min(chunk, num_samples - start), n, model.latent_dim))
            mine.append(np.zeros((0,), dtype=np.float64))
        if on_batch is not None:
            on_batch()
    everyone = comm.allgather(mine)
    return np.concatenate([np.concatenate([ranks[b] for ranks in everyone])
                           for b in range(len(mine))]) if mine else np.zeros((0,))


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


# --------------------------------------------------------------------------------------
# A run's test set (vae_np.train.RunData), as the trainer scores it


def run_test_elbo(model, data, comm: Communicator, rng, check: Callable[[], None] | None = None,
                  x=None, y=None) -> dict[str, float]:
    """:func:`test_elbo` of the run's test set (``data``: its :class:`RunData`), or of
    ``x`` (N, D) on the backend with a conditional model's labels ``y`` (N,), in batches
    of ``eval_batch_size`` with ``check()`` (Ctrl-C) before each."""
    size = data.config.eval_batch_size
    labels = None
    if model.num_classes is not None:
        if x is not None and y is None:
            raise ValueError("y: a conditional model scores x with its labels; pass y")
        labels = data.test_label_batches(size, y)
    return test_elbo(model, data.backend, data.test_batches(size, check, x), rng,
                     labels=labels, comm=comm)


def run_log_likelihood(model, data, comm: Communicator, num_samples: int,
                       check: Callable[[], None] | None = None,
                       progress: bool = False) -> dict[str, float | int | None]:
    """The importance-sampled ln p(x) of the run's test set (stream ``LOG_LIKELIHOOD``):
    ``{"mean", "stderr", "n_images", "num_samples", "seconds"}``, nats (see
    :func:`log_likelihood_summary`); a progress bar over its batches with ``progress``."""
    size = data.config.eval_batch_size
    labels = None if model.num_classes is None else data.test_label_batches(size)
    bar = progress_bar(progress, math.ceil(data.n_test / size), 0,
                       f"test ln p(x), K={num_samples}")
    started = time.perf_counter()
    try:
        values = per_image_log_likelihood(
            model, data.backend, data.test_batches(size, check), num_samples,
            data.backend.rng(data.key(Stream.LOG_LIKELIHOOD)), on_batch=bar.update,
            labels=labels, comm=comm)
    finally:
        bar.close()
    return {**log_likelihood_summary(values), "num_samples": num_samples,
            "seconds": time.perf_counter() - started}
