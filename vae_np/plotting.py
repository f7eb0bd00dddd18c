"""Pictures of a training run: image grids, reconstructions, loss curves, latent space.

Every ``save_*`` / ``plot_*`` function takes host NumPy arrays (call ``.get()``
or ``cupy.asnumpy`` on device arrays first), renders with matplotlib's
non-interactive Agg canvas on a standalone :class:`matplotlib.figure.Figure`
(``matplotlib.pyplot`` is never imported, so a user's backend and open
figures are untouched), writes it atomically (temp file in the same directory, then
:func:`os.replace`) in the format the path's suffix names (PNG, PDF, SVG, JPEG:
:data:`vae_np.outputs.PICTURE_FORMATS`) and returns the output path.

matplotlib is imported lazily, so ``import vae_np.plotting`` works without it;
install it with ``pip install -e ".[train]"``.  :func:`image_grid` is pure NumPy.

Images are intensities in ``[0, 1]`` (e.g. Bernoulli means from the decoder), greyscale
given flat as ``(N, H*W)`` or as ``(N, H, W)`` with ``image_shape=(H, W)``, or RGB given as
``(N, H*W*3)`` or ``(N, H, W, 3)`` with ``image_shape=(H, W, 3)``; 0 is drawn black.
Examples that are not images (feature vectors) are drawn as line plots by
:func:`plot_feature_vectors`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from .checkpoint import atomic_write
from .outputs import figure_bytes
from .validation import check_int, check_number

__all__ = [
    "image_grid",
    "plot_latent_scatter",
    "plot_loss_curves",
    "plot_feature_vectors",
    "plot_manifold",
    "require_matplotlib",
    "save_image_grid",
    "save_reconstructions",
]

# Values this far outside [0, 1] are float round-off (e.g. a sigmoid computed
# in float32) and are clipped; anything further out is a caller bug.
_RANGE_TOL = 1e-5
_DPI = 100


# --------------------------------------------------------------------------
# Helpers


def _mpl():
    """Return (Figure, FigureCanvasAgg), importing matplotlib on first use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "vae_np.plotting needs matplotlib, which is not installed; install the "
            'training extras with  pip install -e ".[train]"  (or  pip install matplotlib)'
        ) from exc
    return Figure, FigureCanvasAgg


def require_matplotlib() -> None:
    """Raise ImportError (with the install command) now if matplotlib is missing.

    For callers that will draw later, e.g. a trainer that draws after each epoch and
    should fail before the first one rather than after it.
    """
    _mpl()


def _new_figure(figsize: tuple[float, float]):
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=figsize, dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot, no GUI
    return fig


def _save_figure(fig, path: str | os.PathLike) -> Path:
    data = figure_bytes(fig, path, _DPI)  # drawn before the temporary file is opened
    return atomic_write(path, lambda fh: fh.write(data))


def _image_shape(image_shape: Any) -> tuple[int, ...]:
    """(H, W) for greyscale, (H, W, 3) for RGB; (H, W, 1) is greyscale, (H, W)."""
    try:
        dims = tuple(image_shape)
    except TypeError:
        dims = ()
    if len(dims) not in (2, 3) or (len(dims) == 3 and dims[2] not in (1, 3)):
        raise ValueError(f"image_shape must be (height, width) or (height, width, 3), "
                         f"got {image_shape!r}")
    h, w = check_int("image_shape[0]", dims[0], 1), check_int("image_shape[1]", dims[1], 1)
    return (h, w, 3) if len(dims) == 3 and dims[2] == 3 else (h, w)


def _as_images(images: Any, image_shape: tuple[int, ...], name: str) -> np.ndarray:
    """Validate and return *images* as float64 of shape (N, *image_shape), clipped to
    [0, 1]."""
    size = math.prod(image_shape)
    try:
        arr = np.asarray(images)
    except TypeError as exc:  # e.g. CuPy refuses implicit device->host copies
        raise TypeError(f"{name} must be a host numpy array ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[1] == size:
        arr = arr.reshape(arr.shape[0], *image_shape)
    elif not (arr.ndim == 1 + len(image_shape) and arr.shape[1:] == tuple(image_shape)):
        dims = ", ".join(map(str, image_shape))
        raise ValueError(
            f"{name} must have shape (N, {size}) or (N, {dims}), got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (N == 0)")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise ValueError(
            f"{name} must hold intensities in [0, 1], got values in [{lo:.6g}, {hi:.6g}] "
            "(scale uint8 pixels by 1/255; pass probabilities, not logits)"
        )
    return np.clip(arr, 0.0, 1.0)


def _show_gray(ax, grid: np.ndarray) -> None:
    """Greyscale (2-D) or RGB (H, W, 3) intensities in [0, 1]."""
    if grid.ndim == 3:
        ax.imshow(grid, interpolation="nearest")
    else:
        ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _grid_figsize(grid_shape: tuple[int, ...], extra_height_in: float = 0.0) -> tuple[float, float]:
    # Two screen pixels per image pixel (three for tiny grids), so digits stay crisp.
    gh, gw = grid_shape[:2]
    scale = 3 if max(gh, gw) < 150 else 2
    return max(gw * scale / _DPI, 1.0), max(gh * scale / _DPI, 1.0) + extra_height_in


# --------------------------------------------------------------------------
# Image grids


def image_grid(
    images: np.ndarray,
    nrow: int,
    image_shape: tuple[int, int] = (28, 28),
    padding: int = 2,
    pad_value: float = 0.5,
) -> np.ndarray:
    """Tile images into one 2-D array.

    Parameters
    ----------
    images:
        ``(N, H*W)`` or ``(N, H, W)`` intensities in ``[0, 1]``; values within
        ``1e-5`` outside the range are clipped, anything further raises.
    nrow:
        Number of images per grid row (the torchvision ``make_grid``
        convention); the grid has ``ceil(N / nrow)`` rows, filled row by row,
        and unused cells in the last row are left as *pad_value*.
    image_shape:
        ``(H, W)`` of one greyscale image, ``(H, W, 3)`` of one RGB image.
    padding:
        Pixels of *pad_value* between images and around the border.
    pad_value:
        Intensity of the padding (default mid-grey, distinct from both the
        black background and the white strokes of MNIST digits).

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(rows*(H+p) + p, cols*(W+p) + p)`` (``+ (3,)`` for
        RGB) with
        ``cols = min(nrow, N)``, ``rows = ceil(N / nrow)``, ``p = padding``.
        Image ``i`` occupies rows ``p + r*(H+p) : p + r*(H+p) + H`` and columns
        ``p + c*(W+p) : p + c*(W+p) + W`` where ``r, c = divmod(i, nrow)``.

    Raises
    ------
    ValueError
        Bad shape, N == 0, values outside ``[0, 1]`` or non-finite, or a
        non-positive *nrow*; the message names the argument.
    """
    shape = _image_shape(image_shape)
    nrow = check_int("nrow", nrow, 1)
    p = check_int("padding", padding, 0)
    pad_value = check_number("pad_value", pad_value, low=0.0, high=1.0)
    imgs = _as_images(images, shape, "images")

    n, (h, w) = imgs.shape[0], shape[:2]
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + p) + p, cols * (w + p) + p, *shape[2:]), pad_value)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = p + r * (h + p), p + c * (w + p)
        grid[top : top + h, left : left + w] = imgs[i]
    return grid


def save_image_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    nrow: int,
    title: str | None = None,
    image_shape: tuple[int, int] = (28, 28),
    padding: int = 2,
) -> Path:
    """Write :func:`image_grid` ``(images, nrow, image_shape, padding)`` as a PNG.

    *images* are ``(N, H*W)`` or ``(N, H, W)`` intensities in ``[0, 1]``
    (e.g. samples decoded from the prior); *nrow* is images per row.  Returns
    the written path.
    """
    grid = image_grid(images, nrow, image_shape=image_shape, padding=padding)
    title_in = 0.4 if title else 0.0
    fig = _new_figure(_grid_figsize(grid.shape, title_in))
    height = fig.get_figheight()
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_in / height))
    _show_gray(ax, grid)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, y=1.0 - 0.5 * title_in / height, va="center")
    return _save_figure(fig, path)


def save_reconstructions(
    path: str | os.PathLike,
    originals: np.ndarray,
    reconstructions: np.ndarray,
    n: int = 16,
    ncol: int = 8,
    title: str | None = None,
    image_shape: tuple[int, int] = (28, 28),
) -> Path:
    """Write the first *n* originals above their reconstructions as a PNG.

    Pairs are laid out in bands of *ncol* images: each band is a row labelled
    "original" with, directly beneath it, the matching row labelled
    "reconstruction", so image ``i`` and its reconstruction share a column.

    Parameters
    ----------
    originals, reconstructions:
        Same-shaped ``(N, H*W)`` or ``(N, H, W)`` intensities in ``[0, 1]``
        (reconstructions are decoder means, not samples).
    n:
        How many pairs to show; ``min(n, N)`` are used.
    ncol:
        Pairs per band.

    Returns the written path.  ValueError (naming the argument) for bad
    shapes, mismatched N, empty inputs or values outside ``[0, 1]``.
    """
    shape = _image_shape(image_shape)
    n = check_int("n", n, 1)
    ncol = check_int("ncol", ncol, 1)
    orig = _as_images(originals, shape, "originals")
    recon = _as_images(reconstructions, shape, "reconstructions")
    if orig.shape[0] != recon.shape[0]:
        raise ValueError(
            f"originals and reconstructions must hold the same number of images, "
            f"got {orig.shape[0]} and {recon.shape[0]}"
        )
    n = min(n, orig.shape[0])
    ncol = min(ncol, n)
    bands = math.ceil(n / ncol)

    strips = []
    for b in range(bands):
        chunk = slice(b * ncol, min((b + 1) * ncol, n))
        for label, imgs in (("original", orig), ("reconstruction", recon)):
            strip = image_grid(imgs[chunk], ncol, shape, padding=1)
            if strip.shape[1] < ncol * (shape[1] + 1) + 1:  # short last band: keep columns aligned
                full = np.full((strip.shape[0], ncol * (shape[1] + 1) + 1, *shape[2:]), 0.5)
                full[:, : strip.shape[1]] = strip
                strip = full
            strips.append((label, strip))

    strip_h, strip_w = strips[0][1].shape[:2]
    label_in, title_in = 1.1, (0.4 if title else 0.0)
    img_w, img_h = _grid_figsize((strip_h * len(strips), strip_w))
    fig = _new_figure((img_w + label_in, img_h + title_in))
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()
    row_h = img_h / len(strips) / fig_h
    for k, (label, strip) in enumerate(strips):
        bottom = 1.0 - title_in / fig_h - (k + 1) * row_h
        ax = fig.add_axes((label_in / fig_w, bottom, img_w / fig_w, row_h))
        _show_gray(ax, strip)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, y=1.0 - 0.5 * title_in / fig_h, va="center")
    return _save_figure(fig, path)


# --------------------------------------------------------------------------
# Loss curves

_LOSS_PANELS = (
    ("negative ELBO (nats / image)", (("train_loss", "train"), ("test_loss", "test"))),
    (
        "ELBO terms (nats / image)",
        (
            ("train_recon", "train reconstruction"),
            ("test_recon", "test reconstruction"),
            ("train_kl", "train KL"),
            ("test_kl", "test KL"),
        ),
    ),
)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) for the entries that have a finite value under *key*."""
    xs, ys = [], []
    for i, entry in enumerate(history):
        value = entry.get(key)
        if value is None:
            continue
        value = float(value)
        if math.isfinite(value):
            xs.append(float(entry.get("epoch", i + 1)))
            ys.append(value)
    return np.asarray(xs), np.asarray(ys)


def plot_loss_curves(
    path: str | os.PathLike,
    history: Sequence[Mapping[str, Any]],
    title: str | None = None,
) -> Path:
    """Plot per-epoch losses in two panels and write a PNG.

    Parameters
    ----------
    history:
        One mapping per epoch with any of the keys ``epoch`` (x value; the
        1-based position is used when absent), ``train_loss``/``test_loss``
        (negative ELBO), ``train_recon``/``test_recon`` (expected negative
        log-likelihood) and ``train_kl``/``test_kl`` (KL to the prior), all in
        nats per image.  Missing keys, ``None`` and NaN values are skipped, so
        e.g. a test loss evaluated every few epochs plots as its own series.

    The left panel shows the negative ELBO, the right panel its
    reconstruction and KL terms.  Returns the written path.  ValueError if
    *history* is empty or not a sequence of mappings.
    """
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or isinstance(history, str):
        raise ValueError(f"history must be a list of per-epoch dicts, got {type(history).__name__}")
    if len(history) == 0:
        raise ValueError("history is empty")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"history[{i}] must be a dict, got {type(entry).__name__}")

    fig = _new_figure((10.0, 4.0))
    axes = fig.subplots(1, 2)
    for ax, (ylabel, series) in zip(axes, _LOSS_PANELS):
        plotted = False
        for key, label in series:
            xs, ys = _series(history, key)
            if xs.size == 0:
                continue
            style = "-" if key.startswith("train") else "--"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=label)
            plotted = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if plotted:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------
# Latent space


def plot_latent_scatter(
    path: str | os.PathLike,
    z_mean: np.ndarray,
    labels: np.ndarray,
    title: str | None = None,
) -> Path:
    """Scatter 2-D latent means coloured by class label and write a PNG.

    Parameters
    ----------
    z_mean:
        ``(N, 2)`` encoder means (dimensionless latent coordinates).
    labels:
        ``(N,)`` integer class labels, e.g. digits 0..9; each distinct label
        gets its own colour and legend entry (a colorbar is used instead when
        there are more than 20 distinct labels).

    Returns the written path.  ValueError if *z_mean* is not a finite
    ``(N, 2)`` array with N > 0, or *labels* is not integer ``(N,)``.
    """
    z = np.asarray(z_mean)
    if z.ndim != 2 or z.shape[1] != 2 or z.shape[0] == 0 or z.dtype.kind not in "biuf":
        raise ValueError(f"z_mean must be a numeric (N, 2) array with N > 0, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("z_mean contains NaN or infinite values")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape ({z.shape[0]},) to match z_mean, got {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")

    classes = np.unique(y)
    fig = _new_figure((7.0, 6.0))
    ax = fig.add_subplot()
    # Small markers and some transparency: 10k overlapping points stay readable.
    size = 4.0 if z.shape[0] > 2000 else 12.0
    if classes.size <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if classes.size <= 10 else "tab20"]
        for k, cls in enumerate(classes):
            sel = y == cls
            ax.scatter(z[sel, 0], z[sel, 1], s=size, alpha=0.6, color=cmap(k), label=str(cls),
                       linewidths=0)
        ax.legend(title="label", markerscale=3 if size < 10 else 1.5, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        points = ax.scatter(z[:, 0], z[:, 1], c=y, s=size, alpha=0.6, cmap="viridis", linewidths=0)
        fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel("z[0] (posterior mean)")
    ax.set_ylabel("z[1] (posterior mean)")
    ax.set_title(title or "latent means by label")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_manifold(
    path: str | os.PathLike,
    decode: Callable[[np.ndarray], np.ndarray],
    n: int = 20,
    image_shape: tuple[int, int] = (28, 28),
    extent: tuple[float, float] = (0.05, 0.95),
    title: str | None = None,
) -> Path:
    """Decode an ``n x n`` grid of 2-D latent points and write the tiled images as a PNG.

    The coordinates along each latent axis are
    ``g = Phi^-1(numpy.linspace(extent[0], extent[1], n))`` (the standard normal's
    quantile function, ``statistics.NormalDist().inv_cdf``):
    evenly spaced *quantiles* of the N(0, 1) prior, so the grid covers the
    region the prior actually puts mass on.

    *decode* is called once with a float64 ``(n*n, 2)`` array whose row
    ``k = i*n + j`` is ``(g[j], g[i])`` (z[0] varies fastest; both axes
    increase) and must return ``(n*n, H*W)`` (or ``(n*n, H, W)``) host numpy
    intensities in ``[0, 1]``, e.g. Bernoulli means.  In the picture z[0]
    increases to the right and z[1] upwards.

    *extent* is the ``(low, high)`` cumulative probability of the outermost
    grid points, with ``0 < low < high < 1``.  Returns the written path.
    """
    n = check_int("n", n, 1)
    shape = _image_shape(image_shape)
    try:
        lo, hi = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise ValueError(f"extent must be a (low, high) pair of probabilities, got {extent!r}") from None
    if not 0.0 < lo < hi < 1.0 and not (n == 1 and 0.0 < lo <= hi < 1.0):
        raise ValueError(f"extent must satisfy 0 < low < high < 1, got {extent!r}")
    if not callable(decode):
        raise ValueError("decode must be a callable mapping (M, 2) latents to (M, H*W) images")
    _mpl()  # fail before the (possibly slow) decode if matplotlib is missing

    # the standard library's quantile function (Wichura's AS 241, full double precision)
    g = np.array([NormalDist().inv_cdf(float(p)) for p in np.linspace(lo, hi, n)])
    z1, z0 = np.meshgrid(g, g, indexing="ij")  # row k = i*n + j -> (g[j], g[i])
    points = np.ascontiguousarray(np.stack([z0.ravel(), z1.ravel()], axis=1), dtype=np.float64)
    decoded = _as_images(decode(points), shape, "decode(z) output")
    if decoded.shape[0] != n * n:
        raise ValueError(f"decode returned {decoded.shape[0]} images for {n * n} latent points")

    h, w = shape[:2]
    # Flip the rows so the largest z[1] is at the top, as on a y axis.
    tiles = decoded.reshape(n, n, h, w, -1)[::-1]
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(n * h, n * w, -1)
    grid = grid[:, :, 0] if grid.shape[2] == 1 else grid

    fig = _new_figure((max(6.0, n * w * 2 / _DPI) + 0.8, max(6.0, n * h * 2 / _DPI) + 0.8))
    ax = fig.add_subplot()
    _show_gray(ax, grid)
    step = max(1, math.ceil(n / 10))  # at most ~10 tick labels per axis
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks * w + (w - 1) / 2, [f"{g[j]:.2f}" for j in ticks])
    ax.set_yticks((n - 1 - ticks) * h + (h - 1) / 2, [f"{g[i]:.2f}" for i in ticks])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title or f"decoded latent grid ({n}x{n}, prior quantiles {lo:g}..{hi:g})")
    fig.tight_layout()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------
# Feature vectors (examples that are not images)


def plot_feature_vectors(
    path: str | os.PathLike,
    panels: Sequence[np.ndarray],
    ncol: int = 4,
    title: str | None = None,
    panel_titles: Sequence[str] | None = None,
    legend: Sequence[str] | None = None,
) -> Path:
    """Small multiples of feature vectors: one panel per entry of *panels*, each a
    ``(k, D)`` array drawn as k lines over the feature index 0..D-1, and write a PNG.

    The examples of a data set that is not images (a user's ``.npz`` of D features)
    are drawn this way: one vector per panel for samples, an original and its
    reconstruction per panel (``legend=("original", "reconstruction")``), or the steps of
    an interpolation per panel (k > 2 lines coloured from the first to the last step, no
    legend needed). Values may be any finite numbers. Returns the written path.
    """
    ncol = check_int("ncol", ncol, 1)
    if isinstance(panels, np.ndarray):
        panels = list(panels) if panels.ndim == 3 else [panels]
    if len(panels) == 0:
        raise ValueError("panels is empty")
    arrays = []
    for i, panel in enumerate(panels):
        arr = np.asarray(panel, dtype=np.float64)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"panels[{i}] must be a (k, D) array with k, D >= 1, "
                             f"got shape {np.shape(panel)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"panels[{i}] contains NaN or infinite values")
        arrays.append(arr)
    if panel_titles is not None and len(panel_titles) != len(arrays):
        raise ValueError(f"panel_titles must have {len(arrays)} entries, got {len(panel_titles)}")
    ncol = min(ncol, len(arrays))
    nrows = math.ceil(len(arrays) / ncol)
    fig = _new_figure((3.0 * ncol, 2.2 * nrows + (0.4 if title else 0.0)))
    axes = np.atleast_1d(fig.subplots(nrows, ncol, squeeze=False)).ravel()
    low = min(float(a.min()) for a in arrays)
    high = max(float(a.max()) for a in arrays)
    margin = 0.05 * (high - low) if high > low else 0.5
    from matplotlib import colormaps

    for i, ax in enumerate(axes):
        if i >= len(arrays):
            ax.set_axis_off()
            continue
        arr = arrays[i]
        index = np.arange(arr.shape[1])
        for k, row in enumerate(arr):
            if legend is not None and k < len(legend):
                ax.plot(index, row, lw=1.0, label=legend[k], marker="." if arr.shape[1] <= 32 else None)
            else:
                color = colormaps["viridis"](k / max(arr.shape[0] - 1, 1)) if arr.shape[0] > 2 else None
                ax.plot(index, row, lw=1.0, color=color, marker="." if arr.shape[1] <= 32 else None)
        ax.set_ylim(low - margin, high + margin)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if panel_titles is not None:
            ax.set_title(panel_titles[i], fontsize=8)
        if legend is not None and i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)
