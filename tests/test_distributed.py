"""Data-parallel training (vae_np.distributed, TrainConfig.distributed), on the CPU.

The unit tests run in this process (a one-rank communicator, or a stand-in for one rank of
several). The tests marked by ``needs_mpiexec`` launch ``mpiexec -n 2`` on this file's
``worker`` (``python tests/test_distributed.py MODE OUT EPOCHS``) and skip, saying why,
where mpi4py or mpiexec is missing (``pip install -e ".[mpi]"``). Each rank runs with one
BLAS thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from vae_np.backend import get_backend
from vae_np.data import Dataset
from vae_np.distributed import (Communicator, DistributedUnavailable, OtherRankFailed,
                                RanksDiffer, RowsOf, SingleProcess, agree, all_or_none,
                                shard_bounds, world)
from vae_np.model import VAE
from vae_np.optim import Adam
from vae_np.train import RESULTS_FILE, RunData, Stream, Trainer, read_run
from vae_np.train import evaluation  # not its names: pytest would collect test_elbo
from vae_np.train.rundata import dataset_identity

import helpers
from helpers import synthetic_dataset

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
N_TRAIN, N_TEST = 72, 24     # 72 / 16: four full batches and a short one of 8


# uniform noise: the tests compare runs' numbers, not what they learn
tiny_dataset = partial(synthetic_dataset, N_TRAIN, N_TEST, "noise", classes=10, seed=7)
tiny_config = partial(helpers.tiny_config, batch_size=16, lr=1e-3, dtype="float64",
                      eval_samples=5, eval_batch_size=10, samples=2, distributed=True)


#: The mpiexec workers' runs: the config changes of each mode that trains. ``conv``: the
#: convolutional VAE (tiny channels, 28x28 images), conditional, its labels side inputs.
MODES = {"train": {}, "conditional": {"conditional": True},
         "conv": {"architecture": "conv", "channels": (2, 3), "hidden": (8,),
                  "conditional": True}}


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


@pytest.mark.parametrize("mode", ["train", "conv"])
def test_a_one_rank_distributed_run_is_the_plain_run_bit_for_bit(tmp_path, mode):
    dataset = tiny_dataset()
    plain = Trainer(tiny_config(distributed=False, **MODES[mode]), dataset, tmp_path / "plain",
                    log=None, progress=False, pictures=False)
    one = Trainer(tiny_config(**MODES[mode]), dataset, tmp_path / "one", log=None,
                  progress=False, pictures=False, comm=SingleProcess())
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


@pytest.mark.slow
def test_the_cli_without_mpi4py_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None; sys.argv[1:] = ['--distributed', "
            f"'--out', {str(tmp_path)!r}, '--no-download']; "
            f"import runpy; runpy.run_path({str(REPO / 'examples' / 'train_mnist.py')!r}, "
            "run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=one_thread_env())
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "mpi4py" in lines[0] and ".[mpi]" in lines[0]


# --------------------------------------------------------------------------------------
# Ranks agree before they meet: an error on one is raised on all, and the ranks compare
# their config and data first (a stand-in for the other rank's allgather entry)


class TwoRanks(Communicator):
    """Rank ``rank`` of two, whose allgather returns this rank's object and ``theirs``
    as the other rank's. ``calls`` counts the allgathers."""

    def __init__(self, rank: int, theirs):
        self.rank, self.size, self.theirs, self.calls = rank, 2, theirs, 0

    def allgather(self, obj) -> list:
        self.calls += 1
        return [obj, self.theirs] if self.rank == 0 else [self.theirs, obj]


def test_an_error_on_one_rank_is_raised_on_every_rank_one_rank_saying_it():
    with pytest.raises(OtherRankFailed, match="rank 1 failed: boom") as info:
        agree(TwoRanks(0, ((1, "boom"), {})))          # rank 0 did fine, rank 1 did not
    assert info.value.rank == 1
    mine = ValueError("mine")
    with pytest.raises(ValueError) as info:
        agree(TwoRanks(1, (None, {})), mine)
    assert info.value is mine
    with pytest.raises(OtherRankFailed, match="rank 0 failed: first"):  # the lowest says it
        agree(TwoRanks(1, ((0, "first"), {})), ValueError("second"))
    agree(TwoRanks(0, (None, {})))                      # no failure: nothing raised
    # an error agreed in an inner block passes the outer one without a second allgather
    comm = TwoRanks(0, ((1, "inner"), {}))
    with pytest.raises(OtherRankFailed):
        with all_or_none(comm):
            with all_or_none(comm):
                pass
    assert comm.calls == 1


def test_ranks_with_other_data_or_config_are_refused_naming_the_difference(tmp_path):
    """What rank 1 sends when its data set has one pixel changed (the same sizes), or its
    lr differs: rank 0 names the field with both values, rank 1 raises OtherRankFailed."""
    dataset = tiny_dataset()
    changed = tiny_dataset()
    changed.x_train[3, 100] = 1.0 - changed.x_train[3, 100]
    config = tiny_config().to_dict()

    def sent(config, data) -> tuple:
        return None, json.loads(json.dumps({"config": config, "data": dataset_identity(data)}))

    with pytest.raises(RanksDiffer, match=r"data\.fingerprint is '[0-9a-f]{64}' on rank 0 but "
                                          r"'[0-9a-f]{64}' on rank 1; every rank") as info:
        Trainer(tiny_config(), dataset, tmp_path / "a", log=None, progress=False,
                pictures=False, comm=TwoRanks(0, sent(config, changed)))
    assert "\n" not in str(info.value)
    with pytest.raises(RanksDiffer, match=r"config\.lr is 0\.001 on rank 0 but 0\.01 on rank 1"):
        Trainer(tiny_config(), dataset, tmp_path / "b", log=None, progress=False,
                pictures=False, comm=TwoRanks(0, sent({**config, "lr": 0.01}, dataset)))
    with pytest.raises(OtherRankFailed, match="data.n_train is 72 on rank 0 but 71"):
        fewer = Dataset(dataset.x_train[:71], dataset.y_train[:71], dataset.x_test,
                        dataset.y_test, source="synthetic", description="fewer")
        Trainer(tiny_config(), fewer, tmp_path / "c", log=None, progress=False,
                pictures=False, comm=TwoRanks(1, sent(config, dataset)))
    # the same data and config: no error, and the digest is the data's own
    assert dataset_identity(tiny_dataset()) == dataset_identity(dataset)


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
                           str(out), str(epochs)], cwd=out, capture_output=True, text=True,
                          timeout=timeout, env=one_thread_env())


def worker(mode: str, out: str, epochs: str) -> None:
    """One rank of an mpiexec test: train (``train``; ``conditional``: a conditional
    model; ``conv``: a conditional conv VAE; see ``MODES``), resume (``resume``) or raise
    on rank 1 (``raise``); every rank saves its final parameters as ``out/rank<r>.npy``."""
    from vae_np.distributed import abort_on_error, world

    comm = world("numpy")
    abort_on_error(comm)
    out_dir, dataset = Path(out), tiny_dataset()
    options = dict(log=None, progress=False, pictures=False, comm=comm)
    if mode == "resume":
        trainer = Trainer.resume(out_dir / "run", dataset, overrides={"epochs": int(epochs)},
                                 **options)
    else:
        config = tiny_config(epochs=int(epochs), **MODES.get(mode, {}))
        trainer = Trainer(config, dataset, out_dir / "run", **options)
    if mode == "raise" and comm.rank == 1:
        raise RuntimeError("boom on rank 1")
    trainer.fit()
    np.save(out_dir / f"rank{comm.rank}.npy", parameters(trainer))


def shard_sum_reference(epochs: int, size: int, **changes) -> np.ndarray:
    """The run of ``tiny_config(**changes)`` computed in one process, each global batch's
    gradient the sum, in rank order, of the ``size`` shards' weighted gradients (each shard
    with its own rows' labels, for a conditional model)."""
    config = tiny_config(epochs=epochs, **changes)
    conditional = config.conditional
    backend = get_backend("numpy", "float64")
    model = VAE(input_dim=784, backend=backend, num_classes=10 if conditional else None,
                **config.model_kwargs())
    opt = Adam(model.parameters, lr=config.lr)
    data = RunData(tiny_dataset(), config, backend)
    for epoch in range(1, epochs + 1):
        order, bounds = data.epoch_batches(epoch)
        x = data.epoch_train_data(epoch, order)
        y = data.y_train[order]
        noise = backend.rng(data.key(Stream.NOISE, epoch))
        for b in range(len(bounds) - 1):
            batch = x[int(bounds[b]):int(bounds[b + 1])]
            labels = y[int(bounds[b]):int(bounds[b + 1])]
            n = batch.shape[0]
            eps = noise.normal((config.samples, n, config.latent_dim))
            total = None
            for rank in range(size):
                lo, hi = shard_bounds(n, size, rank)
                model.loss(batch[lo:hi], eps=eps[:, lo:hi], check_finite=False,
                           y=labels[lo:hi] if conditional else None)
                model.backward()
                g = model.parameters.grad * ((hi - lo) / n)
                total = g if total is None else total + g
            model.parameters.grad[...] = total
            opt.step()
    return backend.to_numpy(model.parameters.data)


@pytest.mark.slow
@needs_mpiexec
@pytest.mark.parametrize("mode", ["train", "conditional", "conv"])
def test_two_ranks_train_the_one_rank_model(tmp_path, mode):
    conditional = MODES[mode].get("conditional", False)
    done = mpiexec(2, mode, tmp_path, 2)
    assert done.returncode == 0, done.stderr
    two = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(two[0], two[1])        # every rank took the same steps
    one = Trainer(tiny_config(**MODES[mode]), tiny_dataset(), tmp_path / "one",
                  log=None, progress=False, pictures=False, comm=SingleProcess())
    results = one.fit()
    single = parameters(one)
    assert np.linalg.norm(two[0] - single) <= 1e-12 * np.linalg.norm(single)
    # and the same bits as one process summing the two shards in rank order
    np.testing.assert_array_equal(two[0], shard_sum_reference(2, 2, **MODES[mode]))
    # rank 0 wrote the run; the checkpoint records the ranks
    saved = read_run(tmp_path / "run")
    assert saved.ranks == 2 and saved.epochs_done == 2
    assert (saved.model_config["num_classes"] == 10) == conditional
    assert saved.model_config["architecture"] == MODES[mode].get("architecture", "mlp")
    # the sharded test ELBO and ln p(x) (with labels) are the one-rank numbers
    sharded = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert sharded["final_epoch"]["test_loss"] == pytest.approx(
        results["final_epoch"]["test_loss"], rel=1e-12)
    assert sharded["test_log_likelihood"]["mean"] == pytest.approx(
        results["test_log_likelihood"]["mean"], rel=1e-12)


@pytest.mark.slow
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


@pytest.mark.slow
@needs_mpiexec
def test_one_rank_raising_ends_the_whole_job(tmp_path):
    done = mpiexec(2, "raise", tmp_path, 2, timeout=60)   # a hang would be a TimeoutExpired
    assert done.returncode != 0
    assert "rank 1 of 2: RuntimeError: boom on rank 1" in done.stderr
    assert not (tmp_path / "rank0.npy").exists()


def write_npz(path: Path, flip: bool = False) -> Path:
    """tiny_dataset() as an .npz a user would give --dataset (one pixel changed: ``flip``)."""
    data = tiny_dataset()
    if flip:
        data.x_train[0, 0] = 1.0 - data.x_train[0, 0]
    np.savez(path, x_train=data.x_train, x_test=data.x_test)
    return path


def vae_np_train_on_two_ranks(tmp_path: Path, rank0: list[str], rank1: list[str]):
    """``mpiexec -n 1 vae-np train ... : -n 1 vae-np train ...``: rank 0 and rank 1 with
    their own flags (an MPMD launch), a tiny model, one epoch."""
    common = ["-m", "vae_np", "train", "--distributed", "--no-progress", "--no-pictures",
              "--hidden", "8", "--latent-dim", "2", "--batch-size", "16", "--epochs", "1",
              "--eval-samples", "2", "--out", str(tmp_path / "run")]
    command = [MPIEXEC, "-n", "1", sys.executable, *common, *rank0,
               ":", "-n", "1", sys.executable, *common, *rank1]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=one_thread_env())


@pytest.mark.slow
@needs_mpiexec
def test_ranks_given_other_data_sets_stop_at_once_with_one_line(tmp_path):
    """#19 item 8: two --dataset files of the same sizes; they used to hang forever."""
    a, b = write_npz(tmp_path / "a.npz"), write_npz(tmp_path / "b.npz", flip=True)
    done = vae_np_train_on_two_ranks(tmp_path, ["--dataset", str(a)], ["--dataset", str(b)])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("vae-np train: error (rank 0 of 2): the ranks differ: "
                               "data.fingerprint is '")
    assert "on rank 1; every rank must run the same command on the same data" in lines[0]
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


# Three of the twenty tries (all twenty passed by hand): the line used to arrive
# late, not at all, or with an UnboundLocalError after it.
@pytest.mark.slow
@needs_mpiexec
@pytest.mark.parametrize("failing", [1, 1, 0])
def test_a_data_error_on_one_rank_is_one_line_from_that_rank(tmp_path, failing):
    good, missing = write_npz(tmp_path / "good.npz"), tmp_path / "missing.npz"
    flags = [["--dataset", str(good)], ["--dataset", str(good)]]
    flags[failing] = ["--dataset", str(missing)]
    done = vae_np_train_on_two_ranks(tmp_path, *flags)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"vae-np train: error (rank {failing} of 2): dataset: no such file {missing}"]


if __name__ == "__main__":
    worker(*sys.argv[1:])
