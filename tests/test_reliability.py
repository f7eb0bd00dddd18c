"""What a hostile user types (issue 19): no input is lost, no run is lost, every failure is
one line naming what is wrong. In-process calls of the commands, tmp_path only."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vae_np import VAE, load_model, save_model
from vae_np.cli import main
from vae_np.train_cli import main as train_main

pytest.importorskip("matplotlib")


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out (samples.png, ...) lands here, never in the repo
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x_train=rng.random((20, 16)).astype(np.float32),
             x_test=rng.random((6, 16)).astype(np.float32))
    save_model(VAE(input_dim=16, hidden=(8,), latent_dim=2, seed=0), tmp_path / "ck.npz",
               image_shape=(4, 4))
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, status=1):
    assert code == status and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------
# 1. An output equal to an input is refused (resolved paths, symbolic and hard links)


@pytest.mark.parametrize("argv, target", [
    (["sample", "{d}/ck.npz", "--out", "{d}/ck.npz"], "ck.npz"),
    (["encode", "{d}/ck.npz", "--dataset", "{d}/img.npz", "--out", "{d}/img.npz"], "img.npz"),
    (["eval", "{d}/ck.npz", "--dataset", "{d}/img.npz", "-K", "2", "--json", "{d}/ck.npz"],
     "ck.npz"),
    (["encode", "{d}/ck.npz", "--dataset", "{d}/img.npz", "--out", "{d}/sub/../img.npz"],
     "img.npz"),
    (["sample", "{d}/ck.npz", "--out", "{d}/link.png"], "ck.npz"),
    (["encode", "{d}/ck.npz", "--dataset", "{d}/img.npz", "--out", "{d}/hard.npz"], "img.npz"),
])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(files, capsys, argv, target):
    (files / "sub").mkdir()
    os.symlink(files / "ck.npz", files / "link.png")
    os.link(files / "img.npz", files / "hard.npz")
    before = (files / target).read_bytes()
    code, _, err = run(capsys, *[a.format(d=files) for a in argv])
    assert "destroy that input" in one_line_error(code, err)
    assert (files / target).read_bytes() == before


def test_train_out_inside_an_image_folder_is_refused(tmp_path, capsys):
    (tmp_path / "pics").mkdir()
    with pytest.raises(SystemExit) as info:
        train_main(["--dataset", str(tmp_path / "pics"), "--out", str(tmp_path / "pics" / "run")])
    assert info.value.code == 2 and "over or into the data set" in capsys.readouterr().err
    assert not (tmp_path / "pics" / "run").exists()


# --------------------------------------------------------------------------------------
# 11. --out that is a symbolic link to itself; 15. the suffix names the format written


def test_train_out_that_is_a_self_referencing_symlink_is_one_line(tmp_path, capsys):
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(SystemExit) as info:
        train_main(["--out", str(tmp_path / "loop"), "--no-download"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "symbolic link" in err and err.count("\n") == 1


@pytest.mark.parametrize("name, magic", [("s.pdf", b"%PDF"), ("s.jpg", b"\xff\xd8"),
                                         ("s.svg", b"<?xml"), ("s.png", b"\x89PNG")])
def test_sample_writes_the_format_its_suffix_names(files, capsys, name, magic):
    code, _, err = run(capsys, "sample", files / "ck.npz", "--n", "4", "--out", files / name)
    assert code == 0, err
    assert (files / name).read_bytes().startswith(magic)


@pytest.mark.parametrize("argv", [
    ["sample", "{d}/ck.npz", "--out", "{d}/s.gif"],
    ["encode", "{d}/ck.npz", "--dataset", "{d}/img.npz", "--out", "{d}/codes.png"],
])
def test_an_output_suffix_of_another_format_is_refused(files, capsys, argv):
    code, _, err = run(capsys, *[a.format(d=files) for a in argv])
    assert "in the format its name says" in one_line_error(code, err)
    assert not any(p.name.startswith(("s.", "codes.")) for p in files.iterdir())


# --------------------------------------------------------------------------------------
# 4. The data source, its split and a fingerprint are recorded; resume and eval use them

TINY = ["--hidden", "4", "--latent-dim", "2", "--batch-size", "10", "--eval-samples", "0",
        "--no-pictures", "--no-progress", "--no-download"]


def test_resume_takes_the_data_set_from_the_checkpoint(files, capsys):
    run_dir = files / "run"
    assert train_main(["--dataset", str(files / "img.npz"), "--epochs", "1", "--out",
                       str(run_dir), *TINY]) == 0
    # no --dataset: the run's own file, not MNIST
    assert train_main(["--resume", "--epochs", "2", "--out", str(run_dir), "--no-download",
                       "--no-progress", "--no-pictures"]) == 0
    assert "img.npz" in capsys.readouterr().out
    # moved away: said as such, and --dataset where it is now resumes (same fingerprint)
    os.rename(files / "img.npz", files / "moved.npz")
    with pytest.raises(SystemExit):
        train_main(["--resume", "--epochs", "3", "--out", str(run_dir), "--no-download"])
    assert "is not there any more; give --dataset" in capsys.readouterr().err
    assert train_main(["--resume", "--epochs", "3", "--out", str(run_dir), "--dataset",
                       str(files / "moved.npz"), "--no-progress", "--no-pictures"]) == 0
    os.rename(files / "moved.npz", files / "img.npz")
    # the same path with other contents is refused, naming the fingerprint
    rng = np.random.default_rng(5)
    np.savez(files / "img.npz", x_train=rng.random((20, 16)), x_test=rng.random((6, 16)))
    with pytest.raises(SystemExit) as info:
        train_main(["--resume", "--epochs", "4", "--out", str(run_dir), "--dataset",
                    str(files / "img.npz")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "fingerprint" in err and err.count("\n") == 1


def test_eval_scores_the_runs_own_split_and_says_when_another_is_asked(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(folder / f"{i}.png")
    assert train_main(["--dataset", str(folder), "--test-fraction", "0.25", "--epochs", "1",
                       "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoint.npz"
    code, out, err = run(capsys, "eval", ckpt, "-K", "0")       # no --dataset: the run's
    assert code == 0 and "3 examples of pics/" in out and "note:" not in err, err
    code, out, err = run(capsys, "eval", ckpt, "--dataset", folder, "--test-fraction", "0.5",
                         "-K", "0")
    assert code == 0 and "6 examples" in out
    assert "may hold the run's training examples" in err


# --------------------------------------------------------------------------------------
# 6. A trainer checkpoint's model_config and run config must agree


@pytest.mark.parametrize("edit", ["model_config", "config"])
def test_a_checkpoint_whose_two_configs_disagree_is_refused(files, capsys, edit):
    from vae_np.checkpoint import load_checkpoint, save_checkpoint

    run_dir = files / "run"
    assert train_main(["--dataset", str(files / "img.npz"), "--epochs", "1", "--out",
                       str(run_dir), *TINY]) == 0
    ckpt = run_dir / "checkpoint.npz"
    arrays, meta = load_checkpoint(ckpt)
    meta[edit]["activation"] = "tanh"          # same weights' shapes: only the units differ
    save_checkpoint(ckpt, arrays, meta)
    capsys.readouterr()
    code, _, err = run(capsys, "eval", ckpt, "-K", "0")
    assert "disagree on activation" in one_line_error(code, err)
    with pytest.raises(SystemExit) as info:
        train_main(["--resume", "--epochs", "2", "--out", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "disagree on activation" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------
# 5. A model-only export of a loaded model keeps what its file said about the data


def test_save_model_of_a_loaded_model_keeps_the_image_shape(tmp_path):
    from vae_np.saving import read_model

    save_model(VAE(input_dim=15, hidden=(4,), latent_dim=2), tmp_path / "a.npz",
               image_shape=(3, 5), binarize="dynamic")
    save_model(load_model(tmp_path / "a.npz"), tmp_path / "b.npz")
    back = read_model(tmp_path / "b.npz")
    assert back.image_shape == (3, 5) and back.binarize == "dynamic"
    # given explicitly, the arguments win; a fresh model records nothing, and a square
    # feature count reads back as square images
    save_model(load_model(tmp_path / "a.npz"), tmp_path / "c.npz", image_shape=None)
    assert read_model(tmp_path / "c.npz").image_shape is None
    save_model(VAE(input_dim=36, hidden=(4,), latent_dim=2), tmp_path / "d.npz")
    assert read_model(tmp_path / "d.npz").image_shape == (6, 6)


# --------------------------------------------------------------------------------------
# 7. A fresh learned-variance Gaussian VAE starts near the data's own Gaussian NLL


def own_gaussian_nll(x):
    """-ln N(x | per-feature mean, per-feature variance), nats per example."""
    return float(0.5 * x.shape[1] * np.log(2 * np.pi) + 0.5 * np.sum(np.log(x.var(axis=0)))
                 + 0.5 * x.shape[1])


def test_a_fresh_gaussian_decoder_has_a_unit_variance():
    x = np.random.default_rng(0).normal(size=(100, 10))
    for seed in range(6):
        model = VAE(input_dim=10, hidden=(16,), latent_dim=2, decoder="gaussian", seed=seed,
                    dtype="float64")
        _, logvar = np.split(model.decoder(model.encode(x)[0]), 2, axis=1)
        assert np.all(logvar == 0.0)
        # the means' random spread (a few units) remains: tens of nats, not 5.6e69 as before
        assert model.loss(x, rng=model.backend.rng(0)).loss < own_gaussian_nll(x) + 25 * 10


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e2])
def test_a_gaussian_run_starts_near_the_datas_own_nll_at_any_scale(tmp_path, scale):
    from vae_np.data import Dataset
    from vae_np.train import TrainConfig, Trainer

    d = 10
    x = (np.random.default_rng(0).normal(size=(120, d)) * scale + 3 * scale).astype(np.float32)
    data = Dataset(x[:100], None, x[100:], None, source="x", description="x",
                   image_shape=None, num_classes=None, unit_range=False)
    own = own_gaussian_nll(x[100:].astype(np.float64))
    for seed in range(6):
        trainer = Trainer(TrainConfig(hidden=(16,), latent_dim=2, decoder="gaussian",
                                      seed=seed, epochs=1, batch_size=20, eval_samples=0),
                          data, tmp_path / str(seed), log=None, progress=False, pictures=False)
        first = trainer.evaluate()["loss"]
        # of the order of the data's own NLL: a few nats per feature (was up to 1e35)
        assert own - d < first < own + 4 * d, (seed, first, own)
        trainer.fit()
        assert np.isfinite(trainer.history[-1]["test_loss"])


# --------------------------------------------------------------------------------------
# 2. 16-bit greyscale PNGs are scaled by their own range


@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_16_bit_greyscale_pngs_keep_their_grey_levels(tmp_path, color):
    image = pytest.importorskip("PIL.Image")
    from vae_np.data import load_image_folder

    levels = (np.arange(16, dtype=np.uint16) * 4369).reshape(4, 4)   # 0 .. 65535
    for i in range(3):
        image.fromarray(levels).save(tmp_path / f"{i}.png")
    assert image.open(tmp_path / "0.png").mode.startswith("I")
    ds = load_image_folder(tmp_path, color=color, test_fraction=0.4)
    expected = levels.reshape(-1) / 65535.0
    if color == "rgb":
        expected = np.repeat(expected, 3)
    assert np.allclose(ds.x_train[0], expected, atol=1e-6)


# --------------------------------------------------------------------------------------
# 16. NumPy scalars are accepted throughout, and stored as Python numbers


def test_numpy_scalars_are_accepted_and_saved(tmp_path):
    from vae_np import Adam
    from vae_np.train import TrainConfig

    model = VAE(input_dim=np.int64(6), hidden=[np.int64(5)], latent_dim=np.int32(2),
                beta=np.float32(2), input_shift=np.float64(0.25), seed=np.int64(3),
                decoder="gaussian-fixed", variance=np.float32(0.5))
    assert model.beta == 2.0 and model.config["hidden"] == [5]
    save_model(model, tmp_path / "m.npz")                       # failed on np.int64 before
    assert load_model(tmp_path / "m.npz").config == model.config
    Adam(model.parameters, lr=np.float32(1e-3), eps=np.float64(1e-8))
    config = TrainConfig(hidden=(np.int64(4),), lr=np.float32(0.01), epochs=np.int64(2),
                         beta=np.float32(1))
    assert type(config.to_dict()["epochs"]) is int and type(config.lr) is float
    with pytest.raises(ValueError, match=r"^hidden: expected an integer >= 1, got True"):
        VAE(input_dim=6, hidden=[True])


# --------------------------------------------------------------------------------------
# 12. Sizes that cannot fit are refused before allocating, naming what was too large


def test_sizes_too_large_for_memory_are_refused_before_allocating(files, capsys):
    from vae_np.checkpoint import load_checkpoint, save_checkpoint

    small = VAE(input_dim=16, hidden=(8, 3), latent_dim=2, num_classes=4, decoder="gaussian")
    widths = [(16 + 4, 8), (8, 3), (3, 4), (2 + 4, 3), (3, 8), (8, 32)]
    assert small.num_parameters == sum((a + 1) * b for a, b in widths)   # what is checked
    with pytest.raises(ValueError, match=r"^VAE\(.*hidden=\[1000000000\].* do not fit"):
        VAE(input_dim=16, hidden=(10 ** 9,), latent_dim=2)
    with pytest.raises(ValueError, match=r"num_classes=1000000001.* do not fit"):
        VAE(input_dim=16, hidden=(8,), latent_dim=2, num_classes=10 ** 9 + 1)
    code, _, err = run(capsys, "sample", files / "ck.npz", "--n", "100000000000")
    assert "--n: " in one_line_error(code, err) and "do not fit" in err
    arrays, meta = load_checkpoint(files / "ck.npz")
    meta["model_config"]["hidden"] = [10 ** 9]
    save_checkpoint(files / "wide.npz", arrays, meta)
    code, _, err = run(capsys, "sample", files / "wide.npz")
    assert "wide.npz" in one_line_error(code, err) and "do not fit" in err


# --------------------------------------------------------------------------------------
# 13. A non-finite evaluation is not "training has diverged"; 14. Ctrl-C is one line, 130


def test_eval_of_data_far_outside_the_training_range_says_so(tmp_path, capsys):
    save_model(VAE(input_dim=5, hidden=(8,), latent_dim=2, decoder="gaussian"),
               tmp_path / "g.npz")
    np.savez(tmp_path / "huge.npz", x_train=np.full((4, 5), 1e25), x_test=np.full((4, 5), 1e25))
    code, _, err = run(capsys, "eval", tmp_path / "g.npz", "--dataset", tmp_path / "huge.npz")
    assert "far outside" in one_line_error(code, err) and "diverged" not in err


@pytest.mark.parametrize("command", ["eval", "train"])
def test_ctrl_c_while_loading_data_is_one_line_and_status_130(files, capsys, monkeypatch,
                                                              command):
    import vae_np.cli
    import vae_np.train_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vae_np.cli, "load_dataset", interrupted)
    monkeypatch.setattr(vae_np.train_cli, "load_dataset", interrupted)
    if command == "eval":
        code = main(["eval", str(files / "ck.npz"), "--dataset", str(files / "img.npz")])
    else:
        code = train_main(["--dataset", str(files / "img.npz"), "--out", str(files / "run"),
                           *TINY])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------
# 10. A full disk while training: one line naming the file, the last checkpoint kept


def test_disk_full_while_training_is_one_line_and_the_checkpoint_survives(files, capsys,
                                                                          monkeypatch):
    import errno

    from vae_np.train import read_run

    run_dir = files / "run"
    assert train_main(["--dataset", str(files / "img.npz"), "--epochs", "1", "--out",
                       str(run_dir), *TINY]) == 0
    capsys.readouterr()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as info:
        train_main(["--resume", "--epochs", "2", "--out", str(run_dir), "--no-progress"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "run/metrics.jsonl: could not be written (No space left on device)" in err
    assert "is intact" in err and ".tmp" not in err
    assert read_run(run_dir).epochs_done == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------------------
# 19. No leftovers: SIGTERM stops like Ctrl-C; no empty --out; no stale temporary files


def test_sigterm_is_handled_as_ctrl_c():
    import signal

    from vae_np.train.guards import StopOnCtrlC

    before = signal.getsignal(signal.SIGTERM)
    with StopOnCtrlC() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested                      # a request, polled at a batch boundary
        with pytest.raises(KeyboardInterrupt):     # the second one stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_while_loading_data_is_one_line_and_leaves_nothing(files, capsys,
                                                                   monkeypatch):
    import signal

    import vae_np.train_cli

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the data loading")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(vae_np.train_cli, "load_dataset", terminated)
    code = train_main(["--dataset", str(files / "img.npz"), "--out", str(files / "new"), *TINY])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and err.count("\n") == 1, err
    assert not (files / "new").exists() and signal.getsignal(signal.SIGTERM) == before


def test_a_failed_train_leaves_no_empty_out_and_a_run_removes_stale_temporaries(files,
                                                                                capsys):
    np.savez(files / "real.npz", x_train=np.full((4, 16), 5.0), x_test=np.full((2, 16), 5.0))
    with pytest.raises(SystemExit):
        train_main(["--dataset", str(files / "real.npz"), "--out", str(files / "new"), *TINY])
    assert "bernoulli decoder needs" in capsys.readouterr().err
    assert not (files / "new").exists()
    (files / "run").mkdir()
    (files / "run" / ".samples.png.x1y2.tmp").write_bytes(b"")   # left by a SIGKILL
    (files / "run" / ".mine.txt.tmp").write_bytes(b"")           # not a run file: kept
    assert train_main(["--dataset", str(files / "img.npz"), "--epochs", "1", "--out",
                       str(files / "run"), *TINY]) == 0
    assert sorted(p.name for p in (files / "run").glob(".*.tmp")) == [".mine.txt.tmp"]


# --------------------------------------------------------------------------------------
# 17. Messages name the right thing; 18. no option is silently ignored


@pytest.fixture
def cond(files):
    save_model(VAE(input_dim=16, hidden=(8,), latent_dim=2, num_classes=4), files / "cond.npz",
               image_shape=(4, 4))
    return files / "cond.npz"


@pytest.mark.parametrize("argv, match", [
    (["traverse", "{c}", "--label", "9"], r"--label: expected a class in 0\.\.3"),
    (["traverse", "{k}", "--range", "1e300"], r"--range: 1e\+300 takes z beyond"),
    (["sample", "{k}", "--out", "{d}/img.npz/s.png"], r"lies under .*img\.npz, which is a file"),
    (["sample", "{k}", "--out", "{d}"], r"--out: .* is a directory"),
    (["traverse", "{k}", "--index", "3"], r"--index picks an example of --dataset"),
    (["sample", "{c}", "--nrow", "3"], r"--nrow: the model .* is conditional"),
    (["eval", "{k}", "--dataset", "{d}/img.npz", "--json", "{d}/img.npz/e.json"],
     r"--json: .* which is a file"),
])
def test_messages_name_the_flag_at_fault(files, cond, capsys, argv, match):
    import re

    code, _, err = run(capsys, *[a.format(c=cond, k=files / "ck.npz", d=files) for a in argv])
    assert re.search(match, one_line_error(code, err)), err
    assert "Errno" not in err and ".tmp" not in err


def test_interpolate_needs_two_steps(files, capsys):
    with pytest.raises(SystemExit) as info:
        main(["interpolate", str(files / "ck.npz"), "--dataset", str(files / "img.npz"),
              "--steps", "1"])
    assert info.value.code == 2 and "two ends" in capsys.readouterr().err


@pytest.mark.parametrize("arrays, match", [
    ({"x_train": np.zeros((3, 4, 4)), "x_test": np.zeros((2, 5, 5))},
     r"'x_test': images of shape \(5, 5\), but array 'x_train' has images of shape \[4, 4\]"),
    ({"x_train": np.zeros((3, 0)), "x_test": np.zeros((2, 0))}, r"no features per example"),
])
def test_npz_messages_name_the_array_at_fault(tmp_path, arrays, match):
    from vae_np.data import load_npz_dataset

    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz_dataset(tmp_path / "d.npz")


def test_tampered_checkpoint_fields_name_the_file(files, capsys):
    from vae_np.checkpoint import load_checkpoint, save_checkpoint

    arrays, meta = load_checkpoint(files / "ck.npz")
    meta["model_config"]["dtype"] = "float16"
    save_checkpoint(files / "bad.npz", arrays, meta)
    code, _, err = run(capsys, "sample", files / "bad.npz")
    assert "bad.npz: metadata model_config.dtype" in one_line_error(code, err)
    run_dir = files / "run"
    assert train_main(["--dataset", str(files / "img.npz"), "--epochs", "1", "--out",
                       str(run_dir), *TINY]) == 0
    arrays, meta = load_checkpoint(run_dir / "checkpoint.npz")
    meta["config"]["lr"] = -1.0
    save_checkpoint(run_dir / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train_main(["--resume", "--epochs", "2", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "checkpoint.npz: trainer metadata config: lr" in err
    assert "see --help" not in err


def test_plain_runs_under_mpiexec_are_told_to_add_distributed(tmp_path, monkeypatch):
    from vae_np.train import OutDirInUse, OutDirLock

    monkeypatch.setenv("PMI_SIZE", "2")
    (tmp_path / ".lock").write_text('{"pid": %d, "host": "%s"}' % (os.getppid(),
                                                                 os.uname().nodename))
    with pytest.raises(OutDirInUse, match="add --distributed"):
        with OutDirLock(tmp_path):
            pass


# --------------------------------------------------------------------------------------
# 20. vae-np eval says why its numbers are not the training run's last lines


def test_eval_says_its_draws_are_its_own(files, capsys):
    code, out, _ = run(capsys, "eval", files / "ck.npz", "--dataset", files / "img.npz",
                       "-K", "2", "--seed", "4")
    assert code == 0 and "own draws, --seed 4" in out and "differ from them" in out
