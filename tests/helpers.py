"""Helpers shared by the model tests (test_model.py, test_iwae.py): the small problem's
sizes, its data and noise, random biases off ReLU's kink, and an independent MLP forward."""

from __future__ import annotations

import numpy as np

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
