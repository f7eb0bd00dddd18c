"""benchmarks/bench_step.py's floor of the importance-sampled ln p(x): its flop count is the
matrix products ``VAE.log_likelihood`` computes, counted here by hand for tiny models; and
the scripts' helpers (the forced-kernel note, bench_gemm's run without another BLAS)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from vae_np import VAE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_step  # noqa: E402


@pytest.mark.parametrize("hidden, encoder_madds, decoder_madds", [
    # 6 -> 5 -> [mu, logvar] 6; 3 -> 5 -> 6 logits
    ((5,), 6 * 5 + 5 * 6, 3 * 5 + 5 * 6),
    # 6 -> 5 -> 4 -> 6; 3 -> 4 -> 5 -> 6
    ((5, 4), 6 * 5 + 5 * 4 + 4 * 6, 3 * 4 + 4 * 5 + 5 * 6),
])
def test_log_likelihood_flops_are_the_hand_count(hidden, encoder_madds, decoder_madds):
    model = VAE(6, hidden, 3, seed=0)
    images, samples = 4, 7
    # the encoder once per image, the decoder once per (sample, image); 2 flops a madd
    expected = 2 * images * encoder_madds + 2 * samples * images * decoder_madds
    assert bench_step.log_likelihood_flops(model, images, samples) == expected


def test_log_likelihood_flops_refuse_a_conv_model():
    model = VAE(architecture="conv", image_shape=(8, 8), channels=(2, 3), hidden=(4,),
                latent_dim=2)
    with pytest.raises(TypeError, match="model"):
        bench_step.log_likelihood_flops(model, 1, 1)


def test_a_forced_openblas_kernel_is_named_with_the_way_out(monkeypatch, capsys):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    bench_step.note_forced_blas_kernel()
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    bench_step.note_forced_blas_kernel()
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "OPENBLAS_CORETYPE=Haswell" in printed
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in printed


def test_bench_gemm_measures_numpy_alone_when_no_other_blas_is_installed(monkeypatch, capsys):
    """Without MKL or blis it still times the step's products (it used to stop), and each
    layer's line and the totals appear once per batch."""
    import bench_gemm
    monkeypatch.setattr(bench_gemm, "load_mkl", lambda: (None, None))
    monkeypatch.setattr(bench_gemm, "load_blis", lambda threads: None)
    monkeypatch.setattr(bench_gemm, "matmul_peak", lambda backend: 1.0)   # no 2048^2 products
    monkeypatch.setattr(bench_gemm.time, "sleep", lambda seconds: None)
    assert bench_gemm.main(["--threads", "1", "--batches", "2,3"]) == 0
    printed = capsys.readouterr().out
    assert "NumPy's BLAS alone" in printed and "results differ" not in printed
    for batch in (2, 3):
        layer_lines = [line for line in printed.splitlines()
                       if line.startswith(f"batch {batch:3d}  ") and "all six" not in line]
        assert len(layer_lines) == len(bench_gemm.LAYERS)
        assert all("input grad transposed" in line for line in layer_lines)
        assert printed.count(f"batch {batch:3d}  all six layers: numpy ") == 1


def test_bench_gemm_interleaves_every_case_in_every_block(monkeypatch):
    import bench_gemm
    calls = []

    def recording(name):
        def matmul(a, b, out):
            calls.append(name)
            return out
        return matmul

    operands = (np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), (2, 4))
    pauses = []
    monkeypatch.setattr(bench_gemm.time, "sleep", pauses.append)
    p, q = recording("p"), recording("q")
    best = bench_gemm.interleaved_best({"p1": (p, operands), "q": (q, operands),
                                        "p2": (p, operands)}, blocks=3, calls=2)
    assert set(best) == {"p1", "p2", "q"} and all(0 <= ms < float("inf") for ms in best.values())
    # one library's cases back to back, the libraries in rotating order, and a pause long
    # enough for the other library's threads to sleep before each library's turn
    assert calls == ["p"] * 4 + ["q"] * 2 + ["q"] * 2 + ["p"] * 4 + ["p"] * 4 + ["q"] * 2
    assert pauses == [bench_gemm.SETTLE_SECONDS] * 6 and bench_gemm.SETTLE_SECONDS >= 0.25


@pytest.mark.parametrize("batch", [1, 3, 32])
def test_bench_layout_prototypes_compute_the_same_gradients(batch):
    """The feature-major prototype bench_layout.py times is the batch-major step's math:
    all gradients agree to float32 rounding. The tolerance: sums of up to 784 float32
    products round to a few 1e-7 of their scale; a wrong transpose, mask or KL term in
    either layout moves gradients by order 1 of the largest."""
    import bench_layout
    assert bench_layout.layout_gradient_gap(batch) < 1e-4


def test_interleaved_ratios_pair_each_round_so_a_drifting_machine_cancels(monkeypatch):
    """On a fake clock whose speed changes from round to round (factors 1-9), side "a"
    costs half of "b", and once (round 3) "b" is 10 % slower on its own: each round's pair
    gives 0.5 but that once, whatever the drift, so the samples come back in round order
    and paired_ratio pairs them by round."""
    factors = [1.0, 4.0, 1.5, 9.0, 2.0]
    extra_b = {3: 1.1}
    clock = {"now": 0.0, "sleeps": 0}
    monkeypatch.setattr(bench_step.time, "perf_counter", lambda: clock["now"])

    def sleep(seconds):       # each side of a round starts with one settle pause
        clock["sleeps"] += 1
    monkeypatch.setattr(bench_step.time, "sleep", sleep)

    def costing(ms, side):
        def step():
            rnd = (clock["sleeps"] - 1) // 2         # -1: the block-sizing pass
            factor = factors[rnd] if rnd >= 0 else 1.0
            clock["now"] += ms / 1e3 * factor * (extra_b.get(rnd, 1.0) if side == "b" else 1.0)
        return step

    samples = {}
    medians = bench_step.time_interleaved(
        {"a": costing(1.0, "a"), "b": costing(2.0, "b")}, {"a": lambda: None, "b": lambda: None},
        rounds=len(factors), block_seconds=0.0, settle_seconds=0.0, samples=samples)
    assert set(samples) == {"a", "b"} and all(len(v) == len(factors) for v in samples.values())
    assert samples["a"] == pytest.approx(factors)         # ms, round order
    assert medians["a"] == pytest.approx(2.0)
    median, lo, hi = bench_step.paired_ratio(samples["a"], samples["b"])
    assert median == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert lo == pytest.approx(0.5 / 1.1)
    with pytest.raises(ValueError):   # rounds of unequal count are not paired silently
        bench_step.paired_ratio([1.0, 2.0], [1.0])


def test_bench_layout_runs_and_reports_both_parts(monkeypatch, capsys):
    import bench_gemm
    import bench_layout
    monkeypatch.setattr(bench_gemm.time, "sleep", lambda seconds: None)   # bench_step's too
    assert bench_layout.main(["--threads", "1", "--batches", "2", "--rounds", "1",
                              "--block-seconds", "0.001"]) == 0
    printed = capsys.readouterr().out
    products = [line for line in printed.splitlines() if "products:" in line]
    steps = [line for line in printed.splitlines() if "prototype step:" in line]
    assert len(products) == 1 and "batch-major" in products[0] and "feature-major" in products[0]
    assert len(steps) == 1 and "ratio median" in steps[0]


def test_batch_sizes_take_positive_integers_and_name_what_else_they_got():
    import argparse
    assert bench_step.batch_sizes("32,128") == [32, 128]
    assert bench_step.batch_sizes("20, 512,") == [20, 512]
    for bad in ("", "0", "32,-1", "x", "3.5", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
            bench_step.batch_sizes(bad)


def test_aging_batches_switch_edge_pixels_on_now_and_then():
    """The aged state's data: every batch fresh, the centre on about half the time, the
    edges rarely but not never (a fixed all-zero border aged every edge weight at once and
    hid Adam's flush window, benchmarks/README.md)."""
    rng = np.random.default_rng(0)
    batches = np.stack([bench_step.mnist_like_batch(32, rng) for _ in range(200)])
    assert set(np.unique(batches)) <= {0.0, 1.0}
    assert not np.array_equal(batches[0], batches[1])
    on = batches.reshape(-1, 28, 28).mean(axis=0)
    assert 0.4 < on[13:15, 13:15].mean() < 0.6
    edges = np.concatenate([on[0], on[-1], on[:, 0], on[:, -1]])
    assert 0.0005 < edges.min() and edges.max() < 0.1


def test_moments_in_the_flush_window_are_those_between_tiny_and_tiny_over_lr():
    backend = bench_step.get_backend("numpy", "float32")
    tiny = np.finfo(np.float32).tiny

    class Opt:
        lr = 1e-3
        m = np.array([0.0, tiny / 2, tiny, -tiny * 999, tiny * 1001, 1.0, -tiny],
                     dtype=np.float32)

    # tiny, -999 tiny and -tiny are in [tiny, tiny / lr); 1001 tiny is above, tiny / 2 below
    assert bench_step.moments_in_flush_window(backend, Opt) == 3
