"""Tests for vae_np.train: the loss falls, files appear, resume is exact, Ctrl-C and NaN stop.

Every test trains a tiny model (784-16-2) on a tiny synthetic data set: 64 train and 32 test
"digits" made of four prototype patterns, so a few epochs visibly lower the loss.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

from vae_np import get_backend
from vae_np.backend import Backend
from vae_np.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vae_np.data import Dataset, binarize
from vae_np.train import (
    CHECKPOINT_FILE, EPOCH_METRICS, LOCK_FILE, METRICS_FILE, RESULTS_FILE, OutDirInUse,
    OutDirLock, Stream, TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted,
    check_out_dir,
)
from vae_np.train.guards import StopOnCtrlC

import helpers
from helpers import synthetic_dataset

N_TRAIN, N_TEST, BATCH = 64, 32, 16
BATCHES_PER_EPOCH = N_TRAIN // BATCH


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    """Four random prototype images, each image a prototype with grey-level noise."""
    return synthetic_dataset(N_TRAIN, N_TEST)


tiny_config = partial(helpers.tiny_config, hidden=(16,), batch_size=BATCH, epochs=3,
                      eval_samples=8, eval_batch_size=16)


def make_trainer(config, dataset, out_dir, **options) -> Trainer:
    options = {"log": None, "progress": False, "pictures": False, **options}
    return Trainer(config, dataset, out_dir, **options)


def resume(out_dir, dataset, **overrides) -> Trainer:
    return Trainer.resume(out_dir, dataset, overrides=overrides, log=None, progress=False,
                          pictures=False)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    """Parameters and optimizer state equal bit for bit; per-epoch losses equal."""
    params_a, params_b = a.model.state_dict(), b.model.state_dict()
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert np.array_equal(params_a[name], params_b[name]), name
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a.keys() == opt_b.keys()
    for name in opt_a:
        assert np.array_equal(opt_a[name], opt_b[name]), name
    losses = [k for k in EPOCH_METRICS if k.startswith(("train_l", "train_k", "train_r", "test"))]
    assert [[e[k] for k in losses] for e in a.history] == \
        [[e[k] for k in losses] for e in b.history]


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory) -> Trainer:
    """Three uninterrupted epochs: what every interrupted and resumed run must match."""
    trainer = make_trainer(tiny_config(), dataset, tmp_path_factory.mktemp("reference"))
    trainer.fit()
    return trainer


# --------------------------------------------------------------------------------------
# Training works and writes its files


def test_a_few_epochs_lower_the_loss(reference_run):
    history = reference_run.history
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 20
    assert history[-1]["test_loss"] < history[0]["test_loss"] - 20
    for entry in history:
        assert set(entry) == set(EPOCH_METRICS)
        # negative ELBO = reconstruction + KL (beta = 1), KL >= 0
        assert entry["test_loss"] == pytest.approx(entry["test_recon"] + entry["test_kl"])
        assert entry["train_kl"] >= 0 and entry["test_kl"] >= 0
    assert history[-1]["updates"] == 3 * BATCHES_PER_EPOCH


def test_metrics_and_results_files(reference_run):
    out = reference_run.out_dir
    lines = (out / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == reference_run.history
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["epochs"] == 3 and results["final_epoch"] == reference_run.history[-1]
    assert results["config"] == reference_run.config.to_dict()
    log_px = results["test_log_likelihood"]
    assert log_px["num_samples"] == 8 and log_px["n_images"] == N_TEST
    # ln p(x) >= ELBO: the importance-sampled estimate sits above -(negative ELBO).
    assert -results["final_epoch"]["test_loss"] - 2.0 < log_px["mean"] < 0


def test_every_output_file_exists_and_the_pngs_decode(dataset, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    trainer = make_trainer(tiny_config(epochs=2), dataset, tmp_path, pictures=True)
    trainer.fit()
    pictures = ["reconstructions.png", "samples.png", "loss_curves.png", "manifold.png",
                "latent_scatter.png"]
    for name in [CHECKPOINT_FILE, METRICS_FILE, RESULTS_FILE, *pictures]:
        assert (tmp_path / name).is_file(), name
    for name in pictures:
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_latent_maps_only_for_two_latent_dimensions(dataset, tmp_path):
    trainer = make_trainer(tiny_config(epochs=1, latent_dim=3, eval_samples=0), dataset,
                           tmp_path, pictures=True)
    paths = trainer.fit() and trainer.save_pictures()
    assert sorted(p.name for p in paths) == ["loss_curves.png", "reconstructions.png",
                                             "samples.png"]
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["test_log_likelihood"] is None


def test_log_reports_each_epoch_and_the_final_likelihood(dataset, tmp_path):
    messages = []
    make_trainer(tiny_config(epochs=2), dataset, tmp_path, log=messages.append).fit()
    text = "\n".join(messages)
    assert "epoch   1/2" in text and "epoch   2/2" in text
    assert "test -ELBO" in text and "images/s" in text and "KL" in text
    assert "test ln p(x) =" in text and "K = 8" in text


# --------------------------------------------------------------------------------------
# Resume: bit for bit the uninterrupted run


def test_resume_after_an_epoch_equals_the_uninterrupted_run(reference_run, dataset, tmp_path):
    make_trainer(tiny_config(epochs=1), dataset, tmp_path).fit()
    resumed = resume(tmp_path, dataset, epochs=3)
    assert (resumed.epochs_done, resumed.batches_done) == (1, 0)
    resumed.fit()
    assert_same_state(resumed, reference_run)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def interrupt_at(trainer: Trainer, update: int, how: str) -> None:
    """Make the trainer meet Ctrl-C during training update number ``update`` (1-based).

    how = "sigint": a real SIGINT, delivered inside the backward pass (the trainer's
    handler lets the batch finish); "raise": a KeyboardInterrupt out of the backward pass;
    "in-update": a KeyboardInterrupt out of the optimizer step, leaving a half-done update.
    """
    target = trainer.optimizer if how == "in-update" else trainer.model
    method_name = "step" if how == "in-update" else "backward"
    method = getattr(target, method_name)
    calls = [0]

    def wrapped():
        calls[0] += 1
        method()
        if calls[0] == update:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt

    setattr(target, method_name, wrapped)


@pytest.mark.parametrize("how, expected_position", [
    ("sigint", (1, 2)),      # stops after finishing update 6 = epoch 2, batch 2
    ("raise", (1, 1)),       # update 6 never happened: epoch 2 after batch 1
    ("in-update", (1, 0)),   # half-done update: the end-of-epoch-1 checkpoint is kept
])
def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_resume_is_exact(
        how, expected_position, reference_run, dataset, tmp_path, sigint):
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    interrupt_at(trainer, BATCHES_PER_EPOCH + 2, how)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.epochs_done, info.value.batches_done) == expected_position
    assert info.value.checkpoint == tmp_path / CHECKPOINT_FILE
    _, meta = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert (meta["position"]["epochs_done"], meta["position"]["batches_done"]) \
        == expected_position
    assert signal.getsignal(signal.SIGINT) is sigint  # the handler it found, put back

    resumed = resume(tmp_path, dataset)
    resumed.fit()
    assert_same_state(resumed, reference_run)


@pytest.mark.parametrize("sigint", [signal.SIG_IGN], ids=["SIG_IGN"], indirect=True)
def test_where_sigint_is_ignored_a_sigint_changes_nothing(sigint, reference_run, dataset,
                                                          tmp_path):
    """A run started in the background (``cmd &`` in a script) inherits an ignored SIGINT:
    the trainer installs nothing, the run ends as if never signalled, SIGINT stays ignored."""
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    interrupt_at(trainer, BATCHES_PER_EPOCH + 2, "sigint")
    try:
        trainer.fit()
    except KeyboardInterrupt as stopped:  # a failure, not the end of the pytest session
        pytest.fail(f"an ignored SIGINT stopped the run: {stopped}")
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert_same_state(trainer, reference_run)


def own_handler(signum, frame):
    """A SIGINT handler of the user's own, for the guard to put back."""


@pytest.mark.parametrize("sigint", [signal.default_int_handler, signal.SIG_DFL, own_handler,
                                    signal.SIG_IGN],
                         ids=["default_int_handler", "SIG_DFL", "own", "SIG_IGN"],
                         indirect=True)
def test_the_ctrl_c_guard_puts_back_the_handler_it_found(sigint):
    stop = StopOnCtrlC()
    with stop:
        if sigint is signal.SIG_IGN:  # ignored: nothing installed, Ctrl-C stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        else:  # the first Ctrl-C is a request, and the handler found takes the second
            assert signal.getsignal(signal.SIGINT) is not sigint
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and signal.getsignal(signal.SIGINT) is sigint
    assert signal.getsignal(signal.SIGINT) is sigint
    if stop.requested:
        with pytest.raises(KeyboardInterrupt):
            stop.check()


def test_ctrl_c_during_evaluation_resumes_with_the_epoch_trained(reference_run, dataset,
                                                                 tmp_path):
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    evaluate = trainer.evaluate

    def interrupted_evaluate(*args, **kwargs):
        if trainer.optimizer.t == 2 * BATCHES_PER_EPOCH:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    trainer.evaluate = interrupted_evaluate
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert (info.value.epochs_done, info.value.batches_done) == (1, BATCHES_PER_EPOCH)
    resumed = resume(tmp_path, dataset)
    resumed.fit()
    assert_same_state(resumed, reference_run)


def test_resume_keeps_the_run_definition(reference_run, dataset):
    out = reference_run.out_dir
    with pytest.raises(ValueError, match=r"hidden.*\(16,\).*cannot continue"):
        resume(out, dataset, hidden=(8,))
    with pytest.raises(ValueError, match="epochs.*already finished 3"):
        resume(out, dataset, epochs=2)
    with pytest.raises(ValueError, match="overrides: unknown"):
        resume(out, dataset, colour="blue")
    with pytest.raises(ValueError, match="dataset: the run was trained on synthetic"):
        resume(out, make_dataset_with(n_train=N_TRAIN - 1))
    same = resume(out, dataset, hidden=(16,), seed=0, epochs=3, log_every=5)  # unchanged or allowed
    assert same.config.log_every == 5 and same.epochs_done == 3


def make_dataset_with(n_train: int) -> Dataset:
    ds = synthetic_dataset(N_TRAIN, N_TEST)
    return dataclasses.replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train])


def test_resume_without_a_training_checkpoint(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        resume(tmp_path, dataset)
    save_checkpoint(tmp_path / CHECKPOINT_FILE, {"w": np.zeros(3)}, {"note": "not a run"})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        resume(tmp_path, dataset)


def test_an_existing_run_is_not_overwritten_by_accident(reference_run, dataset, tmp_path):
    with pytest.raises(FileExistsError, match="already exists.*resume"):
        make_trainer(tiny_config(), dataset, reference_run.out_dir)
    # overwrite=True starts afresh: results and metrics of the old run go at once.
    make_trainer(tiny_config(epochs=1), dataset, tmp_path).fit()
    fresh = make_trainer(tiny_config(epochs=1, seed=1), dataset, tmp_path, overwrite=True)
    assert fresh.epochs_done == 0
    fresh.fit()
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1


# --------------------------------------------------------------------------------------
# Divergence


def poison_after_update(trainer: Trainer, update: int) -> None:
    """Set the parameters to NaN right after optimizer update ``update``: the loss of the
    next batch is NaN."""
    step = trainer.optimizer.step

    def poisoned_step():
        step()
        if trainer.optimizer.t == update:
            trainer.model.parameters.data[...] = float("nan")

    trainer.optimizer.step = poisoned_step


def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_checkpoint(
        dataset, tmp_path):
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    poison_after_update(trainer, BATCHES_PER_EPOCH + 2)  # epoch 2, batch 3 is the first NaN
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, batch 3 of 4") \
            as info:
        trainer.fit()
    assert (info.value.epoch, info.value.batch) == (2, 3)
    assert info.value.checkpoint == tmp_path / CHECKPOINT_FILE
    assert "1 epochs) is kept" in str(info.value)
    arrays, meta = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert meta["position"] == {"epochs_done": 1, "batches_done": 0}
    assert all(np.all(np.isfinite(a)) for a in arrays.values())
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1
    survivor = resume(tmp_path, dataset)  # loads: the NaN parameters were never saved
    assert np.all(np.isfinite(survivor.model.parameters.data))


def test_nan_in_the_first_epoch_says_no_checkpoint_was_written(dataset, tmp_path):
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    poison_after_update(trainer, 1)
    with pytest.raises(TrainingDiverged, match="epoch 1, batch 2.*no checkpoint had been"):
        trainer.fit()
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_non_finite_parameters_are_never_saved(dataset, tmp_path):
    trainer = make_trainer(tiny_config(epochs=1), dataset, tmp_path)
    poison_after_update(trainer, BATCHES_PER_EPOCH)  # the last update: every loss was finite
    with pytest.raises(TrainingDiverged, match="parameters became NaN or infinite at epoch 1"):
        trainer.fit()
    assert not (tmp_path / CHECKPOINT_FILE).exists()


# --------------------------------------------------------------------------------------
# Configuration, data handling, backends


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs: expected an integer >= 1"),
    ("batch_size", 2.5, "batch_size: expected an integer"),
    ("seed", -1, "seed: expected an integer >= 0"),
    ("eval_samples", -1, "eval_samples"),
    ("limit_train", 0, "limit_train"),
    ("binarize", "sometimes", "binarize: expected one of auto, none, static, dynamic"),
    ("backend", "torch", "backend: expected one of"),
    ("dtype", "float16", "dtype: expected one of"),
    ("decoder", "poisson", "decoder: expected one of"),
    ("variance", 0.1, "variance: only used by the 'gaussian-fixed' decoder"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_config_defaults_round_trip_through_json():
    config = TrainConfig()
    assert (config.hidden, config.latent_dim, config.lr, config.batch_size, config.epochs,
            config.decoder) == ((512, 512), 64, 1e-3, 32, 10, "bernoulli")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(TypeError, match="hidden"):
        TrainConfig(hidden="512,512")


def test_auto_binarization_follows_the_decoder():
    assert TrainConfig().binarize_mode == "dynamic"
    assert TrainConfig(decoder="gaussian").binarize_mode == "none"
    assert TrainConfig(decoder="gaussian-fixed", binarize="none").binarize_mode == "none"
    assert TrainConfig(binarize="static").binarize_mode == "static"


@pytest.mark.parametrize("decoder", ["gaussian", "gaussian-fixed"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_gaussian_decoders_refuse_binarized_pixels(decoder, mode):
    """A Gaussian density on {0, 1} pixels is no likelihood of binary data (unbounded with
    a learned variance): refused, naming both settings and the ways out."""
    with pytest.raises(ValueError) as info:
        TrainConfig(decoder=decoder, binarize=mode)
    message = str(info.value)
    assert f"binarize={mode!r}" in message and f"decoder={decoder!r}" in message
    assert "--binarize none" in message and "--decoder bernoulli" in message


def test_trainer_rejects_bad_arguments(dataset, tmp_path):
    with pytest.raises(TypeError, match="config"):
        Trainer({"epochs": 1}, dataset, tmp_path)
    with pytest.raises(TypeError, match="dataset"):
        Trainer(tiny_config(), (dataset.x_train, dataset.x_test), tmp_path)
    with pytest.raises(ValueError, match="limit_train: asked for 1000 images"):
        make_trainer(tiny_config(limit_train=1000), dataset, tmp_path)


def test_limits_pick_a_seeded_subset(dataset, tmp_path):
    trainer = make_trainer(tiny_config(limit_train=20, limit_test=10, epochs=1,
                                       eval_samples=2), dataset, tmp_path)
    assert (trainer.n_train, trainer.n_test) == (20, 10)
    assert trainer.batches_per_epoch == 2
    trainer.fit()
    assert trainer.history[0]["updates"] == 2


@pytest.mark.parametrize("mode", ["none", "static", "dynamic"])
def test_binarization_modes_of_the_training_data(mode, dataset, tmp_path):
    trainer = make_trainer(tiny_config(binarize=mode), dataset, tmp_path)
    order = np.arange(N_TRAIN)
    epoch1 = trainer.backend.to_numpy(trainer.data.epoch_train_data(1, order))
    epoch2 = trainer.backend.to_numpy(trainer.data.epoch_train_data(2, order))
    test = trainer.backend.to_numpy(trainer.data.x_test)
    if mode == "none":
        np.testing.assert_array_equal(epoch1, dataset.x_train)
        np.testing.assert_array_equal(test, dataset.x_test)
    else:
        assert set(np.unique(epoch1)) <= {0.0, 1.0} and set(np.unique(test)) <= {0.0, 1.0}
        assert np.array_equal(epoch1, epoch2) == (mode == "static")
        # P(pixel = 1) = intensity: the mean of the draws follows the grey levels.
        assert abs(epoch1.mean() - dataset.x_train.mean()) < 0.01


@pytest.mark.parametrize("backend_name", ["numpy", "array_api_strict"])
def test_an_epochs_images_drawn_into_the_last_epochs_buffer(backend_name, dataset, tmp_path):
    """Dynamic binarization writes epoch 2's images into epoch 1's array, and they are
    the images a fresh array gets: the run's shuffled rows, binarized by the epoch's
    draws as binarize() draws them, so a run resumed from an older checkpoint sees the
    same pixels."""
    from vae_np.train.streams import Stream
    trainer = make_trainer(tiny_config(backend=backend_name, dtype="float64"), dataset,
                           tmp_path)
    data, backend = trainer.data, trainer.backend
    order = np.random.default_rng(3).permutation(N_TRAIN)
    kept = data.epoch_train_data(1, order)
    fresh = backend.to_numpy(data.epoch_train_data(2, order))
    assert data.epoch_train_data(2, order, reuse=kept) is kept
    np.testing.assert_array_equal(backend.to_numpy(kept), fresh)
    drawn = binarize(backend.asarray(dataset.x_train[order]), "dynamic",
                     backend.rng(data.key(Stream.BINARIZE, 2)))
    np.testing.assert_array_equal(fresh, backend.to_numpy(drawn))
    with pytest.raises(ValueError, match="out: expected shape"):
        data.epoch_train_data(3, order[:10], reuse=kept)


def test_a_run_keeps_one_image_buffer_across_epochs(dataset, tmp_path):
    """Every epoch after the first draws into the first epoch's array; the run lets go of
    it once the last epoch has trained."""
    trainer = make_trainer(tiny_config(epochs=3), dataset, tmp_path)
    calls = []
    prepare = trainer.data.epoch_train_data

    def recorded(epoch, order, reuse=None):
        calls.append((reuse, prepare(epoch, order, reuse=reuse)))
        return calls[-1][1]

    trainer.data.epoch_train_data = recorded
    trainer.fit()
    (first_reuse, first), *later = calls
    assert first_reuse is None and len(later) == 2
    assert all(reuse is first and images is first for reuse, images in later)
    assert trainer._epoch_images is None


def test_binarize_draws_on_a_backend_rng(dataset):
    backend = get_backend("numpy", "float64")
    x = backend.asarray(dataset.x_train)
    a = binarize(x, "dynamic", backend.rng((0, 1)))
    b = binarize(x, "dynamic", backend.rng((0, 1)))
    assert a.dtype == np.float64 and np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 1.0}


def test_runs_on_array_api_strict(dataset, tmp_path):
    """The loop uses only array-API operations on device data, so it also runs on CuPy."""
    pytest.importorskip("array_api_strict")
    trainer = make_trainer(tiny_config(epochs=1, backend="array_api_strict", eval_samples=4),
                           dataset, tmp_path, pictures=True)
    results = trainer.fit()
    assert np.isfinite(results["test_log_likelihood"]["mean"])
    assert (tmp_path / "manifold.png").is_file()


def test_evaluate_and_log_likelihood_are_deterministic(reference_run):
    backend = reference_run.backend
    assert reference_run.evaluate(rng=backend.rng(5)) == reference_run.evaluate(rng=backend.rng(5))
    first = reference_run.test_log_likelihood(num_samples=4)
    second = reference_run.test_log_likelihood(num_samples=4)
    assert first["mean"] == second["mean"] and first["n_images"] == N_TEST
    with pytest.raises(ValueError, match="num_samples"):
        reference_run.test_log_likelihood(num_samples=0)


# --------------------------------------------------------------------------------------
# The output directory: checked before any work, held by one run at a time


def test_out_dir_under_a_regular_file_fails_at_once_naming_it(dataset, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a directory")
    for out in (blocker / "run", blocker):
        with pytest.raises(NotADirectoryError, match=r"out_dir: .*notes\.txt.*not a directory"):
            make_trainer(tiny_config(), dataset, out)
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.mark.parametrize("name", [CHECKPOINT_FILE, METRICS_FILE, "samples.png"])
def test_a_run_file_name_taken_by_a_directory_fails_at_once(name, dataset, tmp_path):
    (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"out_dir: .*{name}.* not a regular file"):
        make_trainer(tiny_config(), dataset, tmp_path, overwrite=True)


def test_resume_with_a_checkpoint_directory_fails_naming_it(dataset, tmp_path):
    (tmp_path / CHECKPOINT_FILE).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"out_dir: .*{CHECKPOINT_FILE}"):
        resume(tmp_path, dataset)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped (``python -c pass``: the
    child is only a source of a dead pid, so the lock tests stay in the fast loop)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(out_dir, pid: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def test_fit_holds_a_lock_with_its_pid_and_removes_it(dataset, tmp_path):
    trainer = make_trainer(tiny_config(epochs=1, eval_samples=0), dataset, tmp_path)
    seen = []
    backward = trainer.model.backward

    def looking_backward():
        backward()
        seen.append(json.loads((tmp_path / LOCK_FILE).read_text()))

    trainer.model.backward = looking_backward
    trainer.fit()
    assert seen and all(lock == {**seen[0], "pid": os.getpid(),
                                 "host": socket.gethostname()} for lock in seen)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_second_run_on_a_held_out_dir_is_refused_and_writes_nothing(dataset, tmp_path):
    write_lock(tmp_path, os.getppid())  # a live process: the one that started pytest
    trainer = make_trainer(tiny_config(epochs=1), dataset, tmp_path)
    with pytest.raises(OutDirInUse, match=rf"in use by process {os.getppid()} on") as info:
        trainer.fit()
    assert str(tmp_path / LOCK_FILE) in str(info.value)
    assert info.value.pid == os.getppid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing of ours
    assert trainer.optimizer.t == 0


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(dataset, tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    messages = []
    make_trainer(tiny_config(epochs=1, eval_samples=0), dataset, tmp_path,
                 log=messages.append).fit()
    assert any(f"left by process {pid}" in m and "taking the lock over" in m for m in messages)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_training_fails(dataset, tmp_path):
    trainer = make_trainer(tiny_config(), dataset, tmp_path)
    poison_after_update(trainer, 1)
    with pytest.raises(TrainingDiverged):
        trainer.fit()
    assert not (tmp_path / LOCK_FILE).exists()
    trainer = make_trainer(tiny_config(), dataset, tmp_path / "b")
    interrupt_at(trainer, 2, "raise")
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert not (tmp_path / "b" / LOCK_FILE).exists()


def test_the_lock_is_reentrant_within_one_process(dataset, tmp_path):
    """The command line holds out_dir from before loading the data; fit takes it again."""
    with OutDirLock(tmp_path):
        make_trainer(tiny_config(epochs=1, eval_samples=0), dataset, tmp_path).fit()
        assert (tmp_path / LOCK_FILE).is_file()  # still the outer holder's
    assert not (tmp_path / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------
# Malformed trainer metadata: a CheckpointError naming the field, before anything trains


@pytest.fixture(scope="module")
def mid_epoch_checkpoint(dataset, tmp_path_factory):
    """(arrays, metadata) of a run stopped after epoch 1 and one batch of epoch 2."""
    out = tmp_path_factory.mktemp("mid_epoch")
    trainer = make_trainer(tiny_config(), dataset, out)
    interrupt_at(trainer, BATCHES_PER_EPOCH + 2, "raise")
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    arrays, meta = load_checkpoint(out / CHECKPOINT_FILE)
    assert meta["position"] == {"epochs_done": 1, "batches_done": 1}
    return arrays, meta


def _set(path: str, value):
    def change(arrays, meta):
        *parents, last = path.split(".")
        target = meta
        for key in parents:
            target = target[int(key) if isinstance(target, list) else key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return change


def _drop_array(name):
    return lambda arrays, meta: arrays.pop(name)


def _resize_array(name, rows):
    def change(arrays, meta):
        arrays[name] = np.zeros((rows, 3), dtype=arrays[name].dtype)
    return change


def _shrink_model_array(arrays, meta):
    name = next(n for n in arrays if n.startswith("model/"))
    arrays[name] = arrays[name][..., :1]


@pytest.mark.parametrize("change, field", [
    (_set("position.batches_done", KeyError), "lacks position.batches_done"),
    (_set("position.epochs_done", -1), "position.epochs_done: expected an integer in 0..3"),
    (_set("position.epochs_done", "1"), "position.epochs_done: expected int, got '1'"),
    (_set("position.epochs_done", True), "position.epochs_done"),
    (_set("position.batches_done", 9), "position.batches_done: expected an integer in 0..4"),
    (_set("position.batches_done", 3), r"partial_epoch/terms: expected .* shape \(3, 3\)"),
    (_resize_array("partial_epoch/terms", 2), "partial_epoch/terms"),
    (_drop_array("partial_epoch/terms"), "partial_epoch/terms"),
    (_set("partial_epoch.noise_state", None), "partial_epoch.noise_state"),
    (_set("partial_epoch.noise_state", "pcg64"), "partial_epoch.noise_state"),
    (_set("partial_epoch.noise_state", {"kind": "pcg64", "state": {"bit_generator": "MT"}}),
     "partial_epoch.noise_state"),
    (_set("partial_epoch.noise_state", {"kind": "pcg64"}), "partial_epoch.noise_state"),
    (_set("partial_epoch.seconds", -1.0), "partial_epoch.seconds"),
    (_set("partial_epoch.images", 3), "partial_epoch.images: expected an integer 16"),
    (_set("partial_epoch", KeyError), "lacks partial_epoch"),
    (_set("history", KeyError), "lacks history"),
    (_set("history", []), "history: expected 1 entries"),
    (_set("history.0.test_loss", KeyError), r"history\[0\] lacks \['test_loss'\]"),
    (_set("history.0.train_loss", "low"), r"history\[0\].train_loss: expected a number"),
    (_set("config.hidden", KeyError), r"config lacks \['hidden'\]"),
    (_set("config.epochs", 0), "config: epochs"),
    (_set("config.colour", "blue"), "config: .*unknown TrainConfig fields"),
    (_set("data.n_train", "64"), "data.n_train"),
    (_set("data", KeyError), "lacks data"),
    (_set("vae_np_version", 1), "vae_np_version"),
    (_shrink_model_array, "model/"),
    (_drop_array("optimizer/t"), "optimizer/"),
])
def test_malformed_trainer_metadata_is_a_checkpoint_error_naming_the_field(
        change, field, mid_epoch_checkpoint, dataset, tmp_path):
    arrays, meta = copy.deepcopy(mid_epoch_checkpoint)
    change(arrays, meta)
    save_checkpoint(tmp_path / CHECKPOINT_FILE, arrays, meta)
    with pytest.raises(CheckpointError, match=field) as info:
        resume(tmp_path, dataset)
    assert str(tmp_path / CHECKPOINT_FILE) in str(info.value)


def test_the_unchanged_mid_epoch_checkpoint_resumes(mid_epoch_checkpoint, dataset, tmp_path):
    """The control for the test above: the same file, unchanged, is accepted."""
    arrays, meta = copy.deepcopy(mid_epoch_checkpoint)
    save_checkpoint(tmp_path / CHECKPOINT_FILE, arrays, meta)
    resumed = resume(tmp_path, dataset)
    assert (resumed.epochs_done, resumed.batches_done) == (1, 1)


# --------------------------------------------------------------------------------------
# The numbers printed at the end, and what crosses from the device


def test_log_likelihood_standard_error_is_the_spread_over_sqrt_n(reference_run):
    """stderr = std(ddof=1) / sqrt(n) of the per-image estimates, recomputed here from the
    model with the run's stream; the printed '+-' shows that number."""
    trainer, k = reference_run, 8
    rng = trainer.backend.rng((trainer.config.seed, int(Stream.LOG_LIKELIHOOD)))
    x, size = trainer.data.x_test, trainer.config.eval_batch_size
    values = np.concatenate([
        trainer.backend.to_numpy(trainer.model.log_likelihood(
            x[start:start + size, :], num_samples=k, rng=rng, check_finite=False))
        for start in range(0, N_TEST, size)]).astype(np.float64)
    assert size < len(values) == N_TEST  # several batches
    result = trainer.test_log_likelihood(num_samples=k)
    np.testing.assert_allclose(result["mean"], values.mean(), rtol=1e-6)
    expected = values.std(ddof=1) / np.sqrt(len(values))
    assert result["stderr"] == pytest.approx(expected, rel=1e-6)
    assert expected < values.std(ddof=1) / 4  # n = 32: dividing and multiplying differ
    printed = json.loads((trainer.out_dir / RESULTS_FILE).read_text())["test_log_likelihood"]
    assert printed["stderr"] == pytest.approx(expected, rel=1e-6)


def test_the_printed_line_shows_mean_and_standard_error(dataset, tmp_path):
    messages = []
    trainer = make_trainer(tiny_config(epochs=1), dataset, tmp_path, log=messages.append)
    result = trainer.fit()["test_log_likelihood"]
    line = next(m for m in messages if m.startswith("test ln p(x) ="))
    assert f"= {result['mean']:.2f} +- {result['stderr']:.2f} nats/image" in line


def test_each_batch_loss_is_read_back_from_the_device_once(dataset, tmp_path, monkeypatch):
    """The per-batch (loss, KL, recon) rows cross to the host once each, not the whole
    epoch so far at every log step (quadratic in the batches per epoch)."""
    rows = []
    to_numpy = Backend.to_numpy

    def counting_to_numpy(self, array):
        host = to_numpy(self, array)
        if host.ndim == 2 and host.shape[1] == 3:  # per-batch terms
            rows.append(host.shape[0])
        return host

    monkeypatch.setattr(Backend, "to_numpy", counting_to_numpy)
    trainer = make_trainer(tiny_config(epochs=2, log_every=1, eval_samples=0), dataset,
                           tmp_path)
    trainer.fit()
    assert sum(rows) == 2 * BATCHES_PER_EPOCH and max(rows) == 1
