"""The PNGs a run redraws after every epoch, from fixed test digits and prior latents.

    reconstructions.png, samples.png, loss_curves.png   every run
    manifold.png, latent_scatter.png                    also, when latent_dim == 2
                                                        (a conditional model: no manifold)

A conditional model's samples.png has one row per class, each decoded from the same
``CLASS_SAMPLES`` prior latents (a column is one z under every label).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import plotting
from .rundata import RunData
from .streams import Stream

__all__ = ["CLASS_SAMPLES", "PICTURE_DIGITS", "PICTURE_FILES", "PICTURE_SAMPLES",
           "RunPictures"]

# How many test digits the reconstruction picture shows and how many prior samples the
# sample picture shows (8 per row); a conditional model's shows CLASS_SAMPLES per class.
PICTURE_DIGITS = 32
PICTURE_SAMPLES = 64
CLASS_SAMPLES = 8
PICTURE_FILES = ("reconstructions.png", "samples.png", "loss_curves.png", "manifold.png",
                 "latent_scatter.png")


class RunPictures:
    """Draws a run's pictures; the digits shown and the prior latents decoded are drawn
    once (stream ``PICTURES``), so every epoch's pictures show the same ones."""

    def __init__(self, data: RunData, latent_dim: int, num_classes: int | None = None):
        self.data, self.backend, self.latent_dim = data, data.backend, latent_dim
        self.num_classes = num_classes
        picture_rng = np.random.default_rng(data.key(Stream.PICTURES))
        self.digits = np.sort(
            picture_rng.permutation(data.n_test)[:PICTURE_DIGITS]).astype(np.int64)
        self.prior_latents = self.backend.rng(data.key(Stream.PICTURES)).normal(
            (PICTURE_SAMPLES, latent_dim))

    def _images(self, device_images) -> np.ndarray:
        """Decoder means as host pictures; Gaussian means may stray outside [0, 1]."""
        return np.clip(self.backend.to_numpy(device_images), 0.0, 1.0)

    def sample_images(self, model) -> np.ndarray:
        """The decoder means samples.png shows, host: (PICTURE_SAMPLES, D) for an
        unconditional model; (num_classes, CLASS_SAMPLES, D) for a conditional one, row c
        the first CLASS_SAMPLES prior latents decoded with label c."""
        if self.num_classes is None:
            return self.backend.to_numpy(model.decode(self.prior_latents, check_finite=False))
        xp, k = self.backend.xp, self.num_classes
        z = self.prior_latents[:CLASS_SAMPLES, :]
        z = xp.reshape(xp.broadcast_to(z, (k, *z.shape)), (k * CLASS_SAMPLES, -1))
        labels = np.repeat(np.arange(k, dtype=np.int64), CLASS_SAMPLES)
        means = self.backend.to_numpy(model.decode(z, check_finite=False, y=labels))
        return means.reshape(k, CLASS_SAMPLES, -1)

    def _test_labels(self, rows=None):
        """The test labels (of ``rows``) for a conditional model, else None."""
        if self.num_classes is None:
            return None
        return self.data.y_test if rows is None else self.data.y_test[rows]

    def save(self, out_dir: Path, model, epoch: int, history: Sequence[Mapping[str, Any]],
             batch_size: int, check: Callable[[], None] | None = None) -> list[Path]:
        """Draw the PNGs of ``model`` after ``epoch`` into ``out_dir``; their paths.
        ``history``: the per-epoch metrics so far; ``batch_size``: test images per
        encoder call for the latent scatter, with ``check()`` (Ctrl-C) before each."""
        xp, data = self.backend.xp, self.data
        shape = data.dataset.image_shape          # None: feature vectors, drawn as lines
        digits = xp.take(data.x_test, self.backend.asarray(self.digits, dtype=xp.int64), axis=0)
        recon = model.reconstruct(digits, check_finite=False, y=self._test_labels(self.digits))
        samples = self.sample_images(model)
        conditional = self.num_classes is not None
        sample_title = (f"a row per class 0..{self.num_classes - 1}, epoch {epoch}"
                        if conditional
                        else f"decoder means of z ~ N(0, I), epoch {epoch}")
        if shape is None:
            originals = self.backend.to_numpy(digits)
            recon = self.backend.to_numpy(recon)
            panels = ([row[:3] for row in samples] if conditional
                      else [row[None] for row in samples[:8]])
            paths = [
                plotting.plot_feature_vectors(
                    out_dir / "reconstructions.png",
                    [np.stack([a, b]) for a, b in zip(originals[:8], recon[:8])],
                    title=f"test examples and their reconstructions, epoch {epoch}",
                    legend=("original", "reconstruction")),
                plotting.plot_feature_vectors(
                    out_dir / "samples.png", panels, title=sample_title,
                    panel_titles=[f"class {c}" for c in range(len(panels))] if conditional
                    else None)]
        else:
            per_row = CLASS_SAMPLES if conditional else 8
            paths = [
                plotting.save_reconstructions(
                    out_dir / "reconstructions.png", self._images(digits), self._images(recon),
                    n=PICTURE_DIGITS, ncol=8, image_shape=shape,
                    title=f"test examples and their reconstructions, epoch {epoch}"),
                plotting.save_image_grid(
                    out_dir / "samples.png",
                    np.clip(samples.reshape(-1, samples.shape[-1]), 0.0, 1.0), nrow=per_row,
                    image_shape=shape, title=sample_title)]
        paths += [
            plotting.plot_loss_curves(out_dir / "loss_curves.png", history,
                                      title=f"{data.dataset.source}, "
                                            f"{data.config.binarize_mode} binarization"),
        ]
        if self.latent_dim == 2:
            if shape is not None and not conditional:
                paths.append(plotting.plot_manifold(
                    out_dir / "manifold.png",
                    lambda z: self._images(model.decode(z, check_finite=False)),
                    image_shape=shape, title=f"decoded latent grid, epoch {epoch}"))
            labels = (data.test_label_batches(batch_size) if conditional
                      else itertools.repeat(None))
            means = [self.backend.to_numpy(model.encode(batch, check_finite=False,
                                                        y=next(labels))[0])
                     for batch in data.test_batches(batch_size, check)]
            paths.append(plotting.plot_latent_scatter(
                out_dir / "latent_scatter.png", np.concatenate(means),
                data.y_test if data.y_test is not None else np.zeros(data.n_test, np.int64),
                title=f"test set latent means by digit, epoch {epoch}"))
        return paths
