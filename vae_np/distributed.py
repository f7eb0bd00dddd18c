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
    agree(comm, error, **same) where the ranks compare notes before a collective: an
                               error on one rank is raised on all of them (the others
                               raise OtherRankFailed naming it), and values that differ
                               between ranks (config, data) are a RanksDiffer naming them
    all_or_none(comm)          a with-block that fails on every rank or on none (agree)
    abort_on_error(comm)       an uncaught exception on any rank ends the whole job (MPI
                               Abort): the fallback where no agree() is reached

Reductions. NumPy: ``MPI.Allreduce`` in place on the host buffer. CuPy: NCCL
(``cupy.cuda.nccl.NcclCommunicator``, its unique id broadcast with mpi4py) on the current
stream when every rank has a GPU of its own (one GPU per rank, chosen from the node-local
rank); otherwise (two ranks on one GPU, which NCCL refuses, or no NCCL in the CuPy build) a
host-staged MPI path. The stream is synchronised before any host-side MPI call.
The CuPy/NCCL paths have not been run on a GPU by the author (no GPU where it was written).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from .backend import RNG

__all__ = ["INSTALL_HINT", "Communicator", "DistributedUnavailable", "MPICommunicator",
           "OtherRankFailed", "RanksDiffer", "RowsOf", "SingleProcess", "abort_on_error",
           "agree", "all_or_none",
           "one_line", "shard_bounds", "world"]

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
        return self.base.normal((shape[0], self.n, *shape[2:]))[:, self.lo:self.hi, ...]

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
        os._exit(code)  # MPI_Abort may return before the job is torn down: never run on


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


class OtherRankFailed(RuntimeError):
    """Raised by :func:`agree` on the ranks that do not report a failure: ``rank`` is the
    rank that does (the lowest one that failed), ``message`` its error on one line."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message = rank, message


class RanksDiffer(ValueError):
    """The ranks of a job were given different values (config, data): raised by
    :func:`agree` on rank 0, while the others raise OtherRankFailed."""


#: The attribute :func:`agree` sets on what it raises: the job has agreed on this error
#: already, so an enclosing ``all_or_none`` lets it pass instead of agreeing again (a
#: rank that failed early meets the others at their first agreement, whichever it is).
AGREED = "agreed_by_every_rank"


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def agree(comm: Communicator, error: BaseException | None = None, **same) -> None:
    """Where the ranks compare notes before a collective that a failed rank would never
    join (the others would wait in it forever): one allgather of every rank's ``error``
    (None: it did fine) and of the values ``same`` (JSON-able, or functions returning
    them, called only where there are other ranks to compare with).

    Raises on every rank or on none, and one rank only raises the real error, so that
    one line says it: where some rank failed, the lowest such rank re-raises its own
    ``error``; else, where a value of ``same`` differs between ranks, rank 0 raises
    :class:`RanksDiffer` naming the first field that differs, with rank 0's value and the
    other rank's. Every other rank raises :class:`OtherRankFailed` naming that rank.
    """
    mine = None if error is None else (comm.rank, one_line(error))
    values = {}
    if mine is None and comm.size > 1:  # the JSON round trip makes tuples lists everywhere
        values = {name: json.loads(json.dumps(value() if callable(value) else value,
                                              sort_keys=True, default=str))
                  for name, value in same.items()}
    everyone = comm.allgather((mine, values))
    failed = sorted(failure for failure, _ in everyone if failure is not None)
    if failed:
        rank, message = failed[0]
        _raise_agreed(error if rank == comm.rank else OtherRankFailed(rank, message))
    for rank, (_, theirs) in enumerate(everyone[1:], start=1):
        for name in sorted(same):
            if theirs[name] != everyone[0][1][name]:
                field, ours, other = _first_difference(everyone[0][1][name], theirs[name], name)
                message = (f"the ranks differ: {field} is {ours!r} on rank 0 but {other!r} on "
                           f"rank {rank}; every rank must run the same command on the same "
                           f"data")
                _raise_agreed(RanksDiffer(message) if comm.is_root
                              else OtherRankFailed(0, message))


def _raise_agreed(error: BaseException):
    setattr(error, AGREED, True)
    raise error


@contextlib.contextmanager
def all_or_none(comm: Communicator, **same):
    """``with all_or_none(comm):`` the block succeeds on every rank or raises on every rank:
    an exception in it, on any rank, is raised at its end on all of them (the others
    raise OtherRankFailed), after one :func:`agree`, which also compares the values
    ``same``. For the rank-local work before a collective, so that no rank is left
    waiting in it. An error agreed on already (by an inner block) passes as it is."""
    error = None
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 (raised again by agree, on every rank)
        if getattr(exc, AGREED, False):
            raise
        error = exc
    agree(comm, error, **same)


def _first_difference(a, b, field: str) -> tuple[str, Any, Any]:
    """(dotted name, a's value, b's value) of the first entry where ``a`` and ``b`` differ,
    in ``a``'s order (then ``b``'s extra keys): a data set's sizes come before its
    fingerprint (``vae_np.train.rundata.dataset_identity``), the clearer difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{field}.{key}")
    return field, a, b


def abort_on_error(comm: Communicator) -> Callable:
    """Install ``sys.excepthook`` so that an uncaught exception on any rank prints that
    rank's one-line message and aborts the whole job (``MPI_Abort``), instead of leaving
    the other ranks waiting in a collective forever. Returns the previous hook.
    Set ``VAE_NP_TRACEBACK=1`` to print the traceback too."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if os.environ.get("VAE_NP_TRACEBACK"):
            previous(kind, value, traceback)
        if isinstance(value, OtherRankFailed):
            return  # the failing rank says why (and aborts); exit status 1 here
        comm.abort(f"rank {comm.rank} of {comm.size}: {kind.__name__}: {one_line(value)}", 1)

    if comm.size > 1:
        sys.excepthook = hook
    return previous
