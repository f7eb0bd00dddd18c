"""The :class:`Trainer`: a run's parts put together, and the training loop.

One code path for one process and for N: a single-process run is a communicator of one
rank (:class:`vae_np.distributed.SingleProcess`, whose collectives are identities), and the
step (:mod:`vae_np.train.step`) and the evaluation (:mod:`vae_np.train.evaluation`) shard
each batch over the communicator's ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._version import __version__
from ..backend import get_backend
from ..data import Dataset
from ..distributed import Communicator, SingleProcess, all_or_none, world
from ..model import VAE
from ..optim import Adam
from ..plotting import require_matplotlib
from .active_units import active_units, active_units_line
from .config import TrainConfig, check_int
from .evaluation import run_log_likelihood, run_test_elbo
from .guards import StopOnCtrlC, diverged, first_non_finite_row, interrupted
from .initialise import init_gaussian_from_data
from .metrics import (RESULTS_FILE, BatchTerms, epoch_entry, prepare_files, run_results,
                      weighted_mean, write_metrics, write_results)
from .outdir import OutDirLock, check_out_dir
from .pictures import RunPictures
from .report import default_log, epoch_line, final_lines, header_lines, progress_bar
from .rundata import RunData, dataset_identity
from .state import (CHECKPOINT_FILE, PartialEpoch, SavedRun, check_resumable, load_states,
                    resumable_run, write_run)
from .step import loss_and_gradient
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
            run (default: ``vae_np.distributed.world()``, the ``mpiexec`` job); a
            one-rank ``SingleProcess`` otherwise. Only rank 0 logs, writes files and
            draws. Before their first collective the ranks compare their config and data
            (:func:`vae_np.distributed.agree`): an error on one rank is raised on all.

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
        self.comm = (comm or world(config.backend)) if config.distributed else SingleProcess()
        self.is_root = self.comm.is_root
        if not self.is_root:  # rank 0 alone logs, shows progress and draws
            log, progress, pictures = None, False, False
        self._log_fn, self.progress, self.pictures = log, bool(progress), bool(pictures)
        # What may fail on one rank alone, before the ranks first meet: then it fails on all.
        with all_or_none(self.comm, config=lambda: self.config.to_dict(),
                         data=lambda: dataset_identity(dataset)):
            if config.batch_size % self.comm.size:
                raise ValueError(f"batch_size: {config.batch_size} images per global batch do "
                                 f"not divide by the {self.comm.size} ranks; use a multiple "
                                 f"of {self.comm.size}")
            self.out_dir = (check_out_dir(out_dir, new_run=True, overwrite=overwrite)
                            if self.is_root else Path(out_dir))
            if self.pictures:
                require_matplotlib()  # fail now, not after the first epoch
            self.backend = get_backend(config.backend, config.dtype)
            # Record the backend that "auto" chose: a resume must run on the same one.
            self.config = dataclasses.replace(config, backend=self.backend.name)
        self.comm.attach(self.backend)
        self.dataset = dataset
        self.data = RunData(dataset, self.config, self.backend)
        if config.architecture == "conv" and dataset.image_shape is None:
            raise ValueError(f"architecture: 'conv' needs images, and {dataset.description} "
                             f"holds flat feature vectors (no image_shape)")
        if config.architecture == "conv" and (dataset.image_shape[0] % 4
                                              or dataset.image_shape[1] % 4):
            raise ValueError(f"architecture: 'conv' pools twice by 2, so it needs H and W "
                             f"that are multiples of 4; the images are "
                             f"{'x'.join(map(str, dataset.image_shape[:2]))} (a folder of "
                             f"images can be resized with --image-size, e.g. 32x32)")
        self.model = VAE(input_dim=dataset.n_features, backend=self.backend,
                         num_classes=self.data.num_classes, **config.model_kwargs(),
                         **({"image_shape": dataset.image_shape}
                            if config.architecture == "conv" else {}))
        if config.output_bias == "data-logit":  # as Burda et al.'s code: see RunData
            self.model.decoder.linears[-1].params["b"][...] = self.data.mean_pixel_logits()
        # start at the data's scale (train.initialise: it rescales the MLP's first and last
        # Linear; a conv model's image pixels are of order 1, and its decoder's logvar
        # outputs start at 0 as the VAE builds them)
        if config.decoder == "gaussian" and config.architecture == "mlp":
            init_gaussian_from_data(self.model, self.data.train_pixel_means(),
                                    self.data.train_feature_variances())
        self.optimizer = Adam(self.model.parameters, lr=config.lr, eps=config.adam_eps,
                              clip_norm=config.clip_norm)
        self.n_train, self.n_test = self.data.n_train, self.data.n_test
        self._pictures = RunPictures(self.data, self.config.latent_dim, self.data.num_classes)

        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.batches_done = 0
        self._partial = PartialEpoch.empty(self.backend.numpy_dtype)  # of the next epoch
        self._epoch_images = None  # the epoch's images, overwritten by the next epoch's
        self._stop = StopOnCtrlC()
        self._updating = False
        self._saved_position: tuple[int, int] | None = None
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

    def _check_stop(self) -> None:
        """Ctrl-C at a batch boundary: every rank stops at the same one (a Ctrl-C seen by
        any rank stops all)."""
        if self.comm.any(self._stop.requested):
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
        with contextlib.ExitStack() as held:
            with all_or_none(self.comm):  # rank 0 alone holds the lock and writes out_dir
                if self.is_root:
                    held.enter_context(OutDirLock(self.out_dir, log=self._log))
                    prepare_files(self.out_dir, self.history,
                                  fresh=(self.epochs_done, self.batches_done) == (0, 0))
            for line in header_lines(self.config, self.model, self.backend, self.dataset,
                                     self.data, (self.epochs_done, self.batches_done),
                                     self.checkpoint_path, self.out_dir):
                self._log(line)
            with self._stop:
                try:
                    while self.epochs_done < self.config.epochs:
                        epoch = self.epochs_done + 1
                        self._finish_epoch(epoch, self._train_epoch(epoch))
                    self._epoch_images = None   # no epoch follows: not held through the evaluation
                    return self._final_evaluation()
                except KeyboardInterrupt:
                    raise self._interrupted() from None

    def _train_epoch(self, epoch: int) -> np.ndarray:
        """The training pass of ``epoch``, from batch ``batches_done`` on; returns the
        sizes of the epoch's batches, (B,)."""
        cfg, backend = self.config, self.backend
        order, bounds = self.data.epoch_batches(epoch)
        sizes = np.diff(bounds)
        x_epoch = self._epoch_images = self.data.epoch_train_data(epoch, order,
                                                                  reuse=self._epoch_images)
        y_epoch = self.data.epoch_train_labels(order) if self.model.num_classes else None
        if cfg.schedule != "constant":  # from the epoch number: a resume lands in its stage
            self.optimizer.lr = cfg.learning_rate(epoch)
        noise = backend.rng(self.data.key(Stream.NOISE, epoch))
        partial = self._partial
        if partial.noise_state is not None:  # resuming mid-epoch
            noise.set_state(partial.noise_state)
        first = self.batches_done
        terms = BatchTerms(backend, len(sizes), done=partial.terms)
        bar = progress_bar(self.progress, len(sizes), first, f"epoch {epoch}/{cfg.epochs}")
        started, shown = time.perf_counter(), first
        try:
            for b in range(first, len(sizes)):
                lo, hi = int(bounds[b]), int(bounds[b + 1])
                loss_terms = loss_and_gradient(self.model, self.comm, x_epoch[lo:hi, :], noise,
                                               None if y_epoch is None else y_epoch[lo:hi])
                # From the update until the batch is counted, a hard interrupt would leave
                # parameters and position out of step; _interrupted() then saves nothing.
                self._updating = True
                self.optimizer.step()
                terms.record(b, loss_terms)
                self.batches_done, partial.noise_state = b + 1, noise.state()
                self._updating = False
                if self.batches_done % cfg.log_every == 0 or self.batches_done == len(sizes):
                    partial.terms = terms.read(self.batches_done)
                    self._check_finite(parameters=False)
                    running = weighted_mean(partial.terms, sizes[:self.batches_done])
                    bar.set_postfix_str(f"loss {running[0]:.2f}", refresh=False)
                    bar.update(self.batches_done - shown)
                    shown = self.batches_done
                self._check_stop()
        finally:
            bar.close()
            partial.seconds += time.perf_counter() - started
            partial.images += int(sizes[first:self.batches_done].sum())
            if self.batches_done > first and not self._updating:
                partial.terms = terms.read(self.batches_done)
        return sizes

    def _finish_epoch(self, epoch: int, sizes: np.ndarray) -> None:
        """Evaluate, record, checkpoint and draw after ``epoch``'s training pass (batches
        of ``sizes``)."""
        eval_started = time.perf_counter()
        test = self.evaluate(rng=self.backend.rng(self.data.key(Stream.TEST_NOISE, epoch)))
        entry = epoch_entry(epoch, weighted_mean(self._partial.terms, sizes), test,
                            self._partial.seconds, self._partial.images,
                            time.perf_counter() - eval_started, self.optimizer.t)
        self._check_finite()
        self.history.append(entry)
        self.epochs_done, self.batches_done = epoch, 0
        self._partial = PartialEpoch.empty(self.backend.numpy_dtype)
        self.save_checkpoint()
        if self.is_root:
            write_metrics(self.out_dir, self.history)
        self._log(epoch_line(entry, self.config.epochs, self.config.loss_name,
                             lr=None if self.config.schedule == "constant"
                             else self.optimizer.lr))
        if self.pictures:
            self.save_pictures()

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
            self.comm.barrier()  # every rank stops here; rank 0's file is complete
            error = interrupted(position, self.checkpoint_path, in_update=False)
        self._log(str(error))
        return error

    def _check_finite(self, parameters: bool = True) -> None:
        """Raise TrainingDiverged if a loss of the current epoch read back so far (or, with
        ``parameters``, a parameter: one device reduction) is NaN or infinite."""
        epoch = self.epochs_done + 1
        bad = first_non_finite_row(self._partial.terms)
        if bad is not None:
            raise diverged(epoch, bad + 1, self.batches_per_epoch, self._partial.terms[bad, 0],
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
        if self.is_root:  # rank 0 alone writes; the others keep the same position
            write_run(self.checkpoint_path, SavedRun(
                config=self.config, model_state=self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(), model_config=self.model.config,
                epochs_done=self.epochs_done, batches_done=self.batches_done,
                history=self.history, partial_terms=self._partial.terms,
                noise_state=self._partial.noise_state, partial_seconds=self._partial.seconds,
                partial_images=self._partial.images, data=self.data.summary(),
                version=__version__, ranks=self.comm.size))
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
        saved, config = resumable_run(out_dir, overrides or {})
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
        check_resumable(saved, self.out_dir, self.comm.size, self.data.summary(),
                        self.model.config)
        load_states(saved, self.model, self.optimizer, self.backend)
        self.epochs_done, self.batches_done = saved.epochs_done, saved.batches_done
        self.history, self._partial = list(saved.history), saved.partial
        self._saved_position = (self.epochs_done, self.batches_done)
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
        Batches of ``eval_batch_size``, each split over the ranks
        (:func:`vae_np.train.evaluation.run_test_elbo`).
        """
        rng = self.backend.rng(self.data.key(Stream.TEST_NOISE, 0)) if rng is None else rng
        return run_test_elbo(self.model, self.data, self.comm, rng, self._check_stop, x, y)

    def test_log_likelihood(self, num_samples: int | None = None) -> dict[str, float]:
        """Importance-sampled ln p(x) of the test set (``VAE.log_likelihood``), nats.

        Returns ``{"mean", "stderr", "num_samples", "n_images", "seconds"}``: the mean
        over test images and its standard error (between-image spread / sqrt(n)).
        ``num_samples`` is K (default ``config.eval_samples``).
        """
        k = self.config.eval_samples if num_samples is None else num_samples
        check_int("num_samples", k, 1)
        return run_log_likelihood(self.model, self.data, self.comm, k, self._check_stop,
                                  self.progress)

    def _final_evaluation(self) -> dict[str, Any]:
        log_likelihood = self.test_log_likelihood() if self.config.eval_samples > 0 else None
        size = self.config.eval_batch_size  # on every rank: one encoder pass, no noise
        active = active_units(self.model, self.data.test_batches(size, self._check_stop),
                              None if self.model.num_classes is None
                              else self.data.test_label_batches(size))
        results = run_results(self.config, self.data.summary(), self.backend, self.model,
                              self.history, log_likelihood)
        results["active_units"] = active
        if self.is_root:
            write_results(self.out_dir, results)
        for line in final_lines(self.config, self.epochs_done, self.history[-1],
                                log_likelihood):
            self._log(line)
        self._log(active_units_line(active))
        self._log(f"wrote {self.out_dir / RESULTS_FILE}")
        return results

    @property
    def run_pictures(self) -> RunPictures:
        """What draws this run's PNGs (the test digits and prior latents it shows)."""
        return self._pictures

    def save_pictures(self) -> list[Path]:
        """Draw the run's PNGs into ``out_dir`` (:mod:`vae_np.train.pictures`); their paths."""
        return self._pictures.save(self.out_dir, self.model, self.epochs_done, self.history,
                                   self.config.eval_batch_size, self._stop.check)
