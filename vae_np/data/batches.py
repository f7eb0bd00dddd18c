"""What the model sees of the data each epoch: binarized pixels and minibatch indices.

``binarize`` draws on the host (a NumPy Generator) or on a backend's device (a backend
RNG); ``iterate_minibatches`` yields indices, so the data can stay where it lives.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..backend import RNG as BackendRNG
from ..backend import fast_twin, namespace_of
from ..validation import check_int

__all__ = ["BINARIZE_MODES", "binarize", "gather_binarize", "iterate_minibatches"]

BINARIZE_MODES = ("none", "static", "dynamic")


def _check_mode(mode: str) -> None:
    if mode not in BINARIZE_MODES:
        allowed = ", ".join(repr(m) for m in BINARIZE_MODES)
        raise ValueError(f"binarize: mode must be one of {allowed}, got {mode!r}")


def binarize(x: np.ndarray, mode: str, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Binarize intensities ``x`` (any shape, values in [0, 1], host NumPy).

    mode "none": returns ``x`` unchanged (same object).
    mode "static" / "dynamic": returns float32 Bernoulli draws, 1 where
    ``x > u`` with ``u ~ U[0, 1)``, so P(pixel = 1) = intensity. For a single
    call the two modes are identical; the difference is the caller's (one
    draw kept for every epoch vs. a fresh draw per epoch). ``rng`` is a
    ``numpy.random.Generator`` (or seed) and is required for these modes.

    ``rng`` may also be a backend RNG (``backend.rng(seed)``, see
    ``vae_np.backend``): then ``x`` is an array of that backend, ``u`` is drawn
    on its device and the result has the backend's dtype, so a GPU training
    loop re-binarizes its data each epoch without a host round trip.
    """
    _check_mode(mode)
    if mode == "none":
        return x
    if rng is None:
        raise ValueError(f"binarize: mode {mode!r} needs rng (a numpy.random.Generator or int seed)")
    if isinstance(rng, BackendRNG):
        xp = rng.backend.xp
        return xp.astype(x > rng.uniform(tuple(x.shape)), rng.backend.dtype)
    rng = np.random.default_rng(rng)  # returns a Generator unchanged
    x = np.asarray(x)
    # float32 uniforms halve the temporary's memory (60000x784: 188 MB, not 376 MB).
    u = rng.random(x.shape, dtype=np.float32)
    return (x > u).astype(np.float32)


@fast_twin
def gather_binarize(x, order, u):
    """Rows ``order`` of ``x`` binarized against the uniform draws ``u``, written over ``u``.

    x: (n, D) intensities in [0, 1]; order: (m,) int64 row indices into x (an epoch's
    shuffled order); u: (m, D) draws on [0, 1) of x's float dtype, consumed. Afterwards
    ``u[i, j]`` is 1.0 where ``x[order[i], j] > u[i, j]`` and 0.0 elsewhere: the
    dynamic binarization of the gathered rows, ``binarize(take(x, order), u)``. Returns u.

    One op, not a gather, a comparison and a cast: its CPU twin is one pass that writes
    the epoch's images into the draws' own buffer (a trainer keeps it across epochs), where
    the three steps made two fresh 188 MB arrays a full-MNIST epoch and touched every page
    of them.
    """
    xp = namespace_of(u)
    if not xp.isdtype(order.dtype, "integral"):
        raise TypeError(f"order: expected integer row indices, got dtype {order.dtype}")
    if x.ndim != 2 or order.ndim != 1:
        raise ValueError(f"x, order: expected (n, D) images and (m,) indices, got shapes "
                         f"{tuple(x.shape)} and {tuple(order.shape)}")
    if tuple(u.shape) != (order.shape[0], x.shape[1]):
        raise ValueError(f"u: expected shape {(order.shape[0], x.shape[1])} (one draw per "
                         f"pixel of the gathered rows), got {tuple(u.shape)}")
    u[...] = xp.astype(xp.take(x, order, axis=0) > u, u.dtype)
    return u


def iterate_minibatches(
    n: int,
    batch_size: int,
    rng: np.random.Generator | int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield int64 index arrays that split ``range(n)`` into minibatches.

    Indices rather than data, so the caller can keep the data wherever it
    lives (e.g. on the GPU, moved once) and gather ``x[idx]`` there. With
    ``shuffle`` the order is ``rng.permutation(n)`` (``rng`` a Generator or
    seed, required); each index appears exactly once per pass. The last,
    smaller batch is yielded unless ``drop_last``.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    n = check_int("n", n, 0)
    if shuffle:
        if rng is None:
            raise ValueError("iterate_minibatches: shuffle=True needs rng (a numpy.random.Generator or int seed)")
        order = np.random.default_rng(rng).permutation(n).astype(np.int64, copy=False)
    else:
        order = np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    # Arguments are checked above, at call time; only the slicing is lazy.
    return (order[start:start + batch_size] for start in range(0, stop, batch_size))

