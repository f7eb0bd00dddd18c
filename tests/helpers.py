"""Helpers shared by the model tests (test_model.py, test_iwae.py, test_fast_paths.py): the
small problem's sizes, its data and noise, random biases off ReLU's kink, an independent MLP
forward, and a few training steps recorded with the fast paths on or off."""

from __future__ import annotations

import numpy as np

from vae_np import VAE, Adam
from vae_np.backend import use_fast_paths

C, H, D, N = 6, 5, 3, 4  # pixels, hidden width, latent size, batch


def jitter_biases(model, seed=0, scale=0.1):
    """Random biases: zero biases put whole dead layers' successors exactly on ReLU's kink,
    where a central difference sees half a slope (vae_np.gradcheck's docstring)."""
    rng = np.random.default_rng(1000 + seed)
    state = model.state_dict()
    for name in state:
        if name.endswith(".b"):
            state[name] = scale * rng.standard_normal(state[name].shape)
    model.load_state_dict(state)
    return model


def batch(n=N, c=C, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, c))


def noise(s, n=N, d=D, seed=1):
    return np.random.default_rng(seed).standard_normal((s, n, d))


def reference_mlp(state, prefix, h):
    """The MLP of ``state`` (a model's state_dict) under ``prefix``, written from the
    documented layout: Linear layers ``linear{i}`` with ReLU between them."""
    n_layers = sum(1 for name in state if name.startswith(prefix) and name.endswith(".W"))
    for i in range(n_layers):
        h = h @ state[f"{prefix}linear{i}.W"] + state[f"{prefix}linear{i}.b"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    return h


def run_training(fast: bool, dtype: str, decoder: str = "bernoulli", samples: int = 1,
                 steps: int = 3, batch: int = 10, input_dim: int = 50, hidden=(32, 24),
                 latent_dim: int = 6, activation: str = "relu", beta: float = 1.0,
                 clip_norm=None, seed: int = 0, objective: str = "vae") -> dict:
    """``steps`` Adam steps with the fast paths on or off; everything a step produces."""
    with use_fast_paths(fast):
        model = VAE(input_dim, hidden, latent_dim, decoder=decoder, samples=samples,
                    activation=activation, beta=beta, backend="numpy", dtype=dtype, seed=seed,
                    objective=objective)
        opt = Adam(model.parameters, lr=1e-2, clip_norm=clip_norm)
        data = np.random.default_rng(seed + 1)
        record = {"loss": [], "kl": [], "recon": [], "grads": []}
        for _ in range(steps):
            x = data.random((batch, input_dim)).astype(dtype)
            if decoder == "bernoulli":
                x = (x < 0.4).astype(dtype)
            eps = data.standard_normal((samples, batch, latent_dim)).astype(dtype)
            x_before, eps_before = x.copy(), eps.copy()
            terms = model.loss(x, eps=eps, check_finite=False)
            model.backward()
            # the fast path must not write into the caller's arrays
            assert np.array_equal(x, x_before) and np.array_equal(eps, eps_before)
            for name in ("loss", "kl", "recon"):
                record[name].append(np.asarray(getattr(terms, name)).item())
            record["grads"].append({k: v.copy() for k, v in model.parameters.grads.items()})
            opt.step()
        record["params"] = model.state_dict()
        record["m"], record["v"] = opt.m.copy(), opt.v.copy()
        return record


def assert_identical(fast: dict, reference: dict) -> None:
    for name in ("loss", "kl", "recon"):
        assert fast[name] == reference[name], name
    for step, (gf, gr) in enumerate(zip(fast["grads"], reference["grads"])):
        assert gf.keys() == gr.keys()
        for key in gr:
            assert gf[key].dtype == gr[key].dtype
            assert np.array_equal(gf[key], gr[key]), f"step {step}: gradient of {key}"
    for key in reference["params"]:
        assert np.array_equal(fast["params"][key], reference["params"][key]), key
    assert np.array_equal(fast["m"], reference["m"]) and np.array_equal(fast["v"], reference["v"])
