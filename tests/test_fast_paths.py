"""The fast variants of every op (beside their reference code in layers, likelihoods,
losses, model and optim) against that reference, to the last bit.

Tolerance: none. Each fast path performs the reference's IEEE-754 operations, in the same
order, on the same dtype, with every Python-float constant rounded to that dtype once (as
NumPy rounds a weak scalar); its matrix products are the same BLAS calls with the same
shapes, transposes and thread count, and only write to a different place. Every result is
therefore bit-identical, and these tests compare with exact equality (``==`` on losses,
``array_equal`` on arrays) -- in float32 and float64, for every decoder, with S = 1 and 3,
through several Adam steps, so that a reordered sum, a contracted multiply-add or a
constant rounded differently would fail. numba (the compiled Adam kernel) is optional: the
NumPy-only fallback is checked the same way, in this process and in one where numba cannot
be imported. No timing here: speed lives in benchmarks/.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vae_np.backend as backend_module
from vae_np import VAE, Adam
from vae_np.backend import get_backend, use_fast_paths
from vae_np.layers import MLP
from vae_np.likelihoods import Bernoulli
from vae_np.parameters import Parameters

from helpers import assert_identical, run_training

DECODERS = ("bernoulli", "gaussian", "gaussian-fixed")
DTYPES = ("float32", "float64")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# The whole step


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_step_is_bit_identical_to_the_reference(dtype, decoder, samples):
    reference = run_training(False, dtype, decoder, samples)
    fast = run_training(True, dtype, decoder, samples)
    assert_identical(fast, reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_step_at_the_benchmark_shapes(dtype):
    """The starting configuration's real layer sizes (784-512-512, latent 64), where BLAS
    takes its blocked, multi-threaded kernels."""
    kw = dict(input_dim=784, hidden=(512, 512), latent_dim=64, batch=64, steps=2)
    assert_identical(run_training(True, dtype, **kw), run_training(False, dtype, **kw))


@pytest.mark.parametrize("activation", ("tanh", "leaky_relu", "softplus", "sigmoid"))
def test_fast_step_with_other_activations(activation):
    """Activations other than ReLU run their reference forward/backward inside the fast MLP."""
    kw = dict(activation=activation, decoder="gaussian", samples=2)
    assert_identical(run_training(True, "float64", **kw), run_training(False, "float64", **kw))


def test_fast_step_with_beta_clipping_and_one_hidden_layer():
    kw = dict(beta=0.5, clip_norm=0.5, hidden=(40,), latent_dim=3, samples=3)
    assert_identical(run_training(True, "float32", **kw), run_training(False, "float32", **kw))


@settings(max_examples=20)
@given(batch=st.integers(1, 40), hidden=st.lists(st.integers(1, 48), min_size=1, max_size=3),
       latent=st.integers(1, 8), samples=st.integers(1, 3),
       decoder=st.sampled_from(DECODERS), dtype=st.sampled_from(DTYPES))
def test_fast_step_is_bit_identical_for_any_shape(batch, hidden, latent, samples, decoder, dtype):
    kw = dict(batch=batch, hidden=tuple(hidden), latent_dim=latent, input_dim=12, steps=2)
    assert_identical(run_training(True, dtype, decoder, samples, **kw),
                     run_training(False, dtype, decoder, samples, **kw))


# ------------------------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_mlp_matches_the_reference_forward_and_backward(dtype):
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(3)
    x = backend.asarray(rng.standard_normal((17, 30)))
    dout = backend.asarray(rng.standard_normal((17, 9)))
    results = []
    for fast in (False, True):
        mlp = MLP((30, 20, 20, 9), backend, np.random.default_rng(4))
        with use_fast_paths(fast):
            y = mlp.forward(x)
            dx = mlp.backward(dout)
        results.append((y, dx, {f"{i}{k}": g.copy() for i, lin in enumerate(mlp.linears)
                                for k, g in lin.grads.items()}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert np.array_equal(y0, y1) and np.array_equal(dx0, dx1)
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)


def test_skipping_the_input_gradient_changes_no_parameter_gradient(np64):
    rng = np.random.default_rng(5)
    x = np64.asarray(rng.standard_normal((6, 8)))
    dout = np64.asarray(rng.standard_normal((6, 3)))
    grads = []
    for input_grad in (True, False):
        mlp = MLP((8, 7, 3), np64, np.random.default_rng(6))
        mlp.forward(x)
        dx = mlp.backward(dout, input_grad=input_grad)
        assert (dx is None) == (not input_grad)
        grads.append([g.copy() for lin in mlp.linears for g in lin.grads.values()])
    assert all(np.array_equal(a, b) for a, b in zip(*grads))


def without_numba(monkeypatch):
    """Make ``Backend.numba`` report numba as missing (the NumPy-only fast variants)."""
    monkeypatch.setattr(backend_module, "_numba_module", None)
    assert get_backend("numpy", "float32").numba is None


@pytest.mark.parametrize("compiled", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_bernoulli_tail_matches_the_loss_function(dtype, compiled, monkeypatch):
    """Including logits far past float32's exp range and the row blocks of the tail."""
    from vae_np.losses import bernoulli_nll
    if compiled:
        pytest.importorskip("numba")
    else:
        without_numba(monkeypatch)
    monkeypatch.setattr(Bernoulli, "TAIL_BLOCK", 20)  # several blocks of one or two rows
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(7)
    logits = backend.asarray(np.concatenate([rng.standard_normal((5, 13)) * 4,
                                             np.full((1, 13), 60.0), np.full((1, 13), -60.0),
                                             np.full((1, 13), -0.0), np.full((1, 13), 0.0)]))
    x = backend.asarray((rng.random(logits.shape) < 0.5).astype(dtype))
    with use_fast_paths(False):
        nll, grad = Bernoulli().nll(x, logits)
    reference_nll, reference_grad = bernoulli_nll(x, logits)
    assert np.array_equal(nll, reference_nll) and np.array_equal(grad, reference_grad)
    fast_nll, fast_grad = Bernoulli().nll(x, logits)
    bits = f"u{np.dtype(dtype).itemsize}"  # signed zeros too
    assert np.array_equal(nll.view(bits), fast_nll.view(bits))
    assert np.array_equal(grad.view(bits), fast_grad.view(bits))
    # the gradient scaled by the model's 1 / (S N) as it is written
    fast_nll, fast_grad = Bernoulli().nll(x, logits, grad_scale=1.0 / 7)
    assert np.array_equal(nll, fast_nll) and np.array_equal(grad * (1.0 / 7), fast_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_relu_kernels_match_numpy_on_signed_zeros_and_nan(dtype):
    """bias + ReLU and ReLU's backward against numpy.maximum and where(), bit for bit, on
    the values where they could differ: -0.0, +0.0, NaN, +-inf."""
    compiled = pytest.importorskip("numba") and get_backend("numpy", dtype).numba
    special = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1.5, 2.5, 1e-45], dtype=dtype)
    y = np.tile(special, (3, 1)).copy()
    b = np.array([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, -2.5, 0.0], dtype=dtype)
    expected = np.maximum(y + b, 0.0)
    compiled.bias_relu(y, b)
    assert np.array_equal(y.view(f"u{y.itemsize}"), expected.view(f"u{y.itemsize}"))
    dout = np.tile(special[::-1], (3, 1)).copy()
    expected = np.where(y > 0, dout, 0.0)
    compiled.relu_backward(y, dout)
    assert np.array_equal(dout.view(f"u{y.itemsize}"), expected.view(f"u{y.itemsize}"))


def random_adam_buffers(dtype, n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 1, n)).astype(dtype)
             for _ in range(4)]
    return p, grads


class _FlatHolder:
    """A stand-in layer owning one flat parameter, so Adam can run on plain buffers."""

    def __init__(self, value):
        self.params, self.grads = {"w": value}, {}


def adam_on_buffer(backend, p, **kwargs):
    """(Parameters holding a copy of ``p``, an Adam over them)."""
    params = Parameters(backend, [("w", _FlatHolder(backend.asarray(p)), "w")])
    return params, Adam(params, **kwargs)


def reference_adam_step(p, g, m, v, t, lr, betas, eps):
    """optim.Adam._update_reference, written against plain buffers."""
    tiny = np.finfo(p.dtype).tiny
    m[...] = betas[0] * m + (1.0 - betas[0]) * g
    v[...] = betas[1] * v + (1.0 - betas[1]) * (g * g)
    m[...] = np.where(np.abs(m) < tiny, 0.0, m)
    v[...] = np.where(v < tiny, 0.0, v)
    m_hat = m / (1.0 - betas[0] ** t)
    v_hat = v / (1.0 - betas[1] ** t)
    p[...] = p - lr * m_hat / (np.sqrt(v_hat) + eps)


def adam_run(dtype, n, path, monkeypatch=None, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
    """Four Adam steps over n parameters through ``path``: reference, numba or numpy."""
    backend = get_backend("numpy", dtype)
    p, grads = random_adam_buffers(dtype, n)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    if path == "reference":
        for t, g in enumerate(grads, start=1):
            reference_adam_step(p, g, m, v, t, lr, betas, eps)
        return p, m, v
    if path == "numpy":
        without_numba(monkeypatch)
    params, opt = adam_on_buffer(backend, p, lr=lr, betas=betas, eps=eps)
    for g in grads:
        params.grad[...] = g
        opt.step()
    return params.data, opt.m, opt.v


@pytest.mark.parametrize("n", (1, 1000, Adam.CHUNK + 7, 3 * Adam.CHUNK))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_numpy_fallback_is_bit_identical(dtype, n, monkeypatch):
    """The chunked NumPy loop (no numba), across chunk boundaries."""
    for a, b in zip(adam_run(dtype, n, "numpy", monkeypatch), adam_run(dtype, n, "reference")):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("n", (1, 1000, 3 * Adam.CHUNK + 7))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_numba_kernel_is_bit_identical(dtype, n):
    pytest.importorskip("numba")
    assert get_backend("numpy", dtype).numba is not None
    for a, b in zip(adam_run(dtype, n, "numba"), adam_run(dtype, n, "reference")):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("samples", (1, 3))
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_step_without_numba_is_bit_identical(dtype, decoder, samples, monkeypatch):
    """The NumPy-only fast paths (Adam in chunks, the in-place tails, where() for ReLU)."""
    without_numba(monkeypatch)
    assert_identical(run_training(True, dtype, decoder, samples),
                     run_training(False, dtype, decoder, samples))


@pytest.mark.slow
def test_vae_np_trains_where_numba_cannot_be_imported():
    """A fresh process with numba blocked: the import works, Adam takes the NumPy loop,
    and the step equals the reference."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from vae_np import VAE, Adam, get_backend, use_fast_paths\n"
        "assert get_backend('numpy').numba is None\n"
        "out = []\n"
        "for fast in (True, False):\n"
        "    with use_fast_paths(fast):\n"
        "        m = VAE(20, (16,), 4, dtype='float32'); opt = Adam(m.parameters)\n"
        "        x = np.random.default_rng(0).random((5, 20)).astype('float32')\n"
        "        eps = np.random.default_rng(1).standard_normal((1, 5, 4)).astype('float32')\n"
        "        for _ in range(3):\n"
        "            m.loss(x, eps=eps); m.backward(); opt.step()\n"
        "        out.append(m.parameters.data.copy())\n"
        "assert np.array_equal(*out)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------------------------------------
# Where the fast paths run


def test_fast_paths_are_selected_by_backend_name():
    assert get_backend("numpy", "float32").fast
    assert not get_backend("array_api_strict", "float64").fast
    with use_fast_paths(False):
        assert not get_backend("numpy", "float32").fast
        assert get_backend("numpy", "float32").numba is None
    assert get_backend("numpy", "float32").fast


def test_array_api_strict_runs_the_reference_and_agrees_with_numpy(strict64, np64):
    """array_api_strict declines every fast path (the reference keeps the code portable);
    its step agrees with NumPy's fast step (same operations; strict wraps NumPy)."""
    params = []
    for backend in (strict64, np64):
        model = VAE(12, (10,), 3, backend=backend, seed=2)
        opt = Adam(model.parameters, lr=1e-2)
        x = backend.asarray(np.random.default_rng(0).random((4, 12)))
        eps = backend.asarray(np.random.default_rng(1).standard_normal((1, 4, 3)))
        assert backend.fast == (backend is np64)
        for _ in range(2):
            model.loss(x, eps=eps)
            model.backward()
            opt.step()
        params.append(backend.to_numpy(model.parameters.data))
    np.testing.assert_allclose(params[0], params[1], rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_environment_variable_switches_the_fast_paths_off():
    code = ("from vae_np import get_backend\n"
            "print(get_backend('numpy', 'float32').fast)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "VAE_NP_FAST_PATHS": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("objective, samples", [("vae", 1), ("iwae", 5)])
def test_training_step_reads_nothing_back_to_the_host(objective, samples, monkeypatch):
    """With check_finite=False, loss/backward/step never convert a backend array to a host
    number or array (on a GPU that would be a device-to-host synchronisation)."""
    from vae_np.backend import Backend

    def forbidden(*args, **kwargs):
        raise AssertionError("host read inside a training step")

    model = VAE(20, (16,), 4, samples=samples, objective=objective, dtype="float32")
    opt = Adam(model.parameters)
    rng = model.backend.rng(0)
    x = model.backend.asarray(np.random.default_rng(0).random((5, 20)))
    monkeypatch.setattr(Backend, "to_numpy", forbidden)
    monkeypatch.setattr(Backend, "to_float", forbidden)
    for _ in range(2):
        model.loss(x, rng=rng, check_finite=False)
        model.backward()
        opt.step()


# ------------------------------------------------------------------------------------------
# The numba step's own bookkeeping: many samples, its cache, what callers keep


@pytest.mark.parametrize("decoder", ("bernoulli", "gaussian"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_step_with_many_samples(dtype, decoder):
    """S = 9: the compiled sums over samples (dz and dz * eps) must add s = 0, 1, ... from
    zero, as NumPy's axis-0 sum does, also past eight terms (where NumPy's pairwise sum of
    a contiguous axis would regroup)."""
    kw = dict(samples=9, batch=5, steps=2)
    assert_identical(run_training(True, dtype, decoder, **kw),
                     run_training(False, dtype, decoder, **kw))


def test_backward_reads_the_fast_cache_with_fast_paths_switched_off():
    """An MLP's fused forward leaves a record only its fused backward reads: backward
    follows what its forward did, not the switch."""
    grads = []
    for fast_loss in (False, True):
        model = VAE(20, (16,), 4, dtype="float32", seed=1)
        x = np.random.default_rng(0).random((5, 20)).astype("float32")
        eps = np.random.default_rng(1).standard_normal((1, 5, 4)).astype("float32")
        with use_fast_paths(fast_loss):
            model.loss(x, eps=eps)
        with use_fast_paths(False):
            model.backward()
        grads.append(model.parameters.grad.copy())
    assert np.array_equal(*grads)


@pytest.mark.parametrize("decoder", DECODERS)
def test_results_handed_to_the_caller_survive_later_steps(decoder):
    """Loss terms, encodings and reconstructions returned to the caller are not buffers
    that a later loss, backward or update writes into."""
    model = VAE(30, (20,), 4, decoder=decoder, dtype="float32", seed=0)
    opt = Adam(model.parameters, lr=1e-2)
    data = np.random.default_rng(0)
    x = data.random((6, 30)).astype("float32")
    kept = []
    for _ in range(3):
        terms = model.loss(x, eps=data.standard_normal((1, 6, 4)).astype("float32"))
        mu, logvar = model.encode(x)
        recon = model.reconstruct(x)
        decoded = model.decode(mu)
        arrays = [terms.loss, terms.kl, terms.recon, mu, logvar, recon, decoded]
        kept.append((arrays, [np.array(a, copy=True) for a in arrays]))
        model.backward()
        opt.step()
    model.loss(x[:4], eps=data.standard_normal((1, 4, 4)).astype("float32"))
    for arrays, copies in kept:
        for a, c in zip(arrays, copies):
            assert np.array_equal(np.asarray(a), c)


# ------------------------------------------------------------------------------------------
# Adam's moments never go subnormal


def adam_buffers_with_dead_lanes(dtype, n, seed=0):
    """Adam state where a third of the lanes are 'dead' (g = +-0 every step, a first
    moment already tiny, subnormal, of either sign, or the last normals), plus a sprinkling
    of other small values: tiny gradients (their square underflows), subnormal v and p,
    zero p, and NaN in one gradient lane."""
    rng = np.random.default_rng(seed)
    info = np.finfo(dtype)
    p = (rng.standard_normal(n) * 0.05).astype(dtype)
    m = (rng.standard_normal(n) * 1e-4).astype(dtype)
    v = (rng.random(n) * 1e-7).astype(dtype)
    dead = rng.random(n) < 0.35
    m[dead] = (rng.integers(-3000, 3000, dead.sum()) * info.smallest_subnormal).astype(dtype)
    few = lambda fraction: rng.random(n) < fraction  # noqa: E731
    m[few(0.01) & dead] = info.tiny * 1.05                   # the last normals, heading down
    m[few(0.01) & dead] = -info.tiny * 3
    p[few(3e-3)] = info.smallest_subnormal * 7
    p[few(3e-3)] = -0.0
    v[few(3e-3)] = info.smallest_subnormal * 3
    tiny_g = few(3e-3) & ~dead
    return p, m, v, dead, tiny_g


def adam_gradients(dtype, n, dead, tiny_g, step, seed=1):
    rng = np.random.default_rng((seed, step))
    g = (rng.standard_normal(n) * 1e-3).astype(dtype)
    g[dead] = np.where(rng.random(dead.sum()) < 0.5, 0.0, -0.0).astype(dtype)
    g[tiny_g] = np.sqrt(np.finfo(dtype).tiny) / 8        # its square is subnormal
    return g


def subnormal_count(a) -> int:
    return int(np.count_nonzero((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)))


@pytest.mark.parametrize("path", ("numba", "numpy", "reference-object"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_flushes_subnormal_moments_on_every_path(dtype, path, monkeypatch):
    """Through dead lanes, tiny gradients and subnormal inputs, every path gives the
    reference's bits (signed zeros included) and no moment is subnormal after a step."""
    if path == "numba":
        pytest.importorskip("numba")
    elif path == "numpy":
        without_numba(monkeypatch)
    n = 3 * Adam.CHUNK // 2 + 123 if path == "numpy" else 5000
    backend = get_backend("numpy", dtype)
    p, m, v, dead, tiny_g = adam_buffers_with_dead_lanes(dtype, n)
    assert subnormal_count(m) > n // 10                       # the start is subnormal
    ref = [p.copy(), m.copy(), v.copy()]
    betas, lr, eps = (0.9, 0.999), 1e-3, 1e-8
    params, opt = adam_on_buffer(backend, p, lr=lr, betas=betas, eps=eps)
    opt.m[...], opt.v[...] = m, v
    for t in range(1, 31):
        g = adam_gradients(dtype, n, dead, tiny_g, t)
        params.grad[...] = g
        if path == "reference-object":
            with use_fast_paths(False):
                opt.step()
        else:
            opt.step()
        reference_adam_step(ref[0], g, ref[1], ref[2], t, lr, betas, eps)
        bits = f"u{np.dtype(dtype).itemsize}"
        for fast, reference in zip((params.data, opt.m, opt.v), ref):
            assert np.array_equal(fast.view(bits), reference.view(bits)), f"step {t}"
        assert subnormal_count(opt.m) == 0 and subnormal_count(opt.v) == 0, f"step {t}"
    assert np.count_nonzero(opt.m[dead] == 0) == dead.sum()  # the dead lanes' moments are 0


def test_adam_keeps_nan_moments_visible():
    """The flush compares |m| < tiny, which is false for NaN: a NaN gradient still shows up
    as NaN (and the trainer's divergence check sees it) instead of being zeroed."""
    backend = get_backend("numpy", "float64")
    for fast in (True, False):
        params, opt = adam_on_buffer(backend, np.zeros(4))
        params.grad[...] = [np.nan, 1.0, 0.0, -1.0]
        with use_fast_paths(fast):
            opt.step()
        assert np.isnan(opt.m[0]) and np.isnan(opt.v[0]) and np.isnan(params.data[0])
