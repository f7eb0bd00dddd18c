"""VAE(architecture="conv"): the starting example's convolutional encoder and decoder in
the model, with everything the MLP has: the three decoders, S samples, beta, the IWAE
bound, conditional models (labels as side inputs at the first dense layer), inference,
save / load, array-api-strict, the trainer (resume bit for bit), ``vae-np train
--architecture conv``, and ``gradcheck.check_vae`` unchanged on both code paths.

Models are 8x8 images with 1 and 3 channels, convolutions of 2 and 3 channels and one
dense layer of 5, so that every test is fast; the 28x28 preset itself is built here (its
parameter count is the example's) and checked whole in one slow test.

Gradient tolerance 1e-6 (gradcheck.DEFAULT_TOLERANCE), float64: the networks are piecewise
linear and the losses smooth, so away from ReLU and max-pool kinks (biases jittered, as
for the MLP; continuous random inputs leave no max-pool ties) the central difference has
only its O(h^2) truncation and round-off: absolute errors of 1e-8 to 4e-8 on losses of a
hundred nats or more, which is at most 3e-7 relative (the first convolution's bias, whose
gradient is small under the IWAE bound with the fixed-variance decoder) and ~1e-7 for
most arrays (measured on both paths). Identities between two routes to the
same number (the training loss against the inference calls, NumPy against
array-api-strict) hold to 1e-12: the same float64 operations, at most reordered.
"""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest

from vae_np import VAE, gradcheck, save_model
from vae_np.saving import read_model
from vae_np.backend import get_backend
from vae_np.checkpoint import load_checkpoint
from vae_np.train import CHECKPOINT_FILE, RESULTS_FILE, TrainConfig, Trainer
from vae_np.train_cli import main as train_main

import helpers
from helpers import synthetic_dataset

DECODERS = ["bernoulli", "gaussian", "gaussian-fixed"]
TOL = gradcheck.DEFAULT_TOLERANCE
SMALL = dict(architecture="conv", channels=(2, 3), hidden=(5,), latent_dim=2)
N = 3


def image_shape(c: int) -> tuple[int, ...]:
    return (8, 8) if c == 1 else (8, 8, c)


def conv_vae(decoder="bernoulli", c=1, samples=1, beta=1.0, **kwargs) -> VAE:
    """A small conv VAE on 8x8 images of ``c`` channels, float64, biases jittered."""
    values = {**SMALL, "image_shape": image_shape(c), "input_dim": None, **kwargs}
    return helpers.tiny_vae(decoder, samples, beta, **values)


def images(c=1, n=N, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 64 * c))


def noise(model, n=N, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((model.samples, n, model.latent_dim))


LABELS = np.array([0, 2, 1])


# --------------------------------------------------------------------------------------
# The API


def test_the_preset_is_the_starting_example():
    model = VAE(architecture="conv")
    assert (model.input_dim, model.image_shape, model.channels, model.hidden) == \
        (784, (28, 28), (32, 64), (512,))
    d = 64
    # Counted from the example's layer list (issue 21), not from the code:
    encoder = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 7 * 7 * 512 + 512) \
        + (512 * 2 * d + 2 * d)
    decoder = (d * 512 + 512) + (512 * 64 * 7 * 7 + 64 * 7 * 7) + (64 * 32 * 9 + 32) \
        + (32 * 1 * 9 + 1)
    assert model.num_parameters == encoder + decoder
    assert model.config["architecture"] == "conv" and model.config["channels"] == [32, 64]
    # Gaussian: two output channels per pixel, the likelihood's [mean, log-variance] layout
    assert VAE(architecture="conv", decoder="gaussian").decoder.layers[-2].params["W"].shape \
        == (2, 32, 3, 3)


def test_the_mlp_stays_the_default_and_keeps_its_weights():
    default = VAE(seed=3)
    assert (default.architecture, default.input_dim, default.hidden) == ("mlp", 784, (512, 512))
    assert default.image_shape is None and default.channels is None
    explicit = VAE(784, (512, 512), seed=3, architecture="mlp", image_shape=(28, 28))
    assert explicit.image_shape == (28, 28)      # recorded only: the same network and draws
    for name, value in default.state_dict().items():
        assert np.array_equal(explicit.state_dict()[name], value), name


@pytest.mark.parametrize("kwargs, match", [
    (dict(architecture="cnn"), "architecture: expected one of mlp, conv, got 'cnn'"),
    (dict(architecture="conv", input_dim=64), r"image_shape: the conv architecture needs "
                                              r"the image shape"),
    (dict(architecture="conv", input_dim=60, image_shape=(8, 8)), r"holds 64 values, "
                                                                  r"input_dim is 60"),
    (dict(architecture="conv", image_shape=(6, 8)), "multiples of 4"),
    (dict(architecture="conv", image_shape=(8,)), r"image_shape: expected \(H, W\)"),
    (dict(architecture="conv", activation="tanh"), "ReLU units.*'tanh'"),
    (dict(architecture="conv", channels=(4,)), "channels: expected two positive integers"),
    (dict(channels=(4, 8)), "channels: .* for architecture='conv'"),
    (dict(architecture="conv", hidden=(0,)), "hidden"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAE(**kwargs)


# --------------------------------------------------------------------------------------
# Gradients: check_vae unchanged, both code paths


VARIANTS = {
    "S=2, beta=0.7": dict(samples=2, beta=0.7),
    "iwae k=3": dict(samples=3, objective="iwae"),
    "conditional": dict(samples=2, num_classes=3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("decoder", DECODERS)
def test_check_vae_passes_on_the_conv_vae(decoder, c, variant, code_path, record_check):
    model = conv_vae(decoder, c, **VARIANTS[variant])
    x, eps = images(c), noise(model)
    kwargs = {"y": LABELS} if model.num_classes else {}
    if kwargs:  # check_vae calls model.loss(x, eps=eps): bind the labels for it
        loss = model.loss
        model.loss = lambda x, eps=None, **kw: loss(x, eps=eps, **kwargs, **kw)
    # Every entry (the model has a few hundred): in a network this small a whole channel
    # can be dead (ReLU off for all N images), and a sample of its entries alone would
    # compare round-off with an exact 0.
    report = gradcheck.check_vae(model, x, eps, max_entries=None)
    assert report.path == code_path
    record_check("conv VAE", report.max_rel_error)
    assert report.passed and report.max_rel_error < TOL, report.table()
    result = gradcheck.check_vae_directional(model, x, eps)
    record_check("conv VAE (directional)", result.rel_error)
    assert result.passed and result.rel_error < TOL


@pytest.mark.parametrize("decoder", DECODERS)
def test_check_vae_passes_with_the_per_offset_products(decoder, monkeypatch):
    """The CPU twin's per-offset products (NumPy's BLAS, from OFFSET_MIN_CHANNELS channels
    on: the real networks' 32 and 64) taken here from one channel on, under the check."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    if twins._NUMPY_GEMM is None:
        pytest.skip("NumPy's BLAS has no C interface here")
    monkeypatch.setattr(twins, "OFFSET_MIN_CHANNELS", 1)
    calls = []
    offsets = twins._correlate_offsets
    monkeypatch.setattr(twins, "_correlate_offsets",
                        lambda *args: calls.append(1) or offsets(*args))
    model = conv_vae(decoder, 1)
    x, eps = images(1), noise(model)
    report = gradcheck.check_vae(model, x, eps, max_entries=None, path="fast")
    assert calls and report.path == "fast"
    assert report.passed and report.max_rel_error < TOL, report.table()


def test_a_wrong_conv_gradient_fails_the_check():
    """The check sees the convolutions: a gradient off in one filter entry fails."""
    model = conv_vae("gaussian", 3, samples=2)
    x, eps = images(3), noise(model)
    f, analytic = gradcheck.vae_loss_and_grads(model, x, eps)
    analytic["encoder.conv2d1.W"][0, 1, 2, 0] += 1e-3
    report = gradcheck.check_gradients(f, model.parameters.values, analytic, max_entries=None)
    failed = [row.name for row in report.rows if row.rel_error > report.tolerance]
    assert failed == ["encoder.conv2d1.W"], report.table()


# --------------------------------------------------------------------------------------
# The objective and inference


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_training_loss_is_its_parts_through_the_inference_calls(decoder):
    """loss(x, eps) = KL(q || p) + mean_s -ln p(x | z_s), assembled from encode and
    decoder_outputs (labels as side inputs) and the closed-form KL, beta = 0.4."""
    model = conv_vae(decoder, 3, samples=2, beta=0.4, num_classes=3)
    x, eps = images(3), noise(model)
    terms = model.loss(x, eps=eps, y=LABELS)
    mu, logvar = model.encode(x, y=LABELS)
    kl = 0.5 * np.sum(np.exp(logvar) - logvar - 1 + mu ** 2, axis=1)
    z = mu + np.exp(logvar / 2) * eps
    nll = np.mean([model.likelihood.nll(x, model.decoder_outputs(z[s], y=LABELS))[0]
                   for s in range(2)], axis=0)
    assert float(terms.kl) == pytest.approx(np.mean(kl), rel=1e-12)
    assert float(terms.recon) == pytest.approx(np.mean(nll), rel=1e-12)
    assert float(terms.loss) == pytest.approx(np.mean(nll + 0.4 * kl), rel=1e-12)


def test_labels_join_at_the_first_dense_layer_and_change_the_output():
    model = conv_vae("bernoulli", 3, num_classes=3)
    first_dense = model.encoder.layers[model.encoder.extra_at]
    assert first_dense.params["W"].shape == (3 * 2 * 2 + 3, 5)   # flat trunk + one-hot
    assert model.decoder.layers[0].params["W"].shape == (2 + 3, 5)   # z + one-hot
    x = images(3, n=1)
    mu_a, _ = model.encode(x, y=np.array([0]))
    mu_b, _ = model.encode(x, y=np.array([1]))
    assert not np.allclose(mu_a, mu_b)
    z = np.zeros((1, 2))
    assert not np.allclose(model.decode(z, y=np.array([0])), model.decode(z, y=np.array([2])))
    with pytest.raises(ValueError, match="needs labels"):
        model.encode(x)


def test_the_iwae_loss_is_the_log_mean_of_the_importance_weights():
    model = conv_vae("gaussian", 1, samples=4, objective="iwae")
    x, eps = images(1), noise(model)
    log_w = model.log_importance_weights(x, eps)                      # (k, N)
    top = log_w.max(axis=0)
    bound = top + np.log(np.mean(np.exp(log_w - top), axis=0))
    assert float(model.loss(x, eps=eps).loss) == pytest.approx(-np.mean(bound), rel=1e-12)


@pytest.mark.parametrize("decoder", DECODERS)
def test_inference_shapes_ranges_and_the_likelihood_bound(decoder):
    model = conv_vae(decoder, 3)
    x, rng = images(3, n=4), model.backend.rng(0)
    assert model.reconstruct(x).shape == (4, 192)
    mean, draw = model.sample(5, rng), model.sample(5, rng, mean=False)
    assert mean.shape == draw.shape == (5, 192)
    if decoder == "bernoulli":
        assert np.all((0 <= mean) & (mean <= 1)) and set(np.unique(draw)) <= {0.0, 1.0}
    # ln p(x) estimated with K = 200 sits above the ELBO (in expectation and, with this
    # many samples, in fact: the gap is the KL to the true posterior, nats here)
    log_px = model.log_likelihood(x, 200, model.backend.rng(1), chunk_size=64)
    elbo = -np.mean([float(model.loss(x, rng=model.backend.rng(2 + i)).loss)
                     for i in range(20)])
    assert np.all(np.isfinite(log_px)) and np.mean(log_px) > elbo


# --------------------------------------------------------------------------------------
# Files and backends


def test_save_and_load_keep_the_architecture_and_the_outputs(tmp_path):
    model = conv_vae("gaussian-fixed", 3, num_classes=3, variance=0.2)
    path = save_model(model, tmp_path / "conv.npz")
    saved = read_model(path)
    back = saved.model
    assert back.config == model.config and saved.image_shape == (8, 8, 3)
    x = images(3)
    for a, b in zip(model.encode(x, y=LABELS), back.encode(x, y=LABELS)):
        assert np.array_equal(a, b)
    # two channels: kept by the model, though no picture draws them
    two = conv_vae("bernoulli", 2)
    saved = read_model(save_model(two, tmp_path / "two.npz"))
    assert saved.model.image_shape == (8, 8, 2) and saved.image_shape is None
    with pytest.raises(ValueError, match=r"image_shape: \(4, 16\), but the model's is \(8, 8\)"):
        save_model(conv_vae(), tmp_path / "x.npz", image_shape=(4, 16))


#: A conditional 3-channel Gaussian conv VAE, every feature on: the model the backends compare.
BACKEND_CASE = dict(**SMALL, image_shape=(8, 8, 3), decoder="gaussian", samples=2,
                    num_classes=3, dtype="float64", seed=5)


def assert_backend_matches_numpy(backend, rtol, atol):
    """The loss and the gradient of BACKEND_CASE on ``backend`` are NumPy's within rtol /
    atol; returns (the NumPy model, the backend's, the images) for further checks."""
    a, b = VAE(**BACKEND_CASE), VAE(**BACKEND_CASE, backend=backend)
    x, eps = images(3), noise(a)
    ta, tb = a.loss(x, eps=eps, y=LABELS), b.loss(x, eps=eps, y=LABELS)
    assert float(b.backend.to_numpy(tb.loss)) == pytest.approx(float(ta.loss), rel=rtol)
    a.backward()
    b.backward()
    np.testing.assert_allclose(b.backend.to_numpy(b.parameters.grad), a.parameters.grad,
                               rtol=rtol, atol=atol)
    return a, b, x


def test_array_api_strict_gives_the_numpy_numbers():
    pytest.importorskip("array_api_strict")
    a, b, x = assert_backend_matches_numpy("array_api_strict", rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        b.backend.to_numpy(b.log_likelihood(x, 9, b.backend.rng(4), chunk_size=4, y=LABELS)),
        a.log_likelihood(x, 9, a.backend.rng(4), chunk_size=4, y=LABELS), rtol=1e-12)
    np.testing.assert_allclose(b.backend.to_numpy(b.sample(3, b.backend.rng(6), y=LABELS)),
                               a.sample(3, a.backend.rng(6), y=LABELS), rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
def test_cupy_gives_the_numpy_numbers_and_passes_the_check():
    """CuPy's conv twins (cuBLAS im2col products, the max-pool kernel) against NumPy in
    float64: 1e-10 relative (other summation orders in the products), and the directional
    check on both paths."""
    from vae_np.backend import use_fast_paths

    _, _, x = assert_backend_matches_numpy("cupy", rtol=1e-10, atol=1e-12)
    model = helpers.jitter_biases(VAE(**{**BACKEND_CASE, "num_classes": None}, backend="cupy"))
    for fast in (True, False):
        with use_fast_paths(fast):
            result = gradcheck.check_vae_directional(model, x, noise(model))
        assert result.passed, (fast, result.rel_error)


# --------------------------------------------------------------------------------------
# Training: the trainer, resume bit for bit, the command line


conv_config = partial(helpers.tiny_config, architecture="conv", channels=(2, 3), hidden=(6,),
                      batch_size=16, epochs=3, eval_samples=4, eval_batch_size=16)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(64, 32, side=8)


def make_trainer(config, dataset, out_dir) -> Trainer:
    return Trainer(config, dataset, out_dir, log=None, progress=False, pictures=False)


def same_state(a: Trainer, b: Trainer) -> bool:
    return all(np.array_equal(value, b.model.state_dict()[name])
               for name, value in a.model.state_dict().items()) and all(
        np.array_equal(value, b.optimizer.state_dict()[name])
        for name, value in a.optimizer.state_dict().items())


def test_training_lowers_the_loss_and_resume_is_bit_for_bit(dataset, tmp_path):
    config = conv_config(conditional=True, decoder="gaussian", binarize="none", samples=2)
    whole = make_trainer(config, dataset, tmp_path / "whole")
    results = whole.fit()
    assert whole.model.architecture == "conv" and whole.model.image_shape == (8, 8)
    history = whole.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert math.isfinite(results["test_log_likelihood"]["mean"])
    make_trainer(dataclass_replace(config, epochs=1), dataset, tmp_path / "parts").fit()
    resumed = Trainer.resume(tmp_path / "parts", dataset, overrides={"epochs": 3}, log=None,
                             progress=False, pictures=False)
    resumed.fit()
    assert same_state(resumed, whole)
    assert [e["test_loss"] for e in resumed.history] == [e["test_loss"] for e in history]
    _, meta = load_checkpoint(tmp_path / "parts" / CHECKPOINT_FILE)
    assert meta["config"]["architecture"] == "conv" and meta["config"]["channels"] == [2, 3]
    assert meta["model_config"]["image_shape"] == [8, 8]


def test_a_run_with_the_default_channels_reads_back(dataset, tmp_path):
    """The run config's channels left unset mean CONV_CHANNELS: the trainer's checkpoint
    stores them resolved, and one that stored None (before they were resolved) still reads,
    where read_model refused it as tampered with (a full-MNIST conv run could not be
    scored)."""
    from vae_np.checkpoint import CheckpointError, save_checkpoint
    from vae_np.networks import CONV_CHANNELS
    config = conv_config(channels=None, epochs=1, eval_samples=0)
    assert config.channels == CONV_CHANNELS
    make_trainer(config, dataset, tmp_path / "run").fit()
    path = tmp_path / "run" / CHECKPOINT_FILE
    assert read_model(path).model.channels == CONV_CHANNELS
    arrays, meta = load_checkpoint(path)
    assert meta["config"]["channels"] == list(CONV_CHANNELS)
    meta["config"]["channels"] = None                     # as the earlier trainer wrote it
    save_checkpoint(tmp_path / "old.npz", arrays, meta)
    assert read_model(tmp_path / "old.npz").model.channels == CONV_CHANNELS
    meta["config"]["channels"] = [4, 5]                   # a real disagreement still fails
    save_checkpoint(tmp_path / "edited.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="disagree on channels"):
        read_model(tmp_path / "edited.npz")


def test_a_conv_run_draws_every_picture(dataset, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    trainer = Trainer(conv_config(epochs=1), dataset, tmp_path, log=None,
                      progress=False, pictures=True)
    trainer.fit()
    for name in ["reconstructions.png", "samples.png", "loss_curves.png", "manifold.png",
                 "latent_scatter.png"]:
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100, name


def test_a_mid_epoch_interrupt_resumes_bit_for_bit(dataset, tmp_path):
    config = conv_config()
    whole = make_trainer(config, dataset, tmp_path / "whole")
    whole.fit()
    cut = make_trainer(config, dataset, tmp_path / "cut")
    backward, calls = cut.model.backward, [0]

    def interrupted():
        calls[0] += 1
        backward()
        if calls[0] == 6:                       # epoch 2, batch 2
            raise KeyboardInterrupt

    cut.model.backward = interrupted
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = Trainer.resume(tmp_path / "cut", dataset, log=None, progress=False,
                             pictures=False)
    assert (resumed.epochs_done, resumed.batches_done) == (1, 1)
    resumed.fit()
    assert same_state(resumed, whole)


def dataclass_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_train_config_architecture_fields():
    assert TrainConfig().hidden == (512, 512) and TrainConfig().architecture == "mlp"
    conv = TrainConfig(architecture="conv")
    assert conv.hidden == (512,) and conv.channels == (32, 64)   # the starting example's
    assert conv.model_kwargs()["architecture"] == "conv"
    assert "architecture" not in TrainConfig().model_kwargs()   # the MLP's VAE call as before
    assert TrainConfig.from_dict(conv_config().to_dict()) == conv_config()
    with pytest.raises(ValueError, match="channels: .* for architecture='conv'"):
        TrainConfig(channels=(2, 3))
    with pytest.raises(ValueError, match="channels: expected the two convolutions' widths"):
        TrainConfig(architecture="conv", channels=(2,))
    with pytest.raises(ValueError, match="data-logit.*one per channel"):
        TrainConfig(architecture="conv", output_bias="data-logit")
    with pytest.raises(ValueError, match="architecture: expected one of mlp, conv"):
        TrainConfig(architecture="resnet")
    with pytest.raises(ValueError, match="activation: the conv architecture has ReLU units"):
        TrainConfig(architecture="conv", activation="tanh")


def test_a_conv_run_on_flat_features_or_odd_sizes_is_refused(tmp_path):
    flat = synthetic_dataset(20, 10, side=8, flat=True)
    with pytest.raises(ValueError, match="architecture: 'conv' needs images"):
        make_trainer(conv_config(), flat, tmp_path)
    odd = synthetic_dataset(20, 10, side=6)
    with pytest.raises(ValueError, match="multiples of 4; the images are 6x6.*--image-size"):
        make_trainer(conv_config(), odd, tmp_path / "odd")


def test_vae_np_train_architecture_conv(tmp_path, capsys):
    data = synthetic_dataset(40, 20, side=8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=data.x_train.reshape(-1, 8, 8), x_test=data.x_test.reshape(-1, 8, 8))
    common = ["--dataset", str(path), "--no-progress", "--no-pictures", "--latent-dim", "2",
              "--batch-size", "10", "--eval-samples", "3", "--out", str(tmp_path / "run")]
    assert train_main(["--architecture", "conv", "--channels", "2,3", "--hidden", "6",
                       "--epochs", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "VAE 8x8 conv 2,3-6-2" in out
    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert results["config"]["architecture"] == "conv"
    assert train_main(["--resume", "--epochs", "2", *common]) == 0
    saved = read_model(tmp_path / "run" / CHECKPOINT_FILE)
    assert saved.model.architecture == "conv" and saved.image_shape == (8, 8)
    # flags that do not fit: one line, status 2
    for argv, message in ((["--channels", "2,3"], "channels: the convolution widths are for "
                                                  "architecture='conv'"),
                          (["--architecture", "conv", "--output-bias", "data-logit"],
                           "data-logit")):
        with pytest.raises(SystemExit) as info:
            train_main([*argv, *common[:-1], str(tmp_path / "other")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.slow
def test_the_28x28_preset_passes_the_directional_check_on_both_paths():
    from vae_np.backend import use_fast_paths

    for decoder in ("bernoulli", "gaussian"):
        model = helpers.jitter_biases(VAE(architecture="conv", decoder=decoder,
                                          dtype="float64", samples=2, num_classes=10))
        x = np.random.default_rng(0).uniform(size=(2, 784))
        eps = np.random.default_rng(1).standard_normal((2, 2, 64))
        y = np.array([3, 7])
        loss = model.loss
        model.loss = lambda x, eps=None, **kw: loss(x, eps=eps, y=y, **kw)
        for fast in (True, False):
            with use_fast_paths(fast):
                result = gradcheck.check_vae_directional(model, x, eps)
            assert result.passed and result.rel_error < TOL, (decoder, fast, result.rel_error)
