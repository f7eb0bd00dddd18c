"""Data-parallel training (vae_np.distributed, TrainConfig.distributed), on the CPU.

The unit tests run in this process (a one-rank communicator, or a stand-in for one rank of
several). The tests marked by ``needs_mpiexec`` launch ``mpiexec -n 2`` on this file's
``worker`` (``python tests/test_distributed.py MODE OUT EPOCHS``) and skip, saying why,
where mpi4py or mpiexec is missing (``pip install -e ".[mpi]"``). Each rank runs with one
BLAS thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vae_np.backend import get_backend
from vae_np.data import Dataset
from vae_np.distributed import (Communicator, DistributedUnavailable, RowsOf, SingleProcess,
                                shard_bounds, world)
from vae_np.model import VAE
from vae_np.optim import Adam
from vae_np.train import RunData, Stream, TrainConfig, Trainer
from vae_np.train import evaluation  # not its names: pytest would collect test_elbo

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
N_TRAIN, N_TEST = 72, 24     # 72 / 16: four full batches and a short one of 8


def tiny_dataset() -> Dataset:
    rng = np.random.default_rng(7)
    x = rng.random((N_TRAIN + N_TEST, 784)).astype(np.float32)
    y = rng.integers(0, 10, N_TRAIN + N_TEST)
    return Dataset(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:],
                   source="synthetic", description="synthetic test digits")


def tiny_config(epochs: int = 2, **changes) -> TrainConfig:
    values = dict(hidden=(8,), latent_dim=2, batch_size=16, epochs=epochs, dtype="float64",
                  eval_samples=5, eval_batch_size=10, log_every=2, samples=2,
                  distributed=True)
    values.update(changes)
    return TrainConfig(**values)


def parameters(trainer) -> np.ndarray:
    return trainer.backend.to_numpy(trainer.model.parameters.data).copy()


class OneRankOf(Communicator):
    """Rank ``rank`` of ``size`` with the collectives as identities: what one rank
    computes before anything is summed."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


# --------------------------------------------------------------------------------------
# Sharding and keyed noise


@pytest.mark.parametrize("n,size", [(16, 2), (16, 4), (8, 3), (2, 4), (0, 2), (7, 1)])
def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one_row(n, size):
    bounds = [shard_bounds(n, size, r) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1
    if n % size == 0:
        assert sizes == [n // size] * size


def test_shard_bounds_refuses_a_rank_outside_the_job():
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(8, 2, 2)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_each_rank_draws_exactly_the_single_process_eps(size):
    backend = get_backend("numpy", "float64")
    n, s, d = 10, 3, 4
    whole = backend.rng((0, 6, 1)).normal((s, n, d))            # one process, one batch
    for rank in range(size):
        lo, hi = shard_bounds(n, size, rank)
        if hi == lo:
            continue
        mine = RowsOf(backend.rng((0, 6, 1)), n, lo, hi).normal((s, hi - lo, d))
        np.testing.assert_array_equal(mine, whole[:, lo:hi])


def test_rows_of_keeps_the_stream_in_step_over_chunks():
    """K drawn in chunks of (k, rows, d): each chunk is the single-process chunk's rows."""
    backend = get_backend("numpy", "float64")
    full, view = backend.rng(3), RowsOf(backend.rng(3), 6, 2, 5)
    for k in (4, 1, 3):
        np.testing.assert_array_equal(view.normal((k, 3, 2)), full.normal((k, 6, 2))[:, 2:5])


# --------------------------------------------------------------------------------------
# Sharded evaluation: the single-process numbers


@pytest.mark.parametrize("conditional", [False, True])
def test_sharded_evaluation_adds_up_to_the_single_process_numbers(conditional):
    """Each of 3 ranks scores its rows of every batch; the shares add up to one process's
    numbers, which are those of the model's own loss and log_likelihood on whole batches
    (labels split with the images, for a conditional model)."""
    backend = get_backend("numpy", "float64")
    model = VAE(784, hidden=(8,), latent_dim=3, samples=2, backend=backend, seed=1,
                num_classes=4 if conditional else None)
    x = backend.asarray(np.random.default_rng(2).random((25, 784)))
    y = np.random.default_rng(3).integers(0, 4, 25) if conditional else None
    batches = [x[0:10], x[10:20], x[20:25]]
    labels = [y[0:10], y[10:20], y[20:25]] if conditional else None
    labels_of = (lambda b: labels[b]) if conditional else (lambda b: None)
    elbo = evaluation.test_elbo(model, backend, batches, backend.rng(5), labels=labels)
    log_px = evaluation.per_image_log_likelihood(model, backend, batches, 7, backend.rng(6),
                                                 labels=labels)
    # the plain model calls, batch by batch, on the same streams
    rng = backend.rng(5)
    whole = [model.loss(batch, rng=rng, y=labels_of(b)) for b, batch in enumerate(batches)]
    assert elbo["loss"] == pytest.approx(
        sum(float(t.loss) * len(batch) for t, batch in zip(whole, batches)) / 25, rel=1e-12)
    rng = backend.rng(6)
    np.testing.assert_allclose(log_px, np.concatenate([
        model.log_likelihood(batch, 7, rng, y=labels_of(b)) for b, batch in enumerate(batches)]),
        rtol=1e-12)
    size = 3
    parts = [evaluation.test_elbo(model, backend, batches, backend.rng(5), labels=labels,
                                  comm=OneRankOf(r, size)) for r in range(size)]
    for key in ("loss", "kl", "recon"):  # each rank's share of the image-weighted sums
        assert sum(p[key] for p in parts) == pytest.approx(elbo[key], rel=1e-12)
    rows = [evaluation.per_image_log_likelihood(model, backend, batches, 7, backend.rng(6),
                                                labels=labels, comm=OneRankOf(r, size))
            for r in range(size)]
    # each rank returns its rows batch by batch: put them back in the batches' order
    pieces, offsets = [], [0] * size
    for batch in batches:
        for r in range(size):
            lo, hi = shard_bounds(batch.shape[0], size, r)
            pieces.append(rows[r][offsets[r]:offsets[r] + hi - lo])
            offsets[r] += hi - lo
    np.testing.assert_allclose(np.concatenate(pieces), log_px, rtol=1e-12)


# --------------------------------------------------------------------------------------
# The trainer with a one-rank communicator, and one rank of several


def test_a_one_rank_distributed_run_is_the_plain_run_bit_for_bit(tmp_path):
    dataset = tiny_dataset()
    plain = Trainer(tiny_config(distributed=False), dataset, tmp_path / "plain", log=None,
                    progress=False, pictures=False)
    one = Trainer(tiny_config(), dataset, tmp_path / "one", log=None, progress=False,
                  pictures=False, comm=SingleProcess())
    a, b = plain.fit(), one.fit()
    np.testing.assert_array_equal(parameters(plain), parameters(one))
    assert a["final_epoch"]["test_loss"] == b["final_epoch"]["test_loss"]
    assert a["test_log_likelihood"]["mean"] == b["test_log_likelihood"]["mean"]


def test_only_rank_0_writes(tmp_path):
    out = tmp_path / "out"
    messages = []
    trainer = Trainer(tiny_config(epochs=1), tiny_dataset(), out, log=messages.append,
                      progress=True, pictures=True, comm=OneRankOf(1, 2))
    trainer.fit()
    assert not out.exists() or list(out.iterdir()) == []
    assert messages == [] and not trainer.progress and not trainer.pictures


def test_the_global_batch_must_divide_by_the_ranks(tmp_path):
    with pytest.raises(ValueError, match="batch_size: 16 .* 3 ranks"):
        Trainer(tiny_config(), tiny_dataset(), tmp_path, comm=OneRankOf(0, 3))


def test_without_mpi4py_distributed_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # "import mpi4py" raises ImportError
    with pytest.raises(DistributedUnavailable, match=r'pip install -e "\.\[mpi\]"') as info:
        world("numpy")
    assert "\n" not in str(info.value)


def test_the_cli_without_mpi4py_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None; sys.argv[1:] = ['--distributed', "
            f"'--out', {str(tmp_path)!r}, '--no-download']; "
            "import runpy; runpy.run_path('examples/train_mnist.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=one_thread_env())
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mpi4py" in lines[0] and ".[mpi]" in lines[0]


# --------------------------------------------------------------------------------------
# mpiexec


def find_mpiexec() -> tuple[str | None, str]:
    """(mpiexec, "") or (None, why not)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, 'mpi4py is not installed (pip install -e ".[mpi]")'
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        return None, f'no mpiexec beside {sys.executable} or on PATH (pip install -e ".[mpi]")'
    return found, ""


MPIEXEC, WHY_NOT = find_mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason=WHY_NOT or "")


def one_thread_env() -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def mpiexec(ranks: int, mode: str, out: Path, epochs: int, timeout: float = 60):
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(HERE), mode,
                           str(out), str(epochs)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=one_thread_env())


def worker(mode: str, out: str, epochs: str) -> None:
    """One rank of an mpiexec test: train (``train``), resume (``resume``) or raise on
    rank 1 (``raise``); every rank saves its final parameters as ``out/rank<r>.npy``."""
    from vae_np.distributed import abort_on_error, world

    comm = world("numpy")
    abort_on_error(comm)
    out_dir, dataset = Path(out), tiny_dataset()
    options = dict(log=None, progress=False, pictures=False, comm=comm)
    if mode == "resume":
        trainer = Trainer.resume(out_dir / "run", dataset, overrides={"epochs": int(epochs)},
                                 **options)
    else:
        trainer = Trainer(tiny_config(int(epochs)), dataset, out_dir / "run", **options)
    if mode == "raise" and comm.rank == 1:
        raise RuntimeError("boom on rank 1")
    trainer.fit()
    np.save(out_dir / f"rank{comm.rank}.npy", parameters(trainer))


def shard_sum_reference(epochs: int, size: int) -> np.ndarray:
    """The run of ``tiny_config`` computed in one process, each global batch's gradient
    the sum, in rank order, of the ``size`` shards' weighted gradients."""
    config = tiny_config(epochs)
    backend = get_backend("numpy", "float64")
    model = VAE(input_dim=784, backend=backend, **config.model_kwargs())
    opt = Adam(model.parameters, lr=config.lr)
    data = RunData(tiny_dataset(), config, backend)
    for epoch in range(1, epochs + 1):
        order, bounds = data.epoch_batches(epoch)
        x = data.epoch_train_data(epoch, order)
        noise = backend.rng(data.key(Stream.NOISE, epoch))
        for b in range(len(bounds) - 1):
            batch = x[int(bounds[b]):int(bounds[b + 1])]
            n = batch.shape[0]
            eps = noise.normal((config.samples, n, config.latent_dim))
            total = None
            for rank in range(size):
                lo, hi = shard_bounds(n, size, rank)
                model.loss(batch[lo:hi], eps=eps[:, lo:hi], check_finite=False)
                model.backward()
                g = model.parameters.grad * ((hi - lo) / n)
                total = g if total is None else total + g
            model.parameters.grad[...] = total
            opt.step()
    return backend.to_numpy(model.parameters.data)


@needs_mpiexec
def test_two_ranks_train_the_one_rank_model(tmp_path):
    done = mpiexec(2, "train", tmp_path, 2)
    assert done.returncode == 0, done.stderr
    two = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(two[0], two[1])        # every rank took the same steps
    one = Trainer(tiny_config(), tiny_dataset(), tmp_path / "one", log=None, progress=False,
                  pictures=False, comm=SingleProcess())
    one.fit()
    single = parameters(one)
    assert np.linalg.norm(two[0] - single) <= 1e-12 * np.linalg.norm(single)
    # and the same bits as one process summing the two shards in rank order
    np.testing.assert_array_equal(two[0], shard_sum_reference(2, 2))
    # rank 0 wrote the run; the checkpoint records the ranks
    from vae_np.train import read_run
    saved = read_run(tmp_path / "run")
    assert saved.ranks == 2 and saved.epochs_done == 2


@needs_mpiexec
def test_resume_under_mpiexec_continues_the_run_bit_for_bit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir(), parts.mkdir()
    assert mpiexec(2, "train", whole, 2).returncode == 0
    first = mpiexec(2, "train", parts, 1)
    assert first.returncode == 0, first.stderr
    again = mpiexec(2, "resume", parts, 2)
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.load(parts / "rank0.npy"), np.load(whole / "rank0.npy"))
    # another number of ranks: refused, saying how many the run needs
    with pytest.raises(ValueError, match=r"trained on 2 MPI rank.*mpiexec -n 2"):
        Trainer.resume(parts / "run", tiny_dataset(), overrides={"epochs": 3}, log=None,
                       progress=False, pictures=False, comm=SingleProcess())


@needs_mpiexec
def test_one_rank_raising_ends_the_whole_job(tmp_path):
    done = mpiexec(2, "raise", tmp_path, 2, timeout=60)   # a hang would be a TimeoutExpired
    assert done.returncode != 0
    assert "rank 1 of 2: RuntimeError: boom on rank 1" in done.stderr
    assert not (tmp_path / "rank0.npy").exists()


if __name__ == "__main__":
    worker(*sys.argv[1:])
