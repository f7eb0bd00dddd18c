"""What a checkpoint of a run holds, how it is written, and how it is checked on resume.

A run is a deterministic function of its config and its data (every draw comes from a
keyed stream, :mod:`vae_np.train.streams`), so a checkpoint needs only the position
(epochs done, batches done in the current epoch) plus the state of the one stream that is
consumed batch by batch, the training noise; resuming reproduces the uninterrupted run
bit for bit.

On disk (``out_dir/checkpoint.npz``, pickle-free and written atomically by
:func:`vae_np.checkpoint.save_checkpoint`):

    arrays    model/<name>          parameters (``VAE.state_dict``)
              optimizer/<name>      step count and moments (``Adam.state_dict``)
              partial_epoch/terms   (batches_done, 3) loss, KL, recon of the batches
                                    trained in the unfinished epoch, nats per image
    metadata  format, vae_np_version, config (``TrainConfig.to_dict``), model_config,
              position {epochs_done, batches_done},
              partial_epoch {noise_state, seconds, images},
              history (one dict per finished epoch, keys ``EPOCH_METRICS``),
              data {source, description, n_train, n_test, binarize, image_shape,
                    origin (load_dataset's arguments that read the data again),
                    fingerprint (Dataset.fingerprint())}; the last three are absent
                    from checkpoints written before them
              ranks (the number of MPI ranks that trained it; 1 when absent)

:func:`read_run` checks every field against the others before anything is restored, so
a damaged or hand-edited file is a :class:`vae_np.checkpoint.CheckpointError` naming the
field, never a KeyError or a silently different run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import EPOCH_METRICS

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "PartialEpoch", "SavedRun", "check_resumable", "load_states",
           "read_run", "resumable_run", "write_run"]

CHECKPOINT_FILE = "checkpoint.npz"

#: TrainConfig fields added after checkpoints were first written: a checkpoint without
#: one was written before it existed, and gets its default (the behaviour of that time).
ADDED_FIELDS = ("distributed", "objective", "activation", "adam_eps", "output_bias",
                "schedule", "conditional", "input_shift", "architecture", "channels")
_DEFAULTS = TrainConfig()
CHECKPOINT_FORMAT = "vae_np.train checkpoint"  # metadata["format"] of a trainer checkpoint


@dataclass
class PartialEpoch:
    """The unfinished epoch after a mid-epoch interrupt (empty otherwise): ``terms``, the
    (loss, KL, recon) of its trained batches, host (batches_done, 3), nats per image;
    ``noise_state``, the training noise stream's ``RNG.state()`` after them (None before
    the first); ``seconds`` and ``images``, its training time and images so far."""

    terms: np.ndarray
    noise_state: dict | None = None
    seconds: float = 0.0
    images: int = 0

    @classmethod
    def empty(cls, dtype) -> "PartialEpoch":
        return cls(np.zeros((0, 3), dtype=dtype))


@dataclass
class SavedRun:
    """Everything a checkpoint holds (see the module docstring), as Python objects.

    ``partial_terms`` is (batches_done, 3) host float; ``noise_state`` is the training
    noise stream's ``RNG.state()`` after ``batches_done`` batches (None when 0);
    ``partial_seconds`` and ``partial_images`` are the training time (s) and images of
    the unfinished epoch so far.
    """

    config: TrainConfig
    model_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    model_config: dict[str, Any]
    epochs_done: int
    batches_done: int
    history: list[dict[str, Any]]
    partial_terms: np.ndarray
    noise_state: dict | None
    partial_seconds: float
    partial_images: int
    data: dict[str, Any]
    version: str
    path: Path | None = None  # the file it was read from
    ranks: int = 1            # MPI ranks of a --distributed run (1 otherwise)

    @property
    def partial(self) -> PartialEpoch:
        return PartialEpoch(self.partial_terms, self.noise_state, self.partial_seconds,
                            self.partial_images)


def write_run(path: Path, run: SavedRun) -> Path:
    """Write ``run`` atomically to ``path``; returns ``path``."""
    arrays = {f"model/{name}": value for name, value in run.model_state.items()}
    arrays.update({f"optimizer/{name}": np.asarray(value)
                   for name, value in run.optimizer_state.items()})
    arrays["partial_epoch/terms"] = np.ascontiguousarray(run.partial_terms)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "vae_np_version": run.version,
        "config": run.config.to_dict(),
        "model_config": run.model_config,
        "position": {"epochs_done": run.epochs_done, "batches_done": run.batches_done},
        "partial_epoch": {"noise_state": run.noise_state,
                          "seconds": run.partial_seconds,
                          "images": int(run.partial_images)},
        "history": run.history,
        "data": run.data,
        "ranks": int(run.ranks),
    }
    save_checkpoint(path, arrays, metadata)
    return path


def read_run(out_dir: str | Path) -> SavedRun:
    """The run checkpointed in ``out_dir``, every field checked (not yet restored).

    Raises FileNotFoundError (no checkpoint there) and CheckpointError (damaged, not a
    training checkpoint, or a field missing, of the wrong type or inconsistent with the
    others; the message names the field).
    """
    path = Path(out_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"out_dir: no checkpoint to resume at {path}")
    arrays, meta = load_checkpoint(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint of vae_np.train "
                              f"(format {meta.get('format')!r})")
    check = _Fields(path)
    config = check.config(check.get(meta, "config", dict))
    data = check.get(meta, "data", dict)
    for key, kind in (("source", str), ("description", str), ("n_train", int),
                      ("n_test", int), ("binarize", str)):
        check.get(data, key, kind, where="data")
    for key in ("n_train", "n_test"):
        check.integer(data[key], f"data.{key}", 1)
    for key, kind in (("origin", (dict, type(None))), ("fingerprint", str)):
        if key in data:
            check.get(data, key, kind, where="data")
    if isinstance(data.get("origin"), dict):
        check.get(data["origin"], "spec", str, where="data.origin")
    if data["binarize"] != config.binarize_mode:
        raise check.error("data.binarize", f"{config.binarize_mode!r} (config.binarize with "
                          f"config.decoder)", data["binarize"])

    position = check.get(meta, "position", dict)
    epochs_done = check.integer(check.get(position, "epochs_done", int, where="position"),
                                "position.epochs_done", 0, config.epochs)
    batches_per_epoch = math.ceil(data["n_train"] / config.batch_size)
    batches_done = check.integer(check.get(position, "batches_done", int, where="position"),
                                 "position.batches_done", 0, batches_per_epoch)
    if epochs_done == config.epochs and batches_done:
        raise check.error("position.batches_done", f"0 after all {config.epochs} epochs "
                          f"(config.epochs)", batches_done)
    terms = arrays.pop("partial_epoch/terms", None)
    if (not isinstance(terms, np.ndarray) or terms.dtype.kind != "f"
            or terms.shape != (batches_done, 3) or not np.all(np.isfinite(terms))):
        got = None if terms is None else f"{terms.dtype} array of shape {terms.shape}"
        raise check.error("partial_epoch/terms", f"a finite float array of shape "
                          f"({batches_done}, 3) (position.batches_done rows)", got)

    history = check.get(meta, "history", list)
    if len(history) != epochs_done:
        raise check.error("history", f"{epochs_done} entries (position.epochs_done)",
                          f"{len(history)} entries")
    for i, entry in enumerate(history):
        check.epoch_entry(entry, i + 1, f"history[{i}]")

    partial = check.get(meta, "partial_epoch", dict)
    noise_state = check.get(partial, "noise_state", (dict, type(None)), where="partial_epoch")
    if (noise_state is None) != (batches_done == 0):
        raise check.error("partial_epoch.noise_state",
                          "None exactly when position.batches_done is 0 (a dict from "
                          "RNG.state() otherwise)", noise_state)
    seconds = check.get(partial, "seconds", (int, float), where="partial_epoch")
    if isinstance(seconds, bool) or not (math.isfinite(seconds) and seconds >= 0):
        raise check.error("partial_epoch.seconds", "a finite number >= 0", seconds)
    expected_images = min(batches_done * config.batch_size, data["n_train"])
    images = check.get(partial, "images", int, where="partial_epoch")
    check.integer(images, "partial_epoch.images", expected_images, expected_images)

    model_state, optimizer_state = {}, {}
    for name, value in arrays.items():
        prefix, _, rest = name.partition("/")
        target = {"model": model_state, "optimizer": optimizer_state}.get(prefix)
        if target is None or not rest:
            raise CheckpointError(f"{path}: unexpected array {name!r} (a training checkpoint "
                                  f"holds model/*, optimizer/* and partial_epoch/terms)")
        target[rest] = value
    for prefix, state in (("model", model_state), ("optimizer", optimizer_state)):
        if not state:
            raise CheckpointError(f"{path}: no {prefix}/* arrays: the {prefix} state is missing")
    ranks = check.integer(meta.get("ranks", 1), "ranks", 1)
    return SavedRun(
        ranks=ranks, config=config, model_state=model_state, optimizer_state=optimizer_state,
        model_config=check.get(meta, "model_config", dict),
        epochs_done=epochs_done, batches_done=batches_done, history=history,
        partial_terms=terms, noise_state=noise_state, partial_seconds=float(seconds),
        partial_images=images, data=data, version=check.get(meta, "vae_np_version", str),
        path=path)


def resumable_run(out_dir: str | Path, overrides: Mapping[str, Any]) -> tuple[SavedRun,
                                                                           TrainConfig]:
    """The run checkpointed in ``out_dir`` (:func:`read_run`) and its config with
    ``overrides`` (``TrainConfig.continued``: ValueError for a field a resume may not
    change, or for fewer epochs than the run has done)."""
    saved = read_run(out_dir)
    config = saved.config.continued(overrides, out_dir)
    if config.epochs < saved.epochs_done:
        raise ValueError(f"epochs: the run in {out_dir} has already finished "
                         f"{saved.epochs_done} epochs; ask for at least that")
    return saved, config


def check_resumable(saved: SavedRun, out_dir: Path, ranks: int, data: dict[str, Any],
                    model_config: dict[str, Any]) -> None:
    """Refuse to continue the run ``saved`` (checkpointed in ``out_dir``) unless it
    continues in a job of ``ranks`` MPI ranks, on the data ``data``
    (``RunData.summary()``), with the model of ``model_config`` (``VAE.config`` of the
    model the run's config builds on these data).

    Raises CheckpointError when the file's model_config disagrees with what its config
    builds (an edit of either would resume one model while ``vae-np eval`` scores
    another); ValueError when the ranks, the classes or the data differ (the data
    fingerprint when recorded, so a moved file is the same data; else source and sizes).
    """
    if saved.ranks != ranks:
        raise ValueError(f"the run in {out_dir} was trained on {saved.ranks} MPI "
                         f"rank(s) and resumes only on as many (mpiexec -n {saved.ranks}"
                         f"{' ... --distributed' if saved.ranks > 1 else ''}); "
                         f"this job has {ranks}")
    differ = sorted(k for k, v in saved.model_config.items()
                    if k not in ("num_classes", "input_dim") and model_config.get(k) != v)
    if differ:
        raise CheckpointError(f"{saved.path}: metadata model_config and config disagree "
                              f"on {', '.join(differ)} (model_config "
                              f"{ {k: saved.model_config[k] for k in differ} }, the config "
                              f"builds { {k: model_config.get(k) for k in differ} })")
    classes, num_classes = saved.model_config.get("num_classes"), model_config["num_classes"]
    if classes != num_classes:
        raise ValueError(f"dataset: the run's conditional model has "
                         f"{classes} classes, the data set {num_classes}")
    was = saved.data
    keys = ("fingerprint",) if "fingerprint" in was else ("source", "n_train", "n_test")
    for key in keys:
        if data[key] != was[key]:
            raise ValueError(f"dataset: the run was trained on {was['description']} "
                             f"({was['n_train']} train / {was['n_test']} test images, from "
                             f"{was['source']}), got {data['description']} ({data['n_train']}"
                             f" / {data['n_test']}, from {data['source']})"
                             + ("; their contents or split differ (data.fingerprint)"
                                if key == "fingerprint" else ""))


def load_states(saved: SavedRun, model, optimizer, backend) -> None:
    """The checkpoint's parameters and optimizer state into ``model`` and ``optimizer``;
    CheckpointError (naming the file) when they, or the training noise stream's state,
    do not fit them or ``backend``."""
    for what, load, state in (("model", model.load_state_dict, saved.model_state),
                              ("optimizer", optimizer.load_state_dict,
                               saved.optimizer_state)):
        try:
            load(state)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{saved.path}: {what}/* arrays do not fit the "
                                  f"{what} of this config: {exc}") from exc
    if saved.noise_state is not None:
        try:  # the stream's own check, on a scratch stream of this backend
            backend.rng(0).set_state(saved.noise_state)
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{saved.path}: trainer metadata "
                                  f"partial_epoch.noise_state: not a state of this "
                                  f"backend's noise stream ({exc!r})") from exc


class _Fields:
    """Checks of one checkpoint's metadata; every failure is a CheckpointError that names
    the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, field: str, expected: str, got) -> CheckpointError:
        return CheckpointError(f"{self.path}: trainer metadata {field}: expected {expected}, "
                               f"got {got!r}")

    def get(self, mapping: dict, key: str, kind, where: str = ""):
        field = f"{where}.{key}" if where else key
        if key not in mapping:
            raise CheckpointError(f"{self.path}: trainer metadata lacks {field}")
        value = mapping[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
            raise self.error(field, names, value)
        return value

    def integer(self, value, field: str, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or \
                (high is not None and value > high):
            bounds = f">= {low}" if high is None else (
                f"{low}" if low == high else f"in {low}..{high}")
            raise self.error(field, f"an integer {bounds}", value)
        return value

    def config(self, values: dict) -> TrainConfig:
        # Fields added later default for checkpoints written before them.
        values = {**{name: getattr(_DEFAULTS, name) for name in ADDED_FIELDS}, **values}
        missing = sorted({f.name for f in dataclasses.fields(TrainConfig)} - set(values))
        if missing:
            raise CheckpointError(f"{self.path}: trainer metadata config lacks {missing}")
        try:
            return TrainConfig.from_dict(values)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: trainer metadata config: {exc}") from exc

    def epoch_entry(self, entry, epoch: int, field: str) -> None:
        if not isinstance(entry, dict):
            raise self.error(field, "a dict of epoch metrics", entry)
        missing = [key for key in EPOCH_METRICS if key not in entry]
        if missing:
            raise CheckpointError(f"{self.path}: trainer metadata {field} lacks {missing}")
        if entry["epoch"] != epoch or isinstance(entry["epoch"], bool):
            raise self.error(f"{field}.epoch", str(epoch), entry["epoch"])
        for key in EPOCH_METRICS:
            value = entry[key]
            if value is None and key == "images_per_second":  # None when no time was measured
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(f"{field}.{key}", "a number", value)
