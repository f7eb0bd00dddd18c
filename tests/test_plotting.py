"""Tests for vae_np.plotting: grid tiling, PNG output, input validation, manifold layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:
    import vae_np  # noqa: F401
except ImportError:  # running from a source checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")
from scipy.stats import norm  # noqa: E402

from vae_np import plotting  # noqa: E402
from vae_np.plotting import (  # noqa: E402
    image_grid,
    plot_latent_scatter,
    plot_loss_curves,
    plot_manifold,
    save_image_grid,
    save_reconstructions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_valid_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()  # structural check; the image must be reopened afterwards
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode in ("RGB", "RGBA")
        assert im.width > 0 and im.height > 0
        im.load()  # decode every pixel
        return im.size


def only_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------
# image_grid
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, nrow", [(1, 1), (6, 3), (7, 3), (5, 8), (12, 1)])
@pytest.mark.parametrize("padding", [0, 2])
def test_image_grid_places_each_image_exactly(rng, n, nrow, padding):
    h, w = 3, 5
    images = rng.random((n, h, w))
    pad_value = 0.25
    grid = image_grid(images, nrow, image_shape=(h, w), padding=padding, pad_value=pad_value)

    cols, rows = min(nrow, n), -(-n // nrow)
    assert grid.shape == (rows * (h + padding) + padding, cols * (w + padding) + padding)
    assert grid.dtype == np.float64
    covered = np.zeros(grid.shape, dtype=bool)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        np.testing.assert_array_equal(grid[top : top + h, left : left + w], images[i])
        covered[top : top + h, left : left + w] = True
    # Everything else (padding and unused cells) is pad_value.
    assert np.all(grid[~covered] == pad_value)


def test_image_grid_flat_and_square_inputs_agree(rng):
    images = rng.random((10, 28, 28)).astype(np.float32)
    a = image_grid(images, 4)
    b = image_grid(images.reshape(10, 784), 4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3 * 30 + 2, 4 * 30 + 2)
    np.testing.assert_array_equal(a[2:30, 2:30], images[0])
    np.testing.assert_array_equal(a[32:60, 2:30], images[4])  # second row starts at image nrow


def test_image_grid_clips_round_off_but_rejects_real_excursions():
    images = np.full((2, 4), 0.5)
    images[0, 0] = 1.0 + 1e-7
    images[1, 1] = -1e-7
    grid = image_grid(images, 2, image_shape=(2, 2), padding=0)
    assert grid.max() == 1.0 and grid.min() == 0.0

    for bad in (1.01, -0.5, 255.0):
        images = np.full((2, 4), 0.5)
        images[1, 3] = bad
        with pytest.raises(ValueError, match="images"):
            image_grid(images, 2, image_shape=(2, 2))


def test_image_grid_accepts_bool_and_integer_01(rng):
    images = rng.random((3, 4)) > 0.5
    grid = image_grid(images, 3, image_shape=(2, 2), padding=0)
    np.testing.assert_array_equal(grid[:, :2], images[0].reshape(2, 2).astype(float))


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((0, 784)),  # N == 0
        np.zeros((3, 783)),
        np.zeros(784),
        np.zeros((3, 28, 27)),
        np.zeros((2, 1, 28, 28)),
        np.full((2, 784), np.nan),
        np.array([["a"] * 784]),
    ],
)
def test_image_grid_rejects_bad_images(images):
    with pytest.raises(ValueError, match="images"):
        image_grid(images, 4)


@pytest.mark.parametrize("nrow", [0, -1, 2.5, True, None])
def test_image_grid_rejects_bad_nrow(nrow):
    with pytest.raises(ValueError, match="nrow"):
        image_grid(np.zeros((4, 784)), nrow)


def test_image_grid_rejects_bad_padding_and_shape():
    with pytest.raises(ValueError, match="padding"):
        image_grid(np.zeros((4, 784)), 2, padding=-1)
    with pytest.raises(ValueError, match="image_shape"):
        image_grid(np.zeros((4, 784)), 2, image_shape=(784,))
    with pytest.raises(ValueError, match="pad_value"):
        image_grid(np.zeros((4, 784)), 2, pad_value=2.0)


# --------------------------------------------------------------------------
# PNG writers
# --------------------------------------------------------------------------


def test_save_image_grid_writes_png(tmp_path, rng):
    path = tmp_path / "out" / "samples.png"  # parent is created
    returned = save_image_grid(path, rng.random((16, 784)), nrow=4, title="prior samples")
    assert Path(returned) == path
    width, height = assert_valid_png(path)
    assert width >= 4 * 28 and height >= 4 * 28
    assert only_files(path.parent) == {"samples.png"}


def test_save_image_grid_without_title_and_str_path(tmp_path, rng):
    path = str(tmp_path / "g.png")
    save_image_grid(path, rng.random((3, 28, 28)), nrow=8)
    assert_valid_png(Path(path))


def test_save_image_grid_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="images"):
        save_image_grid(tmp_path / "g.png", np.full((2, 784), 3.0), nrow=2)
    assert not any(tmp_path.iterdir())


def test_png_write_is_atomic(tmp_path, rng, monkeypatch):
    path = tmp_path / "g.png"
    path.write_bytes(b"previous")

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_image_grid(path, rng.random((4, 784)), nrow=2)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous"
    assert only_files(tmp_path) == {"g.png"}


def test_save_reconstructions_writes_labelled_png(tmp_path, rng, monkeypatch):
    originals = rng.random((10, 784))
    recon = np.clip(originals + 0.1 * rng.standard_normal((10, 784)), 0, 1)
    figures = []
    real_save = plotting._save_figure
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, p: (figures.append(fig), real_save(fig, p))[1])

    path = save_reconstructions(tmp_path / "recon.png", originals, recon, n=10, ncol=4, title="epoch 3")
    assert_valid_png(Path(path))

    # 3 bands of (original, reconstruction) rows, labelled, pairs in the same column.
    (fig,) = figures
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["original", "reconstruction"] * 3
    strips = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]
    np.testing.assert_array_equal(strips[0][1:29, 1:29], originals[0].reshape(28, 28))
    np.testing.assert_array_equal(strips[1][1:29, 1:29], recon[0].reshape(28, 28))
    np.testing.assert_array_equal(strips[5][1:29, 30:58], recon[9].reshape(28, 28))
    assert len({s.shape for s in strips}) == 1  # the short last band stays column-aligned


def test_save_reconstructions_n_larger_than_batch(tmp_path, rng):
    x = rng.random((3, 28, 28))
    assert_valid_png(Path(save_reconstructions(tmp_path / "r.png", x, x, n=16)))


def test_save_reconstructions_rejects_bad_inputs(tmp_path, rng):
    x = rng.random((4, 784))
    with pytest.raises(ValueError, match="reconstructions"):
        save_reconstructions(tmp_path / "r.png", x, x[:3])
    with pytest.raises(ValueError, match="originals"):
        save_reconstructions(tmp_path / "r.png", x[:, :700], x)
    with pytest.raises(ValueError, match="reconstructions"):
        save_reconstructions(tmp_path / "r.png", x, x + 2.0)
    with pytest.raises(ValueError, match="^n: expected an integer >= 1"):
        save_reconstructions(tmp_path / "r.png", x, x, n=0)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------


def _full_history(epochs: int = 5) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 200.0 / e + 90,
            "test_loss": 200.0 / e + 92,
            "train_kl": 5.0 + 0.1 * e,
            "test_kl": 5.0 + 0.1 * e,
            "train_recon": 195.0 / e + 85,
            "test_recon": 195.0 / e + 87,
        }
        for e in range(1, epochs + 1)
    ]


def test_plot_loss_curves_full_history(tmp_path):
    path = plot_loss_curves(tmp_path / "loss.png", _full_history(), title="run 1")
    assert_valid_png(Path(path))


@pytest.mark.parametrize(
    "history",
    [
        [{"train_loss": 150.0}, {"train_loss": 120.0}],  # no epoch key, one series
        [{"epoch": 1, "train_loss": 150.0, "train_kl": 3.0}],  # single epoch, no recon/test
        [{"epoch": 1, "test_loss": 151.0}],  # second panel empty
        # test metrics only every other epoch; None / NaN entries skipped
        [
            {"epoch": 1, "train_loss": 150.0, "test_loss": None},
            {"epoch": 2, "train_loss": 130.0, "test_loss": 131.0, "test_kl": 4.0},
            {"epoch": 3, "train_loss": float("nan")},
            {"epoch": 4, "train_loss": 110.0, "test_loss": np.float32(112.0)},
        ],
    ],
)
def test_plot_loss_curves_partial_keys(tmp_path, history):
    assert_valid_png(Path(plot_loss_curves(tmp_path / "loss.png", history)))


def test_plot_loss_curves_labels_and_series(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, p: figures.append(fig) or Path(p))
    history = [{"epoch": 2, "train_loss": 9.0}, {"epoch": 4, "train_loss": 7.0, "test_kl": 1.0}]
    plot_loss_curves(tmp_path / "loss.png", history)
    left, right = figures[0].axes
    assert left.get_xlabel() == "epoch" and "nats" in left.get_ylabel()
    assert [line.get_label() for line in left.get_lines()] == ["train"]
    np.testing.assert_array_equal(left.get_lines()[0].get_xdata(), [2, 4])
    assert [line.get_label() for line in right.get_lines()] == ["test KL"]
    assert left.get_legend() is not None


@pytest.mark.parametrize("history", [[], {"train_loss": [1, 2]}, [1.0, 2.0]])
def test_plot_loss_curves_rejects_bad_history(tmp_path, history):
    with pytest.raises(ValueError, match="history"):
        plot_loss_curves(tmp_path / "loss.png", history)


# --------------------------------------------------------------------------
# Latent scatter
# --------------------------------------------------------------------------


def test_plot_latent_scatter_writes_png(tmp_path, rng, monkeypatch):
    z = rng.standard_normal((500, 2))
    labels = rng.integers(0, 10, size=500)
    figures = []
    real_save = plotting._save_figure
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, p: (figures.append(fig), real_save(fig, p))[1])
    path = plot_latent_scatter(tmp_path / "latent.png", z, labels)
    assert_valid_png(Path(path))
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [str(d) for d in range(10)]


def test_plot_latent_scatter_many_classes_and_float_labels(tmp_path, rng):
    z = rng.standard_normal((200, 2)).astype(np.float32)
    assert_valid_png(Path(plot_latent_scatter(tmp_path / "a.png", z, rng.integers(0, 50, 200))))
    assert_valid_png(Path(plot_latent_scatter(tmp_path / "b.png", z, np.arange(200.0) % 10)))


@pytest.mark.parametrize(
    "z_mean, labels, name",
    [
        (np.zeros((10, 3)), np.zeros(10, int), "z_mean"),
        (np.zeros(10), np.zeros(10, int), "z_mean"),
        (np.zeros((0, 2)), np.zeros(0, int), "z_mean"),
        (np.full((2, 2), np.nan), np.zeros(2, int), "z_mean"),
        (np.zeros((10, 2)), np.zeros(9, int), "labels"),
        (np.zeros((10, 2)), np.zeros((10, 1), int), "labels"),
        (np.zeros((10, 2)), np.full(10, 0.5), "labels"),
    ],
)
def test_plot_latent_scatter_rejects_bad_inputs(tmp_path, z_mean, labels, name):
    with pytest.raises(ValueError, match=name):
        plot_latent_scatter(tmp_path / "latent.png", z_mean, labels)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------
# Manifold
# --------------------------------------------------------------------------


class RecordingDecoder:
    """Returns image k filled with k / (M - 1), so tiles can be traced back to points."""

    def __init__(self, image_shape=(28, 28)):
        self.calls: list[np.ndarray] = []
        self.size = image_shape[0] * image_shape[1]

    def __call__(self, z: np.ndarray) -> np.ndarray:
        self.calls.append(np.array(z, copy=True))
        m = z.shape[0]
        return np.repeat((np.arange(m) / max(m - 1, 1))[:, None], self.size, axis=1)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_plot_manifold_decodes_gaussian_quantile_grid(tmp_path, n, monkeypatch):
    decode = RecordingDecoder()
    figures = []
    real_save = plotting._save_figure
    monkeypatch.setattr(plotting, "_save_figure", lambda fig, p: (figures.append(fig), real_save(fig, p))[1])
    path = plot_manifold(tmp_path / "manifold.png", decode, n=n)
    assert_valid_png(Path(path))

    (z,) = decode.calls  # one call with all n*n points
    assert z.shape == (n * n, 2) and z.dtype == np.float64
    g = norm.ppf(np.linspace(0.05, 0.95, n))
    expected = np.array([(g[j], g[i]) for i in range(n) for j in range(n)])
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-12)
    # Increasing quantile order: z[1] non-decreasing overall, z[0] increasing within each row.
    assert np.all(np.diff(z[:, 1]) >= 0)
    assert np.all(np.diff(z.reshape(n, n, 2)[:, :, 0], axis=1) > 0)

    # Picture layout: z[0] grows to the right, z[1] grows upwards.
    grid = np.asarray(figures[0].axes[0].images[0].get_array())
    assert grid.shape == (n * 28, n * 28)
    m = n * n

    def tile(r, c):
        block = grid[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
        assert np.all(block == block[0, 0])
        return int(round(block[0, 0] * max(m - 1, 1)))

    assert tile(n - 1, 0) == 0  # (g[0], g[0]) bottom-left
    assert tile(0, 0) == (n - 1) * n  # (g[0], g[n-1]) top-left
    assert tile(0, n - 1) == m - 1  # (g[n-1], g[n-1]) top-right


def test_plot_manifold_custom_extent_and_shape(tmp_path):
    decode = RecordingDecoder(image_shape=(4, 6))
    plot_manifold(tmp_path / "m.png", decode, n=4, image_shape=(4, 6), extent=(0.01, 0.99))
    z = decode.calls[0]
    g = norm.ppf(np.linspace(0.01, 0.99, 4))
    np.testing.assert_allclose(np.unique(z[:, 0]), g)
    assert_valid_png(tmp_path / "m.png")


def test_plot_manifold_rejects_bad_decoder_output(tmp_path):
    with pytest.raises(ValueError, match="decode"):
        plot_manifold(tmp_path / "m.png", lambda z: np.zeros((z.shape[0] - 1, 784)), n=3)
    with pytest.raises(ValueError, match="decode"):
        plot_manifold(tmp_path / "m.png", lambda z: np.full((z.shape[0], 784), 4.0), n=3)
    with pytest.raises(ValueError, match="decode"):
        plot_manifold(tmp_path / "m.png", lambda z: np.zeros((z.shape[0], 100)), n=3)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, name",
    [({"n": 0}, "^n: expected an integer >= 1"), ({"extent": (0.0, 0.9)}, "extent"), ({"extent": (0.9, 0.1)}, "extent"),
     ({"extent": 0.5}, "extent")],
)
def test_plot_manifold_rejects_bad_arguments(tmp_path, kwargs, name):
    decode = RecordingDecoder()
    with pytest.raises(ValueError, match=name):
        plot_manifold(tmp_path / "m.png", decode, **kwargs)
    assert decode.calls == []


# --------------------------------------------------------------------------
# matplotlib handling
# --------------------------------------------------------------------------


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes `import mod` raise ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[train\]"'):
        save_image_grid(tmp_path / "g.png", np.zeros((1, 784)), nrow=1)
    with pytest.raises(ImportError, match="matplotlib"):
        plot_manifold(tmp_path / "m.png", RecordingDecoder(), n=2)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[train\]"'):
        plotting.require_matplotlib()  # what a trainer calls before its first epoch
    # image_grid is pure NumPy and keeps working.
    assert image_grid(np.zeros((1, 784)), 1).shape == (32, 32)


@pytest.mark.slow
def test_does_not_touch_pyplot_or_global_backend(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import matplotlib
        rc = matplotlib.rcParams
        get = getattr(rc, "_get_backend_or_none", lambda: dict.__getitem__(rc, "backend"))
        backend = get()
        import numpy as np
        from vae_np import plotting
        plotting.save_image_grid({str(tmp_path / "g.png")!r}, np.zeros((2, 784)), nrow=2)
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert get() == backend, "backend changed"
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_valid_png(tmp_path / "g.png")


@pytest.mark.slow
def test_importing_module_does_not_import_matplotlib():
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import vae_np.plotting
        assert "matplotlib" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
