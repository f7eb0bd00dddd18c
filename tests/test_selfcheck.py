"""``python -m vae_np.selfcheck``: the quick check passes on the CPU, a broken gradient or
a failing check makes it fail, and an unusable cupy backend is one clean FAILED line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vae_np import selfcheck
from vae_np.backend import cuda_available

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv, capsys) -> tuple[int, list[str]]:
    status = selfcheck.main(argv)
    captured = capsys.readouterr()
    assert captured.err == ""
    return status, captured.out.splitlines()


@pytest.mark.slow
def test_quick_selfcheck_passes_on_numpy(capsys):
    status, lines = run_main(["--quick"], capsys)
    assert status == 0, "\n".join(lines)
    assert lines[-1] == "selfcheck: OK"
    text = "\n".join(lines)
    for what in ("Python:", "NumPy:", "BLAS:", "numba:", "CuPy:", "checking on:  numpy"):
        assert what in text
    for name in ("gradients bernoulli", "gradients gaussian", "gradients gaussian-fixed",
                 "fast path bernoulli", "fast path gaussian-fixed", "transfers", "training",
                 "step speed"):
        assert any(line.startswith(f"  ok     {name}:") for line in lines), name
    assert "float32 identical; float64 identical" in text  # NumPy: same bits
    assert "ms/step" in text and "FAILED" not in text


def test_a_wrong_gradient_fails_the_gradient_check(monkeypatch):
    from vae_np.model import VAE

    backward = VAE.backward

    def off_by_one_percent(self):
        backward(self)
        self.parameters.grad[...] *= 1.01

    monkeypatch.setattr(VAE, "backward", off_by_one_percent)
    with pytest.raises(selfcheck.CheckFailed, match="element-wise"):
        selfcheck.check_gradients("numpy", "gaussian", quick=True)


def test_a_failing_check_is_named_in_the_last_line(monkeypatch, capsys):
    def no_progress(*args, **kwargs):
        raise selfcheck.CheckFailed("30 Adam steps, loss 500.0 -> 499.0: did not fall")

    def crashes(*args, **kwargs):
        raise RuntimeError("out of memory\nallocating 2 GiB")

    monkeypatch.setattr(selfcheck, "check_training", no_progress)
    monkeypatch.setattr(selfcheck, "step_throughput", crashes)
    monkeypatch.setattr(selfcheck, "check_gradients", lambda *a: "skipped here")
    monkeypatch.setattr(selfcheck, "check_fast_against_reference", lambda *a: "skipped here")
    status, lines = run_main(["--quick"], capsys)
    assert status == 1
    assert lines[-1] == "selfcheck: FAILED (training; step speed)"
    assert "  FAILED training: 30 Adam steps, loss 500.0 -> 499.0: did not fall" in lines
    assert "  FAILED step speed: RuntimeError: out of memory allocating 2 GiB" in lines
    assert not any("Traceback" in line for line in lines)


def test_cupy_without_cupy_is_one_failed_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    status, lines = run_main(["--backend", "cupy", "--quick"], capsys)
    assert status == 1
    assert "  CuPy:         not installed" in lines
    assert lines[-1].startswith("selfcheck: FAILED (backend 'cupy' is unavailable: CuPy is not "
                                "installed")
    assert 'pip install -e ".[gpu]"' in lines[-1]
    assert not any(line.startswith("  ok") for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(cuda_available(), reason="CuPy and a GPU are available here")
def test_cupy_without_a_gpu_fails_cleanly_from_the_shell(tmp_path):
    """What a user sees on a machine without a usable GPU: versions, then one FAILED line
    saying why and what to install; exit status 1; no traceback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "vae_np.selfcheck", "--backend", "cupy"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stderr == ""
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("selfcheck: FAILED (backend 'cupy' is unavailable: ")
    assert 'pip install -e ".[gpu]"' in last


def test_a_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        selfcheck.main(["--backend", "torch"])
    assert info.value.code == 2
