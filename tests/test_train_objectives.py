"""Training with the IWAE objective, the burda2015 preset and its learning-rate schedule,
and the conditional VAE: vae_np.train and ``vae-np train`` (examples/train_mnist.py).

Tiny models on tiny synthetic data: every test runs in a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from vae_np import plotting
from vae_np.checkpoint import load_checkpoint, save_checkpoint
from vae_np.data import Dataset
from vae_np.distributed import SingleProcess
from vae_np.train import CHECKPOINT_FILE, RESULTS_FILE, Stream, TrainConfig, Trainer
from vae_np.train.config import PRESETS, preset, stage_epochs
from vae_np.train.pictures import CLASS_SAMPLES
from vae_np.train.state import ADDED_FIELDS
from vae_np import train_cli

from helpers import synthetic_dataset, tiny_config

N_TRAIN, N_TEST, CLASSES, SIDE = 40, 12, 3, 8


# class c lights band c of the rows (helpers.synthetic_dataset)
make_dataset = partial(synthetic_dataset, N_TRAIN, N_TEST, "bands", classes=CLASSES, side=SIDE)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return make_dataset()


def trainer(config, dataset, out, **options) -> Trainer:
    return Trainer(config, dataset, out, **{"log": None, "progress": False,
                                            "pictures": False, **options})


def resume(out, dataset, **overrides) -> Trainer:
    return Trainer.resume(out, dataset, overrides=overrides, log=None, progress=False,
                          pictures=False)


def same_parameters(a: Trainer, b: Trainer) -> bool:
    pa, pb = a.model.state_dict(), b.model.state_dict()
    return pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def write_npz(path: Path, labels: bool = True) -> Path:
    data = make_dataset()
    arrays = {"x_train": data.x_train.reshape(-1, SIDE, SIDE),
              "x_test": data.x_test.reshape(-1, SIDE, SIDE)}
    if labels:
        arrays.update(y_train=data.y_train, y_test=data.y_test)
    np.savez(path, **arrays)
    return path


def cli_status(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        train_cli.main(argv)
    return info.value.code, capsys.readouterr().err


def cli_config(argv, tmp_path) -> TrainConfig:
    """The TrainConfig ``vae-np train argv`` would start (nothing is trained)."""
    parser = train_cli.build_parser()
    args, given = train_cli.parse_args(parser, [*argv, "--out", str(tmp_path / "run")])
    return train_cli.config_before_data(args, given)


# --------------------------------------------------------------------------------------
# The burda2015 preset and schedule


def test_the_burda2015_preset_is_the_papers_setup():
    values = preset("burda2015")
    config = TrainConfig(**values)
    assert config.hidden == (200, 200) and config.latent_dim == 50
    assert config.decoder == "bernoulli" and config.activation == "tanh"
    assert config.output_bias == "data-logit"
    assert config.batch_size == 20 and config.lr == 1e-3 and config.adam_eps == 1e-4
    assert config.binarize_mode == "dynamic" and config.schedule == "burda2015"
    assert config.epochs == 3280 and config.eval_samples == 5000
    assert "objective" not in values and "samples" not in values  # from the flags
    # stage i runs 3^i epochs at 1e-3 10^(-i/7)
    epoch = 0
    for i in range(8):
        for _ in range(3 ** i):
            epoch += 1
            assert config.learning_rate(epoch) == pytest.approx(1e-3 * 10 ** (-i / 7),
                                                                rel=1e-12)
    assert epoch == 3280
    assert [stage_epochs(n) for n in range(1, 9)] == [1, 4, 13, 40, 121, 364, 1093, 3280]
    with pytest.raises(ValueError, match="8 stages"):
        stage_epochs(9)
    with pytest.raises(ValueError, match="3,280 epochs"):
        TrainConfig(**{**values, "epochs": 3281})
    assert PRESETS["burda2015"]["hidden"] == (200, 200)  # preset() handed out a copy


def test_the_preset_from_the_command_line(tmp_path):
    config = cli_config(["--preset", "burda2015", "--stages", "5"], tmp_path)
    assert config == TrainConfig(**{**preset("burda2015"), "epochs": 121})
    # typed flags win; the objective and k come from their own flags
    config = cli_config(["--preset", "burda2015", "--objective", "iwae", "--samples", "50",
                         "--batch-size", "10", "--hidden", "100", "--lr", "3e-4"], tmp_path)
    assert (config.objective, config.samples) == ("iwae", 50)
    assert config.batch_size == 10 and config.hidden == (100,) and config.lr == 3e-4
    assert config.latent_dim == 50 and config.adam_eps == 1e-4 and config.epochs == 3280
    config = cli_config(["--activation", "tanh", "--adam-eps", "1e-6", "--output-bias",
                         "data-logit", "--schedule", "burda2015", "--stages", "2"], tmp_path)
    assert (config.activation, config.adam_eps, config.output_bias, config.schedule,
            config.epochs) == ("tanh", 1e-6, "data-logit", "burda2015", 4)
    # without flags, nothing new changes
    assert cli_config([], tmp_path) == TrainConfig()


def test_the_trainer_applies_the_schedule_stage_by_stage_and_resumes_in_it(dataset, tmp_path):
    config = tiny_config(schedule="burda2015", epochs=stage_epochs(2), lr=2e-3)   # 4 epochs
    run = trainer(config, dataset, tmp_path / "full")
    seen = []
    step = run.optimizer.step

    def recording_step():
        seen.append((run.epochs_done + 1, run.optimizer.lr))
        step()

    run.optimizer.step = recording_step
    run.fit()
    per_epoch = {}
    for epoch, lr in seen:
        per_epoch.setdefault(epoch, set()).add(lr)
    expected = {1: 2e-3, 2: 2e-3 * 10 ** (-1 / 7), 3: 2e-3 * 10 ** (-1 / 7),
                4: 2e-3 * 10 ** (-1 / 7)}
    assert sorted(per_epoch) == [1, 2, 3, 4]
    for epoch, lrs in per_epoch.items():
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(expected[epoch], rel=1e-12)
    # stopped after stage 0's epoch and resumed: stage 1's rate, the same bits
    part = trainer(dataclasses.replace(config, epochs=1), dataset, tmp_path / "part")
    part.fit()
    resumed = resume(tmp_path / "part", dataset, epochs=4)
    resumed.fit()
    assert same_parameters(run, resumed)
    assert resumed.optimizer.lr == pytest.approx(expected[4], rel=1e-12)


def test_stages_on_the_command_line_and_its_errors(tmp_path, capsys):
    npz = write_npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    common = ["--dataset", str(npz), "--hidden", "8", "--latent-dim", "2", "--batch-size",
              "10", "--eval-samples", "0", "--no-progress", "--no-pictures"]
    assert train_cli.main([*common, "--schedule", "burda2015", "--stages", "2", "--out",
                           str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch   4/4" in printed and "lr 0.00072 " in printed and "lr 0.001 " in printed
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    # --stages on resume: more stages of the same schedule
    assert train_cli.main(["--resume", "--out", str(out), "--dataset", str(npz), "--stages",
                           "3", "--no-progress", "--no-pictures"]) == 0
    assert "epoch  13/13" in capsys.readouterr().out
    for argv, message in [
        (["--stages", "2"], "--stages counts the stages of the burda2015 schedule"),
        (["--preset", "burda2015", "--stages", "2", "--epochs", "3"],
         "--stages and --epochs exclude each other"),
        (["--preset", "burda2015", "--stages", "9"], "the burda2015 schedule has 8 stages"),
        (["--preset", "burda2016"], "argument --preset: invalid choice"),
        (["--schedule", "burda2015", "--epochs", "4000"], "ends after its 8 stages"),
        (["--output-bias", "data-logit", "--decoder", "gaussian", "--binarize", "none"],
         "needs decoder='bernoulli'"),
        (["--adam-eps", "0"], "argument --adam-eps: expected a finite number > 0"),
        (["--activation", "swish"], "argument --activation: invalid choice"),
        (["--objective", "elbo"], "argument --objective: invalid choice"),
    ]:
        status, err = cli_status([*common, *argv, "--out", str(tmp_path / "x")], capsys)
        assert status == 2 and err.count("\n") == 1, argv
        assert message in err, (argv, err)
    status, err = cli_status(["--resume", "--out", str(out), "--dataset", str(npz),
                              "--stages", "9"], capsys)
    assert status == 2 and "8 stages" in err
    # a constant-rate run has no stages
    plain = tmp_path / "plain"
    assert train_cli.main([*common, "--epochs", "1", "--out", str(plain)]) == 0
    status, err = cli_status(["--resume", "--out", str(plain), "--dataset", str(npz),
                              "--stages", "2"], capsys)
    assert status == 2 and "has schedule 'constant'" in err and err.count("\n") == 1


def test_output_bias_adam_eps_and_activation_reach_the_model(dataset, tmp_path):
    x_train = dataset.x_train.copy()
    x_train[:, 0], x_train[:, 1] = 0.0, 1.0       # pixel means 0 and 1: clipped
    dataset = dataclasses.replace(dataset, x_train=x_train)
    run = trainer(tiny_config(output_bias="data-logit", adam_eps=1e-4, activation="tanh",
                       limit_train=30), dataset, tmp_path / "a")
    means = np.clip(run.data.train_pixel_means(), 1e-3, 1 - 1e-3)
    bias = run.backend.to_numpy(run.model.decoder.linears[-1].params["b"])
    np.testing.assert_allclose(bias, np.log(means / (1 - means)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bias[:2], [math.log(1e-3 / (1 - 1e-3)),
                                          math.log((1 - 1e-3) / 1e-3)], rtol=1e-6)
    # the 30 images limit_train chose, not all 40
    assert not np.allclose(means, np.clip(dataset.x_train.mean(axis=0), 1e-3, 1 - 1e-3))
    assert run.optimizer.eps == 1e-4 and run.model.config["activation"] == "tanh"
    plain = trainer(tiny_config(), dataset, tmp_path / "b")
    assert not np.any(plain.backend.to_numpy(plain.model.decoder.linears[-1].params["b"]))
    assert plain.optimizer.eps == 1e-8 and plain.model.config["activation"] == "relu"


# --------------------------------------------------------------------------------------
# The IWAE objective


def test_an_iwae_run_names_its_objective_and_k(dataset, tmp_path):
    lines = []
    run = trainer(tiny_config(objective="iwae", samples=3, eval_batch_size=N_TEST), dataset,
                  tmp_path, log=lines.append)
    results = run.fit()
    assert run.model.objective == "iwae" and run.model.samples == 3
    epoch_lines = [line for line in lines if line.startswith("epoch")]
    assert len(epoch_lines) == 2
    assert all(line.count("-IWAE k=3 bound") == 2 and "ELBO" not in line
               for line in epoch_lines)
    assert any(line.startswith("test -IWAE k=3 bound after 2 epochs") for line in lines)
    saved = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert saved["objective"] == results["objective"] == {
        "name": "iwae", "samples": 3, "loss": "-IWAE k=3 bound", "conditional": False}
    assert saved["config"]["objective"] == "iwae" and saved["config"]["samples"] == 3
    # the reported test loss is the model's own bound on the test images
    rng = run.backend.rng(11)
    direct = float(run.model.loss(run.data.x_test, rng=rng, check_finite=False).loss)
    assert run.evaluate(rng=run.backend.rng(11))["loss"] == pytest.approx(direct, rel=1e-5)


def test_a_plain_run_still_says_elbo(dataset, tmp_path):
    lines = []
    results = trainer(tiny_config(epochs=1), dataset, tmp_path, log=lines.append).fit()
    assert results["objective"]["name"] == "vae" and results["objective"]["loss"] == "-ELBO"
    assert any("train -ELBO" in line and " lr " not in line for line in lines)


def test_resume_refuses_another_objective_or_k(dataset, tmp_path):
    trainer(tiny_config(objective="iwae", samples=3, epochs=1), dataset, tmp_path).fit()
    with pytest.raises(ValueError, match="objective='iwae' and cannot continue with 'vae'"):
        resume(tmp_path, dataset, objective="vae", epochs=2)
    with pytest.raises(ValueError, match="samples=3 and cannot continue with 5"):
        resume(tmp_path, dataset, samples=5, epochs=2)
    for field, value in (("activation", "tanh"), ("adam_eps", 1e-4),
                         ("output_bias", "data-logit"), ("schedule", "burda2015"),
                         ("conditional", True)):
        with pytest.raises(ValueError, match=f"{field}: the run in"):
            resume(tmp_path, dataset, **{field: value})
    resume(tmp_path, dataset, objective="iwae", samples=3, epochs=2).fit()  # the same: fine


def test_resume_refusals_on_the_command_line(tmp_path, capsys):
    npz = write_npz(tmp_path / "data.npz")
    out = tmp_path / "run"
    assert train_cli.main(["--dataset", str(npz), "--hidden", "8", "--latent-dim", "2",
                           "--batch-size", "10", "--epochs", "1", "--eval-samples", "0",
                           "--objective", "iwae", "--samples", "2", "--out", str(out),
                           "--no-progress", "--no-pictures"]) == 0
    capsys.readouterr()
    for argv, field in ((["--objective", "vae"], "objective"), (["--samples", "4"], "samples"),
                        (["--preset", "burda2015"], "")):    # some field of the preset
        status, err = cli_status(["--resume", "--out", str(out), "--dataset", str(npz),
                                  *argv], capsys)
        assert status == 2 and err.count("\n") == 1 and f"{field}: the run in" in err
        assert "cannot continue" in err


def test_iwae_with_beta_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="iwae objective has no KL term"):
        TrainConfig(objective="iwae", beta=0.5)
    status, err = cli_status(["--objective", "iwae", "--beta", "0.5", "--out",
                              str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "beta must stay 1" in err and "--beta is for --objective vae" in err


def test_a_checkpoint_from_before_the_new_fields_resumes_with_their_defaults(dataset, tmp_path):
    trainer(tiny_config(epochs=1), dataset, tmp_path).fit()
    path = tmp_path / CHECKPOINT_FILE
    arrays, meta = load_checkpoint(path)
    for name in ADDED_FIELDS:
        del meta["config"][name]
    save_checkpoint(path, arrays, meta)
    run = resume(tmp_path, dataset, epochs=2)
    assert run.config == tiny_config(epochs=2)
    run.fit()
    reference = trainer(tiny_config(epochs=2), dataset, tmp_path / "reference")
    reference.fit()
    assert same_parameters(run, reference)


@pytest.mark.parametrize("changes", [dict(objective="iwae", samples=3), dict(conditional=True)],
                         ids=["iwae", "conditional"])
def test_a_run_trains_the_same_bits_on_one_distributed_rank(dataset, tmp_path, changes):
    """The sharded step and evaluation (IWAE weights; a conditional model's labels): one
    rank is the plain run."""
    config = tiny_config(**changes)
    plain = trainer(config, dataset, tmp_path / "plain")
    one = trainer(dataclasses.replace(config, distributed=True), dataset, tmp_path / "one",
                  comm=SingleProcess())
    a, b = plain.fit(), one.fit()
    assert same_parameters(plain, one)
    assert a["final_epoch"]["test_loss"] == b["final_epoch"]["test_loss"]
    assert a["test_log_likelihood"]["mean"] == b["test_log_likelihood"]["mean"]


# --------------------------------------------------------------------------------------
# The conditional VAE


def test_each_batch_gets_its_own_images_labels(dataset, tmp_path):
    run = trainer(tiny_config(conditional=True, binarize="none", epochs=2, eval_samples=0), dataset,
                  tmp_path)
    assert run.model.num_classes == CLASSES
    seen = []
    loss = run.model.loss

    def recording_loss(x, *args, y=None, **kwargs):
        seen.append((run.backend.to_numpy(x).copy(), np.asarray(y).copy()))
        return loss(x, *args, y=y, **kwargs)

    run.model.loss = recording_loss
    run.fit()
    train_batches = 0
    for x, y in seen:   # training batches (shuffled) and test ELBO batches, by their rows
        for images, labels in ((dataset.x_train, dataset.y_train),
                               (dataset.x_test, dataset.y_test)):
            rows = [np.flatnonzero((images == row).all(axis=1)) for row in x]
            if all(len(r) for r in rows):
                np.testing.assert_array_equal(y, labels[[int(r[0]) for r in rows]])
                train_batches += images is dataset.x_train
                break
        else:
            raise AssertionError("a batch of neither the training nor the test images")
    assert train_batches == 2 * math.ceil(N_TRAIN / 10)
    assert len(seen) == train_batches + 2 * math.ceil(N_TEST / 8)
    orders = [tuple(y) for x, y in seen[:train_batches]]
    assert len(set(orders)) > 2  # shuffled, not one order each time


def test_conditional_evaluation_uses_the_test_labels(dataset, tmp_path):
    run = trainer(tiny_config(conditional=True, epochs=1, eval_batch_size=5), dataset, tmp_path)
    run.fit()
    backend, model, data = run.backend, run.model, run.data
    direct = float(model.loss(data.x_test, rng=backend.rng(3), y=data.y_test,
                              check_finite=False).loss)
    assert run.evaluate(rng=backend.rng(3))["loss"] == pytest.approx(direct, rel=1e-5)
    rng = backend.rng(data.key(Stream.LOG_LIKELIHOOD))   # the trainer's, in its batches
    log_px = np.concatenate([backend.to_numpy(model.log_likelihood(
        data.x_test[i:i + 5], num_samples=6, rng=rng, y=data.y_test[i:i + 5]))
        for i in range(0, N_TEST, 5)])
    assert run.test_log_likelihood(6)["mean"] == pytest.approx(float(log_px.mean()), rel=1e-6)
    wrong = (data.y_test + 1) % CLASSES
    assert run.evaluate(x=data.x_test, y=wrong, rng=backend.rng(3))["loss"] != \
        pytest.approx(direct, rel=1e-5)
    with pytest.raises(ValueError, match="pass y"):
        run.evaluate(x=data.x_test)


def test_conditional_pictures_have_one_sample_row_per_class(dataset, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    run = trainer(tiny_config(conditional=True, epochs=1), dataset, tmp_path, pictures=True)
    run.fit()
    pictures = run.save_pictures()
    assert {p.name for p in pictures} == {"reconstructions.png", "samples.png",
                                          "loss_curves.png", "latent_scatter.png"}
    images = run.run_pictures.sample_images(run.model)
    assert images.shape == (CLASSES, CLASS_SAMPLES, SIDE * SIDE)
    z = run.run_pictures.prior_latents[:CLASS_SAMPLES]   # the same latents in every row
    # One decode of all rows against one per class: BLAS may sum a row's products in
    # another order for another number of rows (OpenBLAS's kernels on AMD Zen 5 do), so
    # a few float32 ulps, not the bits; another class's row differs by far more.
    for c in range(CLASSES):
        labels = np.full(CLASS_SAMPLES, c, dtype=np.int64)
        np.testing.assert_allclose(images[c], run.backend.to_numpy(
            run.model.decode(z, y=labels)), rtol=1e-5, atol=1e-6)
    assert np.abs(images[0] - images[1]).max() > 1e-4
    with Image.open(tmp_path / "samples.png") as png:
        size = png.size
    reference = plotting.save_image_grid(
        tmp_path / "reference.png", np.zeros((CLASSES * CLASS_SAMPLES, SIDE * SIDE)),
        nrow=CLASS_SAMPLES, image_shape=(SIDE, SIDE), title="x")
    with Image.open(reference) as png:
        assert size == png.size


def test_conditional_feature_vectors_draw_a_panel_per_class(tmp_path):
    pytest.importorskip("matplotlib")
    data = make_dataset(flat=True)
    run = trainer(tiny_config(conditional=True, epochs=1, latent_dim=3), data, tmp_path,
                  pictures=True)
    run.fit()
    assert run.run_pictures.sample_images(run.model).shape == (CLASSES, CLASS_SAMPLES,
                                                               SIDE * SIDE)
    assert [p.name for p in run.save_pictures()] == ["reconstructions.png", "samples.png",
                                                     "loss_curves.png"]


def test_conditional_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="synthetic bands .* has none"):
        trainer(tiny_config(conditional=True), make_dataset(labels=False), tmp_path)


def test_conditional_end_to_end_from_the_command_line(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    npz, out = write_npz(tmp_path / "labelled.npz"), tmp_path / "run"
    common = ["--dataset", str(npz), "--hidden", "8", "--latent-dim", "2", "--batch-size",
              "10", "--eval-samples", "4", "--no-progress", "--out", str(out)]
    assert train_cli.main([*common, "--conditional", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "conditional on 3 classes" in printed and "test ln p(x) =" in printed
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["config"]["conditional"] is True and results["objective"]["conditional"]
    with Image.open(out / "samples.png") as png:
        size = png.size
    reference = plotting.save_image_grid(
        tmp_path / "reference.png", np.zeros((CLASSES * CLASS_SAMPLES, SIDE * SIDE)),
        nrow=CLASS_SAMPLES, image_shape=(SIDE, SIDE), title="x")
    with Image.open(reference) as png:
        assert size == png.size                  # three rows (classes) of eight
    # resume takes --conditional from the checkpoint
    assert train_cli.main(["--resume", "--out", str(out), "--dataset", str(npz),
                           "--epochs", "3", "--no-progress", "--no-pictures"]) == 0
    assert "epoch   3/3" in capsys.readouterr().out
    # the error: no labels (naming the file)
    plain = write_npz(tmp_path / "unlabelled.npz", labels=False)
    status, err = cli_status(["--dataset", str(plain), "--conditional", "--out",
                              str(tmp_path / "x"), "--no-progress"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "unlabelled.npz" in err and "has none" in err


def test_help_lists_the_new_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--objective", "vae"), ("--activation", "relu"),
                          ("--output-bias", "zero"), ("--adam-eps", "1e-08"),
                          ("--schedule", "constant"), ("--stages", "None"),
                          ("--preset", "None"), ("--conditional", "False")]:
        # the flag's own entry ("--schedule {constant,burda2015}"), not a mention elsewhere
        entry = f"{flag} a conditional" if flag == "--conditional" else \
            rf"{re.escape(flag)} (?:\{{[^}}]*\}}|[A-Z_]+) "
        start = re.search(entry, text[text.index("options:"):]).start() + \
            text.index("options:")
        assert f"(default: {default})" in text[start:text.index("(default:", start) + 30], flag


def test_every_new_option_runs_under_array_api_strict(dataset, tmp_path):
    """The new code paths use only the array API (N_TEST = 12 in test batches of 8: a
    short last batch, whose slice must stay inside the array)."""
    pytest.importorskip("array_api_strict")
    run = trainer(tiny_config(backend="array_api_strict", conditional=True, objective="iwae",
                       samples=2, output_bias="data-logit", schedule="burda2015",
                       activation="tanh"), dataset, tmp_path, pictures=True)
    results = run.fit()
    assert run.backend.name == "array_api_strict" and run.epochs_done == 2
    assert math.isfinite(results["test_log_likelihood"]["mean"])
    assert (tmp_path / "samples.png").is_file()


# --------------------------------------------------------------------------------------
# input_shift: what the encoder subtracts from the pixels (the burda2015 preset: nothing)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "0.5", None, True,
                                 [0.5]])
def test_input_shift_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match=r"^input_shift: expected a finite number.*got "):
        TrainConfig(input_shift=bad)


def test_input_shift_reaches_the_encoder_and_the_log(dataset, tmp_path):
    assert TrainConfig().input_shift == 0.5
    config = tiny_config(input_shift=0, epochs=1)
    assert config.input_shift == 0.0 and isinstance(config.input_shift, float)
    lines = []
    run = trainer(config, dataset, tmp_path, log=lines.append)
    assert run.model.input_shift == 0.0
    x = run.data.x_test
    mu, _ = run.model.encode(x)
    d = run.model.latent_dim
    # the encoder network sees the pixels themselves: mu(x) = encoder(x)[:, :d]
    np.testing.assert_array_equal(run.backend.to_numpy(mu),
                                  run.backend.to_numpy(run.model.encoder(x)[:, :d]))
    run.fit()
    assert any("input shift 0" in line for line in lines)
    lines.clear()
    trainer(tiny_config(epochs=1), dataset, tmp_path / "default", log=lines.append).fit()
    assert lines and not any("input shift" in line for line in lines)   # the default goes unsaid


def test_the_burda2015_preset_feeds_the_pixels_uncentred(tmp_path, capsys):
    assert preset("burda2015")["input_shift"] == 0.0
    assert TrainConfig(**preset("burda2015")).input_shift == 0.0
    assert cli_config(["--preset", "burda2015"], tmp_path).input_shift == 0.0
    # the flag, with or without the preset (a typed flag wins over the preset)
    assert cli_config(["--input-shift", "0.25"], tmp_path).input_shift == 0.25
    assert cli_config(["--preset", "burda2015", "--input-shift", "0.5"],
                      tmp_path).input_shift == 0.5
    status, err = cli_status(["--input-shift", "nan", "--out", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "input_shift: expected a finite" in err


def test_a_checkpoint_without_input_shift_resumes_centred_and_keeps_it(dataset, tmp_path):
    """Checkpoints from before the field were all trained with the shift 0.5."""
    trainer(tiny_config(epochs=1), dataset, tmp_path).fit()
    path = tmp_path / CHECKPOINT_FILE
    arrays, meta = load_checkpoint(path)
    del meta["config"]["input_shift"]
    save_checkpoint(path, arrays, meta)
    run = resume(tmp_path, dataset, epochs=2)
    assert run.config.input_shift == 0.5 and run.model.input_shift == 0.5
    with pytest.raises(ValueError, match="input_shift: the run in"):
        resume(tmp_path, dataset, input_shift=0.0, epochs=2)
