"""One training step's loss and gradient, over the ranks of a communicator.

Every rank draws the whole global batch's noise (the draws of one process, whatever the
number of ranks) and takes its rows, scores its shard and weights the shard's mean
gradient by shard / global batch size; one allreduce sums the flat buffers, so every rank
holds the global batch's mean gradient (the sum over its examples divided by the global
batch size). The three loss terms are summed the same way. With one rank the shard is the
batch and nothing is weighted or summed: the plain step, bit for bit.
"""

from __future__ import annotations

from ..distributed import Communicator, shard_bounds
from ..model import ELBOTerms

__all__ = ["loss_and_gradient"]


def loss_and_gradient(model, comm: Communicator, batch, noise, labels=None) -> ELBOTerms:
    """The loss terms of ``batch`` (n, D) (nats per image, batch means, 0-d backend
    arrays), with d loss / d parameter in ``model.parameters.grad``, on every rank.

    ``noise``: the run's training noise stream (draws (S, n, d) per batch); ``labels``: a
    conditional model's labels of the batch, host (n,)."""
    n = batch.shape[0]
    lo, hi = shard_bounds(n, comm.size, comm.rank)
    eps = noise.normal((model.samples, n, model.latent_dim))
    params = model.parameters
    if hi > lo:
        terms = model.loss(batch[lo:hi, :], eps=eps[:, lo:hi, :], check_finite=False,
                           y=None if labels is None else labels[lo:hi])
        model.backward()
    else:  # the short last batch of an epoch may leave a rank without rows
        params.zero_grad()
        zero = model.backend.zeros(())
        terms = ELBOTerms(loss=zero, kl=zero, recon=zero)
    if comm.size == 1:
        return terms
    share = (hi - lo) / n
    if share != 1.0:
        params.grad *= share
    local = model.backend.xp.stack([terms.loss, terms.kl, terms.recon]) * share
    comm.allreduce_sum(params.grad)
    comm.allreduce_sum(local)
    return ELBOTerms(loss=local[0], kl=local[1], recon=local[2])
