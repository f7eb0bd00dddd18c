"""benchmarks/bench_step.py's floor of the importance-sampled ln p(x): its flop count is the
matrix products ``VAE.log_likelihood`` computes, counted here by hand for tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

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
