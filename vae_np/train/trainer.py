"""The :class:`Trainer`: a run's parts put together, and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..backend import get_backend
from ..checkpoint import CheckpointError
from ..data import Dataset
from ..distributed import (Communicator, check_same_everywhere, shard_bounds,
                           sharded_log_likelihood, sharded_test_elbo, world)
from ..model import VAE, ELBOTerms
from ..optim import Adam
from ..plotting import require_matplotlib
from .active_units import active_units, active_units_line
from .config import TrainConfig, check_int
from .evaluation import log_likelihood_summary, per_image_log_likelihood, test_elbo
from .guards import StopOnCtrlC, diverged, first_non_finite_row, interrupted
from .metrics import RESULTS_FILE, METRICS_FILE, BatchTerms, weighted_mean, write_metrics, \
    write_results
from .outdir import OutDirLock, check_out_dir
from .pictures import RunPictures
from .report import default_log, epoch_line, log_likelihood_line, progress_bar
from .rundata import RunData
from .state import CHECKPOINT_FILE, SavedRun, read_run, write_run
from .streams import Stream

__all__ = ["Trainer"]


class Trainer:
    """Trains a :class:`vae_np.VAE` on a :class:`vae_np.data.Dataset` (28x28 digits).

    Args:
        config: the run (:class:`TrainConfig`).
        dataset: train and test images in [0, 1]; they are moved to the backend once.
        out_dir: where checkpoint, metrics, results and pictures go (created if needed).
            Checked at once (:func:`vae_np.train.check_out_dir`); held by one run at a
            time while ``fit`` runs (``out_dir/.lock``).
        overwrite: start afresh even if ``out_dir`` already holds a checkpoint (it is
            replaced at the end of the first epoch). Without it that is an error, so a
            finished or interrupted run is not clobbered by accident.
        log: called with each message (default: print, bar-safe); None is silent.
        progress: show a progress bar per epoch (needs tqdm; on a terminal only).
        pictures: draw the PNGs each epoch (needs matplotlib).
        comm: the :class:`vae_np.distributed.Communicator` of a ``config.distributed``
            run (default: ``vae_np.distributed.world()``, the ``mpiexec`` job); ignored
            otherwise. Only rank 0 logs, writes files and draws.

    Attributes: ``model``, ``optimizer``, ``backend``, ``data`` (the run's images on the
    backend, :class:`RunData`), ``history`` (one dict per finished epoch, keys
    ``EPOCH_METRICS``), ``epochs_done``, ``batches_done`` (in the epoch after
    ``epochs_done``; nonzero only after a mid-epoch interrupt).
    """

    def __init__(self, config: TrainConfig, dataset: Dataset, out_dir: str | Path = "results",
                 *, overwrite: bool = False, log: Callable[[str], object] | None = default_log,
                 progress: bool = True, pictures: bool = True,
                 comm: Communicator | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset: expected a vae_np.data.Dataset, "
                            f"got {type(dataset).__name__}")
        # Data parallelism (vae_np.distributed): None when not config.distributed.
        self.comm = (comm or world(config.backend)) if config.distributed else None
        self.is_root = self.comm is None or self.comm.is_root
        if self.comm is not None and config.batch_size % self.comm.size:
            raise ValueError(f"batch_size: {config.batch_size} images per global batch do not "
                             f"divide by the {self.comm.size} ranks; use a multiple of "
                             f"{self.comm.size}")
        self.out_dir = (check_out_dir(out_dir, new_run=True, overwrite=overwrite)
                        if self.is_root else Path(out_dir))
        if not self.is_root:  # rank 0 alone logs, shows progress and draws
            log, progress, pictures = None, False, False
        self._log_fn, self.progress, self.pictures = log, bool(progress), bool(pictures)
        if self.pictures:
            require_matplotlib()  # fail now, not after the first epoch

        self.backend = get_backend(config.backend, config.dtype)
        if self.comm is not None:
            self.comm.attach(self.backend)
        # Record the backend that "auto" chose: a resume must run on the same one.
        self.config = dataclasses.replace(config, backend=self.backend.name)
        if config.conditional and dataset.y_train is None:
            raise ValueError(f"conditional: a conditional VAE trains on labels, and the data "
                             f"set {dataset.description} ({dataset.source}) has none (an .npz "
                             f"needs y_train and y_test; a folder of images, one subfolder "
                             f"per class)")
        num_classes = dataset.num_classes if config.conditional else None
        self.model = VAE(input_dim=dataset.n_features, backend=self.backend,
                         num_classes=num_classes, **config.model_kwargs())
        self.dataset = dataset
        self.data = RunData(dataset, self.config, self.backend)
        if config.output_bias == "data-logit":
            self._init_output_bias()
        self.optimizer = Adam(self.model.parameters, lr=config.lr, eps=config.adam_eps,
                              clip_norm=config.clip_norm)
        self.n_train, self.n_test = self.data.n_train, self.data.n_test
        self._pictures = RunPictures(self.data, self.config.latent_dim, num_classes)

        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.batches_done = 0
        # A partly trained epoch (after a mid-epoch interrupt): its per-batch terms (host
        # copies, (batches_done, 3)), the noise stream's state, and its time and images.
        self._partial_terms = np.zeros((0, 3), dtype=self.backend.numpy_dtype)
        self._noise_state: dict | None = None
        self._partial_seconds = 0.0
        self._partial_images = 0
        self._stop = StopOnCtrlC()
        self._updating = False
        self._saved_position: tuple[int, int] | None = None
        if self.comm is not None:
            check_same_everywhere(self.comm, "the run's config", self.config.to_dict())
            self._broadcast_state()

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def batches_per_epoch(self) -> int:
        return self.data.batches_per_epoch

    def _log(self, message: str) -> None:
        if self._log_fn is not None:
            self._log_fn(message)

    def _init_output_bias(self) -> None:
        """``output_bias="data-logit"``: the decoder's output bias (the Bernoulli logits at
        zero input) set to ln(p / (1 - p)) of the training set's mean pixels p, clipped to
        [1e-3, 1 - 1e-3], as Burda et al.'s code does; the first updates then need not
        learn the average image."""
        p = np.clip(self.data.train_pixel_means(), 1e-3, 1.0 - 1e-3)
        bias = self.model.decoder.linears[-1].params["b"]
        bias[...] = self.backend.asarray(np.log(p / (1.0 - p)))

    # ----------------------------------------------------------------------------------
    # Data parallelism (vae_np.distributed; config.distributed)

    def _loss_and_gradient(self, batch, noise, labels=None) -> ELBOTerms:
        """The batch's loss terms (nats per image, batch means), with d loss / d
        parameter in ``model.parameters.grad``. ``labels``: a conditional model's labels
        of the batch, host (n,).

        Distributed: this rank draws the whole global batch's noise (the draws of one
        process, whatever the number of ranks) and takes its rows, scores its shard, and
        weights the shard's mean gradient by shard / global batch size; one allreduce sums
        the flat buffers, so every rank holds the global batch's mean gradient (the sum
        over its examples divided by the global batch size). The three loss terms are
        summed the same way."""
        if self.comm is None:
            terms = self.model.loss(batch, rng=noise, check_finite=False, y=labels)
            self.model.backward()
            return terms
        xp, params = self.backend.xp, self.model.parameters
        n = batch.shape[0]
        lo, hi = shard_bounds(n, self.comm.size, self.comm.rank)
        eps = noise.normal((self.model.samples, n, self.model.latent_dim))
        if hi > lo:
            t = self.model.loss(batch[lo:hi, :], eps=eps[:, lo:hi, :], check_finite=False,
                                y=None if labels is None else labels[lo:hi])
            self.model.backward()
            share = (hi - lo) / n
            if share != 1.0:
                params.grad *= share
            local = xp.stack([t.loss, t.kl, t.recon]) * share
        else:  # the short last batch of an epoch may leave a rank without rows
            params.zero_grad()
            local = self.backend.zeros((3,))
        self.comm.allreduce_sum(params.grad)
        self.comm.allreduce_sum(local)
        return ELBOTerms(loss=local[0], kl=local[1], recon=local[2])

    def _check_stop(self) -> None:
        """Ctrl-C at a batch boundary; distributed, every rank stops at the same one
        (a Ctrl-C seen by any rank stops all)."""
        if self.comm is None:
            self._stop.check()
        elif self.comm.any(self._stop.requested):
            raise KeyboardInterrupt

    def _broadcast_state(self) -> None:
        """Rank 0's parameters and optimizer state on every rank."""
        self.comm.broadcast(self.model.parameters.data)
        self.optimizer.load_state_dict(self.comm.broadcast_state(self.optimizer.state_dict()))

    # ----------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate; returns (and writes) the results.

        Returns the dict written to ``results.json``: config, data, the last epoch's
        metrics, the importance-sampled test ln p(x) (None when ``eval_samples`` is 0),
        the active units on the test set (:mod:`vae_np.train.active_units`) and the
        total training time.

        Raises OutDirInUse (another run holds ``out_dir``), TrainingInterrupted (Ctrl-C;
        a checkpoint to resume from is on disk) and TrainingDiverged (NaN/inf; the last
        good checkpoint is kept).
        """
        lock = OutDirLock(self.out_dir, log=self._log) if self.is_root \
            else contextlib.nullcontext()
        with lock:
            if not self.is_root:
                pass
            elif self.epochs_done == 0 and self.batches_done == 0:
                # A fresh run: the files of an earlier run in out_dir no longer apply.
                for name in (RESULTS_FILE, METRICS_FILE):
                    (self.out_dir / name).unlink(missing_ok=True)
            else:
                write_metrics(self.out_dir, self.history)  # in step with the checkpoint
            self._log_header()
            with self._stop:
                try:
                    while self.epochs_done < self.config.epochs:
                        epoch = self.epochs_done + 1
                        self._finish_epoch(epoch, self._train_epoch(epoch))
                    return self._final_evaluation()
                except KeyboardInterrupt:
                    raise self._interrupted() from None

    def _train_epoch(self, epoch: int) -> np.ndarray:
        """The training pass of ``epoch``, from batch ``batches_done`` on; returns the
        sizes of the epoch's batches, (B,)."""
        cfg, backend = self.config, self.backend
        order, bounds = self.data.epoch_batches(epoch)
        sizes = np.diff(bounds)
        x_epoch = self.data.epoch_train_data(epoch, order)
        y_epoch = self.data.epoch_train_labels(order) if self.model.num_classes else None
        if cfg.schedule != "constant":  # from the epoch number: a resume lands in its stage
            self.optimizer.lr = cfg.learning_rate(epoch)
        noise = backend.rng(self.data.key(Stream.NOISE, epoch))
        if self._noise_state is not None:  # resuming mid-epoch
            noise.set_state(self._noise_state)
        first = self.batches_done
        terms = BatchTerms(backend, len(sizes), done=self._partial_terms)
        bar = progress_bar(self.progress, len(sizes), first, f"epoch {epoch}/{cfg.epochs}")
        started, shown = time.perf_counter(), first
        try:
            for b in range(first, len(sizes)):
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                loss_terms = self._loss_and_gradient(
                    x_epoch[lo:hi, :], noise, None if y_epoch is None else y_epoch[lo:hi])
                # From the update until the batch is counted, a hard interrupt would leave
                # parameters and position out of step; _interrupted() then saves nothing.
                self._updating = True
                self.optimizer.step()
                terms.record(b, loss_terms)
                self.batches_done, self._noise_state = b + 1, noise.state()
                self._updating = False
                if self.batches_done % cfg.log_every == 0 or self.batches_done == len(sizes):
                    self._partial_terms = terms.read(self.batches_done)
                    self._check_finite(parameters=False)
                    running = weighted_mean(self._partial_terms, sizes[:self.batches_done])
                    bar.set_postfix_str(f"loss {running[0]:.2f}", refresh=False)
                    bar.update(self.batches_done - shown)
                    shown = self.batches_done
                self._check_stop()
        finally:
            bar.close()
            self._partial_seconds += time.perf_counter() - started
            self._partial_images += int(sizes[first:self.batches_done].sum())
            if self.batches_done > first and not self._updating:
                self._partial_terms = terms.read(self.batches_done)
        return sizes

    def _finish_epoch(self, epoch: int, sizes: np.ndarray) -> None:
        """Evaluate, record, checkpoint and draw after ``epoch``'s training pass (batches
        of ``sizes``)."""
        train = weighted_mean(self._partial_terms, sizes)
        eval_started = time.perf_counter()
        test = self.evaluate(rng=self.backend.rng(self.data.key(Stream.TEST_NOISE, epoch)))
        eval_seconds = time.perf_counter() - eval_started
        seconds = self._partial_seconds
        entry = {
            "epoch": epoch,
            "train_loss": float(train[0]), "train_kl": float(train[1]),
            "train_recon": float(train[2]),
            "test_loss": test["loss"], "test_kl": test["kl"], "test_recon": test["recon"],
            "train_seconds": seconds,
            "images_per_second": self._partial_images / seconds if seconds > 0 else None,
            "eval_seconds": eval_seconds, "updates": self.optimizer.t,
        }
        self._check_finite()
        self.history.append(entry)
        self.epochs_done, self.batches_done = epoch, 0
        self._partial_terms = np.zeros((0, 3), dtype=self.backend.numpy_dtype)
        self._noise_state, self._partial_seconds, self._partial_images = None, 0.0, 0
        self.save_checkpoint()
        if self.is_root:
            write_metrics(self.out_dir, self.history)
        self._log(epoch_line(entry, self.config.epochs, self.config.loss_name,
                             lr=None if self.config.schedule == "constant"
                             else self.optimizer.lr))
        if self.pictures:
            self.save_pictures()

    def _log_header(self) -> None:
        cfg, model = self.config, self.model
        layers = "-".join(str(w) for w in (self.model.input_dim, *cfg.hidden, cfg.latent_dim))
        self._log(f"VAE {layers} ({cfg.decoder} decoder, {model.num_parameters:,} parameters)"
                  f" on {self.backend.name}/{self.backend.dtype_name}, seed {cfg.seed}")
        details = []
        if cfg.objective != "vae":
            details.append(f"objective {cfg.loss_name[1:]}")
        if cfg.conditional:
            details.append(f"conditional on {model.num_classes} classes")
        if cfg.activation != "relu":
            details.append(f"{cfg.activation} hidden units")
        if cfg.output_bias != "zero":
            details.append(f"output bias {cfg.output_bias}")
        if cfg.schedule != "constant":
            details.append(f"{cfg.schedule} learning-rate schedule from {cfg.lr:g}")
        if cfg.adam_eps != 1e-8:
            details.append(f"Adam eps {cfg.adam_eps:g}")
        if cfg.input_shift != 0.5:
            details.append(f"input shift {cfg.input_shift:g}")
        if details:
            self._log("; ".join(details))
        limited = (self.n_train, self.n_test) != (self.dataset.n_train, self.dataset.n_test)
        self._log(f"data: {self.dataset.description}"
                  + (f"; using {self.n_train:,} train / {self.n_test:,} test images of them"
                     if limited else "")
                  + f"; {cfg.binarize_mode} binarization; batch {cfg.batch_size} "
                    f"({self.batches_per_epoch} updates per epoch)")
        if self.epochs_done or self.batches_done:
            self._log(f"resuming {self.checkpoint_path} after {self.epochs_done} epochs"
                      + (f" and {self.batches_done} batches" if self.batches_done else ""))
        self._log(f"writing to {self.out_dir}/")

    # ----------------------------------------------------------------------------------
    # Ctrl-C and divergence (vae_np.train.guards)

    def _interrupted(self):
        """Save a checkpoint if the state is consistent; the exception to raise."""
        if self._updating:
            checkpoint = self.checkpoint_path if self._saved_position is not None else None
            error = interrupted(self._saved_position or (0, 0), checkpoint, in_update=True)
        else:
            position = (self.epochs_done, self.batches_done)
            if self._saved_position != position:
                self.save_checkpoint()
            if self.comm is not None:  # every rank stops here; rank 0's file is complete
                self.comm.barrier()
            error = interrupted(position, self.checkpoint_path, in_update=False)
        self._log(str(error))
        return error

    def _check_finite(self, parameters: bool = True) -> None:
        """Raise TrainingDiverged if a loss of the current epoch read back so far (or, with
        ``parameters``, a parameter: one device reduction) is NaN or infinite."""
        epoch = self.epochs_done + 1
        bad = first_non_finite_row(self._partial_terms)
        if bad is not None:
            raise diverged(epoch, bad + 1, self.batches_per_epoch, self._partial_terms[bad, 0],
                           self._saved_position, self.checkpoint_path)
        xp = self.backend.xp
        if parameters and not bool(xp.all(xp.isfinite(self.model.parameters.data))):
            # The losses were finite: the last update of the epoch so far made them bad.
            raise diverged(epoch, max(self.batches_done, 1), self.batches_per_epoch, None,
                           self._saved_position, self.checkpoint_path)

    # ----------------------------------------------------------------------------------
    # Checkpoints and resume (vae_np.train.state)

    def save_checkpoint(self) -> Path:
        """Write the current position atomically to ``out_dir/checkpoint.npz`` (contents:
        :mod:`vae_np.train.state`). Raises TrainingDiverged instead of saving non-finite
        numbers."""
        self._check_finite()
        if not self.is_root:  # rank 0 alone writes; the others keep the same position
            self._saved_position = (self.epochs_done, self.batches_done)
            return self.checkpoint_path
        write_run(self.checkpoint_path, SavedRun(
            config=self.config, model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(), model_config=self.model.config,
            epochs_done=self.epochs_done, batches_done=self.batches_done,
            history=self.history, partial_terms=self._partial_terms,
            noise_state=self._noise_state, partial_seconds=self._partial_seconds,
            partial_images=self._partial_images, data=self.data.summary(),
            version=_package_version(), ranks=self.comm.size if self.comm else 1))
        self._saved_position = (self.epochs_done, self.batches_done)
        return self.checkpoint_path

    @classmethod
    def resume(cls, out_dir: str | Path, dataset: Dataset, *,
               overrides: dict[str, Any] | None = None,
               log: Callable[[str], object] | None = default_log, progress: bool = True,
               pictures: bool = True, comm: Communicator | None = None) -> "Trainer":
        """The trainer of the run checkpointed in ``out_dir``, ready to continue.

        ``overrides`` may change the fields in ``TrainConfig.CONTINUATION_FIELDS`` (e.g.
        ``{"epochs": 20}`` to train longer); any other field must equal the checkpoint's.
        ``dataset`` must be the one the run started with (same source and sizes).

        Raises FileNotFoundError (no checkpoint), vae_np.checkpoint.CheckpointError
        (damaged file, or malformed trainer metadata: the message names the field),
        ValueError (a field or the data differ from the checkpoint's), OSError (out_dir
        unusable, see ``check_out_dir``).
        """
        check_out_dir(out_dir)
        saved = read_run(out_dir)
        config = saved.config.continued(overrides or {}, out_dir)
        if config.epochs < saved.epochs_done:
            raise ValueError(f"epochs: the run in {out_dir} has already finished "
                             f"{saved.epochs_done} epochs; ask for at least that")
        trainer = cls(config, dataset, out_dir, overwrite=True, log=log, progress=progress,
                      pictures=pictures, comm=comm)
        trainer.restore(saved)
        return trainer

    def restore(self, saved: SavedRun) -> None:
        """Continue from ``saved`` (:func:`vae_np.train.state.read_run`): parameters,
        optimizer, position and the unfinished epoch. ``resume`` calls this.

        Raises ValueError when this trainer's data differ from the run's, CheckpointError
        when the model, optimizer or noise state does not fit this trainer.
        """
        ranks = self.comm.size if self.comm is not None else 1
        if saved.ranks != ranks:
            raise ValueError(f"the run in {self.out_dir} was trained on {saved.ranks} MPI "
                             f"rank(s) and resumes only on as many (mpiexec -n {saved.ranks}"
                             f"{' ... --distributed' if saved.ranks > 1 else ''}); "
                             f"this job has {ranks}")
        summary, data = self.data.summary(), saved.data
        classes = saved.model_config.get("num_classes")
        if classes != self.model.num_classes:
            raise ValueError(f"dataset: the run's conditional model has "
                             f"{classes} classes, the data set {self.model.num_classes}")
        for key in ("source", "n_train", "n_test"):
            if summary[key] != data[key]:
                raise ValueError(f"dataset: the run was trained on {data['description']} "
                                 f"({data['n_train']} train / {data['n_test']} test images), "
                                 f"got {summary['description']} ({summary['n_train']} / "
                                 f"{summary['n_test']})")
        for what, load, state in (("model", self.model.load_state_dict, saved.model_state),
                                  ("optimizer", self.optimizer.load_state_dict,
                                   saved.optimizer_state)):
            try:
                load(state)
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(f"{saved.path}: {what}/* arrays do not fit the "
                                      f"{what} of this config: {exc}") from exc
        if saved.noise_state is not None:
            try:  # the stream's own check, on a scratch stream of this backend
                self.backend.rng(0).set_state(saved.noise_state)
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(f"{saved.path}: trainer metadata "
                                      f"partial_epoch.noise_state: not a state of this "
                                      f"backend's noise stream ({exc!r})") from exc
        self.epochs_done, self.batches_done = saved.epochs_done, saved.batches_done
        self.history = list(saved.history)
        self._partial_terms = saved.partial_terms
        self._noise_state = saved.noise_state
        self._partial_seconds = saved.partial_seconds
        self._partial_images = saved.partial_images
        self._saved_position = (self.epochs_done, self.batches_done)
        if self.comm is not None:
            self._broadcast_state()

    # ----------------------------------------------------------------------------------
    # Evaluation (vae_np.train.evaluation) and pictures (vae_np.train.pictures)

    def evaluate(self, x=None, rng=None, y=None) -> dict[str, float]:
        """Negative ELBO, KL and reconstruction of ``x`` (default: the test set), in nats
        per image, averaged over all its images: ``{"loss", "kl", "recon"}`` (with
        ``objective="iwae"``, the negative IWAE bound and its weighted terms).

        ``x``: (N, 784) backend array (already binarized as the model expects); ``rng``:
        a backend RNG for the reparameterisation noise (default: seeded by the run's seed);
        ``y``: a conditional model's labels of ``x``, host (N,) (default: the test set's).
        Batches of ``eval_batch_size``; the sums stay on the device until the end.
        """
        rng = self.backend.rng(self.data.key(Stream.TEST_NOISE, 0)) if rng is None else rng
        size = self.config.eval_batch_size
        batches = self.data.test_batches(size, self._check_stop, x)
        if self.comm is not None:  # each batch split over the ranks
            return sharded_test_elbo(self.model, self.backend, self.comm, batches, rng)
        labels = None
        if self.model.num_classes is not None:
            if x is not None and y is None:
                raise ValueError("y: a conditional model scores x with its labels; pass y")
            labels = self.data.test_label_batches(size, y)
        return test_elbo(self.model, self.backend, batches, rng, labels=labels)

    def test_log_likelihood(self, num_samples: int | None = None) -> dict[str, float]:
        """Importance-sampled ln p(x) of the test set (``VAE.log_likelihood``), nats.

        Returns ``{"mean", "stderr", "num_samples", "n_images", "seconds"}``: the mean
        over test images and its standard error (between-image spread / sqrt(n)).
        ``num_samples`` is K (default ``config.eval_samples``).
        """
        k = self.config.eval_samples if num_samples is None else num_samples
        check_int("num_samples", k, 1)
        rng = self.backend.rng(self.data.key(Stream.LOG_LIKELIHOOD))
        size = self.config.eval_batch_size
        bar = progress_bar(self.progress, math.ceil(self.n_test / size), 0, f"test ln p(x), K={k}")
        started = time.perf_counter()
        try:
            batches = self.data.test_batches(size, self._check_stop)
            if self.comm is not None:  # each batch split over the ranks
                values = sharded_log_likelihood(self.model, self.backend, self.comm, batches,
                                                k, rng, on_batch=bar.update)
            else:
                labels = None if self.model.num_classes is None \
                    else self.data.test_label_batches(size)
                values = per_image_log_likelihood(self.model, self.backend, batches, k, rng,
                                                  on_batch=bar.update, labels=labels)
        finally:
            bar.close()
        return {**log_likelihood_summary(values), "num_samples": k,
                "seconds": time.perf_counter() - started}

    def _final_evaluation(self) -> dict[str, Any]:
        log_likelihood = None
        if self.config.eval_samples > 0:
            log_likelihood = self.test_log_likelihood()
        size = self.config.eval_batch_size  # on every rank: one encoder pass, no noise
        active = active_units(self.model, self.data.test_batches(size, self._check_stop),
                              None if self.model.num_classes is None
                              else self.data.test_label_batches(size))
        last = self.history[-1]
        results = {
            "config": self.config.to_dict(),
            "data": self.data.summary(),
            "backend": f"{self.backend.name}/{self.backend.dtype_name}",
            "num_parameters": self.model.num_parameters,
            "objective": self.objective_summary(),
            "epochs": self.epochs_done,
            "final_epoch": last,
            "test_log_likelihood": log_likelihood,
            "active_units": active,
            "train_seconds_total": sum(e["train_seconds"] for e in self.history),
        }
        if self.is_root:
            write_results(self.out_dir, results)
        self._log(f"test {self.config.loss_name} after {self.epochs_done} epochs: "
                  f"{last['test_loss']:.2f} nats/image (an upper bound on "
                  f"{'-ln p(x | y), the labels given' if self.config.conditional else '-ln p(x)'})")
        if log_likelihood is not None:
            self._log(log_likelihood_line(log_likelihood))
        self._log(active_units_line(active))
        self._log(f"wrote {self.out_dir / RESULTS_FILE}")
        return results

    def objective_summary(self) -> dict[str, Any]:
        """What the reported losses are, for results.json: ``{"name", "samples", "loss"}``
        (``samples``: S of the ELBO, k of the IWAE bound)."""
        cfg = self.config
        return {"name": cfg.objective, "samples": cfg.samples, "loss": cfg.loss_name,
                "conditional": cfg.conditional}

    @property
    def run_pictures(self) -> RunPictures:
        """What draws this run's PNGs (the test digits and prior latents it shows)."""
        return self._pictures

    def save_pictures(self) -> list[Path]:
        """Draw the run's PNGs into ``out_dir`` (:mod:`vae_np.train.pictures`); their paths."""
        return self._pictures.save(self.out_dir, self.model, self.epochs_done, self.history,
                                   self.config.eval_batch_size, self._stop.check)


def _package_version() -> str:
    import vae_np  # here, not at the top: the package imports its modules first

    return vae_np.__version__
