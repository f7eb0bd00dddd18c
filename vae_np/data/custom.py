"""Your own data as a :class:`Dataset`: an ``.npz`` file of arrays, or a folder of images.

    load_dataset("mnist")            MNIST (downloaded, or the offline subset)
    load_dataset("my_data.npz")      arrays x_train, x_test (optional y_train, y_test, shape)
    load_dataset("my_pictures/")     PNG / JPEG files (needs Pillow), split by a seeded fraction

``.npz``: ``x_train`` and ``x_test`` are (N, D) feature vectors, or (N, H, W) / (N, H, W, 3)
images; uint8 arrays are pixels 0..255 and are scaled by 1/255. The examples are images
when the arrays have image axes, when a ``shape`` entry says so (``[H, W]`` or
``[H, W, 3]``), or when D is a square number (``D = s * s``: s x s greyscale images).

Image folder: every ``*.png`` / ``*.jpg`` / ``*.jpeg`` in it, converted to greyscale (the
default) or kept as RGB, resized to one shape (the first image's, or ``image_size``),
scaled to [0, 1]. When the images sit in subfolders instead, each subfolder is a class and
its name, in sorted order, gives the label (the torchvision ImageFolder convention).

Every failure is a one-line ValueError (FileNotFoundError for a missing path) naming the
file and the array.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..validation import check_choice, check_number
from .dataset import Dataset
from .mnist import load_mnist

__all__ = ["IMAGE_SUFFIXES", "load_dataset", "load_image_folder", "load_npz_dataset",
           "real_valued_hint"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def real_valued_hint() -> str:
    """What to do with data outside [0, 1]: the one place that says it."""
    return ("the bernoulli decoder needs features in [0, 1] (pixel intensities, "
            "probabilities); rescale them, or use a Gaussian decoder for real-valued data "
            "(--decoder gaussian, or gaussian-fixed)")


def load_dataset(spec: str | os.PathLike, *, decoder: str = "bernoulli",
                 data_dir: str | os.PathLike | None = None, download: bool = True,
                 color: str = "gray", image_size: tuple[int, int] | None = None,
                 test_fraction: float = 0.2, seed: int = 0,
                 log: Callable[[str], object] | None = print) -> Dataset:
    """The data set named by ``spec``: ``"mnist"``, a ``.npz`` file or a folder of images.

    ``decoder`` decides whether features outside [0, 1] are an error (``bernoulli``) or
    fine (the Gaussian decoders). ``data_dir``, ``download`` and ``log`` go to
    :func:`vae_np.data.load_mnist`; ``color``, ``image_size``, ``test_fraction`` and
    ``seed`` to :func:`load_image_folder`.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text == "mnist":
        dataset = load_mnist(data_dir, download=download, log=log)
        # Dataset.origin: what reads it again (a resume, vae-np eval of the run).
        origin = {"spec": "mnist", "data_dir": None if data_dir is None
                  else os.path.abspath(Path(data_dir).expanduser())}
    elif path.is_dir():
        dataset = load_image_folder(path, decoder=decoder, color=color, image_size=image_size,
                                    test_fraction=test_fraction, seed=seed)
        origin = {"spec": os.path.abspath(path), "color": color,
                  "image_size": None if image_size is None else [int(s) for s in image_size],
                  "test_fraction": float(test_fraction), "seed": int(seed)}
    elif path.suffix.lower() == ".npz" or path.is_file():
        dataset = load_npz_dataset(path, decoder=decoder)
        origin = {"spec": os.path.abspath(path)}
    else:
        raise FileNotFoundError(f"dataset: expected 'mnist', an .npz file or a folder of "
                                f"images, got {text!r}, which does not exist")
    dataset.origin = origin
    return dataset


# --------------------------------------------------------------------------------------
# .npz files


def _unit_float(x: np.ndarray, where: str) -> np.ndarray:
    """A numeric array as float32; uint8 pixels 0..255 become intensities in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: expected a numeric array, got dtype {x.dtype}")
    return x.astype(np.float32)


def _image_shape_entry(value: np.ndarray, where: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in np.asarray(value).reshape(-1)) \
        if np.asarray(value).dtype.kind in "iu" else None
    if shape is None or len(shape) not in (2, 3) or min(shape) < 1 or \
            (len(shape) == 3 and shape[2] not in (1, 3)):
        raise ValueError(f"{where}: expected [H, W] or [H, W, 3] (positive integers), got "
                         f"{np.asarray(value).tolist()!r}")
    return shape


def load_npz_dataset(path: str | os.PathLike, decoder: str = "bernoulli") -> Dataset:
    """Arrays ``x_train``, ``x_test`` (optional ``y_train``, ``y_test``, ``shape``) of an
    ``.npz`` file as a :class:`Dataset` (see the module docstring for the layout).

    Raises FileNotFoundError (no such file) and ValueError naming the file and array:
    not an .npz, a missing array, an empty split, NaN/inf, values outside [0, 1] for the
    Bernoulli decoder, shapes that do not match, labels that are not integers >= 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset: no such file {path}")
    if not zipfile.is_zipfile(path):  # else NumPy reads any other bytes as a pickle
        raise ValueError(f"{path}: not a .npz file (not a zip archive); save the arrays "
                         f"with numpy.savez(path, x_train=..., x_test=...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable .npz file of arrays "
                         f"({' '.join(str(exc).split())})") from None
    except AttributeError:  # np.load returned a plain .npy array: no context manager
        raise ValueError(f"{path}: is a single .npy array; expected an .npz holding "
                         f"x_train and x_test (numpy.savez(path, x_train=..., x_test=...))") \
            from None
    for name in ("x_train", "x_test"):
        if name not in arrays:
            raise ValueError(f"{path}: no array {name!r} (it holds {sorted(arrays)}); expected "
                             f"x_train and x_test, optionally y_train, y_test and shape")
    image_shape, shape_from = None, None
    if "shape" in arrays:
        image_shape = _image_shape_entry(arrays["shape"], f"{path}: array 'shape'")
        shape_from = "array 'shape' says"
    xs = {}
    for name in ("x_train", "x_test"):
        x = arrays[name]
        where = f"{path}: array {name!r}"
        if x.ndim < 2:
            raise ValueError(f"{where}: expected (N, D) features or (N, H, W[, 3]) images, "
                             f"got shape {x.shape}")
        if x.shape[0] < 1:
            raise ValueError(f"{where}: is empty; each split needs at least one example")
        if math.prod(x.shape[1:]) < 1:
            raise ValueError(f"{where}: has shape {x.shape}: no features per example")
        if x.ndim > 2:
            found = tuple(int(s) for s in x.shape[1:])
            if image_shape is not None and found != image_shape and \
                    found != image_shape[:2] + (1,) * (len(found) == 3):
                raise ValueError(f"{where}: images of shape {found}, but {shape_from} "
                                 f"{list(image_shape)}")
            if image_shape is None:
                image_shape = found[:2] if found[2:] == (1,) else found
                shape_from = f"array {name!r} has images of shape"
        x = _unit_float(x, where).reshape(len(x), -1)
        if not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x))[0][0])
            raise ValueError(f"{where}: holds NaN or infinite values (first in example {bad})")
        xs[name] = x
    if xs["x_train"].shape[1] != xs["x_test"].shape[1]:
        raise ValueError(f"{path}: array 'x_test' has {xs['x_test'].shape[1]} features per "
                         f"example, array 'x_train' has {xs['x_train'].shape[1]}")
    features = xs["x_train"].shape[1]
    if image_shape is None:
        side = math.isqrt(features)
        image_shape = (side, side) if side * side == features and side > 1 else None
    if image_shape is not None and math.prod(image_shape) != features:
        raise ValueError(f"{path}: array 'shape' {list(image_shape)} holds "
                         f"{math.prod(image_shape)} values, the examples have {features}")
    unit = all(float(x.min()) >= 0.0 and float(x.max()) <= 1.0 for x in xs.values())
    if decoder == "bernoulli" and not unit:
        for name, x in xs.items():
            if float(x.min()) < 0.0 or float(x.max()) > 1.0:
                raise ValueError(f"{path}: array {name!r} has values in [{float(x.min()):g}, "
                                 f"{float(x.max()):g}]; {real_valued_hint()}")
    ys = _labels(arrays, path, {n: len(x) for n, x in xs.items()})
    num_classes = None if ys is None else int(max(ys[0].max(), ys[1].max())) + 1
    n_train, n_test = len(xs["x_train"]), len(xs["x_test"])
    what = "x".join(map(str, image_shape)) + " images" if image_shape else f"{features} features"
    return Dataset(xs["x_train"], None if ys is None else ys[0], xs["x_test"],
                   None if ys is None else ys[1], source=str(path),
                   description=f"{path.name} ({n_train:,} train / {n_test:,} test, {what}"
                               f"{'' if ys is None else f', {num_classes} classes'})",
                   image_shape=image_shape, num_classes=num_classes, unit_range=unit)


def _labels(arrays: dict, path: Path, sizes: dict) -> tuple[np.ndarray, np.ndarray] | None:
    present = [name for name in ("y_train", "y_test") if name in arrays]
    if not present:
        return None
    if len(present) == 1:
        missing = "y_test" if present == ["y_train"] else "y_train"
        raise ValueError(f"{path}: has array {present[0]!r} but no {missing!r}; give labels "
                         f"for both splits or for neither")
    out = []
    for name in ("y_train", "y_test"):
        y, x_name = arrays[name], "x" + name[1:]
        where = f"{path}: array {name!r}"
        if y.shape != (sizes[x_name],):
            raise ValueError(f"{where}: expected shape ({sizes[x_name]},), one label per "
                             f"example of {x_name!r}, got {y.shape}")
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        if y.dtype.kind not in "iu":
            raise ValueError(f"{where}: expected integer class labels, got dtype {y.dtype}")
        if y.min() < 0:
            raise ValueError(f"{where}: expected labels 0, 1, 2, ..., got {int(y.min())}")
        out.append(y.astype(np.int64))
    return out[0], out[1]


# --------------------------------------------------------------------------------------
# Folders of images


def _image_files(directory: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    top = images_in(directory)
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and images_in(p))
    if top and classes:
        raise ValueError(f"{directory}: holds images both at the top and in subfolders "
                         f"{classes}; put every image in a class subfolder, or none")
    if top:
        return top, None, []
    if not classes:
        raise ValueError(f"{directory}: no {'/'.join(IMAGE_SUFFIXES)} images in it or in "
                         f"its subfolders")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = images_in(directory / name)
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def load_image_folder(directory: str | os.PathLike, decoder: str = "bernoulli",
                      color: str = "gray", image_size: tuple[int, int] | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The PNG / JPEG images of ``directory`` as a :class:`Dataset` (needs Pillow).

    Args:
        color: ``"gray"`` (one channel, ITU-R 601-2 luma) or ``"rgb"`` (three).
        image_size: (H, W) to resize every image to (bilinear); default the first image's.
        test_fraction: the share of images (rounded, at least one) in the test split,
            chosen by a permutation seeded with ``seed``; the rest train (at least one).

    Intensities are pixel / 255 in [0, 1], so every decoder fits them.
    """
    directory = Path(directory)
    check_choice("color", color, ("gray", "rgb"))
    test_fraction = check_number("test_fraction", test_fraction, low=0.0, high=1.0,
                                 low_open=True, high_open=True)
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset: no such folder {directory}")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError('a folder of images needs Pillow: pip install -e ".[train]" '
                          "(or: pip install pillow)") from None
    files, labels, classes = _image_files(directory)
    if len(files) < 2:
        raise ValueError(f"{directory}: found {len(files)} image; a train and a test split "
                         f"need at least two")
    pixels = []
    size = None if image_size is None else (int(image_size[1]), int(image_size[0]))  # PIL: (W, H)
    for file in files:
        try:
            with Image.open(file) as image:
                # 16-bit greyscale: Pillow's I;16 -> L conversion saturates (all white),
                # so read it as floats and scale by its own range, 0..65535.
                mode = image.mode
                deep = mode.startswith("I")
                full = 65535.0 if deep else 255.0
                image = image.convert("F" if deep else "L" if color == "gray" else "RGB")
                if size is None:
                    size = image.size
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR)
                values = np.asarray(image, dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"{file}: not a readable image ({' '.join(str(exc).split())})") \
                from None
        if deep and (values.min() < 0 or values.max() > full):
            raise ValueError(f"{file}: {mode} pixels in [{values.min():g}, "
                             f"{values.max():g}], outside the 16-bit range 0..65535")
        if deep and color == "rgb":
            values = np.repeat(values[..., None], 3, axis=-1)
        pixels.append(values / np.float32(full))
    x = np.stack(pixels).reshape(len(pixels), -1)
    image_shape = (size[1], size[0]) if color == "gray" else (size[1], size[0], 3)
    n_test = min(max(1, round(len(files) * test_fraction)), len(files) - 1)
    order = np.random.default_rng(seed).permutation(len(files))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    shape_text = "x".join(map(str, image_shape))
    return Dataset(x[train], None if y is None else y[train], x[test],
                   None if y is None else y[test], source=str(directory),
                   description=f"{directory.name}/ ({len(train):,} train / {n_test:,} test "
                               f"{shape_text} {color} images"
                               f"{'' if y is None else f', {len(classes)} classes'})",
                   image_shape=image_shape, num_classes=None if y is None else len(classes),
                   unit_range=True)
