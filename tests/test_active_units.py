"""Active units (vae_np.train.active_units): the count on models built to have a known
number, the threshold, batching, conditional models, and where it is reported (the
trainer's results and last lines, ``vae-np eval``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vae_np import VAE, save_model
from vae_np.cli import main as cli_main
from vae_np.data import Dataset
from vae_np.train import RESULTS_FILE, TrainConfig, Trainer
from vae_np.train.active_units import (
    ACTIVE_UNIT_THRESHOLD, active_units, active_units_line, encoder_mean_variances,
)

D, LATENT, CLASSES = 6, 5, 3


def batches(x, size):
    return [x[i:i + size] for i in range(0, len(x), size)]


def linear_encoder_model(mu_weights, mu_bias, num_classes=None, input_shift=0.5):
    """hidden=(): mu(x) = [x - shift, one_hot(y)] @ mu_weights + mu_bias exactly.
    mu_weights: (D [+ K], LATENT)."""
    model = VAE(input_dim=D, hidden=(), latent_dim=LATENT, num_classes=num_classes,
                input_shift=input_shift, dtype="float64", seed=0)
    state = model.state_dict()
    w, b = state["encoder.linear0.W"].copy(), state["encoder.linear0.b"].copy()
    w[:, :LATENT], b[:LATENT] = mu_weights, mu_bias   # the logvar half stays random
    model.load_state_dict({**state, "encoder.linear0.W": w, "encoder.linear0.b": b})
    return model


def test_the_count_of_a_model_whose_mean_ignores_some_dimensions():
    """Dimensions 1 and 3 have zero weights (a constant mean: variance 0), dimension 4 a
    tiny one (variance ~1e-6, below 0.01); dimensions 0 and 2 vary: 2 active."""
    rng = np.random.default_rng(0)
    x = rng.random((37, D))
    w = np.zeros((D, LATENT))
    w[:, 0], w[:, 2], w[:, 4] = rng.normal(size=D), 3 * rng.normal(size=D), 1e-3
    model = linear_encoder_model(w, rng.normal(size=LATENT))
    result = active_units(model, batches(x, 8))
    assert result["count"] == 2 and result["latent_dim"] == LATENT
    assert result["n_images"] == 37 and result["threshold"] == ACTIVE_UNIT_THRESHOLD == 0.01
    var = np.asarray(result["variances"])
    # the variance of mu_u over the images, from the weights alone
    expected = np.var((x - 0.5) @ w, axis=0)
    np.testing.assert_allclose(var, expected, rtol=1e-12, atol=1e-15)
    assert var[1] < 1e-20 and var[3] < 1e-20 and 1e-7 < var[4] < 1e-5   # 0 but rounding
    line = active_units_line(result)
    assert line.startswith("active units: 2 of 5 ") and "37 test images" in line


def test_strictly_above_the_threshold_counts():
    """mu_u(x) = x_u and x_u = +-a on half the images each: variance a^2 exactly (a a
    power of two), so the boundary is exact: A_u > threshold, as in the paper."""
    a = np.array([0.125, 0.0625, 0.25, 0.5, 1.0])
    signs = np.where(np.arange(8)[:, None] % 2 == 0, 1.0, -1.0)
    x = np.zeros((8, D))
    x[:, :LATENT] = signs * a + 0.5                              # minus the shift: +-a
    model = linear_encoder_model(np.eye(D, LATENT), np.zeros(LATENT))
    var, n = encoder_mean_variances(model, batches(x, 3))
    assert n == 8 and np.array_equal(var, a ** 2)
    assert active_units(model, [x])["count"] == 4                # 0.0039 is not > 0.01
    assert active_units(model, [x], threshold=0.015625)["count"] == 3   # == is not above
    assert active_units(model, [x], threshold=0.0156249)["count"] == 4
    assert active_units(model, [x], threshold=0)["count"] == 5
    for bad in (-0.1, float("nan"), "0.01", True):
        with pytest.raises(ValueError, match="threshold: expected a finite number >= 0"):
            active_units(model, [x], threshold=bad)
    with pytest.raises(ValueError, match="at least one image"):
        active_units(model, [])


@pytest.mark.parametrize("sizes", [(50,), (1, 49), (7, 7, 7, 29), (13, 1, 1, 35)])
def test_batching_does_not_change_the_variances(sizes):
    """Merged batch by batch in float64, whatever the split; a mean far from zero (1e4)
    costs no digits (a sum-of-squares formula would lose about eight)."""
    rng = np.random.default_rng(1)
    x = rng.random((50, D))
    model = linear_encoder_model(rng.normal(size=(D, LATENT)), np.full(LATENT, 1e4))
    cuts = np.cumsum((0, *sizes))
    var, n = encoder_mean_variances(model, [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    mu = model.backend.to_numpy(model.encode(x)[0])
    assert n == 50
    np.testing.assert_allclose(var, np.var(mu, axis=0), rtol=1e-10)


def test_a_conditional_model_is_measured_with_each_batchs_labels():
    """mu = [x - shift, one_hot(y)] @ W: dimension 0 moves with the class alone, 4 with a
    pixel and the class (so labels out of step with their images change it)."""
    rng = np.random.default_rng(2)
    y = np.array([0, 0, 0, 0, 1, 2, 2, 1, 0, 0, 0])
    x = rng.random((len(y), D))
    w = np.zeros((D + CLASSES, LATENT))
    w[D:, 0] = [0.0, 1.0, 2.0]
    w[D:, 1] = [0.05, 0.05, 0.05]    # a constant
    w[D:, 3] = [0.0, 0.0, 0.1]       # small: variance 0.1^2 p (1 - p) < 0.01
    w[0, 4], w[D:, 4] = 1.0, [0.0, 1.0, 2.0]
    model = linear_encoder_model(w, np.zeros(LATENT), num_classes=CLASSES)
    result = active_units(model, batches(x, 4), labels=batches(y, 4))
    inputs = np.hstack([x - 0.5, np.eye(CLASSES)[y]])
    np.testing.assert_allclose(result["variances"], np.var(inputs @ w, axis=0),
                               rtol=1e-12, atol=1e-15)
    assert result["count"] == 2
    shuffled = active_units(model, batches(x, 4), labels=batches(y[::-1], 4))
    assert shuffled["variances"][4] != pytest.approx(result["variances"][4])


def test_the_trainer_reports_them(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((30, 16)).astype(np.float32)
    ds = Dataset(x[:20], None, x[20:], None, source="synthetic", description="synthetic",
                 image_shape=(4, 4))
    lines = []
    run = Trainer(TrainConfig(hidden=(8,), latent_dim=3, batch_size=10, epochs=1,
                              eval_samples=0, eval_batch_size=4), ds, tmp_path,
                  log=lines.append, progress=False, pictures=False)
    results = run.fit()
    # on the fixed binarized test set, in the trainer's batches of eval_batch_size
    expected = active_units(run.model, batches(run.data.x_test, 4))
    assert results["active_units"] == expected
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())["active_units"]
    assert saved["count"] == expected["count"] and saved["latent_dim"] == 3
    np.testing.assert_allclose(saved["variances"], expected["variances"], rtol=1e-12)
    assert active_units_line(expected) in lines and "10 test images" in lines[-2]


def test_vae_np_eval_prints_and_writes_them(tmp_path, capsys):
    rng = np.random.default_rng(4)
    y = rng.integers(0, CLASSES, 9)
    np.savez(tmp_path / "data.npz", x_train=rng.random((12, D)), x_test=rng.random((9, D)),
             y_train=rng.integers(0, CLASSES, 12), y_test=y)
    x = np.load(tmp_path / "data.npz")["x_test"].astype(np.float32)   # as Dataset keeps it
    for name, classes in (("plain", None), ("cond", CLASSES)):
        w = np.zeros((D + (classes or 0), LATENT))
        w[:D, 0] = 1.0                                   # active: the spread of the pixels
        if classes:
            w[D:, 2] = [0.0, 1.0, 2.0]                   # active through the labels
        model = linear_encoder_model(w, np.zeros(LATENT), num_classes=classes)
        save_model(model, tmp_path / f"{name}.npz")
        out = tmp_path / f"{name}.json"
        assert cli_main(["eval", str(tmp_path / f"{name}.npz"), "--dataset",
                         str(tmp_path / "data.npz"), "--binarize", "none", "-K", "0",
                         "--batch-size", "4", "--json", str(out)]) == 0
        stdout = capsys.readouterr().out
        result = json.loads(out.read_text())["active_units"]
        labels = [y[i:i + 4] for i in range(0, 9, 4)] if classes else None
        assert result == active_units(model, batches(x, 4), labels=labels)
        expected_count = 1 + (np.var(w[D:, 2][y]) > 0.01 if classes else 0)
        assert result["count"] == expected_count
        assert f"active units: {expected_count} of {LATENT} " in stdout
        assert "9 test examples" in stdout
