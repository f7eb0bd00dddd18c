"""The fast twins of every op (``backend.fast_twin``: the reference in layers, losses, optim
and objectives, its twins in _twins_cpu and _twins_cuda) against that reference, to the
last bit.

Tolerance: none. Each fast path performs the reference's IEEE-754 operations, in the same
order, on the same dtype, with every Python-float constant rounded to that dtype once (as
NumPy rounds a weak scalar); its matrix products are the same BLAS calls with the same
shapes, transposes and thread count, and only write to a different place. Every result is
therefore bit-identical, and these tests compare with exact equality (``==`` on losses,
``array_equal`` on arrays) -- in float32 and float64, for every decoder, with S = 1 and 3,
through several Adam steps, so that a reordered sum, a contracted multiply-add or a
constant rounded differently would fail. Every op with a CPU twin is also compared alone
(``test_every_cpu_twin_is_bit_identical_to_its_reference``). numba (the CPU twins) is
optional: without it the references run, checked in a process where numba cannot be
imported. No timing here: speed lives in benchmarks/.
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

from vae_np import VAE, Adam
from vae_np.backend import FAST_OPS, _twin_table, fast_paths_enabled, get_backend, use_fast_paths
from vae_np.layers import MLP
from vae_np.likelihoods import Bernoulli
from vae_np.parameters import Parameters
from vae_np.optim import adam_update

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


@pytest.mark.parametrize("batch", (32, 64))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_step_at_the_benchmark_shapes(dtype, batch):
    """The starting configuration's real layer sizes (784-512-512, latent 64), where BLAS
    takes its blocked, multi-threaded kernels; at a batch under layers.SHORT_BATCH and at
    one that is not (the input gradients' two orientations)."""
    kw = dict(input_dim=784, hidden=(512, 512), latent_dim=64, batch=batch, steps=2)
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_bernoulli_tail_matches_the_loss_function(dtype, monkeypatch):
    """Including logits far past float32's exp range and the row blocks of the CPU twin."""
    from vae_np.losses import bernoulli_nll
    twins = pytest.importorskip("vae_np._twins_cpu")
    monkeypatch.setattr(twins, "BERNOULLI_BLOCK", 20)  # several blocks of one or two rows
    backend = get_backend("numpy", dtype)
    rng = np.random.default_rng(7)
    logits = backend.asarray(np.concatenate([rng.standard_normal((5, 13)) * 4,
                                             np.full((1, 13), 60.0), np.full((1, 13), -60.0),
                                             np.full((1, 13), -0.0), np.full((1, 13), 0.0)]))
    x = backend.asarray((rng.random(logits.shape) < 0.5).astype(dtype))
    with use_fast_paths(False):
        nll, grad = Bernoulli().nll(x, logits)
    reference_nll, reference_grad = bernoulli_nll.reference(x, logits)
    assert np.array_equal(nll, reference_nll) and np.array_equal(grad, reference_grad)
    fast_nll, fast_grad = Bernoulli().nll(x, logits)
    bits = f"u{np.dtype(dtype).itemsize}"  # signed zeros too
    assert np.array_equal(nll.view(bits), fast_nll.view(bits))
    assert np.array_equal(grad.view(bits), fast_grad.view(bits))
    # the gradient scaled by the model's 1 / (S N)
    fast_nll, fast_grad = Bernoulli().nll(x, logits, grad_scale=1.0 / 7)
    assert np.array_equal(nll, fast_nll) and np.array_equal(grad * (1.0 / 7), fast_grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_relu_kernels_match_numpy_on_signed_zeros_and_nan(dtype):
    """bias + ReLU and ReLU's backward against numpy.maximum and where(), bit for bit, on
    the values where they could differ: -0.0, +0.0, NaN, +-inf."""
    twins = pytest.importorskip("vae_np._twins_cpu")
    special = np.array([-0.0, 0.0, np.nan, -np.inf, np.inf, -1.5, 2.5, 1e-45], dtype=dtype)
    y = np.tile(special, (3, 1)).copy()
    b = np.array([0.0, -0.0, 0.0, 0.0, 0.0, 0.0, -2.5, 0.0], dtype=dtype)
    expected = np.maximum(y + b, 0.0)
    twins.bias_relu(y, b)
    assert np.array_equal(y.view(f"u{y.itemsize}"), expected.view(f"u{y.itemsize}"))
    dout = np.tile(special[::-1], (3, 1)).copy()
    expected = np.where(y > 0, dout, 0.0)
    got = twins.relu_backward(y, dout)
    assert np.array_equal(got.view(f"u{y.itemsize}"), expected.view(f"u{y.itemsize}"))


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


def adam_run(dtype, n, path, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
    """Four Adam steps over n parameters: ``path`` "reference" (``optim.adam_update``'s
    array expressions, called directly) or "numba" (vae_np's Adam, which runs its CPU
    twin)."""
    backend = get_backend("numpy", dtype)
    p, grads = random_adam_buffers(dtype, n)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    if path == "reference":
        for t, g in enumerate(grads, start=1):
            adam_update.reference(p, g, m, v, t, lr, *betas, eps)
        return p, m, v
    params, opt = adam_on_buffer(backend, p, lr=lr, betas=betas, eps=eps)
    for g in grads:
        params.grad[...] = g
        opt.step()
    return params.data, opt.m, opt.v


@pytest.mark.parametrize("n", (1, 1000, 100_007))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_numba_kernel_is_bit_identical(dtype, n):
    pytest.importorskip("numba")
    assert fast_paths_enabled(get_backend("numpy", dtype))
    for a, b in zip(adam_run(dtype, n, "numba"), adam_run(dtype, n, "reference")):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_vae_np_trains_where_numba_cannot_be_imported():
    """A fresh process with numba blocked: the import works, every op runs its reference
    (no CPU twins), and the step equals the one with the fast paths switched off."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from vae_np import VAE, Adam, get_backend, use_fast_paths\n"
        "from vae_np.backend import fast_paths_enabled\n"
        "assert not fast_paths_enabled(get_backend('numpy'))\n"
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
# Every op alone: its CPU twin against its reference, on awkward values


def _specials(dtype, shape, rng, scale=3.0):
    """Random values with -0.0, +0.0, NaN, +-inf and magnitudes past float32's exp range."""
    a = rng.standard_normal(shape) * scale
    flat = a.reshape(-1)
    flat[:8] = [-0.0, 0.0, np.nan, np.inf, -np.inf, 60.0, -60.0, 1e-30][:flat.size]
    return a.astype(dtype)


def _case_linear_relu_forward(dtype, rng):
    x = rng.standard_normal((7, 5)).astype(dtype)
    x[0] = 0.0                                     # a row whose output is the bias alone
    return (x, rng.standard_normal((5, 8)).astype(dtype), _specials(dtype, (8,), rng)), {}


def _case_relu_backward(dtype, rng):
    """Images (N, C, H, W), as between convolutions (the MLP's (N, D) runs in every step
    test above)."""
    out, dout = _specials(dtype, (6, 9), rng), _specials(dtype, (6, 9), rng)[::-1].copy()
    return (out.reshape(2, 3, 3, 3), dout.reshape(2, 3, 3, 3)), {}


def _case_relu_backward_and_bias_grad(dtype, rng):
    """(N, D) with special values in both (NaN in dout where out > 0 reaches the sum)."""
    out, dout = _specials(dtype, (37, 9), rng), _specials(dtype, (37, 9), rng)[::-1].copy()
    return (out, dout), {}


def _case_matmul_into(dtype, rng):
    a = rng.standard_normal((5, 6)).astype(dtype).T          # a transposed view, as x.T
    return (np.full((6, 4), 7.0, dtype), a, rng.standard_normal((5, 4)).astype(dtype)), {}


def _case_matmul(dtype, rng):
    w = rng.standard_normal((4, 6)).astype(dtype).T          # a transposed view, as W.T
    return (rng.standard_normal((5, 6)).astype(dtype), w), {}


def _case_kl_standard_normal(dtype, rng):
    logvar = rng.standard_normal((9, 4)).astype(dtype) * 2
    logvar[0] = [0.0, -0.0, 1e-8, -1e-8]                     # where expm1 matters
    return (rng.standard_normal((9, 4)).astype(dtype), logvar), {}


def _case_bernoulli_nll(dtype, rng):
    logits = _specials(dtype, (11, 13), rng, scale=4.0)
    logits[3, 2] = 0.5                             # no NaN in the row that x = 0.5 meets
    x = (rng.random((11, 13)) < 0.5).astype(dtype)
    x[3] = 0.5                                     # intensities, not only binary targets
    return (x, logits), {"grad_scale": 1.0 / 96}   # the model's 1 / (S N), scaled in the pass


def _case_adam_update(dtype, rng):
    n = 1003
    p, m, v, dead, tiny_g = adam_buffers_with_dead_lanes(dtype, n, seed=3)
    return (p, adam_gradients(dtype, n, dead, tiny_g, 1), m, v, 3, 1e-3, 0.9, 0.999, 1e-8), {}


def _case_reparameterize(dtype, rng):
    mu, logvar = (rng.standard_normal((5, 3)).astype(dtype) * s for s in (1.0, 3.0))
    return (mu, logvar, rng.standard_normal((4, 5, 3)).astype(dtype)), {}


def _case_iwae_bound(dtype, rng):
    log_w = rng.standard_normal((6, 5)) * 30
    log_w[:, 1] = -np.inf
    log_w[:, 2] -= 1e4
    log_w[0, 3] = -0.0
    return (log_w.astype(dtype),), {}


def _case_iwae_latent_backward(dtype, rng):
    dz, z, eps = (rng.standard_normal((9, 5, 3)).astype(dtype) for _ in range(3))
    a = (rng.random((9, 5)) / 5).astype(dtype)
    return (dz, a, z, rng.standard_normal((5, 3)).astype(dtype), eps), {}


def _case_gather_binarize(dtype, rng):
    x = rng.random((6, 5)).astype(dtype)
    x[0, :] = (0.0, 1.0, -0.0, np.nan, 0.5)      # both ends, a signed zero and NaN
    u = rng.random((8, 5)).astype(dtype)
    u[:, 4] = 0.5                                 # ties: x == u is not x > u
    u[1, :] = 0.0                                 # x = 0 against u = 0 gives 0
    order = np.array([0, 5, 0, 2, 1, 3, 4, 0], dtype=np.int64)   # repeats allowed
    return (x, order, u), {}


def _case_upsample_forward(dtype, rng):
    """Special values in odd-sized images, factor 3."""
    return (_specials(dtype, (6, 10), rng).reshape(2, 3, 2, 5), 3), {}


def _case_upsample_backward(dtype, rng):
    """Blocks of 2 x 2 with special values: signed zeros, NaN and infinities in a block."""
    return (_specials(dtype, (6, 16), rng).reshape(2, 3, 4, 4), 2), {}


#: op name -> inputs (args, kwargs) for a dtype; every op with a CPU twin needs one here.
TWIN_CASES = {
    "layers.linear_relu_forward": _case_linear_relu_forward,
    "layers.relu_backward": _case_relu_backward,
    "layers.relu_backward_and_bias_grad": _case_relu_backward_and_bias_grad,
    "layers.matmul": _case_matmul,
    "layers.matmul_into": _case_matmul_into,
    "losses.kl_standard_normal": _case_kl_standard_normal,
    "losses.bernoulli_nll": _case_bernoulli_nll,
    "optim.adam_update": _case_adam_update,
    "objectives.reparameterize": _case_reparameterize,
    "objectives.iwae_bound": _case_iwae_bound,
    "objectives.iwae_latent_backward": _case_iwae_latent_backward,
    "batches.gather_binarize": _case_gather_binarize,
    "conv.upsample_forward": _case_upsample_forward,
    "conv.upsample_backward": _case_upsample_backward,
}


def reference_of(name):
    """The undecorated reference of op ``name``."""
    return FAST_OPS[name]


def _arrays_of(result):
    if isinstance(result, tuple):
        return [a for r in result for a in _arrays_of(r)]
    return [] if result is None else [np.asarray(result)]


def _bits(a):
    return a.view(f"u{a.dtype.itemsize}")


# CPU twins checked elsewhere: the convolution's products sum the reference's terms in
# another order (within n eps sum|terms|, tests/test_conv.py::
# test_conv_twin_within_the_reordered_sum_bound; the fused ReLU is the conv twin's bits
# through the ReLU, test_conv_relu_twin_is_the_conv_twin_then_the_relu, and the
# upsampled backward the conv twin's through upsample_backward's,
# test_upsampled_conv_backward_twin_is_the_two_twins); max-pool is bit-exact there too
# (test_maxpool_twin_is_bit_identical).
CHECKED_IN_TEST_CONV = ("conv.conv2d_forward", "conv.conv2d_relu_forward",
                        "conv.conv2d_backward", "conv.conv2d_backward_upsampled",
                        "conv.maxpool2d_forward", "conv.maxpool2d_backward")


def test_every_op_with_a_cpu_twin_has_a_case():
    pytest.importorskip("numba")
    missing = sorted(set(_twin_table("cpu")) - set(TWIN_CASES) - set(CHECKED_IN_TEST_CONV))
    assert missing == [], f"CPU twins without a bit-exact case in TWIN_CASES: {missing}"
    assert set(FAST_OPS) & set(_twin_table("cpu")), "no op has a CPU twin"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(TWIN_CASES))
def test_every_cpu_twin_is_bit_identical_to_its_reference(name, dtype):
    """The twin's results, and what it writes into its arguments (Adam's buffers, the
    product's destination), equal the reference's to the bit, signed zeros and NaN
    included; and the twin does serve the case (it does not hand back NotImplemented)."""
    pytest.importorskip("numba")
    twin = _twin_table("cpu")[name]
    args, kwargs = TWIN_CASES[name](dtype, np.random.default_rng(11))
    copies = [[np.copy(a) if isinstance(a, np.ndarray) else a for a in args] for _ in (0, 1)]
    with np.errstate(all="ignore"):
        expected = reference_of(name)(*copies[0], **kwargs)
        got = twin(*copies[1], **kwargs)
    assert got is not NotImplemented, f"{name}: the twin declined its own case"
    expected, got = _arrays_of(expected), _arrays_of(got)
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.dtype == g.dtype == np.dtype(dtype) and e.shape == g.shape, name
        assert np.array_equal(_bits(e), _bits(g)), f"{name}: results differ"
    for i, (e, g) in enumerate(zip(*copies)):
        if isinstance(e, np.ndarray):
            assert np.array_equal(_bits(e), _bits(g)), f"{name}: argument {i} differs"


def test_twins_decline_what_they_do_not_serve_and_the_reference_answers(np64):
    """A twin hands back NotImplemented outside its case; the op's reference then runs:
    its reduction, its promotion of mixed dtypes, its error for mismatched shapes."""
    pytest.importorskip("numba")
    from vae_np.layers import relu_backward
    from vae_np.losses import bernoulli_nll, kl_standard_normal
    rng = np.random.default_rng(0)
    mu, logvar = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    twins = _twin_table("cpu")
    assert twins["losses.kl_standard_normal"](mu, logvar, reduction="sum") is NotImplemented
    np.testing.assert_array_equal(kl_standard_normal(mu, logvar, reduction="sum")[0],
                                  kl_standard_normal.reference(mu, logvar, reduction="sum")[0])
    x32 = (rng.random((4, 3)) < 0.5).astype(np.float32)
    assert twins["losses.bernoulli_nll"](x32, mu) is NotImplemented
    assert bernoulli_nll(x32, mu)[0].dtype == np.float64
    out_f = np.asfortranarray(rng.standard_normal((5, 4)))
    assert twins["layers.relu_backward"](out_f, out_f) is NotImplemented
    np.testing.assert_array_equal(relu_backward(out_f, out_f), np.where(out_f > 0, out_f, 0.0))
    with pytest.raises(ValueError, match="logvar: expected shape"):
        kl_standard_normal(mu, logvar[:, :2])
    with pytest.raises(ValueError, match="logits: expected shape"):
        bernoulli_nll(mu, logvar[:3])


def test_gather_binarize_leaves_to_the_reference_what_its_loop_cannot_read(np64):
    """Indices the loop would read out of bounds (a negative one, which take wraps; one
    past the end, which take refuses) and a u that is x itself (the reference gathers
    before it writes) go to the reference, which gives take's answers."""
    pytest.importorskip("numba")
    from vae_np.data import gather_binarize
    twin = _twin_table("cpu")["batches.gather_binarize"]
    rng = np.random.default_rng(4)
    x = rng.random((4, 3))
    wrapped = np.array([-1, 0], dtype=np.int64)
    u = rng.random((2, 3))
    assert twin(x, wrapped, u.copy()) is NotImplemented
    np.testing.assert_array_equal(gather_binarize(x, wrapped, u.copy()),
                                  (x[[3, 0]] > u).astype(np.float64))
    with pytest.raises(IndexError):
        gather_binarize(x, np.array([0, 4], dtype=np.int64), u.copy())
    same = x[:2].copy()
    assert twin(same, np.array([1, 0], dtype=np.int64), same) is NotImplemented
    np.testing.assert_array_equal(
        gather_binarize(same, np.array([1, 0], dtype=np.int64), same), (x[[1, 0]] > x[:2]))


def test_gather_binarize_names_what_does_not_fit(np64):
    from vae_np.data import gather_binarize
    x = np.random.default_rng(5).random((5, 4))
    with pytest.raises(ValueError, match=r"u: expected shape \(3, 4\)"):
        gather_binarize(x, np.arange(3), np.zeros((3, 5)))
    with pytest.raises(TypeError, match="order: expected integer row indices"):
        gather_binarize(x, np.arange(3.0), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="x, order: expected"):
        gather_binarize(x[0], np.arange(3), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------
# Where the fast paths run


def test_fast_paths_are_selected_by_backend_name():
    pytest.importorskip("numba")
    assert fast_paths_enabled() and fast_paths_enabled(get_backend("numpy", "float32"))
    pytest.importorskip("array_api_strict")
    assert not fast_paths_enabled(get_backend("array_api_strict", "float64"))
    with use_fast_paths(False):
        assert not fast_paths_enabled()
        assert not fast_paths_enabled(get_backend("numpy", "float32"))
    assert fast_paths_enabled(get_backend("numpy", "float32"))


def test_array_api_strict_runs_the_reference_and_agrees_with_numpy(strict64, np64):
    """array_api_strict declines every fast path (the reference keeps the code portable);
    its step agrees with NumPy's fast step (same operations; strict wraps NumPy)."""
    params = []
    for backend in (strict64, np64):
        model = VAE(12, (10,), 3, backend=backend, seed=2)
        opt = Adam(model.parameters, lr=1e-2)
        x = backend.asarray(np.random.default_rng(0).random((4, 12)))
        eps = backend.asarray(np.random.default_rng(1).standard_normal((1, 4, 3)))
        assert fast_paths_enabled(backend) == (backend is np64)
        for _ in range(2):
            model.loss(x, eps=eps)
            model.backward()
            opt.step()
        params.append(backend.to_numpy(model.parameters.data))
    np.testing.assert_allclose(params[0], params[1], rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_environment_variable_switches_the_fast_paths_off():
    code = ("from vae_np.backend import fast_paths_enabled\n"
            "print(fast_paths_enabled())\n")
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


@pytest.mark.parametrize("path", ("numba", "reference-object"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_flushes_subnormal_moments_on_every_path(dtype, path):
    """Through dead lanes, tiny gradients and subnormal inputs, every path gives the
    reference's bits (signed zeros included) and no moment is subnormal after a step."""
    if path == "numba":
        pytest.importorskip("numba")
    n = 5000
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
        adam_update.reference(ref[0], g, ref[1], ref[2], t, lr, *betas, eps)
        bits = f"u{np.dtype(dtype).itemsize}"
        for fast, reference in zip((params.data, opt.m, opt.v), ref):
            assert np.array_equal(fast.view(bits), reference.view(bits)), f"step {t}"
        assert subnormal_count(opt.m) == 0 and subnormal_count(opt.v) == 0, f"step {t}"
        # nor is the update's product step_size m (lr / (1 - beta1^t) times m) subnormal
        step_size = np.dtype(dtype).type(lr / (1.0 - betas[0] ** t))
        assert subnormal_count(step_size * opt.m) == 0, f"step {t}"
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
