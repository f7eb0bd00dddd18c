"""vae_np.objectives: each objective as an object, on its own, without a VAE.

``forward(x, mu, logvar, eps, decode)`` and ``backward(step, decode_backward)`` are driven
here with a fixed linear decoder (no parameters), so the check covers exactly what the
objective owns: the reparameterisation, the likelihood, the KL or the importance weights,
and the gradient into (mu, logvar). Gradients by central differences in float64 at the
package tolerance (gradcheck.DEFAULT_TOLERANCE, 1e-6: the differences reach ~1e-9 here,
a wrong term is off by O(1)). The same objects inside the VAE are checked by
tests/test_model.py and tests/test_iwae.py."""

from __future__ import annotations

import numpy as np
import pytest

from vae_np import VAE, gradcheck
from vae_np.likelihoods import make_likelihood
from vae_np.objectives import ELBO, IWAE, OBJECTIVES, make_objective

N, D, C, S = 4, 3, 5, 3


def _problem(decoder: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((N, C))
    mu, logvar = rng.normal(size=(N, D)), 0.3 * rng.normal(size=(N, D))
    eps = rng.normal(size=(S, N, D))
    width = C * make_likelihood(decoder).outputs_per_pixel
    W = rng.normal(size=(D, width)) / np.sqrt(D)
    return x, mu, logvar, eps, W


def _check(objective, decoder, record_check):
    x, mu, logvar, eps, W = _problem(decoder)
    decoded = []

    def decode(z_rows):                         # (S N, d) -> (S N, outputs)
        decoded.append(z_rows.shape)
        return z_rows @ W

    def f():
        return float(objective.forward(x, mu, logvar, eps, decode)[0].loss)

    terms, step = objective.forward(x, mu, logvar, eps, decode)
    dmu, dlogvar = objective.backward(step, lambda dout: dout @ W.T)
    assert decoded[0] == (S * N, D) and dmu.shape == dlogvar.shape == (N, D)
    report = gradcheck.check_gradients(f, {"mu": mu, "logvar": logvar},
                                       {"mu": dmu, "logvar": dlogvar},
                                       title=f"{objective.name} objective")
    record_check(f"objective {objective.name}", report.max_rel_error)
    assert report.passed, report.table()
    return terms


@pytest.mark.parametrize("decoder", ("bernoulli", "gaussian", "gaussian-fixed"))
def test_elbo_forward_and_backward_on_their_own(decoder, record_check):
    terms = _check(ELBO(make_likelihood(decoder), beta=0.7), decoder, record_check)
    np.testing.assert_allclose(float(terms.loss), float(terms.recon) + 0.7 * float(terms.kl),
                               rtol=1e-12)


@pytest.mark.parametrize("decoder", ("bernoulli", "gaussian", "gaussian-fixed"))
def test_iwae_forward_and_backward_on_their_own(decoder, record_check):
    terms = _check(IWAE(make_likelihood(decoder)), decoder, record_check)
    np.testing.assert_allclose(float(terms.loss), float(terms.recon) + float(terms.kl),
                               rtol=1e-12)


def test_make_objective_picks_by_name_and_refuses_beta_with_iwae():
    likelihood = make_likelihood("bernoulli")
    assert [type(make_objective(name, likelihood)) for name in OBJECTIVES] == [ELBO, IWAE]
    assert [make_objective(name, likelihood).name for name in OBJECTIVES] == list(OBJECTIVES)
    with pytest.raises(ValueError, match=r"^beta: the iwae objective has no KL term"):
        make_objective("iwae", likelihood, beta=0.5)
    with pytest.raises(ValueError, match=r"^objective: expected one of vae, iwae, got 'elbo'"):
        make_objective("elbo", likelihood)


def test_the_vae_runs_the_objective_it_was_built_with(monkeypatch):
    """The choice is made once, at construction: loss and backward call that object's
    forward and backward (patched on the class here), whatever the objective's name."""
    calls = []
    for cls in (ELBO, IWAE):
        for method in ("forward", "backward"):
            original = getattr(cls, method)

            def spy(self, *args, _original=original, _name=f"{cls.__name__}.{method}"):
                calls.append(_name)
                return _original(self, *args)
            monkeypatch.setattr(cls, method, spy)
    x = np.random.default_rng(0).random((N, C))
    for objective, expected in (("vae", "ELBO"), ("iwae", "IWAE")):
        calls.clear()
        model = VAE(C, (4,), D, samples=2, objective=objective)
        model.loss(x, rng=model.backend.rng(0))
        model.backward()
        assert calls == [f"{expected}.forward", f"{expected}.backward"]
