"""The vae-np command: every subcommand on a tiny model, on NumPy and array-api-strict,
one-line errors for bad checkpoints and data, and the README's walk-through."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vae_np import VAE, save_model
from vae_np.cli import interpolate_latents, main

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x_train=rng.random((20, 16)).astype(np.float32),
             x_test=rng.random((6, 16)).astype(np.float32),
             y_train=rng.integers(0, 3, 20), y_test=rng.integers(0, 3, 6))
    np.savez(tmp_path / "vec.npz", x_train=rng.normal(size=(20, 5)), x_test=rng.normal(size=(6, 5)))
    save_model(VAE(input_dim=16, hidden=(8,), latent_dim=2, seed=0), tmp_path / "img_model.npz",
               image_shape=(4, 4))
    save_model(VAE(input_dim=5, hidden=(8,), latent_dim=3, decoder="gaussian", seed=0),
               tmp_path / "vec_model.npz")
    save_model(VAE(input_dim=16, hidden=(8,), latent_dim=2, num_classes=3, seed=0),
               tmp_path / "cond_model.npz", image_shape=(4, 4))
    conv = dict(architecture="conv", image_shape=(4, 4), channels=(2, 3), hidden=(8,),
                latent_dim=2, seed=0)
    save_model(VAE(**conv), tmp_path / "conv_model.npz")      # its own image shape
    save_model(VAE(**conv, num_classes=3, decoder="gaussian"), tmp_path / "convcond_model.npz")
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("backend", ["numpy", "array_api_strict"])
@pytest.mark.parametrize("kind", ["img", "vec", "cond", "conv", "convcond"])
def test_every_subcommand_writes_its_file(files, capsys, backend, kind):
    pytest.importorskip(backend)
    ckpt, data = files / f"{kind}_model.npz", files / ("vec.npz" if kind == "vec" else "img.npz")
    common = ["--backend", backend]
    for argv, out in [
        (["sample", ckpt, "--n", "6", "--npy"], "s.png"),
        (["reconstruct", ckpt, "--dataset", data], "r.png"),
        (["encode", ckpt, "--dataset", data], "c.npz"),
        (["interpolate", ckpt, "--dataset", data, "--pairs", "2", "--steps", "4",
          "--spherical"], "i.png"),
        (["traverse", ckpt, "--steps", "3"], "t.png"),
        (["traverse", ckpt, "--dataset", data, "--steps", "3"], "t2.png"),
        (["eval", ckpt, "--dataset", data, "-K", "4", "--json", files / "e.json"], None),
    ]:
        target = [] if out is None else ["--out", files / out]
        code, stdout, err = run(capsys, *argv, *target, *common)
        assert code == 0, err
        if out is not None:
            assert (files / out).stat().st_size > 0
    codes = np.load(files / "c.npz")
    assert codes["mu"].shape == codes["logvar"].shape == (6, 3 if kind == "vec" else 2)
    assert np.load(files / "s.npy").shape[0] >= 6
    assert "ln p(x)" in stdout


def test_sample_by_label_and_a_row_per_class(files, capsys):
    code, _, err = run(capsys, "sample", files / "cond_model.npz", "--label", "2", "--out",
                       files / "s.npy")
    assert code == 0 and np.load(files / "s.npy").shape == (64, 16)
    code, _, _ = run(capsys, "sample", files / "cond_model.npz", "--n", "6", "--out",
                     files / "rows.npy")
    assert np.load(files / "rows.npy").shape == (6, 16)      # 2 per class, 3 classes
    code, _, err = run(capsys, "sample", files / "cond_model.npz", "--label", "3")
    assert code == 1 and "--label: expected a class in 0..2" in err
    code, _, err = run(capsys, "sample", files / "img_model.npz", "--label", "1")
    assert code == 1 and "not conditional" in err


def test_seed_makes_samples_repeatable(files, capsys):
    for name in ("a", "b"):
        run(capsys, "sample", files / "img_model.npz", "--seed", "3", "--out", files / f"{name}.npy")
    assert np.array_equal(np.load(files / "a.npy"), np.load(files / "b.npy"))


@pytest.mark.parametrize("argv, match", [
    (["sample", "{d}/missing.npz"], "no such file"),
    (["sample", "{d}/img.npz"], "not a vae_np checkpoint"),
    (["eval", "{d}/vec_model.npz", "--dataset", "{d}/img.npz"], "has 16 features .* takes 5"),
    (["eval", "{d}/img_model.npz", "--dataset", "{d}/vec.npz"], "bernoulli decoder needs"),
    (["reconstruct", "{d}/cond_model.npz", "--dataset", "{d}/vec.npz"], "values in"),
    (["encode", "{d}/img_model.npz", "--dataset", "{d}/nothing.npz"], "no such file"),
])
def test_errors_are_one_line_with_status_1(files, capsys, argv, match):
    code, _, err = run(capsys, *[a.format(d=files) for a in argv])
    assert code == 1 and err.count("\n") == 1 and err.startswith("vae-np ")
    assert re.search(match, err), err


def test_corrupt_checkpoint_and_unlabelled_data_for_a_conditional_model(files, capsys):
    raw = bytearray((files / "img_model.npz").read_bytes())
    raw[300] ^= 0xFF
    (files / "bad.npz").write_bytes(bytes(raw))
    code, _, err = run(capsys, "sample", files / "bad.npz")
    assert code == 1 and "bad.npz" in err and err.count("\n") == 1
    np.savez(files / "nolabels.npz", x_train=np.zeros((2, 16)), x_test=np.zeros((2, 16)))
    code, _, err = run(capsys, "encode", files / "cond_model.npz", "--dataset",
                       files / "nolabels.npz")
    assert code == 1 and "needs labels" in err


def test_bad_flag_is_status_2(files, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", str(files / "img_model.npz"), "--n", "0"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_help_of_every_subcommand_and_the_loss_scaling(capsys):
    for sub in ("sample", "reconstruct", "encode", "interpolate", "traverse", "eval"):
        with pytest.raises(SystemExit) as info:
            main([sub, "--help"])
        assert info.value.code == 0
    assert "nats per example" in capsys.readouterr().out    # eval's epilog
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--dataset" in out and "mean over pixels" not in out and "nats per" in out


@pytest.mark.slow
def test_sample_loads_no_trainer_and_no_mpi(files):
    """vae-np sample needs a model and matplotlib: in a fresh interpreter it must leave the
    trainer, the vae-np train glue and MPI unloaded (vae_np.cli_args holds what it shares
    with train)."""
    out = files / "s.png"
    code = ("import sys; from vae_np import cli; "
            f"status = cli.main(['sample', {str(files / 'img_model.npz')!r}, '--n', '4', "
            f"'--out', {str(out)!r}]); "
            "print(status, sorted(m for m in sys.modules if m.split('.')[0] == 'mpi4py' or m in "
            "('vae_np.train', 'vae_np.train_cli', 'vae_np.distributed')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT)),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "0 []" and out.stat().st_size > 0


def test_interpolation_paths():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    lin = interpolate_latents(a, b, 5, spherical=False)
    assert np.allclose(lin[0], a) and np.allclose(lin[-1], b) and np.allclose(lin[2], [0.5, 1])
    sph = interpolate_latents(a, b, 3, spherical=True)
    assert np.allclose(sph[0], a) and np.allclose(sph[-1], b)
    # slerp of orthogonal unit-ish vectors at t = 1/2: sin(pi/4)/sin(pi/2) (a + b)
    assert np.allclose(sph[1], np.sin(np.pi / 4) * (a + b))
    assert np.allclose(interpolate_latents(a, 2 * a, 3, True), interpolate_latents(a, 2 * a, 3, False))


def walkthrough_commands() -> list[str]:
    """The shell commands of the README's walk-through (between its markers)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- walkthrough -->")[1].split("```bash")[1].split("```")[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path):
    """Each command of the README's own-data walk-through, as a user would type it (the
    console script replaced by python -m vae_np, which is the same main); about 20 s."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    script = "\n".join(walkthrough_commands()).replace("python -c", f"{sys.executable} -c")
    script = script.replace("vae-np ", f"{sys.executable} -m vae_np ")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("samples.png", "interpolation.png", "run/checkpoint.npz"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_python_m_vae_np_and_the_console_script_are_declared():
    result = subprocess.run([sys.executable, "-m", "vae_np", "--help"], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert result.returncode == 0 and "interpolate" in result.stdout
    assert "vae-np = vae_np.cli:main" in (ROOT / "setup.cfg").read_text()
