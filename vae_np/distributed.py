"""Data-parallel training over MPI: a small communicator, the sharding of a global batch,
and rank-count-independent noise.

Every rank holds the whole model and the whole data set and trains on its shard of every
global batch; the flat gradient buffer (``model.parameters.grad``) is summed across ranks
with one ``Allreduce`` and every rank takes the identical optimizer step. What this module
provides:

    world(backend_name)        the communicator of ``mpiexec`` (mpi4py's COMM_WORLD), or a
                               one-line error naming what to install when mpi4py is missing
    SingleProcess()            a one-rank communicator without MPI (tests, and the same code
                               path as a one-rank job)
    shard_bounds(n, size, r)   rows [lo, hi) of an n-row batch that rank r trains on
    RowsOf(rng, n, lo, hi)     an RNG that draws the whole batch's noise and returns rows
                               lo:hi: N ranks draw exactly the single-process eps
    sharded_test_elbo, sharded_log_likelihood
                               the evaluation, sharded, giving the single-process result
    abort_on_error(comm)       an exception on any rank ends the whole job (MPI Abort)

Reductions. NumPy: ``MPI.Allreduce`` in place on the host buffer. CuPy: NCCL
(``cupy.cuda.nccl.NcclCommunicator``, its unique id broadcast with mpi4py) on the current
stream when every rank has a GPU of its own (one GPU per rank, chosen from the node-local
rank); otherwise (two ranks on one GPU, which NCCL refuses, or no NCCL in the CuPy build) a
host-staged MPI path. The stream is synchronised before any host-side MPI call.
The CuPy/NCCL paths have not been run on a GPU by the author (no GPU where it was written).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .backend import RNG
from .model import log_likelihood_chunk_size

__all__ = ["INSTALL_HINT", "Communicator", "DistributedUnavailable", "MPICommunicator",
           "RowsOf", "SingleProcess", "abort_on_error", "check_same_everywhere",
           "log_likelihood_chunk_size", "shard_bounds", "sharded_log_likelihood",
           "sharded_test_elbo", "world"]

INSTALL_HINT = 'pip install -e ".[mpi]" (mpi4py and the MPICH wheel), then mpiexec -n N ...'


class DistributedUnavailable(ImportError):
    """--distributed without mpi4py (or without a usable MPI library)."""


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of an ``n``-row global batch that ``rank`` of ``size`` trains on.

    Contiguous and as even as possible (shards differ by at most one row); with ``n``
    divisible by ``size`` every shard has ``n // size`` rows. A shard may be empty when
    ``n < size`` (the short last batch of an epoch).
    """
    if size < 1 or not 0 <= rank < size or n < 0:
        raise ValueError(f"shard_bounds: expected n >= 0 and 0 <= rank < size, got n={n}, "
                         f"size={size}, rank={rank}")
    return rank * n // size, (rank + 1) * n // size


class RowsOf(RNG):
    """Draws of ``rng`` for the whole ``n``-row batch, of which only rows ``lo:hi`` (axis 1
    of ``normal``'s shape (S, rows, d)) are returned: what ``VAE.loss`` and
    ``VAE.log_likelihood`` see on a shard is exactly the single-process noise of those
    examples, whatever the number of ranks. Asks for (S, hi - lo, d) must keep axis 1 at
    ``hi - lo``."""

    def __init__(self, rng: RNG, n: int, lo: int, hi: int):  # noqa: no RNG.__init__: a view
        self.backend, self.base, self.n, self.lo, self.hi = rng.backend, rng, n, lo, hi

    def normal(self, shape: Sequence[int]):
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or shape[1] != self.hi - self.lo:
            raise ValueError(f"RowsOf.normal: expected a shape (S, {self.hi - self.lo}, ...), "
                             f"got {shape}")
        return self.base.normal((shape[0], self.n, *shape[2:]))[:, self.lo:self.hi]

    def uniform(self, shape: Sequence[int]):
        raise NotImplementedError("RowsOf draws normal noise only")

    def state(self) -> dict:
        return self.base.state()

    def set_state(self, state: dict) -> None:
        self.base.set_state(state)


# --------------------------------------------------------------------------------------
# Communicators


class Communicator:
    """The collective operations data-parallel training needs. ``rank``, ``size``,
    ``local_rank`` (rank among the processes of this node), ``is_root`` (rank 0)."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    description = "one process"

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def attach(self, backend) -> None:
        """Use ``backend``'s arrays from now on (CuPy: sets up NCCL where it can)."""

    def allreduce_sum(self, buffer) -> None:
        """Sum ``buffer`` (a contiguous backend array) over all ranks, in place."""

    def broadcast(self, buffer) -> None:
        """Overwrite ``buffer`` (contiguous backend or host array) with rank 0's, in place."""

    def broadcast_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's host arrays ``state`` (same names and shapes everywhere), on every rank."""
        out = {}
        for name in sorted(state):
            array = np.array(state[name], copy=True, order="C")
            self.broadcast(array)
            out[name] = array
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (host-side, no device data)."""
        return bool(flag)

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    def bcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def abort(self, message: str, code: int = 1):
        """End the whole job after printing ``message`` (one line) on stderr."""
        sys.stderr.write(message.rstrip() + "\n")
        sys.stderr.flush()
        raise SystemExit(code)


class SingleProcess(Communicator):
    """One rank and no MPI: every collective is the identity."""


class MPICommunicator(Communicator):
    """mpi4py's ``COMM_WORLD`` (or ``comm``); NCCL for CuPy arrays where possible.

    Args:
        comm: an mpi4py intracommunicator (default ``MPI.COMM_WORLD``).
        nccl: ``"auto"`` (CuPy arrays go through NCCL when every rank has its own GPU),
            ``False`` (always host-staged MPI).
    """

    def __init__(self, comm=None, nccl: str | bool = "auto"):
        MPI = _import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.want_nccl = nccl
        self.backend = None
        self.nccl = None          # cupy.cuda.nccl.NcclCommunicator when in use
        self.nccl_reason = "not a CuPy backend"
        self.description = f"MPI, {self.size} ranks"

    # --- set-up -----------------------------------------------------------------------

    def attach(self, backend) -> None:
        self.backend = backend
        if backend.name != "cupy":
            return
        reason = self._nccl_unusable_reason() if self.want_nccl else "NCCL turned off"
        # Every rank must take the same path: NCCL only if it works for all of them.
        reasons = self.comm.allgather(reason)
        bad = [(r, why) for r, why in enumerate(reasons) if why is not None]
        if bad:
            self.nccl_reason = f"rank {bad[0][0]}: {bad[0][1]}"
            self.description = (f"MPI, {self.size} ranks, host-staged CuPy buffers "
                                f"(no NCCL: {self.nccl_reason})")
            return
        from cupy.cuda import nccl
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.comm.bcast(unique_id, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.nccl_reason = None
        self.description = f"MPI + NCCL, {self.size} ranks"

    def _nccl_unusable_reason(self) -> str | None:
        """Why NCCL cannot carry this rank's CuPy buffers (None: it can)."""
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as exc:
            return f"cupy.cuda.nccl cannot be imported ({exc})"
        if not getattr(nccl, "available", True):
            return "this CuPy build has no NCCL"
        devices = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > devices:
            return (f"{self.local_size} ranks share {devices} GPU(s) on this node and NCCL "
                    f"needs one GPU per rank")
        return None

    # --- collectives ------------------------------------------------------------------

    def _is_device(self, buffer) -> bool:
        return type(buffer).__module__.split(".")[0] == "cupy"

    def _nccl_type(self, dtype):
        from cupy.cuda import nccl
        return {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                np.dtype(np.float64): nccl.NCCL_FLOAT64}[np.dtype(dtype)]

    def allreduce_sum(self, buffer) -> None:
        if self._is_device(buffer):
            import cupy
            if self.nccl is not None:
                from cupy.cuda import nccl
                stream = cupy.cuda.get_current_stream().ptr
                self.nccl.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size,
                                    self._nccl_type(buffer.dtype), nccl.NCCL_SUM, stream)
                return
            host = cupy.asnumpy(buffer)           # waits for the stream: a synchronous copy
            self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
            buffer.set(host)
            return
        self.comm.Allreduce(self.MPI.IN_PLACE, _host_buffer(buffer), op=self.MPI.SUM)

    def broadcast(self, buffer) -> None:
        if self._is_device(buffer):
            import cupy
            if self.nccl is not None:
                stream = cupy.cuda.get_current_stream().ptr
                self.nccl.bcast(buffer.data.ptr, buffer.size, self._nccl_type(buffer.dtype),
                                0, stream)
                return
            host = cupy.asnumpy(buffer)
            self.comm.Bcast(host, root=0)
            buffer.set(host)
            return
        self.comm.Bcast(_host_buffer(buffer), root=0)

    def _sync_device(self) -> None:
        if self.backend is not None:
            self.backend.synchronize()

    def any(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(bool(flag), op=self.MPI.LOR))

    def allgather(self, obj) -> list:
        self._sync_device()
        return self.comm.allgather(obj)

    def bcast_object(self, obj):
        self._sync_device()
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self._sync_device()
        self.comm.Barrier()

    def abort(self, message: str, code: int = 1):
        sys.stderr.write(message.rstrip() + "\n")
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(code)


def _host_buffer(buffer) -> np.ndarray:
    if not isinstance(buffer, np.ndarray) or not buffer.flags.c_contiguous:
        raise TypeError(f"expected a C-contiguous NumPy array, got {type(buffer).__name__}")
    return buffer


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedUnavailable(
            f"--distributed needs mpi4py and an MPI library ({exc}); install them with "
            f"{INSTALL_HINT}") from exc
    return MPI


def world(backend_name: str | None = None, nccl: str | bool = "auto") -> MPICommunicator:
    """The communicator of this ``mpiexec`` job (a one-rank job when started without it).

    ``backend_name``: with ``cupy`` (or ``auto``, when CuPy imports and sees a GPU), the
    rank's GPU is chosen from its node-local rank before any GPU work, so that each rank
    of a node uses its own GPU (call :meth:`Communicator.attach` with the backend after).
    Raises :class:`DistributedUnavailable` (one line naming what to install) without mpi4py.
    """
    comm = MPICommunicator(nccl=nccl)
    if backend_name in ("cupy", "auto"):
        _select_gpu(comm.local_rank)
    return comm


def _select_gpu(local_rank: int) -> None:
    """Make GPU ``local_rank`` (mod the GPU count) current; nothing without CuPy or a GPU."""
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver: the backend check reports it later
        return
    if count > 0:
        cupy.cuda.Device(local_rank % count).use()


# --------------------------------------------------------------------------------------
# Consistency and failure


def check_same_everywhere(comm: Communicator, what: str, value: Any) -> None:
    """ValueError on every rank when ``value`` (JSON-able) differs between ranks."""
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests = comm.allgather(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{what} differs between ranks (rank 0 and rank {differ[0]}); every "
                         f"rank must run the same command on the same data")


def abort_on_error(comm: Communicator) -> Callable:
    """Install ``sys.excepthook`` so that an uncaught exception on any rank prints that
    rank's one-line message and aborts the whole job (``MPI_Abort``), instead of leaving
    the other ranks waiting in a collective forever. Returns the previous hook.
    Set ``VAE_NP_TRACEBACK=1`` to print the traceback too."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if os.environ.get("VAE_NP_TRACEBACK"):
            previous(kind, value, traceback)
        text = " ".join(str(value).split()) or kind.__name__
        comm.abort(f"rank {comm.rank} of {comm.size}: {kind.__name__}: {text}", 1)

    if comm.size > 1:
        sys.excepthook = hook
    return previous


# --------------------------------------------------------------------------------------
# Sharded evaluation: the single-process numbers, up to the order of the sums


def sharded_test_elbo(model, backend, comm: Communicator, batches: Iterable, rng,
                      check: Callable[[], None] | None = None) -> dict[str, float]:
    """``vae_np.train.evaluation.test_elbo`` with each batch split over the ranks: every
    rank draws the whole batch's noise (the same draws as one process) and scores its rows;
    the image-weighted sums are added up with one allreduce at the end."""
    xp = backend.xp
    total, count = backend.zeros((3,)), 0
    for batch in batches:
        if check is not None:
            check()
        n = batch.shape[0]
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        eps = rng.normal((model.samples, n, model.latent_dim))
        if hi > lo:
            t = model.loss(batch[lo:hi], eps=eps[:, lo:hi], check_finite=False)
            total = total + xp.stack([t.loss, t.kl, t.recon]) * (hi - lo)
        count += n
    comm.allreduce_sum(total)
    loss, kl, recon = (backend.to_numpy(total).astype(np.float64) / count).tolist()
    return {"loss": loss, "kl": kl, "recon": recon}


def sharded_log_likelihood(model, backend, comm: Communicator, batches: Iterable,
                           num_samples: int, rng, check: Callable[[], None] | None = None,
                           on_batch: Callable[[], object] | None = None) -> np.ndarray:
    """``vae_np.train.evaluation.per_image_log_likelihood`` with each batch split over the
    ranks (the same importance samples as one process); every rank gets all N values,
    float64 (N,), in the order of ``batches``."""
    mine = []
    for batch in batches:
        if check is not None:
            check()
        n = batch.shape[0]
        lo, hi = shard_bounds(n, comm.size, comm.rank)
        chunk = log_likelihood_chunk_size(model, n, num_samples)
        if hi > lo:
            values = model.log_likelihood(batch[lo:hi], num_samples=num_samples,
                                          rng=RowsOf(rng, n, lo, hi), chunk_size=chunk,
                                          check_finite=False)
            mine.append(backend.to_numpy(values).astype(np.float64))
        else:  # draw what the other ranks draw, to stay in step with the stream
            for start in range(0, num_samples, chunk):
                rng.normal((min(chunk, num_samples - start), n, model.latent_dim))
            mine.append(np.zeros((0,), dtype=np.float64))
        if on_batch is not None:
            on_batch()
    everyone = comm.allgather(mine)
    return np.concatenate([np.concatenate([ranks[b] for ranks in everyone])
                           for b in range(len(mine))]) if mine else np.zeros((0,))
