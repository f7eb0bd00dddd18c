"""benchmarks/bench_epoch.py on a made-up MNIST folder: every installed side trains its
epoch and scores the test set, the numbers it prints and writes hang together, and bad
input is one line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from helpers import synthetic_dataset, write_mnist_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_epoch  # noqa: E402


def made_up_mnist(directory: Path, monkeypatch, n_train: int = 80, n_test: int = 60) -> Path:
    """MNIST's four files in ``directory`` holding synthetic digits (grey levels in 0..255),
    their sums made the published ones so that the loader's verification passes."""
    ds = synthetic_dataset(n_train, n_test, classes=10)
    arrays = {f"{split}_images": np.round(getattr(ds, f"x_{split}") * 255).astype(np.uint8)
              .reshape(-1, 28, 28) for split in ("train", "test")}
    arrays.update({f"{split}_labels": getattr(ds, f"y_{split}").astype(np.uint8)
                   for split in ("train", "test")})
    write_mnist_folder(directory, arrays, monkeypatch)
    return directory


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temporary folders the bench makes (vae_np's checkpoint) under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def installed(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        importlib.util.find_spec(name) is None, reason=f"{name} is not installed"))


@pytest.mark.slow   # trains the 784-512-512 model a few steps per side; imports torch/jax
@pytest.mark.parametrize("peer", [pytest.param(None, id="vae_np-alone"), installed("torch"),
                                  installed("jax")])
def test_an_epoch_per_side_on_made_up_mnist(tmp_path, private_tmp, monkeypatch, capsys, peer):
    (tmp_path / "mnist").mkdir()
    data_dir = made_up_mnist(tmp_path / "mnist", monkeypatch)
    sides = "vae_np" + (f",{peer}" if peer else "")
    out = tmp_path / "epoch.json"
    assert bench_epoch.main(["--data-dir", str(data_dir), "--limit-train", "64",
                             "--limit-test", "50", "--threads", "1", "--sides", sides,
                             "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["data"] == {"description": report["data"]["description"], "n_train": 64,
                              "n_test": 50}
    assert list(report["median"]) == sides.split(",")
    for side, m in report["median"].items():
        first, second = report["runs"][side]
        # each repeat starts afresh from the same weights and seeds: the same epoch again
        # (a peer that kept its trained weights or Adam's moments would score lower)
        assert second["test_loss"] == pytest.approx(first["test_loss"], rel=1e-6)
        totals = [run["train"] + run["eval"] for run in (first, second)]
        assert m["total"] == pytest.approx(sum(totals) / 2)   # the median of two
        assert m["train_images_per_s"] == pytest.approx(64 / m["train"])
        assert np.isfinite(m["test_loss"]) and m["test_loss"] > 0
    ours = report["median"]["vae_np"]
    assert ours["train"] == pytest.approx(ours["data"] + ours["steps"])
    assert ours["fit"] >= ours["train"] + ours["eval"]
    if peer:
        # Same initial weights, two steps, other random streams: the test -ELBOs (some
        # 530 nats here) differ by the noise of one sample on 50 images, a few nats
        # (measured: within 1%). A peer that sums instead of averaging over the images, or
        # scores a loss other than the per-image -ELBO, lands far outside 5%.
        theirs = report["median"][peer]
        assert theirs["test_loss"] == pytest.approx(ours["test_loss"], rel=0.05)
        # vae_np / peer: the median of the repeats' own pairs (two: their mean)
        ratio = report["ratios_vae_np_over"][peer]
        pairs = [(o["train"] + o["eval"]) / (t["train"] + t["eval"])
                 for o, t in zip(report["runs"]["vae_np"], report["runs"][peer])]
        assert ratio["total"] == pytest.approx(sum(pairs) / 2)
        assert f"vae_np / {peer}: train" in printed
    assert list(tmp_path.glob("bench_epoch_*")) == []   # its temporary folders are gone


def test_missing_files_are_one_line_and_status_2(tmp_path, capsys):
    assert bench_epoch.main(["--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MNIST files missing" in err and "--data-dir" in err


def test_a_limit_beyond_the_data_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    data_dir = made_up_mnist(tmp_path, monkeypatch, n_train=10, n_test=5)
    assert bench_epoch.main(["--data-dir", str(data_dir), "--limit-test", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit-test 6" in err and "5 images" in err


@pytest.mark.parametrize("flag, value", [("--sides", "vae_np,mxnet"), ("--repeats", "0"),
                                         ("--limit-train", "-3")])
def test_bad_flags_are_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_epoch.main([flag, value])
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_first_images_are_the_same_rows_for_every_side():
    ds = synthetic_dataset(12, 7)
    cut = bench_epoch.first_images(ds, 5, 3)
    np.testing.assert_array_equal(cut.x_train, ds.x_train[:5])
    np.testing.assert_array_equal(cut.y_test, ds.y_test[:3])
    assert (cut.n_train, cut.n_test) == (5, 3)
    assert bench_epoch.first_images(ds, None, None) is ds
