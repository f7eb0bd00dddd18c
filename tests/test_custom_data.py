"""Your own data: .npz files and folders of images as Datasets, every bad input a one-line
error naming the file and the array."""

from __future__ import annotations

import numpy as np
import pytest

from vae_np.data import Dataset, load_dataset, load_image_folder, load_npz_dataset


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_features_images_labels(tmp_path):
    rng = np.random.default_rng(0)
    f = npz(tmp_path / "a.npz", x_train=rng.random((5, 7)), x_test=rng.random((2, 7)),
            y_train=np.array([0, 1, 2, 0, 1]), y_test=np.array([2, 0]))
    ds = load_npz_dataset(f)
    assert ds.n_features == 7 and ds.image_shape is None and ds.num_classes == 3
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    sq = load_dataset(npz(tmp_path / "b.npz", x_train=rng.random((3, 16)),
                          x_test=rng.random((1, 16))))
    assert sq.image_shape == (4, 4) and not sq.has_labels
    img = load_npz_dataset(npz(tmp_path / "c.npz", x_train=(rng.random((3, 2, 5, 3)) * 255)
                               .astype(np.uint8), x_test=np.zeros((1, 2, 5, 3), np.uint8)))
    assert img.image_shape == (2, 5, 3) and img.n_features == 30 and img.x_train.max() <= 1
    shaped = load_npz_dataset(npz(tmp_path / "d.npz", x_train=rng.random((3, 6)),
                                  x_test=rng.random((1, 6)), shape=np.array([2, 3])))
    assert shaped.image_shape == (2, 3)


def test_real_valued_data_needs_a_gaussian_decoder(tmp_path):
    f = npz(tmp_path / "r.npz", x_train=np.array([[0.5, 3.0]]), x_test=np.array([[0.1, 0.2]]))
    with pytest.raises(ValueError, match=r"r.npz: array 'x_train' has values in \[0.5, 3\].*"
                                         r"--decoder gaussian"):
        load_npz_dataset(f)
    ds = load_npz_dataset(f, decoder="gaussian")
    assert not ds.unit_range


@pytest.mark.parametrize("arrays, match", [
    ({"x_train": np.zeros((2, 3))}, "no array 'x_test'"),
    ({"x_train": np.zeros((0, 3)), "x_test": np.zeros((1, 3))}, "'x_train': is empty"),
    ({"x_train": np.zeros((2, 3)), "x_test": np.zeros((1, 4))}, "'x_test' has 4 features"),
    ({"x_train": np.array([[0.1, np.nan]]), "x_test": np.zeros((1, 2))}, "NaN"),
    ({"x_train": np.zeros(3), "x_test": np.zeros((1, 3))}, "expected \\(N, D\\)"),
    ({"x_train": np.zeros((2, 3)), "x_test": np.zeros((1, 3)), "y_train": np.zeros(2, int)},
     "no 'y_test'"),
    ({"x_train": np.zeros((2, 3)), "x_test": np.zeros((1, 3)), "y_train": np.zeros(3, int),
      "y_test": np.zeros(1, int)}, "'y_train': expected shape \\(2,\\)"),
    ({"x_train": np.zeros((2, 3)), "x_test": np.zeros((1, 3)), "y_train": np.array([0.5, 1]),
      "y_test": np.zeros(1, int)}, "integer class labels"),
    ({"x_train": np.zeros((2, 6)), "x_test": np.zeros((1, 6)), "shape": np.array([4, 4])},
     "'shape' \\[4, 4\\] holds 16"),
])
def test_bad_npz_is_one_line_naming_file_and_array(tmp_path, arrays, match):
    f = npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_npz_dataset(f)
    assert "bad.npz" in str(info.value) and "\n" not in str(info.value)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.npz: not a .npz file \(not a zip archive\)"):
        load_dataset(tmp_path / "junk.npz")


def test_image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for k in range(5):
        pil.fromarray((rng.random((6, 4, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{k}.png")
    pil.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "big.jpg")   # resized
    ds = load_image_folder(tmp_path, test_fraction=0.34, seed=1)
    assert ds.image_shape == (6, 4) and ds.n_train + ds.n_test == 6 and ds.n_test == 2
    rgb = load_image_folder(tmp_path, color="rgb", image_size=(3, 5))
    assert rgb.image_shape == (3, 5, 3) and rgb.n_features == 45
    again = load_image_folder(tmp_path, test_fraction=0.34, seed=1)
    assert np.array_equal(again.x_test, ds.x_test)          # the split is seeded


def test_image_folder_classes_and_errors(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for k in range(3):
            pil.fromarray(np.full((4, 4), k * 40, np.uint8)).save(tmp_path / name / f"{k}.png")
    ds = load_image_folder(tmp_path)
    assert ds.num_classes == 2 and set(np.concatenate([ds.y_train, ds.y_test])) == {0, 1}
    (tmp_path / "broken.png").write_bytes(b"no image")
    with pytest.raises(ValueError, match="both at the top and in subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(b"no image")
    (tmp_path / "one" / "b.png").write_bytes(b"no image")
    with pytest.raises(ValueError, match="a.png: not a readable image"):
        load_image_folder(tmp_path / "one")


def test_dataset_keeps_mnist_defaults_and_checks_shapes():
    x = np.zeros((2, 784), np.float32)
    assert Dataset(x, np.zeros(2, int), x, np.zeros(2, int), "mnist", "").image_shape == (28, 28)
    with pytest.raises(ValueError, match="x_train must have shape \\(N, 12\\)"):
        Dataset(np.zeros((2, 13)), None, np.zeros((1, 13)), None, "s", "", image_shape=(3, 4))
    ds = Dataset(np.full((2, 3), 5.0), None, np.zeros((1, 3)), None, "s", "",
                 image_shape=None, num_classes=None, unit_range=False)
    assert ds.n_features == 3 and not ds.has_labels

