"""The random streams of a run: each draw comes from a stream keyed by its purpose.

A stream's seed is ``(seed, purpose)`` or ``(seed, purpose, epoch)``, so a run is a
deterministic function of its config and its data, and no stream's draws depend on how
many draws another stream made (a resumed run redraws exactly what it needs).
"""

from __future__ import annotations

import enum

__all__ = ["Stream", "stream_key"]


class Stream(enum.IntEnum):
    """The purpose of each random stream; a stream's seed is ``(seed, purpose[, epoch])``."""

    SUBSET = 1            # once: the images ``limit_train`` / ``limit_test`` keep
    SHUFFLE = 2           # per epoch: the minibatch order
    BINARIZE = 3          # per epoch: the dynamic binarization of the training images
    STATIC_BINARIZE = 4   # once: the static binarization of the training images
    TEST_BINARIZE = 5     # once: the fixed binarization of the test images
    NOISE = 6             # per epoch: reparameterisation noise of the training loss
    TEST_NOISE = 7        # per epoch: noise of the test ELBO
    PICTURES = 8          # once: the test digits and the prior latents that are drawn
    LOG_LIKELIHOOD = 9    # once: the importance samples of the final evaluation


def stream_key(seed: int, stream: Stream, *more: int) -> tuple[int, ...]:
    """The seed of ``stream`` in a run seeded ``seed`` (``more``: e.g. the epoch), for
    ``numpy.random.default_rng`` or ``Backend.rng``."""
    return (seed, int(stream), *more)
