"""Helpers shared by the tests: the small model problem's sizes, its data and noise, random
biases off ReLU's kink, an independent MLP forward, and a few training steps recorded with
the fast paths on or off (test_model.py, test_iwae.py, test_fast_paths.py); the rounding
bound of two evaluations of a network (test_export.py, test_export_conv.py); and one factory
per kind of test object: ``tiny_vae`` (a small model), ``tiny_config`` (a TrainConfig that
trains in seconds), ``synthetic_dataset`` (a tiny Dataset); and MNIST's files made up:
``idx_bytes`` (an array in the IDX format), ``publish_mnist_sum`` and ``write_mnist_folder``
(the four files, their sums made the published ones). A test file binds its own settings
once with ``functools.partial``."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np

from numpy.lib.stride_tricks import sliding_window_view

from vae_np import VAE, Adam
from vae_np.backend import use_fast_paths
from vae_np.conv import Conv2d, Flatten, MaxPool2d, Unflatten, Upsample
from vae_np.layers import LeakyReLU, Linear, ReLU, Sigmoid, Softplus, Tanh
from vae_np import data as vae_data
from vae_np.data import Dataset
from vae_np.train import TrainConfig

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


def tiny_vae(decoder="bernoulli", samples=1, beta=1.0, *, backend="numpy", dtype="float64",
             seed=0, jitter=True, **kwargs) -> VAE:
    """A small VAE: C inputs, one hidden layer of H, D latents, float64 on NumPy (``kwargs``:
    any other VAE argument, or these changed); "gaussian-fixed" gets variance 0.3 unless
    ``variance`` is given (None: VAE's default).

    ``jitter``: random biases (``jitter_biases(model, seed)``). Biases start at exactly 0, so
    wherever a whole hidden layer is dead (all ReLUs off) the next pre-activation is exactly
    0: the ReLU kink, where a central difference sees half a slope and any gradient check
    fails for a right gradient. Random biases keep every pre-activation away from the kink
    (and make a forward reference see the biases).
    """
    kwargs.setdefault("input_dim", C)
    kwargs.setdefault("hidden", (H,))
    kwargs.setdefault("latent_dim", D)
    if decoder == "gaussian-fixed":
        kwargs.setdefault("variance", 0.3)
    model = VAE(decoder=decoder, samples=samples, beta=beta, backend=backend, dtype=dtype,
                seed=seed, **kwargs)
    return jitter_biases(model, seed) if jitter else model


def tiny_config(**changes) -> TrainConfig:
    """A TrainConfig that trains a tiny model in seconds (``changes``: any other field, or
    these changed): one hidden layer of 8, 2 latents, 2 epochs of batches of 10, lr 3e-3,
    ln p(x) with K = 4 in batches of 8, a log line every 2 batches."""
    values = dict(hidden=(8,), latent_dim=2, batch_size=10, epochs=2, lr=3e-3,
                  eval_samples=4, eval_batch_size=8, log_every=2)
    values.update(changes)
    return TrainConfig(**values)


def synthetic_dataset(n_train: int, n_test: int, pattern: str = "prototypes", *,
                      classes: int = 4, side: int = 28, seed: int = 0, labels: bool = True,
                      flat: bool = False) -> Dataset:
    """A Dataset of ``side`` x ``side`` greyscale images in [0, 1] with labels in
    0..classes-1: the first ``n_train`` drawn are the training set, the next ``n_test`` the
    test set. ``pattern``:

    - "prototypes": ``classes`` random binary images (a quarter of the pixels on); each image
      is one of them at 0.85 plus grey noise up to 0.15, so a few epochs visibly lower the loss;
    - "bands": class c lights band c of the rows at 0.9 over grey noise up to 0.1, so the
      label shows in the image (the conditional tests);
    - "noise": uniform noise, labels drawn independently: data with no structure, for tests
      that compare two runs' numbers.

    ``labels=False``: no labels (and no num_classes); ``flat``: no image shape.
    """
    rng, n, pixels = np.random.default_rng(seed), n_train + n_test, side * side
    if pattern == "prototypes":
        prototypes = (rng.random((classes, pixels)) < 0.25).astype(np.float32)
        y = rng.integers(0, classes, n)
        x = np.clip(0.85 * prototypes[y] + 0.15 * rng.random((n, pixels)), 0, 1)
    elif pattern == "bands":
        y = rng.integers(0, classes, n)
        x = 0.1 * rng.random((n, side, side)).astype(np.float32)
        band = side // classes
        for i, c in enumerate(y):
            x[i, band * c:band * (c + 1), :] = 0.9
        x = x.reshape(n, pixels)
    elif pattern == "noise":
        x = rng.random((n, pixels)).astype(np.float32)
        y = rng.integers(0, classes, n)
    else:
        raise ValueError(f"pattern: expected 'prototypes', 'bands' or 'noise', got {pattern!r}")
    y_train, y_test = (y[:n_train], y[n_train:]) if labels else (None, None)
    return Dataset(x[:n_train], y_train, x[n_train:], y_test, source="synthetic",
                   description=f"synthetic {pattern} (test data)",
                   image_shape=None if flat else (side, side),
                   num_classes=classes if labels else None)


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


# ------------------------------------------------------------------------------------------
# The tolerance: two evaluations of one network in floating point


ACTIVATIONS = {  # float64 reference and Lipschitz constant
    ReLU: (lambda layer, h: np.maximum(h, 0.0), 1.0),
    LeakyReLU: (lambda layer, h: np.where(h > 0, h, layer.slope * h), 1.0),
    Tanh: (lambda layer, h: np.tanh(h), 1.0),
    Sigmoid: (lambda layer, h: 0.5 + 0.5 * np.tanh(0.5 * h), 0.25),
    Softplus: (lambda layer, h: np.maximum(h, 0.0) + np.log1p(np.exp(-np.abs(h))), 1.0),
}


def _host(layer, key):
    return np.asarray(layer.backend.to_numpy(layer.params[key]), np.float64)


def _correlate(h, w, stride, padding):
    """float64 cross-correlation of h (N, C, H, W) with w (O, C, kh, kw), from windows."""
    (ph, pw), (sh, sw) = padding, stride
    padded = np.pad(h, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(padded, w.shape[2:], axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("ncpqij,ocij->nopq", windows, w)


def _bound_step(layer, h, err, eps):
    """(h, err) after ``layer``: h the float64 value, err the elementwise bound."""
    if isinstance(layer, (Linear, Conv2d)):
        w, b = _host(layer, "W"), _host(layer, "b")
        if isinstance(layer, Linear):
            n, apply = w.shape[0] + 1, (lambda a, m: a @ m)
            bias = b
        else:
            n = int(np.prod(w.shape[1:])) + 1
            apply = (lambda a, m: _correlate(a, m, layer.stride, layer.padding))
            bias = b[:, None, None]
        gamma = n * eps / (1 - n * eps)
        err = np.sqrt(apply(err ** 2, w ** 2)) \
            + 2 * gamma * (apply(np.abs(h) + err, np.abs(w)) + np.abs(bias))
        return apply(h, w) + bias, err
    if type(layer) in ACTIVATIONS:
        f, lipschitz = ACTIVATIONS[type(layer)]
        h = f(layer, h)
        return h, lipschitz * err + 16 * eps * (np.abs(h) + 1)
    if isinstance(layer, MaxPool2d):      # |max a - max b| <= max |a - b|; max rounds nothing
        k = layer.kernel_size
        pool = lambda a: a.reshape(*a.shape[:2], a.shape[2] // k, k, a.shape[3] // k, k) \
            .max(axis=(3, 5))
        return pool(h), pool(err)
    if isinstance(layer, Upsample):       # copies
        f = layer.scale_factor
        copy = lambda a: a.repeat(f, axis=2).repeat(f, axis=3)
        return copy(h), copy(err)
    if isinstance(layer, (Flatten, Unflatten)):   # a permutation: the layer's own, exact
        return layer(h), layer(err)
    if hasattr(layer, "layers"):
        return _network_bound(layer, h, err, eps)
    raise TypeError(f"rounding_bound: no bound for {type(layer).__name__}")


def _network_bound(network, h, err, eps):
    side = getattr(network, "extra_features", 0)
    if side:
        h, extras = h[:, :-side], h[:, -side:]
        err, extras_err = err[:, :-side], err[:, -side:]
    for i, layer in enumerate(network.layers):
        if side and i == network.extra_at:
            h = np.concatenate([h, extras], axis=1)
            err = np.concatenate([err, extras_err], axis=1)
        h, err = _bound_step(layer, h, err, eps)
    return h, err


def rounding_bound(network, h, eps, shift=0.0, err=None):
    """An elementwise tolerance for |a - b|, a and b two evaluations of ``network`` (an MLP
    or a Sequential, side inputs last in ``h`` as it takes them) on the input ``h`` (M,
    D_0) in arithmetic with unit roundoff ``eps`` (``err``: how far their inputs already
    differ, default the one rounding of ``h - shift``).

    Each Linear output is a dot product of length n = D_in (+ 1 for the bias), each Conv2d
    output one of length n = C kh kw + 1; computed in any order (blocked, vectorised, with
    FMA, im2col) it is within gamma_n |x|.|w| of the exact value, gamma_n = n eps / (1 - n
    eps) (Higham, Accuracy and Stability of Numerical Algorithms, eq. 3.5): the "n eps |x|
    |W|" reassociation bound, twice for two evaluations. What the inputs already differed
    by is carried through W as independent errors, sqrt(err^2 @ W^2) (rounding errors of
    different dot products are uncorrelated; carrying them as err @ |W|, all aligned, would
    grow a 784-512-512 encoder's tolerance to 0.5, useless). The activations are Lipschitz
    (constant L) and each computed to a few ulps: 8 eps (|y| + 1) per side covers
    vectorised exp / tanh. Max-pooling, upsampling and (un)flattening round nothing (a max
    moves by at most its inputs' largest error; the others copy). The result is about 1e3
    times the differences seen (those are ~ sqrt(n) eps), and 1e-3 of what a real mistake
    moves (a transposed weight, a lost bias, a wrong slope, shift or layout: O(|W|)).
    """
    h = np.asarray(h, dtype=np.float64) - shift
    err = 2 * eps * np.abs(h) if err is None else err
    return _network_bound(network, h, err, eps)[1]


def unit_roundoff(dtype):
    return np.finfo(dtype).eps / 2


def assert_within(actual, reference, bound, what):
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, what
    excess = np.abs(actual - reference) - bound
    assert np.all(excess <= 0), f"{what}: off by {np.max(np.abs(actual - reference)):.3g}, " \
                                f"the rounding bound allows {bound.flat[np.argmax(excess)]:.3g}"


# ------------------------------------------------------------------------------------------
# MNIST's files, made up

IDX_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D,
             "float64": 0x0E}


def idx_bytes(arr) -> bytes:
    """IDX encoding of ``arr``: 0x0000, type code, ndim, big-endian u32 dims, big-endian payload."""
    arr = np.asarray(arr)
    header = bytes([0, 0, IDX_CODES[arr.dtype.name], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def publish_mnist_sum(monkeypatch, name, content) -> None:
    """Make ``content`` (raw IDX bytes) the published content of MNIST file ``name``."""
    monkeypatch.setitem(vae_data.MNIST_SHA256, name, hashlib.sha256(content).hexdigest())


def write_mnist_folder(directory, arrays, monkeypatch) -> dict[str, bytes]:
    """The four MNIST files of ``arrays`` (role -> uint8 array: ``train_images`` (N, 28, 28),
    ``train_labels`` (N,), ``test_images``, ``test_labels``, the roles of
    ``vae_np.data.MNIST_FILES``), gzipped, into ``directory``, the sums of their IDX content
    made the published ones (so verification passes). Returns {file name: gz bytes}."""
    blobs = {}
    for role, name in vae_data.MNIST_FILES.items():
        content = idx_bytes(arrays[role])
        blobs[name] = gzip.compress(content, mtime=0)
        publish_mnist_sum(monkeypatch, name, content)
        (directory / name).write_bytes(blobs[name])
    return blobs
