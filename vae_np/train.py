"""Training a VAE on MNIST: the loop, evaluation, checkpoints, metrics and pictures.

The library side of ``examples/train_mnist.py``, usable from Python::

    from vae_np.data import load_mnist
    from vae_np.train import TrainConfig, Trainer

    dataset = load_mnist()                                  # full MNIST, or the subset
    trainer = Trainer(TrainConfig(epochs=10), dataset, out_dir="results")
    results = trainer.fit()                                 # also in results/results.json
    # after Ctrl-C, a crash, or to train for more epochs:
    Trainer.resume("results", dataset, overrides={"epochs": 20}).fit()

What a run leaves in ``out_dir``:

    checkpoint.npz      model, optimizer, position, RNG state, config, history
                        (pickle-free, written atomically: see ``vae_np.checkpoint``)
    metrics.jsonl       one JSON object per finished epoch (keys: ``EPOCH_METRICS``)
    results.json        the final summary, with the importance-sampled test ln p(x)
    reconstructions.png, samples.png, loss_curves.png   refreshed every epoch
    manifold.png, latent_scatter.png                    also, when latent_dim == 2

Units: every loss is in nats per image, the mean over the images of an epoch (train)
or of the whole test set (test). The train numbers are the running mean over the epoch's
minibatches (the parameters change during the epoch), as most training scripts report.

Reproducibility. Every random draw of a run comes from its own stream, keyed by
``(seed, purpose)`` or ``(seed, purpose, epoch)`` (``Stream`` lists the purposes): the
batch order and the dynamic binarization of epoch e, the reparameterisation noise of
epoch e, and so on. A run is therefore a deterministic function of its config and its
data, and a checkpoint needs only the position (epochs done, batches done in the
current epoch) plus the state of the one stream that is consumed batch by batch, the
training noise. Resuming reproduces the uninterrupted run bit for bit, whether it
stopped at the end of an epoch or in the middle of one.

Interrupts. The first Ctrl-C asks the loop to stop at the next batch boundary; the
trainer then saves a checkpoint at exactly that batch and raises
:class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A second Ctrl-C, or a
``KeyboardInterrupt`` raised by other code, stops at once; if it lands inside an
optimizer update the parameters may be half updated, so the trainer then keeps the
checkpoint already on disk (the last finished epoch, or the last interrupt) and a resume
restarts from there. Either way a resume ends where the uninterrupted run would.

Divergence. The losses stay on the device and are read back every ``log_every``
batches (so a GPU step does not wait for the host each batch). A NaN or infinite loss
stops training with :class:`TrainingDiverged`, naming the epoch and the first bad
batch; nothing is saved after it, so the last good checkpoint stays on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backend import BACKEND_NAMES, DTYPE_NAMES, get_backend
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .data import BINARIZE_MODES, N_PIXELS, Dataset, binarize, iterate_minibatches
from .likelihoods import make_likelihood
from .model import VAE
from .optim import Adam

__all__ = [
    "CHECKPOINT_FILE", "EPOCH_METRICS", "METRICS_FILE", "RESULTS_FILE", "Stream",
    "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted",
]

CHECKPOINT_FILE = "checkpoint.npz"
CHECKPOINT_FORMAT = "vae_np.train checkpoint"  # metadata["format"] of a trainer checkpoint
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

#: The keys of one epoch's entry in ``Trainer.history`` and ``metrics.jsonl``.
EPOCH_METRICS = (
    "epoch",
    "train_loss", "train_kl", "train_recon",     # nats per image, running mean over the epoch
    "test_loss", "test_kl", "test_recon",        # nats per image, whole test set, end of epoch
    "train_seconds", "images_per_second",        # the training pass only (no evaluation)
    "eval_seconds", "updates",                   # test ELBO time; optimizer steps so far
)

# How many test digits the reconstruction picture shows and how many prior samples the
# sample picture shows (8 per row).
PICTURE_DIGITS = 32
PICTURE_SAMPLES = 64


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


class TrainingDiverged(FloatingPointError):
    """A loss or a parameter became NaN or infinite; nothing was saved after it.

    Attributes: ``epoch`` and ``batch`` (1-based; the first batch whose loss was not
    finite), ``checkpoint`` (the last good checkpoint, or None if none was written).
    """

    def __init__(self, message: str, epoch: int, batch: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.batch, self.checkpoint = epoch, batch, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C. ``checkpoint`` is the file to resume from (or None),
    ``epochs_done`` and ``batches_done`` the position it holds."""

    def __init__(self, message: str, checkpoint: Path | None, epochs_done: int,
                 batches_done: int):
        super().__init__(message)
        self.checkpoint, self.epochs_done, self.batches_done = checkpoint, epochs_done, batches_done

    def __str__(self) -> str:
        return self.args[0]


# --------------------------------------------------------------------------------------
# Configuration


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines a training run; JSON-able (``to_dict`` / ``from_dict``).

    The defaults are the starting configuration (784-512-512-64 encoder, Adam with
    lr 1e-3, batch 32, 10 epochs) with the Bernoulli decoder.

    Model (passed to :class:`vae_np.VAE`, which checks them):
        hidden: encoder hidden widths; the decoder mirrors them.
        latent_dim: d. decoder: ``bernoulli``, ``gaussian`` or ``gaussian-fixed``.
        variance: lambda of ``gaussian-fixed`` (None: the VAE's default, 0.098).
        samples: S, reparameterised samples per image in the training loss.
        beta: weight of the KL term (1: the ELBO).
    Optimisation:
        lr, clip_norm: Adam's step size; clip the gradient's global L2 norm (None: off).
        batch_size, epochs.
    Data:
        binarize: ``none`` (grey levels are the targets), ``static`` (one fixed random
            binarization), ``dynamic`` (a fresh one each epoch: the standard for
            likelihood numbers comparable with published ones) or ``auto``: dynamic for
            the Bernoulli decoder, none for the Gaussian ones (whose density on 0/1 data
            is unbounded).
        limit_train, limit_test: keep only this many images (a seeded random choice),
            for quick runs; None keeps all.
    Run:
        backend: ``numpy``, ``cupy``, ``auto`` (or ``array_api_strict``, for tests).
        dtype: ``float32`` or ``float64``. seed: the root of every random stream.
    Evaluation and logging:
        eval_samples: K of the final importance-sampled test ln p(x) (0: skip it). The
            papers use 5000; 1000 takes about 15 s per 1,000 test images on two CPU cores
            for the default model and gave an estimate 0.7 nats below K = 5000's
            (docs/results.md).
        eval_batch_size: test images per evaluation batch.
        log_every: read the losses back from the device (progress bar, NaN check)
            every this many batches.
    """

    hidden: tuple[int, ...] = (512, 512)
    latent_dim: int = 64
    decoder: str = "bernoulli"
    variance: float | None = None
    samples: int = 1
    beta: float = 1.0
    lr: float = 1e-3
    clip_norm: float | None = None
    batch_size: int = 32
    epochs: int = 10
    binarize: str = "auto"
    limit_train: int | None = None
    limit_test: int | None = None
    backend: str = "numpy"
    dtype: str = "float32"
    seed: int = 0
    eval_samples: int = 1000
    eval_batch_size: int = 500
    log_every: int = 25

    #: Fields a resumed run may change; every other field defines the run.
    CONTINUATION_FIELDS = ("epochs", "eval_samples", "eval_batch_size", "log_every")

    def __post_init__(self):
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence):
            raise TypeError(f"hidden: expected a sequence of layer widths, got {self.hidden!r}")
        self.hidden = tuple(self.hidden)
        for name in ("latent_dim", "samples", "batch_size", "epochs", "eval_batch_size",
                     "log_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("eval_samples", self.eval_samples, 0)
        _check_int("limit_train", self.limit_train, 1, allow_none=True)
        _check_int("limit_test", self.limit_test, 1, allow_none=True)
        _check_choice("binarize", self.binarize, ("auto", *BINARIZE_MODES))
        _check_choice("backend", self.backend, BACKEND_NAMES + ("array_api_strict",))
        _check_choice("dtype", self.dtype, DTYPE_NAMES)
        make_likelihood(self.decoder, self.variance)  # checks decoder and variance now

    @property
    def binarize_mode(self) -> str:
        """``binarize`` with ``auto`` resolved for the decoder."""
        if self.binarize != "auto":
            return self.binarize
        return "dynamic" if self.decoder == "bernoulli" else "none"

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`vae_np.VAE` this config sets."""
        return {"hidden": self.hidden, "latent_dim": self.latent_dim, "decoder": self.decoder,
                "variance": self.variance, "beta": self.beta, "samples": self.samples,
                "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden"] = list(self.hidden)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"values: unknown TrainConfig fields {unknown}")
        return cls(**values)


# --------------------------------------------------------------------------------------
# Small helpers


def _default_log(message: str) -> None:
    """Print without tearing a progress bar apart (tqdm.write when tqdm is installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, flush=True)
    else:
        tqdm.write(message)


class _NoProgressBar:
    """Stands in for a tqdm bar when bars are off or tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of rows ``values`` (B, k) weighted by ``weights`` (B,), in float64: (k,)."""
    weights = np.asarray(weights, dtype=np.float64)
    return (np.asarray(values, dtype=np.float64) * weights[:, None]).sum(axis=0) / weights.sum()


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains a :class:`vae_np.VAE` on a :class:`vae_np.data.Dataset` (28x28 digits).

    Args:
        config: the run (:class:`TrainConfig`).
        dataset: train and test images in [0, 1]; they are moved to the backend once.
        out_dir: where checkpoint, metrics, results and pictures go (created if needed).
        overwrite: start afresh even if ``out_dir`` already holds a checkpoint (it is
            replaced at the end of the first epoch). Without it that is an error, so a
            finished or interrupted run is not clobbered by accident.
        log: called with each message (default: print, bar-safe); None is silent.
        progress: show a progress bar per epoch (needs tqdm; on a terminal only).
        pictures: draw the PNGs each epoch (needs matplotlib).

    Attributes: ``model``, ``optimizer``, ``backend``, ``history`` (one dict per
    finished epoch, keys ``EPOCH_METRICS``), ``epochs_done``, ``batches_done`` (in the
    epoch after ``epochs_done``; nonzero only after a mid-epoch interrupt).
    """

    def __init__(self, config: TrainConfig, dataset: Dataset, out_dir: str | Path = "results",
                 *, overwrite: bool = False, log: Callable[[str], object] | None = _default_log,
                 progress: bool = True, pictures: bool = True):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset: expected a vae_np.data.Dataset, "
                            f"got {type(dataset).__name__}")
        self.out_dir = Path(out_dir)
        if not overwrite and self.checkpoint_path.exists():
            raise FileExistsError(
                f"out_dir: {self.checkpoint_path} already exists; resume that run "
                f"(Trainer.resume, --resume) or start afresh with overwrite=True (--overwrite)")
        self._log_fn, self.progress, self.pictures = log, bool(progress), bool(pictures)
        if self.pictures:
            from .plotting import _mpl
            _mpl()  # fail now, not after the first epoch, if matplotlib is missing

        self.backend = get_backend(config.backend, config.dtype)
        # Record the backend that "auto" chose: a resume must run on the same one.
        self.config = dataclasses.replace(config, backend=self.backend.name)
        self.model = VAE(input_dim=N_PIXELS, backend=self.backend, **config.model_kwargs())
        self.optimizer = Adam(self.model.parameters, lr=config.lr, clip_norm=config.clip_norm)
        self.dataset = dataset
        self._setup_data(dataset)

        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.batches_done = 0
        # A partly trained epoch (after a mid-epoch interrupt): its per-batch terms (host
        # copies, (batches_done, 3)), the noise stream's state, and its time and images.
        self._partial_terms = np.zeros((0, 3), dtype=self.backend.numpy_dtype)
        self._noise_state: dict | None = None
        self._partial_seconds = 0.0
        self._partial_images = 0
        self._stop_requested = False
        self._updating = False
        self._saved_position: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------
    # Setup

    def _key(self, stream: Stream, *more: int) -> tuple[int, ...]:
        return (self.config.seed, int(stream), *more)

    def _setup_data(self, dataset: Dataset) -> None:
        """Select, binarize (fixed parts) and move the data to the backend, once."""
        cfg, backend = self.config, self.backend
        subset_rng = np.random.default_rng(self._key(Stream.SUBSET))
        x_train, y_train = self._limit(dataset.x_train, dataset.y_train, cfg.limit_train,
                                       "limit_train", subset_rng)
        x_test, y_test = self._limit(dataset.x_test, dataset.y_test, cfg.limit_test,
                                     "limit_test", subset_rng)
        if len(x_train) == 0 or len(x_test) == 0:
            raise ValueError(f"dataset: needs at least one train and one test image, got "
                             f"{len(x_train)} and {len(x_test)}")
        self.n_train, self.n_test = len(x_train), len(x_test)
        mode = cfg.binarize_mode
        self._x_train = backend.asarray(x_train)
        if mode == "static":
            self._x_train = binarize(self._x_train, "static",
                                     backend.rng(self._key(Stream.STATIC_BINARIZE)))
        # The test set is binarized once (dynamic training included): every epoch, and
        # the final ln p(x), score the same fixed test images.
        self._x_test = backend.asarray(x_test)
        if mode != "none":
            self._x_test = binarize(self._x_test, mode,
                                    backend.rng(self._key(Stream.TEST_BINARIZE)))
        self._y_test = y_test
        picture_rng = np.random.default_rng(self._key(Stream.PICTURES))
        self._picture_digits = np.sort(
            picture_rng.permutation(self.n_test)[:PICTURE_DIGITS]).astype(np.int64)
        self._prior_latents = backend.rng(self._key(Stream.PICTURES)).normal(
            (PICTURE_SAMPLES, cfg.latent_dim))

    @staticmethod
    def _limit(x: np.ndarray, y: np.ndarray, limit: int | None, name: str,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if limit is None:
            return x, y
        if limit > len(x):
            raise ValueError(f"{name}: asked for {limit} images, the data set has {len(x)}")
        keep = np.sort(rng.permutation(len(x))[:limit])
        return x[keep], y[keep]

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.config.batch_size)

    def _log(self, message: str) -> None:
        if self._log_fn is not None:
            self._log_fn(message)

    def _progress_bar(self, total: int, initial: int, desc: str):
        if not self.progress:
            return _NoProgressBar()
        try:
            from tqdm import tqdm
        except ImportError:
            return _NoProgressBar()
        # disable=None: no bar when the output is not a terminal (logs, pipes, CI).
        return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                    dynamic_ncols=True, disable=None)

    # ----------------------------------------------------------------------------------
    # Resume

    @classmethod
    def resume(cls, out_dir: str | Path, dataset: Dataset, *,
               overrides: Mapping[str, Any] | None = None,
               log: Callable[[str], object] | None = _default_log, progress: bool = True,
               pictures: bool = True) -> "Trainer":
        """The trainer of the run checkpointed in ``out_dir``, ready to continue.

        ``overrides`` may change the fields in ``TrainConfig.CONTINUATION_FIELDS`` (e.g.
        ``{"epochs": 20}`` to train longer); any other field must equal the checkpoint's.
        ``dataset`` must be the one the run started with (same source and sizes).

        Raises FileNotFoundError (no checkpoint), vae_np.checkpoint.CheckpointError
        (damaged file), ValueError (a field or the data differ from the checkpoint's).
        """
        path = Path(out_dir) / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(f"out_dir: no checkpoint to resume at {path}")
        arrays, meta = load_checkpoint(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: not a training checkpoint of vae_np.train "
                                  f"(format {meta.get('format')!r})")
        saved = TrainConfig.from_dict(meta["config"])
        changes = {}
        for name, value in dict(overrides or {}).items():
            if name not in saved.to_dict():
                raise ValueError(f"overrides: unknown TrainConfig field {name!r}")
            if name == "backend":  # compare what "auto" resolves to here
                value = get_backend(value, saved.dtype).name
            if isinstance(value, list):
                value = tuple(value)
            if value == getattr(saved, name):
                continue
            if name not in TrainConfig.CONTINUATION_FIELDS:
                raise ValueError(
                    f"{name}: the run in {out_dir} was trained with {name}={getattr(saved, name)!r}"
                    f" and cannot continue with {value!r} (a resumed run may change only "
                    f"{', '.join(TrainConfig.CONTINUATION_FIELDS)}); use a new out_dir instead")
            changes[name] = value
        config = dataclasses.replace(saved, **changes)
        if config.epochs < meta["position"]["epochs_done"]:
            raise ValueError(f"epochs: the run in {out_dir} has already finished "
                             f"{meta['position']['epochs_done']} epochs; ask for at least that")
        trainer = cls(config, dataset, out_dir, overwrite=True, log=log, progress=progress,
                      pictures=pictures)
        trainer._restore(arrays, meta)
        return trainer

    def _data_summary(self) -> dict[str, Any]:
        return {"source": self.dataset.source, "description": self.dataset.description,
                "n_train": self.n_train, "n_test": self.n_test,
                "binarize": self.config.binarize_mode}

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        summary, saved = self._data_summary(), meta["data"]
        for key in ("source", "n_train", "n_test"):
            if summary[key] != saved[key]:
                raise ValueError(f"dataset: the run was trained on {saved['description']} "
                                 f"({saved['n_train']} train / {saved['n_test']} test images), "
                                 f"got {summary['description']} ({summary['n_train']} / "
                                 f"{summary['n_test']})")
        self.model.load_state_dict({name[len("model/"):]: value for name, value in arrays.items()
                                    if name.startswith("model/")})
        self.optimizer.load_state_dict({name[len("optimizer/"):]: value
                                        for name, value in arrays.items()
                                        if name.startswith("optimizer/")})
        position = meta["position"]
        self.epochs_done, self.batches_done = position["epochs_done"], position["batches_done"]
        self.history = list(meta["history"])
        self._partial_terms = arrays["partial_epoch/terms"]
        self._noise_state = meta["partial_epoch"]["noise_state"]
        self._partial_seconds = meta["partial_epoch"]["seconds"]
        self._partial_images = meta["partial_epoch"]["images"]
        self._saved_position = (self.epochs_done, self.batches_done)

    # ----------------------------------------------------------------------------------
    # Checkpoints and metrics files

    def save_checkpoint(self) -> Path:
        """Write the current position atomically to ``out_dir/checkpoint.npz``.

        Arrays: ``model/<name>`` (parameters), ``optimizer/<name>`` (step count and
        moments), ``partial_epoch/terms`` (per-batch loss, KL, recon of a partly trained
        epoch). Metadata: config, model config, position, noise-stream state, history,
        data summary, vae_np version. Raises TrainingDiverged instead of saving
        non-finite numbers.
        """
        from . import __version__  # here: the package imports its modules first

        self._check_finite()
        arrays = {f"model/{name}": value for name, value in self.model.state_dict().items()}
        arrays.update({f"optimizer/{name}": np.asarray(value)
                       for name, value in self.optimizer.state_dict().items()})
        arrays["partial_epoch/terms"] = np.ascontiguousarray(self._partial_terms)
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "vae_np_version": __version__,
            "config": self.config.to_dict(),
            "model_config": self.model.config,
            "position": {"epochs_done": self.epochs_done, "batches_done": self.batches_done},
            "partial_epoch": {"noise_state": self._noise_state,
                              "seconds": self._partial_seconds,
                              "images": int(self._partial_images)},
            "history": self.history,
            "data": self._data_summary(),
        }
        save_checkpoint(self.checkpoint_path, arrays, metadata)
        self._saved_position = (self.epochs_done, self.batches_done)
        return self.checkpoint_path

    def _check_finite(self, parameters: bool = True) -> None:
        """Raise TrainingDiverged if a loss of the current epoch read back so far (or, with
        ``parameters``, a parameter: one device reduction) is NaN or infinite."""
        epoch = self.epochs_done + 1
        bad = ~np.all(np.isfinite(self._partial_terms), axis=1)
        if bad.any():
            first_bad = int(np.argmax(bad))
            self._diverged(epoch, first_bad + 1, self._partial_terms[first_bad, 0])
        xp = self.backend.xp
        if parameters and not bool(xp.all(xp.isfinite(self.model.parameters.data))):
            # The losses were finite: the last update of the epoch so far made them bad.
            self._diverged(epoch, max(self.batches_done, 1), None)

    def _diverged(self, epoch: int, batch: int, loss_value) -> None:
        on_disk = self.checkpoint_path if self._saved_position is not None else None
        what = (f"the loss became {float(loss_value)}" if loss_value is not None
                else "the parameters became NaN or infinite")
        kept = (f"the last good checkpoint ({self._saved_position[0]} epochs"
                f"{f', {self._saved_position[1]} batches' if self._saved_position[1] else ''})"
                f" is kept at {on_disk}" if on_disk else "no checkpoint had been written yet")
        raise TrainingDiverged(
            f"training diverged: {what} at epoch {epoch}, batch {batch} of "
            f"{self.batches_per_epoch}; stopped without saving; {kept}. Try a smaller lr "
            f"(--lr) or gradient clipping (--clip-norm).", epoch, batch, on_disk)

    def _write_metrics(self) -> Path:
        lines = "".join(json.dumps(entry) + "\n" for entry in self.history)
        # Rewritten whole from the history, so after a resume it matches the checkpoint.
        return _write_text(self.out_dir / METRICS_FILE, lines)

    # ----------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate; returns (and writes) the results.

        Returns the dict written to ``results.json``: config, data, the last epoch's
        metrics, the importance-sampled test ln p(x) (None when ``eval_samples`` is 0)
        and the total training time.

        Raises TrainingInterrupted (Ctrl-C; a checkpoint to resume from is on disk) and
        TrainingDiverged (NaN/inf; the last good checkpoint is kept).
        """
        if self.epochs_done == 0 and self.batches_done == 0:
            # A fresh run: the files of an earlier run in out_dir no longer apply.
            for name in (RESULTS_FILE, METRICS_FILE):
                (self.out_dir / name).unlink(missing_ok=True)
        else:
            self._write_metrics()  # in step with the checkpoint, whatever stopped the run
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._log_header()
        with self._stop_at_batch_boundary_on_ctrl_c():
            try:
                while self.epochs_done < self.config.epochs:
                    self._run_epoch(self.epochs_done + 1)
                return self._final_evaluation()
            except KeyboardInterrupt:
                raise self._interrupted() from None

    def _log_header(self) -> None:
        cfg, model = self.config, self.model
        layers = "-".join(str(w) for w in (N_PIXELS, *cfg.hidden, cfg.latent_dim))
        self._log(f"VAE {layers} ({cfg.decoder} decoder, {model.num_parameters:,} parameters)"
                  f" on {self.backend.name}/{self.backend.dtype_name}, seed {cfg.seed}")
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

    @contextlib.contextmanager
    def _stop_at_batch_boundary_on_ctrl_c(self):
        """First SIGINT: set a flag the loop checks between batches. A second one gets
        the previous handler back (normally: KeyboardInterrupt at once)."""
        self._stop_requested = False
        previous = signal.getsignal(signal.SIGINT)
        if (threading.current_thread() is not threading.main_thread()
                or previous is signal.SIG_IGN):  # signals go to the main thread only
            yield
            return
        restore = previous if previous is not None else signal.default_int_handler

        def request_stop(signum, frame):
            # Only set flags here: printing from a signal handler can re-enter I/O.
            self._stop_requested = True
            signal.signal(signal.SIGINT, restore)

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, restore)

    def _stop_if_requested(self) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt

    def _interrupted(self) -> TrainingInterrupted:
        """Save a checkpoint if the state is consistent; the exception to raise."""
        position = (self.epochs_done, self.batches_done)
        if self._updating:
            checkpoint = self.checkpoint_path if self._saved_position is not None else None
            detail = ("interrupted inside an optimizer update; kept the checkpoint on disk"
                      f" ({checkpoint}, {self._saved_position[0]} epochs done)" if checkpoint
                      else "interrupted inside an optimizer update before any checkpoint")
            position = self._saved_position or (0, 0)
        else:
            if self._saved_position != position:
                self.save_checkpoint()
            checkpoint = self.checkpoint_path
            detail = (f"saved {checkpoint} after {position[0]} epochs"
                      + (f" and {position[1]} batches" if position[1] else ""))
        hint = " Continue with --resume (Trainer.resume)." if checkpoint else ""
        message = f"training interrupted: {detail}.{hint}"
        self._log(message)
        return TrainingInterrupted(message, checkpoint, *position)

    def _epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order (n_train,), bounds (B + 1,)): epoch ``epoch``'s shuffled image order and
        the offsets of its B minibatches in it."""
        batches = list(iterate_minibatches(self.n_train, self.config.batch_size,
                                           np.random.default_rng(self._key(Stream.SHUFFLE, epoch))))
        bounds = np.cumsum([0] + [len(b) for b in batches])
        return np.concatenate(batches), bounds

    def _epoch_train_data(self, epoch: int, order: np.ndarray):
        """The training images of epoch ``epoch`` on the device, (n_train, 784), in
        minibatch order (so batch b is the contiguous slice bounds[b]:bounds[b+1])."""
        xp, backend = self.backend.xp, self.backend
        x = xp.take(self._x_train, backend.asarray(order, dtype=xp.int64), axis=0)
        if self.config.binarize_mode == "dynamic":
            x = binarize(x, "dynamic", backend.rng(self._key(Stream.BINARIZE, epoch)))
        return x

    def _run_epoch(self, epoch: int) -> None:
        cfg, backend, xp = self.config, self.backend, self.backend.xp
        order, bounds = self._epoch_batches(epoch)
        sizes = np.diff(bounds)
        num_batches = len(sizes)
        x_epoch = self._epoch_train_data(epoch, order)
        noise = backend.rng(self._key(Stream.NOISE, epoch))
        first = self.batches_done
        if self._noise_state is not None:  # resuming mid-epoch
            noise.set_state(self._noise_state)
        # Per-batch (loss, KL, recon), kept on the device; read back every log_every batches.
        terms = backend.zeros((num_batches, 3))
        terms[:first, :] = backend.asarray(self._partial_terms)
        bar = self._progress_bar(num_batches, first, f"epoch {epoch}/{cfg.epochs}")
        started, shown = time.perf_counter(), first
        try:
            for b in range(first, num_batches):
                batch = x_epoch[int(bounds[b]):int(bounds[b + 1]), :]
                loss_terms = self.model.loss(batch, rng=noise, check_finite=False)
                self.model.backward()
                # From the update until the batch is counted, a hard interrupt would leave
                # parameters and position out of step; _interrupted() then saves nothing.
                self._updating = True
                self.optimizer.step()
                terms[b, :] = xp.stack([loss_terms.loss, loss_terms.kl, loss_terms.recon])
                self.batches_done = b + 1
                self._noise_state = noise.state()
                self._updating = False
                if self.batches_done % cfg.log_every == 0 or self.batches_done == num_batches:
                    self._partial_terms = backend.to_numpy(terms[:self.batches_done, :]).copy()
                    self._check_finite(parameters=False)
                    running = _weighted_mean(self._partial_terms, sizes[:self.batches_done])
                    bar.set_postfix_str(f"loss {running[0]:.2f}", refresh=False)
                    bar.update(self.batches_done - shown)
                    shown = self.batches_done
                self._stop_if_requested()
        finally:
            bar.close()
            self._partial_seconds += time.perf_counter() - started
            self._partial_images += int(sizes[first:self.batches_done].sum())
            if self.batches_done > first and not self._updating:
                self._partial_terms = backend.to_numpy(terms[:self.batches_done, :]).copy()

        train = _weighted_mean(self._partial_terms, sizes)
        eval_started = time.perf_counter()
        test = self.evaluate(rng=backend.rng(self._key(Stream.TEST_NOISE, epoch)))
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
        self._partial_terms = np.zeros((0, 3), dtype=backend.numpy_dtype)
        self._noise_state, self._partial_seconds, self._partial_images = None, 0.0, 0
        self.save_checkpoint()
        self._write_metrics()
        self._log(self._epoch_line(entry))
        if self.pictures:
            self.save_pictures()

    def _epoch_line(self, entry: Mapping[str, Any]) -> str:
        speed = entry["images_per_second"]
        return (f"epoch {entry['epoch']:>3}/{self.config.epochs}  "
                f"train -ELBO {entry['train_loss']:8.2f} (KL {entry['train_kl']:6.2f}, "
                f"recon {entry['train_recon']:7.2f})  "
                f"test -ELBO {entry['test_loss']:8.2f} (KL {entry['test_kl']:6.2f}, "
                f"recon {entry['test_recon']:7.2f}) nats/image  "
                f"{entry['train_seconds']:6.1f} s  "
                + (f"{speed:,.0f} images/s" if speed is not None else "-"))

    # ----------------------------------------------------------------------------------
    # Evaluation

    def _test_batches(self, x):
        size = self.config.eval_batch_size
        for start in range(0, x.shape[0], size):
            self._stop_if_requested()
            yield x[start:start + size, :]

    def evaluate(self, x=None, rng=None) -> dict[str, float]:
        """Negative ELBO, KL and reconstruction of ``x`` (default: the test set), in nats
        per image, averaged over all its images: ``{"loss", "kl", "recon"}``.

        ``x``: (N, 784) backend array (already binarized as the model expects); ``rng``:
        a backend RNG for the reparameterisation noise (default: seeded by the run's seed).
        Batches of ``eval_batch_size``; the sums stay on the device until the end.
        """
        xp = self.backend.xp
        x = self._x_test if x is None else x
        rng = self.backend.rng(self._key(Stream.TEST_NOISE, 0)) if rng is None else rng
        total = self.backend.zeros((3,))
        for batch in self._test_batches(x):
            t = self.model.loss(batch, rng=rng, check_finite=False)
            total = total + xp.stack([t.loss, t.kl, t.recon]) * batch.shape[0]
        loss, kl, recon = (self.backend.to_numpy(total).astype(np.float64) / x.shape[0]).tolist()
        return {"loss": loss, "kl": kl, "recon": recon}

    def test_log_likelihood(self, num_samples: int | None = None) -> dict[str, float]:
        """Importance-sampled ln p(x) of the test set (``VAE.log_likelihood``), nats.

        Returns ``{"mean", "stderr", "num_samples", "n_images", "seconds"}``: the mean
        over test images and its standard error (between-image spread / sqrt(n)).
        ``num_samples`` is K (default ``config.eval_samples``).
        """
        k = self.config.eval_samples if num_samples is None else num_samples
        _check_int("num_samples", k, 1)
        rng = self.backend.rng(self._key(Stream.LOG_LIKELIHOOD))
        num_batches = math.ceil(self.n_test / self.config.eval_batch_size)
        bar = self._progress_bar(num_batches, 0, f"test ln p(x), K={k}")
        started, values = time.perf_counter(), []
        try:
            for batch in self._test_batches(self._x_test):
                values.append(self.backend.to_numpy(
                    self.model.log_likelihood(batch, num_samples=k, rng=rng, check_finite=False)))
                bar.update(1)
        finally:
            bar.close()
        values = np.concatenate(values).astype(np.float64)
        stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
        return {"mean": float(values.mean()), "stderr": stderr, "num_samples": k,
                "n_images": len(values), "seconds": time.perf_counter() - started}

    def _final_evaluation(self) -> dict[str, Any]:
        log_likelihood = None
        if self.config.eval_samples > 0:
            log_likelihood = self.test_log_likelihood()
        last = self.history[-1]
        results = {
            "config": self.config.to_dict(),
            "data": self._data_summary(),
            "backend": f"{self.backend.name}/{self.backend.dtype_name}",
            "num_parameters": self.model.num_parameters,
            "epochs": self.epochs_done,
            "final_epoch": last,
            "test_log_likelihood": log_likelihood,
            "train_seconds_total": sum(e["train_seconds"] for e in self.history),
        }
        _write_text(self.out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
        self._log(f"test -ELBO after {self.epochs_done} epochs: {last['test_loss']:.2f} "
                  f"nats/image (an upper bound on -ln p(x))")
        if log_likelihood is not None:
            spread = (f" +- {log_likelihood['stderr']:.2f}"
                      if log_likelihood["stderr"] is not None else "")
            self._log(f"test ln p(x) = {log_likelihood['mean']:.2f}{spread} nats/image "
                      f"(importance sampling, K = {log_likelihood['num_samples']}, "
                      f"{log_likelihood['n_images']:,} test images, "
                      f"{log_likelihood['seconds']:.0f} s)")
        self._log(f"wrote {self.out_dir / RESULTS_FILE}")
        return results

    # ----------------------------------------------------------------------------------
    # Pictures

    def _images(self, device_images) -> np.ndarray:
        """Decoder means as host pictures; Gaussian means may stray outside [0, 1]."""
        return np.clip(self.backend.to_numpy(device_images), 0.0, 1.0)

    def save_pictures(self) -> list[Path]:
        """Draw the run's PNGs into ``out_dir`` (see the module docstring); their paths."""
        from . import plotting

        epoch, model = self.epochs_done, self.model
        xp = self.backend.xp
        digits = xp.take(self._x_test, self.backend.asarray(self._picture_digits, dtype=xp.int64),
                         axis=0)
        paths = [
            plotting.save_reconstructions(
                self.out_dir / "reconstructions.png", self._images(digits),
                self._images(model.reconstruct(digits, check_finite=False)),
                n=PICTURE_DIGITS, ncol=8,
                title=f"test digits and their reconstructions, epoch {epoch}"),
            plotting.save_image_grid(
                self.out_dir / "samples.png",
                self._images(model.decode(self._prior_latents, check_finite=False)), nrow=8,
                title=f"decoder means of z ~ N(0, I), epoch {epoch}"),
            plotting.plot_loss_curves(self.out_dir / "loss_curves.png", self.history,
                                      title=f"{self.dataset.source}, "
                                            f"{self.config.binarize_mode} binarization"),
        ]
        if self.config.latent_dim == 2:
            paths.append(plotting.plot_manifold(
                self.out_dir / "manifold.png",
                lambda z: self._images(model.decode(z, check_finite=False)),
                title=f"decoded latent grid, epoch {epoch}"))
            means = [self.backend.to_numpy(model.encode(batch, check_finite=False)[0])
                     for batch in self._test_batches(self._x_test)]
            paths.append(plotting.plot_latent_scatter(
                self.out_dir / "latent_scatter.png", np.concatenate(means), self._y_test,
                title=f"test set latent means by digit, epoch {epoch}"))
        return paths
